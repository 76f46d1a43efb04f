/* pipewright — deterministic tiled GEMMs over the CPU thread team.
 * Contract in gemm.h; the thread team in runtime/pool.h.
 *
 * Why tiles and not the BLAS's own threads: a multi-threaded BLAS chooses
 * its split (and sometimes its kernel path) from the thread count, so the
 * same product summed differently on 1 and on 2 threads, and a 1-stage run
 * (all cores to one worker) differed from a 2-stage run (one core each).
 * Here the BLAS runs single-threaded on tiles fixed by the shape, and each
 * tile sums its whole K range in one call: which thread computes a tile
 * never changes a bit.
 */
#include "stages/ops/cpu/gemm.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "runtime/log.h"
#include "runtime/status.h"
#include "stages/ops/cpu/ops.h"

#if defined(PW_BLAS_BLIS)
#include <blis.h>
#else
#include <cblas.h>
#ifndef OPENBLAS_VERSION
/* Some cblas.h (the reference one, Debian's alternatives) omit these. */
void openblas_set_num_threads(int num_threads);
#endif
#endif

#if defined(OPENBLAS_VERSION)
typedef blasint pw_blas_int; /* int, or int64 in an ILP64 build */
#else
typedef int pw_blas_int;
#endif

/* A dimension as the BLAS integer. Shapes are validated when a plan is built;
 * one that does not fit here is a bug, not bad input. */
static pw_blas_int blas_dim(int64_t v)
{
    PW_ASSERT(v >= 0 && (sizeof(pw_blas_int) >= sizeof(int64_t) || v <= INT_MAX));
    return (pw_blas_int)v;
}

/* Leading dimensions must be >= 1 even when the matrix is empty. */
static pw_blas_int blas_ld(int64_t v) { return blas_dim(v > 0 ? v : 1); }

/* ---------------------------------------------------------------- the team */

static pthread_mutex_t team_mu = PTHREAD_MUTEX_INITIALIZER;
static pw_pool *team;     /* NULL until first use or pw_cpu_set_threads */
static int team_threads;  /* its size */

static int default_threads(void)
{
    /* The BLAS's own variable is honoured as a thread count only: the bits
     * do not depend on it. */
    const char *env = getenv("OPENBLAS_NUM_THREADS");
    if (env && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1) return v > PW_POOL_MAX_THREADS ? PW_POOL_MAX_THREADS : (int)v;
    }
    return pw_available_cores();
}

void pw_cpu_blas_threads(int n)
{
    if (n < 1) n = 1;
#if defined(PW_BLAS_BLIS)
    bli_thread_set_num_threads((dim_t)n);
#else
    openblas_set_num_threads(n);
#endif
}

#if !defined(PW_BLAS_BLIS)
char *openblas_get_corename(void);
char *openblas_get_config(void);
#endif

/* OpenBLAS's kernel names by the widest vector unit they use (its
 * driver/others/dynamic.c): 3 AVX-512, 2 AVX2, 1 AVX, 0 anything else. */
static int kernel_width(const char *core)
{
    static const char *const avx512[] = {"skylakex", "cooperlake", "sapphirerapids"};
    static const char *const avx2[] = {"haswell", "zen", "excavator"};
    static const char *const avx[] = {"sandybridge", "bulldozer", "piledriver", "steamroller"};
    for (size_t i = 0; i < sizeof avx512 / sizeof *avx512; i++)
        if (strcasecmp(core, avx512[i]) == 0) return 3;
    for (size_t i = 0; i < sizeof avx2 / sizeof *avx2; i++)
        if (strcasecmp(core, avx2[i]) == 0) return 2;
    for (size_t i = 0; i < sizeof avx / sizeof *avx; i++)
        if (strcasecmp(core, avx[i]) == 0) return 1;
    return 0;
}

int pw_cpu_blas_describe(char *buf, size_t n, char *hint, size_t hint_n)
{
    if (hint && hint_n) hint[0] = '\0';
#if defined(PW_BLAS_BLIS)
    snprintf(buf, n, "BLIS");
    return 0;
#else
    const char *core = openblas_get_corename();
    if (!core) core = "unknown";
    const char *version = "";
#if defined(OPENBLAS_VERSION)
    version = OPENBLAS_VERSION; /* "OpenBLAS 0.3.21" or " OpenBLAS 0.3.21 " */
    while (*version == ' ') version++;
#endif
    char ver[48];
    snprintf(ver, sizeof ver, "%s", *version ? version : "OpenBLAS");
    for (size_t l = strlen(ver); l > 0 && ver[l - 1] == ' '; l--) ver[l - 1] = '\0';
    snprintf(buf, n, "%s, %s kernel", ver, core);
    const char *forced = getenv("OPENBLAS_CORETYPE");
    if (forced && *forced) return 0;
    int cpu = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 2
          : __builtin_cpu_supports("avx") ? 1 : 0;
#endif
    if (cpu < 1 || kernel_width(core) >= 1) return 0;
    if (hint && hint_n) snprintf(hint, hint_n, "%s", cpu >= 2 ? "Haswell" : "Sandybridge");
    return 1;
#endif
}

