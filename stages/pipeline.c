/* pipewright — graph stages on the engine: partition, programs, schedule. */
#include "stages/pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"
#include "runtime/trace.h"
#include "stages/cpu/ops.h"

/* One stage chunk: a program over a node range, plus the data it loads. */
typedef struct gstage {
    pw_pipeline *pl;
    int index;
    pw_program *prog;
    int has_input, has_label, has_loss;
    double *mb_loss;          /* [M]: loss sum of each micro-batch this step */
    int64_t *mb_correct;      /* [M] */
} gstage;

struct pw_pipeline {
    pw_pipeline_config cfg;
    const pw_graph *g;
    int64_t micro;            /* samples per micro-batch */
    int64_t steps_per_epoch;
    int64_t step;             /* steps done */
    pw_sampler sampler;
    int64_t sampler_epoch;
    const int64_t *batch_idx; /* this step's samples, read by the workers */

    pw_partition part;
    pw_schedule *sched;
    pw_schedule_report *rep;
    gstage *stages;
    pw_engine_chunk *chunks;
    pw_engine *engine;
    pw_trace *trace;
    double last_bubble;
    char *schedule_name;
};

pw_pipeline_config pw_pipeline_defaults(void)
{
    pw_pipeline_config c;
    memset(&c, 0, sizeof c);
    c.batch = 64;
    c.micro_batches = 1;
    c.stages = 1;
    c.schedule = PW_SCHEDULE_1F1B;
    c.partition = PW_PARTITION_AUTO;
    c.optim = pw_optim_defaults(PW_OPTIM_SGD);
    c.seed = 1;
    c.watchdog_s = 60.0;
    c.pin = 1;
    return c;
}

/* ---- the stage vtable over a program ---- */

static pw_status gs_forward(void *self, int mb, int slot)
{
    gstage *s = self;
    pw_pipeline *pl = s->pl;
    const int64_t *idx = pl->batch_idx + (int64_t)mb * pl->micro;
    if (s->has_input || s->has_label)
        PW_CHECK(pw_dataset_gather(pl->cfg.train, idx, pl->micro,
                                   s->has_input ? pw_program_value(s->prog, pl->g->input, slot) : NULL,
                                   s->has_label ? pw_program_value(s->prog, pl->g->label, slot) : NULL));
    PW_CHECK(pw_program_forward(s->prog, slot, pl->micro));
    if (s->has_loss) {
        s->mb_loss[mb] = pw_program_loss_sum(s->prog, slot);
        s->mb_correct[mb] = pw_program_correct(s->prog, slot);
    }
    return PW_OK;
}

static pw_status gs_backward_input(void *self, int mb, int slot)
{
    (void)mb;
    gstage *s = self;
    return pw_program_backward_input(s->prog, slot);
}

static pw_status gs_backward_weight(void *self, int mb, int slot)
{
    (void)mb;
    gstage *s = self;
    return pw_program_backward_weight(s->prog, slot);
}

static pw_status gs_optimizer_step(void *self, long step)
{
    gstage *s = self;
    return pw_program_optimizer_step(s->prog, step);
}

static size_t gs_port_bytes(void *self, pw_port port)
{
    gstage *s = self;
    return pw_program_port_bytes(s->prog, port);
}

static pw_status gs_bind(void *self, int slot, pw_port port, void *buf)
{
    gstage *s = self;
    return pw_program_bind_port(s->prog, slot, port, buf);
}

static const pw_stage_i gstage_i = {
    .name = "graph-stage",
    .forward = gs_forward,
    .backward_input = gs_backward_input,
    .backward_weight = gs_backward_weight,
    .optimizer_step = gs_optimizer_step,
    .port_bytes = gs_port_bytes,
    .bind = gs_bind,
};

/* ---- construction ---- */

