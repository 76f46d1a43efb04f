/* Tests for the helpers a custom trainer uses: a graph program as an engine
 * chunk (stages/train/program_stage.h) and the engine driven from a schedule
 * name, a micro-batch count and a stage table (scheduler/runner.h).
 *
 * The reference is pw_pipeline on the same layout (the same cuts, schedule,
 * micro-batches, replicas and seed): the programs run through the runner
 * must end with the same parameter bits and the same loss. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/partition.h"
#include "scheduler/analysis/trace_analysis.h"
#include "scheduler/runner.h"
#include "stages/train/pipeline.h"
#include "stages/train/program_stage.h"
#include "tests/pipeline_support.h"

#define TIMEOUT 60

#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer */

static const char *MLP = "graph ex_mlp\n" PW_TEST_MLP_BODY;
static const char *DROP_MLP = "graph ex_drop\n"
                              "input image : f32[4, 6]\n"
                              "label target : i32[]\n"
                              "x = flatten(image)\n"
                              "fc1 = linear(x, out=24)\n"
                              "h1 = relu(fc1)\n"
                              "d1 = dropout(h1, p=0.25)\n"
                              "fc2 = linear(d1, out=24)\n"
                              "h2 = gelu(fc2)\n"
                              "logits = linear(h2, out=5) as head\n"
                              "loss = softmax_cross_entropy(logits, target)\n";
static const int STEPS = 3;
static const int64_t BATCH = 24; /* a multiple of every R x M below */
static const uint64_t SEED = 7;

static pw_dataset *data(void)
{
    pw_synthetic_config sc = {.n = 256, .sample_shape = {.ndim = 2, .d = {4, 6}},
                              .n_classes = 5, .seed = 3, .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

/* ---------------------------------------------------------- the model side */

/* What make needs: the graph, the data, the layout; it keeps every chunk's
 * program and stage so that the test can read them after the run. */
typedef struct model {
    const pw_graph *g;
    const pw_dataset *d;
    int micro_batches, replicas;
    int use_load;                    /* 1: feed the data through a load function */
    int *cuts;                       /* [n_chunks + 1], made on the first call */
    int n_chunks;
    pw_program **progs;              /* [replicas × n_chunks] */
    pw_program_stage **stages;
    pw_optim_config optim;
} model;

/* The load function: the same samples pw_pipeline takes, by hand. */
static pw_status load(void *arg, int64_t step, int replica, int mb, int64_t rows, void *x, int32_t *y)
{
    const model *m = arg;
    pw_sampler s;
    PW_CHECK(pw_sampler_init(&s, m->d->n, 1, SEED));
    const int64_t spe = m->d->n / BATCH;
    pw_sampler_epoch(&s, (int)((step - 1) / spe));
    const int64_t first = ((step - 1) % spe) * BATCH + replica * (BATCH / m->replicas) + mb * rows;
    pw_status st = pw_dataset_gather(m->d, s.order + first, rows, x, y);
    pw_sampler_free(&s);
    return st;
}

static pw_status make(void *user, const pw_chunk_spec *c, pw_engine_chunk *out)
{
    model *m = user;
    if (!m->cuts) {
        pw_partition part;
        PW_CHECK(pw_partition_make(m->g, c->n_chunks, PW_PARTITION_FLOPS, &part));
        m->n_chunks = c->n_chunks;
        m->cuts = malloc(((size_t)c->n_chunks + 1) * sizeof *m->cuts);
        m->progs = calloc((size_t)c->replicas * (size_t)c->n_chunks, sizeof *m->progs);
        m->stages = calloc((size_t)c->replicas * (size_t)c->n_chunks, sizeof *m->stages);
        cr_assert(m->cuts && m->progs && m->stages);
        memcpy(m->cuts, part.begin, ((size_t)c->n_chunks + 1) * sizeof *m->cuts);
        pw_partition_free(&part);
    }
    const int i = c->replica * c->n_chunks + c->chunk;
    int K; /* pw_pipeline's gradient groups: the same summation tree */
    pw_grad_groups(0, c->replicas, c->micro_batches, &K);
    pw_program_config pc = {.graph = m->g, .node_begin = m->cuts[c->chunk], .node_end = m->cuts[c->chunk + 1],
                            .micro_batch = BATCH / (c->replicas * c->micro_batches), .loss_batch = BATCH,
                            .slots = c->slots, .optim = m->optim, .micro_batches = c->micro_batches,
                            .grad_groups = K};
    PW_CHECK(pw_program_create(&pc, &m->progs[i]));
    pw_program_init_params(m->progs[i], SEED);
    pw_program_stage_config sc = {.program = m->progs[i], .batch = BATCH, .micro_batches = c->micro_batches,
                                  .replica = c->replica, .replicas = c->replicas, .seed = SEED,
                                  .shuffle = 1};
    if (m->use_load) {
        sc.load = load;
        sc.load_arg = m;
    } else {
        sc.data = m->d;
    }
    pw_status st = pw_program_stage_create(&sc, &m->stages[i]);
    if (st != PW_OK) {
        pw_program_destroy(m->progs[i]);
        m->progs[i] = NULL;
        return st;
    }
    *out = pw_program_stage_chunk(m->stages[i]);
    return PW_OK;
}

static void model_free(model *m)
{
    for (int i = 0; m->progs && i < m->replicas * m->n_chunks; i++) {
        pw_program_stage_destroy(m->stages[i]);
        pw_program_destroy(m->progs[i]);
    }
    free(m->progs);
    free(m->stages);
    free(m->cuts);
}

/* Every parameter of replica k in graph order. */
static float *model_params(const model *m, int k, int64_t *count)
{
    const pw_graph *g = m->g;
    int64_t total = 0;
    for (int i = 0; i < g->n_params; i++) total += pw_shape_numel(&g->params[i].shape);
    float *out = calloc((size_t)total + 1, sizeof *out);
    cr_assert_not_null(out);
    int64_t off = 0;
    for (int i = 0; i < g->n_params; i++) {
        int found = 0;
        for (int c = 0; c < m->n_chunks && !found; c++) {
            pw_program *p = m->progs[k * m->n_chunks + c];
            for (int j = 0; j < pw_program_n_params(p) && !found; j++) {
                pw_program_param pp;
                pw_program_param_at(p, j, &pp);
                if (pp.graph_param != i) continue;
                memcpy(out + off, pp.data, (size_t)pp.numel * sizeof *out);
                found = 1;
            }
        }
        cr_assert(found, "parameter %s held by no chunk", g->params[i].name);
        off += pw_shape_numel(&g->params[i].shape);
    }
    *count = total;
    return out;
}

static void assert_same_bits(const float *got, const float *ref, int64_t n, const char *what)
{
    int64_t first = -1, ndiff = 0;
    float maxerr = 0;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&got[i], &ref[i], sizeof *got) != 0) {
            if (first < 0) first = i;
            ndiff++;
            float e = got[i] > ref[i] ? got[i] - ref[i] : ref[i] - got[i];
            if (e > maxerr) maxerr = e;
        }
    cr_assert_eq(ndiff, 0, "%s: %lld of %lld parameters differ (first at %lld: %.9g vs "
                 "%.9g; max error %g)", what, (long long)ndiff, (long long)n, (long long)first,
                 first >= 0 ? got[first] : 0.0, first >= 0 ? ref[first] : 0.0, maxerr);
}

