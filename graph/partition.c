/* pipewright — contiguous partitions: cut markers or the exact planner.
 * The model and its exactness are described in partition.h and
 * docs/partition.md. */
#include "graph/partition.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/arena.h"

#define ALIGN64(x) (((x) + PW_ARENA_ALIGN - 1) / PW_ARENA_ALIGN * PW_ARENA_ALIGN)

/* Which values carry a gradient: produced by an op with parameters or from
 * one that does (the same rule the stage program uses). A node whose inputs
 * carry none skips its input-gradient work, e.g. the first layer. */
static unsigned char *grad_flags(const pw_graph *g)
{
    unsigned char *rg = calloc((size_t)g->n_values + 1, 1);
    if (!rg) return NULL;
    for (int i = 0; i < g->n_nodes; i++) {
        const pw_node *nd = &g->nodes[i];
        int r = nd->n_params > 0;
        for (int k = 0; k < nd->n_inputs; k++) r |= rg[nd->inputs[k]];
        rg[nd->output] = (unsigned char)(r && nd->op != PW_OP_SOFTMAX_XENT &&
                                         g->values[nd->output].dtype == PW_F32);
    }
    return rg;
}

static int needs_dx(const pw_graph *g, int i, const unsigned char *rg)
{
    if (g->nodes[i].op == PW_OP_SOFTMAX_XENT) return 1;
    for (int k = 0; k < g->nodes[i].n_inputs; k++)
        if (rg[g->nodes[i].inputs[k]]) return 1;
    return 0;
}

/* ------------------------------------------------------------------ model */

/* Everything about the graph the stage costs need, computed once. Sums over
 * a range [i, j) come from prefix arrays (times) or from an incremental walk
 * (distinct parameters and values, which a prefix cannot count once). */
typedef struct model {
    const pw_graph *g;
    const pw_partition_config *cfg;
    int n, S, M;
    int64_t mb;
    int recompute;
    const int *inflight;        /* [S]; cfg's or ones */
    int *ones;
    double *F, *B, *W, *FL;     /* [n + 1] prefix sums, speed 1, per micro-batch */
    double *sample_flops;       /* [n] per-sample fwd + bwd FLOPs (pw_partition.flops) */
    int *last_use;              /* [n_values] last consuming node, -1 none */
    int64_t *vbytes;            /* [n_values] aligned activation buffer */
    int64_t *gbytes;            /* [n_values] aligned gradient buffer, 0 without one */
    int64_t *stat_bytes;        /* [n] saved statistics beyond the output */
    int64_t *pbytes, *obytes;   /* [n_params] parameter (= gradient) and optimizer state */
    double *ptime;              /* [n_params] s of its optimizer update, speed 1 */
    int64_t *cross_act;         /* [n + 1] ACT message bytes of the cut before node k */
    int64_t *cross_grad;        /* [n + 1] GRAD message bytes of that cut */
    int *vstamp, *pstamp;       /* walk marks */
    int stamp;
} model;

/* One range [i, j) being walked, j growing. Buffer sizes follow the stage
 * program's plan (stages/program.c): the values the range reads or writes,
 * the gradients of those that carry one, the ops' saved statistics, and for
 * values received and passed on (live-in at i, read after j) a buffer too. */
typedef struct range {
    int i, j;
    int64_t params;             /* distinct parameters used, aligned */
    int64_t grads;              /* one gradient buffer per use: a parameter used
                                   twice in the range (tied) sums its uses at the
                                   end of the step, in a fixed order */
    int64_t optim;
    double optim_time;          /* s per step updating those parameters, speed 1 */
    int64_t act, grad;          /* values read or written by nodes of the range */
    int64_t livein_act;         /* part of act / grad that is live-in at i */
    int64_t livein_grad;
    int64_t data_in;            /* graph inputs and labels read */
    int64_t pass_act;           /* live-in at i and still read at or after j */
    int64_t pass_grad;
    int64_t stats;              /* saved statistics */
    int64_t work;               /* kernel workspace (causal attention: T x T floats) */
} range;

static void model_free(model *m)
{
    free(m->ones);
    free(m->F);
    free(m->B);
    free(m->W);
    free(m->FL);
    free(m->sample_flops);
    free(m->last_use);
    free(m->vbytes);
    free(m->gbytes);
    free(m->stat_bytes);
    free(m->pbytes);
    free(m->obytes);
    free(m->ptime);
    free(m->cross_act);
    free(m->cross_grad);
    free(m->vstamp);
    free(m->pstamp);
    memset(m, 0, sizeof *m);
}

static int finite_nonneg(double x) { return isfinite(x) && x >= 0.0; }

