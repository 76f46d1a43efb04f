/* pipewright — calibrations of ranks that run at once in this process (a
 * tensor-parallel group, or ranks that share the machine's caches and memory
 * bandwidth) and of the in-process links between them (forecast.h,
 * "Calibration"). */
#define _GNU_SOURCE
#include "stages/plan/forecast.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/collective.h"
#include "runtime/topology.h"
#include "runtime/trace.h"
#include "scheduler/engine.h"
#include "scheduler/schedule.h"
#include "scheduler/simulate.h"
#include "stages/ops/tp.h"
#include "stages/program/program.h"

/* ------------------------------------------------- ranks that run at once */

#define ROUNDS 3 /* timed rounds after the warm-up */

typedef struct group_run group_run;

typedef struct member {
    group_run *run;
    int k;
    pw_graph *rank_g;             /* owned (T > 1) */
    pw_program *p;
    pw_status st;
    char err[256];
    double micro[ROUNDS], optim[ROUNDS];
} member;

struct group_run {
    const pw_forecast_config *c;
    int n;                        /* members */
    int timed;                    /* micro-batches per timed round */
    pw_shm_group *shm;            /* T > 1: the group's sums */
    hwloc_topology_t topo;        /* (NULL: unpinned) this machine's, and */
    pw_cpu_placement *place;      /* one core per member, as the engine pins ranks */
    pthread_barrier_t bar;
    member *m;
};

static void member_fail(member *me, pw_status st)
{
    me->st = st;
    snprintf(me->err, sizeof me->err, "%s", pw_last_error());
}

/* One member: its program (the whole graph, or tensor rank k's graph),
 * zero inputs, then the rounds in step with the others (a barrier before
 * each, so that every round's work runs at once on every member). A member
 * that fails still meets every barrier. */
static void *member_main(void *arg)
{
    member *me = arg;
    group_run *r = me->run;
    const pw_forecast_config *c = r->c;
    const int T = c->tensor > 1 ? c->tensor : 1;
    const int64_t mbs = c->micro_batch_size;
    const pw_graph *g = c->graph;
    if (r->place) pw_cpu_bind_thread(r->topo, r->place->cpusets[me->k], "a calibration rank");
    if (T > 1) {
        pw_status st = pw_graph_tp_rank(c->graph, T, me->k, &me->rank_g);
        if (st != PW_OK) member_fail(me, st);
        g = me->rank_g;
    }
    if (me->st == PW_OK) {
        pw_program_config pc = {.graph = g, .micro_batch = mbs, .loss_batch = mbs * c->micro_batches,
                                .slots = 1,
                                .optim = pw_optim_defaults(c->optim_state_floats == 2 ? PW_OPTIM_ADAMW
                                                                                      : PW_OPTIM_SGD)};
        pw_status st = pw_program_create(&pc, &me->p);
        if (st != PW_OK) member_fail(me, st);
    }
    if (me->st == PW_OK) {
        pw_program_init_params(me->p, 1);
        if (T > 1) {
            pw_tp tp = {.rank = me->k, .size = T, .coll = pw_shm_group_member(r->shm, me->k)};
            pw_status st = pw_program_set_tp(me->p, &tp);
            if (st != PW_OK) member_fail(me, st);
        }
        const int ids[2] = {g->input, g->label};
        for (int k = 0; k < 2 && me->st == PW_OK; k++) {
            if (ids[k] < 0) continue;
            void *x = pw_program_value(me->p, ids[k], 0);
            const pw_value *v = &g->values[ids[k]];
            if (x) memset(x, 0, (size_t)(mbs * pw_shape_numel(&v->shape)) * pw_dtype_size(v->dtype));
        }
    }
    /* Every member must know whether all can run before any enters a sum. */
    pthread_barrier_wait(&r->bar);
    int ok = 1;
    for (int k = 0; k < r->n; k++) ok &= r->m[k].st == PW_OK;
    for (int it = 0; it < ROUNDS + 1; it++) {
        pthread_barrier_wait(&r->bar);
        if (!ok) continue;
        pw_status st = PW_OK;
        const int64_t t0 = pw_now_ns();
        for (int mb = 0; mb < (it ? r->timed : 1) && st == PW_OK; mb++) { /* it 0: warm-up */
            if (pw_program_needs_rng(me->p)) pw_program_set_rng(me->p, 0, 1, it + 1, mb * mbs);
            st = pw_program_forward(me->p, 0, mbs);
            if (st == PW_OK) st = pw_program_backward_input(me->p, 0);
            if (st == PW_OK) st = pw_program_backward_weight(me->p, 0);
        }
        const int64_t t1 = pw_now_ns();
        if (st == PW_OK) st = pw_program_optimizer_step(me->p, it + 1);
        const int64_t t2 = pw_now_ns();
        if (st != PW_OK) {
            member_fail(me, st);
            ok = 0; /* a sum the others wait in cannot be left: T > 1 stops at the first error */
        }
        if (it) {
            me->micro[it - 1] = (double)(t1 - t0) * 1e-9 / r->timed;
            me->optim[it - 1] = (double)(t2 - t1) * 1e-9;
        }
    }
    return NULL;
}

