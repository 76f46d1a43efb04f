/* pipewright — the schedule simulator (see simulate.h for the model).
 *
 * Like the validator's replay, the simulation runs the ranks as concurrent
 * programs: a rank executes its actions in order, advancing its own clock,
 * until a receive whose message has not been sent; it then parks, and the
 * send that produces the message wakes it. A message's arrival time depends
 * only on its sender's clock and its link, and every link and collective
 * channel is used by one rank in that rank's program order, so the order in
 * which parked and ready ranks are taken does not change any time: each
 * action is visited once and no global event queue is needed. Times are
 * whole nanoseconds (int64), so results are exact and reproducible.
 */
#include "scheduler/simulate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/schedule-internal.h"

/* Per rank. */
typedef struct sim_rank {
    int pc;                 /* next action */
    int parked;             /* waiting for the message of actions[pc] */
    int started;            /* a compute action has run */
    int64_t t;              /* clock, ns */
    int64_t start;          /* first compute action starts, ns */
    int64_t ar_free;        /* collective channel free from, ns */
    int64_t optim_ns;       /* sum of the rank's chunks' optim */
    int64_t busy, wait_recv, wait_ar;
    int inflight, peak;
    int64_t act_bytes, peak_bytes;
} sim_rank;

/* Per chunk, in ns and bytes. b is the whole backward (b + w) when W is not
 * split. */
typedef struct sim_cost {
    int64_t f, b, w, allreduce, msg_bytes, act_bytes;
} sim_cost;

typedef struct sim_link {
    int64_t latency;        /* ns */
    double ns_per_byte;     /* 0: infinite bandwidth */
    int64_t free_at;        /* ns */
} sim_link;

typedef struct sim {
    const pw_schedule *s;
    int R, C, M;
    sim_rank *rk;           /* [R] */
    sim_cost *cost;         /* [C] */
    int *link_f, *link_b;   /* [C]: link of boundary k (chunk k -> k+1 forward,
                             * k+1 -> k backward); -1 when both on one rank */
    int64_t *xfer_f, *xfer_b; /* [C]: ns the message of boundary k holds its link */
    sim_link *links;        /* [n_links] */
    int64_t *arr_f, *arr_b; /* [C][M] arrival of the message over boundary k
                             * for micro-batch mb; -1: not sent yet */
    int *stack, sp;         /* ranks ready to run */
    pw_trace *trace;
    int64_t step, n_events, n_messages, n_waits;
    /* Several steps back to back (post-validated): the length of one step's
     * program on each rank, and each step's end (max over ranks of its
     * OPTIM's end); NULL for one step. */
    const int *step_len;    /* [R] */
    int64_t *step_end;      /* [steps] */
} sim;

static const char *const compute_name[] = {[PW_ACT_F] = "F", [PW_ACT_B] = "B", [PW_ACT_W] = "W"};

/* ----------------------------------------------------------------- setup */

static pw_status to_ns(double sec, const char *what, int chunk, int64_t *out)
{
    if (!(sec >= 0.0) || !isfinite(sec) || sec > 9e9)
        return pw_error(PW_ERR_INVALID_ARG, "simulate: chunk %d: %s must be a time in seconds >= 0 "
                        "(got %g)", chunk, what, sec);
    *out = llround(sec * 1e9);
    return PW_OK;
}

