/* bench_gpt — the tiny GPT through the pipeline, and its attention kernel
 * against the BLAS's SGEMM rate, side by side in one run.
 *
 *   bench_gpt [--graph examples/tiny_gpt.graph] [--batch 16] [--micro-batches 4]
 *             [--steps 5] [--rounds 3] [--threads 2] [--attn-reps 20]
 *             [--only training|attention]
 *
 * Part 1, training tokens/s: the graph on 1 stage (one worker, --threads BLAS
 * threads) and on 2 stages (1F1B, one worker pinned per core, one BLAS thread
 * each: what pipeline-run does), AdamW, on text:fortunes (a seeded random
 * byte corpus when the fortunes package is missing: speed does not depend on
 * the text). Rounds alternate the configurations so both see the same
 * machine; each round times --steps steps after one warm-up step; the
 * figures are the median and the best over rounds of the per-round median
 * step (on a shared machine the best round is the closest to an undisturbed
 * one). tokens/s = batch × T / step time.
 *
 * Part 2, attention: pw_cpu_attention_fwd + pw_cpu_attention_bwd_input on
 * the graph's shapes (micro-batch × T positions, width D, H heads, hd = D/H)
 * and on a few others, at 1 and at --threads BLAS threads. FLOPs counted per
 * (sequence, head), GEMM multiply-adds as 2 FLOPs, softmax and its backward
 * not counted:
 *   causal (the work the maths needs; position t sees t + 1 positions):
 *     forward  S = QKᵀ and O = PV, each hd·T(T+1)          → 2·hd·T(T+1)
 *     backward dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO → 4·hd·T(T+1)
 *   executed (what the kernel's GEMMs run: blocks of PW_CPU_ATTENTION_BLOCK
 *     rows with the blocks above the diagonal skipped; a block on the
 *     diagonal is computed whole): executed_flops() below, 62.5 % of the
 *     full square's 12·hd·T² at T = 128.
 * The reference is cblas_sgemm in the same run at the same thread count on
 * (a) a full T × T × hd GEMM with leading dimension 3D (the products of an
 * unblocked kernel), and (b) the model's c_attn linear, (B·T) × 3D × D, the
 * rate the model's big GEMMs reach. Rates are medians of --rounds rounds,
 * each timing the kernel and both references back to back. Where the
 * AVX-512 kernels (stages/ops/cpu/attention_avx512.h) are usable, each
 * round times both kernels, the blocked BLAS one ("blocked") first, each
 * with its own references, and both get a row.
 *
 * PW_BENCH_ATTENTION=blocked (read here only, never by the library) makes
 * part 1 train with the blocked BLAS attention, for before/after figures;
 * =avx512 or unset keeps the library's choice. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "runtime/trace.h"
#include "stages/ops/cpu/attention_avx512.h"
#include "stages/ops/cpu/gemm.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "tools/bench/bench_util.h"

static double now_s(void) { return (double)pw_now_ns() * 1e-9; }

static void die(const char *what)
{
    fprintf(stderr, "bench_gpt: %s%s\n", what, pw_last_error());
    exit(1);
}

/* ---------------------------------------------------------------- part 1 */

/* The training split of text:fortunes, or of a seeded random corpus. */
static pw_dataset *load_data(const pw_graph *g, int *synthetic)
{
    pw_dataset *d = NULL;
    *synthetic = 0;
    if (pw_dataset_from_spec_for_graph("text:fortunes", 1, g, &d) == PW_OK) return d;
    char path[] = "/tmp/bench_gpt_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) die("mkstemp: ");
    FILE *f = fdopen(fd, "wb");
    uint64_t key = pw_rng_key(1, "bench_gpt");
    for (uint64_t i = 0; i < (1u << 20); i++) fputc('a' + (int)(pw_rng_u64(key, i) % 26), f);
    fclose(f);
    const pw_value *in = &g->values[g->input];
    pw_status st = pw_dataset_load_text(path, in->shape.d[in->shape.ndim - 1], 1, &d);
    unlink(path);
    if (st != PW_OK) die("random corpus: ");
    *synthetic = 1;
    return d;
}

static pw_pipeline *make(const pw_graph *g, const pw_dataset *d, int stages, long batch, int M,
                         int threads)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = batch;
    pc.micro_batches = M;
    pc.stages = stages;
    pc.schedule = PW_SCHEDULE_1F1B;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.optim.lr = 2e-3f;
    pc.pin = 1;
    pc.threads = stages == 1 ? threads : 0; /* several stages: one thread per worker */
    pw_pipeline *pl;
    if (pw_pipeline_create(&pc, &pl) != PW_OK) die("");
    return pl;
}

