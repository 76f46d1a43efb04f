/* pipewright — the rebalancer: measured stage times in windows, calibrated
 * speeds, the partitioner's best cuts and the simulator's predicted gain
 * (stages/plan/rebalancer.h). */
#include "stages/plan/rebalancer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/partition.h"
#include "scheduler/simulate.h"

#define DEFAULT_WINDOW 8
#define DEFAULT_GAIN 0.05

struct pw_rebalancer {
    pw_rebalancer_config cfg;
    int S, C, window, min_interval;
    int *cuts, *proposal;     /* [C + 1] now, and this window's proposal */
    int has_pending;          /* AUTO: the last window proposed a move; this one confirms */
    int *pending;             /* [C + 1] its cuts: the confirming proposal must lie near them */
    int backoff;              /* min_interval multiplier: doubled after a move that did not
                                 deliver its gain, back to 1 after one that did */
    int *inflight;            /* [C] activation slots (the report's peaks) */
    double *busy;             /* [window][S] this window's busy seconds per step */
    double *step_s;           /* [window] */
    double *med, *speed, *tmp;/* [S], [S], [window] */
    int n;                    /* steps in the window so far */
    int skip;                 /* steps still to leave out (the first after a start or a move) */
    int64_t last_move;        /* step of the last move; -1: none */
    double last_median;       /* step time median of the last full window */
    int measuring;            /* 1: the last move's gain is measured by the next window */
    int64_t moved_step;
    double before_s;
    int *prev;                /* [C + 1] the cuts before the last move */
    int last_revert;          /* 1: the last move was a revert (never reverted itself) */
    int *rejected;            /* [C + 1] cuts a reverted move went to ... */
    int64_t rejected_until;   /* ... not proposed again before this step (-1: none) */
    int64_t now;              /* the step being observed */
};

pw_rebalancer_config pw_rebalancer_defaults(void)
{
    pw_rebalancer_config c;
    memset(&c, 0, sizeof c);
    c.plan = pw_plan_defaults();
    return c;
}

pw_status pw_rebalance_parse(const char *s, pw_rebalance_mode *mode, int *every)
{
    *every = 0;
    if (!strcmp(s, "off")) *mode = PW_REBALANCE_OFF;
    else if (!strcmp(s, "auto")) *mode = PW_REBALANCE_AUTO;
    else if (!strncmp(s, "every:", 6)) {
        char *end;
        long n = strtol(s + 6, &end, 10);
        if (end == s + 6 || *end || n < 2 || n > 1000000)
            return pw_error(PW_ERR_INVALID_ARG, "--rebalance %s: every:N wants N in [2, 1000000]", s);
        *mode = PW_REBALANCE_EVERY;
        *every = (int)n;
    } else {
        return pw_error(PW_ERR_INVALID_ARG, "--rebalance %s: want auto, every:N or off", s);
    }
    return PW_OK;
}

void pw_rebalancer_destroy(pw_rebalancer *rb)
{
    if (!rb) return;
    free(rb->cuts);
    free(rb->proposal);
    free(rb->pending);
    free(rb->prev);
    free(rb->rejected);
    free(rb->inflight);
    free(rb->busy);
    free(rb->step_s);
    free(rb->med);
    free(rb->speed);
    free(rb->tmp);
    free(rb);
}