static pw_status load_costs(sim *m, const pw_sim_config *cfg)
{
    const pw_sim_chunk_cost *in = cfg ? cfg->chunks : NULL;
    const int split = m->s->split_w;
    for (int c = 0; c < m->C; c++) {
        sim_cost *k = &m->cost[c];
        if (!in) {
            *k = (sim_cost){.f = 1000000000, .b = 1000000000, .w = 1000000000};
        } else {
            const pw_sim_chunk_cost *x = &in[c];
            PW_CHECK(to_ns(x->f, "f", c, &k->f));
            PW_CHECK(to_ns(x->b, "b", c, &k->b));
            PW_CHECK(to_ns(x->w, "w", c, &k->w));
            PW_CHECK(to_ns(x->allreduce, "allreduce", c, &k->allreduce));
            int64_t optim = 0;
            PW_CHECK(to_ns(x->optim, "optim", c, &optim));
            if (x->msg_bytes < 0 || x->act_bytes < 0)
                return pw_error(PW_ERR_INVALID_ARG, "simulate: chunk %d: negative byte count "
                                "(msg_bytes %lld, act_bytes %lld)", c, (long long)x->msg_bytes,
                                (long long)x->act_bytes);
            k->msg_bytes = x->msg_bytes;
            k->act_bytes = x->act_bytes;
            m->rk[pw_sched_rank_of(m->s, c)].optim_ns += optim;
        }
        if (!split) k->b += k->w; /* an unsplit B is the whole backward */
    }
    return PW_OK;
}

typedef struct link_key {
    int64_t pair;           /* src * R + dst */
    int boundary, dir;      /* dir 0: forward, 1: backward */
} link_key;

static int cmp_key(const void *a, const void *b)
{
    int64_t x = ((const link_key *)a)->pair, y = ((const link_key *)b)->pair;
    return x < y ? -1 : x > y;
}

static pw_status link_param(const pw_sim_config *cfg, int src, int dst, sim_link *l)
{
    double lat = cfg ? cfg->link_latency : 0.0, bw = cfg ? cfg->link_bandwidth : 0.0;
    if (cfg && cfg->link_params) cfg->link_params(cfg->link_ctx, src, dst, &lat, &bw);
    if (!(lat >= 0.0) || !isfinite(lat) || lat > 9e9 || !(bw >= 0.0) || !isfinite(bw))
        return pw_error(PW_ERR_INVALID_ARG, "simulate: link %d -> %d: latency must be >= 0 s and "
                        "bandwidth >= 0 bytes/s (got %g s, %g bytes/s)", src, dst, lat, bw);
    l->latency = llround(lat * 1e9);
    l->ns_per_byte = bw > 0.0 ? 1e9 / bw : 0.0;
    l->free_at = 0;
    return PW_OK;
}

/* One link per directed pair of ranks that exchange messages: chunk
 * boundaries whose chunks sit on the same two ranks share it. */
static pw_status build_links(sim *m, const pw_sim_config *cfg)
{
    const pw_schedule *s = m->s;
    const int C = m->C;
    for (int k = 0; k < C; k++) {
        m->link_f[k] = m->link_b[k] = -1;
        m->xfer_f[k] = m->xfer_b[k] = 0;
    }
    link_key *keys = malloc((size_t)(2 * C + 1) * sizeof *keys);
    if (!keys) return pw_error(PW_ERR_NOMEM, "simulate: out of memory (links)");
    int n = 0;
    for (int k = 0; k + 1 < C; k++) {
        int a = pw_sched_rank_of(s, k), b = pw_sched_rank_of(s, k + 1);
        if (a == b) continue;
        keys[n++] = (link_key){(int64_t)a * m->R + b, k, 0};
        keys[n++] = (link_key){(int64_t)b * m->R + a, k, 1};
    }
    qsort(keys, (size_t)n, sizeof *keys, cmp_key);
    m->links = malloc((size_t)(n + 1) * sizeof *m->links);
    if (!m->links) {
        free(keys);
        return pw_error(PW_ERR_NOMEM, "simulate: out of memory (links)");
    }
    int id = -1;
    pw_status st = PW_OK;
    for (int i = 0; i < n && st == PW_OK; i++) {
        if (i == 0 || keys[i].pair != keys[i - 1].pair) {
            id++;
            st = link_param(cfg, (int)(keys[i].pair / m->R), (int)(keys[i].pair % m->R),
                            &m->links[id]);
        }
        int k = keys[i].boundary;
        (keys[i].dir ? m->link_b : m->link_f)[k] = id;
        /* The message of a boundary always has the same size and link, so
         * its transfer time is known before the run. */
        double ns = (double)m->cost[k].msg_bytes * m->links[id].ns_per_byte;
        (keys[i].dir ? m->xfer_b : m->xfer_f)[k] = ns < 9e18 ? llround(ns) : INT64_MAX / 4;
    }
    free(keys);
    return st;
}

