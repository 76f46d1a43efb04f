/* bench_tp — one-stage training throughput at tensor-parallel degree T = 1
 * and T (docs/parallelism.md, "Tensor parallelism"), side by side in one run:
 * a 784-W×L-10 MLP whose hidden linears pair up column then row
 * (fc1 tp=column, fc2 tp=row, ...), on synthetic 784-feature data, trained
 * by pw_trainer with .tensor_parallel = 1 and = T.
 *
 *   bench_tp [--tp T] [--threads N] [--batch B] [--width W] [--layers L]
 *            [--micro-batches M] [--steps S] [--rounds R]
 *
 * --threads: the CPU thread team (shared by the T ranks, which are threads
 * of this process; the team serves one caller at a time). Rounds alternate
 * T = 1 and T so both see the same machine state; each figure is the median
 * samples/s over rounds, after one warm-up step per trainer. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph/graph.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/train/trainer.h"
#include "tools/bench/bench_util.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    const int T = (int)arg_int(argc, argv, "--tp", 2);
    const int threads = (int)arg_int(argc, argv, "--threads", 2);
    const long B = arg_int(argc, argv, "--batch", 256);
    const long W = arg_int(argc, argv, "--width", 2048);
    const long L = arg_int(argc, argv, "--layers", 4);
    const int M = (int)arg_int(argc, argv, "--micro-batches", 1);
    const int steps = (int)arg_int(argc, argv, "--steps", 3);
    const int rounds = (int)arg_int(argc, argv, "--rounds", 3);
    if (T < 1 || threads < 1 || B < 1 || W < 1 || L < 2 || L % 2 || M < 1 || B % M || steps < 1 || rounds < 1 ||
        rounds > 64) {
        fprintf(stderr, "bench_tp: bad arguments (--layers must be even: the linears pair up)\n");
        return 2;
    }
    pw_cpu_set_threads(threads);

    size_t cap = 4096 + (size_t)L * 160;
    char *text = malloc(cap);
    size_t off = (size_t)snprintf(text, cap, "graph bench_tp\ninput x : f32[784]\nlabel y : i32[]\nh0 = relu(x)\n");
    for (long l = 0; l < L; l++)
        off += (size_t)snprintf(text + off, cap - off, "fc%ld = linear(h%ld, out=%ld, tp=%s)\nh%ld = relu(fc%ld)\n",
                                l + 1, l, W, l % 2 ? "row" : "column", l + 1, l + 1);
    snprintf(text + off, cap - off, "logits = linear(h%ld, out=10) as head\nloss = softmax_cross_entropy(logits, y)\n", L);
    pw_graph *g;
    if (pw_graph_parse_string(text, strlen(text), "bench_tp.graph", &g) != PW_OK) {
        fprintf(stderr, "bench_tp: %s\n", pw_last_error());
        return 1;
    }
    free(text);
    pw_synthetic_config sc = {.n = B * (steps + 1), .sample_shape = {.ndim = 1, .d = {784}}, .n_classes = 10,
                              .seed = 1, .noise = 1.0f};
    pw_dataset *d = NULL;
    if (pw_dataset_synthetic(&sc, &d) != PW_OK) {
        fprintf(stderr, "bench_tp: %s\n", pw_last_error());
        return 1;
    }
    const int degrees[2] = {1, T};
    pw_trainer *tr[2] = {NULL, NULL};
    for (int v = 0; v < 2; v++) {
        pw_optim_config oc = pw_optim_defaults(PW_OPTIM_SGD);
        oc.lr = 1e-3f;
        pw_trainer_config tc = {.graph = g, .train = d, .batch = B, .micro_batches = M, .optim = oc, .seed = 1,
                                .tensor_parallel = degrees[v]};
        if (pw_trainer_create(&tc, &tr[v]) != PW_OK || pw_trainer_step(tr[v], NULL) != PW_OK) {
            fprintf(stderr, "bench_tp: T=%d: %s\n", degrees[v], pw_last_error());
            return 1;
        }
    }
    double rate[2][64];
    for (int r = 0; r < rounds; r++)
        for (int v = 0; v < 2; v++) {
            pw_trainer_seek(tr[v], 1); /* the same batches every round */
            const double t0 = now_s();
            for (int s = 0; s < steps; s++)
                if (pw_trainer_step(tr[v], NULL) != PW_OK) {
                    fprintf(stderr, "bench_tp: T=%d: %s\n", degrees[v], pw_last_error());
                    return 1;
                }
            rate[v][r] = (double)(B * steps) / (now_s() - t0);
        }
    printf("bench_tp: MLP 784-%ldx%ld-10, batch %ld, M=%d, CPU team %d thread(s), %d steps x %d rounds\n", W, L, B,
           M, threads, steps, rounds);
    for (int v = 0; v < 2; v++)
        printf("  T=%d: %8.0f samples/s (median)\n", degrees[v], median(rate[v], rounds));
    for (int v = 0; v < 2; v++) pw_trainer_destroy(tr[v]);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
    return 0;
}