/* ------------------------------------------------------ against pw_pipeline */

typedef struct ex_case {
    pw_schedule_kind kind;
    int stages, micro_batches, replicas;
    int pipeline_buckets;    /* the reference's buckets (0: its default, 4) */
    int use_load;
    int dropout;
} ex_case;

ParameterizedTestParameters(examples_api, programs_through_runner_match_pipeline)
{
    static ex_case cases[40];
    int n = 0;
    for (int k = PW_SCHEDULE_GPIPE; k <= PW_SCHEDULE_ZB_V; k++)
        for (int s = 1; s <= 3; s += 2)
            cases[n++] = (ex_case){(pw_schedule_kind)k, s, s == 3 ? 6 : 4, 1, 0, 0, 0};
    /* replicas: one bucket per chunk matches for any count; the pipeline's
     * default buckets for two (a + b = b + a) */
    cases[n++] = (ex_case){PW_SCHEDULE_1F1B, 2, 2, 2, 0, 0, 0};
    cases[n++] = (ex_case){PW_SCHEDULE_ZB_V, 2, 2, 2, 0, 0, 0};
    cases[n++] = (ex_case){PW_SCHEDULE_GPIPE, 2, 2, 4, 1, 0, 0};
    cases[n++] = (ex_case){PW_SCHEDULE_INTERLEAVED, 2, 2, 4, 1, 0, 0};
    /* data through a load function; dropout's randomness */
    cases[n++] = (ex_case){PW_SCHEDULE_1F1B, 2, 4, 1, 0, 1, 0};
    cases[n++] = (ex_case){PW_SCHEDULE_ZB_H1, 2, 4, 2, 0, 0, 1};
    cases[n++] = (ex_case){PW_SCHEDULE_GPIPE, 3, 4, 1, 0, 1, 1};
    return cr_make_param_array(ex_case, cases, (size_t)n);
}