/* Every time the simulation computes is at most the sum, over all actions,
 * of the largest time one action can add (a critical path visits each action
 * at most once, a link's queue holds at most every message); keeping that
 * below 2^62 ns keeps the int64 clock from overflowing on absurd costs. */
static pw_status check_clock(const sim *m)
{
    double most = 0.0, total = 1.0;
    for (int c = 0; c < m->C; c++) {
        const sim_cost *k = &m->cost[c];
        double x[] = {(double)k->f, (double)k->b, (double)k->w, (double)k->allreduce,
                      (double)m->xfer_f[c], (double)m->xfer_b[c]};
        for (size_t i = 0; i < sizeof x / sizeof x[0]; i++)
            if (x[i] > most) most = x[i];
    }
    for (int r = 0; r < m->R; r++) {
        if ((double)m->rk[r].optim_ns > most) most = (double)m->rk[r].optim_ns;
        total += m->s->ranks[r].n_actions;
    }
    for (int64_t i = 0; i < 2 * (int64_t)m->C; i++) {
        int id = i < m->C ? m->link_f[i] : m->link_b[i - m->C];
        if (id >= 0 && (double)m->links[id].latency > most) most = (double)m->links[id].latency;
    }
    if (most * total > 4.6e18)
        return pw_error(PW_ERR_INVALID_ARG, "simulate: the costs are too large for the simulated "
                        "clock (an action or message of %.3g s, %.0f actions: over 146 years)",
                        most * 1e-9, total - 1);
    return PW_OK;
}

/* ------------------------------------------------------------------ run */

static void push_event(sim *m, int r, const char *name, int cat, int chunk, int mb, int peer,
                       int64_t bytes, int64_t t0, int64_t t1)
{
    pw_trace_event *e = pw_trace_push(m->trace, r);
    m->n_events++;
    if (!e) return; /* a full track counts its drops */
    e->name = name;
    e->cat = cat;
    e->chunk = chunk;
    e->mb = mb;
    e->peer = peer;
    e->step = m->step;
    e->bytes = bytes;
    e->t0_ns = t0;
    e->t1_ns = t1;
}

static pw_status bad_action(const sim *m, int r, int i, const char *why)
{
    char desc[128];
    pw_sched_describe(m->s, r, &m->s->ranks[r].actions[i], desc, sizeof desc);
    return pw_error(PW_ERR_SCHEDULE, "simulate: rank %d, position %d (%s): %s (validate the "
                    "schedule first)", r, i, desc, why);
}

/* Sends the message of boundary k in direction dir at time t from rank r;
 * wakes the receiver if it is parked on it. */
static void post_message(sim *m, int r, int k, int dir, int mb, int64_t t)
{
    const size_t key = (size_t)k * (size_t)m->M + (size_t)mb;
    sim_link *l = &m->links[(dir ? m->link_b : m->link_f)[k]];
    int64_t bytes = m->cost[k].msg_bytes;
    int64_t leave = t > l->free_at ? t : l->free_at;
    l->free_at = leave + (dir ? m->xfer_b : m->xfer_f)[k];
    (dir ? m->arr_b : m->arr_f)[key] = l->free_at + l->latency;
    m->n_messages++;
    int dst_chunk = dir ? k : k + 1, dst = pw_sched_rank_of(m->s, dst_chunk);
    if (m->trace)
        push_event(m, r, dir ? "SEND_B" : "SEND_F", PW_TRACE_COMM, dir ? k + 1 : k, mb, dst, bytes,
                   t, t);
    sim_rank *d = &m->rk[dst];
    if (d->parked) {
        const pw_action *w = &m->s->ranks[dst].actions[d->pc];
        pw_action_kind want = dir ? PW_ACT_RECV_B : PW_ACT_RECV_F;
        if (w->kind == want && w->chunk == dst_chunk && w->mb == mb) {
            d->parked = 0;
            m->stack[m->sp++] = dst;
            __builtin_prefetch(w + 1); /* it runs next, from memory nobody touched lately */
            __builtin_prefetch(w + 6);
        }
    }
}