static pw_status check_config(const pw_graph *g, const pw_partition_config *c)
{
    if (!g) return pw_error(PW_ERR_INVALID_ARG, "partition: no graph");
    if (!c) return pw_error(PW_ERR_INVALID_ARG, "partition: no config");
    if (c->n_stages < 1)
        return pw_error(PW_ERR_INVALID_ARG, "partition: %d stages (need at least 1)", c->n_stages);
    if (c->n_stages > g->n_nodes)
        return pw_error(PW_ERR_INVALID_ARG, "partition: %d stages but graph '%s' has only %d "
                        "nodes", c->n_stages, g->name, g->n_nodes);
    if (c->micro_batch_size < 0 || c->micro_batches < 0)
        return pw_error(PW_ERR_INVALID_ARG, "partition: negative micro-batch size or count");
    if (c->balance != PW_BALANCE_FLOPS && c->balance != PW_BALANCE_TIME)
        return pw_error(PW_ERR_INVALID_ARG, "partition: unknown balance %d", (int)c->balance);
    if (c->balance == PW_BALANCE_TIME && !c->node_times)
        return pw_error(PW_ERR_INVALID_ARG, "partition: balance 'time' needs measured op times "
                        "(a profile); use balance 'flops' or measure one");
    if (!finite_nonneg(c->flops_per_s) || !finite_nonneg(c->link_bandwidth) ||
        !finite_nonneg(c->link_latency) || !finite_nonneg(c->optim_flops))
        return pw_error(PW_ERR_INVALID_ARG, "partition: FLOP rate, optimizer FLOPs, link bandwidth "
                        "and latency must be finite and >= 0");
    if (c->memory_budget < 0 || c->optim_state_floats < 0)
        return pw_error(PW_ERR_INVALID_ARG, "partition: negative memory budget or optimizer state");
    for (int s = 0; c->inflight && s < c->n_stages; s++)
        if (c->inflight[s] < 1)
            return pw_error(PW_ERR_INVALID_ARG, "partition: stage %d holds %d micro-batches in "
                            "flight (need at least 1)", s, c->inflight[s]);
    for (int s = 0; c->devices && s < c->n_stages; s++) {
        const pw_device_spec *d = &c->devices[s];
        if (!finite_nonneg(d->speed) || d->memory < 0)
            return pw_error(PW_ERR_INVALID_ARG, "partition: device %d: speed %g and memory %lld "
                            "must be >= 0", s, d->speed, (long long)d->memory);
    }
    for (int i = 0; c->node_times && c->balance == PW_BALANCE_TIME && i < g->n_nodes; i++) {
        const pw_op_time *t = &c->node_times[i];
        if (!finite_nonneg(t->f) || !finite_nonneg(t->b) || !finite_nonneg(t->w) ||
            !finite_nonneg(t->o))
            return pw_error(PW_ERR_INVALID_ARG, "partition: node %d (%s): measured times must be "
                            "finite and >= 0", i, g->values[g->nodes[i].output].name);
    }
    return PW_OK;
}