ParameterizedTest(ex_case *c, examples_api, programs_through_runner_match_pipeline, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(c->dropout ? DROP_MLP : MLP, "ex.graph");
    pw_dataset *d = data();
    char what[128];
    snprintf(what, sizeof what, "%s S=%d M=%d R=%d%s%s", pw_schedule_kind_name(c->kind), c->stages,
             c->micro_batches, c->replicas, c->use_load ? " (load)" : "", c->dropout ? " (dropout)" : "");

    /* The programs through the runner. */
    model m = {.g = g, .d = d, .micro_batches = c->micro_batches, .replicas = c->replicas,
               .use_load = c->use_load, .optim = pw_optim_defaults(PW_OPTIM_ADAMW)};
    pw_runner_config rc = pw_runner_defaults();
    rc.schedule = pw_schedule_kind_name(c->kind);
    rc.micro_batches = c->micro_batches;
    rc.table = (pw_stage_table){.stages = c->stages, .replicas = c->replicas, .make = make, .user = &m};
    rc.pin = 0;
    rc.check = 1;
    rc.watchdog_s = 30;
    pw_runner *r;
    cr_assert_eq(pw_runner_create(&rc, &r), PW_OK, "%s: %s", what, pw_last_error());
    double loss[3];
    for (int i = 0; i < STEPS; i++) {
        cr_assert_eq(pw_runner_step(r), PW_OK, "%s: %s", what, pw_last_error());
        loss[i] = 0.0;
        for (int k = 0; k < c->replicas; k++)
            for (int ch = 0; ch < m.n_chunks; ch++) {
                double l;
                if (pw_program_stage_loss(m.stages[k * m.n_chunks + ch], &l, NULL)) loss[i] += l;
            }
        loss[i] /= (double)BATCH;
    }
    cr_assert_eq(pw_runner_steps_done(r), STEPS);
    pw_runner_destroy(r);

    /* The reference: pw_pipeline on the same cuts. */
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = BATCH;
    pc.micro_batches = c->micro_batches;
    pc.stages = c->stages;
    pc.schedule = c->kind;
    pc.cuts = m.cuts;
    pc.n_cuts = m.n_chunks + 1;
    pc.replicas = c->replicas;
    pc.buckets = c->pipeline_buckets;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.seed = SEED;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.watchdog_s = 30;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s: %s", what, pw_last_error());
    for (int i = 0; i < STEPS; i++) {
        pw_step_stats st;
        cr_assert_eq(pw_pipeline_step(pl, &st), PW_OK, "%s: %s", what, pw_last_error());
        cr_assert(memcmp(&st.loss, &loss[i], sizeof loss[i]) == 0, "%s: step %d loss %.17g, pipeline %.17g",
                  what, i + 1, loss[i], st.loss);
    }
    for (int k = 0; k < c->replicas; k++) {
        int64_t n_ref, n;
        float *ref = test_replica_params(pl, k, g, &n_ref);
        float *got = model_params(&m, k, &n);
        cr_assert_eq(n, n_ref);
        assert_same_bits(got, ref, n, what);
        free(got);
        free(ref);
    }
    pw_pipeline_destroy(pl);
    model_free(&m);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* One bucket per parameter: every parameter is summed across the replicas
 * the same way whatever the cuts, so with three replicas (where the order of
 * addition matters) two stages still give one stage's bits. */
static float *train_buckets_per_param(const pw_graph *g, const pw_dataset *d, const char *schedule, int S,
                                      int R, int64_t *n)
{
    model m = {.g = g, .d = d, .micro_batches = 2, .replicas = R, .optim = pw_optim_defaults(PW_OPTIM_ADAMW)};
    pw_runner_config rc = pw_runner_defaults();
    rc.schedule = schedule;
    rc.micro_batches = 2;
    rc.table = (pw_stage_table){.stages = S, .replicas = R, .make = make, .user = &m};
    rc.buckets = g->n_params;
    rc.pin = 0;
    rc.check = 1;
    pw_runner *r;
    cr_assert_eq(pw_runner_create(&rc, &r), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < STEPS; i++) cr_assert_eq(pw_runner_step(r), PW_OK, "%s", pw_last_error());
    pw_runner_destroy(r);
    float *p = model_params(&m, R - 1, n);
    model_free(&m);
    return p;
}

Test(examples_api, bucket_per_parameter_matches_one_stage_with_three_replicas, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(MLP, "ex.graph");
    pw_dataset *d = data();
    int64_t n_ref, n;
    float *ref = train_buckets_per_param(g, d, "gpipe", 1, 3, &n_ref);
    float *got = train_buckets_per_param(g, d, "zb-v", 2, 3, &n);
    cr_assert_eq(n, n_ref);
    assert_same_bits(got, ref, n, "zb-v S=2 R=3, a bucket per parameter, against one stage");
    free(got);
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ------------------------------------------------ one call, traces, errors */

/* The smallest chunk: no ports, counts its calls. */
typedef struct counter {
    int forwards, backwards, optims;
} counter;
static pw_status c_fwd(void *self, int mb, int slot)
{
    (void)mb, (void)slot;
    ((counter *)self)->forwards++;
    return PW_OK;
}
static pw_status c_bwd(void *self, int mb, int slot)
{
    (void)mb, (void)slot;
    ((counter *)self)->backwards++;
    return PW_OK;
}
static pw_status c_opt(void *self, long step)
{
    (void)step;
    ((counter *)self)->optims++;
    return PW_OK;
}
static int c_bucket(void *self, int b, int n, pw_span *spans, int max)
{
    (void)self, (void)b, (void)n, (void)spans, (void)max;
    return 0;
}
static const pw_stage_i counter_i = {.name = "counter", .forward = c_fwd, .backward_input = c_bwd,
                                     .optimizer_step = c_opt, .grad_bucket = c_bucket};

typedef struct counters {
    counter c[16];
    int made, unmade, fail_chunk;
} counters;

static pw_status c_make(void *user, const pw_chunk_spec *s, pw_engine_chunk *out)
{
    counters *cs = user;
    if (s->chunk == cs->fail_chunk) return pw_error(PW_ERR_INVALID_ARG, "no chunk %d today", s->chunk);
    cr_assert(s->slots >= 1 && s->slots <= s->micro_batches);
    cr_assert_eq(s->rank, pw_schedule_rank_of(s->schedule, s->chunk));
    cs->made++;
    *out = (pw_engine_chunk){&counter_i, &cs->c[s->replica * s->n_chunks + s->chunk]};
    return PW_OK;
}
static void c_unmake(void *user, const pw_chunk_spec *s, pw_engine_chunk *chunk)
{
    (void)s, (void)chunk;
    ((counters *)user)->unmade++;
}

Test(examples_api, run_simple_runs_every_chunk, .timeout = TIMEOUT)
{
    counters cs = {.fail_chunk = -1};
    pw_stage_table t = {.stages = 2, .make = c_make, .unmake = c_unmake, .user = &cs};
    cr_assert_eq(pw_engine_run_simple("interleaved", 4, &t, 3), PW_OK, "%s", pw_last_error());
    cr_assert_eq(cs.made, 4, "interleaved on 2 stages: 4 chunks");
    cr_assert_eq(cs.unmade, 4);
    for (int c = 0; c < 4; c++) {
        cr_assert_eq(cs.c[c].forwards, 3 * 4, "chunk %d", c);
        cr_assert_eq(cs.c[c].backwards, 3 * 4, "chunk %d", c);
        cr_assert_eq(cs.c[c].optims, 3, "chunk %d", c);
    }
}

Test(examples_api, runner_writes_a_trace_pipe_trace_reads, .timeout = TIMEOUT)
{
    counters cs = {.fail_chunk = -1};
    pw_runner_config rc = pw_runner_defaults();
    rc.schedule = "zb-h1";
    rc.micro_batches = 4;
    rc.table = (pw_stage_table){.stages = 2, .replicas = 2, .make = c_make, .unmake = c_unmake, .user = &cs};
    rc.trace_events = 4096;
    rc.pin = 0;
    rc.model = "counters";
    rc.micro_batch_size = 8;
    pw_runner *r;
    cr_assert_eq(pw_runner_create(&rc, &r), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_runner_n_chunks(r), 2);
    cr_assert_str_eq(pw_runner_schedule_name(r), "zb-h1");
    cr_assert_not_null(pw_runner_chunk(r, 1, 1));
    cr_assert_null(pw_runner_chunk(r, 2, 0));
    for (int i = 0; i < 2; i++) cr_assert_eq(pw_runner_step(r), PW_OK, "%s", pw_last_error());
    char path[] = "/tmp/pw_runner_trace_XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    cr_assert_eq(pw_runner_write_trace(r, path), PW_OK, "%s", pw_last_error());
    pw_runner_destroy(r);
    cr_assert_eq(cs.unmade, 4, "2 chunks x 2 replicas");

    pw_trace_analysis_config ac = PW_TRACE_ANALYSIS_DEFAULTS;
    pw_trace_analysis *a;
    cr_assert_eq(pw_trace_analyze(path, &ac, &a), PW_OK, "%s", pw_last_error());
    cr_assert(a->has_meta);
    cr_assert_str_eq(a->meta.schedule, "zb-h1");
    cr_assert_str_eq(a->meta.graph, "counters");
    cr_assert_eq(a->meta.ranks, 4, "2 stages x 2 replicas");
    cr_assert_eq(a->meta.replicas, 2);
    cr_assert_eq(a->meta.micro_batches, 4);
    cr_assert_eq(a->meta.steps, 2);
    cr_assert_eq(a->n_ranks, 4);
    cr_assert_eq(a->n_steps, 2);
    cr_assert(a->theory >= 0);
    pw_trace_analysis_destroy(a);
    unlink(path);
}

Test(examples_api, runner_errors_name_the_problem, .timeout = TIMEOUT)
{
    counters cs = {.fail_chunk = -1};
    pw_stage_table t = {.stages = 2, .make = c_make, .unmake = c_unmake, .user = &cs};
    cr_assert_eq(pw_engine_run_simple("zbv2", 4, &t, 1), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "schedule 'zbv2' is not"), "%s", pw_last_error());
    cr_assert_eq(pw_engine_run_simple("interleaved", 3, &t, 1), PW_ERR_INVALID_ARG, "M not a multiple of S");
    cr_assert_eq(cs.made, 0);

    /* A failing make: the chunks made before it are unmade, the error names it. */
    cs.fail_chunk = 1;
    cr_assert_eq(pw_engine_run_simple("1f1b", 4, &t, 1), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "replica 0, chunk 1: no chunk 1 today"), "%s", pw_last_error());
    cr_assert_eq(cs.made, 1);
    cr_assert_eq(cs.unmade, 1);

    /* A table without stages; no table. */
    cs = (counters){.fail_chunk = -1};
    pw_stage_table bad = {.stages = 0, .make = c_make, .user = &cs};
    cr_assert_eq(pw_engine_run_simple("1f1b", 4, &bad, 1), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_engine_run_simple("1f1b", 4, NULL, 1), PW_ERR_INVALID_ARG);
}

