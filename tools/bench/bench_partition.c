/* bench_partition — the partitioner's plan against an equal split (issue 5).
 *
 *   bench_partition [--graph FILE] [--micro-size B] [--micro-batches M]
 *                   [--steps N] [--rounds R] [--schedule 1f1b|gpipe]
 *                   [--classes K]
 *
 * On a deliberately imbalanced graph (default
 * tests/fixtures/graphs/imbalanced_mlp.graph: three wide layers, then a tail
 * of narrow ones; run from the repository root), two stages, one worker
 * pinned to each core:
 *
 *   1. every op is profiled in this run (pw_profile_measure at the run's
 *      micro-batch size, one BLAS thread) and pw_plan_make plans 2 stages
 *      with balance time — the cuts `pipeline-run --balance time` trains;
 *   2. the pipeline trains with the plan's cuts and with an equal split by
 *      node count (what a hand split by layer count gives), alternately, R
 *      rounds of N timed steps each after a warm-up step: median step time
 *      of each and the ratio equal / plan (> 1: the plan is faster);
 *   3. the planner's predicted time per stage per micro-batch (F + B + W
 *      + O / M, O the optimizer update once per step, all from the profile;
 *      the links are free in-process) against the measured busy time (time
 *      inside the stage's compute callbacks, engine statistics, which
 *      include the optimizer step) per micro-batch, error %; and the
 *      predicted step time (Σ stage + (M − 1) × bottleneck) against the
 *      measured one. A one-stage run of the whole graph (one core) in each
 *      round separates the profile's own error from what running two
 *      stages side by side adds (shared caches and memory bandwidth). The
 *      optimizer is also timed apart (three extra optimizer steps on the
 *      main thread after the round), so F + B + W is compared with busy
 *      minus the optimizer, and O / M with that optimizer time.
 *
 * The load average is printed before and after: on a shared machine the
 * figures move with the neighbours' load. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "runtime/trace.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/plan/plan.h"
#include "stages/plan/profile.h"
#include "tools/bench/bench_util.h"

#define STAGES 2       /* the two cores */
#define MAX_ROUNDS 32
#define MAX_STEPS 64

static void die(void)
{
    fprintf(stderr, "bench_partition: %s\n", pw_last_error());
    exit(1);
}

static void loadavg(char *buf, size_t n)
{
    FILE *f = fopen("/proc/loadavg", "r");
    buf[0] = '\0';
    if (f) {
        if (!fgets(buf, (int)n, f)) buf[0] = '\0';
        fclose(f);
    }
    buf[strcspn(buf, "\n")] = '\0';
}

/* One round of one split: median step time, and each stage's busy seconds
 * per micro-batch over the timed steps. */
typedef struct round_result {
    double step;           /* median step of the round */
    double best;           /* its fastest step: the least disturbed */
    double busy[STAGES];   /* compute callbacks, optimizer step included */
    double optim[STAGES];  /* of which the optimizer step (timed apart) */
} round_result;

