/* pipewright — causal attention's AVX-512 GEMM kernels. Contract in
 * attention_avx512.h.
 *
 * Why not the BLAS: attention's products are small (T×T×hd per sequence
 * and head, hd = 32..128) and triangular. The blocked BLAS path pays, per
 * 32-row block, a BLAS call whose small-matrix kernel runs well below the
 * BLAS's large-GEMM rate, and computes whole 32×32 blocks on the diagonal
 * (62.5 % of the square at T = 128 where the triangle is 50.4 %). Here one
 * register-blocked micro-kernel does all six products: C (MR rows × NV
 * vectors of 16 floats) = Σ_k a(r, k)·B[k, ·], a(r, k) read through two
 * strides (so Q·Kᵀ, P·V, Pᵀ·dO, dSᵀ·Q are all the same loop), every a
 * broadcast straight from memory, B rows loaded from a contiguous copy
 * (pack_rows) or in place; the score products read a gathered, transposed
 * 32-column tile of K (or V). The triangle is followed at 16-column /
 * 6..12-row steps.
 *
 * Bits: every element is one FMA chain over k = 0, 1, ... in order, then
 * multiplied by alpha once, then added to C when accumulating; the tiles
 * depend on T and hd only. Different from the BLAS path's bits (another
 * summation order), the same on every run and thread count. */
#include "stages/ops/cpu/attention_avx512.h"

#include <string.h>

static int force_blas;

void pw_cpu_attention_use_blas(int on) { force_blas = on != 0; }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(PW_ATT_NO_AVX512)

#include <immintrin.h>

#define TGT __attribute__((target("avx512f,fma")))
#define ALWAYS __attribute__((always_inline)) inline

int pw_cpu_att_fast_usable(int64_t hd)
{
    return !force_blas && hd >= 16 && hd % 16 == 0 && hd <= PW_ATT_FAST_MAX_HD &&
           __builtin_cpu_supports("avx512f");
}

/* C[r·ldc + 16v + l] for r < MR, v < NV, lanes l in mask[v]:
 *   alpha·Σ_{k<K} A[r·ars + k·aks]·B[k·ldb + 16v + l]   (+ C when acc).
 * MR and NV are constants once inlined: the MR·NV accumulators (at most 24)
 * and NV B vectors live in registers (32 of them). */
static ALWAYS TGT void kern(const int MR, const int NV, int64_t K, const float *A, int64_t ars,
                            int64_t aks, const float *B, int64_t ldb, float *C, int64_t ldc,
                            float alpha, int acc, const __mmask16 *mask)
{
    /* Unrolled by hand-given pragmas: gcc -O2 would keep c[][] in memory. */
    __m512 c[12][4];
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) c[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 b[4];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
#pragma GCC unroll 12
        for (int r = 0; r < MR; r++) {
            const __m512 a = _mm512_set1_ps(A[r * ars + k * aks]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
        }
    }
    const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            float *p = C + r * ldc + 16 * v;
            __m512 x = _mm512_mul_ps(c[r][v], al);
            if (acc) x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask[v], p), x);
            _mm512_mask_storeu_ps(p, mask[v], x);
        }
}

/* kern with NV = nv (1, 2, 4) and MR = mr (1 ≤ mr ≤ 8, 12, 6 for nv = 1, 2, 4). */
static TGT void tile(int mr, int nv, int64_t K, const float *A, int64_t ars, int64_t aks,
                     const float *B, int64_t ldb, float *C, int64_t ldc, float alpha, int acc,
                     const __mmask16 *mask)
{
#define KC(m, n)                                                                          \
    case (n) * 16 + (m):                                                                  \
        kern(m, n, K, A, ars, aks, B, ldb, C, ldc, alpha, acc, mask);                     \
        return
    switch (nv * 16 + mr) {
        KC(1, 1); KC(2, 1); KC(3, 1); KC(4, 1); KC(5, 1); KC(6, 1); KC(7, 1); KC(8, 1);
        KC(1, 2); KC(2, 2); KC(3, 2); KC(4, 2); KC(5, 2); KC(6, 2); KC(7, 2); KC(8, 2);
        KC(9, 2); KC(10, 2); KC(11, 2); KC(12, 2);
        KC(1, 4); KC(2, 4); KC(3, 4); KC(4, 4); KC(5, 4); KC(6, 4);
    default: __builtin_unreachable();
    }
#undef KC
}

static const __mmask16 all_lanes[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};