static pw_status model_init(model *m, const pw_graph *g, const pw_partition_config *c)
{
    memset(m, 0, sizeof *m);
    const int n = g->n_nodes, nv = g->n_values, np = g->n_params;
    m->g = g;
    m->cfg = c;
    m->n = n;
    m->S = c->n_stages;
    m->M = c->micro_batches > 0 ? c->micro_batches : 1;
    m->mb = c->micro_batch_size > 0 ? c->micro_batch_size : 1;
    m->recompute = c->recompute != 0;
    m->ones = malloc(sizeof(int) * (size_t)m->S);
    m->F = calloc((size_t)n + 1, sizeof(double));
    m->B = calloc((size_t)n + 1, sizeof(double));
    m->W = calloc((size_t)n + 1, sizeof(double));
    m->FL = calloc((size_t)n + 1, sizeof(double));
    m->sample_flops = calloc((size_t)n + 1, sizeof(double));
    m->last_use = malloc(sizeof(int) * ((size_t)nv + 1));
    m->vbytes = calloc((size_t)nv + 1, sizeof(int64_t));
    m->gbytes = calloc((size_t)nv + 1, sizeof(int64_t));
    m->stat_bytes = calloc((size_t)n + 1, sizeof(int64_t));
    m->pbytes = calloc((size_t)np + 1, sizeof(int64_t));
    m->obytes = calloc((size_t)np + 1, sizeof(int64_t));
    m->ptime = calloc((size_t)np + 1, sizeof(double));
    m->cross_act = calloc((size_t)n + 2, sizeof(int64_t));
    m->cross_grad = calloc((size_t)n + 2, sizeof(int64_t));
    m->vstamp = calloc((size_t)nv + 1, sizeof(int));
    m->pstamp = calloc((size_t)np + 1, sizeof(int));
    unsigned char *rg = grad_flags(g);
    if (!m->ones || !m->F || !m->B || !m->W || !m->FL || !m->sample_flops || !m->last_use ||
        !m->vbytes || !m->gbytes || !m->stat_bytes || !m->pbytes || !m->obytes ||
        !m->ptime || !m->cross_act || !m->cross_grad || !m->vstamp || !m->pstamp || !rg) {
        free(rg);
        model_free(m);
        return pw_error(PW_ERR_NOMEM, "partition: out of memory for %d nodes", n);
    }
    for (int s = 0; s < m->S; s++) m->ones[s] = 1;
    m->inflight = c->inflight ? c->inflight : m->ones;
    const double rate = c->flops_per_s > 0 ? c->flops_per_s : 1e10;
    const double mb = (double)m->mb;

    for (int i = 0; i < n; i++) {
        pw_op_cost oc;
        if (pw_graph_node_cost(g, i, &oc) != PW_OK) memset(&oc, 0, sizeof oc);
        double dx = needs_dx(g, i, rg) ? oc.flops_bwd_input : 0.0;
        double fl = oc.flops_fwd + dx + oc.flops_bwd_weight;
        m->sample_flops[i] = fl;
        double f, b, w;
        if (c->balance == PW_BALANCE_TIME) {
            f = c->node_times[i].f;
            b = c->node_times[i].b;
            w = c->node_times[i].w;
        } else {
            f = oc.flops_fwd * mb / rate;
            b = dx * mb / rate;
            w = oc.flops_bwd_weight * mb / rate;
        }
        m->F[i + 1] = m->F[i] + f;
        m->B[i + 1] = m->B[i] + b;
        m->W[i + 1] = m->W[i] + w;
        m->FL[i + 1] = m->FL[i] + fl * mb;
        int64_t extra = oc.act_bytes - oc.out_bytes;
        m->stat_bytes[i] = extra > 0 ? ALIGN64(extra * m->mb) : 0;
    }
    for (int v = 0; v < nv; v++) {
        const pw_value *val = &g->values[v];
        double bytes = mb * (double)pw_shape_numel(&val->shape) * (double)pw_dtype_size(val->dtype);
        if (bytes > 0x1p60) {
            free(rg);
            model_free(m);
            return pw_error(PW_ERR_INVALID_ARG, "partition: value '%s' takes %.3g bytes per "
                            "micro-batch of %lld; too large to plan", val->name, bytes,
                            (long long)m->mb);
        }
        m->vbytes[v] = ALIGN64((int64_t)bytes);
        m->gbytes[v] = rg[v] ? ALIGN64(m->mb * pw_shape_numel(&val->shape) * 4) : 0;
        m->last_use[v] = -1;
    }
    for (int i = 0; i < n; i++)
        for (int k = 0; k < g->nodes[i].n_inputs; k++) m->last_use[g->nodes[i].inputs[k]] = i;
    /* A value produced by node p and last read by node L crosses every cut
     * k in (p, L]: the cut before node k. Difference arrays, then sums. */
    for (int v = 0; v < nv; v++) {
        int p = g->values[v].producer, L = m->last_use[v];
        if (p < 0 || L <= p) continue;
        m->cross_act[p + 1] += m->vbytes[v];
        m->cross_act[L + 1] -= m->vbytes[v];
        m->cross_grad[p + 1] += m->gbytes[v];
        m->cross_grad[L + 1] -= m->gbytes[v];
    }
    for (int k = 1; k <= n; k++) {
        m->cross_act[k] += m->cross_act[k - 1];
        m->cross_grad[k] += m->cross_grad[k - 1];
    }
    m->cross_act[0] = m->cross_grad[0] = 0;
    for (int q = 0; q < np; q++) {
        int64_t numel = pw_shape_numel(&g->params[q].shape);
        m->pbytes[q] = ALIGN64(numel * 4);
        m->obytes[q] = ALIGN64(numel * 4 * (int64_t)c->optim_state_floats);
        if (c->balance == PW_BALANCE_FLOPS) m->ptime[q] = (double)numel * c->optim_flops / rate;
    }
    if (c->balance == PW_BALANCE_TIME) {
        /* A node's measured `o` updates the parameters it introduces (not a
         * tied one it reuses): share it among them by element count, so a
         * stage pays for exactly the parameters it holds, as the engine's
         * optimizer step does. pstamp marks the parameters seen so far. */
        for (int i = 0; i < n; i++) {
            const pw_node *nd = &g->nodes[i];
            double own = 0.0;
            for (int k = 0; k < nd->n_params; k++) { /* 2: introduced here */
                int q = nd->params[k];
                if (m->pstamp[q]) continue;
                m->pstamp[q] = 2;
                own += (double)pw_shape_numel(&g->params[q].shape);
            }
            for (int k = 0; k < nd->n_params; k++) {
                int q = nd->params[k];
                if (m->pstamp[q] != 2) continue;
                m->pstamp[q] = 1;
                if (own > 0)
                    m->ptime[q] = c->node_times[i].o * (double)pw_shape_numel(&g->params[q].shape) / own;
            }
        }
        memset(m->pstamp, 0, sizeof(int) * ((size_t)np + 1));
    }
    free(rg);
    return PW_OK;
}

static void range_start(model *m, range *r, int i)
{
    memset(r, 0, sizeof *r);
    r->i = r->j = i;
    r->pass_act = m->cross_act[i];
    r->pass_grad = m->cross_grad[i];
    if (++m->stamp == 0x7fffffff) { /* never in practice; keep marks valid */
        memset(m->vstamp, 0, sizeof(int) * (size_t)m->g->n_values);
        memset(m->pstamp, 0, sizeof(int) * (size_t)m->g->n_params);
        m->stamp = 1;
    }
}