pw_status pw_forecast_calibrate_group(const pw_forecast_config *c, int ranks, double *micro_s, double *optim_s)
{
    if (micro_s) *micro_s = 0;
    if (optim_s) *optim_s = 0;
    if (!c || !c->graph || c->micro_batches < 1 || c->micro_batch_size < 1 || !micro_s || !optim_s)
        return pw_error(PW_ERR_INVALID_ARG, "calibrate: a graph, micro-batches, a micro-batch size and "
                        "two outputs are needed");
    const int T = c->tensor > 1 ? c->tensor : 1;
    if (ranks < 1 || ranks > 256 || (T > 1 && ranks != T))
        return pw_error(PW_ERR_INVALID_ARG, "calibrate: %d ranks at once (tensor %d): 1 to 256, and T "
                        "ranks for a tensor-parallel group", ranks, T);
    if (ranks == 1) return pw_forecast_calibrate_parts(c, micro_s, optim_s);
    group_run r = {.c = c, .n = ranks, .timed = c->micro_batches < 2 ? c->micro_batches : 2};
    r.m = calloc((size_t)ranks, sizeof *r.m);
    pthread_t *th = calloc((size_t)ranks, sizeof *th);
    if (!r.m || !th) {
        free(r.m);
        free(th);
        return pw_error(PW_ERR_NOMEM, "calibrate: out of memory");
    }
    pw_status st = PW_OK;
    if (T > 1) st = pw_shm_group_create(T, &r.shm);
    /* Pinned as the engine pins ranks (one core each); unpinned when the
     * machine's topology cannot be read. */
    if (pw_topology_load(&r.topo) != PW_OK || pw_cpu_place_ranks(r.topo, ranks, &r.place) != PW_OK) {
        pw_clear_error();
        pw_cpu_placement_destroy(r.place);
        r.place = NULL;
    }
    if (st == PW_OK && pthread_barrier_init(&r.bar, NULL, (unsigned)ranks) != 0)
        st = pw_error(PW_ERR_NOMEM, "calibrate: no barrier for %d threads", ranks);
    int started = 0;
    if (st == PW_OK) {
        for (int k = 0; k < ranks; k++) {
            r.m[k].run = &r;
            r.m[k].k = k;
        }
        for (; started < ranks; started++)
            if (pthread_create(&th[started], NULL, member_main, &r.m[started]) != 0) break;
        if (started < ranks) {
            /* The started members wait at the first barrier for ever: none may
             * be left there, so this cannot be recovered; say so loudly. */
            st = pw_error(PW_ERR_NOMEM, "calibrate: could not start thread %d of %d", started + 1, ranks);
            PW_ASSERT(!"calibrate: thread start failed with members waiting");
        }
        for (int k = 0; k < started; k++) pthread_join(th[k], NULL);
        pthread_barrier_destroy(&r.bar);
    }
    /* Per round the slowest member's time (the group, or the ranks that
     * share the machine, advance at its pace); then the fastest round. */
    double best_micro = 0, best_optim = 0;
    for (int k = 0; k < ranks && st == PW_OK; k++)
        if (r.m[k].st != PW_OK) st = pw_error(r.m[k].st, "calibrate: rank %d of %d: %s", k, ranks, r.m[k].err);
    for (int it = 0; it < ROUNDS && st == PW_OK; it++) {
        double mi = 0, op = 0;
        for (int k = 0; k < ranks; k++) {
            if (r.m[k].micro[it] > mi) mi = r.m[k].micro[it];
            if (r.m[k].optim[it] > op) op = r.m[k].optim[it];
        }
        if (it == 0 || mi < best_micro) best_micro = mi;
        if (it == 0 || op < best_optim) best_optim = op;
    }
    for (int k = 0; k < ranks; k++) {
        pw_program_destroy(r.m[k].p);
        pw_graph_destroy(r.m[k].rank_g);
    }
    pw_shm_group_destroy(r.shm);
    pw_cpu_placement_destroy(r.place);
    if (r.topo) hwloc_topology_destroy(r.topo);
    free(r.m);
    free(th);
    if (st != PW_OK) return st;
    if (!(best_micro > 0))
        return pw_error(PW_ERR_INVALID_ARG, "calibrate: graph '%s' has no work to time", c->graph->name);
    *micro_s = best_micro;
    *optim_s = best_optim;
    return PW_OK;
}

