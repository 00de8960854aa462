/*
 * Login and PINs: logging in around libp11, and what the process knows of each
 * token's PIN.
 *
 * The login goes through the function list as well (probe.c says why
 * libp11 0.4.12 allows it), so libp11 never holds the PIN, on a session of
 * our own that stays open until libp11's first enumeration has a session
 * in the pool: a PKCS#11 login ends with the process's last session on the
 * token. That needs two sessions at once, so a token that allows only one
 * cannot be logged in to. The module registry keeps, per slot, the SHA-256
 * of the PIN the process logged in with and of every PIN the token
 * refused (never a PIN): a refused PIN is never sent again, and neither is
 * any PIN while the process is logged in (the token would not check it).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libp11.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ui.h>

#include "token/internal.h"

/* What the process knows of the PIN of the token in slot, created on
 * first use; NULL without memory. Kept by label and serial, not by slot,
 * so that it survives a rebuild that lists the slots in another order. */
static struct tk_pins *pins_for(struct tk_module *m, const PKCS11_SLOT *slot)
{
    const char *label = slot->token->label ? slot->token->label : "";
    const char *serial = slot->token->serialnr ? slot->token->serialnr : "";
    struct tk_pins *p;

    for (p = m->pins; p != NULL; p = p->next) {
        if (strncmp(p->label, label, sizeof(p->label) - 1) == 0 &&
            strncmp(p->serial, serial, sizeof(p->serial) - 1) == 0)
            return p;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    snprintf(p->label, sizeof(p->label), "%s", label);
    snprintf(p->serial, sizeof(p->serial), "%s", serial);
    p->next = m->pins;
    m->pins = p;
    return p;
}

int tk_pin_digest(const char *pin, unsigned char d[TK_PIN_DIGEST])
{
    unsigned int len = 0;

    if (!EVP_Digest(pin, strlen(pin), d, &len, EVP_sha256(), NULL) ||
        len != TK_PIN_DIGEST) {
        ERR_clear_error();
        return -1;
    }
    return 0;
}

static int pin_was_refused(const struct tk_pins *p,
                           const unsigned char d[TK_PIN_DIGEST])
{
    unsigned i;

    for (i = 0; i < p->nrefused; i++) {
        if (CRYPTO_memcmp(p->refused[i], d, TK_PIN_DIGEST) == 0)
            return 1;
    }
    return 0;
}

/* Only called while there is room: tk_token_login tries no PIN otherwise. */
static void pin_refused(struct tk_pins *p, const unsigned char d[TK_PIN_DIGEST])
{
    memcpy(p->refused[p->nrefused++], d, TK_PIN_DIGEST);
}

/* Logs the process in through the module's function list, so that libp11
 * never holds the PIN (PKCS11_login would keep a copy for the slot's life).
 * A PIN is sent to the token at most once per module load: one it refused
 * before is not sent again, nor, while the process is logged in, any
 * other than the one it logged in with (the token would not check it, and
 * logging out to check it would break the token set still serving). A card
 * locks after a few wrong PINs, and a reload would otherwise send the same
 * one each time.
 *
 * 1 when logged in (or no login is needed), 0 when the token went down, -1
 * on an internal error. When this call logged in, *holding is 1 and
 * *session holds the login until libp11 has a session of its own. The PIN
 * is wiped and freed on every path. Called with the module's lock held. */
int tk_token_login(struct tk_token *t, char **pin, const tk_token_state *st,
                   unsigned long *session, int *holding, token_error *err)
{
    struct tk_pins *p = pins_for(t->module, t->slot);
    unsigned char d[TK_PIN_DIGEST];
    char why[96];
    unsigned long rv;
    int r = 0;

    if (p == NULL) {
        tk_error(err, TOKEN_ERR_INTERNAL, "out of memory");
        r = -1;
        goto out;
    }
    if (*pin == NULL) {
        if (t->slot->token->loginRequired)
            tk_token_down(t, TK_DOWN,
                          "the token needs a login and no PIN is configured");
        else
            r = 1;
        goto out;
    }
    if (tk_pin_digest(*pin, d) < 0) {
        tk_error(err, TOKEN_ERR_INTERNAL, "cannot compute a PIN digest");
        r = -1;
        goto out;
    }
    /* A token that was reset since has forgotten the login. */
    if (p->logged_in && !st->logged_in)
        p->logged_in = 0;
    if (p->logged_in) {
        if (CRYPTO_memcmp(d, p->good, TK_PIN_DIGEST) == 0) {
            t->logs_in = 1;
            r = 1;
        } else if (pin_was_refused(p, d)) {
            tk_token_down(t, TK_PIN_REFUSED,
                          "login failed: this PIN was refused before; not "
                          "retried (fix the PIN and reload)");
        } else {
            tk_token_down(t, TK_DOWN,
                          "the PIN changed while the token is logged in; "
                          "restart to log in with the new PIN");
        }
        goto out;
    }
    /* A locked PIN cannot succeed; trying would only count a failure. */
    if (p->locked || st->pin_locked) {
        p->locked = 1;
        tk_token_down(t, TK_PIN_REFUSED, "login failed: PIN locked");
        goto out;
    }
    if (pin_was_refused(p, d)) {
        tk_token_down(t, TK_PIN_REFUSED,
                      "login failed: this PIN was refused before; not retried "
                      "(fix the PIN and reload)");
        goto out;
    }
    if (p->nrefused == TK_REFUSED_MAX) {
        tk_token_down(t, TK_PIN_REFUSED,
                      "login failed: %d PINs were refused before; no other is "
                      "tried (fix the PIN and reload)",
                      TK_REFUSED_MAX);
        goto out;
    }
    /* The login's own session stays open until libp11 opens one, and
     * libp11 waits forever when it cannot (see set.c). */
    if (st->max_sessions == 1) {
        tk_token_down(t, TK_DOWN,
                      "the token allows one session at a time; logging in "
                      "needs two");
        goto out;
    }
    rv = tk_probe_login(t->module->probe, t->slot_id, *pin, session);
    if (rv == 0) {
        memcpy(p->good, d, TK_PIN_DIGEST);
        p->logged_in = 1;
        t->logs_in = 1;
        *holding = 1;
        r = 1;
        goto out;
    }
    tk_ckr_describe(rv, why, sizeof(why));
    if (rv == CKR_PIN_LOCKED) {
        p->locked = 1;
        tk_token_down(t, TK_PIN_REFUSED, "login failed: PIN locked");
    } else if (rv == CKR_PIN_INCORRECT) {
        pin_refused(p, d);
        tk_token_down(t, TK_PIN_REFUSED, "login failed: incorrect PIN");
    } else if (rv == CKR_PIN_INVALID || rv == CKR_PIN_LEN_RANGE ||
               rv == CKR_PIN_EXPIRED) {
        pin_refused(p, d);
        tk_token_down(t, TK_PIN_REFUSED, "login failed: PIN refused, %s", why);
    } else {
        tk_token_down(t, TK_DOWN, "login failed: %s", why);
    }
out:
    OPENSSL_cleanse(d, sizeof(d));
    token_pin_free(*pin);
    *pin = NULL;
    return r;
}

/* The PIN from the token's configured source, only when it is the one the
 * configuration was loaded with: a changed PIN waits for a reload, which
 * is what allows a new attempt. NULL (and why) otherwise. */
char *tk_token_pin_again(const struct tk_token *t, char *why, size_t len)
{
    unsigned char d[TK_PIN_DIGEST];
    token_error perr = {0};
    char *pin;

    pin = t->pin_file != NULL ? token_pin_read_file(t->pin_file, &perr)
                              : token_pin_read_env(t->pin_env, &perr);
    if (pin == NULL) {
        /* cut to fit the reason */
        snprintf(why, len, "cannot read the PIN: %.150s", perr.message);
        return NULL;
    }
    if (tk_pin_digest(pin, d) < 0 ||
        CRYPTO_memcmp(d, t->pin_digest, TK_PIN_DIGEST) != 0) {
        snprintf(why, len,
                 "the PIN changed since the configuration was loaded; "
                 "reload to use it");
        token_pin_free(pin);
        pin = NULL;
    }
    OPENSSL_cleanse(d, sizeof(d));
    return pin;
}

/* ---- context-specific login (CKA_ALWAYS_AUTHENTICATE) ---- */

static pthread_once_t ui_once = PTHREAD_ONCE_INIT;
static UI_METHOD *ui_method;

/* libp11 0.4.12 (pkcs11_authenticate) asks its context's UI_METHOD for the
 * PIN of a CKA_ALWAYS_AUTHENTICATE key after each C_SignInit or
 * C_DecryptInit, then sends it with C_Login(CKU_CONTEXT_SPECIFIC) and
 * wipes its copy. It keeps no PIN of its own (PKCS11_login's copy is never
 * made: token/ logs in around libp11), so this reader fetches the PIN of
 * the token the calling thread operates on from its configured source,
 * only when it is the PIN the configuration was loaded with and the token
 * never refused it, hands it over and wipes it. */
static int tk_ui_read(UI *ui, UI_STRING *uis)
{
    const struct tk_token *t = tk_op_token;
    char why[TK_REASON_LEN];
    char *pin;
    int ok;

    if (UI_get_string_type(uis) != UIT_PROMPT &&
        UI_get_string_type(uis) != UIT_VERIFY)
        return 1;
    if (t == NULL || !t->has_pin)
        return 0;
    pin = tk_token_pin_again(t, why, sizeof(why));
    if (pin == NULL)
        return 0;
    ok = UI_set_result(ui, uis, pin) == 0;
    token_pin_free(pin);
    return ok ? 1 : 0;
}

static void ui_method_init(void)
{
    ui_method = UI_create_method("smimed PIN source");
    if (ui_method != NULL && UI_method_set_reader(ui_method, tk_ui_read) != 0) {
        UI_destroy_method(ui_method);
        ui_method = NULL;
    }
}

UI_METHOD *tk_login_ui_method(void)
{
    pthread_once(&ui_once, ui_method_init);
    return ui_method;
}
