/* bench_kernels — the CPU kernels other than the GEMMs (element-wise, row
 * and column sweeps, the optimizer, the non-finite check) at 1 thread and at
 * --threads threads, side by side in one run: how much of the step they
 * take and how they scale on the thread team.
 *
 *   bench_kernels [--threads 2] [--rounds 5] [--reps 20]
 *
 * Shapes: the tiny GPT's (examples/tiny_gpt.graph) at micro-batch 4 — 512
 * rows of width 256 (layernorm, add, dropout) or 1024 (gelu, the c_fc bias
 * gradient) — and the optimizer over the 4 × 2048² MLP of bench_mlp (16.8 M
 * parameters, SGD with momentum and AdamW). Each figure is the median over
 * rounds of the best of --reps calls (µs); rounds alternate the thread
 * counts so both see the same machine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/trace.h"
#include "stages/ops/backend.h"
#include "stages/ops/cpu/ops.h"
#include "tools/bench/bench_util.h"

enum { K_GELU_FWD, K_GELU_BWD, K_LN_FWD, K_LN_BWD_IN, K_LN_BWD_W, K_BIAS_GRAD, K_ADD, K_DROPOUT,
       K_XENT_FWD, K_SGD, K_ADAMW, K_NONFINITE, K_COUNT };
static const char *const names[K_COUNT] = {
    "gelu_fwd 512x1024", "gelu_bwd 512x1024", "layernorm_fwd 512x256", "layernorm_bwd_in 512x256",
    "layernorm_bwd_w 512x256", "bias grad 512x1024", "add 512x256", "dropout_fwd 512x256",
    "softmax_xent_fwd 512x256", "sgd+zero 16.8M", "adamw+zero 16.8M", "nonfinite 16.8M"};

typedef struct bufs {
    float *x, *dy, *y, *w, *b, *mean, *rstd, *dw, *db, *p, *g, *state;
    uint8_t *mask;
    int32_t *labels;
    int64_t n_params;
} bufs;

static void run_kernel(int k, bufs *m)
{
    const int64_t n = 512, d = 256, f = 1024;
    pw_optim_config sgd = pw_optim_defaults(PW_OPTIM_SGD), adamw = pw_optim_defaults(PW_OPTIM_ADAMW);
    int bad;
    switch (k) {
    case K_GELU_FWD: pw_cpu_gelu_fwd(m->x, m->y, n * f); break;
    case K_GELU_BWD: pw_cpu_gelu_bwd_input(m->x, m->dy, m->y, n * f, 0); break;
    case K_LN_FWD: pw_cpu_layernorm_fwd(m->x, m->w, m->b, m->y, m->mean, m->rstd, n, d, 1e-5f); break;
    case K_LN_BWD_IN:
        pw_cpu_layernorm_bwd_input(m->x, m->w, m->mean, m->rstd, m->dy, m->y, n, d, 0);
        break;
    case K_LN_BWD_W: pw_cpu_layernorm_bwd_weight(m->x, m->mean, m->rstd, m->dy, m->dw, m->db, n, d); break;
    case K_BIAS_GRAD: pw_cpu_linear_bwd_weight(m->dy, NULL, NULL, m->db, n, 0, f); break;
    case K_ADD: pw_cpu_add_fwd(m->x, m->dy, m->y, n * d); break;
    case K_DROPOUT: pw_cpu_dropout_fwd(m->x, m->y, m->mask, 4, 128 * d, 0.1f, 7, 0); break;
    case K_XENT_FWD: pw_cpu_softmax_xent_fwd(m->x, m->labels, m->y, n, d); break;
    case K_SGD:
        pw_backend_cpu_i.optim_update_zero(NULL, &sgd, 5, m->p, m->g, m->state, m->n_params, 1);
        break;
    case K_ADAMW:
        pw_backend_cpu_i.optim_update_zero(NULL, &adamw, 5, m->p, m->g, m->state, m->n_params, 1);
        break;
    case K_NONFINITE: pw_backend_cpu_i.find_nonfinite(NULL, &m->g, &m->n_params, 1, &bad); break;
    }
}

static float *floats(int64_t n, float v)
{
    float *p = malloc((size_t)n * sizeof *p);
    if (!p) {
        fprintf(stderr, "bench_kernels: out of memory\n");
        exit(1);
    }
    for (int64_t i = 0; i < n; i++) p[i] = v * (float)((i * 7919) % 1000) / 1000.0f - v / 2;
    return p;
}

int main(int argc, char **argv)
{
    const int threads = (int)arg_int(argc, argv, "--threads", 2);
    const int rounds = (int)arg_int(argc, argv, "--rounds", 5);
    const int reps = (int)arg_int(argc, argv, "--reps", 20);
    if (threads < 1 || rounds < 1 || rounds > 64 || reps < 1) {
        fprintf(stderr, "bench_kernels: bad arguments\n");
        return 2;
    }
    const int64_t big = 512 * 1024;
    bufs m = {.x = floats(big, 4.0f), .dy = floats(big, 1.0f), .y = floats(big, 0.0f),
              .w = floats(1024, 1.0f), .b = floats(1024, 0.1f), .mean = floats(512, 0.0f),
              .rstd = floats(512, 0.0f), .dw = floats(1024, 0.0f), .db = floats(1024, 0.0f),
              .n_params = 4 * 2048 * 2048};
    m.p = floats(m.n_params, 0.1f);
    m.g = floats(m.n_params, 0.0f);
    m.state = floats(2 * m.n_params, 0.0f);
    m.mask = malloc((size_t)big);
    m.labels = malloc(512 * sizeof *m.labels);
    for (int i = 0; i < 512; i++) m.labels[i] = (i * 37) % 256;
    double t[2][K_COUNT][64];
    const int tc[2] = {1, threads};
    for (int r = 0; r < rounds; r++)
        for (int ti = 0; ti < 2; ti++) {
            pw_cpu_set_threads(tc[ti]);
            for (int k = 0; k < K_COUNT; k++) {
                double best = 1e30;
                const int kreps = k >= K_SGD ? 3 : reps; /* the big ones take milliseconds */
                for (int i = 0; i < kreps; i++) {
                    uint64_t t0 = pw_now_ns();
                    run_kernel(k, &m);
                    double dt = (double)(pw_now_ns() - t0) * 1e-3;
                    if (dt < best) best = dt;
                }
                t[ti][k][r] = best;
            }
        }
    printf("bench_kernels: µs per call, median of %d rounds of the best of %d calls (3 for the "
           "optimizer and the check)\n", rounds, reps);
    printf("  %-26s %10s %10s %8s\n", "kernel", "1 thread", "threads", "speed-up");
    for (int k = 0; k < K_COUNT; k++) {
        double a = median(t[0][k], rounds), b = median(t[1][k], rounds);
        printf("  %-26s %10.1f %10.1f %7.2fx   (%d threads)\n", names[k], a, b, a / b, threads);
    }
    free(m.x); free(m.dy); free(m.y); free(m.w); free(m.b); free(m.mean); free(m.rstd);
    free(m.dw); free(m.db); free(m.p); free(m.g); free(m.state); free(m.mask); free(m.labels);
    return 0;
}