static void touch(model *m, range *r, int v)
{
    if (m->vstamp[v] == m->stamp) return;
    m->vstamp[v] = m->stamp;
    r->act += m->vbytes[v];
    r->grad += m->gbytes[v];
    int p = m->g->values[v].producer;
    if (p < 0) {
        r->data_in += m->vbytes[v];
    } else if (p < r->i) {
        r->livein_act += m->vbytes[v];
        r->livein_grad += m->gbytes[v];
    }
}

/* Extends the range by node j. */
static void range_add(model *m, range *r)
{
    const pw_node *nd = &m->g->nodes[r->j];
    touch(m, r, nd->output);
    for (int k = 0; k < nd->n_inputs; k++) {
        int v = nd->inputs[k], p = m->g->values[v].producer;
        touch(m, r, v);
        /* A received value last read here is no longer passed on. Each is
         * dropped once: only one node is a value's last reader. */
        if (p >= 0 && p < r->i && m->last_use[v] == r->j) {
            int dup = 0;
            for (int q = 0; q < k; q++) dup |= nd->inputs[q] == v;
            if (!dup) {
                r->pass_act -= m->vbytes[v];
                r->pass_grad -= m->gbytes[v];
            }
        }
    }
    r->stats += m->stat_bytes[r->j];
    if (nd->op == PW_OP_CAUSAL_ATTENTION) {
        int64_t T = m->g->values[nd->inputs[0]].shape.d[0];
        if (T * T > r->work) r->work = T * T;
    }
    for (int k = 0; k < nd->n_params; k++) {
        int q = nd->params[k];
        r->grads += m->pbytes[q];
        if (m->pstamp[q] == m->stamp) continue;
        m->pstamp[q] = m->stamp;
        r->params += m->pbytes[q];
        r->optim += m->obytes[q];
        r->optim_time += m->ptime[q];
    }
    r->j++;
}

static int pool_buffers(const model *m, int link)
{
    int n = m->inflight[link] + m->inflight[link + 1];
    return n < m->M ? n : m->M;
}

static int64_t stage_budget(const model *m, int s)
{
    const pw_device_spec *d = m->cfg->devices ? &m->cfg->devices[s] : NULL;
    return d && d->memory > 0 ? d->memory : m->cfg->memory_budget;
}

/* The one function every path (planner, evaluation, diagnosis) takes a
 * stage's numbers from, so the optimum and the reported plan agree to the
 * bit. */
static void stage_eval(const model *m, int s, const range *r, pw_stage_cost *o)
{
    const pw_partition_config *c = m->cfg;
    const int i = r->i, j = r->j;
    double speed = c->devices && c->devices[s].speed > 0 ? c->devices[s].speed : 1.0;
    memset(o, 0, sizeof *o);
    o->f = (m->F[j] - m->F[i]) / speed;
    o->b = (m->B[j] - m->B[i]) / speed;
    o->w = (m->W[j] - m->W[i]) / speed;
    if (m->recompute) o->b += o->f;
    o->flops = m->FL[j] - m->FL[i];
    o->send_act_bytes = j < m->n ? m->cross_act[j] : 0;
    o->send_grad_bytes = i > 0 ? m->cross_grad[i] : 0;
    double bw = c->link_bandwidth;
    if (o->send_act_bytes > 0)
        o->comm += c->link_latency + (bw > 0 ? (double)o->send_act_bytes / bw : 0.0);
    if (o->send_grad_bytes > 0)
        o->comm += c->link_latency + (bw > 0 ? (double)o->send_grad_bytes / bw : 0.0);
    o->optim = r->optim_time / speed;
    /* The update runs once per step; spread over the step's micro-batches
     * it is what the stage's period carries in the steady state. */
    o->time = o->f + o->b + o->w + o->comm + o->optim / m->M;

    pw_stage_memory *mem = &o->mem;
    mem->slots = m->inflight[s];
    mem->params = r->params;
    mem->grads = r->grads;
    mem->optim_state = r->optim;
    /* Everything the range touches: its values (and received values passed
     * on), their gradients, the statistics. */
    int64_t all_act = r->act + (m->cross_act[i] - r->livein_act);
    int64_t all_grad = r->grad + (m->cross_grad[i] - r->livein_grad);
    int64_t work = ALIGN64(r->work * 4);
    if (m->recompute) {
        /* A slot keeps the stage's inputs, what it sends on and the boundary
         * gradients; one shared copy holds the rest, rebuilt per backward. */
        int64_t out_act = j < m->n ? m->cross_act[j] : 0, out_grad = j < m->n ? m->cross_grad[j] : 0;
        mem->stash = r->data_in + m->cross_act[i] + out_act - r->pass_act +
                     m->cross_grad[i] + out_grad - r->pass_grad;
        mem->shared = (all_act - r->data_in - m->cross_act[i]) + all_grad + r->stats + work;
    } else {
        mem->stash = all_act + all_grad + r->stats;
        mem->shared = work;
    }
    mem->activations = (int64_t)mem->slots * mem->stash;
    if (s + 1 < m->S) mem->buffers += (int64_t)pool_buffers(m, s) * o->send_act_bytes;
    if (s > 0) mem->buffers += (int64_t)pool_buffers(m, s - 1) * o->send_grad_bytes;
    mem->total = mem->params + mem->grads + mem->optim_state + mem->shared + mem->activations +
                 mem->buffers;
    mem->budget = stage_budget(m, s);
}

