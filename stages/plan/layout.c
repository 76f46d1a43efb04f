/* pipewright — the layout search and its built-in model. See layout.h. */
#include "stages/plan/layout.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph/partition.h"
#include "runtime/log.h"
#include "stages/ops/cpu/ops.h"
#include "stages/plan/forecast.h"
#include "stages/program/program.h"

/* The schedules of the search, with their chunks per rank. */
static const struct {
    pw_schedule_kind kind;
    int v;
} kinds[] = {
    {PW_SCHEDULE_GPIPE, 1}, {PW_SCHEDULE_1F1B, 1},  {PW_SCHEDULE_INTERLEAVED, 2}, {PW_SCHEDULE_INTERLEAVED, 4},
    {PW_SCHEDULE_ZB_H1, 1}, {PW_SCHEDULE_ZB_H2, 1}, {PW_SCHEDULE_ZB_V, 2},
};
#define N_KINDS ((int)(sizeof kinds / sizeof kinds[0]))

pw_layout_space pw_layout_space_defaults(void)
{
    pw_layout_space s;
    memset(&s, 0, sizeof s);
    s.recompute = -1;
    s.max_micro_batches = 64;
    return s;
}

const char *pw_layout_describe(const pw_layout *l, char *buf, size_t n)
{
    int len = snprintf(buf, n, "S=%d R=%d T=%d threads=%d M=%d %s", l->stages, l->replicas, l->tensor,
                       l->threads, l->micro_batches, pw_schedule_kind_name(l->schedule));
    if (len > 0 && (size_t)len < n && l->chunks_per_rank > 1)
        len += snprintf(buf + len, n - (size_t)len, " v=%d", l->chunks_per_rank);
    if (len > 0 && (size_t)len < n && l->recompute) snprintf(buf + len, n - (size_t)len, " recompute");
    return buf;
}

/* ------------------------------------------------------------ the space */

/* Thread counts for `ranks` ranks: powers of two up to the cores each
 * rank gets, and that share itself; 1 on GPUs and for several ranks of one
 * team. Returns the count written to t[]. */
static int thread_counts(const pw_layout_space *sp, int ranks, int t[32])
{
    int most = 1;
    if (sp->cores > 0) {
        most = sp->cores / ranks;
        if (sp->shared_team && ranks > 1) most = most > 0 ? 1 : 0;
    }
    int n = 0;
    for (int k = 1; k <= most && n < 31; k *= 2) t[n++] = k;
    if (most > 1 && t[n - 1] != most) t[n++] = most;
    if (sp->threads > 0) { /* pinned */
        int ok = sp->threads <= most;
        t[0] = sp->threads;
        return ok;
    }
    return n;
}

/* The chunks per rank schedule entry k runs with at S stages; 0 when the
 * space leaves it out. */
static int schedule_v(const pw_layout_space *sp, int S, int k)
{
    const pw_schedule_kind kind = kinds[k].kind;
    if (sp->schedule_pinned && kind != sp->schedule) return 0;
    /* One stage: every one-chunk schedule runs the same work on one rank. */
    if (!sp->schedule_pinned && S == 1 && kind != PW_SCHEDULE_1F1B) return 0;
    if (kind == PW_SCHEDULE_INTERLEAVED && sp->chunks_per_rank > 0) /* one entry, at the pinned v */
        return kinds[k - 1].kind == PW_SCHEDULE_INTERLEAVED ? 0 : sp->chunks_per_rank;
    if (sp->chunks_per_rank > 0 && kinds[k].v != sp->chunks_per_rank) return 0;
    return kinds[k].v;
}

/* Appends to *out (growing it); 0 or -1 when out of memory. */
static int push(pw_layout **out, int *n, int *cap, pw_layout l)
{
    if (*n == *cap) {
        int nc = *cap ? 2 * *cap : 64;
        pw_layout *p = realloc(*out, (size_t)nc * sizeof *p);
        if (!p) return -1;
        *out = p;
        *cap = nc;
    }
    (*out)[(*n)++] = l;
    return 0;
}

static pw_status check_space(const pw_layout_space *sp)
{
    if (!sp || sp->batch < 1 || sp->processes < 1 || sp->n_nodes < 1 || sp->cores < 0)
        return pw_error(PW_ERR_INVALID_ARG, "layout: a batch, a process count and the graph's node count "
                        "are needed (each >= 1)");
    if (sp->max_tensor < 0 || sp->tensor < 0)
        return pw_error(PW_ERR_INVALID_ARG, "layout: a tensor-parallel degree must not be negative");
    return PW_OK;
}

/* Whether T is a tensor degree of the space: the pinned one, else 1, or a
 * divisor of the process count up to max_tensor. */
static int tensor_ok(const pw_layout_space *sp, int T)
{
    if (sp->tensor > 0) return T == sp->tensor;
    return T == 1 || (T <= sp->max_tensor && sp->processes % T == 0);
}

pw_status pw_layout_enumerate(const pw_layout_space *sp, pw_layout **out, int *n_out)
{
    *out = NULL;
    *n_out = 0;
    PW_CHECK(check_space(sp));
    const int maxM = sp->max_micro_batches > 0 ? sp->max_micro_batches : 64;
    const int rc = sp->recompute;
    pw_layout *v = NULL;
    int n = 0, cap = 0;
    for (int S = 1; S <= sp->processes; S++) {
        if (sp->stages > 0 && S != sp->stages) continue;
        for (int R = 1; S * R <= sp->processes; R++) {
            if ((sp->replicas > 0 && R != sp->replicas) || sp->batch % R) continue;
            for (int T = 1; S * R * T <= sp->processes; T++) {
                if (!tensor_ok(sp, T)) continue;
                const int ranks = S * R * T;
                if (sp->cores > 0 && ranks > sp->cores) continue;
                int tc[32];
                const int nt = thread_counts(sp, ranks, tc);
                for (int ti = 0; ti < nt; ti++)
                    for (int M = 1; M <= maxM && M <= sp->batch / R; M++) {
                        if ((sp->batch / R) % M || (sp->micro_batches > 0 && M != sp->micro_batches)) continue;
                        for (int k = 0; k < N_KINDS; k++) {
                            const int vv = schedule_v(sp, S, k);
                            if (!vv || S * vv > sp->n_nodes) continue;
                            for (int r = 0; r <= 1; r++) {
                                if (rc >= 0 && r != rc) continue;
                                pw_layout l = {.stages = S, .replicas = R, .tensor = T, .threads = tc[ti],
                                               .micro_batches = M, .schedule = kinds[k].kind,
                                               .chunks_per_rank = vv, .recompute = r};
                                if (push(&v, &n, &cap, l)) {
                                    free(v);
                                    return pw_error(PW_ERR_NOMEM, "layout: out of memory");
                                }
                            }
                        }
                    }
            }
        }
    }
    if (n == 0)
        return pw_error(PW_ERR_INVALID_ARG, "layout: no layout of batch %lld on %d process%s%s%s satisfies "
                        "the fixed axes (stages %d, replicas %d, tensor %d, threads %d, micro-batches %d; 0 = "
                        "searched; replicas x micro-batches must divide the batch%s)", (long long)sp->batch,
                        sp->processes, sp->processes > 1 ? "es" : "", sp->cores ? " and cores " : "",
                        sp->cores ? "given" : "", sp->stages, sp->replicas, sp->tensor, sp->threads,
                        sp->micro_batches,
                        sp->cores ? ", ranks x threads fit the cores" : "");
    *out = v;
    *n_out = n;
    return PW_OK;
}

