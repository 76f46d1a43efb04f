/* bench_layouts — the layout search (stages/plan/layout.h) checked by
 * measurement: every layout of the search space is trained on this machine
 * and timed, and the planner's choice is ranked among them.
 *
 *   bench_layouts [--graphs a.graph,b.graph] [--batches 256,32] [--max-m 16]
 *                 [--steps 3] [--rounds 2] [--data SPEC,SPEC]
 *
 * Per graph: the planner (pw_layout_search over stages x replicas x
 * tensor degree (graphs with tp marks) x threads x micro-batches x
 * schedule on this machine's cores, rates
 * measured here as pipeline-run --parallel auto measures them) chooses a
 * layout; then every candidate of the same space is measured with the
 * library (pw_pipeline: one warm-up step, then --steps timed steps, their
 * median), round after round in turn, so that every layout sees the
 * same mix of load; a layout's measured step is the median over the
 * rounds. Printed per layout: predicted and measured step, the error,
 * samples/s and its rank; per graph: where the choice ranks and how far it
 * is from the fastest measured layout (target: within 10 %), and how many
 * predictions are within 15 % of their measurement. Recomputation is left
 * out of the space (it only adds work; without a memory budget the planner
 * never picks it). The load average is printed before and after.
 *
 * Data: --data per graph (default: fashion-mnist for graphs whose input is
 * an image, text:fortunes for token graphs). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph/graph.h"
#include "runtime/pool.h"
#include "stages/ops/cpu/ops.h"
#include "stages/plan/layout.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "tools/bench/bench_util.h"

#define MAX_ROUNDS 16

static void die(const char *what)
{
    fprintf(stderr, "bench_layouts: %s: %s\n", what, pw_last_error());
    exit(1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void loadavg(const char *when)
{
    char buf[128] = "?";
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (!fgets(buf, sizeof buf, f)) snprintf(buf, sizeof buf, "?\n");
        fclose(f);
    }
    printf("load average %s: %s", when, buf);
}

/* The n-th item of a comma list, or def. */
static const char *item(const char *list, int n, char *buf, size_t cap, const char *def)
{
    if (!list) return def;
    const char *p = list;
    for (int k = 0; k < n; k++) {
        p = strchr(p, ',');
        if (!p) return def;
        p++;
    }
    size_t len = strcspn(p, ",");
    if (len >= cap) len = cap - 1;
    memcpy(buf, p, len);
    buf[len] = '\0';
    return buf;
}

/* Median seconds per step of layout l: one warm-up step, then `steps`. */
static double measure(const pw_graph *g, const pw_dataset *d, int64_t batch, const pw_layout *l, int steps)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = batch;
    pc.stages = l->stages;
    pc.replicas = l->replicas;
    pc.tensor_parallel = l->tensor;
    pc.micro_batches = l->micro_batches;
    pc.schedule = l->schedule;
    pc.chunks_per_rank = l->schedule == PW_SCHEDULE_INTERLEAVED ? l->chunks_per_rank : 0;
    pc.recompute = l->recompute;
    pc.threads = l->threads;
    pc.partition = PW_PARTITION_FLOPS; /* the forecast's cuts */
    pc.pin = 1;
    pc.optim = pw_optim_defaults(PW_OPTIM_SGD);
    pw_cpu_set_threads(l->threads);
    pw_pipeline *pl;
    if (pw_pipeline_create(&pc, &pl) != PW_OK) die("pipeline");
    if (pw_pipeline_step(pl, NULL) != PW_OK) die("step");
    double t[64];
    if (steps > 64) steps = 64;
    for (int i = 0; i < steps; i++) {
        double t0 = now_s();
        if (pw_pipeline_step(pl, NULL) != PW_OK) die("step");
        t[i] = now_s() - t0;
    }
    pw_pipeline_destroy(pl);
    return median(t, steps);
}

typedef struct row {
    pw_layout l;
    double predicted;
    double measured[MAX_ROUNDS];
    double med;
} row;

static int by_measured(const void *a, const void *b)
{
    const row *x = a, *y = b;
    return (x->med > y->med) - (x->med < y->med);
}

