/* bench_pipeline — pipeline efficiency: an MLP trained on 2 stages (one core
 * each, 1F1B) against the same MLP on 1 stage on 1 core, side by side in one
 * run, for several micro-batch counts M at a fixed micro-batch size.
 *
 *   bench_pipeline [--width W] [--layers L] [--micro-size B] [--steps N]
 *                  [--schedule 1f1b|gpipe] [--stages S] [--trace-overhead 1]
 *
 * The ideal speedup of S balanced stages under 1F1B or GPipe is
 * S·M/(M+S−1) (the bubble is (S−1)/(M+S−1)). Reported: measured speedup
 * (one-stage step time / S-stage step time), the ideal, and their ratio.
 * The stages are balanced by FLOPs (layers alternate linear+relu, so an even
 * layer count splits evenly). Each configuration runs rounds alternately
 * with its one-stage baseline; times are medians. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "runtime/trace.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "tools/bench/bench_util.h"

/* Median (and, in *best, minimum) seconds per step of `steps` steps, after
 * one warm-up step. On a shared machine the minimum is the closest to an
 * undisturbed step; both are reported. */
static double time_steps(pw_pipeline *pl, int steps, double *best)
{
    double t[64];
    if (pw_pipeline_step(pl, NULL) != PW_OK) goto fail;
    for (int i = 0; i < steps; i++) {
        int64_t t0 = pw_now_ns();
        if (pw_pipeline_step(pl, NULL) != PW_OK) goto fail;
        t[i] = (double)(pw_now_ns() - t0) * 1e-9;
    }
    qsort(t, (size_t)steps, sizeof t[0], cmp_double);
    *best = t[0];
    return t[steps / 2];
fail:
    fprintf(stderr, "bench_pipeline: %s\n", pw_last_error());
    exit(1);
}

static int64_t trace_events; /* > 0: record a trace (for --trace-overhead) */

static pw_pipeline *make(const pw_graph *g, const pw_dataset *d, int stages, int M, long mbs,
                         pw_schedule_kind kind)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = (int64_t)M * mbs;
    pc.micro_batches = M;
    pc.stages = stages;
    pc.schedule = kind;
    pc.partition = PW_PARTITION_FLOPS;
    pc.optim.lr = 1e-3f;
    pc.pin = 1;
    pc.trace_events = trace_events;
    pw_pipeline *pl;
    if (pw_pipeline_create(&pc, &pl) != PW_OK) {
        fprintf(stderr, "bench_pipeline: %s\n", pw_last_error());
        exit(1);
    }
    pw_cpu_set_threads(1);
    return pl;
}