/* ------------------------------------------------------------ the search */

/* a before b: less step, then less memory, then earlier. */
static int faster(const pw_layout_entry *a, const pw_layout_entry *b)
{
    if (a->cost.step_time != b->cost.step_time) return a->cost.step_time < b->cost.step_time;
    if (a->cost.memory != b->cost.memory) return a->cost.memory < b->cost.memory;
    return a->index < b->index;
}

/* a before b: less memory, then less step, then earlier. */
static int smaller(const pw_layout_entry *a, const pw_layout_entry *b)
{
    if (a->cost.memory != b->cost.memory) return a->cost.memory < b->cost.memory;
    return faster(a, b);
}

static int group(const pw_layout_entry *e) { return e->costed ? (e->fits ? 0 : 1) : 2; }

static int cmp_entry(const void *x, const void *y)
{
    const pw_layout_entry *a = x, *b = y;
    int ga = group(a), gb = group(b);
    if (ga != gb) return ga - gb;
    if (ga == 2) return (a->index > b->index) - (a->index < b->index);
    return faster(a, b) ? -1 : faster(b, a) ? 1 : 0;
}

typedef struct search_ctx {
    pw_layout_entry *e;
    char *state;        /* 0 not costed, 1 costed, 2 failed */
    const pw_layout_model *m;
    int64_t budget;
    pw_status last;
    char last_msg[512];
} search_ctx;

static void cost_one(search_ctx *c, int i)
{
    if (c->state[i]) return;
    pw_layout_entry *e = &c->e[i];
    pw_status st = c->m->cost(c->m->ctx, &e->layout, &e->cost);
    if (st != PW_OK) {
        c->state[i] = 2;
        e->failed_cost = 1;
        c->last = st;
        snprintf(c->last_msg, sizeof c->last_msg, "%s", pw_last_error());
        pw_clear_error();
        return;
    }
    c->state[i] = 1;
    e->costed = 1;
    e->failed_cost = 0;
    e->fits = c->budget <= 0 || e->cost.memory <= c->budget;
}

/* Sort keys for the two passes (qsort has no context argument). */
static const pw_layout_entry *g_sort_entries;
static int by_step_lb(const void *x, const void *y)
{
    const pw_layout_entry *a = &g_sort_entries[*(const int *)x], *b = &g_sort_entries[*(const int *)y];
    if (a->step_lb != b->step_lb) return a->step_lb < b->step_lb ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}
static int by_memory_lb(const void *x, const void *y)
{
    const pw_layout_entry *a = &g_sort_entries[*(const int *)x], *b = &g_sort_entries[*(const int *)y];
    if (a->memory_lb != b->memory_lb) return a->memory_lb < b->memory_lb ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

/* "3.2 MiB" rounded up, so that the figure given back as a budget fits. */
static const char *bytes_up(int64_t b, char *buf, size_t n)
{
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)b;
    int k = 0;
    while (v >= 1024.0 && k < 4) v /= 1024.0, k++;
    if (k == 0) snprintf(buf, n, "%lld B", (long long)b);
    else snprintf(buf, n, "%.1f %s", ceil(v * 10.0) / 10.0, unit[k]);
    return buf;
}

/* The best fitting entry (-1: none), costing in ascending step bound. */
static int pass_time(search_ctx *c, int *order, int n)
{
    int best = -1;
    for (int k = 0; k < n; k++) {
        const int i = order[k];
        if (c->budget > 0 && c->e[i].memory_lb > c->budget) continue; /* cannot fit */
        if (best >= 0 && c->e[i].step_lb > c->e[best].cost.step_time) break;
        cost_one(c, i);
        if (c->e[i].fits && (best < 0 || faster(&c->e[i], &c->e[best]))) best = i;
    }
    return best;
}

/* The entry of least memory (-1: every cost failed), costing in ascending
 * memory bound. */
static int pass_memory(search_ctx *c, int *order, int n)
{
    int least = -1;
    for (int k = 0; k < n; k++) {
        const int i = order[k];
        if (least >= 0 && c->e[i].memory_lb > c->e[least].cost.memory) break;
        cost_one(c, i);
        if (c->e[i].costed && (least < 0 || smaller(&c->e[i], &c->e[least]))) least = i;
    }
    return least;
}

