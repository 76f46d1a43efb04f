/* Tests: data-parallel replicas in one process (stages/train/pipeline.h with
 * replicas > 1): R replicas train like one with the same global batch,
 * bucketing and thread timing do not change a bit, the loss is averaged
 * once, global-norm clipping, and bucketed all-reduces overlap the backward
 * (the trace's exposed all-reduce time drops).
 *
 * Every test has the same .timeout: Criterion reports a spurious leak under
 * LeakSanitizer when timeouts differ within a file. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/safetensors.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/train/trainer.h"
#include "tests/pipeline_support.h"
#include "tests/test_helpers.h"

#define TIMEOUT 240

/* ------------------------------------------------- ThreadSanitizer builds */

#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer */

static const char *MLP = "graph r_mlp\n" PW_TEST_MLP_BODY;

static pw_graph *parse(const char *text) { return test_parse(text, "r.graph"); }

static pw_dataset *data(int64_t n, int d0, int d1, int classes)
{
    pw_synthetic_config sc = {.n = n, .sample_shape = {.ndim = 2, .d = {d0, d1}}, .n_classes = classes,
                              .seed = 3, .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

typedef struct run_cfg {
    int stages, replicas, micro, buckets, split_w;
    pw_schedule_kind kind;
    pw_optim_kind optim;
    double clip;
    int64_t batch;
    int steps;
    int64_t trace_events;
} run_cfg;

static pw_pipeline *make(const pw_graph *g, const pw_dataset *d, const run_cfg *rc)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = rc->batch;
    pc.micro_batches = rc->micro;
    pc.stages = rc->stages;
    pc.schedule = rc->kind;
    pc.split_w = rc->split_w;
    pc.partition = PW_PARTITION_FLOPS;
    pc.optim = pw_optim_defaults(rc->optim);
    pc.seed = 7;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.check = 1;
    pc.watchdog_s = 60;
    pc.replicas = rc->replicas;
    pc.buckets = rc->buckets;
    pc.clip_grad_norm = rc->clip;
    pc.trace_events = rc->trace_events;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    return pl;
}

/* Trains rc->steps steps; returns replica 0's parameters and (optional) the
 * losses. Checks every replica holds the same parameters. */
static float *train(const pw_graph *g, const pw_dataset *d, const run_cfg *rc, int64_t *n, double *losses)
{
    pw_pipeline *pl = make(g, d, rc);
    for (int i = 0; i < rc->steps; i++) {
        pw_step_stats s;
        cr_assert_eq(pw_pipeline_step(pl, &s), PW_OK, "step %d: %s", i + 1, pw_last_error());
        if (losses) losses[i] = s.loss;
    }
    float *p0 = test_replica_params(pl, 0, g, n);
    for (int k = 1; k < rc->replicas; k++) {
        int64_t nk;
        float *pk = test_replica_params(pl, k, g, &nk);
        cr_assert_eq(memcmp(p0, pk, (size_t)nk * 4), 0, "replica %d's parameters differ from replica 0's", k);
        free(pk);
    }
    pw_pipeline_destroy(pl);
    return p0;
}

/* The largest difference within any parameter tensor relative to that
 * tensor's largest magnitude (max-norm): a bias that starts at zero has no
 * scale of its own, its tensor does. */
static double max_rel_diff(const pw_graph *g, const float *a, const float *b, int64_t *at)
{
    double worst = 0.0;
    int64_t off = 0;
    for (int p = 0; p < g->n_params; p++) {
        int64_t n = pw_shape_numel(&g->params[p].shape);
        double scale = 0.0, diff = 0.0;
        int64_t where = off;
        for (int64_t i = off; i < off + n; i++) {
            scale = fmax(scale, fmax(fabs((double)a[i]), fabs((double)b[i])));
            double d = fabs((double)a[i] - (double)b[i]);
            if (d > diff) {
                diff = d;
                where = i;
            }
        }
        double r = scale > 0 ? diff / scale : diff;
        if (r > worst) {
            worst = r;
            *at = where;
        }
        off += n;
    }
    return worst;
}

/* ---- R replicas against one, the same global batch ---- */

typedef struct rep_case {
    pw_schedule_kind kind;
    int split_w, stages, replicas, buckets;
} rep_case;

ParameterizedTestParameters(replicas, match_one_replica)
{
    static rep_case cases[] = {
        {PW_SCHEDULE_1F1B, 0, 1, 2, 4},  {PW_SCHEDULE_1F1B, 0, 2, 2, 4}, {PW_SCHEDULE_1F1B, 1, 2, 2, 3},
        {PW_SCHEDULE_GPIPE, 0, 3, 2, 1}, {PW_SCHEDULE_1F1B, 0, 2, 4, 2}, {PW_SCHEDULE_GPIPE, 1, 1, 3, 4},
        {PW_SCHEDULE_ZB_H1, 1, 2, 2, 2},
    };
    return cr_make_param_array(rep_case, cases, sizeof cases / sizeof cases[0]);
}

ParameterizedTest(rep_case *c, replicas, match_one_replica, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data(384, 4, 6, 5);
    run_cfg one = {.stages = 1, .replicas = 1, .micro = 2, .kind = PW_SCHEDULE_1F1B,
                   .optim = PW_OPTIM_SGD, .batch = 48, .steps = 6};
    run_cfg many = one;
    many.stages = c->stages;
    many.replicas = c->replicas;
    many.buckets = c->buckets;
    many.kind = c->kind;
    many.split_w = c->split_w;
    double l1[6], lr[6];
    int64_t n1, nr, at = -1;
    float *ref = train(g, d, &one, &n1, l1);
    float *got = train(g, d, &many, &nr, lr);
    cr_assert_eq(n1, nr);
    double worst = max_rel_diff(g, ref, got, &at);
    cr_log_info("%s split_w=%d S=%d R=%d buckets=%d: max relative difference %.3g", pw_schedule_kind_name(c->kind),
                c->split_w, c->stages, c->replicas, c->buckets, worst);
    cr_assert_leq(worst, 1e-6, "%s split_w=%d S=%d R=%d buckets=%d: parameters differ by %.3g relative "
                  "(element %lld: %.9g vs %.9g)", pw_schedule_kind_name(c->kind), c->split_w, c->stages,
                  c->replicas, c->buckets, worst, (long long)at, ref[at], got[at]);
    for (int i = 0; i < 6; i++)
        cr_assert_leq(fabs(l1[i] - lr[i]), 1e-6 * fabs(l1[i]), "step %d: loss %.9g with one replica, %.9g "
                      "with %d", i + 1, l1[i], lr[i], c->replicas);
    free(ref);
    free(got);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The ring's order is fixed: runs repeat bit for bit whatever the threads
 * do, AdamW included; and with two replicas (a + b = b + a) the bucket count
 * cannot change a bit either. */
Test(replicas, deterministic_and_bucket_independent, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data(384, 4, 6, 5);
    run_cfg rc = {.stages = 2, .replicas = 3, .micro = 2, .buckets = 3, .kind = PW_SCHEDULE_1F1B,
                  .optim = PW_OPTIM_ADAMW, .batch = 48, .steps = 4};
    int64_t n, n2;
    float *a = train(g, d, &rc, &n, NULL);
    float *b = train(g, d, &rc, &n2, NULL);
    cr_assert_eq(memcmp(a, b, (size_t)n * 4), 0, "two runs of 2 stages x 3 replicas differ");
    free(a);
    free(b);
    rc.replicas = 2;
    rc.batch = 32;
    a = train(g, d, &rc, &n, NULL);
    rc.buckets = 1;
    b = train(g, d, &rc, &n2, NULL);
    cr_assert_eq(memcmp(a, b, (size_t)n * 4), 0, "2 replicas: 3 buckets and 1 bucket differ");
    rc.stages = 1;
    rc.buckets = 4;
    float *c = train(g, d, &rc, &n2, NULL);
    cr_assert_eq(memcmp(a, c, (size_t)n * 4), 0, "2 replicas: 2 stages and 1 stage differ");
    free(a);
    free(b);
    free(c);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(replicas, bad_configurations, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data(384, 4, 6, 5);
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 20;
    pc.micro_batches = 2;
    pc.replicas = 3;
    pc.pin = 0;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "replicas x micro-batches"), "%s", pw_last_error());
    pc.batch = 24;
    pc.clip_grad_norm = -1;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- global-norm clipping ---- */

/* With plain SGD (no momentum, no decay) a clipped step moves the
 * parameters by exactly lr × max_norm in L2; the norm is the same however
 * the model is split. */
Test(replicas, clip_grad_norm, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data(384, 4, 6, 5);
    static const int shapes[][2] = {{1, 1}, {2, 1}, {1, 2}, {3, 2}};
    double norms[4];
    for (int i = 0; i < 4; i++) {
        run_cfg rc = {.stages = shapes[i][0], .replicas = shapes[i][1], .micro = 2, .buckets = 2,
                      .kind = PW_SCHEDULE_1F1B, .optim = PW_OPTIM_SGD, .batch = 48, .steps = 0,
                      .clip = 0.01};
        pw_pipeline_config pc;
        (void)pc;
        pw_pipeline *pl = make(g, d, &rc);
        int64_t n;
        float *before = test_replica_params(pl, 0, g, &n);
        cr_assert_lt(pw_pipeline_grad_norm(pl), 0.0, "no norm before the first step");
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        norms[i] = pw_pipeline_grad_norm(pl);
        float *after = test_replica_params(pl, 0, g, &n);
        double moved = 0.0;
        for (int64_t k = 0; k < n; k++) moved += ((double)after[k] - before[k]) * ((double)after[k] - before[k]);
        moved = sqrt(moved);
        const double lr = pw_optim_defaults(PW_OPTIM_SGD).lr;
        cr_assert_gt(norms[i], 0.01, "the test needs a norm above the clip (got %g)", norms[i]);
        cr_assert_leq(fabs(moved - lr * 0.01), 1e-3 * lr * 0.01, "S=%d R=%d: the step moved %.9g, expected "
                      "lr x max_norm = %.9g (norm %g)", rc.stages, rc.replicas, moved, lr * 0.01, norms[i]);
        free(before);
        free(after);
        pw_pipeline_destroy(pl);
    }
    for (int i = 1; i < 4; i++)
        cr_assert_leq(fabs(norms[i] - norms[0]), 1e-6 * norms[0], "norm %.12g (S=%d R=%d) vs %.12g (one stage)",
                      norms[i], shapes[i][0], shapes[i][1], norms[0]);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- overlap, read from the trace ---- */

/* Heavy enough that an all-reduce is measurable: 4 × 768×768 linears. */
static const char *WIDE =
    "graph r_wide\n"
    "input x : f32[256]\n"
    "label y : i32[]\n"
    "h0 = linear(x, out=768)\n"
    "a0 = relu(h0)\n"
    "h1 = linear(a0, out=768)\n"
    "a1 = relu(h1)\n"
    "h2 = linear(a1, out=768)\n"
    "a2 = relu(h2)\n"
    "h3 = linear(a2, out=768)\n"
    "a3 = relu(h3)\n"
    "h4 = linear(a3, out=768)\n"
    "a4 = relu(h4)\n"
    "logits = linear(a4, out=10) as head\n"
    "loss = softmax_cross_entropy(logits, y)\n";

/* Sum of the durations (µs) of events named `name` in the trace file, after
 * the first `skip` steps. */
static double sum_events(const char *path, const char *name, int skip, int *count)
{
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    cr_assert_not_null(root, "%s: %s", path, err.text);
    json_t *evs = json_object_get(root, "traceEvents");
    double sum = 0.0;
    *count = 0;
    size_t i;
    json_t *ev;
    json_array_foreach(evs, i, ev) {
        const char *n = json_string_value(json_object_get(ev, "name"));
        json_t *args = json_object_get(ev, "args");
        if (!n || strcmp(n, name) != 0 || !args) continue;
        if (json_integer_value(json_object_get(args, "step")) <= skip) continue;
        sum += json_number_value(json_object_get(ev, "dur"));
        (*count)++;
    }
    json_decref(root);
    return sum;
}

/* Per worker track and step (after the first `skip`): whether the step's
 * first bucket was queued for its all-reduce while the backward still had
 * work to do. An ALLREDUCE event starts when the worker queued the bucket,
 * right after the backward of the bucket's piece (the last layers' piece
 * first, the first layers' piece last, at the end of the backward), on the
 * worker's own clock and in its program order: the first queue time lies
 * before the last one and before the end of the step's last backward event
 * whatever the machine's load. Returns the number of (track, step) pairs
 * where that holds and sets *pairs to the number seen. */
static int overlapped_steps(const char *path, int skip, int *pairs)
{
    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    cr_assert_not_null(root, "%s: %s", path, err.text);
    json_t *evs = json_object_get(root, "traceEvents");
    enum { TRACKS = 8, STEPS = 16 };
    double bwd_end[TRACKS][STEPS] = {{0}}, ar_first[TRACKS][STEPS], ar_last[TRACKS][STEPS] = {{0}};
    for (int t = 0; t < TRACKS; t++)
        for (int k = 0; k < STEPS; k++) ar_first[t][k] = 1e300;
    size_t i;
    json_t *ev;
    json_array_foreach(evs, i, ev) {
        const char *n = json_string_value(json_object_get(ev, "name"));
        json_t *args = json_object_get(ev, "args");
        if (!n || !args) continue;
        json_int_t step = json_integer_value(json_object_get(args, "step"));
        json_int_t tid = json_integer_value(json_object_get(ev, "tid"));
        if (step <= skip || step >= STEPS || tid < 0 || tid >= TRACKS) continue;
        double ts = json_number_value(json_object_get(ev, "ts"));
        double dur = json_number_value(json_object_get(ev, "dur"));
        if (strcmp(n, "B") == 0 || strcmp(n, "W") == 0) {
            if (ts + dur > bwd_end[tid][step]) bwd_end[tid][step] = ts + dur;
        } else if (strcmp(n, "ALLREDUCE") == 0) {
            if (ts < ar_first[tid][step]) ar_first[tid][step] = ts;
            if (ts > ar_last[tid][step]) ar_last[tid][step] = ts;
        }
    }
    json_decref(root);
    int over = 0;
    *pairs = 0;
    for (int t = 0; t < TRACKS; t++)
        for (int k = 0; k < STEPS; k++) {
            if (bwd_end[t][k] == 0 || ar_first[t][k] == 1e300) continue;
            (*pairs)++;
            if (ar_first[t][k] < ar_last[t][k] && ar_first[t][k] < bwd_end[t][k]) over++;
        }
    return over;
}

static void bucket_trace(const pw_graph *g, const pw_dataset *d, int buckets, char *path, size_t cap)
{
    run_cfg rc = {.stages = 1, .replicas = 2, .micro = 1, .buckets = buckets, .kind = PW_SCHEDULE_1F1B,
                  .optim = PW_OPTIM_SGD, .batch = 256, .steps = 4, .trace_events = 4096};
    pw_pipeline *pl = make(g, d, &rc);
    for (int i = 0; i < rc.steps; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    snprintf(path, cap, "/tmp/pw_test_overlap_%d_%d.json", (int)getpid(), buckets);
    cr_assert_eq(pw_pipeline_write_trace(pl, path), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
    int n_ar;
    sum_events(path, "ALLREDUCE", 1, &n_ar);
    cr_assert_eq(n_ar, 2 * (rc.steps - 1) * buckets, "%d ALLREDUCE events, expected one per bucket, replica "
                 "and step", n_ar);
}

/* With 4 buckets the first bucket's all-reduce is queued while the rest of
 * the backward still runs, in every step on every replica; with one bucket
 * there is nothing to queue early. Checked as an ordering in the trace, not
 * as time saved (on a loaded 2-core machine any timing here is noise). */
Test(replicas, buckets_overlap_the_backward, .timeout = TIMEOUT)
{
    pw_graph *g = parse(WIDE);
    pw_synthetic_config sc = {.n = 1024, .sample_shape = {.ndim = 1, .d = {256}}, .n_classes = 10,
                              .seed = 3, .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    char path[96];
    int pairs;
    bucket_trace(g, d, 4, path, sizeof path);
    int over = overlapped_steps(path, 1, &pairs);
    unlink(path);
    cr_assert_eq(pairs, 2 * 3, "%d (replica, step) pairs in the trace", pairs);
    cr_assert_eq(over, pairs, "4 buckets: only %d of %d (replica, step) pairs queued an all-reduce "
                 "before their backward ended", over, pairs);
    bucket_trace(g, d, 1, path, sizeof path);
    over = overlapped_steps(path, 1, &pairs);
    unlink(path);
    cr_assert_eq(pairs, 2 * 3);
    cr_assert_eq(over, 0, "1 bucket: %d of %d steps queued two all-reduces", over, pairs);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- pipeline-run's flags ---- */

static int run_tool(const char *args, char **out)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "cd /tmp && '%s/pipeline-run' %s 2>&1", PW_BINARY_DIR, args);
    return test_run(cmd, out);
}

Test(replicas, cli_flags, .timeout = TIMEOUT)
{
    char graph[64], args[1024], *o;
    snprintf(graph, sizeof graph, "/tmp/pw_test_replicas_%d.graph", (int)getpid());
    FILE *f = fopen(graph, "w");
    cr_assert_not_null(f);
    fputs(MLP, f);
    fclose(f);
    cr_assert_eq(run_tool("--help", &o), 0);
    const char *flags[] = {"--replicas", "--buckets", "--clip-grad-norm", "--allreduce"};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        cr_assert(strstr(o, flags[i]), "--help does not mention %s", flags[i]);
    free(o);

    snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --no-pin --replicas 2 --batch 30 "
             "--micro-batches 2", graph);
    cr_assert_eq(run_tool(args, &o), 2, "%s", o);
    cr_assert(strstr(o, "not divisible by --replicas 2 x --micro-batches 2"), "%s", o);
    free(o);
    snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --allreduce ring", graph);
    cr_assert_eq(run_tool(args, &o), 2, "%s", o);
    cr_assert(strstr(o, "--allreduce applies to runs under mpirun (and to --simulate) only"), "%s", o);
    free(o);
    snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --replicas 0", graph);
    cr_assert_eq(run_tool(args, &o), 2, "%s", o);
    free(o);

    /* Two replicas and one, the same global batch, through the tool: the
     * saved weights agree to 1e-6. */
    char a[96], b[96];
    snprintf(a, sizeof a, "/tmp/pw_test_replicas_%d_a.st", (int)getpid());
    snprintf(b, sizeof b, "/tmp/pw_test_replicas_%d_b.st", (int)getpid());
    snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --no-pin --stages 2 --replicas 2 --buckets 2 "
             "--batch 32 --micro-batches 2 --steps 6 --clip-grad-norm 10 --save %s", graph, a);
    cr_assert_eq(run_tool(args, &o), 0, "%s", o);
    cr_assert(strstr(o, "2 replicas, each 16 samples of every batch"), "%s", o);
    cr_assert(strstr(o, "grad norm"), "%s", o);
    free(o);
    snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --no-pin --stages 1 --batch 32 "
             "--micro-batches 2 --steps 6 --clip-grad-norm 10 --save %s --quiet", graph, b);
    cr_assert_eq(run_tool(args, &o), 0, "%s", o);
    free(o);
    char why[256]; /* every element within 1e-6 of its tensor's largest in a */
    cr_assert(test_compare_tensors(b, a, 1e-6, 0, why, sizeof why), "%s", why);
    unlink(a);
    unlink(b);
    unlink(graph);
}
