/* pipewright — the determinism matrix: parameters after a few AdamW steps are
 * the same bits for every stage count (1-4), schedule (every kind), CPU thread
 * count (1, 2, 3: the team that tiles the GEMMs and runs attention heads)
 * and replica count (1, 2, 4, and 8 with 8 gradient groups: the micro-batches of the global batch spread
 * over the replicas), for each micro-batch size. The reference of a layout
 * is one replica taking all its micro-batches, on one stage and one thread.
 *
 * Run with whatever the environment says about the BLAS (CI leaves
 * OPENBLAS_NUM_THREADS unset and OPENBLAS_CORETYPE as the machine set it):
 * nothing here may depend on it. The MLP is wide enough that its GEMMs are
 * cut into several tiles (checked), so more threads really do split them.
 * Under the sanitizers (several times slower) a diagonal of the matrix runs.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipeline_support.h"
#include "stages/ops/cpu/gemm.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer (scripts/test.sh) */

#define TIMEOUT 600

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PW_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define PW_SANITIZED 1
#endif
#endif
#ifndef PW_SANITIZED
#define PW_SANITIZED 0
#endif

/* 16 rows per micro-batch × 512 wide: 8-17 MFLOP per GEMM, 2-4 tiles. */
static const char *WIDE =
    "graph d_wide\n"
    "input image : f32[16, 32]\n"
    "label target : i32[]\n"
    "x = flatten(image)\n"
    "fc1 = linear(x, out=512)\n"
    "n1 = layernorm(fc1)\n"
    "h1 = gelu(n1)\n"
    "fc2 = linear(h1, out=512)\n"
    "h2 = relu(fc2)\n"
    "fc3 = linear(h2, out=512)\n"
    "h3 = relu(fc3)\n"
    "r = add(h3, h1)\n"
    "logits = linear(r, out=10) as head\n"
    "loss = softmax_cross_entropy(logits, target)\n";

static const char *GPT = "graph d_gpt\n" PW_TEST_GPT_BODY;

static const int STEPS = 2;

typedef struct layout {
    int replicas, micro_batches;
    int64_t batch;
    int grad_groups; /* 0: the default */
} layout;

/* Micro-batch layouts: rows per micro-batch = batch / (replicas · M); M = 12
 * suits every schedule at 1-4 stages (interleaved needs S | M). The
 * default gradient groups are 4 (12, 24 and 48 micro-batches). */
static const layout LAYOUTS[] = {
    {1, 12, 192, 0}, /* 16 rows */
    {1, 12, 384, 0}, /* 32 rows */
    {2, 12, 384, 0}, /* 16 rows: equal to {1, 24, 384} */
    {4, 12, 768, 0}, /* 16 rows: equal to {1, 48, 768} */
};
#define N_LAYOUTS ((int)(sizeof LAYOUTS / sizeof LAYOUTS[0]))

static const pw_schedule_kind KINDS[] = {PW_SCHEDULE_GPIPE, PW_SCHEDULE_1F1B, PW_SCHEDULE_INTERLEAVED,
                                         PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V,
                                         PW_SCHEDULE_ZB_AUTO, PW_SCHEDULE_DUALPIPE_V};
#define N_KINDS 8

static pw_dataset *image_data(void)
{
    pw_synthetic_config sc = {.n = 768, .sample_shape = {.ndim = 2, .d = {16, 32}},
                              .n_classes = 10, .seed = 5, .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

static pw_dataset *token_data(void)
{
    /* Byte-level text: enough for a few steps of 16-token windows. */
    char path[] = "/tmp/pw_det_text_XXXXXX.txt";
    int fd = mkstemps(path, 4);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    cr_assert_not_null(f);
    for (int i = 0; i < 400; i++)
        fprintf(f, "%d: the quick brown fox jumps over the lazy dog %d times.\n", i, i * 7 % 13);
    fclose(f);
    pw_dataset *d = NULL;
    pw_status st = pw_dataset_load_text(path, 16, 1, &d);
    unlink(path);
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    return d;
}

/* What a run clips at and whether it post-validates its optimizer step;
 * `rollbacks` (optional) receives the engine's count of undone steps. */
typedef struct run_opts {
    double clip;
    int post_validate;
    int64_t *rollbacks;
    int overlap_steps; /* pw_pipeline_config.overlap_steps */
} run_opts;

static pw_pipeline *make_pipeline(const pw_graph *g, const pw_dataset *d, const layout *L, int stages,
                                  pw_schedule_kind kind, int threads, const run_opts *o)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = L->batch;
    pc.micro_batches = L->micro_batches;
    pc.replicas = L->replicas;
    pc.stages = stages;
    pc.schedule = kind;
    pc.partition = PW_PARTITION_FLOPS;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.clip_grad_norm = o->clip;
    pc.post_validate = o->post_validate;
    pc.overlap_steps = o->overlap_steps;
    pc.seed = 11;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.watchdog_s = 120;
    pc.threads = threads;
    pc.grad_groups = L->grad_groups;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s S=%d R=%d M=%d threads=%d: %s",
                 pw_schedule_kind_name(kind), stages, L->replicas, L->micro_batches, threads,
                 pw_last_error());
    cr_assert_eq(pw_cpu_get_threads(), threads);
    return pl;
}