int main(int argc, char **argv)
{
    const long W = arg_int(argc, argv, "--width", 512);
    const long L = arg_int(argc, argv, "--layers", 8);
    const long mbs = arg_int(argc, argv, "--micro-size", 32);
    const int steps = (int)arg_int(argc, argv, "--steps", 7);
    const int S = (int)arg_int(argc, argv, "--stages", 2);
    const char *sched = arg_str(argc, argv, "--schedule", "1f1b");
    pw_schedule_kind kind;
    if (W < 1 || L < 2 || mbs < 1 || steps < 1 || steps > 64 || S < 2 ||
        pw_schedule_kind_parse(sched, &kind) != PW_OK) {
        fprintf(stderr, "bench_pipeline: bad arguments\n");
        return 2;
    }
    size_t cap = 4096 + (size_t)L * 128;
    char *text = malloc(cap);
    size_t off = (size_t)snprintf(text, cap, "graph bench_pipe\ninput x : f32[%ld]\nlabel y : i32[]\n"
                                  "h0 = relu(x)\n", W);
    for (long l = 0; l < L; l++)
        off += (size_t)snprintf(text + off, cap - off,
                                "fc%ld = linear(h%ld, out=%ld)\nh%ld = relu(fc%ld)\n", l + 1, l, W,
                                l + 1, l + 1);
    snprintf(text + off, cap - off, "logits = linear(h%ld, out=10) as head\n"
             "loss = softmax_cross_entropy(logits, y)\n", L);
    pw_graph *g;
    if (pw_graph_parse_string(text, strlen(text), "bench_pipe.graph", &g) != PW_OK) {
        fprintf(stderr, "bench_pipeline: %s\n", pw_last_error());
        return 1;
    }
    free(text);
    if (arg_int(argc, argv, "--trace-overhead", 0)) {
        /* Tracing cost: the same 2-stage run with and without a trace,
         * alternated; medians of the per-round medians. */
        const int M = 16, rounds = 7;
        pw_synthetic_config tc = {.n = (int64_t)M * mbs * 2, .sample_shape = {.ndim = 1, .d = {W}},
                                  .n_classes = 10, .seed = 1, .noise = 1.0f};
        pw_dataset *td;
        if (pw_dataset_synthetic(&tc, &td) != PW_OK) return 1;
        double off[16], on[16], b;
        for (int r = 0; r < rounds; r++) {
            trace_events = 0;
            pw_pipeline *a = make(g, td, S, M, mbs, kind);
            off[r] = time_steps(a, steps, &b);
            pw_pipeline_destroy(a);
            trace_events = (int64_t)(steps + 2) * (8 * M + 16);
            pw_pipeline *t = make(g, td, S, M, mbs, kind);
            on[r] = time_steps(t, steps, &b);
            pw_pipeline_destroy(t);
        }
        qsort(off, (size_t)rounds, sizeof off[0], cmp_double);
        qsort(on, (size_t)rounds, sizeof on[0], cmp_double);
        printf("bench_pipeline --trace-overhead: %d stages, M = %d: step %.3f ms without a trace, "
               "%.3f ms with; overhead %+.2f %% (target < 2 %%)\n", S, M, off[rounds / 2] * 1e3,
               on[rounds / 2] * 1e3, 100.0 * (on[rounds / 2] / off[rounds / 2] - 1.0));
        pw_dataset_destroy(td);
        pw_graph_destroy(g);
        return 0;
    }
    static const int Ms[] = {4, 8, 16, 32};
    const int max_m = 32;
    pw_synthetic_config sc = {.n = (int64_t)max_m * mbs * 2, .sample_shape = {.ndim = 1, .d = {W}},
                              .n_classes = 10, .seed = 1, .noise = 1.0f};
    pw_dataset *d;
    if (pw_dataset_synthetic(&sc, &d) != PW_OK) {
        fprintf(stderr, "bench_pipeline: %s\n", pw_last_error());
        return 1;
    }
    printf("bench_pipeline: %ld x %ld MLP, micro-batch %ld samples, %s, %d stages vs 1 stage, "
           "1 BLAS thread per stage\n", L, W, mbs, sched, S);
    printf("    M   1-stage step   %d-stage step   speedup   ideal %d·M/(M+%d)   ratio   bubble"
           "   | min-based speedup  ratio\n", S, S, S - 1);
    for (size_t k = 0; k < sizeof Ms / sizeof Ms[0]; k++) {
        int M = Ms[k];
        double t1[3], tS[3], bub = 0, b1 = 1e30, bS = 1e30, b;
        for (int r = 0; r < 3; r++) { /* alternate baseline and pipeline */
            pw_pipeline *one = make(g, d, 1, M, mbs, kind);
            t1[r] = time_steps(one, steps, &b);
            if (b < b1) b1 = b;
            pw_pipeline_destroy(one);
            pw_pipeline *pl = make(g, d, S, M, mbs, kind);
            tS[r] = time_steps(pl, steps, &b);
            if (b < bS) bS = b;
            bub = pw_pipeline_last_bubble(pl);
            pw_pipeline_destroy(pl);
        }
        qsort(t1, 3, sizeof t1[0], cmp_double);
        qsort(tS, 3, sizeof tS[0], cmp_double);
        double speed = t1[1] / tS[1], ideal = (double)S * M / (M + S - 1);
        printf("%5d   %9.2f ms   %10.2f ms   %7.3f   %15.3f   %5.1f%%   %5.1f%%   | %17.3f  %5.1f%%\n",
               M, t1[1] * 1e3, tS[1] * 1e3, speed, ideal, 100.0 * speed / ideal, 100.0 * bub,
               b1 / bS, 100.0 * (b1 / bS) / ideal);
        fflush(stdout);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
    return 0;
}