static int fits(const pw_stage_cost *o) { return o->mem.budget <= 0 || o->mem.total <= o->mem.budget; }

/* ------------------------------------------------------------------ search */

typedef enum dp_mode {
    DP_BOTTLENECK,  /* minimise max stage time over splits that fit */
    DP_SUM,         /* minimise Σ stage time with every stage ≤ cap, fitting */
    DP_MEMORY,      /* minimise max need / budget (diagnosis: the closest split) */
} dp_mode;

/* Exact dynamic program over (stage s, end node j): best[s][j] is the best
 * value of stages 0..s covering nodes [0, j) with stage s ending at j. The
 * outer loop walks the start node i, so best[s-1][i] is final when read and
 * one incremental walk over j serves every s. Fills begin[] and returns the
 * value, or INFINITY when no split qualifies. */
static double dp(model *m, dp_mode mode, double cap, int *begin, pw_status *st)
{
    const int n = m->n, S = m->S;
    size_t cells = (size_t)S * (size_t)(n + 1);
    double *best = malloc(sizeof(double) * cells);
    int *arg = malloc(sizeof(int) * cells);
    *st = PW_OK;
    if (!best || !arg) {
        free(best);
        free(arg);
        *st = pw_error(PW_ERR_NOMEM, "partition: out of memory for %d stages x %d nodes", S, n);
        return INFINITY;
    }
    for (size_t k = 0; k < cells; k++) {
        best[k] = INFINITY;
        arg[k] = -1;
    }
#define BEST(s, j) best[(size_t)(s) * (size_t)(n + 1) + (size_t)(j)]
#define ARG(s, j) arg[(size_t)(s) * (size_t)(n + 1) + (size_t)(j)]
    range r;
    pw_stage_cost o;
    for (int i = 0; i < n; i++) {
        int smin = i == 0 ? 0 : 1, smax = i < S - 1 ? i : S - 1;
        int any = i == 0;
        for (int s = smin; s <= smax && !any; s++) any = isfinite(BEST(s - 1, i));
        if (!any) continue;
        range_start(m, &r, i);
        for (int j = i + 1; j <= n; j++) {
            range_add(m, &r);
            for (int s = smin; s <= smax; s++) {
                if (S - 1 - s > n - j) continue; /* later stages need a node each */
                double prev = s == 0 ? 0.0 : BEST(s - 1, i);
                if (!isfinite(prev)) continue;
                stage_eval(m, s, &r, &o);
                double v;
                if (mode == DP_MEMORY) {
                    double ratio = o.mem.budget > 0 ? (double)o.mem.total / (double)o.mem.budget : 0.0;
                    v = prev > ratio ? prev : ratio;
                } else {
                    if (!fits(&o)) continue;
                    if (mode == DP_SUM) {
                        if (o.time > cap) continue;
                        v = prev + o.time;
                    } else {
                        v = prev > o.time ? prev : o.time;
                    }
                }
                if (v < BEST(s, j)) {
                    BEST(s, j) = v;
                    ARG(s, j) = i;
                }
            }
        }
    }
    double result = BEST(S - 1, n);
    if (isfinite(result)) {
        begin[S] = n;
        for (int s = S - 1, j = n; s >= 0; s--) {
            j = ARG(s, j);
            PW_ASSERT(j >= 0);
            begin[s] = j;
        }
        PW_ASSERT(begin[0] == 0);
    }
#undef BEST
#undef ARG
    free(best);
    free(arg);
    return result;
}

/* ------------------------------------------------------------------ results */