static float *train_with(const pw_graph *g, const pw_dataset *d, const layout *L, int stages,
                         pw_schedule_kind kind, int threads, const run_opts *o, int64_t *n)
{
    pw_pipeline *pl = make_pipeline(g, d, L, stages, kind, threads, o);
    for (int i = 0; i < STEPS; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    float *p = test_replica_params(pl, 0, g, n);
    if (L->replicas > 1) { /* every replica holds the same bytes */
        int64_t n1;
        float *p1 = test_replica_params(pl, L->replicas - 1, g, &n1);
        cr_assert(n1 == *n && memcmp(p, p1, (size_t)n1 * 4) == 0, "replicas disagree");
        free(p1);
    }
    if (o->rollbacks) {
        *o->rollbacks = 0;
        for (int w = 0; w < stages * L->replicas; w++) {
            pw_engine_rank_stats rs;
            pw_engine_rank_stats_get(pw_pipeline_engine(pl), w, &rs);
            *o->rollbacks += rs.rollbacks;
        }
    }
    pw_pipeline_destroy(pl);
    return p;
}

static float *train(const pw_graph *g, const pw_dataset *d, const layout *L, int stages,
                    pw_schedule_kind kind, int threads, int64_t *n)
{
    const run_opts o = {.clip = 1.0};
    return train_with(g, d, L, stages, kind, threads, &o, n);
}

static void expect_same(const float *got, const float *ref, int64_t n, const char *what)
{
    int64_t first = -1, ndiff = 0;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&got[i], &ref[i], 4) != 0) {
            if (first < 0) first = i;
            ndiff++;
        }
    cr_expect_eq(ndiff, 0, "%s: %lld of %lld parameters differ from 1 replica, 1 stage, 1 thread (first at %lld: "
                 "%.9g vs %.9g)", what, (long long)ndiff, (long long)n, (long long)first,
                 first >= 0 ? got[first] : 0.0, first >= 0 ? ref[first] : 0.0);
}

/* One micro-batch layout: its reference is 1 replica with all the
 * micro-batches, 1 stage (GPipe), 1 thread. */
static void matrix(const pw_graph *g, const pw_dataset *d, const layout *L, int max_threads)
{
    int64_t n_ref, n;
    const layout one = {1, L->replicas * L->micro_batches, L->batch, L->grad_groups};
    float *ref = train(g, d, &one, 1, PW_SCHEDULE_GPIPE, 1, &n_ref);
    int runs = 0;
    for (int S = 1; S <= 4; S++)
        for (int k = 0; k < N_KINDS; k++)
            for (int th = 1; th <= max_threads; th++) {
                if (PW_SANITIZED && (S + k + th) % 3 != 0) continue; /* a diagonal */
                const int v = KINDS[k] == PW_SCHEDULE_INTERLEAVED || KINDS[k] == PW_SCHEDULE_ZB_V ||
                                      KINDS[k] == PW_SCHEDULE_DUALPIPE_V
                                  ? 2
                                  : 1;
                if (S * v > g->n_nodes) continue;
                float *got = train(g, d, L, S, KINDS[k], th, &n);
                cr_assert_eq(n, n_ref);
                char what[128];
                snprintf(what, sizeof what, "%s: R=%d M=%d batch=%lld, %s S=%d threads=%d", g->name,
                         L->replicas, L->micro_batches, (long long)L->batch,
                         pw_schedule_kind_name(KINDS[k]), S, th);
                expect_same(got, ref, n, what);
                free(got);
                runs++;
            }
    cr_assert_gt(runs, 0);
    free(ref);
}

ParameterizedTestParameters(determinism, mlp_matrix)
{
    static int idx[N_LAYOUTS];
    for (int i = 0; i < N_LAYOUTS; i++) idx[i] = i;
    return cr_make_param_array(int, idx, N_LAYOUTS);
}