static pw_status make_schedule(pw_pipeline *pl)
{
    const pw_pipeline_config *c = &pl->cfg;
    if (c->schedule_csv) {
        PW_CHECK(pw_schedule_load_csv(c->schedule_csv, &pl->sched));
        const pw_schedule *s = pl->sched;
        if (s->chunks_per_rank != 1)
            return pw_error(PW_ERR_UNSUPPORTED, "%s: %d chunks per rank; this version runs one "
                            "stage per rank", c->schedule_csv, s->chunks_per_rank);
        if (s->n_ranks != c->stages)
            return pw_error(PW_ERR_INVALID_ARG, "%s: the schedule has %d ranks but --stages is %d",
                            c->schedule_csv, s->n_ranks, c->stages);
        if (s->n_micro != c->micro_batches)
            return pw_error(PW_ERR_INVALID_ARG, "%s: the schedule has %d micro-batches but "
                            "--micro-batches is %d", c->schedule_csv, s->n_micro, c->micro_batches);
        if (s->n_buckets != 0)
            return pw_error(PW_ERR_UNSUPPORTED, "%s: all-reduce buckets need --replicas, which "
                            "this version does not have", c->schedule_csv);
        pl->schedule_name = strdup(c->schedule_csv);
    } else {
        pw_schedule_config sc = {.kind = c->schedule, .n_stages = c->stages,
                                 .n_micro = c->micro_batches, .split_w = c->split_w};
        PW_CHECK(pw_schedule_generate(&sc, &pl->sched));
        PW_CHECK(pw_schedule_lower(pl->sched));
        pl->schedule_name = strdup(pw_schedule_kind_name(c->schedule));
    }
    if (!pl->schedule_name) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    /* Rejected before anything runs, with the rank, position and action. */
    pw_status st = pw_schedule_validate(pl->sched, &pl->rep);
    if (st != PW_OK && c->schedule_csv) return pw_error_prefix(st, "%s: ", c->schedule_csv);
    return st;
}

static int node_range_reads(const pw_graph *g, int begin, int end, int value)
{
    for (int i = begin; i < end; i++)
        for (int k = 0; k < g->nodes[i].n_inputs; k++)
            if (g->nodes[i].inputs[k] == value) return 1;
    return 0;
}

pw_status pw_pipeline_create(const pw_pipeline_config *cfg, pw_pipeline **out)
{
    *out = NULL;
    const pw_pipeline_config *c = cfg;
    if (!c->graph || !c->train)
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: graph and training data are required");
    if (c->stages < 1)
        return pw_error(PW_ERR_INVALID_ARG, "stages must be at least 1 (got %d)", c->stages);
    if (c->micro_batches < 1)
        return pw_error(PW_ERR_INVALID_ARG, "micro-batches must be at least 1 (got %d)",
                        c->micro_batches);
    if (c->batch < 1 || c->batch % c->micro_batches != 0)
        return pw_error(PW_ERR_INVALID_ARG, "batch %lld is not a positive multiple of the %d "
                        "micro-batches", (long long)c->batch, c->micro_batches);
    if (c->batch > c->train->n)
        return pw_error(PW_ERR_INVALID_ARG, "batch %lld is larger than the %lld samples of '%s'",
                        (long long)c->batch, (long long)c->train->n, c->train->name);
    PW_CHECK(pw_trainer_check_data(c->graph, c->train));

    pw_pipeline *pl = calloc(1, sizeof *pl);
    if (!pl) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    pl->cfg = *c;
    pl->g = c->graph;
    pl->micro = c->batch / c->micro_batches;
    pl->steps_per_epoch = c->train->n / c->batch;
    pl->sampler_epoch = -1;
    pw_status st;
    const pw_graph *g = c->graph;
    const int S = c->stages, M = c->micro_batches;

    PW_CHECK_GOTO(pw_sampler_init(&pl->sampler, c->train->n, c->shuffle, c->seed), st, fail);
    PW_CHECK_GOTO(pw_partition_make(g, S, c->partition, &pl->part), st, fail);
    PW_CHECK_GOTO(make_schedule(pl), st, fail);
    pl->cfg.schedule_csv = NULL; /* the caller's string; pl->schedule_name keeps a copy */
    pl->stages = calloc((size_t)S, sizeof *pl->stages);
    pl->chunks = calloc((size_t)S, sizeof *pl->chunks);
    if (!pl->stages || !pl->chunks) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
        goto fail;
    }
    for (int s = 0; s < S; s++) {
        gstage *gs = &pl->stages[s];
        gs->pl = pl;
        gs->index = s;
        int b = pl->part.begin[s], e = pl->part.begin[s + 1];
        pw_program_config pc = {
            .graph = g, .node_begin = b, .node_end = e, .micro_batch = pl->micro,
            .loss_batch = c->batch, .slots = pl->rep->peak_inflight_chunk[s], .optim = c->optim,
        };
        PW_CHECK_GOTO(pw_program_create(&pc, &gs->prog), st, fail);
        pw_program_init_params(gs->prog, c->seed);
        gs->has_input = node_range_reads(g, b, e, g->input);
        gs->has_label = g->label >= 0 && node_range_reads(g, b, e, g->label);
        gs->has_loss = pw_program_has_loss(gs->prog);
        gs->mb_loss = calloc((size_t)M, sizeof(double));
        gs->mb_correct = calloc((size_t)M, sizeof(int64_t));
        if (!gs->mb_loss || !gs->mb_correct) {
            st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
            goto fail;
        }
        pl->chunks[s].vt = &gstage_i;
        pl->chunks[s].self = gs;
    }
    /* One core per stage: BLAS threads would only fight the other stages. */
    if (S > 1) pw_cpu_set_threads(1);
    if (c->trace_events > 0)
        PW_CHECK_GOTO(pw_trace_create(S, c->trace_events, &pl->trace), st, fail);
    pw_engine_config ec = {
        .schedule = pl->sched, .report = pl->rep, .chunks = pl->chunks,
        .watchdog_s = c->watchdog_s, .pin = c->pin, .trace = pl->trace, .check = c->check,
    };
    PW_CHECK_GOTO(pw_engine_create(&ec, &pl->engine), st, fail);
    *out = pl;
    return PW_OK;