const char *pw_format_bytes(double v, char *buf, size_t n)
{
    static const char *const pre[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int k = 0;
    while (v >= 1024.0 && k < 5) {
        v /= 1024.0;
        k++;
    }
    snprintf(buf, n, k ? "%.1f %s" : "%.0f %s", v, pre[k]);
    return buf;
}

static pw_status alloc_partition(pw_partition *p, int S)
{
    memset(p, 0, sizeof *p);
    p->n_stages = S;
    p->begin = calloc((size_t)S + 1, sizeof(int));
    p->flops = calloc((size_t)S, sizeof(double));
    p->stage = calloc((size_t)S, sizeof(pw_stage_cost));
    if (!p->begin || !p->flops || !p->stage) {
        pw_partition_free(p);
        return pw_error(PW_ERR_NOMEM, "partition: out of memory");
    }
    return PW_OK;
}

/* Fills every prediction of p from p->begin. */
static void fill(model *m, pw_partition *p)
{
    range r;
    p->bottleneck = 0.0;
    p->bottleneck_stage = 0;
    double sum_time = 0.0, busy = 0.0;
    for (int s = 0; s < m->S; s++) {
        range_start(m, &r, p->begin[s]);
        p->flops[s] = 0.0;
        while (r.j < p->begin[s + 1]) {
            p->flops[s] += m->sample_flops[r.j];
            range_add(m, &r);
        }
        stage_eval(m, s, &r, &p->stage[s]);
        const pw_stage_cost *o = &p->stage[s];
        if (o->time > p->bottleneck) {
            p->bottleneck = o->time;
            p->bottleneck_stage = s;
        }
        sum_time += o->time;
        busy += (o->f + o->b + o->w) * m->M + o->optim;
    }
    p->step_time = sum_time + (m->M - 1) * p->bottleneck;
    p->bubble = p->step_time > 0 ? 1.0 - busy / (m->S * p->step_time) : 0.0;
    p->balance = m->cfg->balance;
}

static const char *node_name(const pw_graph *g, int i) { return g->values[g->nodes[i].output].name; }

/* "nodes 4-6: fc2 .. h2" / "node 4: fc2" */
static void range_str(const pw_graph *g, int b, int e, char *buf, size_t n)
{
    if (e - b == 1)
        snprintf(buf, n, "node %d: %s", b, node_name(g, b));
    else
        snprintf(buf, n, "nodes %d-%d: %s .. %s", b, e - 1, node_name(g, b), node_name(g, e - 1));
}

static void device_str(const model *m, int s, char *buf, size_t n)
{
    const pw_device_spec *d = m->cfg->devices ? &m->cfg->devices[s] : NULL;
    char b[32];
    if (d && d->memory > 0) {
        if (d->name)
            snprintf(buf, n, "%s has %s", d->name, pw_format_bytes((double)d->memory, b, sizeof b));
        else
            snprintf(buf, n, "device %d has %s", s, pw_format_bytes((double)d->memory, b, sizeof b));
    } else {
        snprintf(buf, n, "the budget is %s per stage",
                 pw_format_bytes((double)m->cfg->memory_budget, b, sizeof b));
    }
}

/* "stage 1 (nodes 4-6: fc2 .. h2) needs 1.5 MiB (params .., grads ..,
 * optimizer .., activations 4 x .., buffers ..) but device 1 has 1.0 MiB" */
static void need_str(const model *m, const pw_partition *p, int s, char *buf, size_t n)
{
    const pw_stage_memory *mm = &p->stage[s].mem;
    char rs[160], dev[96], t[32], a[32], b[32], c[32], d[32], e[32], f[32];
    range_str(m->g, p->begin[s], p->begin[s + 1], rs, sizeof rs);
    device_str(m, s, dev, sizeof dev);
    char act[160];
    if (mm->shared > 0)
        snprintf(act, sizeof act, "activations %d x %s + %s shared", mm->slots,
                 pw_format_bytes((double)mm->stash, d, sizeof d),
                 pw_format_bytes((double)mm->shared, f, sizeof f));
    else
        snprintf(act, sizeof act, "activations %d x %s", mm->slots,
                 pw_format_bytes((double)mm->stash, d, sizeof d));
    snprintf(buf, n, "stage %d (%s) needs %s (params %s, grads %s, optimizer %s, %s, buffers %s) "
             "but %s", s, rs, pw_format_bytes((double)mm->total, t, sizeof t),
             pw_format_bytes((double)mm->params, a, sizeof a),
             pw_format_bytes((double)mm->grads, b, sizeof b),
             pw_format_bytes((double)mm->optim_state, c, sizeof c), act,
             pw_format_bytes((double)mm->buffers, e, sizeof e), dev);
}

/* Largest need / budget among the stages of p (the one to name). */
static int worst_stage(const pw_partition *p)
{
    int worst = 0;
    double wr = -1.0;
    for (int s = 0; s < p->n_stages; s++) {
        const pw_stage_memory *mm = &p->stage[s].mem;
        double r = mm->budget > 0 ? (double)mm->total / (double)mm->budget : 0.0;
        if (r > wr) {
            wr = r;
            worst = s;
        }
    }
    return worst;
}

/* Whether some split fits under a variant of the model. */
static int variant_fits(model *m, int recompute, int one_inflight, int *tmp)
{
    int saved_r = m->recompute;
    const int *saved_i = m->inflight;
    m->recompute = recompute;
    if (one_inflight) m->inflight = m->ones;
    pw_status st;
    double v = dp(m, DP_BOTTLENECK, 0.0, tmp, &st);
    m->recompute = saved_r;
    m->inflight = saved_i;
    return st == PW_OK && isfinite(v);
}

/* What would help, each said whether it alone fits. */
static void hints(model *m, char *buf, size_t n)
{
    int *tmp = malloc(sizeof(int) * ((size_t)m->S + 1));
    size_t off = 0;
    int most = 0;
    for (int s = 0; s < m->S; s++)
        if (m->inflight[s] > most) most = m->inflight[s];
    off += (size_t)snprintf(buf + off, n - off, "would help: more stages");
    if (!m->recompute && tmp && off < n)
        off += (size_t)snprintf(buf + off, n - off, ", recomputation (%s)",
                                variant_fits(m, 1, 0, tmp) ? "fits" : "not enough alone");
    if (most > 1 && tmp && off < n)
        off += (size_t)snprintf(buf + off, n - off, ", fewer micro-batches in flight (up to %d "
                                "now; one per stage %s)", most,
                                variant_fits(m, m->recompute, 1, tmp) ? "fits" : "is not enough alone");
    if (off < n) snprintf(buf + off, n - off, ", or a larger budget");
    free(tmp);
}

static pw_status refuse(model *m, const char *what)
{
    pw_partition p;
    pw_status st = alloc_partition(&p, m->S);
    if (st != PW_OK) return st;
    double v = dp(m, DP_MEMORY, 0.0, p.begin, &st);
    if (st != PW_OK || !isfinite(v)) {
        pw_partition_free(&p);
        return st != PW_OK ? st : pw_error(PW_ERR_INTERNAL, "partition: no split at all");
    }
    fill(m, &p);
    char need[1024], help[256];
    need_str(m, &p, worst_stage(&p), need, sizeof need);
    hints(m, help, sizeof help);
    pw_partition_free(&p);
    return pw_error(PW_ERR_NOMEM, "partition: %s; %s split into %d stage%s fits, this one comes "
                    "closest; %s", need, what, m->S, m->S > 1 ? "s" : "", help);
}

static void cut_list(const pw_partition *p, char *buf, size_t n)
{
    size_t off = 0;
    buf[0] = '\0';
    for (int s = 1; s < p->n_stages && off < n; s++)
        off += (size_t)snprintf(buf + off, n - off, "%s%d", s > 1 ? ", " : "", p->begin[s]);
}

/* The cut markers: honoured, checked against memory and compared with the
 * best split. */
static pw_status plan_cuts(model *m, pw_partition *out)
{
    const pw_graph *g = m->g;
    int s = 0;
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].cut_before && i > 0) out->begin[++s] = i;
    out->begin[m->S] = g->n_nodes;
    fill(m, out);
    out->method = PW_PARTITION_CUTS;

    pw_partition best;
    pw_status st = alloc_partition(&best, m->S);
    if (st != PW_OK) return st;
    double bv = dp(m, DP_BOTTLENECK, 0.0, best.begin, &st);
    if (st != PW_OK) {
        pw_partition_free(&best);
        return st;
    }
    char cuts[128] = "";
    if (isfinite(bv)) {
        double sv = dp(m, DP_SUM, bv, best.begin, &st);
        PW_ASSERT(st != PW_OK || isfinite(sv));
        fill(m, &best);
        cut_list(&best, cuts, sizeof cuts);
    }
    out->best_bottleneck = isfinite(bv) ? bv : -1.0;
    for (int k = 0; k < m->S; k++) {
        if (fits(&out->stage[k])) continue;
        char need[1024], help[256];
        need_str(m, out, k, need, sizeof need);
        hints(m, help, sizeof help);
        pw_partition_free(&best);
        if (isfinite(bv))
            return pw_error(PW_ERR_NOMEM, "partition: the `cut` markers of %s do not fit: %s; "
                            "%s; the best split fits (cuts before nodes %s)", g->file, need, help,
                            cuts);
        return pw_error(PW_ERR_NOMEM, "partition: the `cut` markers of %s do not fit: %s; no "
                        "split into %d stages fits either; %s", g->file, need, m->S, help);
    }
    if (!isfinite(bv))
        snprintf(out->note, sizeof out->note, "cut markers: bottleneck %.3g ms on stage %d",
                 1e3 * out->bottleneck, out->bottleneck_stage);
    else if (out->bottleneck - bv <= 5e-4 * out->bottleneck) /* equal to the printed digits */
        snprintf(out->note, sizeof out->note, "cut markers: bottleneck %.3g ms on stage %d, as "
                 "good as the best split", 1e3 * out->bottleneck, out->bottleneck_stage);
    else
        snprintf(out->note, sizeof out->note, "cut markers: bottleneck %.3g ms on stage %d; the "
                 "best split (cuts before nodes %s) reaches %.3g ms, %.1f%% less", 1e3 * out->bottleneck,
                 out->bottleneck_stage, cuts, 1e3 * bv, 100.0 * (1.0 - bv / out->bottleneck));
    pw_partition_free(&best);
    return PW_OK;
}

