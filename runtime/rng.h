/* pipewright — counter-based random numbers keyed by (seed, name).
 *
 * Element i of a parameter is a pure function of (seed, parameter name, i),
 * so any partition of a graph, in any process, initialises identical weights.
 * The same keying gives data shuffles and dropout masks reproducible
 * streams: key = pw_rng_key(seed, "shuffle/epoch3"). Every algorithm here,
 * and how shuffles and dropout masks use them, is specified for
 * reimplementation in docs/api.md ("Reproducing the math"); changing one
 * changes tests/fixtures/rng_reference.py and the rng tests too.
 *
 * Ownership and threads: the keyed functions are pure (draw i of a key
 * never depends on other draws), so any thread may draw any index in any
 * order. A pw_rng stream is the caller's value: one thread advances one
 * stream.
 */
#ifndef PW_RUNTIME_RNG_H
#define PW_RUNTIME_RNG_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 64-bit key from a seed and a string (FNV-1a of the name, mixed with seed). */
uint64_t pw_rng_key(uint64_t seed, const char *name);

/* The i-th 64-bit value of the stream `key` (splitmix64 of key + i·golden). */
uint64_t pw_rng_u64(uint64_t key, uint64_t i);

/* Uniform in [0, 1) with 24 random bits (exactly representable in f32). */
float pw_rng_uniform(uint64_t key, uint64_t i);

/* Standard normal from elements 2i and 2i+1 (Box-Muller). */
float pw_rng_normal(uint64_t key, uint64_t i);

/* A sequential generator for shuffles: state advances on each call. */
typedef struct pw_rng { uint64_t key, ctr; } pw_rng;
static inline pw_rng pw_rng_make(uint64_t key) { pw_rng r = {key, 0}; return r; }
uint64_t pw_rng_next(pw_rng *r);
/* Uniform integer in [0, n) without modulo bias; n > 0. */
uint64_t pw_rng_below(pw_rng *r, uint64_t n);

#ifdef __cplusplus
}
#endif
#endif