static inline __mmask16 lanes(int64_t n) /* the first n of 16 lanes, n ≤ 16 */
{
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* Vectors per column chunk of hd (hd − c0 ≥ 16 left) and rows per tile. */
static inline int chunk_nv(int64_t left) { return left >= 64 ? 4 : left >= 32 ? 2 : 1; }
static inline int chunk_mr(int nv) { return nv == 4 ? 6 : nv == 2 ? 12 : 8; }

TGT void pw_cpu_att_scores(const float *A, int64_t lda, const float *Bm, int64_t ldb, float *S,
                           int64_t T, int64_t hd, float alpha)
{
    /* Bᵀ for 32 columns: bt[k·32 + c] = Bm[(s0 + c)·ldb + k], zero past T. */
    float bt[PW_ATT_FAST_MAX_HD * 32] __attribute__((aligned(64)));
    /* Gathered 16 rows at a time: offsets of rows 0..15 (ldb·15 < 2^31:
     * qkv rows are 3D floats). */
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32((int)ldb));
    for (int64_t s0 = 0; s0 < T; s0 += 32) {
        const int64_t cn = T - s0 < 32 ? T - s0 : 32;
        const __mmask16 m[2] = {lanes(cn), lanes(cn - 16)};
        for (int64_t k = 0; k < hd; k++)
            for (int h = 0; h < 2; h++)
                _mm512_store_ps(bt + k * 32 + 16 * h,
                                _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m[h], rows,
                                                         Bm + (s0 + 16 * h) * ldb + k, 4));
        /* Rows s0 .. s0+16 see at most the tile's first 16 columns; the rows
         * below see all of it. */
        const int64_t split = cn > 16 ? s0 + 16 : T;
        for (int64_t t0 = s0; t0 < split; t0 += 8) {
            const int64_t mr = split - t0 < 8 ? split - t0 : 8;
            tile((int)mr, 1, hd, A + t0 * lda, lda, 1, bt, 32, S + t0 * T + s0, T, alpha, 0, m);
        }
        for (int64_t t0 = split; t0 < T; t0 += 12) {
            const int64_t mr = T - t0 < 12 ? T - t0 : 12;
            tile((int)mr, 2, hd, A + t0 * lda, lda, 1, bt, 32, S + t0 * T + s0, T, alpha, 0, m);
        }
    }
}

/* X's T rows of hd, packed contiguous into xp when they fit (PACK_MAX
 * floats): rows of q, k, v or dO lie 3D or D floats apart, a multiple of 1
 * KiB, so in place they fall into a quarter of L1's sets and every pass
 * over them misses to L2. Packing moves the same values: the bits do not
 * change. Returns the rows to read and sets *ld. */
#define PACK_MAX 16384
static const float *pack_rows(const float *X, int64_t ldx, int64_t T, int64_t hd, float *xp,
                              int64_t *ld)
{
    if (T * hd > PACK_MAX) {
        *ld = ldx;
        return X;
    }
    for (int64_t t = 0; t < T; t++) memcpy(xp + t * hd, X + t * ldx, (size_t)hd * sizeof(float));
    *ld = hd;
    return xp;
}

TGT void pw_cpu_att_rows(const float *P, int64_t T, const float *X, int64_t ldx, float *O,
                         int64_t ldo, int64_t hd, int accumulate)
{
    float xp[PACK_MAX] __attribute__((aligned(64)));
    X = pack_rows(X, ldx, T, hd, xp, &ldx);
    for (int64_t c0 = 0; c0 < hd;) {
        const int nv = chunk_nv(hd - c0), MR = chunk_mr(nv);
        for (int64_t t0 = 0; t0 < T; t0 += MR) {
            const int64_t mr = T - t0 < MR ? T - t0 : MR;
            tile((int)mr, nv, t0 + mr, P + t0 * T, T, 1, X + c0, ldx, O + t0 * ldo + c0, ldo,
                 1.0f, accumulate, all_lanes);
        }
        c0 += 16 * nv;
    }
}

TGT void pw_cpu_att_cols(const float *P, int64_t T, const float *X, int64_t ldx, float *O,
                         int64_t ldo, int64_t hd, int accumulate)
{
    float xp[PACK_MAX] __attribute__((aligned(64)));
    X = pack_rows(X, ldx, T, hd, xp, &ldx);
    for (int64_t c0 = 0; c0 < hd;) {
        const int nv = chunk_nv(hd - c0), MR = chunk_mr(nv);
        for (int64_t s0 = 0; s0 < T; s0 += MR) {
            const int64_t mr = T - s0 < MR ? T - s0 : MR;
            tile((int)mr, nv, T - s0, P + s0 * T + s0, 1, T, X + s0 * ldx + c0, ldx,
                 O + s0 * ldo + c0, ldo, 1.0f, accumulate, all_lanes);
        }
        c0 += 16 * nv;
    }
}

/* ---------------------------------------------------------------- softmax */

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

/* ops.c's vec_exp on 16 lanes: the same clamps (NaN passes), Cody–Waite
 * reduction, degree-7 Taylor series and exponent-bit scaling. */
static ALWAYS TGT v16 exp16(v16 x)
{
    const float magic = 12582912.0f; /* 1.5·2^23 */
    v16i lo = x < -87.33654f;
    x = (v16)(((v16i)x & ~lo) | ((v16i)((v16){0} - 87.33654f) & lo));
    v16i hi = x > 88.0f;
    x = (v16)(((v16i)x & ~hi) | ((v16i)((v16){0} + 88.0f) & hi));
    v16 t = x * 1.44269504088896341f + magic;
    v16 n = t - magic;
    v16 scale = (v16)(((v16u)t - 0x4B400000u + 127u) << 23);
    v16 r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    v16 q = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    return q * scale;
}

