/* pipewright — causal attention's own GEMM kernels: register-blocked
 * AVX-512F + FMA micro-kernels over the lower triangle only, chosen at run
 * time (the CPU must have AVX-512F, hd a multiple of 16, at most
 * PW_ATT_FAST_MAX_HD). Internal to stages/ops: ops.c's attention section is
 * the only caller, apart from bench_gpt (pw_cpu_attention_use_blas).
 *
 * Every product runs over the lower triangle of a T×T matrix P (row-major,
 * leading dimension T), at a granularity of 16 columns or 6..12 rows
 * instead of the blocked BLAS path's 32×32 blocks, reading q, k, v, dO
 * through their leading dimensions (copied to the stack only: a transposed
 * 32-column tile, and rows packed contiguous when T·hd ≤ 16384). Each
 * output element is one FMA chain over k in increasing order,
 * then scaled once: its bits depend on the shape alone, never on the thread
 * count or the batch. */
#ifndef PW_STAGES_CPU_ATTENTION_AVX512_H
#define PW_STAGES_CPU_ATTENTION_AVX512_H

#include <stdint.h>

#define PW_ATT_FAST_MAX_HD 256

/* Nonzero when the kernels below may be called for head size hd: an
 * x86-64 build, a CPU with AVX-512F, hd % 16 == 0 and 16 ≤ hd ≤
 * PW_ATT_FAST_MAX_HD, and pw_cpu_attention_use_blas(1) not in force. */
int pw_cpu_att_fast_usable(int64_t hd);

/* Benchmarks only: 1 makes the attention kernels take the blocked BLAS path
 * even where the kernels below are usable (bench_gpt alternates the two);
 * 0 (the default) restores the choice by CPU. Not thread-safe: set it
 * between calls. */
void pw_cpu_attention_use_blas(int on);

/* S[t][s] = alpha·Σ_k A[t·lda + k]·Bm[s·ldb + k] (k < hd) for every
 * t < T and every s ≤ t, plus entries above the diagonal up to the next
 * multiple of 16 (at most 15 per row, garbage for the caller to overwrite).
 * Nothing further right of a row is written. S has leading dimension T. */
void pw_cpu_att_scores(const float *A, int64_t lda, const float *Bm, int64_t ldb, float *S,
                       int64_t T, int64_t hd, float alpha);

/* O[t·ldo + c] (+)= Σ_{s ≤ t} P[t·T + s]·X[s·ldx + c] for t < T, c < hd.
 * P must be zero above the diagonal (s > t): the kernel reads up to 7
 * entries past the diagonal. accumulate: add to O, else overwrite it. */
void pw_cpu_att_rows(const float *P, int64_t T, const float *X, int64_t ldx, float *O,
                     int64_t ldo, int64_t hd, int accumulate);

/* O[s·ldo + c] (+)= Σ_{t ≥ s} P[t·T + s]·X[t·ldx + c] for s < T, c < hd
 * (O = Pᵀ·X over the lower triangle). P must be zero above the diagonal. */
void pw_cpu_att_cols(const float *P, int64_t T, const float *X, int64_t ldx, float *O,
                     int64_t ldo, int64_t hd, int accumulate);

/* ops.c's causal softmax row (max, exp, Σ in double over 8 partial sums,
 * scale; zeros from len to T) and its backward row (dr = pr·(dr − Σ pr·dr)
 * ·scale, zeros from len), 16 lanes wide: the same algorithm, bits that may
 * differ from ops.c's (FMA contraction). */
void pw_cpu_att_softmax_row(float *row, int64_t len, int64_t T);
void pw_cpu_att_dsoftmax_row(const float *pr, float *dr, int64_t len, int64_t T, float scale);

#endif