/* Runs rank r until it parks or finishes. */
static pw_status run_rank(sim *m, int r)
{
    const pw_schedule *s = m->s;
    const pw_rank_program *prog = &s->ranks[r];
    const int C = m->C, split = s->split_w;
    const size_t M = (size_t)m->M;
    sim_rank *k = &m->rk[r];
    int64_t t = k->t;
    int i = k->pc;
    for (; i < prog->n_actions; i++) {
        const pw_action *a = &prog->actions[i];
        if (!pw_sched_action_valid(s, r, a)) return bad_action(m, r, i, "not an action of this rank");
        const int c = a->chunk, mb = a->mb;
        int64_t d = 0;
        switch (a->kind) {
        case PW_ACT_F:
            d = m->cost[c].f;
            k->inflight++;
            k->act_bytes += m->cost[c].act_bytes;
            if (k->inflight > k->peak) k->peak = k->inflight;
            if (k->act_bytes > k->peak_bytes) k->peak_bytes = k->act_bytes;
            break;
        case PW_ACT_B:
        case PW_ACT_W:
            if (a->kind == PW_ACT_W && !split) return bad_action(m, r, i, "W in a schedule that does not split W");
            d = a->kind == PW_ACT_B ? m->cost[c].b : m->cost[c].w;
            if (a->kind == PW_ACT_W || !split) { /* the last backward frees the stash */
                k->inflight--;
                k->act_bytes -= m->cost[c].act_bytes;
            }
            break;
        case PW_ACT_SEND_F:
            if (c + 1 >= C || m->link_f[c] < 0) return bad_action(m, r, i, "no neighbour on another rank");
            post_message(m, r, c, 0, mb, t);
            continue;
        case PW_ACT_SEND_B:
            if (c < 1 || m->link_b[c - 1] < 0) return bad_action(m, r, i, "no neighbour on another rank");
            post_message(m, r, c - 1, 1, mb, t);
            continue;
        case PW_ACT_RECV_F:
        case PW_ACT_RECV_B: {
            const int dir = a->kind == PW_ACT_RECV_B;
            const int b = dir ? c : c - 1; /* the boundary the message crosses */
            if (b < 0 || b + 1 >= C || (dir ? m->link_b : m->link_f)[b] < 0)
                return bad_action(m, r, i, "no neighbour on another rank");
            int64_t arr = (dir ? m->arr_b : m->arr_f)[(size_t)b * M + (size_t)mb];
            if (arr < 0) { /* not sent yet: park until the send wakes us */
                k->parked = 1;
                k->pc = i;
                k->t = t;
                return PW_OK;
            }
            int peer = pw_sched_rank_of(s, dir ? c + 1 : c - 1);
            if (arr > t) {
                if (m->trace)
                    push_event(m, r, dir ? "wait RECV_B" : "wait RECV_F", PW_TRACE_WAIT, c, mb, peer,
                               0, t, arr);
                k->wait_recv += arr - t;
                m->n_waits++;
                t = arr;
            }
            if (m->trace)
                push_event(m, r, dir ? "RECV_B" : "RECV_F", PW_TRACE_COMM, c, mb, peer,
                           m->cost[b].msg_bytes, t, t);
            continue;
        }
        case PW_ACT_ALLREDUCE: {
            int64_t from = t > k->ar_free ? t : k->ar_free;
            k->ar_free = from + m->cost[c].allreduce;
            if (m->trace) push_event(m, r, "ALLREDUCE", PW_TRACE_COMM, c, mb, -1, 0, t, t);
            continue;
        }
        case PW_ACT_OPTIM:
            if (k->ar_free > t) {
                if (m->trace) push_event(m, r, "wait ALLREDUCE", PW_TRACE_WAIT, -1, -1, -1, 0, t, k->ar_free);
                k->wait_ar += k->ar_free - t;
                t = k->ar_free;
            }
            d = k->optim_ns;
            if (m->step_len) { /* OPTIM is the last action of each step */
                int64_t *e = &m->step_end[i / m->step_len[r]];
                if (t + d > *e) *e = t + d;
            }
            break;
        default:
            return bad_action(m, r, i, "unknown action kind");
        }
        /* A compute action: F, B, W or OPTIM. */
        if (!k->started) {
            k->started = 1;
            k->start = t;
        }
        if (m->trace)
            push_event(m, r, a->kind == PW_ACT_OPTIM ? "OPTIM" : compute_name[a->kind],
                       PW_TRACE_COMPUTE, c, mb, -1, 0, t, t + d);
        t += d;
        k->busy += d;
    }
    k->pc = i;
    k->t = t;
    return PW_OK;
}