static pw_status run_search(const pw_layout_space *sp, const pw_layout_model *m, int64_t budget,
                            pw_layout_result *res, int use_bounds)
{
    memset(res, 0, sizeof *res);
    res->budget = budget;
    if (!m || !m->cost) return pw_error(PW_ERR_INVALID_ARG, "layout: no cost model");
    pw_layout *cand = NULL;
    int n = 0;
    PW_CHECK(pw_layout_enumerate(sp, &cand, &n));
    search_ctx c = {.m = m, .budget = budget};
    c.e = calloc((size_t)n, sizeof *c.e);
    c.state = calloc((size_t)n, 1);
    int *order = malloc((size_t)n * sizeof *order);
    if (!c.e || !c.state || !order) {
        free(cand);
        free(c.e);
        free(c.state);
        free(order);
        return pw_error(PW_ERR_NOMEM, "layout: out of memory");
    }
    for (int i = 0; i < n; i++) {
        c.e[i].layout = cand[i];
        c.e[i].index = i;
        if (use_bounds && m->bound) m->bound(m->ctx, &cand[i], &c.e[i].step_lb, &c.e[i].memory_lb);
        order[i] = i;
    }
    free(cand);
    g_sort_entries = c.e;
    qsort(order, (size_t)n, sizeof *order, by_step_lb);
    int best = pass_time(&c, order, n);
    pw_status st = PW_OK;
    if (best < 0) {
        qsort(order, (size_t)n, sizeof *order, by_memory_lb);
        best = pass_memory(&c, order, n);
        if (best < 0) {
            st = pw_error(c.last != PW_OK ? c.last : PW_ERR_INVALID_ARG, "layout: no layout could be costed "
                          "(the last error: %s)", c.last_msg);
        } else {
            char need[32], have[32], d[160];
            st = pw_error(PW_ERR_NOMEM, "no layout fits a memory budget of %s per rank; the least any "
                          "layout needs is %s per rank (%lld bytes: %s); a budget of %s or more fits",
                          bytes_up(budget, have, sizeof have), bytes_up(c.e[best].cost.memory, need, sizeof need),
                          (long long)c.e[best].cost.memory, pw_layout_describe(&c.e[best].layout, d, sizeof d),
                          need);
        }
    }
    if (best >= 0) {
        res->best = c.e[best].layout;
        res->best_cost = c.e[best].cost;
    }
    for (int i = 0; i < n; i++) {
        if (c.state[i] == 1) res->n_costed++;
        else if (c.state[i] == 2) res->n_failed++;
        else if (budget > 0 && c.e[i].memory_lb > budget) res->n_skipped_memory++;
        else res->n_skipped_time++;
    }
    qsort(c.e, (size_t)n, sizeof *c.e, cmp_entry);
    res->entries = c.e;
    res->n_entries = n;
    free(c.state);
    free(order);
    return st;
}

pw_status pw_layout_search(const pw_layout_space *sp, const pw_layout_model *m, int64_t budget,
                           pw_layout_result *res)
{
    return run_search(sp, m, budget, res, 1);
}

pw_status pw_layout_search_exhaustive(const pw_layout_space *sp, const pw_layout_model *m, int64_t budget,
                                      pw_layout_result *res)
{
    return run_search(sp, m, budget, res, 0);
}

void pw_layout_result_free(pw_layout_result *res)
{
    if (!res) return;
    free(res->entries);
    res->entries = NULL;
    res->n_entries = 0;
}

pw_status pw_layout_cost_more(const pw_layout_model *m, pw_layout_result *res, int k)
{
    if (!m || !res || !res->entries) return pw_error(PW_ERR_INVALID_ARG, "layout: nothing to add to");
    while (k-- > 0) {
        pw_layout_entry *next = NULL;
        for (int i = 0; i < res->n_entries; i++) {
            pw_layout_entry *e = &res->entries[i];
            if (e->costed || e->failed_cost || (res->budget > 0 && e->memory_lb > res->budget)) continue;
            if (!next || e->step_lb < next->step_lb || (e->step_lb == next->step_lb && e->index < next->index))
                next = e;
        }
        if (!next) break;
        if (m->cost(m->ctx, &next->layout, &next->cost) != PW_OK) {
            pw_clear_error();
            next->failed_cost = 1;
            res->n_failed++;
        } else {
            next->costed = 1;
            next->fits = res->budget <= 0 || next->cost.memory <= res->budget;
            res->n_costed++;
        }
        res->n_skipped_time--;
    }
    qsort(res->entries, (size_t)res->n_entries, sizeof *res->entries, cmp_entry);
    return PW_OK;
}

/* ------------------------------------------------------------ printing */

static int same_layout(const pw_layout *a, const pw_layout *b)
{
    return a->stages == b->stages && a->replicas == b->replicas && a->tensor == b->tensor &&
           a->threads == b->threads && a->micro_batches == b->micro_batches && a->schedule == b->schedule &&
           a->chunks_per_rank == b->chunks_per_rank && a->recompute == b->recompute;
}

const char *pw_layout_why_lost(const pw_layout_result *res, const pw_layout_entry *e, char *buf, size_t n)
{
    char a[32];
    const pw_layout_cost *x = &e->cost, *b = &res->best_cost;
    if (!e->costed) {
        snprintf(buf, n, "not costed");
        return buf;
    }
    if (!e->fits) {
        snprintf(buf, n, "over the memory budget (needs %s per rank)", bytes_up(x->memory, a, sizeof a));
        return buf;
    }
    if (same_layout(&e->layout, &res->best)) {
        snprintf(buf, n, "the choice");
        return buf;
    }
    /* The terms of the step that differ most from the choice's. */
    int len = 0;
    const double bub = x->bubble * x->step_time - b->bubble * b->step_time;
    const double compute = (1 - x->bubble) * x->step_time - (1 - b->bubble) * b->step_time;
    /* Tensor-parallel all-reduces per step of the busiest stage (they sit
     * inside F and B, so inside `compute`). */
    const double tp = x->tp_allreduce * e->layout.micro_batches - b->tp_allreduce * res->best.micro_batches;
    const int crosses = x->tp_link == PW_LINK_HOSTS && b->tp_link != PW_LINK_HOSTS;
    if (x->step_time == b->step_time) len = snprintf(buf, n, "as fast; uses more memory or comes later");
    else if (tp > 0 && tp >= 0.5 * (x->step_time - b->step_time) && crosses)
        len = snprintf(buf, n, "T = %d crosses a node: all-reduce %.3g ms per micro-batch", e->layout.tensor,
                       1e3 * x->tp_allreduce);
    else if (tp > 0 && tp >= 0.5 * (x->step_time - b->step_time))
        len = snprintf(buf, n, "T = %d: tensor-parallel all-reduce %.3g ms per micro-batch (%s; the choice: %.3g)",
                       e->layout.tensor, 1e3 * x->tp_allreduce,
                       x->tp_link >= 0 ? pw_link_class_name((pw_link_class)x->tp_link) : "in process",
                       1e3 * b->tp_allreduce);
    else if (bub >= compute && bub > 0)
        len = snprintf(buf, n, "bubble %.1f%% (the choice: %.1f%%)", 100 * x->bubble, 100 * b->bubble);
    else if (x->rate > 0 && b->rate > 0 && x->rate < 0.99 * b->rate)
        len = snprintf(buf, n, "compute at %.3g FLOP/s per rank (the choice: %.3g)", x->rate, b->rate);
    else if (e->layout.recompute && !res->best.recompute)
        len = snprintf(buf, n, "recomputation repeats each forward");
    else
        len = snprintf(buf, n, "more work per rank");
    if (len > 0 && (size_t)len < n && x->allreduce > 0.02 * x->step_time)
        snprintf(buf + len, n - (size_t)len, "; all-reduce %.3g ms per step", 1e3 * x->allreduce);
    return buf;
}