fail:
    pw_pipeline_destroy(pl);
    return st;
}

void pw_pipeline_destroy(pw_pipeline *pl)
{
    if (!pl) return;
    pw_engine_destroy(pl->engine);
    for (int s = 0; pl->stages && s < pl->cfg.stages; s++) {
        pw_program_destroy(pl->stages[s].prog);
        free(pl->stages[s].mb_loss);
        free(pl->stages[s].mb_correct);
    }
    free(pl->stages);
    free(pl->chunks);
    pw_trace_destroy(pl->trace);
    pw_schedule_report_destroy(pl->rep);
    pw_schedule_destroy(pl->sched);
    pw_partition_free(&pl->part);
    pw_sampler_free(&pl->sampler);
    free(pl->schedule_name);
    free(pl);
}

int64_t pw_pipeline_steps_per_epoch(const pw_pipeline *pl) { return pl->steps_per_epoch; }
void pw_pipeline_seek(pw_pipeline *pl, int64_t step) { pl->step = step; }

static double busy_sum(const pw_pipeline *pl, double *total_max)
{
    double busy = 0.0, tmax = 0.0;
    for (int r = 0; r < pl->cfg.stages; r++) {
        pw_engine_rank_stats rs;
        pw_engine_rank_stats_get(pl->engine, r, &rs);
        busy += rs.busy_s;
        if (rs.total_s > tmax) tmax = rs.total_s;
    }
    *total_max = tmax;
    return busy;
}