/* A rank still parked at the end waits for a message nobody sends. */
static pw_status report_stuck(const sim *m)
{
    for (int r = 0; r < m->R; r++) {
        const sim_rank *k = &m->rk[r];
        if (k->pc >= m->s->ranks[r].n_actions) continue;
        char desc[128];
        pw_sched_describe(m->s, r, &m->s->ranks[r].actions[k->pc], desc, sizeof desc);
        return pw_error(PW_ERR_SCHEDULE, "simulate: rank %d at position %d (%s) waits for a message "
                        "that is never sent: the schedule does not finish (pw_schedule_validate "
                        "names the cause)", r, k->pc, desc);
    }
    return pw_error(PW_ERR_INTERNAL, "simulate: no rank is stuck, yet not all finished");
}

static pw_status fill_result(const sim *m, pw_sim_result **out)
{
    const int R = m->R;
    pw_sim_result *res = calloc(1, sizeof *res + (size_t)R * sizeof(pw_sim_rank));
    if (!res) return pw_error(PW_ERR_NOMEM, "simulate: cannot allocate the result");
    res->ranks = (pw_sim_rank *)(res + 1);
    res->n_ranks = R;
    int64_t end = 0, span = 0, busy = 0, actions = 0;
    for (int r = 0; r < R; r++) {
        const sim_rank *k = &m->rk[r];
        int64_t start = k->started ? k->start : k->t;
        if (k->t > end) end = k->t;
        if (k->t - start > span) span = k->t - start;
        busy += k->busy;
        actions += m->s->ranks[r].n_actions;
    }
    for (int r = 0; r < R; r++) {
        const sim_rank *k = &m->rk[r];
        pw_sim_rank *o = &res->ranks[r];
        o->start = 1e-9 * (double)(k->started ? k->start : k->t);
        o->end = 1e-9 * (double)k->t;
        o->busy = 1e-9 * (double)k->busy;
        o->idle = 1e-9 * (double)(end - k->busy);
        o->wait_recv = 1e-9 * (double)k->wait_recv;
        o->wait_allreduce = 1e-9 * (double)k->wait_ar;
        o->peak_inflight = k->peak;
        o->peak_stages = (double)k->peak / (double)m->s->chunks_per_rank;
        o->peak_act_bytes = k->peak_bytes;
    }
    res->step_time = 1e-9 * (double)end;
    res->busy = 1e-9 * (double)busy;
    res->bubble = end ? 1.0 - (double)busy / ((double)R * (double)end) : 0.0;
    res->steady_step_time = 1e-9 * (double)span;
    res->steady_bubble = span ? 1.0 - (double)busy / ((double)R * (double)span) : 0.0;
    res->n_actions = actions;
    res->n_messages = m->n_messages;
    res->n_waits = m->n_waits;
    res->n_trace_events = m->n_events;
    *out = res;
    return PW_OK;
}

/* The simulation proper. step_len and step_end as in struct sim (NULL for
 * one step); trace may be NULL. */