TGT void pw_cpu_att_softmax_row(float *row, int64_t len, int64_t T)
{
    /* The largest, as `m = v[s] > m ? v[s] : m` from m = v[0]. */
    __m512 mv = _mm512_set1_ps(row[0]);
    for (int64_t s = 0; s < len; s += 16) {
        const __mmask16 in = lanes(len - s);
        const __m512 x = _mm512_maskz_loadu_ps(in, row + s);
        mv = _mm512_mask_blend_ps(_mm512_mask_cmp_ps_mask(in, x, mv, _CMP_GT_OQ), mv, x);
    }
    float ml[16];
    _mm512_storeu_ps(ml, mv);
    float m = ml[0];
    for (int l = 1; l < 16; l++) m = ml[l] > m ? ml[l] : m;
    /* e = exp(row − m), stored; Σ in double over 8 lanes, groups of 8 in
     * order, then the tail (< 8) one by one. */
    __m512d acc = _mm512_setzero_pd();
    const int64_t full = len / 8 * 8;
    for (int64_t s = 0; s < len; s += 16) {
        const __mmask16 in = lanes(len - s);
        v16 e = exp16((v16)_mm512_maskz_loadu_ps(in, row + s) - m);
        _mm512_mask_storeu_ps(row + s, in, (__m512)e);
        if (s + 8 <= full) acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256((__m512)e)));
        if (s + 16 <= full)
            acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(
                                         _mm512_extractf64x4_pd(_mm512_castps_pd((__m512)e), 1))));
    }
    double al[8];
    _mm512_storeu_pd(al, acc);
    double sum = 0.0;
    for (int l = 0; l < 8; l++) sum += al[l];
    for (int64_t s = full; s < len; s++) sum += (double)row[s];
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
    for (int64_t s = 0; s < T; s += 16) {
        const __mmask16 in = lanes(len - s), out = lanes(T - s);
        _mm512_mask_storeu_ps(row + s, out, _mm512_maskz_mul_ps(in, _mm512_maskz_loadu_ps(in, row + s), inv));
    }
}

TGT void pw_cpu_att_dsoftmax_row(const float *pr, float *dr, int64_t len, int64_t T, float scale)
{
    __m512d acc = _mm512_setzero_pd();
    const int64_t full = len / 8 * 8;
    for (int64_t s = 0; s < full; s += 8) {
        const __m512d p = _mm512_cvtps_pd(_mm256_loadu_ps(pr + s)),
                      d = _mm512_cvtps_pd(_mm256_loadu_ps(dr + s));
        acc = _mm512_add_pd(acc, _mm512_mul_pd(p, d));
    }
    double al[8];
    _mm512_storeu_pd(al, acc);
    double dot = 0.0;
    for (int l = 0; l < 8; l++) dot += al[l];
    for (int64_t s = full; s < len; s++) dot += (double)pr[s] * (double)dr[s];
    const __m512 df = _mm512_set1_ps((float)dot), sc = _mm512_set1_ps(scale);
    for (int64_t s = 0; s < T; s += 16) {
        const __mmask16 in = lanes(len - s), out = lanes(T - s);
        const __m512 p = _mm512_maskz_loadu_ps(in, pr + s), d = _mm512_maskz_loadu_ps(in, dr + s);
        _mm512_mask_storeu_ps(dr + s, out, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(d, df)), sc));
    }
}

#else /* not x86-64 (or built with -DPW_ATT_NO_AVX512): the blocked BLAS path only */

int pw_cpu_att_fast_usable(int64_t hd)
{
    (void)hd;
    return 0;
}

void pw_cpu_att_scores(const float *A, int64_t lda, const float *Bm, int64_t ldb, float *S,
                       int64_t T, int64_t hd, float alpha)
{
    (void)A; (void)lda; (void)Bm; (void)ldb; (void)S; (void)T; (void)hd; (void)alpha;
}

void pw_cpu_att_rows(const float *P, int64_t T, const float *X, int64_t ldx, float *O,
                     int64_t ldo, int64_t hd, int accumulate)
{
    (void)P; (void)T; (void)X; (void)ldx; (void)O; (void)ldo; (void)hd; (void)accumulate;
}

void pw_cpu_att_softmax_row(float *row, int64_t len, int64_t T)
{
    (void)row; (void)len; (void)T;
}

void pw_cpu_att_dsoftmax_row(const float *pr, float *dr, int64_t len, int64_t T, float scale)
{
    (void)pr; (void)dr; (void)len; (void)T; (void)scale;
}

void pw_cpu_att_cols(const float *P, int64_t T, const float *X, int64_t ldx, float *O,
                     int64_t ldo, int64_t hd, int accumulate)
{
    (void)P; (void)T; (void)X; (void)ldx; (void)O; (void)ldo; (void)hd; (void)accumulate;
}

#endif
