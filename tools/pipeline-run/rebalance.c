/* pipeline-run --rebalance and --rebalance-at (rebalance.h). */
#include "tools/pipeline-run/rebalance.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"
#include "stages/plan/rebalancer.h"
#include "stages/train/rebalance.h"

#define MAX_CUTS 257

typedef struct forced_move {
    int64_t step;
    int cuts[MAX_CUTS];
} forced_move;

struct pr_rebalance {
    pr_rebalance_config cfg;
    pw_rebalancer *rb;           /* NULL: only forced moves (or not the deciding process) */
    pw_profile *own_profile;     /* measured here for the decision */
    forced_move *forced;
    int n_forced;
    int S, C;
    double *busy, *last;         /* [S] this step's busy seconds, and the totals before it */
    unsigned char *msg;          /* under mpirun: world × (the decision's bytes) */
    int decides;                 /* 1: this process runs the rebalancer (one process, or world rank 0) */
};

static int say(const pr_rebalance *r) { return !r->cfg.quiet && (!r->cfg.t || r->cfg.t->world_rank == 0); }

static void print_cuts(const int *c, int n)
{
    for (int i = 0; i + 1 < n; i++) printf(" [%d,%d)", c[i], c[i + 1]);
}

/* "STEP:C1,C2,...[/STEP:...]" with C − 1 interior cuts each. */
static int parse_forced(pr_rebalance *r, const char *spec, int n_nodes)
{
    for (const char *s = spec; s && *s;) {
        forced_move *f = realloc(r->forced, sizeof *f * (size_t)(r->n_forced + 1));
        if (!f) return fprintf(stderr, "pipeline-run: out of memory\n"), 1;
        r->forced = f;
        f = &r->forced[r->n_forced];
        char *end;
        long long step = strtoll(s, &end, 10);
        if (end == s || *end != ':' || step < 1) goto bad;
        s = end + 1;
        f->step = step;
        f->cuts[0] = 0;
        for (int c = 1; c < r->C; c++) {
            long v = strtol(s, &end, 10);
            if (end == s || v <= f->cuts[c - 1] || v >= n_nodes || (c + 1 < r->C ? *end != ',' : *end && *end != '/'))
                goto bad;
            f->cuts[c] = (int)v;
            s = *end == ',' ? end + 1 : end;
        }
        f->cuts[r->C] = n_nodes;
        r->n_forced++;
        if (*s == '/') s++;
        else if (*s) goto bad;
    }
    return 0;
bad:
    fprintf(stderr, "pipeline-run: --rebalance-at %s: want STEP:C1,...,C%d[/STEP:...]: a step >= 1, then the %d "
            "first nodes of chunks 1..%d, increasing, in [1, %d)\n", spec, r->C - 1, r->C - 1, r->C - 1, n_nodes);
    return 2;
}

void pr_rebalance_close(pr_rebalance *r)
{
    if (!r) return;
    pw_rebalancer_destroy(r->rb);
    pw_profile_destroy(r->own_profile);
    free(r->forced);
    free(r->busy);
    free(r->last);
    free(r->msg);
    free(r);
}

/* The rebalancer of the deciding process, its op times measured here when
 * the run has no profile. 0, or 1 after the message. */
static int open_rebalancer(pr_rebalance *r, pw_rebalance_mode mode, int every, pw_pipeline *pl)
{
    pw_rebalancer_config rc = pw_rebalancer_defaults();
    rc.mode = mode;
    rc.every = every;
    rc.min_gain = r->cfg.min_gain;
    rc.plan = r->cfg.plan;
    rc.schedule = pw_pipeline_schedule(pl);
    rc.report = pw_pipeline_report(pl);
    rc.plan.profile = r->cfg.profile;
    if (!rc.plan.profile) {
        /* FLOPs miss what an op really costs here (a layernorm is slower
         * than its FLOPs say); the stage programs' own kernels, timed once. */
        pw_profile_config prc = {.micro_batch = rc.plan.micro_batch_size, .threads = 1, .optim = rc.plan.optim};
        if (pw_profile_measure(rc.plan.graph, &prc, &r->own_profile) != PW_OK) {
            fprintf(stderr, "pipeline-run: --rebalance: measuring the op times: %s\n", pw_last_error());
            return 1;
        }
        rc.plan.profile = r->own_profile;
    }
    rc.plan.balance = PW_BALANCE_TIME;
    const pw_partition *part = pw_pipeline_partition(pl);
    if (pw_rebalancer_create(&rc, part->begin, &r->rb) != PW_OK) {
        fprintf(stderr, "pipeline-run: --rebalance: %s\n", pw_last_error());
        return 1;
    }
    return 0;
}