pw_status pw_layout_print(FILE *f, const pw_layout_result *res, int runners_up, const int64_t *rank_memory,
                          int n_ranks)
{
    if (!f || !res || !res->entries) return pw_error(PW_ERR_INVALID_ARG, "layout: nothing to print");
    const pw_layout *l = &res->best;
    const pw_layout_cost *c = &res->best_cost;
    char d[160], a[32], b[32];
    fprintf(f, "layout search: %d candidate%s over stages x replicas x tensor x threads x micro-batches x "
            "schedule x recomputation; %d costed (simulated), %d never costed (lower bound on the step above "
            "the choice's), %d never costed (memory lower bound above the budget), %d not applicable\n",
            res->n_entries, res->n_entries > 1 ? "s" : "", res->n_costed, res->n_skipped_time,
            res->n_skipped_memory, res->n_failed);
    int most_t = 1;
    for (int i = 0; i < res->n_entries; i++)
        if (res->entries[i].layout.tensor > most_t) most_t = res->entries[i].layout.tensor;
    if (most_t == 1)
        fprintf(f, "  tensor parallelism: T = 1 only (the graph marks no op tp=, or T was fixed)\n");
    else
        fprintf(f, "  tensor parallelism: T up to %d (the divisors of the rank count)\n", most_t);
    fprintf(f, "chose %s\n", pw_layout_describe(l, d, sizeof d));
    const int ranks = l->stages * l->replicas * l->tensor;
    fprintf(f, "  %d rank%s (%d stage%s x %d replica%s x T %d), %d thread%s each\n", ranks, ranks > 1 ? "s" : "",
            l->stages, l->stages > 1 ? "s" : "", l->replicas, l->replicas > 1 ? "s" : "", l->tensor, l->threads,
            l->threads > 1 ? "s" : "");
    fprintf(f, "  predicted step %.3f ms, bubble %.1f%%", 1e3 * c->step_time, 100 * c->bubble);
    if (c->rate > 0) fprintf(f, ", compute %.3g FLOP/s per rank", c->rate);
    if (c->allreduce > 0) fprintf(f, ", all-reduce %.3f ms", 1e3 * c->allreduce);
    if (l->tensor > 1 && c->tp_in_rate)
        fprintf(f, "\n  tensor-parallel sums: inside the rate, measured as the T = %d group runs them", l->tensor);
    else if (l->tensor > 1)
        fprintf(f, "\n  tensor-parallel all-reduce %.3f ms per micro-batch (the busiest stage, F and B), %s",
                1e3 * c->tp_allreduce,
                c->tp_link >= 0 ? pw_link_class_name((pw_link_class)c->tp_link) : "ranks of this process");
    fprintf(f, "\n  memory per rank: %s (the largest), budget %s\n", pw_format_bytes((double)c->memory, a, sizeof a),
            res->budget > 0 ? pw_format_bytes((double)res->budget, b, sizeof b) : "none");
    if (rank_memory && n_ranks > 0) {
        fprintf(f, "   ");
        for (int r = 0; r < n_ranks && r < 16; r++)
            fprintf(f, " stage %d %s%s", r, pw_format_bytes((double)rank_memory[r], a, sizeof a),
                    r + 1 < n_ranks && r < 15 ? "," : "");
        if (n_ranks > 16) fprintf(f, " ... (%d stages)", n_ranks);
        if (l->tensor > 1) fprintf(f, " (each of a stage's %d tensor ranks)", l->tensor);
        fprintf(f, "\n");
    }
    int shown = 0;
    for (int i = 0; i < res->n_entries && shown < runners_up; i++) {
        const pw_layout_entry *e = &res->entries[i];
        if (!e->costed) break;
        if (same_layout(&e->layout, l)) continue;
        if (!shown)
            fprintf(f, "runners-up:\n  %-44s %12s %9s %12s  %s\n", "layout", "step ms", "vs choice", "memory",
                    "why it lost");
        char why[160];
        fprintf(f, "  %-44s %12.3f %+8.1f%% %12s  %s\n", pw_layout_describe(&e->layout, d, sizeof d),
                1e3 * e->cost.step_time, 100.0 * (e->cost.step_time / c->step_time - 1.0),
                pw_format_bytes((double)e->cost.memory, a, sizeof a), pw_layout_why_lost(res, e, why, sizeof why));
        shown++;
    }
    if (ferror(f)) return pw_error(PW_ERR_IO, "layout: write error");
    return PW_OK;
}

/* ------------------------------------------------------------ the forecaster */

typedef struct rate_entry {
    int threads;
    int64_t mbs;
    int ranks;                   /* programs that ran at once (1: alone) */
    int tensor;                  /* T > 1: they were one tensor-parallel group */
    double micro_s, optim_s;     /* measured: per micro-batch, per optimizer step */
} rate_entry;

/* FLOP sums per chunk of one partition into C chunks (pw_partition_make,
 * FLOPS: the forecast's cuts). */
typedef struct chunk_sums {
    int C;
    double *work;                /* [C] f + b + w FLOPs per sample */
    double *fwd;                 /* [C] f per sample */
    double *params;              /* [C] parameter bytes the chunk introduces */
    int *begin;                  /* [C + 1] the cuts */
} chunk_sums;

/* The graph as one rank of T sees it: T = 1 the graph itself; T > 1 its
 * last rank's graph (pw_graph_tp_rank: the largest parts), made on first
 * use. Node k is the same node in both, so the FLOP cuts of the whole
 * graph apply to it. */
typedef struct tp_view {
    int T;
    pw_graph *rank_g;            /* owned; NULL at T = 1 */
    const pw_graph *g;           /* what is costed: the graph or rank_g */
    int refused;                 /* the graph does not split into T (why) */
    char why[320];
    double flops_sample;         /* f + b + w per sample */
    double param_bytes;          /* each parameter (or part) once */
    double act_sample;           /* activation bytes stashed per sample, every node */
    chunk_sums *sums;            /* [n_nodes + 1], by C; C = 0 unused */
} tp_view;