/* ------------------------------------------------------ in-process links */

/* A stage that does nothing but hand its (empty) messages on; with a
 * gradient span for the replicas' sum. */
typedef struct noop_stage {
    float *grad;
    int64_t n;
} noop_stage;

static pw_status noop_fb(void *self, int mb, int slot)
{
    (void)self, (void)mb, (void)slot;
    return PW_OK;
}

static int noop_bucket(void *self, int bucket, int n_buckets, pw_span *spans, int max_spans)
{
    noop_stage *s = self;
    (void)n_buckets;
    if (bucket != 0 || !s->grad) return 0;
    if (spans && max_spans >= 1) spans[0] = (pw_span){.data = s->grad, .n = s->n};
    return 1; /* asked first with no spans: how many */
}

static pw_status noop_optim(void *self, long step)
{
    (void)self, (void)step;
    return PW_OK;
}

static const pw_stage_i noop_i = {.name = "calibrate", .forward = noop_fb, .backward_input = noop_fb,
                                  .optimizer_step = noop_optim};
static const pw_stage_i noop_sum_i = {.name = "calibrate", .forward = noop_fb, .backward_input = noop_fb,
                                      .optimizer_step = noop_optim, .grad_bucket = noop_bucket};

#define LINK_STEPS 9 /* timed steps (after 3 warm-ups); their median */

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median step of an engine running S stages x R replicas of no-op
 * chunks over M micro-batches of 1F1B (R > 1: one bucket of n floats per
 * chunk, summed across the replicas). *sim_step (optional): the
 * simulator's step for the same schedule at zero compute and a link
 * latency of 1 s, i.e. the messages on its critical path. */