int pr_rebalance_open(const pr_rebalance_config *cfg, pw_pipeline *pl, pr_rebalance **out)
{
    *out = NULL;
    pw_rebalance_mode mode = PW_REBALANCE_OFF;
    int every = 0;
    if (cfg->mode && pw_rebalance_parse(cfg->mode, &mode, &every) != PW_OK) {
        fprintf(stderr, "pipeline-run: %s\n", pw_last_error());
        return 2;
    }
    if (mode == PW_REBALANCE_OFF && !cfg->forced) return 0;
    pr_rebalance *r = calloc(1, sizeof *r);
    if (!r) return fprintf(stderr, "pipeline-run: out of memory\n"), 1;
    r->cfg = *cfg;
    r->S = pw_pipeline_schedule(pl)->n_ranks;
    r->C = pw_pipeline_n_chunks(pl);
    r->decides = !cfg->t || cfg->t->world_rank == 0;
    int rc = 0;
    if (r->C + 1 > MAX_CUTS) {
        fprintf(stderr, "pipeline-run: --rebalance: at most %d chunks (this run has %d)\n", MAX_CUTS - 1, r->C);
        rc = 2;
    }
    if (!rc && cfg->forced) rc = parse_forced(r, cfg->forced, cfg->plan.graph->n_nodes);
    r->busy = calloc((size_t)r->S, sizeof *r->busy);
    r->last = calloc((size_t)r->S, sizeof *r->last);
    if (!rc && cfg->t) r->msg = calloc((size_t)cfg->t->world_size, sizeof(int32_t) * MAX_CUTS);
    if (!rc && (!r->busy || !r->last || (cfg->t && !r->msg))) {
        fprintf(stderr, "pipeline-run: out of memory\n");
        rc = 1;
    }
    if (!rc && mode != PW_REBALANCE_OFF && r->decides) rc = open_rebalancer(r, mode, every, pl);
    if (rc) {
        pr_rebalance_close(r);
        return rc;
    }
    if (say(r) && mode != PW_REBALANCE_OFF)
        printf("pipeline-run: rebalance %s: the cuts move when the best split for the measured stage times is "
               "predicted %.0f%% faster\n", cfg->mode, 100 * (cfg->min_gain > 0 ? cfg->min_gain : 0.05));
    *out = r;
    return 0;
}

/* Under mpirun: world rank 0's decision (a flag, then the cuts) to every process. */
static int share_decision(pr_rebalance *r, int *move, int *cuts)
{
    const pw_transport *t = r->cfg.t;
    if (!t) return 0;
    int32_t mine[MAX_CUTS] = {*move};
    for (int c = 0; c <= r->C && *move; c++) mine[1 + c] = cuts[c];
    const size_t bytes = sizeof(int32_t) * (size_t)(r->C + 2);
    if (pw_transport_allgather(t, mine, bytes, r->msg) != PW_OK) {
        fprintf(stderr, "pipeline-run: --rebalance: %s\n", pw_last_error());
        return 1;
    }
    const int32_t *rank0 = (const int32_t *)r->msg;
    *move = rank0[0];
    for (int c = 0; c <= r->C && *move; c++) cuts[c] = rank0[1 + c];
    return 0;
}

/* The ranks' compute time in the step just done (collective under mpirun). */
static int measure(pr_rebalance *r, pw_pipeline *pl)
{
    if (pw_pipeline_rank_busy(pl, r->busy) != PW_OK) {
        fprintf(stderr, "pipeline-run: --rebalance: %s\n", pw_last_error());
        return 1;
    }
    for (int s = 0; s < r->S; s++) {
        const double total = r->busy[s];
        r->busy[s] -= r->last[s];
        r->last[s] = total;
    }
    return 0;
}