struct pw_layout_forecaster {
    pw_layout_forecast_config c;
    double flops_sample;         /* f + b + w per sample, the whole graph */
    double param_bytes;          /* each parameter once */
    tp_view *views;              /* [n_views]; views[0] is T = 1 */
    int n_views, cap_views;
    rate_entry *rates;
    int n_rates, cap_rates;
    double measure_s;            /* time spent measuring */
    double pass_bandwidth;       /* bytes/s of a gradient-group pass; 0: not measured */
    int n_link_measurements;     /* 1 once the links were measured here */
    int links_state;             /* 0: not yet looked at, 1: known (links), -1: none */
    pw_forecast_links links;     /* in-process figures (given or measured) */
};

pw_layout_forecast_config pw_layout_forecast_defaults(void)
{
    pw_layout_forecast_config c;
    memset(&c, 0, sizeof c);
    c.optim = PW_OPTIM_SGD;
    c.host_latency_s = -1;
    c.host_bandwidth = -1;
    return c;
}

pw_status pw_layout_forecaster_create(const pw_layout_forecast_config *c, pw_layout_forecaster **out)
{
    *out = NULL;
    if (!c || !c->graph || c->batch < 1)
        return pw_error(PW_ERR_INVALID_ARG, "layout: the forecaster needs a graph and a batch");
    pw_layout_forecaster *f = calloc(1, sizeof *f);
    if (!f) return pw_error(PW_ERR_NOMEM, "layout: out of memory");
    f->c = *c;
    f->views = calloc(4, sizeof *f->views);
    if (!f->views || !(f->views[0].sums = calloc((size_t)c->graph->n_nodes + 1, sizeof *f->views[0].sums))) {
        free(f->views);
        free(f);
        return pw_error(PW_ERR_NOMEM, "layout: out of memory");
    }
    f->cap_views = 4;
    f->n_views = 1;
    tp_view *v = &f->views[0];
    v->T = 1;
    v->g = c->graph;
    pw_op_cost oc;
    pw_graph_total_cost(c->graph, &oc);
    v->flops_sample = f->flops_sample = oc.flops_fwd + oc.flops_bwd_input + oc.flops_bwd_weight;
    v->param_bytes = f->param_bytes = (double)oc.param_bytes;
    v->act_sample = (double)oc.act_bytes;
    *out = f;
    return PW_OK;
}

/* The view of T (made on first use); NULL when out of memory. A graph
 * that does not split into T gives a view with `refused` set. */
static tp_view *view_of(pw_layout_forecaster *f, int T)
{
    for (int i = 0; i < f->n_views; i++)
        if (f->views[i].T == T) return &f->views[i];
    if (f->n_views == f->cap_views) {
        tp_view *p = realloc(f->views, (size_t)(2 * f->cap_views) * sizeof *p);
        if (!p) return NULL;
        f->views = p;
        f->cap_views *= 2;
    }
    const pw_graph *g = f->c.graph;
    tp_view *v = &f->views[f->n_views];
    memset(v, 0, sizeof *v);
    v->T = T;
    if (!(v->sums = calloc((size_t)g->n_nodes + 1, sizeof *v->sums))) return NULL;
    f->n_views++;
    if (!pw_graph_tp_marked(g)) {
        v->refused = 1;
        snprintf(v->why, sizeof v->why, "graph '%s' marks no op to split (tp=column, tp=row or tp=vocab)",
                 g->name);
        return v;
    }
    if (pw_graph_tp_rank(g, T, T - 1, &v->rank_g) != PW_OK) {
        v->refused = 1;
        snprintf(v->why, sizeof v->why, "%s", pw_last_error());
        pw_clear_error();
        return v;
    }
    v->g = v->rank_g;
    pw_op_cost oc;
    pw_graph_total_cost(v->g, &oc);
    v->flops_sample = oc.flops_fwd + oc.flops_bwd_input + oc.flops_bwd_weight;
    v->param_bytes = (double)oc.param_bytes;
    v->act_sample = (double)oc.act_bytes;
    return v;
}

void pw_layout_forecaster_destroy(pw_layout_forecaster *f)
{
    if (!f) return;
    for (int i = 0; i < f->n_views; i++) {
        tp_view *v = &f->views[i];
        for (int C = 0; v->sums && C <= f->c.graph->n_nodes; C++) {
            free(v->sums[C].work);
            free(v->sums[C].fwd);
            free(v->sums[C].params);
            free(v->sums[C].begin);
        }
        free(v->sums);
        pw_graph_destroy(v->rank_g);
    }
    free(f->views);
    free(f->rates);
    free(f);
}

int pw_layout_forecaster_measurements(const pw_layout_forecaster *f, double *seconds)
{
    if (seconds) *seconds = f ? f->measure_s : 0;
    return f ? f->n_rates + f->n_link_measurements : 0;
}

static int64_t micro_size(const pw_layout_forecaster *f, const pw_layout *l)
{
    return f->c.batch / ((int64_t)l->replicas * l->micro_batches);
}

/* Rates and links are measured here (layout.h, in_process). */
static int measuring_here(const pw_layout_forecaster *f) { return !f->c.rate && !(f->c.flops_per_s > 0); }

/* The measured halves of (threads, mbs) with `ranks` programs at once
 * (tensor T > 1: one T group), measuring them once. NULL on error. */
