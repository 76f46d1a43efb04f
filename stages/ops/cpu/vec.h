/* pipewright — loops that gcc -O2 vectorises, for the CPU kernels (ops.c)
 * and the optimizer (optim.c). Internal to stages/ops.
 *
 * gcc -O2 runs the vectoriser with its "very cheap" cost model: it vectorises
 * a loop only when the trip count is a known multiple of the vector width (no
 * epilogue, no run-time alias checks). A plain `for (i < n)` loop therefore
 * stays scalar. VEC_FOR(i, n, body) runs body over blocks of exactly VEC_N
 * elements (an inner loop gcc does vectorise), then over the scalar tail.
 * Bodies must load unconditionally: `c ? a[i] : 0` is a conditional load and
 * blocks vectorisation, so load into a local first. Checked with
 * -fopt-info-vec; the order of operations per element is unchanged, so the
 * bits are the same as the scalar loop's. A kernel cut into ranges whose
 * starts are multiples of VEC_N (pw_cpu_parallel_for) computes every element
 * in the same lane or tail position as one call over the whole array. */
#ifndef PW_STAGES_CPU_VEC_H
#define PW_STAGES_CPU_VEC_H

#include <stdint.h>

#define VEC_N 8
#define VEC_FOR(i, n, ...)                                                    \
    do {                                                                      \
        const int64_t vec_n_ = (n);                                           \
        int64_t vec_b_ = 0;                                                   \
        for (; vec_b_ + VEC_N <= vec_n_; vec_b_ += VEC_N)                     \
            for (int vec_l_ = 0; vec_l_ < VEC_N; vec_l_++) {                  \
                const int64_t i = vec_b_ + vec_l_;                            \
                __VA_ARGS__                                                   \
            }                                                                 \
        for (int64_t i = vec_b_; i < vec_n_; i++) { __VA_ARGS__ }             \
    } while (0)

#endif