static void blas_single_threaded(void) { pw_cpu_blas_threads(1); }

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;

/* Replaces the team. Callers guarantee no kernel runs meanwhile (pipelines
 * set it before their workers start). */
static void team_set(int n)
{
    if (n < 1) n = 1;
    if (n > PW_POOL_MAX_THREADS) n = PW_POOL_MAX_THREADS;
    pthread_mutex_lock(&team_mu);
    blas_single_threaded();
    if (!team || team_threads != n) {
        pw_pool_destroy(team);
        team = NULL;
        team_threads = 1;
        pw_pool *p;
        if (pw_pool_create(n, &p) == PW_OK) {
            team = p;
            team_threads = n;
        } else {
            PW_WARN("CPU kernels: %s; running on 1 thread", pw_last_error());
        }
    }
    pthread_mutex_unlock(&team_mu);
}

static pw_pool *team_get(void)
{
    pthread_mutex_lock(&team_mu);
    pw_pool *p = team;
    int ready = team_threads > 0;
    pthread_mutex_unlock(&team_mu);
    if (!ready) {
        team_set(default_threads());
        pthread_mutex_lock(&team_mu);
        p = team;
        pthread_mutex_unlock(&team_mu);
    }
    return p;
}

void pw_cpu_set_threads(int n) { team_set(n); }

int pw_cpu_get_threads(void)
{
    team_get();
    pthread_mutex_lock(&team_mu);
    int n = team_threads;
    pthread_mutex_unlock(&team_mu);
    return n;
}

void pw_cpu_parallel(int64_t n, pw_pool_fn fn, void *arg) { pw_pool_run(team_get(), n, fn, arg); }

typedef struct range_job {
    pw_cpu_range_fn fn;
    const void *job;
    int64_t n, per;
} range_job;

static void range_item(void *arg, int64_t item, int worker)
{
    (void)worker;
    const range_job *r = arg;
    const int64_t lo = item * r->per, hi = r->n - lo < r->per ? r->n : lo + r->per;
    r->fn(r->job, lo, hi);
}

void pw_cpu_parallel_for(int64_t n, int64_t per, pw_cpu_range_fn fn, const void *job)
{
    if (n <= 0) return;
    if (per < 1) per = 1;
    if (n <= per) {
        fn(job, 0, n);
        return;
    }
    range_job r = {.fn = fn, .job = job, .n = n, .per = per};
    pw_cpu_parallel((n + per - 1) / per, range_item, &r);
}

/* ---------------------------------------------------------------- GEMM */

void pw_cpu_gemm_1t(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                    float *C, int64_t ldc)
{
    if (M <= 0 || N <= 0) return;
    pthread_once(&blas_once, blas_single_threaded);
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                blas_dim(M), blas_dim(N), blas_dim(K), alpha, A, blas_ld(lda), B, blas_ld(ldb),
                beta, C, blas_ld(ldc));
}

/* Tiles: about TILE_TARGET of them (fewer for small products, at least
 * TILE_MIN_FLOPS each), so 1, 2, 3, 4, 6 and 12 threads share them evenly
 * enough; sides a multiple of TILE_ALIGN (the BLAS kernels' register
 * blocks), at least TILE_MIN_SIDE. Each tile packs its own panels of A
 * (M·K per column of tiles) and B (K·N per row of tiles), so the split
 * follows the shape: columns for wide C, rows for tall C. */
#define TILE_TARGET 12
#define TILE_MIN_FLOPS (4.0 * 1024 * 1024)
#define TILE_ALIGN 16
#define TILE_MIN_SIDE 64

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