pw_status pw_partition_plan(const pw_graph *g, const pw_partition_config *cfg, pw_partition *out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "partition: out is NULL");
    memset(out, 0, sizeof *out);
    PW_CHECK(check_config(g, cfg));
    pw_partition_method method = cfg->method;
    if (method == PW_PARTITION_AUTO)
        method = g->n_cuts + 1 == cfg->n_stages && cfg->n_stages > 1 ? PW_PARTITION_CUTS
                                                                      : PW_PARTITION_BALANCED;
    if (method == PW_PARTITION_CUTS && g->n_cuts + 1 != cfg->n_stages)
        return pw_error(PW_ERR_INVALID_ARG, "partition: the `cut` markers of %s make %d stage%s, "
                        "not %d", g->file, g->n_cuts + 1, g->n_cuts ? "s" : "", cfg->n_stages);
    if ((unsigned)method > PW_PARTITION_BALANCED)
        return pw_error(PW_ERR_INVALID_ARG, "partition: unknown method %d", (int)method);
    pw_partition_config c = *cfg;
    if (method == PW_PARTITION_FLOPS) c.balance = PW_BALANCE_FLOPS;
    if (c.balance == PW_BALANCE_FLOPS) c.node_times = NULL;

    model m;
    PW_CHECK(model_init(&m, g, &c));
    pw_status st = alloc_partition(out, c.n_stages);
    if (st != PW_OK) {
        model_free(&m);
        return st;
    }
    if (method == PW_PARTITION_CUTS) {
        st = plan_cuts(&m, out);
    } else {
        double bv = dp(&m, DP_BOTTLENECK, 0.0, out->begin, &st);
        if (st == PW_OK && !isfinite(bv)) {
            st = refuse(&m, "no");
        } else if (st == PW_OK) {
            /* Among the splits reaching the bottleneck, the least total time.
             * The cap compares values computed by the same code, so the
             * split found above qualifies and this pass cannot fail. */
            double sv = dp(&m, DP_SUM, bv, out->begin, &st);
            PW_ASSERT(st != PW_OK || isfinite(sv));
            fill(&m, out);
            out->method = method;
            out->best_bottleneck = out->bottleneck;
        }
    }
    if (st != PW_OK) {
        char msg[2048];
        snprintf(msg, sizeof msg, "%s", pw_last_error());
        pw_partition_free(out);
        model_free(&m);
        return pw_error(st, "%s", msg);
    }
    model_free(&m);
    return PW_OK;
}