pw_status pw_rebalancer_create(const pw_rebalancer_config *cfg, const int *cuts, pw_rebalancer **out)
{
    *out = NULL;
    if (!cfg->plan.graph || !cfg->schedule || !cfg->report || !cuts)
        return pw_error(PW_ERR_INVALID_ARG, "rebalance: a graph, the pipeline's schedule, its report and cuts are needed");
    if (cfg->mode == PW_REBALANCE_EVERY && cfg->every < 2)
        return pw_error(PW_ERR_INVALID_ARG, "rebalance: every:%d (at least 2 steps)", cfg->every);
    if (cfg->window < 0 || cfg->min_interval < 0 || cfg->min_gain < 0 || !(cfg->min_gain < 1))
        return pw_error(PW_ERR_INVALID_ARG, "rebalance: window %d, interval %d, gain %g (want >= 0, gain < 1)",
                        cfg->window, cfg->min_interval, cfg->min_gain);
    pw_rebalancer *rb = calloc(1, sizeof *rb);
    if (!rb) return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    rb->cfg = *cfg;
    rb->S = cfg->schedule->n_ranks;
    rb->C = cfg->schedule->n_chunks;
    rb->window = cfg->mode == PW_REBALANCE_EVERY ? cfg->every - 1 : cfg->window > 0 ? cfg->window : DEFAULT_WINDOW;
    rb->min_interval = cfg->mode == PW_REBALANCE_EVERY ? cfg->every
                       : cfg->min_interval > 0 ? cfg->min_interval : 2 * rb->window;
    if (rb->cfg.min_gain == 0) rb->cfg.min_gain = DEFAULT_GAIN;
    rb->last_move = -1;
    rb->skip = 1;
    rb->backoff = 1;
    const size_t S = (size_t)rb->S, C = (size_t)rb->C, W = (size_t)rb->window;
    rb->cuts = malloc((C + 1) * sizeof(int));
    rb->proposal = malloc((C + 1) * sizeof(int));
    rb->pending = malloc((C + 1) * sizeof(int));
    rb->prev = malloc((C + 1) * sizeof(int));
    rb->rejected = malloc((C + 1) * sizeof(int));
    rb->rejected_until = -1;
    rb->inflight = malloc(C * sizeof(int));
    rb->busy = calloc(W * S, sizeof(double));
    rb->step_s = calloc(W, sizeof(double));
    rb->med = calloc(S, sizeof(double));
    rb->speed = calloc(S, sizeof(double));
    rb->tmp = calloc(W > S ? W : S, sizeof(double));
    if (!rb->cuts || !rb->proposal || !rb->pending || !rb->prev || !rb->rejected || !rb->inflight || !rb->busy || !rb->step_s || !rb->med || !rb->speed ||
        !rb->tmp) {
        pw_rebalancer_destroy(rb);
        return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    }
    memcpy(rb->cuts, cuts, (C + 1) * sizeof(int));
    memcpy(rb->proposal, cuts, (C + 1) * sizeof(int));
    for (size_t c = 0; c < C; c++)
        rb->inflight[c] = cfg->report->peak_inflight_chunk[c] > 0 ? cfg->report->peak_inflight_chunk[c] : 1;
    *out = rb;
    return PW_OK;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median of v[0], v[stride], ... (n values). */
static double median(const double *v, int n, int stride, double *tmp)
{
    for (int i = 0; i < n; i++) tmp[i] = v[(size_t)i * (size_t)stride];
    qsort(tmp, (size_t)n, sizeof *tmp, cmp_double);
    return n % 2 ? tmp[n / 2] : 0.5 * (tmp[n / 2 - 1] + tmp[n / 2]);
}

/* One step of the schedule with the chunks' predicted costs. */
static pw_status simulate(const pw_rebalancer *rb, const pw_partition *p, double *step_s)
{
    pw_sim_chunk_cost *cost = calloc((size_t)rb->C, sizeof *cost);
    if (!cost) return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    for (int c = 0; c < rb->C; c++) {
        const pw_stage_cost *o = &p->stage[c];
        cost[c] = (pw_sim_chunk_cost){.f = o->f, .b = o->b, .w = o->w, .optim = o->optim,
                                      .msg_bytes = o->send_act_bytes, .act_bytes = o->mem.stash};
    }
    pw_sim_config sc = {.chunks = cost, .link_latency = rb->cfg.plan.link_latency,
                        .link_bandwidth = rb->cfg.plan.link_bandwidth};
    pw_sim_result *res = NULL;
    pw_status st = pw_simulate(rb->cfg.schedule, &sc, &res);
    if (st == PW_OK) *step_s = res->step_time;
    pw_sim_result_destroy(res);
    free(cost);
    return st;
}

/* Each rank's model time per step for its chunks of `p` (speed 1). */
static void rank_model(const pw_rebalancer *rb, const pw_partition *p, double *out)
{
    const int M = rb->cfg.plan.micro_batches > 0 ? rb->cfg.plan.micro_batches : 1;
    for (int r = 0; r < rb->S; r++) out[r] = 0;
    for (int c = 0; c < rb->C; c++) {
        const pw_stage_cost *o = &p->stage[c];
        out[pw_schedule_rank_of(rb->cfg.schedule, c)] += M * (o->f + o->b + o->w) + o->optim;
    }
}

/* The largest memory any rank holds for its chunks of `p`, and which rank. */
static int64_t rank_memory(const pw_rebalancer *rb, const pw_partition *p, int *which)
{
    int64_t worst = 0;
    *which = 0;
    for (int r = 0; r < rb->S; r++) {
        int64_t m = 0;
        for (int c = 0; c < rb->C; c++)
            if (pw_schedule_rank_of(rb->cfg.schedule, c) == r) m += p->stage[c].mem.total;
        if (m > worst) {
            worst = m;
            *which = r;
        }
    }
    return worst;
}

/* Whether every cut of a and b lies within a sixteenth of the graph (at
 * least one node) of each other. */
static int near(const pw_rebalancer *rb, const int *a, const int *b)
{
    int tol = rb->cfg.plan.graph->n_nodes / 16;
    if (tol < 1) tol = 1;
    for (int c = 0; c <= rb->C; c++)
        if (abs(a[c] - b[c]) > tol) return 0;
    return 1;
}

/* The decision of a full window (rb->med holds its medians). */
static pw_status decide(pw_rebalancer *rb, pw_rebalance_decision *d)
{
    const pw_graph *g = rb->cfg.plan.graph;
    const int C = rb->C, S = rb->S;
    const int64_t budget = rb->cfg.plan.memory_budget;
    pw_partition_config pc;
    pw_plan_partition_config(&rb->cfg.plan, C, rb->inflight, &pc);
    pc.method = PW_PARTITION_BALANCED;
    pc.devices = NULL;
    pc.memory_budget = 0; /* checked per rank below (a rank may hold several chunks) */
    pw_partition model = {0}, now = {0}, best = {0};
    pw_device_spec *dev = calloc((size_t)C, sizeof *dev);
    pw_status st = dev ? PW_OK : pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    /* The ranks' speeds: the model's time for their chunks over the measured. */
    if (st == PW_OK) st = pw_partition_evaluate(g, &pc, rb->cuts, &model);
    if (st != PW_OK) goto out;
    rank_model(rb, &model, rb->tmp);
    /* A rank the model gives almost nothing (a stage that only flattens its
     * input) measures mostly what the model leaves out (loading the
     * micro-batch, the callbacks themselves): k, a tenth of the mean model
     * time per rank, added to both sides keeps such a ratio near 1 and
     * leaves a slow rank with real work slow. */
    double k = 0;
    for (int r = 0; r < S; r++) k += rb->tmp[r];
    k *= 0.1 / S;
    for (int r = 0; r < S; r++)
        rb->speed[r] = rb->med[r] > 0 && rb->tmp[r] > 0 ? (rb->tmp[r] + k) / (rb->med[r] + k) : 1.0;
    for (int c = 0; c < C; c++) dev[c].speed = rb->speed[pw_schedule_rank_of(rb->cfg.schedule, c)];
    pc.devices = dev;
    if (S == 1 || C == 1) {
        snprintf(d->why, sizeof d->why, "one stage: nothing to move");
        goto out;
    }
    PW_CHECK_GOTO(pw_partition_evaluate(g, &pc, rb->cuts, &now), st, out);
    if (budget > 0 && S == C) pc.memory_budget = budget; /* one chunk per rank: the planner keeps to it */
    st = pw_partition_plan(g, &pc, &best);
    if (st == PW_ERR_NOMEM) {
        snprintf(d->why, sizeof d->why, "no other split fits the memory budget");
        st = PW_OK;
        goto out;
    }
    if (st != PW_OK) goto out;
    double t_now, t_best;
    PW_CHECK_GOTO(simulate(rb, &now, &t_now), st, out);
    PW_CHECK_GOTO(simulate(rb, &best, &t_best), st, out);
    memcpy(rb->proposal, best.begin, sizeof(int) * (size_t)(C + 1));
    d->predicted_gain = t_now > 0 ? 1.0 - t_best / t_now : 0.0;
    d->predicted_step_s = d->measured_step_s * (t_now > 0 ? t_best / t_now : 1.0);
    int which;
    const int64_t need = rank_memory(rb, &best, &which);
    if (!memcmp(rb->proposal, rb->cuts, sizeof(int) * (size_t)(C + 1)))
        snprintf(d->why, sizeof d->why, "the cuts are the best for the measured speeds");
    else if (budget > 0 && need > budget)
        snprintf(d->why, sizeof d->why, "the best split needs %.1f MiB on stage %d, over the budget of %.1f MiB",
                 (double)need / 1048576.0, which, (double)budget / 1048576.0);
    else if (d->predicted_gain < rb->cfg.min_gain)
        snprintf(d->why, sizeof d->why, "predicted gain %.1f%% is below %.1f%%", 100 * d->predicted_gain,
                 100 * rb->cfg.min_gain);
    else if (rb->now < rb->rejected_until && near(rb, rb->rejected, rb->proposal))
        snprintf(d->why, sizeof d->why, "predicted gain %.1f%%, but a move to these cuts measured slower "
                 "and was undone (not again before step %lld)", 100 * d->predicted_gain,
                 (long long)rb->rejected_until);
    else if (rb->cfg.mode == PW_REBALANCE_AUTO && !(rb->has_pending && near(rb, rb->pending, rb->proposal))) {
        /* A window can be unlucky (another job took the core for a while):
         * AUTO moves when two windows in a row want nearly the same cuts
         * (noise moves a cut by a node or two; a contended machine makes
         * every window want something else), to the second one's. */
        memcpy(rb->pending, rb->proposal, sizeof(int) * (size_t)(C + 1));
        rb->has_pending = 1;
        snprintf(d->why, sizeof d->why, "predicted gain %.1f%%: to be confirmed by the next window",
                 100 * d->predicted_gain);
        goto out;
    } else {
        d->move = 1;
        d->new_cuts = rb->proposal;
        snprintf(d->why, sizeof d->why, "predicted gain %.1f%% (step %.2f ms -> %.2f ms)", 100 * d->predicted_gain,
                 1e3 * d->measured_step_s, 1e3 * d->predicted_step_s);
    }
    rb->has_pending = 0;
out:
    free(dev);
    pw_partition_free(&model);
    pw_partition_free(&now);
    pw_partition_free(&best);
    return st;
}

pw_status pw_rebalancer_observe(pw_rebalancer *rb, int64_t step, const double *busy, double step_s,
                                pw_rebalance_decision *d)
{
    memset(d, 0, sizeof *d);
    d->n_cuts = rb->C + 1;
    d->old_cuts = d->new_cuts = rb->cuts;
    d->rank_busy_s = rb->med;
    d->rank_speed = rb->speed;
    if (rb->cfg.mode == PW_REBALANCE_OFF) return PW_OK;
    if (rb->skip > 0) {
        rb->skip--;
        return PW_OK;
    }
    const int S = rb->S, W = rb->window;
    rb->now = step;
    memcpy(rb->busy + (size_t)rb->n * (size_t)S, busy, sizeof(double) * (size_t)S);
    rb->step_s[rb->n++] = step_s;
    if (rb->n < W) return PW_OK;
    rb->n = 0;
    for (int r = 0; r < S; r++) rb->med[r] = median(rb->busy + r, W, S, rb->tmp);
    const double m = median(rb->step_s, W, 1, rb->tmp);
    d->measured_step_s = m;
    if (rb->measuring) {
        rb->measuring = 0;
        d->measured = 1;
        d->measured_step = rb->moved_step;
        d->measured_before_s = rb->before_s;
        d->measured_after_s = m;
        d->measured_gain = rb->before_s > 0 ? 1.0 - m / rb->before_s : 0.0;
        /* A move that did not deliver the gain it needed: the predictions
         * are not to be trusted on this machine now; wait longer (up to 16
         * times the interval) before the next. */
        if (d->measured_gain < 0.5 * rb->cfg.min_gain) rb->backoff = rb->backoff < 16 ? 2 * rb->backoff : 16;
        else rb->backoff = 1;
        /* A move that made the step slower by more than the gain a move
         * needs is undone at once (AUTO; never a revert itself): the model
         * was wrong here (a contended core, an op whose cost the profile
         * missed), and the measurement is what counts. Its cuts are not
         * proposed again for 8 intervals. */
        if (rb->cfg.mode == PW_REBALANCE_AUTO && !rb->last_revert && d->measured_gain < -rb->cfg.min_gain) {
            memcpy(rb->rejected, rb->cuts, sizeof(int) * (size_t)(rb->C + 1));
            rb->rejected_until = step + 8 * (int64_t)rb->min_interval;
            rb->last_median = m;
            d->decided = d->move = d->revert = 1;
            d->new_cuts = rb->prev;
            d->predicted_step_s = rb->before_s;
            d->predicted_gain = 1.0 - rb->before_s / m;
            snprintf(d->why, sizeof d->why, "the move after step %lld measured %.1f%% slower "
                     "(%.2f ms -> %.2f ms): back to the cuts before it", (long long)rb->moved_step,
                     -100 * d->measured_gain, 1e3 * rb->before_s, 1e3 * m);
            return PW_OK;
        }
    }
    rb->last_median = m;
    if (rb->last_move >= 0 && step - rb->last_move < (int64_t)rb->min_interval * rb->backoff) return PW_OK;
    d->decided = 1;
    return decide(rb, d);
}

void pw_rebalancer_moved(pw_rebalancer *rb, int64_t step, const int *cuts, const pw_schedule *schedule,
                         const pw_schedule_report *report)
{
    rb->cfg.schedule = schedule;
    rb->cfg.report = report;
    rb->has_pending = 0;
    /* A move back to the cuts before the last one is a revert, whoever
     * asked for it. */
    rb->last_revert = rb->last_move >= 0 && !memcmp(cuts, rb->prev, sizeof(int) * (size_t)(rb->C + 1));
    if (cuts == rb->prev) { /* a revert's new_cuts: swap */
        int *t = rb->prev;
        rb->prev = rb->cuts;
        rb->cuts = t;
    } else {
        memcpy(rb->prev, rb->cuts, sizeof(int) * (size_t)(rb->C + 1));
        memcpy(rb->cuts, cuts, sizeof(int) * (size_t)(rb->C + 1));
    }
    rb->last_move = step;
    rb->measuring = rb->last_median > 0;
    rb->moved_step = step;
    rb->before_s = rb->last_median;
    rb->n = 0;
    rb->skip = 1;
}