static pw_status noop_step(int S, int R, int M, int64_t n, double *step, double *sim_step)
{
    pw_schedule_config sc = {.kind = PW_SCHEDULE_1F1B, .n_stages = S, .n_micro = M, .n_buckets = R > 1 ? 1 : 0};
    pw_schedule *s = NULL;
    pw_schedule_report *rep = NULL;
    pw_engine *e = NULL;
    pw_engine_chunk *chunks = calloc((size_t)(S * R), sizeof *chunks);
    noop_stage *st_ = calloc((size_t)(S * R), sizeof *st_);
    float *grads = R > 1 && n > 0 ? calloc((size_t)(S * R) * (size_t)n, sizeof *grads) : NULL;
    pw_status st = PW_OK;
    if (!chunks || !st_ || (R > 1 && n > 0 && !grads)) {
        st = pw_error(PW_ERR_NOMEM, "calibrate: out of memory (links)");
        goto out;
    }
    PW_CHECK_GOTO(pw_schedule_generate(&sc, &s), st, out);
    PW_CHECK_GOTO(pw_schedule_lower(s), st, out);
    PW_CHECK_GOTO(pw_schedule_validate(s, &rep), st, out);
    for (int i = 0; i < S * R; i++) {
        st_[i].grad = grads ? grads + (size_t)i * (size_t)n : NULL;
        st_[i].n = n;
        chunks[i] = (pw_engine_chunk){R > 1 ? &noop_sum_i : &noop_i, &st_[i]};
    }
    pw_engine_config ec = {.schedule = s, .report = rep, .chunks = chunks, .pin = 1, .replicas = R};
    PW_CHECK_GOTO(pw_engine_create(&ec, &e), st, out);
    double t[LINK_STEPS];
    for (int i = 0; i < 3 + LINK_STEPS && st == PW_OK; i++) {
        const int64_t t0 = pw_now_ns();
        st = pw_engine_run_step(e, i + 1);
        if (i >= 3) t[i - 3] = (double)(pw_now_ns() - t0) * 1e-9;
    }
    if (st != PW_OK) goto out;
    qsort(t, LINK_STEPS, sizeof t[0], cmp_d);
    *step = t[LINK_STEPS / 2];
    if (sim_step) {
        pw_sim_chunk_cost *cost = calloc((size_t)S, sizeof *cost);
        pw_sim_result *res = NULL;
        if (!cost) {
            st = pw_error(PW_ERR_NOMEM, "calibrate: out of memory (links)");
            goto out;
        }
        pw_sim_config sim = {.chunks = cost, .link_latency = 1.0};
        st = pw_simulate(s, &sim, &res);
        if (st == PW_OK) *sim_step = res->step_time;
        pw_sim_result_destroy(res);
        free(cost);
    }
out:
    pw_engine_destroy(e);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    free(grads);
    free(st_);
    free(chunks);
    return st;
}

pw_status pw_forecast_calibrate_links(pw_forecast_links *out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "calibrate: links: no output");
    memset(out, 0, sizeof *out);
    const int M = 16;
    const int64_t small = 256, big = (int64_t)1 << 20; /* floats: 1 KiB and 4 MiB */
    double one = 0, two = 0, crit = 0, sum_small = 0, sum_big = 0;
    /* Hand-offs: two stages against one, the same actions; what two add is
     * the messages on the critical path (the simulator counts them). */
    PW_CHECK(noop_step(1, 1, M, 0, &one, NULL));
    PW_CHECK(noop_step(2, 1, M, 0, &two, &crit));
    /* The replicas' sum: one replica per thread, two sizes, over the same
     * step without a sum. */
    PW_CHECK(noop_step(1, 2, M, small, &sum_small, NULL));
    PW_CHECK(noop_step(1, 2, M, big, &sum_big, NULL));
    out->noop_step_s = one;
    out->two_stage_s = two;
    out->sum_small_s = sum_small;
    out->sum_big_s = sum_big;
    out->handoff_s = crit > 0 && two > one ? (two - one) / crit : 0;
    /* A ring of two: 2 (alpha + bytes / (2 beta)) = 2 alpha + bytes / beta. */
    const double bytes_small = 4.0 * (double)small, bytes_big = 4.0 * (double)big;
    const double ts = sum_small - one > 0 ? sum_small - one : 0;
    double tb = sum_big - one > ts ? sum_big - one : ts;
    const double slope = (tb - ts) / (bytes_big - bytes_small);
    out->allreduce_bandwidth = slope > 0 ? 1.0 / slope : 0;
    const double alpha2 = ts - slope * bytes_small;
    out->allreduce_latency_s = alpha2 > 0 ? alpha2 / 2 : 0;
    return PW_OK;
}