static const rate_entry *measured(pw_layout_forecaster *f, int threads, int64_t mbs, int ranks, int tensor)
{
    for (int i = 0; i < f->n_rates; i++)
        if (f->rates[i].threads == threads && f->rates[i].mbs == mbs && f->rates[i].ranks == ranks &&
            f->rates[i].tensor == tensor)
            return &f->rates[i];
    if (f->n_rates == f->cap_rates) {
        int nc = f->cap_rates ? 2 * f->cap_rates : 16;
        rate_entry *p = realloc(f->rates, (size_t)nc * sizeof *p);
        if (!p) return NULL;
        f->rates = p;
        f->cap_rates = nc;
    }
    pw_forecast_config fc = pw_forecast_defaults();
    fc.graph = f->c.graph;
    fc.micro_batches = 1;
    fc.micro_batch_size = mbs;
    fc.optim_state_floats = pw_optim_state_floats(f->c.optim);
    fc.tensor = tensor;
    const int before = pw_cpu_get_threads();
    pw_cpu_set_threads(threads);
    rate_entry e = {.threads = threads, .mbs = mbs, .ranks = ranks, .tensor = tensor};
    const int64_t t0 = pw_now_ns();
    pw_status st = pw_forecast_calibrate_group(&fc, ranks, &e.micro_s, &e.optim_s);
    const double took = (double)(pw_now_ns() - t0) * 1e-9;
    f->measure_s += took;
    pw_cpu_set_threads(before);
    if (st != PW_OK) return NULL;
    if (f->c.log) {
        char who[64] = "";
        if (tensor > 1) snprintf(who, sizeof who, ", the T = %d group (its rank graphs and sums)", tensor);
        else if (ranks > 1) snprintf(who, sizeof who, ", %d ranks at once", ranks);
        fprintf(f->c.log, "  measured: %d thread%s, micro-batch %lld%s: %.3f ms per micro-batch, optimizer "
                "%.3f ms (%.2f s)\n", threads, threads > 1 ? "s" : "", (long long)mbs, who, 1e3 * e.micro_s,
                1e3 * e.optim_s, took);
    }
    f->rates[f->n_rates] = e;
    return &f->rates[f->n_rates++];
}

int pw_layout_forecaster_recheck(pw_layout_forecaster *f, double tolerance)
{
    if (!f || !measuring_here(f) || f->n_rates < 1) return 0;
    const int pick[2] = {0, f->n_rates - 1};
    double worst = 0;
    for (int k = 0; k < (f->n_rates > 1 ? 2 : 1); k++) {
        const rate_entry was = f->rates[pick[k]];
        pw_forecast_config fc = pw_forecast_defaults();
        fc.graph = f->c.graph;
        fc.micro_batches = 1;
        fc.micro_batch_size = was.mbs;
        fc.optim_state_floats = pw_optim_state_floats(f->c.optim);
        fc.tensor = was.tensor;
        const int before = pw_cpu_get_threads();
        pw_cpu_set_threads(was.threads);
        double mi = 0, op = 0;
        const int64_t t0 = pw_now_ns();
        pw_status st = pw_forecast_calibrate_group(&fc, was.ranks, &mi, &op);
        f->measure_s += (double)(pw_now_ns() - t0) * 1e-9;
        pw_cpu_set_threads(before);
        if (st != PW_OK) {
            pw_clear_error();
            return 0;
        }
        const double r = (mi + op) / (was.micro_s + was.optim_s);
        if (fabs(r - 1) > worst) worst = fabs(r - 1);
        if (f->c.log)
            fprintf(f->c.log, "  measured again: %d thread%s, micro-batch %lld%s: %.3f ms per micro-batch, optimizer "
                    "%.3f ms (%+.1f%% against the first time)\n", was.threads, was.threads > 1 ? "s" : "",
                    (long long)was.mbs, was.tensor > 1 ? ", the T group" : was.ranks > 1 ? ", ranks at once" : "",
                    1e3 * mi, 1e3 * op, 100 * (r - 1));
    }
    if (worst <= tolerance) return 0;
    if (f->c.log)
        fprintf(f->c.log, "  the machine changed speed while measuring (%.0f%%): measuring everything again\n",
                100 * worst);
    f->n_rates = 0;
    f->pass_bandwidth = 0;
    if (f->n_link_measurements) { /* measured links again too; given ones stay */
        f->links_state = 0;
        f->n_link_measurements = 0;
    }
    return 1;
}

/* The bandwidth of one gradient-group pass here (add a group's sum into
 * its pending sum, zero the gradients: stages/program/program.c,
 * group_end), over 16 MiB of floats, the fastest of three. 0 when rates
 * are not measured here. */
static double pass_bandwidth(pw_layout_forecaster *f)
{
    if (f->pass_bandwidth > 0 || !measuring_here(f)) return f->pass_bandwidth;
    const size_t n = (size_t)4 << 20;
    float *a = calloc(n, sizeof *a), *b = calloc(n, sizeof *b);
    if (!a || !b) {
        free(a);
        free(b);
        return 0;
    }
    double best = 0;
    for (int r = 0; r < 4; r++) {
        const int64_t t0 = pw_now_ns();
        for (size_t i = 0; i < n; i++) a[i] += b[i];
        memset(b, 0, n * sizeof *b);
        const double s = (double)(pw_now_ns() - t0) * 1e-9;
        if (r > 0 && s > 0 && (best == 0 || s < best)) best = s;
    }
    const volatile float sink = a[n / 2];
    (void)sink;
    free(a);
    free(b);
    f->pass_bandwidth = best > 0 ? (double)(n * sizeof(float)) / best : 0;
    if (f->c.log && best > 0)
        fprintf(f->c.log, "  measured: a gradient-group pass at %.3g GB/s\n", f->pass_bandwidth / 1e9);
    return f->pass_bandwidth;
}

/* FLOP/s of one rank of layout l; 0 on a failed measurement. */
static double rank_rate(pw_layout_forecaster *f, const pw_layout *l)
{
    const int64_t mbs = micro_size(f, l);
    if (f->c.rate) return f->c.rate(f->c.rate_ctx, l->threads, mbs);
    if (f->c.flops_per_s > 0) return f->c.flops_per_s;
    /* In one process every rank computes at once: a T group is measured
     * as that group, S x R ranks at T = 1 as that many programs side by
     * side; else (or across processes) one rank alone. */
    const int T = l->tensor > 1 ? l->tensor : 1;
    const int at_once = l->stages * l->replicas;
    const int group = f->c.in_process && T > 1 ? T : 1;
    const int ranks = group > 1 ? group : f->c.in_process && at_once > 1 ? at_once : 1;
    /* A step of M micro-batches, as pw_forecast_calibrate counts it, in the
     * FLOPs of what ran: the whole graph, or a T group's largest rank. */
    double flops = f->flops_sample, params = f->param_bytes;
    if (group > 1) {
        const tp_view *v = view_of(f, T);
        if (!v || v->refused) return 0;
        flops = v->flops_sample;
        params = v->param_bytes;
    }
    const rate_entry *e = measured(f, l->threads, mbs, ranks, group);
    if (!e) return 0;
    const double M = l->micro_batches;
    return (flops * (double)mbs * M + params) / (e->micro_s * M + e->optim_s);
}