static pw_status simulate_core(const pw_schedule *s, const pw_sim_config *cfg, pw_trace *trace,
                               const int *step_len, int64_t *step_end, pw_sim_result **out)
{
    /* Plan every array, then one allocation. */
    const int R = s->n_ranks, C = s->n_chunks;
    const size_t keys = (size_t)C * (size_t)s->n_micro;
    size_t size = 0;
    size_t o_rk = size;    size += (size_t)R * sizeof(sim_rank);
    size_t o_cost = size;  size += (size_t)C * sizeof(sim_cost);
    size_t o_arr = size;   size += 2 * keys * sizeof(int64_t);
    size_t o_xf = size;    size += 2 * (size_t)C * sizeof(int64_t);
    size_t o_lf = size;    size += 2 * (size_t)C * sizeof(int);
    size_t o_stack = size; size += (size_t)R * sizeof(int);
    char *block = malloc(size);
    if (!block) return pw_error(PW_ERR_NOMEM, "simulate: cannot allocate %zu bytes", size);
    sim m = {
        .s = s, .R = R, .C = C, .M = s->n_micro,
        .rk = (sim_rank *)(block + o_rk),
        .cost = (sim_cost *)(block + o_cost),
        .arr_f = (int64_t *)(block + o_arr),
        .link_f = (int *)(block + o_lf),
        .xfer_f = (int64_t *)(block + o_xf),
        .stack = (int *)(block + o_stack),
        .trace = trace,
        .step = cfg && cfg->step > 0 ? cfg->step : 1,
        .step_len = step_len,
        .step_end = step_end,
    };
    m.arr_b = m.arr_f + keys;
    m.link_b = m.link_f + C;
    m.xfer_b = m.xfer_f + C;
    memset(m.rk, 0, (size_t)R * sizeof *m.rk);
    memset(m.arr_f, 0xff, 2 * keys * sizeof(int64_t)); /* -1: not sent */

    pw_status st;
    PW_CHECK_GOTO(load_costs(&m, cfg), st, out);
    PW_CHECK_GOTO(build_links(&m, cfg), st, out);
    PW_CHECK_GOTO(check_clock(&m), st, out);

    for (int r = R - 1; r >= 0; r--) m.stack[m.sp++] = r; /* rank 0 runs first */
    while (m.sp > 0) {
        int r = m.stack[--m.sp];
        PW_CHECK_GOTO(run_rank(&m, r), st, out);
    }
    for (int r = 0; r < R; r++)
        if (m.rk[r].pc < s->ranks[r].n_actions) {
            st = report_stuck(&m);
            goto out;
        }
    if (m.trace)
        for (int r = 0; r < R; r++) push_event(&m, r, "step", PW_TRACE_STEP, -1, -1, -1, 0, 0, m.rk[r].t);
    st = fill_result(&m, out);
out:
    free(m.links);
    free(block);
    return st;
}

/* `steps` copies of s's programs back to back on every rank, micro-batch
 * k of copy n renumbered n·M + k (bucket indices kept): the post-validated
 * run, in which nothing holds a rank between its steps. */
static pw_status concat_steps(const pw_schedule *s, int steps, pw_schedule **out)
{
    *out = NULL;
    if ((int64_t)s->n_micro * steps > PW_SCHED_MAX_MICRO)
        return pw_error(PW_ERR_INVALID_ARG, "simulate: %d steps of %d micro-batches are too many "
                        "(at most %d in all)", steps, s->n_micro, PW_SCHED_MAX_MICRO);
    int64_t *counts = malloc((size_t)s->n_ranks * sizeof *counts);
    if (!counts) return pw_error(PW_ERR_NOMEM, "simulate: out of memory (steps)");
    for (int r = 0; r < s->n_ranks; r++) counts[r] = (int64_t)s->ranks[r].n_actions * steps;
    pw_schedule shape = *s;
    shape.n_micro = s->n_micro * steps;
    pw_schedule *c = NULL;
    pw_status st = pw_sched_alloc(&shape, counts, &c);
    free(counts);
    if (st != PW_OK) return st;
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        pw_action *q = c->ranks[r].actions;
        for (int n = 0; n < steps; n++)
            for (int i = 0; i < p->n_actions; i++) {
                pw_action a = p->actions[i];
                if (a.kind != PW_ACT_ALLREDUCE && a.kind != PW_ACT_OPTIM) a.mb += n * s->n_micro;
                *q++ = a;
            }
    }
    c->lowered = s->lowered;
    *out = c;
    return PW_OK;
}