pw_status pw_partition_evaluate(const pw_graph *g, const pw_partition_config *cfg,
                                const int *begin, pw_partition *out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "partition: out is NULL");
    memset(out, 0, sizeof *out);
    PW_CHECK(check_config(g, cfg));
    const int S = cfg->n_stages;
    if (!begin || begin[0] != 0 || begin[S] != g->n_nodes)
        return pw_error(PW_ERR_INVALID_ARG, "partition: cuts must run from node 0 to %d", g->n_nodes);
    for (int s = 0; s < S; s++)
        if (begin[s] >= begin[s + 1])
            return pw_error(PW_ERR_INVALID_ARG, "partition: stage %d is empty ([%d, %d))", s,
                            begin[s], begin[s + 1]);
    pw_partition_config c = *cfg;
    if (c.balance == PW_BALANCE_FLOPS) c.node_times = NULL;
    model m;
    PW_CHECK(model_init(&m, g, &c));
    pw_status st = alloc_partition(out, S);
    if (st != PW_OK) {
        model_free(&m);
        return st;
    }
    memcpy(out->begin, begin, sizeof(int) * ((size_t)S + 1));
    fill(&m, out);
    out->method = PW_PARTITION_CUTS;
    out->best_bottleneck = -1.0;
    model_free(&m);
    return PW_OK;
}

pw_status pw_partition_make(const pw_graph *g, int n_stages, pw_partition_method method,
                            pw_partition *out)
{
    pw_partition_config c = {.n_stages = n_stages, .method = method,
                             .balance = PW_BALANCE_FLOPS};
    pw_status st = pw_partition_plan(g, &c, out);
    /* Callers of this entry point know the method as FLOPS. */
    if (st == PW_OK && out->method == PW_PARTITION_BALANCED) out->method = PW_PARTITION_FLOPS;
    return st;
}

void pw_partition_free(pw_partition *p)
{
    if (!p) return;
    free(p->begin);
    free(p->flops);
    free(p->stage);
    p->begin = NULL;
    p->flops = NULL;
    p->stage = NULL;
}

pw_status pw_partition_method_parse(const char *s, pw_partition_method *out)
{
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "no partition method given");
    if (!strcmp(s, "auto")) *out = PW_PARTITION_AUTO;
    else if (!strcmp(s, "cuts")) *out = PW_PARTITION_CUTS;
    else if (!strcmp(s, "flops")) *out = PW_PARTITION_FLOPS;
    else if (!strcmp(s, "balanced")) *out = PW_PARTITION_BALANCED;
    else return pw_error(PW_ERR_INVALID_ARG, "unknown partition method '%s' (want auto, cuts, "
                         "balanced or flops)", s);
    return PW_OK;
}

const char *pw_partition_method_name(pw_partition_method m)
{
    switch (m) {
    case PW_PARTITION_AUTO: return "auto";
    case PW_PARTITION_CUTS: return "cuts";
    case PW_PARTITION_FLOPS: return "flops";
    case PW_PARTITION_BALANCED: return "balanced";
    }
    return "?";
}

pw_status pw_balance_parse(const char *s, pw_balance *out)
{
    if (s && !strcmp(s, "flops")) *out = PW_BALANCE_FLOPS;
    else if (s && !strcmp(s, "time")) *out = PW_BALANCE_TIME;
    else return pw_error(PW_ERR_INVALID_ARG, "unknown balance '%s' (want flops or time)", s ? s : "");
    return PW_OK;
}

const char *pw_balance_name(pw_balance b)
{
    switch (b) {
    case PW_BALANCE_FLOPS: return "flops";
    case PW_BALANCE_TIME: return "time";
    }
    return "?";
}