static round_result run_round(const pw_graph *g, const pw_dataset *d, int n_stages, const int *cuts, int M,
                              long mbs, pw_schedule_kind kind, int steps)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = (int64_t)M * mbs;
    pc.micro_batches = M;
    pc.stages = n_stages;
    pc.schedule = kind;
    pc.cuts = cuts;
    pc.n_cuts = n_stages + 1;
    pc.optim.lr = 1e-3f;
    pc.pin = 1;
    pw_pipeline *pl;
    if (pw_pipeline_create(&pc, &pl) != PW_OK) die();
    if (pw_pipeline_step(pl, NULL) != PW_OK) die(); /* warm-up */
    double busy0[STAGES] = {0}, t[MAX_STEPS];
    for (int s = 0; s < n_stages; s++) {
        pw_pipeline_stage_stats ss;
        pw_pipeline_stage_stats_get(pl, s, &ss);
        busy0[s] = ss.busy_s;
    }
    for (int i = 0; i < steps; i++) {
        int64_t t0 = pw_now_ns();
        if (pw_pipeline_step(pl, NULL) != PW_OK) die();
        t[i] = (double)(pw_now_ns() - t0) * 1e-9;
    }
    round_result r = {.step = median(t, steps)};
    r.best = t[0]; /* median() sorted t */
    for (int s = 0; s < n_stages; s++) {
        pw_pipeline_stage_stats ss;
        pw_pipeline_stage_stats_get(pl, s, &ss);
        r.busy[s] = (ss.busy_s - busy0[s]) / ((double)steps * M);
        /* The engine counts the optimizer step as busy, and so does the
         * plan (O / M). Time it apart too (on this thread, a few times) to
         * compare F + B + W with F + B + W and O with O. */
        pw_program *prog = pw_pipeline_program(pl, s);
        int64_t a = pw_now_ns();
        for (int k = 0; k < 3; k++)
            if (pw_program_optimizer_step(prog, 1000 + k) != PW_OK) die();
        r.optim[s] = (double)(pw_now_ns() - a) * 1e-9 / 3.0 / M;
    }
    pw_pipeline_destroy(pl);
    return r;
}

static void print_split(const char *name, const pw_graph *g, const pw_partition *pred, const round_result *rr,
                        int rounds, int M)
{
    double step[MAX_ROUNDS], busy[STAGES][MAX_ROUNDS], fbw[STAGES][MAX_ROUNDS], opt[STAGES][MAX_ROUNDS];
    for (int r = 0; r < rounds; r++) {
        step[r] = rr[r].step;
        for (int s = 0; s < STAGES; s++) {
            busy[s][r] = rr[r].busy[s];
            fbw[s][r] = rr[r].busy[s] - rr[r].optim[s];
            opt[s][r] = rr[r].optim[s];
        }
    }
    const double ms = median(step, rounds);
    printf("%s: cuts", name);
    for (int s = 0; s < STAGES; s++) printf(" [%d,%d)", pred->begin[s], pred->begin[s + 1]);
    printf(" (%s .. %s | %s .. %s)\n", g->values[g->nodes[0].output].name,
           g->values[g->nodes[pred->begin[1] - 1].output].name, g->values[g->nodes[pred->begin[1]].output].name,
           g->values[g->nodes[g->n_nodes - 1].output].name);
    printf("  stage   predicted F+B+W+O/M   measured busy   error    predicted F+B+W   busy - optimizer   "
           "error    predicted O/M   optimizer   error   (per micro-batch)\n");
    for (int s = 0; s < STAGES; s++) {
        const pw_stage_cost *c = &pred->stage[s];
        const double p = c->time, m = median(busy[s], rounds), f = median(fbw[s], rounds);
        const double pf = c->f + c->b + c->w, po = c->optim / M, mo = median(opt[s], rounds);
        printf("  %5d   %16.3f ms   %10.3f ms   %+6.1f%%   %12.3f ms   %13.3f ms   %+6.1f%%   %10.3f ms   "
               "%6.3f ms   %+6.1f%%\n", s, p * 1e3, m * 1e3, 100.0 * (m - p) / p, pf * 1e3, f * 1e3,
               100.0 * (f - pf) / pf, po * 1e3, mo * 1e3, po > 0 ? 100.0 * (mo - po) / po : 0.0);
    }
    printf("  step    %12.3f ms   %10.3f ms   %+6.1f%%   (predicted: sum of stages + %d x bottleneck)\n",
           pred->step_time * 1e3, ms * 1e3, 100.0 * (ms - pred->step_time) / pred->step_time, M - 1);
}