/* Median seconds per step over `steps` steps, after one warm-up step. */
static double time_steps(pw_pipeline *pl, int steps)
{
    double t[64];
    if (pw_pipeline_step(pl, NULL) != PW_OK) die("");
    for (int i = 0; i < steps; i++) {
        double t0 = now_s();
        if (pw_pipeline_step(pl, NULL) != PW_OK) die("");
        t[i] = now_s() - t0;
    }
    return median(t, steps);
}

/* ---------------------------------------------------------------- part 2 */

typedef struct attn_case {
    long B, T, D, H;
} attn_case;

static void fill(float *p, long n, uint64_t key, float scale)
{
    for (long i = 0; i < n; i++) p[i] = (pw_rng_uniform(key, (uint64_t)i) - 0.5f) * scale;
}

/* GEMM FLOPs the blocked kernels run per (sequence, head): row block i
 * (rn rows, columns 0 .. r0+rn) does QKᵀ, PV, dO·Vᵀ and dS·K; key block j
 * (cn columns, rows c0 .. T) does dSᵀ·Q and Pᵀ·dO. */
static double executed_flops(long T, long hd)
{
    const long nb = PW_CPU_ATTENTION_BLOCK;
    double f = 0;
    for (long r0 = 0; r0 < T; r0 += nb) {
        long rn = T - r0 < nb ? T - r0 : nb;
        f += 4.0 * 2.0 * (double)rn * (double)(r0 + rn) * (double)hd; /* 4 row-block GEMMs */
        f += 2.0 * 2.0 * (double)rn * (double)(T - r0) * (double)hd;  /* 2 key-block GEMMs */
    }
    return f;
}

/* One round: reps × (fwd + bwd) and reps × the two SGEMM references, as
 * GFLOP/s (causal, executed, sgemm attention-shape, sgemm linear-shape). */
static void attn_round(const attn_case *c, int reps, float *qkv, float *out, float *att,
                       float *dout, float *dqkv, float *scratch, float *x, float *w, float *y,
                       double r[4])
{
    const long B = c->B, T = c->T, D = c->D, H = c->H, hd = D / H;
    const double causal = 6.0 * (double)hd * (double)T * (double)(T + 1) * (double)(B * H);
    const double executed = executed_flops(T, hd) * (double)(B * H);
    double t0 = now_s();
    for (int i = 0; i < reps; i++) {
        pw_cpu_attention_fwd(qkv, out, att, B, T, D, H);
        pw_cpu_attention_bwd_input(qkv, att, dout, dqkv, scratch, B, T, D, H, 0);
    }
    double dt = now_s() - t0;
    r[0] = causal * reps / dt * 1e-9;
    r[1] = executed * reps / dt * 1e-9;
    /* (a) A full T × T × hd GEMM over strided q and k (the shape of an
     * unblocked kernel's products), 6 per sequence and head. The references
     * use the BLAS's own threads (the kernels need it at 1 again after). */
    pw_cpu_blas_threads(pw_cpu_get_threads());
    t0 = now_s();
    for (int i = 0; i < reps; i++)
        for (long k = 0; k < 6 * B * H; k++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)T, (int)hd, 1.0f,
                        qkv + (k % H) * hd, (int)(3 * D), qkv + D + (k % H) * hd, (int)(3 * D),
                        0.0f, scratch, (int)T);
    dt = now_s() - t0;
    r[2] = 6.0 * 2.0 * (double)T * T * hd * (double)(B * H) * reps / dt * 1e-9;
    /* (b) The c_attn linear: (B·T) × 3D × D. */
    const double lin = 2.0 * (double)(B * T) * (3.0 * D) * (double)D;
    const int lin_reps = (int)(executed / lin) + 1; /* about the same work */
    t0 = now_s();
    for (int i = 0; i < reps; i++)
        for (int k = 0; k < lin_reps; k++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(B * T), (int)(3 * D), (int)D,
                        1.0f, x, (int)D, w, (int)D, 0.0f, y, (int)(3 * D));
    dt = now_s() - t0;
    r[3] = lin * lin_reps * reps / dt * 1e-9;
    pw_cpu_blas_threads(1);
}