/* The in-process link figures (layout.h): given, or measured once here;
 * NULL when there are none (the topology's defaults then). */
static const pw_forecast_links *links_of(pw_layout_forecaster *f)
{
    if (f->links_state == 0) {
        f->links_state = -1;
        if (f->c.handoff_s > 0 || f->c.allreduce_latency_s > 0 || f->c.allreduce_bandwidth > 0) {
            f->links.handoff_s = f->c.handoff_s;
            f->links.allreduce_latency_s = f->c.allreduce_latency_s;
            f->links.allreduce_bandwidth = f->c.allreduce_bandwidth;
            f->links_state = 1;
        } else if (f->c.in_process && measuring_here(f)) {
            const int64_t t0 = pw_now_ns();
            pw_status st = pw_forecast_calibrate_links(&f->links);
            const double took = (double)(pw_now_ns() - t0) * 1e-9;
            f->measure_s += took;
            if (st == PW_OK) {
                f->links_state = 1;
                f->n_link_measurements = 1;
                if (f->c.log)
                    fprintf(f->c.log, "  measured: a hand-off between two ranks' threads %.1f us; the replicas' "
                            "sum of 2 as a ring: latency %.1f us, %.3g GB/s (no-op steps of 16 micro-batches: "
                            "1 stage %.3f ms, 2 stages %.3f ms, 2 replicas summing 1 KiB %.3f ms, 4 MiB %.3f ms; "
                            "%.2f s)\n",
                            1e6 * f->links.handoff_s, 1e6 * f->links.allreduce_latency_s,
                            f->links.allreduce_bandwidth / 1e9, 1e3 * f->links.noop_step_s,
                            1e3 * f->links.two_stage_s, 1e3 * f->links.sum_small_s, 1e3 * f->links.sum_big_s,
                            took);
            } else {
                PW_WARN("layout: in-process links not measured (%s): the default figures", pw_last_error());
                pw_clear_error();
            }
        }
    }
    return f->links_state == 1 ? &f->links : NULL;
}

/* View v's FLOP sums over the whole graph's FLOP partition into C chunks. */
static const chunk_sums *sums_for(pw_layout_forecaster *f, tp_view *v, int C)
{
    chunk_sums *s = &v->sums[C];
    if (s->work) return s;
    if (v->refused) return NULL;
    const pw_graph *g = v->g;
    pw_partition part;
    if (v->T > 1) { /* the cuts of T = 1 */
        const chunk_sums *one = sums_for(f, &f->views[0], C);
        if (!one) return NULL;
        memset(&part, 0, sizeof part);
        if (!(part.begin = malloc(sizeof(int) * ((size_t)C + 1)))) return NULL;
        memcpy(part.begin, one->begin, sizeof(int) * ((size_t)C + 1));
    } else if (pw_partition_make(g, C, PW_PARTITION_FLOPS, &part) != PW_OK) {
        return NULL;
    }
    s->work = calloc((size_t)C, sizeof *s->work);
    s->fwd = calloc((size_t)C, sizeof *s->fwd);
    s->params = calloc((size_t)C, sizeof *s->params);
    if (!s->work || !s->fwd || !s->params) {
        pw_partition_free(&part);
        free(s->work), free(s->fwd), free(s->params);
        s->work = s->fwd = s->params = NULL;
        return NULL;
    }

    for (int ch = 0; ch < C; ch++)
        for (int i = part.begin[ch]; i < part.begin[ch + 1]; i++) {
            pw_op_cost oc;
            if (pw_graph_node_cost(g, i, &oc) != PW_OK) continue;
            s->work[ch] += oc.flops_fwd + oc.flops_bwd_input + oc.flops_bwd_weight;
            s->fwd[ch] += oc.flops_fwd;
            s->params[ch] += (double)oc.param_bytes;
        }
    s->C = C;
    s->begin = part.begin; /* kept: the forecasts' cuts */
    part.begin = NULL;
    pw_partition_free(&part);
    return s;
}

/* Lower bounds (layout.h): the forecast charges chunk k f, b (+ f with
 * recomputation) and w per micro-batch and its parameter bytes / rate for
 * the optimizer; a rank is busy at least its chunks' sum, the step lasts
 * at least the busiest rank's, which is at least the average and at least
 * any one chunk's. Memory: every rank holds at least the average share of
 * parameters, gradients and optimizer state. */
static void fc_bound(void *ctx, const pw_layout *l, double *step_lb, int64_t *memory_lb)
{
    pw_layout_forecaster *f = ctx;
    *step_lb = 0;
    *memory_lb = 0;
    tp_view *v = view_of(f, l->tensor);
    if (!v || v->refused) return; /* its cost fails */
    const int S = l->stages, C = S * l->chunks_per_rank;
    const double state = 2 + pw_optim_state_floats(f->c.optim);
    /* ... and one micro-batch of its chunks' activations (outputs and saved
     * statistics), which a stage holds once even with recomputation (in
     * its shared copy). At T > 1 all of it is one tensor rank's (its rank
     * graph's), and the all-reduces only add to the step. */
    *memory_lb = (int64_t)floor((v->param_bytes * state + v->act_sample * (double)micro_size(f, l)) / S);
    const double rate = rank_rate(f, l);
    const chunk_sums *s = C <= f->c.graph->n_nodes ? sums_for(f, v, C) : NULL;
    if (!(rate > 0) || !s) return;
    const double samples = (double)micro_size(f, l) * l->micro_batches;
    double total = 0, most = 0;
    for (int ch = 0; ch < C; ch++) {
        double w = ((s->work[ch] + (l->recompute ? s->fwd[ch] : 0)) * samples + s->params[ch]) / rate;
        total += w;
        if (w > most) most = w;
    }
    const double lb = total / S > most ? total / S : most;
    /* The simulator rounds each action to a whole nanosecond (half a
     * nanosecond at most, down or up) and adds in another order. */
    const double actions = 3.0 * l->micro_batches * l->chunks_per_rank + 4.0;
    *step_lb = lb * (1.0 - 1e-12) - actions * 1e-9;
    if (*step_lb < 0) *step_lb = 0;
}

