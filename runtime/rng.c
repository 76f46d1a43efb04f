/* pipewright — counter-based RNG (splitmix64 finaliser over a keyed counter). */
#include "runtime/rng.h"

#include <math.h>

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t pw_rng_key(uint64_t seed, const char *name)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const unsigned char *p = (const unsigned char *)name; p && *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ULL;
    }
    return mix64(h ^ mix64(seed + 0x9e3779b97f4a7c15ULL));
}

uint64_t pw_rng_u64(uint64_t key, uint64_t i)
{
    return mix64(key + (i + 1) * 0x9e3779b97f4a7c15ULL);
}

float pw_rng_uniform(uint64_t key, uint64_t i)
{
    return (float)(pw_rng_u64(key, i) >> 40) * (1.0f / 16777216.0f);
}

float pw_rng_normal(uint64_t key, uint64_t i)
{
    /* u1 in (0, 1] so log() is finite. */
    double u1 = ((double)(pw_rng_u64(key, 2 * i) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(pw_rng_u64(key, 2 * i + 1) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

uint64_t pw_rng_next(pw_rng *r) { return pw_rng_u64(r->key, r->ctr++); }

uint64_t pw_rng_below(pw_rng *r, uint64_t n)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do x = pw_rng_next(r); while (x >= limit);
    return x % n;
}