pw_status pw_pipeline_step(pw_pipeline *pl, pw_step_stats *out)
{
    const int64_t epoch = pl->step / pl->steps_per_epoch;
    const int64_t in_epoch = pl->step % pl->steps_per_epoch;
    if (epoch != pl->sampler_epoch) {
        pw_sampler_epoch(&pl->sampler, (int)epoch);
        pl->sampler_epoch = epoch;
    }
    pl->batch_idx = pl->sampler.order + in_epoch * pl->cfg.batch;
    double t0_busy, t0_wall, t1_wall;
    t0_busy = busy_sum(pl, &t0_wall);
    int64_t t0 = pw_now_ns();
    PW_CHECK(pw_engine_run_step(pl->engine, pl->step + 1));
    int64_t t1 = pw_now_ns();
    double busy = busy_sum(pl, &t1_wall) - t0_busy;
    double wall = (double)(t1 - t0) * 1e-9;
    pl->last_bubble = wall > 0 ? 1.0 - busy / ((double)pl->cfg.stages * wall) : 0.0;
    if (pl->last_bubble < 0) pl->last_bubble = 0;

    /* Loss of the step, summed in micro-batch order. */
    const gstage *last = NULL;
    for (int s = 0; s < pl->cfg.stages; s++)
        if (pl->stages[s].has_loss) last = &pl->stages[s];
    double loss = 0.0;
    int64_t correct = 0;
    for (int m = 0; last && m < pl->cfg.micro_batches; m++) {
        loss += last->mb_loss[m];
        correct += last->mb_correct[m];
    }
    int64_t positions = pl->cfg.batch * (last ? pw_program_loss_positions(last->prog) : 1);
    pl->step++;
    if (out) {
        out->step = pl->step;
        out->epoch = epoch;
        out->step_in_epoch = in_epoch + 1;
        out->loss = loss / (double)positions;
        out->accuracy = (double)correct / (double)positions;
    }
    return PW_OK;
}

pw_status pw_pipeline_evaluate(pw_pipeline *pl, const pw_dataset *d, pw_eval_stats *out)
{
    const pw_graph *g = pl->g;
    const int S = pl->cfg.stages;
    PW_CHECK(pw_trainer_check_data(g, d));
    /* One message buffer per link, bound to slot 0 of both neighbours; the
     * stages run one after the other on this thread (the workers are idle
     * between steps). */
    void **link = calloc((size_t)S, sizeof(void *));
    int64_t *idx = malloc((size_t)pl->micro * sizeof *idx);
    pw_status st = PW_OK;
    if (!link || !idx) {
        st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
        goto out;
    }
    for (int s = 0; s + 1 < S; s++) {
        size_t n = pw_program_port_bytes(pl->stages[s].prog, PW_PORT_ACT_OUT);
        if (posix_memalign(&link[s], 64, n ? n : 64) != 0) {
            st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
            goto out;
        }
        PW_CHECK_GOTO(pw_program_bind_port(pl->stages[s].prog, 0, PW_PORT_ACT_OUT, link[s]), st, out);
        PW_CHECK_GOTO(pw_program_bind_port(pl->stages[s + 1].prog, 0, PW_PORT_ACT_IN, link[s]), st, out);
    }
    double loss = 0.0;
    int64_t correct = 0;
    for (int64_t start = 0; start < d->n; start += pl->micro) {
        int64_t n = d->n - start < pl->micro ? d->n - start : pl->micro;
        for (int64_t i = 0; i < n; i++) idx[i] = start + i;
        for (int s = 0; s < S; s++) {
            gstage *gs = &pl->stages[s];
            if (gs->has_input || gs->has_label)
                PW_CHECK_GOTO(pw_dataset_gather(d, idx, n,
                              gs->has_input ? pw_program_value(gs->prog, g->input, 0) : NULL,
                              gs->has_label ? pw_program_value(gs->prog, g->label, 0) : NULL), st, out);
            PW_CHECK_GOTO(pw_program_forward(gs->prog, 0, n), st, out);
            if (gs->has_loss) {
                loss += pw_program_loss_sum(gs->prog, 0);
                correct += pw_program_correct(gs->prog, 0);
            }
        }
    }
    int64_t positions = d->n * pw_program_loss_positions(pl->stages[S - 1].prog);
    out->loss = positions ? loss / (double)positions : 0.0;
    out->accuracy = positions ? (double)correct / (double)positions : 0.0;
    out->samples = d->n;
out:
    for (int s = 0; link && s + 1 < S; s++) {
        pw_program_bind_port(pl->stages[s].prog, 0, PW_PORT_ACT_OUT, NULL);
        pw_program_bind_port(pl->stages[s + 1].prog, 0, PW_PORT_ACT_IN, NULL);
        free(link[s]);
    }
    free(link);
    free(idx);
    return st;
}

static void programs(pw_pipeline *pl, pw_program **out)
{
    for (int s = 0; s < pl->cfg.stages; s++) out[s] = pl->stages[s].prog;
}

