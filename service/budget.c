/*
 * The bytes-in-flight budget. One compare-and-swap loop per reservation;
 * the struct is the whole mapping, so a pointer to it is valid in every
 * process that inherits the mapping (fork keeps MAP_SHARED pages shared).
 * GCC's __atomic builtins on naturally aligned 64-bit words are lock-free
 * on x86-64 and aarch64, which is what makes them safe across processes.
 */
#include <errno.h>
#include <sys/mman.h>

#include "service/budget.h"

struct budget {
    uint64_t limit; /* written once, before any process shares it */
    uint64_t in_flight;
    uint64_t refusals;
};

_Static_assert(__atomic_always_lock_free(sizeof(uint64_t), 0),
               "the budget needs lock-free 64-bit atomics");

budget *budget_new(uint64_t limit)
{
    budget *b;

    if (limit == 0) {
        errno = EINVAL;
        return NULL;
    }
    b = mmap(NULL, sizeof(*b), PROT_READ | PROT_WRITE,
             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED)
        return NULL;
    b->limit = limit;
    b->in_flight = 0;
    b->refusals = 0;
    return b;
}

void budget_free(budget *b)
{
    if (b != NULL)
        munmap(b, sizeof(*b));
}

int budget_reserve(budget *b, uint64_t n)
{
    uint64_t now = __atomic_load_n(&b->in_flight, __ATOMIC_RELAXED);

    do {
        if (n > b->limit || now > b->limit - n) {
            __atomic_add_fetch(&b->refusals, 1, __ATOMIC_RELAXED);
            return -1;
        }
    } while (!__atomic_compare_exchange_n(&b->in_flight, &now, now + n, 1,
                                          __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
    return 0;
}

void budget_release(budget *b, uint64_t n)
{
    __atomic_sub_fetch(&b->in_flight, n, __ATOMIC_ACQ_REL);
}

uint64_t budget_in_flight(const budget *b)
{
    return __atomic_load_n(&b->in_flight, __ATOMIC_RELAXED);
}

uint64_t budget_limit(const budget *b)
{
    return b->limit;
}

uint64_t budget_refusals(const budget *b)
{
    return __atomic_load_n(&b->refusals, __ATOMIC_RELAXED);
}
