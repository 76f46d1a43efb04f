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
    double comm_out_min;        /* least traffic time a stage before a cut / */
    double comm_in_min;         /* after a cut can have (0 with one node) */
    double *OW;                 /* [n + 1] prefix sums of the optimizer time of the
                                   parameters each node introduces (speed 1, per step) */
    double ow_err;              /* bound on the rounding of an OW difference */
    int64_t *MP, *MA;           /* [n + 1] prefix sums of the bytes any stage holding
                                   node i holds for it: parameters, their gradients
                                   and state (MP), and per in-flight slot its
                                   activations (MA); see model_init */
} model;

/* One range [i, j) being walked, j growing. Buffer sizes follow the stage
 * program's plan (stages/program/program.c): the values the range reads or writes,
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
    free(m->OW);
    free(m->MA);
    free(m->MP);
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
    if (c->grad_sum_copies < 0 || c->grad_sum_copies > 30)
        return pw_error(PW_ERR_INVALID_ARG, "partition: %d copies of the gradients (0 to 30)",
                        c->grad_sum_copies);
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
    m->OW = calloc((size_t)n + 1, sizeof(double));
    m->MA = calloc((size_t)n + 1, sizeof(int64_t));
    m->MP = calloc((size_t)n + 1, sizeof(int64_t));
    unsigned char *rg = grad_flags(g);
    if (!m->ones || !m->F || !m->B || !m->W || !m->FL || !m->sample_flops || !m->last_use ||
        !m->vbytes || !m->gbytes || !m->stat_bytes || !m->pbytes || !m->obytes ||
        !m->ptime || !m->cross_act || !m->cross_grad || !m->vstamp || !m->pstamp || !m->OW || !m->MA || !m->MP || !rg) {
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
        if ((double)extra * mb > 0x1p60) {
            free(rg);
            model_free(m);
            return pw_error(PW_ERR_INVALID_ARG, "partition: node %d (%s) keeps %.3g bytes per "
                            "micro-batch of %lld; too large to plan", i,
                            g->values[g->nodes[i].output].name, (double)extra * mb,
                            (long long)m->mb);
        }
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
    /* The cheapest cut's messages, as stage_eval prices them: a lower bound
     * on the traffic time of any stage next to a cut (the search's windows). */
    const double bw = c->link_bandwidth;
    m->comm_out_min = m->comm_in_min = n > 1 ? INFINITY : 0.0;
    for (int k = 1; k < n; k++) {
        double a = m->cross_act[k] > 0
                       ? c->link_latency + (bw > 0 ? (double)m->cross_act[k] / bw : 0.0) : 0.0;
        double gr = m->cross_grad[k] > 0
                        ? c->link_latency + (bw > 0 ? (double)m->cross_grad[k] / bw : 0.0) : 0.0;
        if (a < m->comm_out_min) m->comm_out_min = a;
        if (gr < m->comm_in_min) m->comm_in_min = gr;
    }
    for (int q = 0; q < np; q++) {
        int64_t numel = pw_shape_numel(&g->params[q].shape);
        if ((double)numel * 4.0 * (double)c->optim_state_floats > 0x1p60) {
            free(rg);
            model_free(m);
            return pw_error(PW_ERR_INVALID_ARG, "partition: parameter '%s' needs %.3g bytes of "
                            "optimizer state; too large to plan", g->params[q].name,
                            (double)numel * 4.0 * (double)c->optim_state_floats);
        }
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
    /* Every stage pays at least the update of the parameters its nodes
     * introduce: a lower bound on its optimizer time for the search. */
    for (int i = 0; i < n; i++) {
        double o = 0.0;
        for (int k = 0; k < g->nodes[i].n_params; k++) {
            int q = g->nodes[i].params[k];
            if (g->params[q].owner == i && m->pstamp[q] != 1) {
                m->pstamp[q] = 1; /* a node naming its parameter twice pays once */
                o += m->ptime[q];
            }
        }
        m->OW[i + 1] = m->OW[i] + o;
    }
    memset(m->pstamp, 0, sizeof(int) * ((size_t)np + 1));
    m->ow_err = 1e-9 * m->OW[n];

    /* Bytes a stage holding node i holds for it whatever the range: a
     * gradient buffer per parameter use and the parameters and optimizer
     * state it introduces (MP), and its output, the output's gradient and
     * its statistics (MA), in each slot (with recompute: once, in the shared
     * copy). stage_eval's total is at least MP + slots × MA summed over the
     * range (memory_bound).
     * The whole graph's bytes bound every sum the model forms (times the
     * slots and message buffers): refuse graphs where that could overflow. */
    double all = 0.0;
    int most_slots = 1;
    for (int s = 0; s < m->S; s++)
        if (m->inflight[s] > most_slots) most_slots = m->inflight[s];
    for (int v = 0; v < nv; v++) all += (double)m->vbytes[v] + (double)m->gbytes[v];
    for (int q = 0; q < np; q++)
        all += (3.0 + c->grad_sum_copies) * (double)m->pbytes[q] + (double)m->obytes[q];
    for (int i = 0; i < n; i++) {
        all += (double)m->stat_bytes[i];
        for (int k = 0; k < g->nodes[i].n_params; k++)
            all += (1.0 + c->grad_sum_copies) * (double)m->pbytes[g->nodes[i].params[k]];
    }
    if (all * ((double)most_slots + 2.0 * (double)m->M + 4.0) > 0x1p61) {
        free(rg);
        model_free(m);
        return pw_error(PW_ERR_INVALID_ARG, "partition: graph '%s' holds %.3g bytes per "
                        "micro-batch of %lld (values, gradients, parameters); too large to plan",
                        g->name, all, (long long)(c->micro_batch_size > 0 ? c->micro_batch_size : 1));
    }
    for (int i = 0; i < n; i++) {
        const pw_node *nd = &g->nodes[i];
        int64_t b = 0;
        for (int k = 0; k < nd->n_params; k++) {
            int q = nd->params[k];
            b += m->pbytes[q];
            if (g->params[q].owner == i && m->pstamp[q] != 1) {
                m->pstamp[q] = 1;
                b += m->pbytes[q] + m->obytes[q];
            }
        }
        m->MP[i + 1] = m->MP[i] + b;
        m->MA[i + 1] = m->MA[i] + m->vbytes[nd->output] + m->gbytes[nd->output] + m->stat_bytes[i];
    }
    memset(m->pstamp, 0, sizeof(int) * ((size_t)np + 1));
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
        int64_t T = m->g->values[nd->inputs[0]].shape.d[0], w = nd->attrs.heads * T * T;
        if (w > r->work) r->work = w; /* the backward's scratch: H·T·T */
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
    mem->grads = r->grads * (1 + (int64_t)c->grad_sum_copies);
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

/* The search. The optimum is the exact dynamic program over (stage s, end
 * node j): best[s][j] is the best value of stages 0..s covering nodes [0, j)
 * with stage s ending at j, min over the start i of stage s. Walking every
 * (s, i, j) is O(S·n²); three exact prunings make it near-linear on graphs
 * whose stages hold many nodes, without changing any value the answer is
 * built from (docs/partition.md gives the argument):
 *
 *   1. a bound U on the answer (dp_tightened, bottleneck_search): for the
 *      bottleneck the value of a split that fits, tightened from below;
 *      for the sum pass the cap itself; for DP_MEMORY the least max
 *      need / budget of a greedy split, tightened likewise. A pair (i, j)
 *      that fails stage_may_pass (prefix-sum lower bounds on its time and
 *      memory) or whose evaluated value exceeds U cannot be on a split of
 *      value ≤ U; the bounds only grow with j, so the walk from i stops at
 *      the first j where every stage fails them.
 *   2. windows: the same bounds, extended greedily stage by stage from
 *      node 0 and back from node n, confine where stage s of such a split
 *      can end (windows()); best[] is stored for the windows only.
 *   3. the start i of stage s must end stage s − 1 inside its window with
 *      a finite value.
 * Ties go to the smallest start i, as in the unpruned program: a state on a
 * split of value ≤ U sees exactly the candidates it would see there. */

typedef enum dp_mode {
    DP_BOTTLENECK,  /* minimise max stage time over splits that fit (bound: U) */
    DP_SUM,         /* minimise Σ stage time with every stage ≤ cap, fitting */
    DP_MEMORY,      /* minimise max need / budget (diagnosis: the closest split) */
} dp_mode;

static double stage_speed(const model *m, int s)
{
    const pw_device_spec *d = m->cfg->devices ? &m->cfg->devices[s] : NULL;
    return d && d->speed > 0 ? d->speed : 1.0;
}

/* Work of nodes [0, j) on a speed-1 device: what f + b + w sums, plus the
 * update of the parameters they introduce spread over the M micro-batches
 * (the part of a stage's time that prefix sums can bound). */
static double compute_prefix(const model *m, int j)
{
    double c = m->F[j] + m->B[j] + m->W[j];
    return (m->recompute ? c + m->F[j] : c) + m->OW[j] / m->M;
}

/* Largest j in [lo, hi] with pre(m, j) ≤ x, or lo − 1 (pre never decreases). */
static int last_at_most(const model *m, double (*pre)(const model *, int), int lo, int hi,
                        double x)
{
    int a = lo - 1;
    while (a < hi) { /* invariant: pre(a) ≤ x or a = lo − 1 */
        int mid = a + (hi - a + 1) / 2;
        if (pre(m, mid) <= x) a = mid;
        else hi = mid - 1;
    }
    return a;
}

static double param_prefix(const model *m, int j) { return (double)m->MP[j]; }
static double act_prefix(const model *m, int j) { return (double)m->MA[j]; }

/* Copies of the activations stage s holds (one with recompute: the shared
 * copy; its slots keep less than that). */
static int act_copies(const model *m, int s) { return m->recompute ? 1 : m->inflight[s]; }

/* A lower bound on stage_eval's mem.total for stage s = [i, j), growing
 * with j (exact integers). */
static int64_t memory_bound(const model *m, int s, int i, int j)
{
    return m->MP[j] - m->MP[i] + (int64_t)act_copies(m, s) * (m->MA[j] - m->MA[i]);
}

/* Bytes stage s may hold: its budget, INFINITY when unlimited; and per
 * copy of its activations. */
static double budget_of(const model *m, int s)
{
    int64_t b = stage_budget(m, s);
    return b > 0 ? (double)b : INFINITY;
}

static double act_budget_of(const model *m, int s) { return budget_of(m, s) / act_copies(m, s); }

/* Whether stage s = [i, j) passes the lower bounds (see 2. above): its
 * time bound plus the cheapest messages within U, its memory bound within
 * the budget (DP_MEMORY: within U × budget). Each only grows as the range
 * grows (prefix differences of non-decreasing sums, in the same operations
 * either way), so a range that fails has no passing superset; and a stage
 * that qualifies for the program passes (each bound is at most the value
 * stage_eval computes, summed in the order it adds them). */
static int stage_may_pass(const model *m, int memory_mode, double U, int s, int i, int j)
{
    const int S = m->S;
    int64_t b = stage_budget(m, s), need = memory_bound(m, s, i, j);
    if (memory_mode) return b <= 0 || (double)need / (double)b <= U;
    if (b > 0 && need > b) return 0;
    if (!isfinite(U)) return 1;
    double speed = stage_speed(m, s);
    double f = (m->F[j] - m->F[i]) / speed;
    double bb = (m->B[j] - m->B[i]) / speed;
    double w = (m->W[j] - m->W[i]) / speed;
    if (m->recompute) bb += f;
    double comm = 0.0;
    if (s + 1 < S) comm += m->comm_out_min;
    if (s > 0) comm += m->comm_in_min;
    double o = m->OW[j] - m->OW[i] - m->ow_err;
    return f + bb + w + comm + (o > 0 ? o / speed / m->M : 0.0) <= U;
}

/* The windows [lo[s], hi[s]] where stage s may end under the bound U (see
 * 2. above), from the lower bounds alone: hi[s] is the furthest end s + 1
 * passing stages reach from node 0, lo[s] the nearest point from which
 * S − 1 − s passing stages reach node n. Extending each stage as far as it
 * passes gives the furthest reach for bounds that only grow with the range
 * (a stage of any split ending earlier lies inside the greedy one's range).
 * Binary search per stage: O(S log n). Returns 0 when some window is
 * empty: no split has value ≤ U. */
static int windows(const model *m, int memory_mode, double U, int *lo, int *hi)
{
    const int n = m->n, S = m->S;
    int reach = 0; /* furthest end of stage s − 1 */
    for (int s = 0; s < S; s++) {
        int jmin = reach + 1, jmax = n - (S - 1 - s);
        if (jmin > jmax) jmin = jmax;
        int a = jmin - 1, z = jmax; /* largest j in [jmin, jmax] that passes */
        while (a < z) {
            int mid = a + (z - a + 1) / 2;
            if (stage_may_pass(m, memory_mode, U, s, reach, mid)) a = mid;
            else z = mid - 1;
        }
        if (a < jmin) {
            if (s == 0) return 0; /* not even node 0 alone */
            a = jmin; /* an earlier start may pass where this one fails */
        }
        hi[s] = a;
        reach = a;
    }
    if (hi[S - 1] != n) return 0;
    int start = n; /* nearest start of stage s + 1 */
    lo[S - 1] = n;
    for (int s = S - 1; s > 0; s--) {
        int imin = s, imax = start - 1;
        if (imin > imax) imin = imax;
        int a = imin, z = imax + 1; /* smallest i in [imin, imax] with [i, start) passing */
        while (a < z) {
            int mid = a + (z - a) / 2;
            if (stage_may_pass(m, memory_mode, U, s, mid, start)) z = mid;
            else a = mid + 1;
        }
        if (z > imax) z = imax;
        lo[s - 1] = z;
        start = z;
    }
    for (int s = 0; s < S; s++) {
        if (lo[s] < s + 1) lo[s] = s + 1;
        if (s > 0 && lo[s] <= lo[s - 1]) lo[s] = lo[s - 1] + 1;
        if (lo[s] > hi[s]) return 0;
    }
    return 1;
}

/* The program itself; `bound` is U: for DP_BOTTLENECK an upper bound on
 * the answer (INFINITY: none), for DP_SUM the cap, for DP_MEMORY an upper
 * bound on the least ratio (INFINITY: none). Fills begin[] and returns the
 * value, or INFINITY when no split qualifies. */
static double dp(model *m, dp_mode mode, double bound, int *begin, pw_status *st)
{
    const int n = m->n, S = m->S;
    const int memory_mode = mode == DP_MEMORY;
    const double U = bound;
    int *lo = malloc(sizeof(int) * (size_t)S), *hi = malloc(sizeof(int) * (size_t)S);
    size_t *off = malloc(sizeof(size_t) * ((size_t)S + 1));
    double *best = NULL;
    int *arg = NULL;
    double result = INFINITY;
    *st = PW_OK;
    if (!lo || !hi || !off) goto nomem;
    if (!windows(m, memory_mode, U, lo, hi)) goto done;
    off[0] = 0;
    for (int s = 0; s < S; s++) off[s + 1] = off[s] + (size_t)(hi[s] - lo[s] + 1);
    best = malloc(sizeof(double) * off[S]);
    arg = malloc(sizeof(int) * off[S]);
    if (!best || !arg) goto nomem;
    for (size_t k = 0; k < off[S]; k++) {
        best[k] = INFINITY;
        arg[k] = -1;
    }
#define IN(s, j) ((j) >= lo[s] && (j) <= hi[s])
#define BEST(s, j) best[off[s] + (size_t)((j) - lo[s])]
#define ARG(s, j) arg[off[s] + (size_t)((j) - lo[s])]
    range r;
    pw_stage_cost o;
    int ta = 0, tb = -1; /* stages t whose window holds i: t in [ta, tb] */
    for (int i = 0; i < n; i++) {
        /* Stage s starts at i: s = 0 at node 0, else stage s − 1 ends at i. */
        while (ta < S && hi[ta] < i) ta++;
        while (tb + 1 < S && lo[tb + 1] <= i) tb++;
        int smin = i == 0 ? 0 : ta + 1, smax = i == 0 ? 0 : tb + 1;
        if (smax > S - 1) smax = S - 1;
        int jmax = 0;
        for (int s = smin; s <= smax; s++)
            if ((s == 0 || isfinite(BEST(s - 1, i))) && hi[s] > jmax) jmax = hi[s];
        if (jmax <= i) continue;
        range_start(m, &r, i);
        for (int j = i + 1; j <= jmax; j++) {
            range_add(m, &r);
            int alive = 0;
            for (int s = smin; s <= smax; s++) {
                if (j > hi[s]) continue;
                double prev = s == 0 ? 0.0 : BEST(s - 1, i);
                if (!isfinite(prev)) continue;
                /* Lower bounds that only grow with j (see 1. above): once
                 * one fails, it fails for every later j of this s. */
                if (!stage_may_pass(m, memory_mode, U, s, i, j)) continue;
                alive = 1;
                if (j < lo[s]) continue;
                stage_eval(m, s, &r, &o);
                double v;
                if (memory_mode) {
                    double ratio = o.mem.budget > 0 ? (double)o.mem.total / (double)o.mem.budget : 0.0;
                    if (ratio > U) continue; /* above the bound: not on any split ≤ U */
                    v = prev > ratio ? prev : ratio;
                } else {
                    if (!fits(&o) || o.time > U) continue;
                    v = mode == DP_SUM ? prev + o.time : (prev > o.time ? prev : o.time);
                }
                if (v < BEST(s, j)) {
                    BEST(s, j) = v;
                    ARG(s, j) = i;
                }
            }
            if (!alive) break;
        }
    }
    PW_ASSERT(IN(S - 1, n));
    result = BEST(S - 1, n);
    if (isfinite(result)) {
        begin[S] = n;
        for (int s = S - 1, j = n; s >= 0; s--) {
            PW_ASSERT(IN(s, j));
            j = ARG(s, j);
            PW_ASSERT(j >= 0);
            begin[s] = j;
        }
        PW_ASSERT(begin[0] == 0);
    }
#undef IN
#undef BEST
#undef ARG
    goto done;
nomem:
    *st = pw_error(PW_ERR_NOMEM, "partition: out of memory for %d stages x %d nodes", S, n);
done:
    free(lo);
    free(hi);
    free(off);
    free(best);
    free(arg);
    return result;
}

/* dp under the best bound it can use: U = Uhi is valid (a split reaches
 * it) but may be loose, and the windows widen with U − optimum. The least U
 * whose windows are not empty is a lower bound L on the answer (bisection,
 * O(S log n) per probe); the program runs with U = L(1 + d) for d = 10^-3,
 * 8·10^-3, ... and stops at the first U that some split reaches: its answer
 * is then the optimum, since every split of value ≤ U took part. */
static double dp_tightened(model *m, dp_mode mode, double Uhi, int *begin, pw_status *st)
{
    const int S = m->S;
    int *lo = malloc(sizeof(int) * (size_t)S), *hi = malloc(sizeof(int) * (size_t)S);
    double a = 0.0, b = Uhi;
    if (lo && hi && isfinite(Uhi) && Uhi > 0) {
        for (int it = 0; it < 64; it++) {
            double mid = a + (b - a) / 2;
            if (!(mid > a && mid < b)) break;
            if (windows(m, mode == DP_MEMORY, mid, lo, hi)) b = mid;
            else a = mid;
        }
    }
    free(lo);
    free(hi);
    for (double d = 1e-3; isfinite(Uhi) && b * (1 + d) < Uhi; d *= 8) {
        double v = dp(m, mode, b * (1 + d), begin, st);
        if (*st != PW_OK || isfinite(v)) return v;
    }
    return dp(m, mode, Uhi, begin, st);
}

/* A split that balances a prefix: the least X such that filling stages
 * greedily from the left, stage s taking at most X × weight(s) of pre and
 * leaving a node for every later stage, covers the graph (binary search on
 * X, O(S log n) per probe; weight INFINITY: no limit). For compute with
 * weights the speeds, and for memory with weights the budgets. Only a
 * starting bound for the exact search: approximate costs time, never the
 * answer. */
static double limit(const model *m, double (*pre)(const model *, int),
                    double (*weight)(const model *, int), int b, int s, double x)
{
    double w = weight(m, s);
    return isinf(w) ? INFINITY : pre(m, b) + x * w;
}

static void greedy_split(const model *m, double (*pre)(const model *, int),
                         double (*weight)(const model *, int), int *begin)
{
    const int n = m->n, S = m->S;
    const double all = pre(m, n);
    double lo = 0.0, hi = 0.0;
    for (int s = 0; s < S; s++) {
        double t = isinf(weight(m, s)) ? 0.0 : all / weight(m, s);
        if (t > hi) hi = t;
    }
    for (int pass = 0; pass < 2; pass++) {
        for (int it = 0; pass == 0 && it < 100; it++) {
            double x = lo + (hi - lo) / 2;
            if (!(x > lo && x < hi)) break;
            int b = 0;
            for (int s = 0; s < S - 1; s++) {
                int j = last_at_most(m, pre, b + 1, n - (S - 1 - s), limit(m, pre, weight, b, s, x));
                b = j < b + 1 ? b + 1 : j;
            }
            if (isinf(weight(m, S - 1)) || (all - pre(m, b)) / weight(m, S - 1) <= x) hi = x;
            else lo = x;
        }
        if (pass == 0) continue;
        int b = 0;
        begin[0] = 0;
        for (int s = 0; s < S - 1; s++) {
            int j = last_at_most(m, pre, b + 1, n - (S - 1 - s), limit(m, pre, weight, b, s, hi));
            b = j < b + 1 ? b + 1 : j;
            begin[s + 1] = b;
        }
        begin[S] = n;
    }
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

/* The least bottleneck (dp DP_BOTTLENECK), its bound U taken from the
 * greedy compute-balanced split when that split fits. */
/* The value DP_MEMORY minimises for the split p (after fill). */
static double memory_ratio(const pw_partition *p)
{
    double v = 0.0;
    for (int s = 0; s < p->n_stages; s++) {
        const pw_stage_memory *mm = &p->stage[s].mem;
        double r = mm->budget > 0 ? (double)mm->total / (double)mm->budget : 0.0;
        if (r > v) v = r;
    }
    return v;
}

static int all_fit(const pw_partition *p)
{
    for (int s = 0; s < p->n_stages; s++)
        if (!fits(&p->stage[s])) return 0;
    return 1;
}

/* The split that comes closest to fitting (least max need / budget), with
 * its bound from the memory-balanced greedy split. */
static double memory_search(model *m, int *begin, pw_status *st)
{
    double U = INFINITY;
    pw_partition p;
    if (alloc_partition(&p, m->S) == PW_OK) {
        for (int k = 0; k < 2; k++) { /* balancing activations, then parameters */
            greedy_split(m, k ? param_prefix : act_prefix, k ? budget_of : act_budget_of, p.begin);
            fill(m, &p);
            double v = memory_ratio(&p);
            if (v < U) U = v;
        }
        pw_partition_free(&p);
    }
    return dp_tightened(m, DP_MEMORY, U, begin, st);
}

/* The least bottleneck (dp DP_BOTTLENECK). Its bound U is the bottleneck of
 * a split that fits: the compute-balanced greedy split, else the
 * memory-balanced one, else the split that comes closest to fitting, when
 * that one fits; when even that one needs more than some budget, no split
 * fits and the answer is INFINITY without a search. */
static double bottleneck_search(model *m, int *begin, pw_status *st)
{
    double U = INFINITY;
    pw_partition p;
    *st = alloc_partition(&p, m->S);
    if (*st != PW_OK) return INFINITY;
    for (int k = 0; k < 3 && !isfinite(U); k++) {
        if (k == 0) {
            greedy_split(m, compute_prefix, stage_speed, p.begin);
        } else if (k == 1) {
            greedy_split(m, act_prefix, act_budget_of, p.begin);
        } else {
            /* The memory lower bounds alone may already show that no split
             * fits (the windows at need / budget ≤ 1 are empty): then no
             * search is needed to say so. */
            int *lo = malloc(sizeof(int) * (size_t)m->S), *hi = malloc(sizeof(int) * (size_t)m->S);
            int may_fit = !lo || !hi || windows(m, 1, 1.0, lo, hi);
            free(lo);
            free(hi);
            if (!may_fit) {
                pw_partition_free(&p);
                return INFINITY;
            }
            double v = memory_search(m, p.begin, st);
            if (*st != PW_OK || !isfinite(v)) break;
            if (v > 1.0) { /* every split has a stage over its budget */
                pw_partition_free(&p);
                return INFINITY;
            }
        }
        fill(m, &p);
        if (all_fit(&p) && isfinite(p.bottleneck)) U = p.bottleneck;
    }
    pw_partition_free(&p);
    if (*st != PW_OK) return INFINITY;
    return dp_tightened(m, DP_BOTTLENECK, U, begin, st);
}

/* Whether some split fits under a variant of the model. */
static int variant_fits(model *m, int recompute, int one_inflight, int *tmp)
{
    int saved_r = m->recompute;
    const int *saved_i = m->inflight;
    m->recompute = recompute;
    if (one_inflight) m->inflight = m->ones;
    pw_status st;
    double v = bottleneck_search(m, tmp, &st);
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
    double v = memory_search(m, p.begin, &st);
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
    double bv = bottleneck_search(m, best.begin, &st);
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
        double bv = bottleneck_search(&m, out->begin, &st);
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
