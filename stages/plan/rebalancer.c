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
#define JUMP_STEPS 3        /* steps in a row beyond the last window's level: a jump */
#define JUMP_FRACTION 0.15  /* ... by more than this fraction of its median */
#define JUMP_SPREADS 4.0    /* ... and more than this many of its spreads (1.4826 × MAD) */
#define REFINE_TRIES 5      /* neighbouring cuts tried after one move of the model */
#define MEMO 16             /* cuts whose step time is remembered */
#define MEMO_INTERVALS 32   /* a remembered time lasts this many intervals (or to a jump) */

/* What the last offered move was (pw_rebalancer_moved tells which was made). */
enum { MOVE_NONE = 0, MOVE_MODEL, MOVE_REVERT, MOVE_TRY, MOVE_BACK, MOVE_FORCED };
/* Measured refinement after a move of the model. */
enum { REFINE_IDLE = 0, REFINE_ARMED, REFINE_TRYING };

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
    /* Which move was offered last and which one was made. */
    int offered, moved_kind;  /* MOVE_* */
    /* Measured refinement: the best cuts it measured, their window. */
    int refine;               /* REFINE_* */
    int *base;                /* [C + 1] */
    double base_s;            /* their window's median step time */
    double *base_med;         /* [S] their ranks' median busy times */
    int tries;                /* neighbouring cuts tried since the model's move */
    int *trial;               /* [C + 1] the cuts on trial */
    /* Cuts measured since the step time last jumped: their latest window. */
    int n_memo;
    int *memo_cuts;           /* [MEMO][C + 1] */
    double memo_s[MEMO];
    int64_t memo_step[MEMO];  /* the window's last step */
    /* Jump detection: the last full window's level and the last steps. */
    int ref_valid;
    double ref_s, ref_spread;
    int ring_n;               /* steps in the ring (at most JUMP_STEPS) */
    double ring_s[JUMP_STEPS];
    double *ring_busy;        /* [JUMP_STEPS][S] */
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
    free(rb->base);
    free(rb->base_med);
    free(rb->trial);
    free(rb->memo_cuts);
    free(rb->ring_busy);
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
    rb->base = malloc((C + 1) * sizeof(int));
    rb->base_med = calloc(S, sizeof(double));
    rb->trial = malloc((C + 1) * sizeof(int));
    rb->memo_cuts = malloc(MEMO * (C + 1) * sizeof(int));
    rb->ring_busy = calloc(JUMP_STEPS * S, sizeof(double));
    if (!rb->cuts || !rb->proposal || !rb->pending || !rb->prev || !rb->rejected || !rb->inflight || !rb->busy ||
        !rb->step_s || !rb->med || !rb->speed || !rb->tmp || !rb->base || !rb->base_med ||
        !rb->trial || !rb->memo_cuts || !rb->ring_busy) {
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

static int same(const pw_rebalancer *rb, const int *a, const int *b)
{
    return !memcmp(a, b, sizeof(int) * (size_t)(rb->C + 1));
}

/* ---- the cuts measured since the step time last jumped ---- */

static int *memo_at(const pw_rebalancer *rb, int i) { return rb->memo_cuts + (size_t)i * (size_t)(rb->C + 1); }

/* The entry of `cuts` still valid now, or -1. */
static int memo_find(const pw_rebalancer *rb, const int *cuts)
{
    const int64_t life = (int64_t)MEMO_INTERVALS * rb->min_interval;
    for (int i = 0; i < rb->n_memo; i++)
        if (rb->now - rb->memo_step[i] <= life && same(rb, memo_at(rb, i), cuts)) return i;
    return -1;
}

/* `cuts` measured `s` a step over the window that ends now (replaces an
 * older figure of the same cuts, else the oldest entry when full). */
static void memo_put(pw_rebalancer *rb, const int *cuts, double s)
{
    int i = 0;
    while (i < rb->n_memo && !same(rb, memo_at(rb, i), cuts)) i++;
    if (i == rb->n_memo) {
        if (rb->n_memo < MEMO) {
            rb->n_memo++;
        } else {
            i = 0;
            for (int j = 1; j < MEMO; j++)
                if (rb->memo_step[j] < rb->memo_step[i]) i = j;
        }
        memcpy(memo_at(rb, i), cuts, sizeof(int) * (size_t)(rb->C + 1));
    }
    rb->memo_s[i] = s;
    rb->memo_step[i] = rb->now;
}

/* ---- the change detector ---- */

/* Whether the last JUMP_STEPS step times all lie beyond the last full
 * window's median, on the same side, by more than JUMP_FRACTION of it and
 * JUMP_SPREADS of its spread. */
static int jumped(const pw_rebalancer *rb)
{
    if (!rb->ref_valid || rb->ring_n < JUMP_STEPS) return 0;
    double thr = JUMP_FRACTION * rb->ref_s;
    if (JUMP_SPREADS * rb->ref_spread > thr) thr = JUMP_SPREADS * rb->ref_spread;
    int up = 0, down = 0;
    for (int i = 0; i < JUMP_STEPS; i++) {
        up += rb->ring_s[i] > rb->ref_s + thr;
        down += rb->ring_s[i] < rb->ref_s - thr;
    }
    return up == JUMP_STEPS || down == JUMP_STEPS;
}

static void ring_push(pw_rebalancer *rb, const double *busy, double step_s)
{
    const size_t S = (size_t)rb->S;
    if (rb->ring_n == JUMP_STEPS) {
        memmove(rb->ring_s, rb->ring_s + 1, sizeof(double) * (JUMP_STEPS - 1));
        memmove(rb->ring_busy, rb->ring_busy + S, sizeof(double) * S * (JUMP_STEPS - 1));
        rb->ring_n--;
    }
    rb->ring_s[rb->ring_n] = step_s;
    memcpy(rb->ring_busy + (size_t)rb->ring_n * S, busy, sizeof(double) * S);
    rb->ring_n++;
}

/* The step time jumped: the window starts again with the steps after the
 * jump, and what was measured or decided before it no longer holds. */
static void restart(pw_rebalancer *rb, pw_rebalance_decision *d)
{
    const size_t S = (size_t)rb->S;
    const double was = rb->ref_s;
    memcpy(rb->step_s, rb->ring_s, sizeof(double) * (size_t)rb->ring_n);
    memcpy(rb->busy, rb->ring_busy, sizeof(double) * S * (size_t)rb->ring_n);
    rb->n = rb->ring_n;
    rb->ref_valid = 0;
    rb->has_pending = 0;      /* a proposal from before the jump */
    rb->backoff = 1;          /* moves that did not pay, before it */
    rb->rejected_until = -1;  /* cuts that measured slower, before it */
    rb->n_memo = 0;
    rb->measuring = 0;        /* a gain across the jump would be the jump's */
    rb->refine = REFINE_IDLE;
    double now = median(rb->ring_s, rb->ring_n, 1, rb->tmp);
    d->restarted = 1;
    snprintf(d->why, sizeof d->why, "the step time jumped from %.2f ms to %.2f ms: the window starts again "
             "with the last %d steps", 1e3 * was, 1e3 * now, rb->ring_n);
}

/* ---- the model ---- */

/* The decision of a full window (rb->med holds its medians). *settled: 1
 * when the model has no move to make (its best cuts are these, its gain
 * too small, its cuts measured slower, or over the budget). */
static pw_status decide(pw_rebalancer *rb, pw_rebalance_decision *d, int *settled)
{
    const pw_graph *g = rb->cfg.plan.graph;
    const int C = rb->C, S = rb->S;
    const int64_t budget = rb->cfg.plan.memory_budget;
    *settled = 0;
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
        *settled = 1;
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
    const int seen = memo_find(rb, rb->proposal);
    *settled = 1;
    if (same(rb, rb->proposal, rb->cuts))
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
    else if (rb->cfg.mode == PW_REBALANCE_AUTO && seen >= 0 &&
             rb->memo_s[seen] >= rb->last_median * (1.0 - rb->cfg.min_gain))
        /* The measurement beats the model: these cuts ran (a refinement
         * left them, or a move came from them) and were not faster. */
        snprintf(d->why, sizeof d->why, "predicted gain %.1f%%, but these cuts measured %.2f ms a step "
                 "(window to step %lld) against %.2f ms now", 100 * d->predicted_gain,
                 1e3 * rb->memo_s[seen], (long long)rb->memo_step[seen], 1e3 * rb->last_median);
    else if (rb->cfg.mode == PW_REBALANCE_AUTO && !(rb->has_pending && near(rb, rb->pending, rb->proposal))) {
        /* A window can be unlucky (another job took the core for a while):
         * AUTO moves when two windows in a row want nearly the same cuts
         * (noise moves a cut by a node or two; a contended machine makes
         * every window want something else), to the second one's. */
        memcpy(rb->pending, rb->proposal, sizeof(int) * (size_t)(C + 1));
        rb->has_pending = 1;
        *settled = 0;
        snprintf(d->why, sizeof d->why, "predicted gain %.1f%%: to be confirmed by the next window",
                 100 * d->predicted_gain);
        goto out;
    } else {
        *settled = 0;
        d->move = 1;
        d->new_cuts = rb->proposal;
        rb->offered = MOVE_MODEL;
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

/* ---- measured refinement ---- */

/* Whether `cuts` fit the memory budget (no budget: yes). */
static pw_status fits(const pw_rebalancer *rb, const int *cuts, int *ok)
{
    *ok = 1;
    if (rb->cfg.plan.memory_budget <= 0) return PW_OK;
    pw_partition_config pc;
    pw_plan_partition_config(&rb->cfg.plan, rb->C, rb->inflight, &pc);
    pc.memory_budget = 0;
    pw_partition p = {0};
    pw_status st = pw_partition_evaluate(rb->cfg.plan.graph, &pc, cuts, &p);
    int which;
    if (st == PW_OK) *ok = rank_memory(rb, &p, &which) <= rb->cfg.plan.memory_budget;
    pw_partition_free(&p);
    return st;
}

/* The next neighbouring cut of the refinement's base into rb->trial: one
 * node either way across the boundary between the stage the base's
 * measured busy times call the bottleneck and its less busy neighbour —
 * the bottleneck giving a node first, then taking one — that was not
 * measured since the last jump and fits the budget. The bottleneck's other
 * boundary only when neither way is possible at that one (a one-node
 * chunk, the budget). *found: 0 when none is left. */
static pw_status next_trial(pw_rebalancer *rb, int *found, int *stage)
{
    const int C = rb->C;
    *found = 0;
    int b = 0;
    for (int r = 1; r < rb->S; r++)
        if (rb->base_med[r] > rb->base_med[b]) b = r;
    *stage = b;
    /* Boundary k is cut index k (between chunks k − 1 and k); +1 moves a
     * node from chunk k to chunk k − 1. */
    const int left = b, right = b + 1; /* the bottleneck's two boundaries */
    int first = right, second = left;
    if (b == 0) first = right, second = -1;
    else if (b == C - 1) first = left, second = -1;
    else if (rb->base_med[b - 1] < rb->base_med[b + 1]) first = left, second = right;
    const int bound[2] = {first, second};
    for (int i = 0; i < 2; i++) {
        const int k = bound[i];
        if (k <= 0 || k >= C) continue;
        int possible = 0;
        for (int j = 0; j < 2; j++) {
            const int dir = (k == left) == (j == 0) ? +1 : -1; /* j = 0: the bottleneck gives */
            memcpy(rb->trial, rb->base, sizeof(int) * (size_t)(C + 1));
            rb->trial[k] += dir;
            if (rb->trial[k] <= rb->trial[k - 1] || rb->trial[k] >= rb->trial[k + 1]) continue;
            int ok;
            PW_CHECK(fits(rb, rb->trial, &ok));
            if (!ok) continue;
            possible = 1;
            if (memo_find(rb, rb->trial) >= 0) continue;
            if (rb->now < rb->rejected_until && same(rb, rb->rejected, rb->trial)) continue;
            *found = 1;
            return PW_OK;
        }
        if (possible) break; /* this boundary's neighbours are measured: done */
    }
    return PW_OK;
}

static void say_cuts(char *buf, size_t n, const int *c, int C)
{
    size_t k = 0;
    buf[0] = '\0';
    for (int i = 0; i < C && k < n; i++) {
        int w = snprintf(buf + k, n - k, "%s[%d,%d)", i ? " " : "", c[i], c[i + 1]);
        if (w < 0) break;
        k += (size_t)w;
    }
}

/* The refinement's next move from where it stands: a trial of the next
 * neighbouring cut (within REFINE_TRIES), else back to the base when a
 * trial is what runs now, else the refinement ends. `what` starts the
 * reason. */
static pw_status refine_next(pw_rebalancer *rb, pw_rebalance_decision *d, const char *what)
{
    int found = 0, b = 0;
    if (rb->tries < REFINE_TRIES) PW_CHECK(next_trial(rb, &found, &b));
    char cuts[160];
    d->decided = 1;
    if (found) {
        rb->tries++;
        rb->refine = REFINE_TRYING;
        rb->offered = MOVE_TRY;
        d->move = d->refine = 1;
        d->new_cuts = rb->trial;
        d->predicted_step_s = rb->base_s;
        say_cuts(cuts, sizeof cuts, rb->trial, rb->C);
        snprintf(d->why, sizeof d->why, "%srefining: trying %s (stage %d measured the slowest; try %d of %d)", what,
                 cuts, b, rb->tries, REFINE_TRIES);
    } else if (!same(rb, rb->cuts, rb->base)) {
        rb->refine = REFINE_IDLE;
        rb->offered = MOVE_BACK;
        d->move = d->refine = d->revert = 1;
        d->new_cuts = rb->base;
        d->predicted_step_s = rb->base_s;
        say_cuts(cuts, sizeof cuts, rb->base, rb->C);
        snprintf(d->why, sizeof d->why, "%srefining: back to %s (%.2f ms a step), no neighbour measured faster",
                 what, cuts, 1e3 * rb->base_s);
    } else {
        rb->refine = REFINE_IDLE;
        snprintf(d->why, sizeof d->why, "%srefined: no neighbouring cut measured faster than these (%.2f ms a step)",
                 what, 1e3 * rb->base_s);
    }
    return PW_OK;
}

/* The window after a trial measured `m` (rb->med its ranks): a trial
 * faster than the base by more than min_gain becomes the base, and the
 * refinement walks on from it; else the next neighbour of the base, or
 * back to it. */
static pw_status refine_measured(pw_rebalancer *rb, pw_rebalance_decision *d, double m)
{
    char what[96];
    const double gain = rb->base_s > 0 ? 1.0 - m / rb->base_s : 0.0;
    if (gain > rb->cfg.min_gain) {
        snprintf(what, sizeof what, "kept the trial (%.1f%% faster); ", 100 * gain);
        memcpy(rb->base, rb->cuts, sizeof(int) * (size_t)(rb->C + 1));
        rb->base_s = m;
        memcpy(rb->base_med, rb->med, sizeof(double) * (size_t)rb->S);
    } else {
        snprintf(what, sizeof what, "the trial measured %.1f%% %s; ", 100 * fabs(gain), gain >= 0 ? "faster" : "slower");
    }
    return refine_next(rb, d, what);
}

pw_status pw_rebalancer_observe(pw_rebalancer *rb, int64_t step, const double *busy, double step_s,
                                pw_rebalance_decision *d)
{
    memset(d, 0, sizeof *d);
    d->n_cuts = rb->C + 1;
    d->old_cuts = d->new_cuts = rb->cuts;
    d->rank_busy_s = rb->med;
    d->rank_speed = rb->speed;
    d->predicted_gain = NAN;
    rb->offered = MOVE_NONE;
    if (rb->cfg.mode == PW_REBALANCE_OFF) return PW_OK;
    if (rb->skip > 0) {
        rb->skip--;
        return PW_OK;
    }
    const int S = rb->S, W = rb->window;
    rb->now = step;
    memcpy(rb->busy + (size_t)rb->n * (size_t)S, busy, sizeof(double) * (size_t)S);
    rb->step_s[rb->n++] = step_s;
    ring_push(rb, busy, step_s);
    if (rb->cfg.mode == PW_REBALANCE_AUTO && W > JUMP_STEPS && jumped(rb)) {
        restart(rb, d);
        return PW_OK;
    }
    if (rb->n < W) return PW_OK;
    rb->n = 0;
    for (int r = 0; r < S; r++) rb->med[r] = median(rb->busy + r, W, S, rb->tmp);
    const double m = median(rb->step_s, W, 1, rb->tmp);
    d->measured_step_s = m;
    /* This window's level and spread, for the change detector. */
    for (int i = 0; i < W; i++) rb->tmp[i] = fabs(rb->step_s[i] - m);
    rb->ref_spread = 1.4826 * median(rb->tmp, W, 1, rb->tmp);
    rb->ref_s = m;
    rb->ref_valid = 1;
    if (rb->cfg.mode == PW_REBALANCE_AUTO) memo_put(rb, rb->cuts, m);
    if (rb->measuring) {
        rb->measuring = 0;
        d->measured = 1;
        d->measured_step = rb->moved_step;
        d->measured_before_s = rb->before_s;
        d->measured_after_s = m;
        d->measured_gain = rb->before_s > 0 ? 1.0 - m / rb->before_s : 0.0;
        if (rb->moved_kind == MOVE_TRY && rb->refine == REFINE_TRYING) {
            rb->last_median = m;
            return refine_measured(rb, d, m);
        }
        if (rb->moved_kind == MOVE_MODEL || rb->moved_kind == MOVE_FORCED) {
            /* A move that did not deliver the gain it needed: the
             * predictions are not to be trusted on this machine now; wait
             * longer (up to 16 times the interval) before the next. */
            if (d->measured_gain < 0.5 * rb->cfg.min_gain) rb->backoff = rb->backoff < 16 ? 2 * rb->backoff : 16;
            else rb->backoff = 1;
        }
        /* A move that made the step slower by more than the gain a move
         * needs is undone at once (AUTO; never a revert itself): the model
         * was wrong here (a contended core, an op whose cost the profile
         * missed), and the measurement is what counts. Its cuts are not
         * proposed again for 8 intervals. */
        if (rb->cfg.mode == PW_REBALANCE_AUTO && !rb->last_revert && d->measured_gain < -rb->cfg.min_gain) {
            memcpy(rb->rejected, rb->cuts, sizeof(int) * (size_t)(rb->C + 1));
            rb->rejected_until = step + 8 * (int64_t)rb->min_interval;
            rb->last_median = m;
            rb->refine = REFINE_IDLE;
            rb->offered = MOVE_REVERT;
            d->decided = d->move = d->revert = 1;
            d->new_cuts = rb->prev;
            d->predicted_step_s = rb->before_s;
            d->predicted_gain = 1.0 - rb->before_s / m;
            snprintf(d->why, sizeof d->why, "the move after step %lld measured %.1f%% slower "
                     "(%.2f ms -> %.2f ms): back to the cuts before it", (long long)rb->moved_step,
                     -100 * d->measured_gain, 1e3 * rb->before_s, 1e3 * m);
            return PW_OK;
        }
        /* A move of the model that stands: once the model has no further
         * move, its neighbouring cuts are measured (refine_next). */
        if (rb->cfg.mode == PW_REBALANCE_AUTO && rb->moved_kind == MOVE_MODEL) rb->refine = REFINE_ARMED;
    }
    rb->last_median = m;
    const int64_t due = rb->last_move + (int64_t)rb->min_interval * rb->backoff;
    /* Armed, the refinement asks the model at once whether it has a further
     * move; a move it wants still waits for the interval. */
    if (rb->refine != REFINE_ARMED && rb->last_move >= 0 && step < due) return PW_OK;
    d->decided = 1;
    int settled;
    PW_CHECK(decide(rb, d, &settled));
    if (d->move && rb->last_move >= 0 && step < due) {
        d->move = 0;
        d->new_cuts = rb->cuts;
        rb->offered = MOVE_NONE;
        memcpy(rb->pending, rb->proposal, sizeof(int) * (size_t)(rb->C + 1));
        rb->has_pending = 1;
        const size_t k = strlen(d->why);
        snprintf(d->why + k, sizeof d->why - k, "; not before step %lld (the interval)", (long long)due);
        return PW_OK;
    }
    if (rb->refine == REFINE_ARMED && settled && !d->move) {
        if (rb->S != rb->C) {
            rb->refine = REFINE_IDLE; /* several chunks per rank: the model's cuts stand */
            return PW_OK;
        }
        char what[300];
        snprintf(what, sizeof what, "%s; ", d->why);
        memcpy(rb->base, rb->cuts, sizeof(int) * (size_t)(rb->C + 1));
        rb->base_s = m;
        memcpy(rb->base_med, rb->med, sizeof(double) * (size_t)S);
        rb->tries = 0;
        d->predicted_gain = NAN;
        PW_CHECK(refine_next(rb, d, what));
    }
    return PW_OK;
}

void pw_rebalancer_moved(pw_rebalancer *rb, int64_t step, const int *cuts, const pw_schedule *schedule,
                         const pw_schedule_report *report)
{
    rb->cfg.schedule = schedule;
    rb->cfg.report = report;
    rb->has_pending = 0;
    /* Which move this was: the one offered by the last decision, or one
     * the caller chose (forced; a refinement then ends). */
    const int *offered = rb->offered == MOVE_TRY ? rb->trial
                         : rb->offered == MOVE_BACK ? rb->base
                         : rb->offered == MOVE_REVERT ? rb->prev
                         : rb->proposal;
    rb->moved_kind = rb->offered != MOVE_NONE && same(rb, cuts, offered) ? rb->offered : MOVE_FORCED;
    rb->offered = MOVE_NONE;
    if (rb->moved_kind != MOVE_TRY) rb->refine = REFINE_IDLE;
    /* A move back to the cuts before the last one is a revert, whoever
     * asked for it. */
    rb->last_revert = rb->moved_kind == MOVE_BACK ||
                      (rb->last_move >= 0 && !memcmp(cuts, rb->prev, sizeof(int) * (size_t)(rb->C + 1)));
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
    /* A trial is measured against the refinement's base (a trial may follow
     * a trial that measured slower, without going back in between). */
    rb->before_s = rb->moved_kind == MOVE_TRY ? rb->base_s : rb->last_median;
    rb->n = 0;
    rb->skip = 1;
    rb->ring_n = 0;
    rb->ref_valid = 0;
}