static void bench_attention(const attn_case *cases, int n_cases, int threads, int reps, int rounds)
{
    long max_qkv = 0, max_att = 0, max_tt = 0, max_x = 0, max_w = 0, max_y = 0;
    for (int i = 0; i < n_cases; i++) {
        const attn_case *c = &cases[i];
        long q = c->B * c->T * 3 * c->D, a = c->B * c->H * c->T * c->T;
        if (q > max_qkv) max_qkv = q;
        if (a > max_att) max_att = a;
        if (c->H * c->T * c->T > max_tt) max_tt = c->H * c->T * c->T;
        if (c->B * c->T * c->D > max_x) max_x = c->B * c->T * c->D;
        if (3 * c->D * c->D > max_w) max_w = 3 * c->D * c->D;
        if (c->B * c->T * 3 * c->D > max_y) max_y = c->B * c->T * 3 * c->D;
    }
    float *qkv = malloc(sizeof(float) * (size_t)max_qkv), *dqkv = malloc(sizeof(float) * (size_t)max_qkv);
    float *out = malloc(sizeof(float) * (size_t)max_x), *dout = malloc(sizeof(float) * (size_t)max_x);
    float *att = malloc(sizeof(float) * (size_t)max_att), *scratch = malloc(sizeof(float) * (size_t)max_tt);
    float *x = malloc(sizeof(float) * (size_t)max_x), *w = malloc(sizeof(float) * (size_t)max_w);
    float *y = malloc(sizeof(float) * (size_t)max_y);
    if (!qkv || !dqkv || !out || !dout || !att || !scratch || !x || !w || !y) {
        fprintf(stderr, "bench_gpt: out of memory\n");
        exit(1);
    }
    uint64_t key = pw_rng_key(3, "bench_gpt_attn");
    fill(qkv, max_qkv, key, 2.0f);
    fill(dout, max_x, key + 1, 0.1f);
    fill(x, max_x, key + 2, 1.0f);
    fill(w, max_w, key + 3, 0.1f);
    const int tcounts[2] = {1, threads};
    char blas[96];
    pw_cpu_blas_describe(blas, sizeof blas, NULL, 0);
    printf("\nattention fwd + bwd_input (pw_cpu_attention_*), GFLOP/s; median of %d rounds x %d reps; %s\n",
           rounds, reps, blas);
    printf("  kernel: blocked = BLAS GEMMs per 32-row block (the old path), avx512 = "
           "attention_avx512.c; 'executed' counts the blocked path's GEMM work for both\n");
    printf("  threads     B    T    D   H  hd  kernel   ms/iter   causal  executed | SGEMM TxTxhd  "
           "SGEMM c_attn | causal/SGEMM-c_attn\n");
    for (int ti = 0; ti < (threads > 1 ? 2 : 1); ti++) {
        pw_cpu_set_threads(tcounts[ti]);
        for (int i = 0; i < n_cases; i++) {
            const attn_case *c = &cases[i];
            /* Rounds alternate the two kernels (when the AVX-512 one is usable
             * here); each round times its SGEMM references again. */
            const int fast = pw_cpu_att_fast_usable(c->D / c->H), nk = fast ? 2 : 1;
            double r[4], rr[2][4][64];
            for (int kk = 0; kk < nk; kk++) {
                pw_cpu_attention_use_blas(kk == 0);
                attn_round(c, 2, qkv, out, att, dout, dqkv, scratch, x, w, y, r); /* warm-up */
            }
            for (int k = 0; k < rounds; k++)
                for (int kk = 0; kk < nk; kk++) {
                    pw_cpu_attention_use_blas(kk == 0);
                    attn_round(c, reps, qkv, out, att, dout, dqkv, scratch, x, w, y, r);
                    for (int j = 0; j < 4; j++) rr[kk][j][k] = r[j];
                }
            pw_cpu_attention_use_blas(0);
            for (int kk = 0; kk < nk; kk++) {
                for (int j = 0; j < 4; j++) r[j] = median(rr[kk][j], rounds);
                const double ms = 6.0 * (double)(c->D / c->H) * (double)c->T * (double)(c->T + 1) *
                                  (double)(c->B * c->H) / (r[0] * 1e9) * 1e3;
                printf("  %7d  %4ld %4ld %4ld %3ld %3ld  %-7s %8.2f  %7.1f  %8.1f | %12.1f  %12.1f | "
                       "%5.1f %%\n", tcounts[ti], c->B, c->T, c->D, c->H, c->D / c->H,
                       kk == 0 ? "blocked" : "avx512", ms, r[0], r[1], r[2], r[3], 100.0 * r[0] / r[3]);
            }
            fflush(stdout);
        }
    }
    free(qkv); free(dqkv); free(out); free(dout); free(att); free(scratch);
    free(x); free(w); free(y);
}

