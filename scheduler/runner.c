/* pipewright — the engine from a schedule name, a micro-batch count and a
 * stage table (scheduler/runner.h): schedule, validation, chunks, engine,
 * steps, trace. */
#include "scheduler/runner.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/trace.h"

struct pw_runner {
    pw_runner_config cfg;     /* schedule and model point at the copies below */
    char *schedule_name;
    char *model;
    pw_schedule_config sc;    /* kind CUSTOM for a CSV */
    pw_schedule *sched;
    pw_schedule_report *rep;
    int S, R, C;              /* ranks, replicas, chunks per replica */
    pw_engine_chunk *chunks;  /* [R × C], replica-major */
    int n_made;               /* chunks made so far, in that order */
    pw_engine *engine;
    pw_trace *trace;
    int64_t steps;
};

pw_runner_config pw_runner_defaults(void)
{
    pw_runner_config c;
    memset(&c, 0, sizeof c);
    c.watchdog_s = 60.0;
    c.pin = 1;
    c.table.replicas = 1;
    return c;
}

/* The schedule: a generated kind, or a CSV file; lowered and validated. */
static pw_status make_schedule(pw_runner *r)
{
    const pw_runner_config *c = &r->cfg;
    pw_schedule_kind kind;
    if (pw_schedule_kind_parse(c->schedule, &kind) == PW_OK && kind != PW_SCHEDULE_CUSTOM) {
        if (c->micro_batches < 1)
            return pw_error(PW_ERR_INVALID_ARG, "runner: micro-batches must be at least 1 (got %d)",
                            c->micro_batches);
        pw_schedule_config sc = {.kind = kind, .n_stages = r->S, .n_micro = c->micro_batches,
                                 .split_w = c->split_w,
                                 .n_buckets = r->R > 1 ? (c->buckets > 0 ? c->buckets : 1) : 0,
                                 .chunks_per_rank = c->chunks_per_rank};
        r->sc = sc;
        PW_CHECK(pw_schedule_generate(&sc, &r->sched));
        PW_CHECK(pw_schedule_lower(r->sched));
        r->schedule_name = strdup(pw_schedule_kind_name(kind));
    } else if (access(c->schedule, R_OK) == 0) {
        PW_CHECK(pw_schedule_load_csv(c->schedule, &r->sched));
        const pw_schedule *s = r->sched;
        r->sc.kind = PW_SCHEDULE_CUSTOM;
        if (s->n_ranks != r->S)
            return pw_error(PW_ERR_INVALID_ARG, "%s: the schedule has %d ranks but the stage table %d stages",
                            c->schedule, s->n_ranks, r->S);
        if (c->micro_batches > 0 && s->n_micro != c->micro_batches)
            return pw_error(PW_ERR_INVALID_ARG, "%s: the schedule has %d micro-batches, not %d", c->schedule,
                            s->n_micro, c->micro_batches);
        if (r->R > 1 && s->n_buckets == 0)
            return pw_error(PW_ERR_INVALID_ARG, "%s: %d replicas need ALLREDUCE buckets in the schedule "
                            "(cells AR0, AR1, ... after each rank's last backward)", c->schedule, r->R);
        r->schedule_name = strdup(c->schedule);
    } else {
        return pw_error(PW_ERR_INVALID_ARG, "runner: schedule '%s' is not gpipe, 1f1b, interleaved, zb-h1, "
                        "zb-h2, zb-v, zb-auto, dualpipev or a readable schedule CSV file", c->schedule);
    }
    if (!r->schedule_name) return pw_error(PW_ERR_NOMEM, "runner: out of memory");
    pw_status st = pw_schedule_validate(r->sched, &r->rep);
    if (st != PW_OK && r->sc.kind == PW_SCHEDULE_CUSTOM) return pw_error_prefix(st, "%s: ", c->schedule);
    return st;
}

static pw_chunk_spec spec_of(const pw_runner *r, int k, int c)
{
    return (pw_chunk_spec){
        .chunk = c, .n_chunks = r->C, .rank = pw_schedule_rank_of(r->sched, c), .replica = k,
        .replicas = r->R, .slots = r->rep->peak_inflight_chunk[c], .micro_batches = r->sched->n_micro,
        .n_buckets = r->sched->n_buckets, .schedule = r->sched,
    };
}

