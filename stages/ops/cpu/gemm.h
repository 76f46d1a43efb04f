/* pipewright — CPU GEMMs whose bits do not depend on the thread count.
 *
 * The BLAS is only ever called single-threaded. A GEMM is cut into tiles of
 * C whose boundaries are a function of (M, N, K) alone; each tile is one
 * single-threaded BLAS call over the whole reduction dimension K, and the
 * tiles are spread over the CPU thread team (runtime/pool.h). So the order
 * in which every element of C is summed is fixed by the shape and the BLAS
 * kernel: 1 thread or 64, one stage or eight, the same bits.
 *
 * Internal to the CPU backend (stages/ops/cpu/); row-major, like cblas.
 */
#ifndef PW_STAGES_CPU_GEMM_H
#define PW_STAGES_CPU_GEMM_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/pool.h"

#ifdef __cplusplus
extern "C" {
#endif

/* C (M, N) = alpha · op(A) · op(B) + beta · C, op(X) = X or Xᵀ (trans_* = 1).
 * beta = 0 writes C without reading it. Tiled over the CPU thread team. */
void pw_cpu_gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                 float *C, int64_t ldc);

/* C (M, N) = bias (N, broadcast over the rows) + op(A) · op(B): each tile
 * writes its part of the bias into C just before its GEMM adds onto it
 * (beta = 1), so C is not swept once more beforehand; the same bits as
 * filling C with the bias and calling pw_cpu_gemm with beta = 1. */
void pw_cpu_gemm_bias(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                      int64_t lda, const float *B, int64_t ldb, const float *bias, float *C,
                      int64_t ldc);

/* The same as one BLAS call on the calling thread (inside a parallel item). */
void pw_cpu_gemm_1t(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                    float *C, int64_t ldc);

/* How pw_cpu_gemm cuts C: tiles of *tm rows × *tn columns (the last ones
 * smaller). Depends on (M, N, K) only; exposed for tests and benchmarks. */
void pw_cpu_gemm_tiles(int64_t M, int64_t N, int64_t K, int64_t *tm, int64_t *tn);

/* fn(arg, i, worker) for i in [0, n) over the CPU thread team; worker < the
 * team's size (pw_cpu_get_threads). Items must be independent (pool.h). */
void pw_cpu_parallel(int64_t n, pw_pool_fn fn, void *arg);

/* fn(job, lo, hi) over [0, n) cut into ranges of `per` elements (the last
 * one shorter), the ranges spread over the CPU thread team; one range runs
 * on the calling thread. `per` must come from the shape alone (never from
 * the thread count): with a kernel whose every element is computed by the
 * same code whichever range holds it, the bits then depend on nothing else.
 * The element-wise kernels, row kernels and column reductions of ops.c and
 * the optimizer of backend_cpu.c run this way. */
/* Elements per range of the element-wise kernels and the optimizer: a
 * multiple of VEC_N (vec.h), enough work per range (a few µs) that taking
 * it costs little, small enough that activations of a few micro-batch rows
 * already spread over the team. */
#define PW_CPU_GRAIN ((int64_t)4096)
typedef void (*pw_cpu_range_fn)(const void *job, int64_t lo, int64_t hi);
void pw_cpu_parallel_for(int64_t n, int64_t per, pw_cpu_range_fn fn, const void *job);

/* The BLAS's own thread count, for benchmarks that time the BLAS itself as
 * a reference (a multi-threaded cblas_sgemm). Kernels need it at 1: set it
 * back before they run. */
void pw_cpu_blas_threads(int n);

/* The BLAS and the kernel it runs, e.g. "OpenBLAS 0.3.21, Prescott kernel"
 * (BLIS: "BLIS"), into buf (always terminated). Returns 1 when the kernel
 * uses less of the CPU than the CPU has — OpenBLAS builds older than the
 * processor do not recognise it and fall back to an SSE kernel (Prescott)
 * several times slower — and then writes to `hint` (may be NULL) the
 * OPENBLAS_CORETYPE that selects a kernel this CPU runs ("Haswell" on a CPU
 * with AVX2: docs/performance.md, "The BLAS kernel"). 0 otherwise, and
 * when OPENBLAS_CORETYPE is set (whoever set it chose). */
int pw_cpu_blas_describe(char *buf, size_t n, char *hint, size_t hint_n);

#ifdef __cplusplus
}
#endif
#endif