static void bench_training(const char *path, const pw_graph *g, const pw_dataset *d, long T,
                           long batch, int M, int steps, int rounds, int threads, int synthetic)
{
    char blas[96];
    pw_cpu_blas_describe(blas, sizeof blas, NULL, 0);
    printf("bench_gpt: %s (T = %ld), batch %ld = %d micro-batches x %ld, AdamW, 1F1B, data %s, %s\n",
           path, T, batch, M, batch / M, synthetic ? "random bytes (fortunes not installed)" : d->name,
           blas);
    printf("  round   1 stage (%d BLAS threads)        2 stages (1 core each)\n", threads);
    double s1[64], s2[64];
    for (int r = 0; r < rounds; r++) {
        pw_pipeline *one = make(g, d, 1, batch, M, threads);
        s1[r] = time_steps(one, steps);
        pw_pipeline_destroy(one);
        pw_pipeline *two = make(g, d, 2, batch, M, threads);
        s2[r] = time_steps(two, steps);
        pw_pipeline_destroy(two);
        printf("  %5d   %7.0f ms/step %7.0f tokens/s   %7.0f ms/step %7.0f tokens/s\n", r + 1,
               s1[r] * 1e3, (double)(batch * T) / s1[r], s2[r] * 1e3, (double)(batch * T) / s2[r]);
        fflush(stdout);
    }
    double m1 = median(s1, rounds), m2 = median(s2, rounds); /* sorts s1, s2 */
    printf("  median  %7.0f ms/step %7.0f tokens/s   %7.0f ms/step %7.0f tokens/s   (2 stages / 1 "
           "stage: %.2fx)\n", m1 * 1e3, (double)(batch * T) / m1, m2 * 1e3, (double)(batch * T) / m2,
           m1 / m2);
    /* On a shared machine the fastest round is the closest to an undisturbed one. */
    printf("  best    %7.0f ms/step %7.0f tokens/s   %7.0f ms/step %7.0f tokens/s   (2 stages / 1 "
           "stage: %.2fx)\n", s1[0] * 1e3, (double)(batch * T) / s1[0], s2[0] * 1e3,
           (double)(batch * T) / s2[0], s1[0] / s2[0]);
}

int main(int argc, char **argv)
{
    const char *path = arg_str(argc, argv, "--graph", "examples/tiny_gpt.graph");
    const long batch = arg_int(argc, argv, "--batch", 16);
    const int M = (int)arg_int(argc, argv, "--micro-batches", 4);
    const int steps = (int)arg_int(argc, argv, "--steps", 5);
    const int rounds = (int)arg_int(argc, argv, "--rounds", 3);
    const int threads = (int)arg_int(argc, argv, "--threads", 2);
    const int reps = (int)arg_int(argc, argv, "--attn-reps", 20);
    const char *only = arg_str(argc, argv, "--only", "");
    const int do_train = strcmp(only, "attention") != 0, do_attn = strcmp(only, "training") != 0;
    if (batch < 1 || M < 1 || batch % M || steps < 1 || steps > 64 || rounds < 1 || rounds > 64 ||
        threads < 1 || reps < 1) {
        fprintf(stderr, "bench_gpt: bad arguments\n");
        return 2;
    }
    pw_graph *g;
    if (pw_graph_parse_file(path, &g) != PW_OK) die("");
    int synthetic;
    pw_dataset *d = load_data(g, &synthetic);
    const pw_value *in = &g->values[g->input];
    const long T = in->shape.d[in->shape.ndim - 1];

    /* The graph's attention shape, read from its first causal_attention. */
    long D = 0, H = 0;
    for (int i = 0; i < g->n_nodes && !D; i++)
        if (g->nodes[i].op == PW_OP_CAUSAL_ATTENTION) {
            const pw_value *qkv = &g->values[g->nodes[i].inputs[0]];
            D = qkv->shape.d[qkv->shape.ndim - 1] / 3;
            H = g->nodes[i].attrs.heads;
        }

    /* PW_BENCH_ATTENTION=blocked: the training part runs the old blocked
     * BLAS attention (for before/after figures); read by this bench only. */
    const char *ak = getenv("PW_BENCH_ATTENTION");
    const int blocked = ak && strcmp(ak, "blocked") == 0;
    if (ak && !blocked && strcmp(ak, "avx512") != 0) {
        fprintf(stderr, "bench_gpt: PW_BENCH_ATTENTION=%s: expected blocked or avx512\n", ak);
        return 2;
    }
    if (do_train) {
        pw_cpu_attention_use_blas(blocked);
        const int fast = H > 0 && pw_cpu_att_fast_usable(D / H);
        printf("attention kernel in training: %s\n",
               blocked ? "blocked BLAS (PW_BENCH_ATTENTION=blocked)"
               : fast  ? "avx512"
                       : "blocked BLAS (avx512 not usable here)");
        bench_training(path, g, d, T, batch, M, steps, rounds, threads, synthetic);
        pw_cpu_attention_use_blas(0);
    }
    if (D > 0 && do_attn) {
        const attn_case cases[] = {
            {batch / M, T, D, H},          /* the graph at this micro-batch */
            {batch / M, T, D, H > 1 ? H / 2 : 1},
            {batch / M, 2 * T, D, H},
            {8, 64, 128, 4}, /* examples/tiny_gpt_quick.graph, micro-batch 8 */
        };
        bench_attention(cases, 4, threads, reps, rounds);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
    return 0;
}