pw_status pw_runner_create(const pw_runner_config *cfg, pw_runner **out)
{
    *out = NULL;
    if (!cfg || !cfg->schedule || !cfg->table.make)
        return pw_error(PW_ERR_INVALID_ARG, "runner: a schedule and a stage table with make are required");
    if (cfg->table.stages < 1 || cfg->table.replicas < 0)
        return pw_error(PW_ERR_INVALID_ARG, "runner: the stage table has %d stages and %d replicas (want "
                        "stages >= 1, replicas >= 0)", cfg->table.stages, cfg->table.replicas);
    if (cfg->micro_batches < 0 || cfg->chunks_per_rank < 0 || cfg->buckets < 0 || cfg->trace_events < 0 ||
        cfg->first_step < 0 || !(cfg->clip_grad_norm >= 0))
        return pw_error(PW_ERR_INVALID_ARG, "runner: micro-batches, chunks per rank, buckets, trace events, "
                        "first step and clip_grad_norm must not be negative");
    pw_runner *r = calloc(1, sizeof *r);
    if (!r) return pw_error(PW_ERR_NOMEM, "runner: out of memory");
    r->cfg = *cfg;
    r->S = cfg->table.stages;
    r->R = cfg->table.replicas > 0 ? cfg->table.replicas : 1;
    r->model = strdup(cfg->model ? cfg->model : "custom");
    pw_status st;
    if (!r->model) {
        st = pw_error(PW_ERR_NOMEM, "runner: out of memory");
        goto fail;
    }
    PW_CHECK_GOTO(make_schedule(r), st, fail);
    r->cfg.schedule = r->schedule_name; /* the caller's strings are read here only */
    r->cfg.model = r->model;
    r->C = r->sched->n_chunks;
    r->chunks = calloc((size_t)r->R * (size_t)r->C, sizeof *r->chunks);
    if (!r->chunks) {
        st = pw_error(PW_ERR_NOMEM, "runner: out of memory");
        goto fail;
    }
    for (int k = 0; k < r->R; k++)
        for (int c = 0; c < r->C; c++) {
            pw_chunk_spec sp = spec_of(r, k, c);
            pw_engine_chunk *ch = &r->chunks[(size_t)k * (size_t)r->C + (size_t)c];
            st = cfg->table.make(cfg->table.user, &sp, ch);
            if (st != PW_OK) { /* a failing make has freed what it built */
                st = pw_error_prefix(st, "replica %d, chunk %d: ", k, c);
                goto fail;
            }
            r->n_made++; /* from here on unmake frees it, usable or not */
            if (!ch->vt || !ch->vt->forward || !ch->vt->backward_input) {
                st = pw_error(PW_ERR_INVALID_ARG, "replica %d, chunk %d: make returned no stage vtable, or one "
                              "without forward and backward_input", k, c);
                goto fail;
            }
        }
    if (cfg->trace_events > 0)
        PW_CHECK_GOTO(pw_trace_create(r->S * r->R, cfg->trace_events, &r->trace), st, fail);
    pw_engine_config ec = {
        .schedule = r->sched, .report = r->rep, .chunks = r->chunks, .watchdog_s = cfg->watchdog_s,
        .pin = cfg->pin, .trace = r->trace, .check = cfg->check, .replicas = r->R,
        .clip_grad_norm = cfg->clip_grad_norm, .span_mem = cfg->span_mem,
    };
    PW_CHECK_GOTO(pw_engine_create(&ec, &r->engine), st, fail);
    *out = r;
    return PW_OK;
fail:
    pw_runner_destroy(r);
    return st;
}

void pw_runner_destroy(pw_runner *r)
{
    if (!r) return;
    pw_engine_destroy(r->engine);
    for (int i = r->n_made - 1; i >= 0 && r->cfg.table.unmake; i--) {
        pw_chunk_spec sp = spec_of(r, i / r->C, i % r->C);
        r->cfg.table.unmake(r->cfg.table.user, &sp, &r->chunks[i]);
    }
    free(r->chunks);
    pw_trace_destroy(r->trace);
    pw_schedule_report_destroy(r->rep);
    pw_schedule_destroy(r->sched);
    free(r->schedule_name);
    free(r->model);
    free(r);
}