pw_status pw_pipeline_save(pw_pipeline *pl, const char *path, const pw_checkpoint_info *info)
{
    pw_program *p[pl->cfg.stages];
    programs(pl, p);
    pw_checkpoint_info def = {.step = pl->step, .seed = pl->cfg.seed};
    return pw_checkpoint_save(path, pl->g, p, pl->cfg.stages, info ? info : &def);
}

pw_status pw_pipeline_load(pw_pipeline *pl, const char *path, pw_checkpoint_info *info)
{
    pw_program *p[pl->cfg.stages];
    programs(pl, p);
    return pw_checkpoint_load(path, pl->g, p, pl->cfg.stages, info);
}

const pw_partition *pw_pipeline_partition(const pw_pipeline *pl) { return &pl->part; }
const pw_schedule *pw_pipeline_schedule(const pw_pipeline *pl) { return pl->sched; }
const pw_schedule_report *pw_pipeline_report(const pw_pipeline *pl) { return pl->rep; }
pw_program *pw_pipeline_program(pw_pipeline *pl, int stage) { return pl->stages[stage].prog; }
pw_engine *pw_pipeline_engine(pw_pipeline *pl) { return pl->engine; }
double pw_pipeline_last_bubble(const pw_pipeline *pl) { return pl->last_bubble; }

double pw_pipeline_theory_bubble(const pw_pipeline *pl)
{
    if (pl->sched->kind == PW_SCHEDULE_CUSTOM) return pl->rep->bubble;
    return pw_schedule_theoretical_bubble(pl->sched->kind, pl->cfg.stages, pl->cfg.micro_batches);
}

void pw_pipeline_stage_stats_get(const pw_pipeline *pl, int stage, pw_pipeline_stage_stats *out)
{
    pw_engine_rank_stats rs;
    pw_engine_rank_stats_get(pl->engine, stage, &rs);
    pw_program_memory mem;
    pw_program_memory_usage(pl->stages[stage].prog, &mem);
    out->busy_s = rs.busy_s;
    out->wait_s = rs.wait_s;
    out->total_s = rs.total_s;
    out->slots = pl->rep->peak_inflight_chunk[stage];
    out->peak_slots = pw_engine_chunk_peak(pl->engine, stage);
    out->node_begin = pl->part.begin[stage];
    out->node_end = pl->part.begin[stage + 1];
    out->flops = pl->part.flops[stage];
    out->memory = mem.total;
}

pw_status pw_pipeline_write_trace(const pw_pipeline *pl, const char *path)
{
    if (!pl->trace)
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: tracing was not enabled");
    const int S = pl->cfg.stages;
    pw_trace_stage_cost costs[S];
    int measured[S];
    for (int s = 0; s < S; s++) {
        memset(&costs[s], 0, sizeof costs[s]);
        costs[s].node_begin = pl->part.begin[s];
        costs[s].node_end = pl->part.begin[s + 1];
        for (int i = costs[s].node_begin; i < costs[s].node_end; i++) {
            pw_op_cost c;
            if (pw_graph_node_cost(pl->g, i, &c) != PW_OK) continue;
            costs[s].flops_fwd += c.flops_fwd * (double)pl->micro;
            costs[s].flops_bwd_input += c.flops_bwd_input * (double)pl->micro;
            costs[s].flops_bwd_weight += c.flops_bwd_weight * (double)pl->micro;
            costs[s].param_bytes += c.param_bytes;
            costs[s].act_bytes += c.act_bytes * pl->micro;
        }
        measured[s] = pw_engine_chunk_peak(pl->engine, s);
    }
    pw_trace_meta m = {
        .schedule = pl->schedule_name, .graph = pl->g->name, .n_ranks = S, .n_chunks = S,
        .n_micro = pl->cfg.micro_batches, .n_replicas = 1, .micro_batch = pl->micro,
        .steps = pl->step, .theory_bubble = pw_pipeline_theory_bubble(pl),
        .peak_inflight = pl->rep->peak_inflight, .measured_peak = measured, .costs = costs,
    };
    return pw_trace_write(pl->trace, path, &m);
}