ParameterizedTest(int *li, determinism, mlp_matrix, .timeout = TIMEOUT)
{
    const layout *L = &LAYOUTS[*li];
    /* The GEMMs really are tiled: more than one tile for threads to share. */
    int64_t rows = L->batch / (L->replicas * L->micro_batches), tm, tn;
    pw_cpu_gemm_tiles(rows, 512, 512, &tm, &tn);
    cr_assert((rows + tm - 1) / tm * ((512 + tn - 1) / tn) > 1, "%lld rows: one tile", (long long)rows);
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    matrix(g, d, L, L->replicas > 2 ? 2 : 3);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The GPT: attention heads spread over the team, dropout, a tie across
 * stages, layernorm and GELU. */
Test(determinism, gpt_matrix, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(GPT, "gpt.graph");
    pw_dataset *d = token_data();
    const layout L = {1, 12, 48, 0};
    matrix(g, d, &L, 3);
    const layout R2 = {2, 12, 96, 0};
    matrix(g, d, &R2, 2);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The same GPT with 2 heads of 16: attention takes the AVX-512 kernels
 * (stages/ops/cpu/attention_avx512.h) where the CPU has them. */
Test(determinism, gpt_matrix_hd16, .timeout = TIMEOUT)
{
    char text[4096];
    cr_assert_lt(strlen(GPT), sizeof text);
    strcpy(text, GPT);
    char *h = strstr(text, "heads=4");
    cr_assert_not_null(h);
    h[6] = '2';
    pw_graph *g = test_parse(text, "gpt_hd16.graph");
    pw_dataset *d = token_data();
    const layout L = {1, 12, 48, 0};
    matrix(g, d, &L, 3);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Eight replicas agree with one when the gradient groups are 8 (the
 * default, 4, covers 1, 2 and 4 replicas): 1 and 2 stages, two schedules. */
Test(determinism, eight_replicas_with_eight_groups, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    const layout L8 = {8, 3, 384, 8}, L1 = {1, 24, 384, 8};
    int64_t n_ref, n;
    float *ref = train(g, d, &L1, 1, PW_SCHEDULE_GPIPE, 1, &n_ref);
    for (int S = 1; S <= 2; S++)
        for (int k = 0; k < 2; k++) {
            const pw_schedule_kind kind = k ? PW_SCHEDULE_ZB_H1 : PW_SCHEDULE_1F1B;
            float *got = train(g, d, &L8, S, kind, 1, &n);
            cr_assert_eq(n, n_ref);
            char what[96];
            snprintf(what, sizeof what, "R=8 M=3 G=8, %s S=%d", pw_schedule_kind_name(kind), S);
            expect_same(got, ref, n, what);
            free(got);
        }
    /* With the default groups (4), 8 replicas are another tree: the check
     * above can fail. */
    const layout D8 = {8, 3, 384, 0}, D1 = {1, 24, 384, 0};
    float *a = train(g, d, &D8, 1, PW_SCHEDULE_1F1B, 1, &n);
    float *b = train(g, d, &D1, 1, PW_SCHEDULE_GPIPE, 1, &n_ref);
    cr_assert(memcmp(a, b, (size_t)n * 4) != 0, "8 replicas equal 1 with 4 groups: the test above proves nothing");
    free(a);
    free(b);
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Replica counts that are not powers of two: with G = 12 groups, 3 and 6
 * replicas (4 and 2 groups each, powers of two: subtrees of the tree over
 * the 12) agree with one replica, on 1 and 2 stages; 2 replicas (6 groups
 * each) do not (pw_grad_groups_identical), so the check can fail. */
Test(determinism, three_and_six_replicas_with_twelve_groups, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    const layout L1 = {1, 24, 384, 12}, L3 = {3, 8, 384, 12}, L6 = {6, 4, 384, 12}, L2 = {2, 12, 384, 12};
    int64_t n_ref, n;
    float *ref = train(g, d, &L1, 1, PW_SCHEDULE_GPIPE, 1, &n_ref);
    const layout *Ls[] = {&L3, &L6};
    for (int li = 0; li < 2; li++)
        for (int S = 1; S <= 2; S++) {
            const pw_schedule_kind kind = S == 1 ? PW_SCHEDULE_GPIPE : PW_SCHEDULE_ZB_H1;
            float *got = train(g, d, Ls[li], S, kind, 2, &n);
            cr_assert_eq(n, n_ref);
            char what[96];
            snprintf(what, sizeof what, "R=%d M=%d G=12, %s S=%d", Ls[li]->replicas, Ls[li]->micro_batches,
                     pw_schedule_kind_name(kind), S);
            expect_same(got, ref, n, what);
            free(got);
        }
    cr_assert(pw_grad_groups_identical(12, 3) && pw_grad_groups_identical(12, 6) &&
              !pw_grad_groups_identical(12, 2));
    float *two = train(g, d, &L2, 1, PW_SCHEDULE_1F1B, 1, &n);
    cr_assert(memcmp(two, ref, (size_t)n * 4) != 0, "2 replicas of 6 groups equal 1: the test above proves nothing");
    free(two);
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The kernel-level promise behind it: a GEMM's bits do not depend on the
 * team's size, for shapes that tile in rows, in columns and in both, with
 * and without transposes and with beta = 1 accumulation. */
Test(determinism, gemm_bits_independent_of_threads, .timeout = TIMEOUT)
{
    static const int64_t shapes[][3] = {{16, 512, 512}, {512, 512, 16}, {300, 700, 129},
                                        {1000, 40, 300}, {7, 2000, 257}, {64, 64, 64}};
    const int saved = pw_cpu_get_threads();
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++) {
                const int64_t M = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
                float *A = malloc((size_t)(M * K) * 4), *B = malloc((size_t)(K * N) * 4);
                float *C[4];
                uint64_t x = 88172645463325252ull;
                for (int64_t i = 0; i < M * K; i++) {
                    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                    A[i] = (float)((double)(x >> 40) / (double)(1 << 24) - 0.5);
                }
                for (int64_t i = 0; i < K * N; i++) {
                    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                    B[i] = (float)((double)(x >> 40) / (double)(1 << 24) - 0.5);
                }
                for (int th = 1; th <= 4; th++) {
                    pw_cpu_set_threads(th);
                    C[th - 1] = malloc((size_t)(M * N) * 4);
                    for (int64_t i = 0; i < M * N; i++) C[th - 1][i] = (float)(i % 7) * 0.25f;
                    pw_cpu_gemm(ta, tb, M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, 1.0f, C[th - 1], N);
                    if (th > 1)
                        cr_expect(memcmp(C[0], C[th - 1], (size_t)(M * N) * 4) == 0,
                                  "%lldx%lldx%lld ta=%d tb=%d: %d threads differ from 1", (long long)M,
                                  (long long)N, (long long)K, ta, tb, th);
                }
                for (int th = 0; th < 4; th++) free(C[th]);
                free(A);
                free(B);
            }
    pw_cpu_set_threads(saved);
}

/* ---- post-validation (docs/engine.md, "Post-validation") ---- */

static const pw_schedule_kind PV_KINDS[] = {PW_SCHEDULE_1F1B, PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2,
                                            PW_SCHEDULE_ZB_V, PW_SCHEDULE_ZB_AUTO, PW_SCHEDULE_DUALPIPE_V};
#define N_PV_KINDS 6
/* The WIDE MLP's gradient norm is about 2-4 in its first steps: 0.05 clips
 * every step, 1000 never. */
static const double CLIP_ALWAYS = 0.05, CLIP_NEVER = 1000.0;

/* Each rank steps its optimizer before the global norm is known and undoes
 * and redoes the step when clipping triggers: the parameters are the bits
 * of the synchronous step (1 stage, 1 thread, GPipe), for every stage count,
 * schedule, thread count and replica count, with clipping that triggers
 * every step (every rank rolls back every step: counted) and with clipping
 * that never does (no rollback). The two references differ, so a rollback
 * that did not redo the step with the clip factor would be seen. */
static void pv_matrix(const layout *L)
{
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    const layout one = {1, L->replicas * L->micro_batches, L->batch, L->grad_groups};
    int64_t n_ref, n, n2, rb;
    const run_opts sync_always = {.clip = CLIP_ALWAYS}, sync_never = {.clip = CLIP_NEVER};
    float *ref_always = train_with(g, d, &one, 1, PW_SCHEDULE_GPIPE, 1, &sync_always, &n_ref);
    float *ref_never = train_with(g, d, &one, 1, PW_SCHEDULE_GPIPE, 1, &sync_never, &n2);
    cr_assert(n2 == n_ref && memcmp(ref_always, ref_never, (size_t)n_ref * 4) != 0,
              "clipping at %g changes nothing: the test below proves nothing", CLIP_ALWAYS);
    int runs = 0;
    for (int S = 1; S <= 4; S++)
        for (int k = 0; k < N_PV_KINDS; k++)
            for (int th = 1; th <= 2; th++)
                for (int c = 0; c < 2; c++) {
                    if (PW_SANITIZED && (S + k + th + c) % 4 != 0) continue; /* a diagonal */
                    const run_opts pv = {.clip = c ? CLIP_NEVER : CLIP_ALWAYS, .post_validate = 1,
                                         .rollbacks = &rb};
                    float *got = train_with(g, d, L, S, PV_KINDS[k], th, &pv, &n);
                    cr_assert_eq(n, n_ref);
                    char what[160];
                    snprintf(what, sizeof what, "post-validated, clip %g: R=%d M=%d, %s S=%d threads=%d", pv.clip,
                             L->replicas, L->micro_batches, pw_schedule_kind_name(PV_KINDS[k]), S, th);
                    expect_same(got, c ? ref_never : ref_always, n, what);
                    const int64_t want = c ? 0 : (int64_t)STEPS * S * L->replicas;
                    cr_expect_eq(rb, want, "%s: %lld rollbacks, want %lld", what, (long long)rb, (long long)want);
                    free(got);
                    runs++;
                }
    cr_assert_gt(runs, 0);
    free(ref_always);
    free(ref_never);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(determinism, post_validation_one_replica, .timeout = TIMEOUT) { pv_matrix(&LAYOUTS[0]); }
Test(determinism, post_validation_two_replicas, .timeout = TIMEOUT) { pv_matrix(&LAYOUTS[2]); }

/* Runs two steps, the second with a NaN written into the gradient of the
 * first parameter of the first (last = 0) or last (last = 1) chunk that has
 * parameters, before it (the backward adds into it): the second step must
 * fail; its status and message come back. */
static pw_status nan_step(const pw_graph *g, const pw_dataset *d, const layout *L, int S, pw_schedule_kind kind,
                          int last, int post_validate, char *msg, size_t cap)
{
    const run_opts o = {.clip = CLIP_ALWAYS, .post_validate = post_validate};
    pw_pipeline *pl = make_pipeline(g, d, L, S, kind, 1, &o);
    cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    pw_program *progs[16] = {NULL};
    const int C = pw_pipeline_n_chunks(pl);
    for (int i = 0; i < C; i++) {
        pw_program *q[16];
        const int c = last ? C - 1 - i : i;
        if (pw_pipeline_programs(pl, 0, c, q, 16) >= 1 && pw_program_n_params(q[0]) > 0) {
            progs[0] = q[0];
            break;
        }
    }
    cr_assert_not_null(progs[0]);
    pw_program_param pp;
    pw_program_param_at(progs[0], 0, &pp);
    float *nan = malloc((size_t)pp.numel * sizeof *nan);
    cr_assert_not_null(nan);
    for (int64_t i = 0; i < pp.numel; i++) nan[i] = NAN;
    cr_assert_eq(pw_program_param_write(progs[0], 0, PW_PARAM_GRAD, nan), PW_OK, "%s", pw_last_error());
    free(nan);
    pw_status st = pw_pipeline_step(pl, NULL);
    snprintf(msg, cap, "%s", st == PW_OK ? "" : pw_last_error());
    pw_pipeline_destroy(pl);
    return st;
}

/* An injected non-finite gradient: the post-validated step fails exactly
 * as the synchronous one, with PW_ERR_NUMERIC and the same message naming
 * the rank, chunk, step and parameter (one replica: the same text; two:
 * either replica may be first, so the text after its name). */
Test(determinism, post_validation_nonfinite_fails_like_sync, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    const pw_schedule_kind kinds[] = {PW_SCHEDULE_1F1B, PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V, PW_SCHEDULE_ZB_AUTO,
                                      PW_SCHEDULE_DUALPIPE_V};
    const layout *Ls[] = {&LAYOUTS[0], &LAYOUTS[2]};
    for (int li = 0; li < 2; li++)
        for (int S = 1; S <= 4; S *= 2)
            for (int k = 0; k < (int)(sizeof kinds / sizeof kinds[0]); k++) {
                for (int bad = 0; bad < (S > 1 ? 2 : 1); bad++) {
                    char sync_msg[1024], pv_msg[1024];
                    pw_status a = nan_step(g, d, Ls[li], S, kinds[k], bad, 0, sync_msg, sizeof sync_msg);
                    pw_status b = nan_step(g, d, Ls[li], S, kinds[k], bad, 1, pv_msg, sizeof pv_msg);
                    cr_expect_eq(a, PW_ERR_NUMERIC, "sync %s S=%d: %s", pw_schedule_kind_name(kinds[k]), S, sync_msg);
                    cr_expect_eq(b, PW_ERR_NUMERIC, "post-validated %s S=%d: %s", pw_schedule_kind_name(kinds[k]), S,
                                 pv_msg);
                    const char *sa = Ls[li]->replicas > 1 ? strstr(sync_msg, "rank ") : sync_msg;
                    const char *sb = Ls[li]->replicas > 1 ? strstr(pv_msg, "rank ") : pv_msg;
                    cr_expect(sa && sb && strstr(sa, "is not finite") && strcmp(sa, sb) == 0,
                              "%s S=%d R=%d, NaN in %s chunk:\n  sync: %s\n  post: %s", pw_schedule_kind_name(kinds[k]),
                              S, Ls[li]->replicas, bad ? "the last" : "the first", sync_msg, pv_msg);
                }
            }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- overlapping steps (docs/engine.md, "Steps that overlap") ---- */

/* 768 samples / 192 a batch: 4 steps an epoch, so 6 steps cross an epoch
 * (a run never does: pw_pipeline_steps cuts it there). */
#define OV_STEPS 6

static void rollbacks_of(pw_pipeline *pl, int workers, int64_t *rb)
{
    *rb = 0;
    for (int w = 0; w < workers; w++) {
        pw_engine_rank_stats rs;
        pw_engine_rank_stats_get(pw_pipeline_engine(pl), w, &rs);
        *rb += rs.rollbacks;
    }
}

/* OV_STEPS steps: pw_pipeline_step one by one (o->overlap_steps 0) or one
 * pw_pipeline_steps call; each step's loss in loss[], the parameters back. */
static float *train_steps(const pw_graph *g, const pw_dataset *d, const layout *L, int S, pw_schedule_kind kind,
                          const run_opts *o, double *loss, double *norm, int64_t *n)
{
    pw_pipeline *pl = make_pipeline(g, d, L, S, kind, 1, o);
    pw_step_stats st[OV_STEPS];
    if (o->overlap_steps > 1) {
        cr_assert_eq(pw_pipeline_steps(pl, OV_STEPS, st), PW_OK, "%s", pw_last_error());
    } else {
        for (int i = 0; i < OV_STEPS; i++) {
            cr_assert_eq(pw_pipeline_step(pl, &st[i]), PW_OK, "%s", pw_last_error());
            if (norm) norm[i] = pw_pipeline_grad_norm(pl);
        }
    }
    for (int i = 0; i < OV_STEPS; i++) {
        cr_assert_eq(st[i].step, i + 1);
        loss[i] = st[i].loss;
    }
    float *p = test_replica_params(pl, 0, g, n);
    if (L->replicas > 1) {
        int64_t n1;
        float *p1 = test_replica_params(pl, L->replicas - 1, g, &n1);
        cr_assert(n1 == *n && memcmp(p, p1, (size_t)n1 * 4) == 0, "replicas disagree");
        free(p1);
    }
    if (o->rollbacks) rollbacks_of(pl, S * L->replicas, o->rollbacks);
    pw_pipeline_destroy(pl);
    return p;
}

/* Each rank runs on into the next step (its forwards on the optimistic
 * parameters) while the norm travels; a verdict that clips redoes the step
 * and discards the next, which the next run redoes. The parameters and
 * every step's loss are the synchronous run's bits (1 stage, GPipe, one
 * step at a time) for 2 and 4 stages, the zero-bubble schedules and 1F1B,
 * 1 and 2 replicas, runs of 3 and 6 steps, with a clip that never
 * triggers, one that triggers on some steps (the median of the reference's
 * norms) and one that triggers on nearly every step (a run then stands one
 * step and discards the next); the rollbacks are counted. */
static void ov_matrix(const layout *L)
{
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    const layout one = {1, L->replicas * L->micro_batches, L->batch, L->grad_groups};
    double norms[OV_STEPS], sorted[OV_STEPS], ref_loss[3][OV_STEPS], loss[OV_STEPS];
    int64_t n_ref, n, rb;
    const run_opts probe = {.clip = CLIP_NEVER};
    free(train_steps(g, d, &one, 1, PW_SCHEDULE_GPIPE, &probe, ref_loss[0], norms, &n_ref));
    memcpy(sorted, norms, sizeof sorted);
    for (int i = 0; i < OV_STEPS; i++)
        for (int j = i + 1; j < OV_STEPS; j++)
            if (sorted[j] < sorted[i]) {
                double t = sorted[i];
                sorted[i] = sorted[j];
                sorted[j] = t;
            }
    const double clips[3] = {CLIP_NEVER, 0.5 * (sorted[OV_STEPS / 2 - 1] + sorted[OV_STEPS / 2]), CLIP_ALWAYS};
    cr_assert(sorted[0] < clips[1] && clips[1] < sorted[OV_STEPS - 1], "the reference's norms are all equal");
    float *ref[3];
    int clipped[3] = {0}; /* steps the reference clipped: each rolls back once per worker */
    for (int c = 0; c < 3; c++) {
        const run_opts sync = {.clip = clips[c]};
        double nc[OV_STEPS];
        ref[c] = train_steps(g, d, &one, 1, PW_SCHEDULE_GPIPE, &sync, ref_loss[c], nc, &n);
        cr_assert_eq(n, n_ref);
        for (int i = 0; i < OV_STEPS; i++) clipped[c] += clips[c] / (nc[i] + 1e-6) < 1.0;
        if (L->replicas > 1) { /* the loss sums replica by replica: the same layout's own */
            float *p = train_steps(g, d, L, 1, PW_SCHEDULE_GPIPE, &sync, ref_loss[c], NULL, &n);
            free(p);
        }
    }
    cr_assert(clipped[0] == 0 && clipped[1] > 0 && clipped[1] < clipped[2],
              "clipped steps %d / %d / %d: the clips do not make the three cases", clipped[0], clipped[1],
              clipped[2]);
    cr_assert(memcmp(ref[0], ref[1], (size_t)n_ref * 4) != 0 && memcmp(ref[1], ref[2], (size_t)n_ref * 4) != 0,
              "the clips change nothing: the test below proves nothing");
    int runs = 0;
    for (int S = 2; S <= 4; S += 2)
        for (int k = 0; k < N_PV_KINDS; k++)
            for (int c = 0; c < 3; c++) {
                if (PW_SANITIZED && (S / 2 + k + c) % 3 != 0) continue; /* a diagonal */
                const int K = (k + c) % 2 ? 6 : 3;
                const run_opts ov = {.clip = clips[c], .post_validate = 1, .rollbacks = &rb, .overlap_steps = K};
                float *got = train_steps(g, d, L, S, PV_KINDS[k], &ov, loss, NULL, &n);
                cr_assert_eq(n, n_ref);
                char what[160];
                snprintf(what, sizeof what, "overlapped runs of %d, clip %g: R=%d M=%d, %s S=%d", K, ov.clip,
                         L->replicas, L->micro_batches, pw_schedule_kind_name(PV_KINDS[k]), S);
                expect_same(got, ref[c], n, what);
                for (int i = 0; i < OV_STEPS; i++)
                    cr_expect(memcmp(&loss[i], &ref_loss[c][i], sizeof loss[i]) == 0,
                              "%s: step %d's loss %.17g, one step at a time %.17g", what, i + 1, loss[i], ref_loss[c][i]);
                /* Each clipped step is undone and redone once on every
                 * worker (at its verdict in the next step, or at the run's
                 * end); a discarded step is validated when it runs again. */
                const int64_t want = (int64_t)clipped[c] * S * L->replicas;
                cr_expect_eq(rb, want, "%s: %lld rollbacks, want %lld", what, (long long)rb, (long long)want);
                free(got);
                runs++;
            }
    cr_assert_gt(runs, 0);
    for (int c = 0; c < 3; c++) free(ref[c]);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(determinism, overlapped_steps_one_replica, .timeout = TIMEOUT) { ov_matrix(&LAYOUTS[0]); }
Test(determinism, overlapped_steps_two_replicas, .timeout = TIMEOUT) { ov_matrix(&LAYOUTS[2]); }

/* Without clipping nothing is validated: the steps just run back to back
 * (1F1B and ZB-H2, 2 and 4 stages): the same bits as one at a time. */
Test(determinism, overlapped_steps_without_clipping, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    const layout *L = &LAYOUTS[0];
    double ref_loss[OV_STEPS], loss[OV_STEPS];
    int64_t n_ref, n;
    const run_opts sync = {0};
    float *ref = train_steps(g, d, L, 1, PW_SCHEDULE_GPIPE, &sync, ref_loss, NULL, &n_ref);
    const pw_schedule_kind kinds[] = {PW_SCHEDULE_1F1B, PW_SCHEDULE_ZB_H2};
    for (int S = 2; S <= 4; S += 2)
        for (int k = 0; k < 2; k++) {
            const run_opts ov = {.overlap_steps = 4};
            float *got = train_steps(g, d, L, S, kinds[k], &ov, loss, NULL, &n);
            char what[96];
            snprintf(what, sizeof what, "overlapped, no clipping: %s S=%d", pw_schedule_kind_name(kinds[k]), S);
            cr_assert_eq(n, n_ref);
            expect_same(got, ref, n, what);
            cr_expect(memcmp(loss, ref_loss, sizeof loss) == 0, "%s: the losses differ", what);
            free(got);
        }
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* A non-finite gradient in the middle of an overlapped run: an infinite
 * input value in a sample of step 2 makes every gradient of that step NaN.
 * The run fails at step 2 as the synchronous steps do (PW_ERR_NUMERIC, the
 * message naming step 2), and the parameters are those after step 1: the
 * optimistic step 2 is undone on every rank, and step 1, whose verdict may
 * still have been pending on a rank when the run failed, stands. */
Test(determinism, overlapped_steps_nonfinite_fails_like_sync, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(WIDE, "wide.graph");
    pw_dataset *d = image_data();
    const layout *Ls[] = {&LAYOUTS[0], &LAYOUTS[2]};
    const pw_schedule_kind kinds[] = {PW_SCHEDULE_1F1B, PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V,
                                      PW_SCHEDULE_ZB_AUTO, PW_SCHEDULE_DUALPIPE_V};
    for (int li = 0; li < 2; li++) {
        const layout *L = Ls[li];
        cr_assert_geq(d->n / L->batch, 2, "step 2 must be in the first epoch");
        /* The parameters after one clipped step, before the poison. */
        int64_t n_ref, n;
        const run_opts one = {.clip = CLIP_ALWAYS};
        pw_pipeline *pl = make_pipeline(g, d, L, 1, PW_SCHEDULE_GPIPE, 1, &one);
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        float *ref = test_replica_params(pl, 0, g, &n_ref);
        pw_pipeline_destroy(pl);
        /* Poison one sample of step 2 (the sampler's order of epoch 0). */
        pw_sampler smp;
        cr_assert_eq(pw_sampler_init(&smp, d->n, 1, 11), PW_OK);
        pw_sampler_epoch(&smp, 0);
        const int64_t victim = smp.order[L->batch + 5];
        pw_sampler_free(&smp);
        cr_assert(victim >= 0 && victim < d->n);
        const float saved = d->x[victim * d->sample_numel];
        d->x[victim * d->sample_numel] = INFINITY;
        for (int S = 2; S <= 4; S += 2)
            for (int k = 0; k < (int)(sizeof kinds / sizeof kinds[0]); k++)
                for (int ov = 0; ov < 2; ov++) {
                    if (PW_SANITIZED && (S / 2 + k + li) % 3 != 0) continue;
                    const run_opts o = {.clip = CLIP_ALWAYS, .post_validate = 1, .overlap_steps = ov ? 4 : 0};
                    pl = make_pipeline(g, d, L, S, kinds[k], 1, &o);
                    pw_status st = PW_OK;
                    if (ov) { /* step 2 is not the run's last where the epoch allows */
                        st = pw_pipeline_steps(pl, d->n / L->batch >= 3 ? 3 : 2, NULL);
                    } else {
                        for (int i = 0; i < 2 && st == PW_OK; i++) st = pw_pipeline_step(pl, NULL);
                    }
                    char what[128];
                    snprintf(what, sizeof what, "%s R=%d %s S=%d", ov ? "overlapped" : "one at a time", L->replicas,
                             pw_schedule_kind_name(kinds[k]), S);
                    const char *msg = st == PW_OK ? "" : pw_last_error();
                    cr_expect_eq(st, PW_ERR_NUMERIC, "%s: %s", what, msg);
                    cr_expect(strstr(msg, "OPTIM of step 2: step 2: gradient of") && strstr(msg, "is not finite"),
                              "%s: %s", what, msg);
                    if (ov) { /* the synchronous path may leave some ranks stepped */
                        float *got = test_replica_params(pl, 0, g, &n);
                        cr_assert_eq(n, n_ref);
                        expect_same(got, ref, n, what);
                        free(got);
                    }
                    pw_pipeline_destroy(pl);
                }
        d->x[victim * d->sample_numel] = saved;
        free(ref);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