pw_status pw_runner_step(pw_runner *r)
{
    const int64_t first = r->cfg.first_step > 0 ? r->cfg.first_step : 1;
    PW_CHECK(pw_engine_run_step(r->engine, first + r->steps));
    r->steps++;
    return PW_OK;
}

int64_t pw_runner_steps_done(const pw_runner *r) { return r->steps; }

double pw_runner_theory_bubble(const pw_runner *r)
{
    if (r->sc.kind == PW_SCHEDULE_CUSTOM) return r->rep->bubble;
    return pw_schedule_config_bubble(&r->sc);
}

pw_status pw_runner_write_trace(const pw_runner *r, const char *path)
{
    if (!r->trace) return pw_error(PW_ERR_INVALID_ARG, "runner: tracing was not enabled (trace_events 0)");
    const int S = r->S, R = r->R;
    int *measured = calloc((size_t)S * (size_t)R, sizeof *measured);
    int *peaks = calloc((size_t)S * (size_t)R, sizeof *peaks);
    if (!measured || !peaks) {
        free(measured);
        free(peaks);
        return pw_error(PW_ERR_NOMEM, "runner: out of memory writing the trace");
    }
    /* Track k·S + rank: every replica runs the same schedule, so the first
     * replica's measured peaks (the engine keeps those) stand for all. A
     * rank's measured peak is the sum of its chunks' (an upper bound when
     * they peak at different times). */
    for (int rank = 0; rank < S; rank++) {
        int m = 0;
        for (int c = 0; c < r->C; c++)
            if (pw_schedule_rank_of(r->sched, c) == rank) m += pw_engine_chunk_peak(r->engine, c);
        for (int k = 0; k < R; k++) {
            measured[k * S + rank] = m;
            peaks[k * S + rank] = r->rep->peak_inflight[rank];
        }
    }
    pw_trace_meta m = {
        .schedule = r->schedule_name, .graph = r->model, .n_ranks = S * R, .n_chunks = r->C,
        .n_micro = r->sched->n_micro, .n_replicas = R, .micro_batch = r->cfg.micro_batch_size,
        .steps = r->steps, .theory_bubble = pw_runner_theory_bubble(r), .peak_inflight = peaks,
        .measured_peak = measured,
    };
    pw_status st = pw_trace_write(r->trace, path, &m);
    free(measured);
    free(peaks);
    return st;
}

const pw_schedule *pw_runner_schedule(const pw_runner *r) { return r->sched; }
const pw_schedule_report *pw_runner_report(const pw_runner *r) { return r->rep; }
pw_engine *pw_runner_engine(pw_runner *r) { return r->engine; }
int pw_runner_n_chunks(const pw_runner *r) { return r->C; }
const char *pw_runner_schedule_name(const pw_runner *r) { return r->schedule_name; }

const pw_engine_chunk *pw_runner_chunk(const pw_runner *r, int replica, int chunk)
{
    if (replica < 0 || replica >= r->R || chunk < 0 || chunk >= r->C || replica * r->C + chunk >= r->n_made)
        return NULL;
    return &r->chunks[(size_t)replica * (size_t)r->C + (size_t)chunk];
}

pw_status pw_engine_run_simple(const char *schedule, int micro_batches, const pw_stage_table *table,
                               int64_t steps)
{
    if (!table) return pw_error(PW_ERR_INVALID_ARG, "runner: no stage table");
    pw_runner_config rc = pw_runner_defaults();
    rc.schedule = schedule;
    rc.micro_batches = micro_batches;
    rc.table = *table;
    pw_runner *r;
    PW_CHECK(pw_runner_create(&rc, &r));
    pw_status st = PW_OK;
    for (int64_t i = 0; i < steps && st == PW_OK; i++) st = pw_runner_step(r);
    pw_runner_destroy(r);
    return st;
}