static pw_forecast_config layout_forecast(pw_layout_forecaster *f, const tp_view *v, const pw_layout *l,
                                          double rate)
{
    pw_forecast_config fc = pw_forecast_defaults();
    fc.graph = v->g;
    fc.tensor = l->tensor;
    fc.stages = l->stages;
    fc.replicas = l->replicas;
    fc.micro_batches = l->micro_batches;
    fc.micro_batch_size = micro_size(f, l);
    fc.schedule = l->schedule;
    fc.chunks_per_rank = l->chunks_per_rank;
    fc.flops_per_s = rate;
    fc.optim_state_floats = pw_optim_state_floats(f->c.optim);
    fc.recompute = l->recompute;
    int K = 1;
    fc.grad_groups = pw_grad_groups(f->c.grad_groups, l->replicas, l->micro_batches, &K) > 0 ? K : 1;
    fc.group_pass_bandwidth = pass_bandwidth(f);
    fc.topology = f->c.topology;
    fc.host_latency_s = f->c.host_latency_s;
    fc.host_bandwidth = f->c.host_bandwidth;
    const pw_forecast_links *lk = links_of(f);
    if (lk) { /* ranks in this process: its own figures, not the classes' */
        fc.topology = NULL;
        fc.link_latency_s = lk->handoff_s;
        fc.link_bandwidth = 0;
        fc.allreduce_latency_s = lk->allreduce_latency_s;
        fc.allreduce_bandwidth = lk->allreduce_bandwidth;
    }
    /* The T group's rate has its sums inside (rank_rate). */
    fc.tp_in_rate = l->tensor > 1 && f->c.in_process && measuring_here(f);
    return fc;
}

/* Per-rank memory of the forecast's pipeline: the partitioner's model of
 * its cuts with the schedule's in-flight counts. */
static pw_status rank_memory(pw_layout_forecaster *f, const pw_layout *l, const pw_forecast *fo, double rate,
                             int64_t *mem, int n)
{
    const tp_view *v = view_of(f, l->tensor); /* made by forecast_layout */
    if (!v || v->refused) return pw_error(PW_ERR_INTERNAL, "layout: no view of T = %d", l->tensor);
    pw_partition_config pc;
    memset(&pc, 0, sizeof pc);
    pc.n_stages = fo->n_chunks;
    pc.method = PW_PARTITION_CUTS;
    pc.balance = PW_BALANCE_FLOPS;
    pc.micro_batch_size = micro_size(f, l);
    pc.micro_batches = l->micro_batches;
    pc.flops_per_s = rate;
    pc.inflight = fo->chunk_inflight;
    pc.optim_state_floats = pw_optim_state_floats(f->c.optim);
    pc.optim_flops = f->c.optim == PW_OPTIM_ADAMW ? PW_OPTIM_FLOPS_ADAMW : PW_OPTIM_FLOPS_SGD;
    pc.recompute = l->recompute;
    int K = 1;
    pw_grad_groups(f->c.grad_groups, l->replicas, l->micro_batches, &K);
    while ((1 << pc.grad_sum_copies) < K) pc.grad_sum_copies++;
    pw_partition part;
    PW_CHECK(pw_partition_evaluate(v->g, &pc, fo->cuts, &part));
    for (int r = 0; r < n; r++) mem[r] = 0;
    for (int ch = 0; ch < fo->n_chunks; ch++) {
        const int r = fo->chunk_rank[ch];
        if (r < n) mem[r] += part.stage[ch].mem.total;
    }
    pw_partition_free(&part);
    return PW_OK;
}

static pw_status forecast_layout(pw_layout_forecaster *f, const pw_layout *l, pw_forecast *fo, double *rate)
{
    tp_view *v = l->tensor >= 1 ? view_of(f, l->tensor) : NULL;
    if (!v) return pw_error(PW_ERR_NOMEM, "layout: out of memory (T = %d)", l->tensor);
    if (v->refused) return pw_error(PW_ERR_UNSUPPORTED, "layout: T = %d: %s", l->tensor, v->why);
    *rate = rank_rate(f, l);
    if (!(*rate > 0)) return pw_error(PW_ERR_INVALID_ARG, "layout: no compute rate for %d threads at "
                                      "micro-batch %lld", l->threads, (long long)micro_size(f, l));
    pw_forecast_config fc = layout_forecast(f, v, l, *rate);
    const int C = l->stages * l->chunks_per_rank;
    const chunk_sums *s = C >= 1 && C <= f->c.graph->n_nodes ? sums_for(f, v, C) : NULL;
    if (s) fc.cuts = s->begin; /* the same FLOP partition, made once */
    return pw_forecast_run(&fc, fo);
}

static pw_status fc_cost(void *ctx, const pw_layout *l, pw_layout_cost *out)
{
    pw_layout_forecaster *f = ctx;
    memset(out, 0, sizeof *out);
    pw_forecast fo;
    double rate;
    PW_CHECK(forecast_layout(f, l, &fo, &rate));
    int64_t *mem = calloc((size_t)l->stages, sizeof *mem);
    pw_status st = mem ? rank_memory(f, l, &fo, rate, mem, l->stages)
                       : pw_error(PW_ERR_NOMEM, "layout: out of memory");
    if (st == PW_OK) {
        out->step_time = fo.step_time;
        out->bubble = fo.bubble;
        out->rate = rate;
        out->allreduce = fo.allreduce_time;
        out->tp_allreduce = fo.tp_time;
        out->tp_link = l->tensor > 1 && f->c.topology && !links_of(f) ? fo.tp_cls : -1;
        out->tp_in_rate = l->tensor > 1 && f->c.in_process && measuring_here(f);
        for (int r = 0; r < l->stages; r++)
            if (mem[r] > out->memory) out->memory = mem[r];
    }
    free(mem);
    pw_forecast_free(&fo);
    return st;
}

pw_layout_model pw_layout_forecaster_model(pw_layout_forecaster *f)
{
    pw_layout_model m = {.cost = fc_cost, .bound = fc_bound, .ctx = f};
    return m;
}

pw_status pw_layout_forecaster_memory(pw_layout_forecaster *f, const pw_layout *l, int64_t *mem, int n)
{
    pw_forecast fo;
    double rate;
    PW_CHECK(forecast_layout(f, l, &fo, &rate));
    pw_status st = rank_memory(f, l, &fo, rate, mem, n < l->stages ? n : l->stages);
    pw_forecast_free(&fo);
    return st;
}
