/* bench_schedules — every schedule run on this machine at p = 2 stages and
 * m = 8 micro-batches, side by side: measured step time and bubble, the
 * schedule's theoretical bubble, and the simulator's predicted step time from
 * a measured per-op profile (the error is the simulator's).
 *
 *   bench_schedules [--width W] [--layers L] [--micro-size B] [--steps N]
 *
 * Model: an L × W MLP (linear + relu), partitioned by FLOPs into the
 * schedule's chunks. Per-op times come from pw_profile_measure at the same
 * micro-batch size on one BLAS thread; a chunk's F / B / W cost is the sum over
 * its nodes, its OPTIM cost is timed on its program. Messages are hand-offs
 * between threads (zero-copy): a fixed 10 µs latency.
 *
 * Calibration: an op timed alone in a loop runs hotter in cache than inside a
 * step (stash slots rotate, data is gathered), so the profile alone predicts
 * every step ~12 % short on this machine. The bench therefore measures the
 * one-stage run once, scales the profile so the one-stage simulation matches
 * it, and then predicts every multi-stage schedule with that single factor
 * (printed). Both the raw and the calibrated error are shown. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "runtime/trace.h"
#include "scheduler/simulate.h"
#include "stages/cpu/ops.h"
#include "stages/data.h"
#include "stages/pipeline.h"
#include "stages/profile.h"

static long arg_int(int argc, char **argv, const char *name, long def)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return strtol(argv[i + 1], NULL, 10);
    return def;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *what)
{
    fprintf(stderr, "bench_schedules: %s: %s\n", what, pw_last_error());
    exit(1);
}

int main(int argc, char **argv)
{
    const long W = arg_int(argc, argv, "--width", 512);
    const long L = arg_int(argc, argv, "--layers", 8);
    const long mbs = arg_int(argc, argv, "--micro-size", 32);
    const int steps = (int)arg_int(argc, argv, "--steps", 9);
    const int S = 2, M = 8;
    if (W < 1 || L < 4 || mbs < 1 || steps < 3 || steps > 64) {
        fprintf(stderr, "bench_schedules: bad arguments\n");
        return 2;
    }
    char text[1 << 14];
    size_t off = (size_t)snprintf(text, sizeof text, "graph bench_sched\ninput x : f32[%ld]\n"
                                  "label y : i32[]\nh0 = relu(x)\n", W);
    for (long l = 0; l < L; l++)
        off += (size_t)snprintf(text + off, sizeof text - off,
                                "fc%ld = linear(h%ld, out=%ld)\nh%ld = relu(fc%ld)\n", l + 1, l, W,
                                l + 1, l + 1);
    snprintf(text + off, sizeof text - off, "logits = linear(h%ld, out=10) as head\n"
             "loss = softmax_cross_entropy(logits, y)\n", L);
    pw_graph *g;
    if (pw_graph_parse_string(text, strlen(text), "bench_sched.graph", &g) != PW_OK) die("graph");
    pw_synthetic_config sc = {.n = (int64_t)M * mbs * 4, .sample_shape = {.ndim = 1, .d = {W}},
                              .n_classes = 10, .seed = 1, .noise = 1.0f};
    pw_dataset *d;
    if (pw_dataset_synthetic(&sc, &d) != PW_OK) die("data");
    pw_cpu_set_threads(1);
    pw_profile_config prc = {.micro_batch = mbs, .iterations = 9, .threads = 1};
    pw_profile *prof;
    if (pw_profile_measure(g, &prc, &prof) != PW_OK) die("profile");

    /* One factor, from the one-stage run: measured step / simulated step. */
    double calib = 1.0;
    {
        pw_pipeline_config pc = pw_pipeline_defaults();
        pc.graph = g;
        pc.train = d;
        pc.batch = (int64_t)M * mbs;
        pc.micro_batches = M;
        pc.stages = 1;
        pc.optim.lr = 1e-3f;
        pw_pipeline *pl;
        if (pw_pipeline_create(&pc, &pl) != PW_OK) die("one stage");
        pw_cpu_set_threads(1);
        double t[64];
        pw_pipeline_step(pl, NULL);
        for (int i = 0; i < steps; i++) {
            int64_t t0 = pw_now_ns();
            if (pw_pipeline_step(pl, NULL) != PW_OK) die("step");
            t[i] = (double)(pw_now_ns() - t0) * 1e-9;
        }
        qsort(t, (size_t)steps, sizeof t[0], cmp_double);
        pw_sim_chunk_cost one = {0};
        for (int i = 0; i < g->n_nodes; i++) {
            one.f += prof->times[i].f;
            one.b += prof->times[i].b;
            one.w += prof->times[i].w;
        }
        pw_program *p = pw_pipeline_program(pl, 0);
        int64_t o0 = pw_now_ns();
        for (int r = 0; r < 3; r++) pw_program_optimizer_step(p, 1000 + r);
        one.optim = (double)(pw_now_ns() - o0) * 1e-9 / 3;
        pw_sim_config sim = {.chunks = &one};
        pw_sim_result *res;
        if (pw_simulate(pw_pipeline_schedule(pl), &sim, &res) != PW_OK) die("simulate");
        calib = t[steps / 2] / res->step_time;
        printf("  calibration: one stage measured %.2f ms, profile predicts %.2f ms: factor %.3f\n",
               t[steps / 2] * 1e3, res->step_time * 1e3, calib);
        pw_sim_result_destroy(res);
        pw_pipeline_destroy(pl);
    }
    static const struct { pw_schedule_kind kind; const char *name; } kinds[] = {
        {PW_SCHEDULE_GPIPE, "gpipe"},       {PW_SCHEDULE_1F1B, "1f1b"},
        {PW_SCHEDULE_INTERLEAVED, "interleaved v=2"}, {PW_SCHEDULE_ZB_H1, "zb-h1"},
        {PW_SCHEDULE_ZB_H2, "zb-h2"},       {PW_SCHEDULE_ZB_V, "zb-v"},
    };
    printf("bench_schedules: %ld x %ld MLP, p = %d stages, m = %d micro-batches of %ld, one core "
           "per stage\n", L, W, S, M, mbs);
    printf("  schedule          measured step   bubble   theory   simulated (raw)   error   "
           "calibrated   error\n");
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        pw_pipeline_config pc = pw_pipeline_defaults();
        pc.graph = g;
        pc.train = d;
        pc.batch = (int64_t)M * mbs;
        pc.micro_batches = M;
        pc.stages = S;
        pc.schedule = kinds[k].kind;
        pc.partition = PW_PARTITION_FLOPS;
        pc.optim.lr = 1e-3f;
        pw_pipeline *pl;
        if (pw_pipeline_create(&pc, &pl) != PW_OK) die(kinds[k].name);
        pw_cpu_set_threads(1);
        double t[64], bub[64];
        pw_pipeline_step(pl, NULL);
        for (int i = 0; i < steps; i++) {
            int64_t t0 = pw_now_ns();
            if (pw_pipeline_step(pl, NULL) != PW_OK) die("step");
            t[i] = (double)(pw_now_ns() - t0) * 1e-9;
            bub[i] = pw_pipeline_last_bubble(pl);
        }
        qsort(t, (size_t)steps, sizeof t[0], cmp_double);
        qsort(bub, (size_t)steps, sizeof bub[0], cmp_double);

        /* Simulate the same schedule over the same chunks. */
        const pw_partition *part = pw_pipeline_partition(pl);
        const int C = pw_pipeline_n_chunks(pl);
        pw_sim_chunk_cost *cost = calloc((size_t)C, sizeof *cost);
        for (int c = 0; c < C; c++) {
            for (int i = part->begin[c]; i < part->begin[c + 1]; i++) {
                cost[c].f += prof->times[i].f;
                cost[c].b += prof->times[i].b;
                cost[c].w += prof->times[i].w;
            }
            pw_program *p = pw_pipeline_program(pl, c);
            int64_t o0 = pw_now_ns();
            for (int r = 0; r < 3; r++) pw_program_optimizer_step(p, 1000 + r);
            cost[c].optim = (double)(pw_now_ns() - o0) * 1e-9 / 3;
        }
        pw_sim_config sim = {.chunks = cost, .link_latency = 10e-6, .link_bandwidth = 0};
        pw_sim_result *res, *cal;
        if (pw_simulate(pw_pipeline_schedule(pl), &sim, &res) != PW_OK) die("simulate");
        for (int c = 0; c < C; c++) {
            cost[c].f *= calib;
            cost[c].b *= calib;
            cost[c].w *= calib;
            cost[c].optim *= calib;
        }
        if (pw_simulate(pw_pipeline_schedule(pl), &sim, &cal) != PW_OK) die("simulate");
        double meas = t[steps / 2];
        printf("  %-16s %10.2f ms   %5.1f%%   %5.1f%%   %12.2f ms  %+6.1f%%   %7.2f ms  %+6.1f%%\n",
               kinds[k].name, meas * 1e3, 100.0 * bub[steps / 2],
               100.0 * pw_pipeline_theory_bubble(pl), res->step_time * 1e3,
               100.0 * (res->step_time / meas - 1.0), cal->step_time * 1e3,
               100.0 * (cal->step_time / meas - 1.0));
        pw_sim_result_destroy(cal);
        fflush(stdout);
        pw_sim_result_destroy(res);
        free(cost);
        pw_pipeline_destroy(pl);
    }
    pw_profile_destroy(prof);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
    return 0;
}