Test(examples_api, program_stage_refuses_what_cannot_run, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(MLP, "ex.graph");
    pw_dataset *d = data();
    pw_program_config pc = {.graph = g, .micro_batch = 4, .loss_batch = 16, .slots = 1,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pw_program *p;
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK, "%s", pw_last_error());
    pw_program_stage *s = NULL;
    pw_program_stage_config sc = {.program = p, .batch = 16, .micro_batches = 2, .data = d};
    cr_assert_eq(pw_program_stage_create(&sc, &s), PW_ERR_INVALID_ARG, "4 rows, but 16 / 2 = 8");
    cr_assert(strstr(pw_last_error(), "micro-batches of 4 samples"), "%s", pw_last_error());
    cr_assert_null(s);
    sc.micro_batches = 4;
    sc.data = NULL;
    cr_assert_eq(pw_program_stage_create(&sc, &s), PW_ERR_INVALID_ARG, "reads the input, no data");
    cr_assert(strstr(pw_last_error(), "neither data nor a load function"), "%s", pw_last_error());
    sc.data = d;
    sc.replica = 1;
    cr_assert_eq(pw_program_stage_create(&sc, &s), PW_ERR_INVALID_ARG, "replica 1 of 1");
    sc.replica = 0;
    cr_assert_eq(pw_program_stage_create(&sc, &s), PW_OK, "%s", pw_last_error());
    pw_engine_chunk ch = pw_program_stage_chunk(s);
    cr_assert_eq(ch.self, s);
    cr_assert_not_null(ch.vt->port_bytes);
    cr_assert_eq(ch.vt->port_bytes(ch.self, PW_PORT_ACT_OUT), 0, "the whole graph sends nothing");
    cr_assert_eq(pw_program_stage_program(s), p);
    double l;
    int64_t correct;
    cr_assert_eq(pw_program_stage_loss(s, &l, &correct), 1, "the whole graph holds the loss");
    cr_assert_eq(l, 0.0);
    pw_program_stage_destroy(s);
    pw_program_stage_destroy(NULL);
    pw_program_destroy(p);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}