void pw_cpu_gemm_tiles(int64_t M, int64_t N, int64_t K, int64_t *tm, int64_t *tn)
{
    *tm = M > 0 ? M : 1;
    *tn = N > 0 ? N : 1;
    if (M <= 0 || N <= 0 || K <= 0) return;
    double flops = 2.0 * (double)M * (double)N * (double)K;
    int64_t nt = (int64_t)(flops / TILE_MIN_FLOPS);
    if (nt > TILE_TARGET) nt = TILE_TARGET;
    if (nt <= 1) return;
    /* Packing traffic M·K·nc + K·N·nr is least near nc / nr = N / M. */
    const int64_t max_c = ceil_div(N, TILE_MIN_SIDE), max_r = ceil_div(M, TILE_MIN_SIDE);
    int64_t nc = (int64_t)(sqrt((double)nt * (double)N / (double)M) + 0.5);
    if (nc > nt) nc = nt;
    if (nc > max_c) nc = max_c;
    if (nc < 1) nc = 1;
    int64_t nr = nt / nc;
    if (nr > max_r) nr = max_r;
    if (nr < 1) nr = 1;
    if (nc * nr < nt && nt / nr > nc) nc = nt / nr < max_c ? nt / nr : max_c;
    *tn = nc > 1 ? round_up(ceil_div(N, nc), TILE_ALIGN) : N;
    *tm = nr > 1 ? round_up(ceil_div(M, nr), TILE_ALIGN) : M;
}

typedef struct gemm_job {
    int ta, tb;
    int64_t M, N, K, tm, tn, nc;
    float alpha, beta;
    const float *A, *B;
    float *C;
    int64_t lda, ldb, ldc;
    const float *bias; /* (N) or NULL: each tile's rows of C start as it (beta = 1) */
} gemm_job;

/* C's rows r0 .. r0+rn, columns c0 .. c0+cn = bias[c0 .. c0+cn]. */
static void fill_bias(const gemm_job *j, int64_t r0, int64_t rn, int64_t c0, int64_t cn)
{
    for (int64_t r = r0; r < r0 + rn; r++)
        memcpy(j->C + r * j->ldc + c0, j->bias + c0, (size_t)cn * sizeof(float));
}

static void gemm_tile(void *arg, int64_t t, int worker)
{
    (void)worker;
    const gemm_job *j = arg;
    const int64_t r0 = (t / j->nc) * j->tm, c0 = (t % j->nc) * j->tn;
    const int64_t rn = j->M - r0 < j->tm ? j->M - r0 : j->tm;
    const int64_t cn = j->N - c0 < j->tn ? j->N - c0 : j->tn;
    /* Row r0 of op(A), column c0 of op(B). */
    const float *a = j->ta ? j->A + r0 : j->A + r0 * j->lda;
    const float *b = j->tb ? j->B + c0 * j->ldb : j->B + c0;
    if (j->bias) fill_bias(j, r0, rn, c0, cn); /* while the tile is about to be in cache */
    pw_cpu_gemm_1t(j->ta, j->tb, rn, cn, j->K, j->alpha, a, j->lda, b, j->ldb, j->beta,
                   j->C + r0 * j->ldc + c0, j->ldc);
}

static void gemm_run(gemm_job *j)
{
    pw_cpu_gemm_tiles(j->M, j->N, j->K, &j->tm, &j->tn);
    j->nc = ceil_div(j->N, j->tn);
    const int64_t n_tiles = ceil_div(j->M, j->tm) * j->nc;
    if (n_tiles == 1) {
        if (j->bias) fill_bias(j, 0, j->M, 0, j->N);
        pw_cpu_gemm_1t(j->ta, j->tb, j->M, j->N, j->K, j->alpha, j->A, j->lda, j->B, j->ldb, j->beta,
                       j->C, j->ldc);
        return;
    }
    pw_cpu_parallel(n_tiles, gemm_tile, j);
}

void pw_cpu_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                 int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    if (M <= 0 || N <= 0) return;
    gemm_job j = {.ta = ta, .tb = tb, .M = M, .N = N, .K = K, .alpha = alpha, .beta = beta,
                  .A = A, .B = B, .C = C, .lda = lda, .ldb = ldb, .ldc = ldc};
    gemm_run(&j);
}

void pw_cpu_gemm_bias(int ta, int tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                      const float *B, int64_t ldb, const float *bias, float *C, int64_t ldc)
{
    if (M <= 0 || N <= 0) return;
    gemm_job j = {.ta = ta, .tb = tb, .M = M, .N = N, .K = K, .alpha = 1.0f, .beta = 1.0f,
                  .A = A, .B = B, .C = C, .lda = lda, .ldb = ldb, .ldc = ldc, .bias = bias};
    gemm_run(&j);
}