/* The steps_* and period figures of res (one step: the step's own). */
static pw_status several_steps(const pw_schedule *s, const pw_sim_config *cfg, pw_sim_result *res)
{
    const int K = cfg && cfg->steps > 1 ? cfg->steps : 1;
    const double per_step = res->busy;
    res->steps = K;
    res->steps_time = res->step_time * K;
    res->period = res->step_time;
    if (K > 1 && cfg->post_validate) {
        pw_schedule *c = NULL;
        int *len = malloc((size_t)s->n_ranks * sizeof *len);
        int64_t *end = calloc((size_t)K, sizeof *end);
        pw_sim_result *all = NULL;
        pw_status st = len && end ? PW_OK : pw_error(PW_ERR_NOMEM, "simulate: out of memory (steps)");
        for (int r = 0; st == PW_OK && r < s->n_ranks; r++) len[r] = s->ranks[r].n_actions;
        if (st == PW_OK) st = concat_steps(s, K, &c);
        if (st == PW_OK) st = simulate_core(c, cfg, NULL, len, end, &all);
        if (st == PW_OK) {
            res->steps_time = all->step_time;
            res->period = 1e-9 * (double)(end[K - 1] - end[0]) / (K - 1);
        }
        pw_sim_result_destroy(all);
        pw_schedule_destroy(c);
        free(len);
        free(end);
        PW_CHECK(st);
    }
    const double R = res->n_ranks;
    res->steps_bubble = res->steps_time > 0 ? 1.0 - K * per_step / (R * res->steps_time) : 0.0;
    res->period_bubble = res->period > 0 ? 1.0 - per_step / (R * res->period) : 0.0;
    return PW_OK;
}

pw_status pw_simulate(const pw_schedule *s, const pw_sim_config *cfg, pw_sim_result **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_simulate: out is NULL");
    *out = NULL;
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "pw_simulate: schedule is NULL");
    PW_CHECK(pw_sched_check_shape(s));
    for (int r = 0; r < s->n_ranks; r++)
        if (s->ranks[r].n_actions < 0 || (s->ranks[r].n_actions > 0 && !s->ranks[r].actions))
            return pw_error(PW_ERR_INVALID_ARG, "simulate: rank %d has a bad action list", r);
    if (!s->lowered && s->n_ranks > 1)
        return pw_error(PW_ERR_SCHEDULE, "simulate: the schedule is not lowered (call "
                        "pw_schedule_lower: the simulator times its SEND/RECV actions)");
    if (cfg && cfg->steps < 0)
        return pw_error(PW_ERR_INVALID_ARG, "simulate: steps must be >= 0 (got %d)", cfg->steps);
    pw_sim_result *res = NULL;
    PW_CHECK(simulate_core(s, cfg, cfg ? cfg->trace : NULL, NULL, NULL, &res));
    pw_status st = several_steps(s, cfg, res);
    if (st != PW_OK) {
        pw_sim_result_destroy(res);
        return st;
    }
    *out = res;
    return PW_OK;
}

void pw_sim_result_destroy(pw_sim_result *r) { free(r); }

int64_t pw_sim_trace_capacity(const pw_schedule *s)
{
    if (!s || !s->ranks) return 0;
    int64_t most = 0;
    for (int r = 0; r < s->n_ranks; r++)
        if (s->ranks[r].n_actions > most) most = s->ranks[r].n_actions;
    return 2 * most + 1;
}

double pw_sim_ring_allreduce(int64_t bytes, int n_replicas, double latency, double bandwidth)
{
    if (n_replicas <= 1 || bytes <= 0) return 0.0;
    double n = (double)n_replicas, per = bandwidth > 0.0 ? (double)bytes / (n * bandwidth) : 0.0;
    return 2.0 * (n - 1.0) * (latency + per);
}
