/* bench_mlp — single-stage training throughput of a wide MLP against the
 * BLAS's own SGEMM rate, measured side by side in one run on the same thread
 * count.
 *
 *   bench_mlp [--threads T] [--batch B] [--width W] [--layers L]
 *             [--micro-batches M] [--grad-groups G] [--steps N] [--rounds R]
 *
 * --grad-groups: the micro-batch gradients summed as G groups, pairwise
 * (stages/program/program.h); default: what a one-replica pipeline-run uses.
 *
 * Training FLOPs count the GEMM work a step must do: per linear layer
 * 2·B·in·out forward, the same for the weight gradient, and the same for the
 * input gradient except on the first layer (its input needs no gradient, so
 * the program skips it). Element-wise work is not counted: it is the
 * overhead the ratio exposes. The SGEMM reference runs the three GEMM shapes
 * a layer uses (x·Wᵀ, dy·W, dyᵀ·x) at B × W × W.
 *
 * Rounds alternate SGEMM and training blocks so both see the same machine
 * state; each figure is the median over rounds. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "stages/ops/cpu/gemm.h"
#include "stages/ops/cpu/ops.h"
#include "stages/program/program.h"
#include "tools/bench/bench_util.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    const int threads = (int)arg_int(argc, argv, "--threads", 2);
    const long B = arg_int(argc, argv, "--batch", 256);
    const long W = arg_int(argc, argv, "--width", 2048);
    const long L = arg_int(argc, argv, "--layers", 4);
    const int M = (int)arg_int(argc, argv, "--micro-batches", 1);
    const int G = (int)arg_int(argc, argv, "--grad-groups", 0); /* 0: pipeline-run's default */
    const int steps = (int)arg_int(argc, argv, "--steps", 5);
    const int rounds = (int)arg_int(argc, argv, "--rounds", 3);
    const long C = 16;
    if (threads < 1 || B < 1 || W < 1 || L < 1 || M < 1 || B % M || steps < 1 || rounds < 1 ||
        rounds > 64) {
        fprintf(stderr, "bench_mlp: bad arguments\n");
        return 2;
    }
    pw_cpu_set_threads(threads);

    /* The model: L × (linear W, relu), a small head, the loss. */
    size_t cap = 4096 + (size_t)L * 128;
    char *text = malloc(cap);
    size_t off = (size_t)snprintf(text, cap, "graph bench_mlp\ninput x : f32[%ld]\nlabel y : i32[]\n"
                                  "h0 = relu(x)\n", W);
    for (long l = 0; l < L; l++)
        off += (size_t)snprintf(text + off, cap - off, "fc%ld = linear(h%ld, out=%ld)\nh%ld = relu(fc%ld)\n",
                                l + 1, l, W, l + 1, l + 1);
    snprintf(text + off, cap - off, "logits = linear(h%ld, out=%ld) as head\n"
             "loss = softmax_cross_entropy(logits, y)\n", L, C);
    pw_graph *g;
    if (pw_graph_parse_string(text, strlen(text), "bench_mlp.graph", &g) != PW_OK) {
        fprintf(stderr, "bench_mlp: %s\n", pw_last_error());
        return 1;
    }
    free(text);
    const long mb = B / M;
    /* The gradient groups a one-replica pipeline of M micro-batches uses
     * by default (stages/program/program.h): their passes are part of the cost. */
    pw_program_config pc = {.graph = g, .micro_batch = mb, .loss_batch = B, .slots = 1,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .micro_batches = M,
                            .grad_groups = pw_grad_groups(G, 1, M, NULL)};
    pc.optim.lr = 1e-3f;
    pw_program *p;
    if (pw_program_create(&pc, &p) != PW_OK) {
        fprintf(stderr, "bench_mlp: %s\n", pw_last_error());
        return 1;
    }
    pw_program_init_params(p, 1);
    /* Inputs: x in [0,1) through relu (identity on them) so layer 1's input
     * needs no gradient, like a real data input. */
    float *x = pw_program_value(p, g->input, 0);
    int32_t *y = pw_program_value(p, g->label, 0);
    uint64_t key = pw_rng_key(7, "bench");
    for (long i = 0; i < mb * W; i++) x[i] = pw_rng_uniform(key, (uint64_t)i);
    for (long i = 0; i < mb; i++) y[i] = (int32_t)(pw_rng_u64(key, (uint64_t)i) % (uint64_t)C);

    /* GEMM FLOPs per step, including the head. */
    double flops = 0;
    for (long l = 0; l < L; l++) flops += (l == 0 ? 2.0 : 3.0) * 2.0 * (double)B * W * W;
    flops += 3.0 * 2.0 * (double)B * W * C;

    /* SGEMM reference operands. */
    float *a = malloc(sizeof(float) * (size_t)(B * W)), *w = malloc(sizeof(float) * (size_t)(W * W));
    float *c = malloc(sizeof(float) * (size_t)(B * W)), *dw = malloc(sizeof(float) * (size_t)(W * W));
    for (long i = 0; i < B * W; i++) a[i] = pw_rng_uniform(key, (uint64_t)i) - 0.5f;
    for (long i = 0; i < W * W; i++) w[i] = (pw_rng_uniform(key, (uint64_t)(i + 7)) - 0.5f) * 0.01f;
    memset(dw, 0, sizeof(float) * (size_t)(W * W));
    const double gemm_flops = 3.0 * 2.0 * (double)B * W * W;

    double train_rate[64], gemm_rate[64], step_ms[64];
    for (int i = 0; i < 2; i++) { /* warm-up: page in, spin up BLAS threads */
        for (int m = 0; m < M; m++) {
            pw_program_forward(p, 0, mb);
            pw_program_backward_input(p, 0);
            pw_program_backward_weight(p, 0);
        }
        pw_program_optimizer_step(p, i + 1);
    }
    int64_t step_no = 3;
    for (int r = 0; r < rounds; r++) {
        /* The reference is the BLAS's own threading; kernels need it at 1. */
        pw_cpu_blas_threads(threads);
        double t0 = now_s();
        for (int s = 0; s < steps; s++) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, W, W, 1.0f, a, W, w, W, 0.0f, c, W);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, W, W, 1.0f, c, W, w, W, 0.0f, a, W);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, W, W, B, 1.0f, c, W, a, W, 1.0f, dw, W);
        }
        gemm_rate[r] = gemm_flops * steps / (now_s() - t0) * 1e-9;
        pw_cpu_blas_threads(1);

        t0 = now_s();
        for (int s = 0; s < steps; s++) {
            for (int m = 0; m < M; m++) {
                if (pw_program_forward(p, 0, mb) != PW_OK ||
                    pw_program_backward_input(p, 0) != PW_OK ||
                    pw_program_backward_weight(p, 0) != PW_OK) {
                    fprintf(stderr, "bench_mlp: %s\n", pw_last_error());
                    return 1;
                }
            }
            if (pw_program_optimizer_step(p, step_no++) != PW_OK) {
                fprintf(stderr, "bench_mlp: %s\n", pw_last_error());
                return 1;
            }
        }
        double dt = now_s() - t0;
        train_rate[r] = flops * steps / dt * 1e-9;
        step_ms[r] = dt / steps * 1e3;
    }
    double tr = median(train_rate, rounds), gr = median(gemm_rate, rounds);
    char blas[96];
    pw_cpu_blas_describe(blas, sizeof blas, NULL, 0);
    printf("bench_mlp: %ld x %ld MLP (+ head %ld), batch %ld = %d x %ld, %d thread%s (%s)\n",
           L, W, C, B, M, mb, threads, threads == 1 ? "" : "s", blas);
    printf("  training step      %8.1f ms  (median of %d rounds x %d steps)\n",
           median(step_ms, rounds), rounds, steps);
    printf("  training           %8.1f GFLOP/s\n", tr);
    printf("  SGEMM (same shapes)%8.1f GFLOP/s\n", gr);
    printf("  ratio              %8.1f %%  (target >= 75%%)\n", 100.0 * tr / gr);
    free(a); free(w); free(c); free(dw);
    pw_program_destroy(p);
    pw_graph_destroy(g);
    return 0;
}