int main(int argc, char **argv)
{
    const char *path = arg_str(argc, argv, "--graph", "tests/fixtures/graphs/imbalanced_mlp.graph");
    const long mbs = arg_int(argc, argv, "--micro-size", 16);
    const int M = (int)arg_int(argc, argv, "--micro-batches", 8);
    const int steps = (int)arg_int(argc, argv, "--steps", 7);
    const int rounds = (int)arg_int(argc, argv, "--rounds", 5);
    const int classes = (int)arg_int(argc, argv, "--classes", 5);
    const char *sched = arg_str(argc, argv, "--schedule", "1f1b");
    pw_schedule_kind kind;
    if (mbs < 1 || M < 1 || steps < 1 || steps > MAX_STEPS || rounds < 1 || rounds > MAX_ROUNDS ||
        classes < 2 || pw_schedule_kind_parse(sched, &kind) != PW_OK) {
        fprintf(stderr, "bench_partition: bad arguments\n");
        return 2;
    }
    char load0[128], load1[128];
    loadavg(load0, sizeof load0);
    pw_graph *g;
    if (pw_graph_parse_file(path, &g) != PW_OK) die();
    if (g->n_nodes < STAGES) {
        fprintf(stderr, "bench_partition: %s has fewer than %d nodes\n", path, STAGES);
        return 2;
    }

    /* 1. The profile, measured now, and the plan. */
    int64_t t0 = pw_now_ns();
    pw_profile_config prc = {.micro_batch = mbs, .threads = 1, .optim = PW_OPTIM_SGD}; /* the pipeline's */
    pw_profile *prof;
    if (pw_profile_measure(g, &prc, &prof) != PW_OK) die();
    const double t_prof = (double)(pw_now_ns() - t0) * 1e-9;
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = STAGES;
    pc.micro_batches = M;
    pc.micro_batch_size = mbs;
    pc.schedule = kind;
    pc.balance = PW_BALANCE_TIME;
    pc.profile = prof;
    pc.optim = PW_OPTIM_SGD;
    pw_plan *plan;
    if (pw_plan_make(&pc, &plan) != PW_OK) die();

    /* Both splits predicted by the same model (the plan's own partition
     * carries the simulator's step; this is the closed form for both). */
    int equal[STAGES + 1];
    for (int s = 0; s <= STAGES; s++) equal[s] = s * g->n_nodes / STAGES;
    pw_partition_config ec = {.n_stages = STAGES, .balance = PW_BALANCE_TIME, .node_times = prof->times,
                              .micro_batch_size = mbs, .micro_batches = M,
                              .optim_state_floats = pw_optim_state_floats(PW_OPTIM_SGD)};
    pw_partition pred_plan, pred_equal;
    if (pw_partition_evaluate(g, &ec, plan->part.begin, &pred_plan) != PW_OK ||
        pw_partition_evaluate(g, &ec, equal, &pred_equal) != PW_OK)
        die();

    const pw_value *in = &g->values[g->input];
    pw_synthetic_config sc = {.n = (int64_t)M * mbs * 4, .sample_shape = in->shape, .n_classes = classes,
                              .seed = 1, .noise = 1.0f};
    pw_dataset *d;
    if (pw_dataset_synthetic(&sc, &d) != PW_OK) die();

    printf("bench_partition: %s (%d nodes), %d stages (pinned, 1 BLAS thread each), %s, %d micro-batches of "
           "%ld, %d rounds x %d steps\n", g->name, g->n_nodes, STAGES, sched, M, mbs, rounds, steps);
    printf("profile: %s, measured in %.2f s; plan balance time, predicted bottleneck %.3f ms (equal split: "
           "%.3f ms)\n", prof->device, t_prof, plan->part.bottleneck * 1e3, pred_equal.bottleneck * 1e3);
    printf("load average before: %s\n\n", load0);

    /* 2. Alternate the two splits, round after round. */
    round_result rp[MAX_ROUNDS], re[MAX_ROUNDS], r1[MAX_ROUNDS];
    const int whole[2] = {0, g->n_nodes};
    printf("round   plan step   equal step   equal / plan   1-stage step\n");
    for (int r = 0; r < rounds; r++) {
        rp[r] = run_round(g, d, STAGES, plan->part.begin, M, mbs, kind, steps);
        re[r] = run_round(g, d, STAGES, equal, M, mbs, kind, steps);
        r1[r] = run_round(g, d, 1, whole, M, mbs, kind, steps);
        printf("%5d   %6.3f ms   %7.3f ms   %8.3f       %7.3f ms\n", r, rp[r].step * 1e3, re[r].step * 1e3,
               re[r].step / rp[r].step, r1[r].step * 1e3);
        fflush(stdout);
    }
    double sp[MAX_ROUNDS], se[MAX_ROUNDS], ratio[MAX_ROUNDS], s1[MAX_ROUNDS], b1[MAX_ROUNDS], f1[MAX_ROUNDS];
    for (int r = 0; r < rounds; r++) {
        sp[r] = rp[r].step;
        se[r] = re[r].step;
        ratio[r] = re[r].step / rp[r].step;
        s1[r] = r1[r].step;
        b1[r] = r1[r].busy[0];
        f1[r] = r1[r].busy[0] - r1[r].optim[0];
    }
    const double mp = median(sp, rounds), me = median(se, rounds), mr = median(ratio, rounds);
    const double m1 = median(s1, rounds);
    double bp = 1e30, be = 1e30, bo = 1e30;
    for (int r = 0; r < rounds; r++) {
        if (rp[r].best < bp) bp = rp[r].best;
        if (re[r].best < be) be = re[r].best;
        if (r1[r].best < bo) bo = r1[r].best;
    }
    printf("median  %6.3f ms   %7.3f ms   %8.3f       %7.3f ms   (predicted ratio %.3f)\n", mp * 1e3,
           me * 1e3, mr, m1 * 1e3, pred_equal.step_time / pred_plan.step_time);
    printf("fastest   %6.3f ms   %7.3f ms   %8.3f       %7.3f ms   (least disturbed steps)\n", bp * 1e3,
           be * 1e3, be / bp, bo * 1e3);
    printf("speedup over one stage (medians): plan %.3f, equal split %.3f (ideal for %d balanced stages: "
           "%.3f)\n\n", m1 / mp, m1 / me, STAGES, (double)STAGES * M / (M + STAGES - 1));

    /* The model without a pipeline: the whole graph on one core. */
    double whole_fbw = 0, whole_o = 0;
    for (int s = 0; s < STAGES; s++) {
        whole_fbw += pred_plan.stage[s].f + pred_plan.stage[s].b + pred_plan.stage[s].w;
        whole_o += pred_plan.stage[s].optim / M;
    }
    const double whole_pred = whole_fbw + whole_o;
    const double mb1 = median(b1, rounds), mf1 = median(f1, rounds);
    printf("one stage: predicted F+B+W+O/M %.3f ms, measured busy %.3f ms (%+.1f%%); predicted F+B+W %.3f ms, "
           "busy without the optimizer %.3f ms (%+.1f%%) per micro-batch\n\n", whole_pred * 1e3, mb1 * 1e3,
           100.0 * (mb1 - whole_pred) / whole_pred, whole_fbw * 1e3, mf1 * 1e3,
           100.0 * (mf1 - whole_fbw) / whole_fbw);

    /* 3. Predicted against measured, per stage. */
    print_split("plan (balance time)", g, &pred_plan, rp, rounds, M);
    print_split("equal split by node count", g, &pred_equal, re, rounds, M);
    loadavg(load1, sizeof load1);
    printf("\nload average after: %s\n", load1);

    pw_partition_free(&pred_plan);
    pw_partition_free(&pred_equal);
    pw_dataset_destroy(d);
    pw_plan_destroy(plan);
    pw_profile_destroy(prof);
    pw_graph_destroy(g);
    return 0;
}
