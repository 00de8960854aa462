/*
 * The bytes-in-flight budget: a name for the region's body bytes, so
 * http.c and metrics.c need not know where they live.
 */
#include <errno.h>
#include <stdlib.h>

#include "service/budget.h"

struct budget {
    shared *region;
};

budget *budget_new(shared *region)
{
    budget *b = calloc(1, sizeof(*b));

    if (b == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    b->region = region;
    return b;
}

void budget_free(budget *b)
{
    free(b);
}

int budget_reserve(budget *b, uint64_t n)
{
    return shared_body_reserve(b->region, n);
}

void budget_release(budget *b, uint64_t n)
{
    shared_body_release(b->region, n);
}

uint64_t budget_in_flight(const budget *b)
{
    return shared_body_in_flight(b->region);
}

uint64_t budget_limit(const budget *b)
{
    return shared_body_limit(b->region);
}

uint64_t budget_refusals(const budget *b)
{
    return shared_sum(b->region, SHARED_BODY_REFUSALS);
}