int pr_rebalance_step(pr_rebalance *r, pw_pipeline **pl, int64_t step, double step_s, pr_rebalance_event *ev)
{
    memset(ev, 0, sizeof *ev);
    ev->step = step;
    if (!r) return 0;
    ev->n_cuts = r->C + 1;
    const pw_partition *part = pw_pipeline_partition(*pl);
    memcpy(ev->old_cuts, part->begin, sizeof(int) * (size_t)(r->C + 1));
    if (measure(r, *pl)) return 1;
    int move = 0;
    for (int i = 0; i < r->n_forced && !move; i++)
        if (r->forced[i].step == step) {
            move = ev->forced = 1;
            memcpy(ev->new_cuts, r->forced[i].cuts, sizeof(int) * (size_t)(r->C + 1));
        }
    if (r->rb) {
        pw_rebalance_decision d;
        if (pw_rebalancer_observe(r->rb, step, r->busy, step_s, &d) != PW_OK) {
            fprintf(stderr, "pipeline-run: --rebalance: %s\n", pw_last_error());
            return 1;
        }
        if (d.measured) {
            ev->measured = 1;
            ev->measured_of = d.measured_step;
            ev->measured_gain = d.measured_gain;
            ev->before_s = d.measured_before_s;
            ev->after_s = d.measured_after_s;
            if (say(r))
                printf("rebalance: the move after step %lld: step %.2f ms -> %.2f ms, measured gain %.1f%%\n",
                       (long long)d.measured_step, 1e3 * d.measured_before_s, 1e3 * d.measured_after_s,
                       100 * d.measured_gain);
        }
        if (d.decided && pw_log_enabled(PW_LOG_INFO, PW_SUB_TRAIN)) {
            char sp[256] = "";
            for (int s = 0, k = 0; s < r->S && k < (int)sizeof sp - 40; s++)
                k += snprintf(sp + k, sizeof sp - (size_t)k, " %.2f ms x%.2f", 1e3 * d.rank_busy_s[s], d.rank_speed[s]);
            PW_INFO(PW_SUB_TRAIN, "rebalance at step %lld: stage busy and speed:%s; %s", (long long)step, sp, d.why);
        }
        if (d.restarted && pw_log_enabled(PW_LOG_INFO, PW_SUB_TRAIN))
            PW_INFO(PW_SUB_TRAIN, "rebalance at step %lld: %s", (long long)step, d.why);
        if (d.move && !move) {
            move = 1 + d.revert + 2 * d.refine; /* 1 model, 2 revert, 3 refinement trial, 4 back */
            memcpy(ev->new_cuts, d.new_cuts, sizeof(int) * (size_t)(r->C + 1));
            ev->predicted_gain = d.predicted_gain;
            ev->predicted_step_s = d.predicted_step_s;
            ev->measured_step_s = d.measured_step_s;
        }
    }
    if (share_decision(r, &move, ev->new_cuts)) return 1;
    if (!move) return 0;
    ev->revert = move == 2 || move == 4;
    ev->refine = move >= 3;
    pw_repartition_info info;
    if (pw_pipeline_repartition(pl, ev->new_cuts, r->C + 1, &info) != PW_OK) {
        if (!info.kept) {
            fprintf(stderr, "pipeline-run: %s\n", pw_last_error());
            return 1;
        }
        if (!r->cfg.t || r->cfg.t->world_rank == 0)
            fprintf(stderr, "pipeline-run: %s; training goes on with the cuts it had\n", pw_last_error());
        return 0;
    }
    ev->moved = 1;
    /* The cuts it has (with tensor parallelism a cut inside a column → row
     * pair moved to the nearest boundary outside one). */
    memcpy(ev->new_cuts, pw_pipeline_partition(*pl)->begin, sizeof(int) * (size_t)(r->C + 1));
    ev->move_s = info.seconds;
    ev->bytes = info.bytes_local + info.bytes_received;
    for (int s = 0; s < r->S; s++) r->last[s] = 0; /* the new engine counts from zero */
    if (r->rb) pw_rebalancer_moved(r->rb, step, ev->new_cuts, pw_pipeline_schedule(*pl), pw_pipeline_report(*pl));
    if (say(r)) {
        printf("rebalance after step %lld:", (long long)step);
        print_cuts(ev->old_cuts, r->C + 1);
        printf(" ->");
        print_cuts(ev->new_cuts, r->C + 1);
        if (ev->forced) printf(" (--rebalance-at)");
        else if (ev->refine && ev->revert)
            printf(", refining: back to the fastest cuts measured (%.2f ms a step), no neighbour was faster",
                   1e3 * ev->predicted_step_s);
        else if (ev->refine)
            printf(", refining: a neighbouring cut on trial (the best measured: %.2f ms a step)",
                   1e3 * ev->predicted_step_s);
        else if (ev->revert) printf(", undoing the last move (measured %.2f ms a step, %.2f ms before it)",
                                    1e3 * ev->measured_step_s, 1e3 * ev->predicted_step_s);
        else printf(", predicted gain %.1f%% (step %.2f ms -> %.2f ms)", 100 * ev->predicted_gain,
                    1e3 * ev->measured_step_s, 1e3 * ev->predicted_step_s);
        printf("; moved %.2f MiB in %.1f ms\n", (double)ev->bytes / 1048576.0, 1e3 * ev->move_s);
        fflush(stdout);
    }
    return 0;
}