static void bench_graph(const char *path, int64_t batch, const char *data, int max_m, int steps, int rounds)
{
    pw_graph *g;
    if (pw_graph_parse_file(path, &g) != PW_OK) die(path);
    pw_dataset *d = NULL;
    if (pw_dataset_from_spec_for_graph(data, 1, g, &d) != PW_OK) die(data);
    const int cores = pw_available_cores();
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = batch;
    sp.processes = cores;
    sp.cores = cores;
    sp.shared_team = 1;
    sp.n_nodes = g->n_nodes;
    sp.max_tensor = pw_graph_tp_marked(g) ? cores : 1; /* as pipeline-run --parallel auto */
    sp.max_micro_batches = max_m;
    sp.recompute = 0;
    pw_layout_forecast_config fc = pw_layout_forecast_defaults();
    fc.graph = g;
    fc.batch = batch;
    hwloc_topology_t topo;
    if (pw_topology_load_spec("this", &topo) != PW_OK) die("topology");
    fc.topology = topo;
    fc.in_process = 1; /* the layouts train as threads of this process */
    fc.log = stdout; /* the measured: lines */
    pw_layout_forecaster *f;
    if (pw_layout_forecaster_create(&fc, &f) != PW_OK) die("forecaster");
    pw_layout_model m = pw_layout_forecaster_model(f);
    const double t0 = now_s();
    pw_layout_result res, all;
    if (pw_layout_search(&sp, &m, 0, &res) != PW_OK) die("search");
    if (pw_layout_forecaster_recheck(f, 0.25)) { /* the machine changed speed: once more */
        pw_layout_result_free(&res);
        if (pw_layout_search(&sp, &m, 0, &res) != PW_OK) die("search");
    }
    const double plan_s = now_s() - t0;
    /* Every candidate's prediction (the exhaustive search costs them all). */
    if (pw_layout_search_exhaustive(&sp, &m, 0, &all) != PW_OK) die("exhaustive search");
    if (memcmp(&res.best, &all.best, sizeof res.best)) {
        fprintf(stderr, "bench_layouts: the search and the exhaustive search disagree\n");
        exit(1);
    }
    char desc[160];
    printf("\n%s (%s), batch %lld, data %s: %d layouts; planned in %.2f s (%d costed); chose %s, predicted %.2f ms\n",
           g->name, path, (long long)batch, data, all.n_costed, plan_s, res.n_costed,
           pw_layout_describe(&res.best, desc, sizeof desc), 1e3 * res.best_cost.step_time);
    fflush(stdout);
    row *rows = calloc((size_t)all.n_entries, sizeof *rows);
    int n = 0;
    for (int i = 0; i < all.n_entries; i++) {
        if (!all.entries[i].costed) continue;
        rows[n].l = all.entries[i].layout;
        rows[n].predicted = all.entries[i].cost.step_time;
        n++;
    }
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) rows[i].measured[r] = measure(g, d, batch, &rows[i].l, steps);
    for (int i = 0; i < n; i++) {
        double v[MAX_ROUNDS];
        memcpy(v, rows[i].measured, sizeof v);
        rows[i].med = median(v, rounds);
    }
    qsort(rows, (size_t)n, sizeof *rows, by_measured);
    printf("  %4s  %-42s %11s %11s %8s %10s\n", "rank", "layout", "predicted", "measured", "error", "samples/s");
    int choice_rank = -1, within = 0;
    double worst = 0;
    for (int i = 0; i < n; i++) {
        const double err = rows[i].predicted / rows[i].med - 1.0;
        const int chosen = !memcmp(&rows[i].l, &res.best, sizeof res.best);
        if (chosen) choice_rank = i;
        within += err > -0.15 && err < 0.15;
        if (err * err > worst * worst) worst = err;
        printf("  %4d  %-42s %8.2f ms %8.2f ms %+7.1f%% %10.1f%s\n", i + 1,
               pw_layout_describe(&rows[i].l, desc, sizeof desc), 1e3 * rows[i].predicted, 1e3 * rows[i].med,
               100 * err, (double)batch / rows[i].med, chosen ? "   <- the planner's choice" : "");
    }
    if (choice_rank >= 0)
        printf("  %s: the choice ranks %d of %d, %.1f%% slower than the fastest measured (target: within 10%%); "
               "%d of %d predictions within 15%% (the worst %+.1f%%)\n", g->name, choice_rank + 1, n,
               100 * (rows[choice_rank].med / rows[0].med - 1), within, n, 100 * worst);
    fflush(stdout);
    free(rows);
    pw_layout_result_free(&res);
    pw_layout_result_free(&all);
    pw_layout_forecaster_destroy(f);
    hwloc_topology_destroy(topo);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

int main(int argc, char **argv)
{
    const char *graphs = arg_str(argc, argv, "--graphs",
                                 "examples/fashion_mlp.graph,tests/fixtures/graphs/mlp_2048x4.graph,"
                                 "examples/tiny_gpt_quick.graph,examples/tiny_gpt.graph");
    const char *batches = arg_str(argc, argv, "--batches", "256,256,32,8");
    const char *datas = arg_str(argc, argv, "--data", NULL);
    const int max_m = (int)arg_int(argc, argv, "--max-m", 16);
    const int steps = (int)arg_int(argc, argv, "--steps", 3);
    const int rounds = (int)arg_int(argc, argv, "--rounds", 2);
    if (max_m < 1 || steps < 1 || rounds < 1 || rounds > MAX_ROUNDS) {
        fprintf(stderr, "bench_layouts: bad arguments\n");
        return 2;
    }
    loadavg("at the start");
    printf("%d cores; every layout: 1 warm-up step, median of %d steps, median over %d rounds taken in turn\n",
           pw_available_cores(), steps, rounds);
    for (int k = 0;; k++) {
        char gb[512], bb[32], db[256];
        const char *path = item(graphs, k, gb, sizeof gb, NULL);
        if (!path) break;
        const int64_t batch = atoll(item(batches, k, bb, sizeof bb, "64"));
        pw_graph *g;
        if (pw_graph_parse_file(path, &g) != PW_OK) die(path);
        const int tokens = g->input >= 0 && g->values[g->input].dtype == PW_I32;
        pw_graph_destroy(g);
        const char *data = item(datas, k, db, sizeof db, tokens ? "text:fortunes" : "fashion-mnist");
        bench_graph(path, batch, data, max_m, steps, rounds);
    }
    loadavg("at the end");
    return 0;
}
