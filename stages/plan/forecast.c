/* pipewright — forecasts: partition + cost model + simulator. */
#include "stages/plan/forecast.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph/partition.h"
#include "runtime/link.h"
#include "runtime/trace.h"
#include "stages/program/program.h"

pw_forecast_config pw_forecast_defaults(void)
{
    pw_forecast_config c;
    memset(&c, 0, sizeof c);
    c.stages = 1;
    c.replicas = 1;
    c.micro_batches = 1;
    c.micro_batch_size = 1;
    c.schedule = PW_SCHEDULE_1F1B;
    c.flops_per_s = 50e9;
    c.link_latency_s = 5e-6;
    c.link_bandwidth = 10e9;
    c.allreduce_bandwidth = 10e9;
    c.optim_state_floats = 1;
    c.allreduce_algo = PW_ALLREDUCE_RING;
    c.gpus = PW_PLACE_GPUS_AUTO;
    c.host_latency_s = -1;
    c.host_bandwidth = -1;
    return c;
}

/* ------------------------------------------------- placement and links */

/* One all-reduce of chunk [b, e)'s parameters across the replicas over a
 * link of latency `lat` and bandwidth `bw` (0: unlimited), with the
 * configured algorithm and compression (pw_compress_model). */
static double replica_sum_s(const pw_forecast_config *c, int b, int e, double lat, double bw)
{
    const pw_graph *g = c->graph;
    int n = 0;
    for (int i = b; i < e; i++) n += g->nodes[i].n_params;
    int64_t *numel = malloc((size_t)(n > 0 ? n : 1) * 2 * sizeof *numel);
    int64_t *rows = numel ? numel + (n > 0 ? n : 1) : NULL;
    double bytes = 0.0;
    n = 0;
    for (int i = b; i < e; i++) {
        const pw_node *nd = &g->nodes[i];
        for (int k = 0; k < nd->n_params; k++) {
            const pw_param *pp = &g->params[nd->params[k]];
            if (pp->owner != i) continue; /* a tied use: summed with its owner */
            bytes += 4.0 * (double)pw_shape_numel(&pp->shape);
            if (!numel) continue;
            numel[n] = pw_shape_numel(&pp->shape);
            rows[n++] = pp->shape.ndim >= 2 ? pp->shape.d[0] : 0;
        }
    }
    double t;
    const pw_link l = {.latency_s = lat, .bandwidth = bw};
    const int hosts = c->hosts > 0 ? c->hosts : c->replicas;
    if (c->ps_servers > 0) {
        const double inv_b = bw > 0 ? 1.0 / bw : 0.0;
        /* The push (compressed with --compress: its payload's bytes), then the fp32 pull. */
        const double push = numel && c->compress.kind != PW_COMPRESS_NONE
                                ? (double)pw_compress_model(&c->compress, numel, rows, n, c->replicas, hosts, &l,
                                                            PW_ALLREDUCE_TREE).wire_bytes
                                : bytes;
        t = push * inv_b + (double)c->replicas * bytes / c->ps_servers * inv_b + 2.0 * lat;
        if (c->compress.kind == PW_COMPRESS_POWERSGD) {
            /* Two round trips: the server sends every replica the summed P
             * and the summed Q of each matrix it compresses. */
            double factors = 0.0;
            for (int k = 0; numel && k < n; k++) {
                const int q = pw_compress_powersgd_rank(&c->compress, numel[k], rows[k]);
                if (q) factors += 4.0 * (double)q * (double)(rows[k] + numel[k] / rows[k]);
            }
            t += (double)c->replicas * factors / c->ps_servers * inv_b + 2.0 * lat;
        }
    } else if (!numel) { /* out of memory: the plain ring of the same bytes */
        t = pw_sim_ring_allreduce((int64_t)bytes, c->replicas, lat, bw);
    } else if (c->allreduce_algo != PW_ALLREDUCE_AUTO) {
        t = pw_compress_model(&c->compress, numel, rows, n, c->replicas, hosts, &l, c->allreduce_algo).link_s;
    } else { /* auto: the faster of its candidates that give the tree's bytes */
        t = pw_compress_model(&c->compress, numel, rows, n, c->replicas, hosts, &l, PW_ALLREDUCE_TREE).link_s;
        const double h = pw_compress_model(&c->compress, numel, rows, n, c->replicas, hosts, &l, PW_ALLREDUCE_HIER).link_s;
        if (h > 0 && h < t) t = h;
    }
    free(numel);
    return t;
}

static const char *const link_names[PW_LINK_N] = {
    "same core/GPU", "same NUMA node", "same package", "across packages", "across hosts",
};

const char *pw_link_class_name(pw_link_class c)
{
    return (unsigned)c < PW_LINK_N ? link_names[c] : "?";
}

/* Default figures {latency s, bandwidth bytes/s (0 = infinite)}, documented
 * in docs/schedules.md. CPU ranks are threads of one process: a hand-off is a
 * pointer, and the consumer pulls the activation through the caches
 * (same NUMA node), the package's interconnect, or the socket link. GPU ranks:
 * peers under one package copy over its PCIe switch or NVLink, across
 * packages through the CPUs. Hosts: a 100 Gb/s network. */
static const double link_cpu[PW_LINK_N][2] = {
    {0.5e-6, 0}, {1e-6, 40e9}, {1.5e-6, 25e9}, {2e-6, 15e9}, {10e-6, 12.5e9},
};
static const double link_gpu[PW_LINK_N][2] = {
    {5e-6, 0}, {8e-6, 50e9}, {8e-6, 50e9}, {10e-6, 20e9}, {15e-6, 12.5e9},
};

void pw_link_default(pw_link_class c, int on_gpus, double *latency, double *bandwidth)
{
    if ((unsigned)c >= PW_LINK_N) c = PW_LINK_HOSTS;
    const double *f = on_gpus ? link_gpu[c] : link_cpu[c];
    if (latency) *latency = f[0];
    if (bandwidth) *bandwidth = f[1];
}

/* The forecast's ranks (rank = replica * S + stage) on the topology, which is
 * repeated when it has too few slots (forecast.h, "Hosts"). With T
 * tensor-parallel ranks per stage each rank takes T consecutive slots:
 * slot (replica * S + stage) * T + t, placed as a pipeline of S x T stages,
 * so a tensor-parallel group shares a host whenever the host's slots are a
 * multiple of T. */
typedef struct fplace {
    int S, R, T;
    pw_placement *pl;     /* one copy's placement */
    int copies;
    int *host;            /* [S*R*T] host index, 0 .. n_hosts-1 */
    int *local;           /* [S*R*T] index into pl->ranks */
    int n_hosts;
    double lat[PW_LINK_N], bw[PW_LINK_N];
} fplace;

static void fplace_free(fplace *fp)
{
    pw_placement_destroy(fp->pl);
    free(fp->host);
    free(fp->local);
    memset(fp, 0, sizeof *fp);
}

/* The outermost Group above packages that holds the first PU of `set`: one
 * host of a cluster topology; NULL when the topology has no such level. */
static hwloc_obj_t host_obj(hwloc_topology_t t, hwloc_const_cpuset_t set)
{
    if (!set || hwloc_bitmap_iszero(set)) return NULL;
    hwloc_obj_t host = NULL;
    for (hwloc_obj_t o = hwloc_get_pu_obj_by_os_index(t, (unsigned)hwloc_bitmap_first(set)); o;
         o = o->parent)
        if (o->type == HWLOC_OBJ_GROUP &&
            hwloc_get_next_obj_inside_cpuset_by_type(t, o->cpuset, HWLOC_OBJ_PACKAGE, NULL))
            host = o;
    return host;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static pw_status fplace_make(const pw_forecast_config *c, fplace *fp)
{
    memset(fp, 0, sizeof *fp);
    const int T = c->tensor > 1 ? c->tensor : 1, S = c->stages * T, R = c->replicas;
    const int64_t N = (int64_t)S * R;
    pw_status st;
    pw_place_config probe = {.n_stages = 1, .n_replicas = 1, .gpus = c->gpus};
    pw_placement *one = NULL;
    PW_CHECK(pw_place_stages(c->topology, &probe, &one));
    const int on_gpus = one->on_gpus, slots = on_gpus ? one->n_gpus : one->n_cores;
    pw_placement_destroy(one);
    if (slots < 1) return pw_error(PW_ERR_UNSUPPORTED, "forecast: the topology has no cores to place on");
    if (N > (int64_t)1 << 26)
        return pw_error(PW_ERR_INVALID_ARG, "forecast: %lld ranks are too many to place", (long long)N);
    fp->S = c->stages;
    fp->R = R;
    fp->T = T;
    fp->host = malloc((size_t)N * sizeof *fp->host);
    fp->local = malloc((size_t)N * sizeof *fp->local);
    int *copy = malloc((size_t)N * sizeof *copy);
    hwloc_obj_t *seen = NULL;
    int *host_in_copy = NULL;
    if (!fp->host || !fp->local || !copy) goto nomem;
    /* Which copy of the topology each rank lands on, and its index in that
     * copy's placement: whole pipelines per copy when one fits, else one
     * pipeline over consecutive copies. */
    pw_place_config pc = {.n_stages = S, .n_replicas = R, .gpus = c->gpus};
    int per = 1;
    if (N <= slots) {
        fp->copies = 1;
    } else if (S <= slots) {
        per = slots / S; /* pipelines per copy */
        fp->copies = (R + per - 1) / per;
        pc.n_replicas = per;
    } else {
        per = (S + slots - 1) / slots; /* copies per pipeline */
        fp->copies = R * per;
        pc.n_stages = slots;
        pc.n_replicas = 1;
    }
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) {
            int64_t k = (int64_t)r * S + s;
            if (N <= slots) copy[k] = 0, fp->local[k] = (int)k;
            else if (S <= slots) copy[k] = r / per, fp->local[k] = (r % per) * S + s;
            else copy[k] = r * per + s / slots, fp->local[k] = s % slots;
        }
    PW_CHECK_GOTO(pw_place_stages(c->topology, &pc, &fp->pl), st, fail);
    /* Hosts inside one copy: the Group objects above packages, in the order
     * the placement meets them. */
    const int L = fp->pl->n_ranks;
    seen = calloc((size_t)L + 1, sizeof *seen);
    host_in_copy = calloc((size_t)L + 1, sizeof *host_in_copy);
    if (!seen || !host_in_copy) goto nomem;
    int n_seen = 0;
    for (int l = 0; l < L; l++) {
        const pw_rank_place *rk = &fp->pl->ranks[l];
        hwloc_const_cpuset_t set = rk->gpu >= 0 ? fp->pl->gpus[rk->gpu].cpuset : rk->cpuset;
        hwloc_obj_t h = host_obj(c->topology, set);
        int i = 0;
        while (i < n_seen && seen[i] != h) i++;
        if (i == n_seen) seen[n_seen++] = h;
        host_in_copy[l] = i;
    }
    for (int64_t k = 0; k < N; k++) fp->host[k] = copy[k] * n_seen + host_in_copy[fp->local[k]];
    /* Count the hosts used (copy is reused as scratch). */
    memcpy(copy, fp->host, (size_t)N * sizeof *copy);
    qsort(copy, (size_t)N, sizeof *copy, cmp_int);
    fp->n_hosts = 1;
    for (int64_t k = 1; k < N; k++) fp->n_hosts += copy[k] != copy[k - 1];
    for (int cl = 0; cl < PW_LINK_N; cl++) pw_link_default((pw_link_class)cl, fp->pl->on_gpus, &fp->lat[cl], &fp->bw[cl]);
    if (c->host_latency_s >= 0) fp->lat[PW_LINK_HOSTS] = c->host_latency_s;
    if (c->host_bandwidth >= 0) fp->bw[PW_LINK_HOSTS] = c->host_bandwidth;
    free(copy);
    free(seen);
    free(host_in_copy);
    return PW_OK;
nomem:
    st = pw_error(PW_ERR_NOMEM, "forecast: out of memory (placement)");
fail:
    free(copy);
    free(seen);
    free(host_in_copy);
    fplace_free(fp);
    return st;
}

/* Slot of tensor rank t of stage s of replica r. */
static int64_t slot_of(const fplace *fp, int r, int s, int t)
{
    return ((int64_t)r * fp->S + s) * fp->T + t;
}

/* The class of the link between slots a and b. */
static pw_link_class classify(const fplace *fp, int64_t a, int64_t b)
{
    if (fp->host[a] != fp->host[b]) return PW_LINK_HOSTS;
    const pw_placement *pl = fp->pl;
    const pw_rank_place *x = &pl->ranks[fp->local[a]], *y = &pl->ranks[fp->local[b]];
    if (pl->on_gpus) {
        if (x->gpu == y->gpu) return PW_LINK_SAME_DEVICE;
        return pl->gpus[x->gpu].package == pl->gpus[y->gpu].package ? PW_LINK_PACKAGE : PW_LINK_PACKAGES;
    }
    if (x->first_core == y->first_core) return PW_LINK_SAME_DEVICE;
    if (x->package != y->package) return PW_LINK_PACKAGES; /* even under one NUMA node */
    return x->numa >= 0 && x->numa == y->numa ? PW_LINK_NUMA : PW_LINK_PACKAGE;
}

/* The slowest class of the link stage a -> stage b over the replicas (and
 * tensor ranks: rank t of one stage sends to rank t of the next). */
static pw_link_class stage_link(const fplace *fp, int a, int b)
{
    pw_link_class worst = PW_LINK_SAME_DEVICE;
    for (int r = 0; r < fp->R; r++)
        for (int t = 0; t < fp->T; t++) {
            pw_link_class cl = classify(fp, slot_of(fp, r, a, t), slot_of(fp, r, b, t));
            if (cl > worst) worst = cl;
        }
    return worst;
}

/* The simulator's per-link hook (pw_sim_config.link_params). */
static void link_params(void *ctx, int src, int dst, double *latency, double *bandwidth)
{
    const fplace *fp = ctx;
    pw_link_class cl = stage_link(fp, src, dst);
    *latency = fp->lat[cl];
    *bandwidth = fp->bw[cl];
}

/* Stage s's ring over its replicas (one per tensor rank): the class of its
 * slowest hop. */
static pw_link_class ring_link(const fplace *fp, int s)
{
    pw_link_class worst = PW_LINK_SAME_DEVICE;
    for (int r = 0; r < fp->R; r++)
        for (int t = 0; t < fp->T; t++) {
            pw_link_class cl = classify(fp, slot_of(fp, r, s, t), slot_of(fp, (r + 1) % fp->R, s, t));
            if (cl > worst) worst = cl;
        }
    return worst;
}

/* Stage s's tensor-parallel group (its T ranks, a ring): the class of its
 * slowest hop over the replicas. */
static pw_link_class tp_link(const fplace *fp, int s)
{
    pw_link_class worst = PW_LINK_SAME_DEVICE;
    for (int r = 0; r < fp->R; r++)
        for (int t = 0; t < fp->T; t++) {
            pw_link_class cl = classify(fp, slot_of(fp, r, s, t), slot_of(fp, r, s, (t + 1) % fp->T));
            if (cl > worst) worst = cl;
        }
    return worst;
}

static void describe_placement(const pw_forecast_config *c, const fplace *fp, char *buf, size_t n)
{
    const pw_placement *pl = fp->pl;
    const int slots = pl->on_gpus ? pl->n_gpus : pl->n_cores;
    const char *unit = pl->on_gpus ? "GPU" : pl->cores_are_pus ? "PU" : "core";
    int len = snprintf(buf, n, "%lld ranks (%d stage%s x %d replica%s", (long long)c->stages * c->replicas * fp->T,
                       c->stages, c->stages > 1 ? "s" : "", c->replicas, c->replicas > 1 ? "s" : "");
    if (len > 0 && (size_t)len < n && fp->T > 1) len += snprintf(buf + len, n - (size_t)len, " x T %d", fp->T);
    if (len > 0 && (size_t)len < n)
        len += snprintf(buf + len, n - (size_t)len, ") on %d host%s", fp->n_hosts, fp->n_hosts > 1 ? "s" : "");
    if (len < 0 || (size_t)len >= n) return;
    if (fp->copies > 1)
        snprintf(buf + len, n - (size_t)len, ": the topology (%d %s%s) taken %d times", slots, unit,
                 slots > 1 ? "s" : "", fp->copies);
    else if (pl->shared)
        snprintf(buf + len, n - (size_t)len, ": %.*s", (int)(n - (size_t)len - 3), pl->note);
    else
        snprintf(buf + len, n - (size_t)len, ", %s", pl->on_gpus ? "one GPU each" : "each on its own cores");
}

static int chunks_per_rank(const pw_forecast_config *c)
{
    if (c->schedule == PW_SCHEDULE_ZB_V || c->schedule == PW_SCHEDULE_DUALPIPE_V) return 2;
    if (c->schedule == PW_SCHEDULE_INTERLEAVED) return c->chunks_per_rank > 0 ? c->chunks_per_rank : 2;
    return 1;
}

/* The last node that reads each value (-1: none): value v produced before
 * node `end` is still needed at or after it when last[v] >= end. NULL when
 * out of memory. */
static int *last_uses(const pw_graph *g)
{
    int *last = malloc(sizeof(int) * (size_t)(g->n_values > 0 ? g->n_values : 1));
    if (!last) return NULL;
    for (int v = 0; v < g->n_values; v++) last[v] = -1;
    for (int i = 0; i < g->n_nodes; i++)
        for (int k = 0; k < g->nodes[i].n_inputs; k++) {
            const int v = g->nodes[i].inputs[k];
            if (v >= 0 && v < g->n_values && i > last[v]) last[v] = i;
        }
    return last;
}

/* The tensor-parallel all-reduces node i of a rank graph takes part in, per
 * sample: *fwd and *bwd bytes summed, *nf and *nb counted. A tp=row linear
 * and a tp=vocab embedding sum their output forward; a tp=column linear
 * sums its input's gradient backward (the Megatron pair's two); the
 * softmax cross-entropy over split logits gathers five floats per row
 * forward (costed as an all-reduce of that many bytes per rank). */
static void tp_collectives(const pw_graph *g, int i, double *fwd, double *bwd, int *nf, int *nb)
{
    const pw_node *nd = &g->nodes[i];
    const pw_value *o = &g->values[nd->output];
    const double out_bytes = (double)pw_dtype_size(o->dtype) * (double)pw_shape_numel(&o->shape);
    if ((nd->op == PW_OP_LINEAR && nd->attrs.tp == PW_TP_ROW) ||
        (nd->op == PW_OP_EMBEDDING && nd->attrs.tp == PW_TP_VOCAB)) {
        *fwd += out_bytes;
        (*nf)++;
    } else if (nd->op == PW_OP_LINEAR && nd->attrs.tp == PW_TP_COLUMN && nd->n_inputs > 0) {
        const pw_value *in = &g->values[nd->inputs[0]];
        *bwd += (double)pw_dtype_size(in->dtype) * (double)pw_shape_numel(&in->shape);
        (*nb)++;
    } else if (nd->op == PW_OP_SOFTMAX_XENT && nd->n_inputs > 0 && g->values[nd->inputs[0]].tp_full > 0) {
        const pw_value *lg = &g->values[nd->inputs[0]];
        const int64_t last = lg->shape.ndim > 0 ? lg->shape.d[lg->shape.ndim - 1] : 1;
        *fwd += 5.0 * 4.0 * (double)(pw_shape_numel(&lg->shape) / (last > 0 ? last : 1)) * g->tp_size;
        (*nf)++;
    }
}

pw_status pw_forecast_run(const pw_forecast_config *c, pw_forecast *out)
{
    memset(out, 0, sizeof *out);
    if (!c->graph || c->stages < 1 || c->replicas < 1 || c->micro_batches < 1 ||
        c->micro_batch_size < 1 || !(c->flops_per_s > 0))
        return pw_error(PW_ERR_INVALID_ARG, "forecast: graph, stages, replicas, micro-batches, "
                        "micro-batch size and compute rate must all be positive");
    const int T = c->tensor > 1 ? c->tensor : 1;
    if (T > 1 && c->graph->tp_size != T)
        return pw_error(PW_ERR_INVALID_ARG, "forecast: tensor parallelism %d needs one rank's graph of %d "
                        "(pw_graph_tp_rank), not graph '%s'", T, T, c->graph->name);
    const pw_graph *g = c->graph;
    const int v = chunks_per_rank(c), S = c->stages, C = S * v;
    const double mbs = (double)c->micro_batch_size;
    pw_status st;
    pw_partition part = {0};
    pw_schedule *s = NULL;
    pw_schedule_report *rep = NULL;
    pw_sim_result *res = NULL;
    pw_sim_chunk_cost *cost = NULL;
    int64_t *fixed = NULL; /* per rank: params + grads + optimizer state */
    double *ar = NULL;     /* per rank: all-reduce seconds per step */
    double *tp_rank = NULL; /* per rank: tensor-parallel all-reduce seconds per micro-batch */
    fplace fp = {0};

    int *last = NULL;
    if (c->topology) PW_CHECK_GOTO(fplace_make(c, &fp), st, out);
    if (c->cuts) {
        part.begin = malloc(sizeof(int) * ((size_t)C + 1));
        if (!part.begin) {
            st = pw_error(PW_ERR_NOMEM, "forecast: out of memory");
            goto out;
        }
        memcpy(part.begin, c->cuts, sizeof(int) * ((size_t)C + 1));
    } else {
        PW_CHECK_GOTO(pw_partition_make(g, C, PW_PARTITION_FLOPS, &part), st, out);
    }
    pw_schedule_config sc = {.kind = c->schedule, .n_stages = S, .n_micro = c->micro_batches,
                             .split_w = c->split_w, .chunks_per_rank = v,
                             .n_buckets = c->replicas > 1 ? 1 : 0, .memory_limit = c->memory_limit};
    PW_CHECK_GOTO(pw_schedule_generate(&sc, &s), st, out);
    PW_CHECK_GOTO(pw_schedule_lower(s), st, out);
    PW_CHECK_GOTO(pw_schedule_validate(s, &rep), st, out);

    cost = calloc((size_t)C, sizeof *cost);
    fixed = calloc((size_t)S, sizeof *fixed);
    ar = calloc((size_t)S, sizeof *ar);
    tp_rank = calloc((size_t)S, sizeof *tp_rank);
    out->peak_memory = calloc((size_t)S, sizeof(int64_t));
    out->peak_inflight = calloc((size_t)S, sizeof(int));
    out->cuts = calloc((size_t)C + 1, sizeof(int));
    out->chunk_rank = calloc((size_t)C, sizeof(int));
    out->chunk_inflight = calloc((size_t)C, sizeof(int));
    last = last_uses(g);
    if (!cost || !fixed || !ar || !tp_rank || !out->peak_memory || !out->peak_inflight || !out->cuts ||
        !out->chunk_rank || !out->chunk_inflight || !last) {
        st = pw_error(PW_ERR_NOMEM, "forecast: out of memory");
        goto out;
    }
    const double in_bytes = g->input >= 0
        ? (double)pw_dtype_size(g->values[g->input].dtype) * (double)pw_shape_numel(&g->values[g->input].shape)
        : 0.0;
    for (int ch = 0; ch < C; ch++) {
        int b = part.begin[ch], e = part.begin[ch + 1];
        double f = 0, bi = 0, bw = 0;
        int64_t params = 0, act = 0;
        for (int i = b; i < e; i++) {
            pw_op_cost oc;
            if (pw_graph_node_cost(g, i, &oc) != PW_OK) continue;
            f += oc.flops_fwd;
            bi += oc.flops_bwd_input;
            bw += oc.flops_bwd_weight;
            params += oc.param_bytes;
            act += oc.act_bytes;
        }
        int64_t msg = 0;
        for (int val = 0; val < g->n_values; val++) {
            int prod = g->values[val].producer;
            if (prod >= 0 && prod < e && last[val] >= e)
                msg += (int64_t)pw_dtype_size(g->values[val].dtype) *
                       pw_shape_numel(&g->values[val].shape);
        }
        cost[ch].f = f * mbs / c->flops_per_s;
        cost[ch].b = (bi + (c->recompute ? f : 0.0)) * mbs / c->flops_per_s;
        const int rank0 = pw_schedule_rank_of(s, ch);
        if (T > 1 && !c->tp_in_rate) {
            /* The tensor-parallel all-reduces: a ring over the stage's T
             * ranks per collective, inside F and B (B repeats F's with
             * recomputation). */
            double lat = c->link_latency_s, bw = c->link_bandwidth;
            if (fp.pl) {
                pw_link_class cl = tp_link(&fp, rank0);
                lat = fp.lat[cl];
                bw = fp.bw[cl];
                if ((int)cl > out->tp_cls) out->tp_cls = (int)cl;
            }
            double tf = 0, tb = 0;
            for (int i = b; i < e; i++) {
                double fb = 0, bb = 0;
                int nf = 0, nb = 0;
                tp_collectives(g, i, &fb, &bb, &nf, &nb);
                if (nf) tf += nf * pw_sim_ring_allreduce((int64_t)(fb / nf * mbs), T, lat, bw);
                if (nb) tb += nb * pw_sim_ring_allreduce((int64_t)(bb / nb * mbs), T, lat, bw);
            }
            cost[ch].f += tf;
            cost[ch].b += tb + (c->recompute ? tf : 0.0);
            tp_rank[rank0] += tf + tb + (c->recompute ? tf : 0.0);
        }
        cost[ch].w = bw * mbs / c->flops_per_s;
        /* The optimizer: about 4 FLOPs per parameter element (4 bytes each). */
        cost[ch].optim = 4.0 * ((double)params / 4.0) / c->flops_per_s;
        if (c->grad_groups > 1 && c->group_pass_bandwidth > 0) /* counted with the update */
            cost[ch].optim += (c->grad_groups - 1) * (double)params / c->group_pass_bandwidth;
        const int rank = rank0;
        cost[ch].allreduce = 0.0;
        if (c->replicas > 1 && fp.pl) {
            /* A ring over this stage's replicas, at its slowest hop. */
            pw_link_class cl = ring_link(&fp, rank);
            cost[ch].allreduce = replica_sum_s(c, b, e, fp.lat[cl], fp.bw[cl]);
            if (cost[ch].allreduce > 0 && (int)cl > out->allreduce_cls) out->allreduce_cls = (int)cl;
        } else if (c->replicas > 1) {
            cost[ch].allreduce = replica_sum_s(c, b, e,
                                               c->allreduce_latency_s > 0 ? c->allreduce_latency_s
                                                                          : c->link_latency_s,
                                               c->allreduce_bandwidth);
        }
        ar[rank] += cost[ch].allreduce * sc.n_buckets;
        cost[ch].msg_bytes = ch + 1 < C ? (int64_t)(msg * mbs) : 0;
        cost[ch].act_bytes = (int64_t)((double)act * mbs);
        if (c->recompute) /* only the chunk's input stays stashed */
            cost[ch].act_bytes = ch > 0 ? cost[ch - 1].msg_bytes : (int64_t)(in_bytes * mbs);
        fixed[rank] += params * (2 + c->optim_state_floats);
        out->cuts[ch] = b;
        out->chunk_rank[ch] = rank;
        out->chunk_inflight[ch] = rep->peak_inflight_chunk[ch] > 0 ? rep->peak_inflight_chunk[ch] : 1;
    }
    out->cuts[C] = g->n_nodes;
    out->n_chunks = C;
    pw_sim_config sim = {.chunks = cost, .link_latency = c->link_latency_s,
                         .link_bandwidth = c->link_bandwidth, .trace = c->trace};
    if (fp.pl) {
        sim.link_params = link_params;
        sim.link_ctx = &fp;
        /* The pipeline's links, chunk k -> k + 1 across ranks. */
        out->links = calloc((size_t)C, sizeof *out->links);
        if (!out->links) {
            st = pw_error(PW_ERR_NOMEM, "forecast: out of memory");
            goto out;
        }
        for (int ch = 0; ch + 1 < C; ch++) {
            int a = pw_schedule_rank_of(s, ch), b = pw_schedule_rank_of(s, ch + 1);
            if (a == b) continue;
            pw_forecast_link *l = &out->links[out->n_links++];
            l->src = a;
            l->dst = b;
            l->cls = stage_link(&fp, a, b);
            l->latency = fp.lat[l->cls];
            l->bandwidth = fp.bw[l->cls];
            l->bytes = cost[ch].msg_bytes;
            l->time = l->latency + (l->bandwidth > 0 ? (double)l->bytes / l->bandwidth : 0.0);
        }
        out->n_hosts = fp.n_hosts;
        out->on_gpus = fp.pl->on_gpus;
        out->topology_copies = fp.copies;
        describe_placement(c, &fp, out->placement, sizeof out->placement);
    }
    PW_CHECK_GOTO(pw_simulate(s, &sim, &res), st, out);
    out->schedule = c->schedule;
    out->chunks_per_rank = v;
    out->n_ranks = S;
    out->step_time = res->step_time;
    out->bubble = res->bubble;
    out->steady_bubble = res->steady_bubble;
    out->samples_per_s = res->step_time > 0
        ? (double)c->replicas * c->micro_batches * mbs / res->step_time : 0.0;
    out->fits = 1;
    for (int r = 0; r < S; r++) {
        if (ar[r] > out->allreduce_time) out->allreduce_time = ar[r], out->allreduce_stage = r;
        if (tp_rank[r] > out->tp_time) out->tp_time = tp_rank[r];
        out->peak_memory[r] = fixed[r] + res->ranks[r].peak_act_bytes;
        out->peak_inflight[r] = rep->peak_inflight[r];
        if (c->memory_budget > 0 && out->peak_memory[r] > c->memory_budget) out->fits = 0;
    }
out:
    if (st != PW_OK) pw_forecast_free(out);
    pw_sim_result_destroy(res);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    pw_partition_free(&part);
    free(last);
    free(cost);
    free(fixed);
    free(ar);
    free(tp_rank);
    fplace_free(&fp);
    return st;
}

void pw_forecast_free(pw_forecast *f)
{
    if (!f) return;
    free(f->peak_memory);
    free(f->peak_inflight);
    free(f->links);
    free(f->cuts);
    free(f->chunk_rank);
    free(f->chunk_inflight);
    f->cuts = f->chunk_rank = f->chunk_inflight = NULL;
    f->n_chunks = 0;
    f->peak_memory = NULL;
    f->peak_inflight = NULL;
    f->links = NULL;
    f->n_links = 0;
}

static int64_t max_mem(const pw_forecast *f)
{
    int64_t m = 0;
    for (int r = 0; r < f->n_ranks; r++)
        if (f->peak_memory[r] > m) m = f->peak_memory[r];
    return m;
}

pw_status pw_forecast_auto(const pw_forecast_config *cfg, pw_forecast *best, FILE *report)
{
    static const struct { pw_schedule_kind kind; int v; } cand[] = {
        {PW_SCHEDULE_GPIPE, 1},       {PW_SCHEDULE_1F1B, 1},        {PW_SCHEDULE_INTERLEAVED, 2},
        {PW_SCHEDULE_INTERLEAVED, 4}, {PW_SCHEDULE_ZB_H1, 1},       {PW_SCHEDULE_ZB_H2, 1},
        {PW_SCHEDULE_ZB_V, 2},        {PW_SCHEDULE_DUALPIPE_V, 2},
    };
    memset(best, 0, sizeof *best);
    int have = 0;
    int64_t least_need = 0;
    const char *least_name = NULL;
    for (size_t i = 0; i < sizeof cand / sizeof cand[0]; i++) {
        pw_forecast_config c = *cfg;
        c.schedule = cand[i].kind;
        c.chunks_per_rank = cand[i].v;
        c.trace = NULL;
        pw_forecast f;
        if (pw_forecast_run(&c, &f) != PW_OK) {
            if (report)
                fprintf(report, "  %-12s v=%d  not applicable: %s\n",
                        pw_schedule_kind_name(c.schedule), cand[i].v, pw_last_error());
            continue;
        }
        int64_t need = max_mem(&f);
        if (report)
            fprintf(report, "  %-12s v=%d  step %9.3f ms  bubble %5.1f%%  peak memory %8.1f MiB%s\n",
                    pw_schedule_kind_name(c.schedule), cand[i].v, f.step_time * 1e3,
                    100.0 * f.bubble, (double)need / (1 << 20),
                    f.fits ? "" : "  (over budget)");
        if (!least_name || need < least_need) {
            least_need = need;
            least_name = pw_schedule_kind_name(c.schedule);
        }
        if (f.fits && (!have || f.step_time < best->step_time)) {
            pw_forecast_free(best);
            *best = f;
            have = 1;
        } else {
            pw_forecast_free(&f);
        }
    }
    if (!have) {
        if (!least_name)
            return pw_error(PW_ERR_INVALID_ARG, "no schedule applies to %d stages and %d "
                            "micro-batches", cfg->stages, cfg->micro_batches);
        return pw_error(PW_ERR_NOMEM, "no schedule fits the memory budget of %.1f MiB per rank; "
                        "the smallest need is %.1f MiB (%s): use more stages, fewer "
                        "micro-batches in flight, or recomputation",
                        (double)cfg->memory_budget / (1 << 20), (double)least_need / (1 << 20),
                        least_name);
    }
    if (report)
        fprintf(report, "chose %s (v=%d): the fastest simulated step (%.3f ms) that fits the "
                "memory budget\n", pw_schedule_kind_name(best->schedule), best->chunks_per_rank,
                best->step_time * 1e3);
    return PW_OK;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Three timed rounds (after one warm-up micro-batch) of min(2, M)
 * micro-batches, each forward, backward for inputs and for weights, then the
 * optimizer: round k's time per micro-batch in micro[k], its optimizer step
 * in optim[k]. */
static pw_status time_rounds(const pw_forecast_config *c, double micro[3], double optim[3])
{
    const pw_graph *g = c->graph;
    const int64_t mbs = c->micro_batch_size;
    const int timed = c->micro_batches < 2 ? c->micro_batches : 2;
    pw_program_config pc = {.graph = g, .micro_batch = mbs, .loss_batch = mbs * c->micro_batches,
                            .slots = 1,
                            .optim = pw_optim_defaults(c->optim_state_floats == 2 ? PW_OPTIM_ADAMW
                                                                                  : PW_OPTIM_SGD)};
    pw_program *p = NULL;
    PW_CHECK(pw_program_create(&pc, &p));
    pw_program_init_params(p, 1);
    /* Zeros: token 0 and class 0 are valid inputs and labels. */
    const int ids[2] = {g->input, g->label};
    for (int k = 0; k < 2; k++) {
        if (ids[k] < 0) continue;
        void *x = pw_program_value(p, ids[k], 0);
        const pw_value *v = &g->values[ids[k]];
        if (x) memset(x, 0, (size_t)(mbs * pw_shape_numel(&v->shape)) * pw_dtype_size(v->dtype));
    }
    pw_status st = PW_OK;
    for (int it = 0; it < 4 && st == PW_OK; it++) {
        int64_t t0 = pw_now_ns();
        for (int mb = 0; mb < (it ? timed : 1) && st == PW_OK; mb++) { /* it 0: warm-up */
            if (pw_program_needs_rng(p)) pw_program_set_rng(p, 0, 1, it + 1, mb * mbs);
            st = pw_program_forward(p, 0, mbs);
            if (st == PW_OK) st = pw_program_backward_input(p, 0);
            if (st == PW_OK) st = pw_program_backward_weight(p, 0);
        }
        int64_t t1 = pw_now_ns();
        if (st == PW_OK) st = pw_program_optimizer_step(p, it + 1);
        int64_t t2 = pw_now_ns();
        if (it) {
            micro[it - 1] = (double)(t1 - t0) * 1e-9 / timed;
            optim[it - 1] = (double)(t2 - t1) * 1e-9;
        }
    }
    pw_program_destroy(p);
    return st;
}

static pw_status check_calibrate(const pw_forecast_config *c)
{
    if (!c || !c->graph || c->micro_batches < 1 || c->micro_batch_size < 1)
        return pw_error(PW_ERR_INVALID_ARG, "calibrate: a graph, micro-batches and a micro-batch size "
                        "are needed");
    return PW_OK;
}

pw_status pw_forecast_calibrate(const pw_forecast_config *c, double *flops_per_s, double *step_s)
{
    if (flops_per_s) *flops_per_s = 0;
    if (step_s) *step_s = 0;
    if (!flops_per_s) return pw_error(PW_ERR_INVALID_ARG, "calibrate: flops_per_s is NULL");
    PW_CHECK(check_calibrate(c));
    const pw_graph *g = c->graph;
    double micro[3], optim[3], t[3];
    PW_CHECK(time_rounds(c, micro, optim));
    /* The step: the timed micro-batches scaled to all of them; the fastest
     * round is the one least disturbed by whatever else the machine runs. */
    for (int k = 0; k < 3; k++) t[k] = micro[k] * c->micro_batches + optim[k];
    qsort(t, 3, sizeof t[0], cmp_double);
    const double step = t[0];
    pw_op_cost oc;
    pw_graph_total_cost(g, &oc);
    /* What forecast_run counts for the same step (f + b + w per sample per
     * micro-batch, and 4 FLOPs per 4-byte parameter for the optimizer). */
    double flops = (oc.flops_fwd + oc.flops_bwd_input + oc.flops_bwd_weight) * (double)c->micro_batch_size *
                   c->micro_batches + (double)oc.param_bytes;
    if (!(step > 0) || !(flops > 0))
        return pw_error(PW_ERR_INVALID_ARG, "calibrate: graph '%s' has no work to time", g->name);
    *flops_per_s = flops / step;
    if (step_s) *step_s = step;
    return PW_OK;
}

pw_status pw_forecast_calibrate_parts(const pw_forecast_config *c, double *micro_s, double *optim_s)
{
    PW_CHECK(check_calibrate(c));
    if (!micro_s || !optim_s) return pw_error(PW_ERR_INVALID_ARG, "calibrate: an output is NULL");
    double micro[3], optim[3];
    PW_CHECK(time_rounds(c, micro, optim));
    qsort(micro, 3, sizeof micro[0], cmp_double);
    qsort(optim, 3, sizeof optim[0], cmp_double);
    if (!(micro[0] > 0))
        return pw_error(PW_ERR_INVALID_ARG, "calibrate: graph '%s' has no work to time", c->graph->name);
    *micro_s = micro[0];
    *optim_s = optim[0];
    return PW_OK;
}

pw_status pw_forecast_write_trace(const pw_forecast_config *c, const pw_forecast *f,
                                  const char *path)
{
    if (!c->trace) return pw_error(PW_ERR_INVALID_ARG, "forecast: no trace was recorded");
    char name[64];
    snprintf(name, sizeof name, "%s (simulated)", pw_schedule_kind_name(f->schedule));
    pw_schedule_config sc = {.kind = f->schedule, .n_stages = f->n_ranks,
                             .n_micro = c->micro_batches, .split_w = c->split_w,
                             .chunks_per_rank = f->chunks_per_rank};
    double theory = pw_schedule_config_bubble(&sc);
    pw_trace_meta m = {
        .schedule = name, .graph = c->graph->name, .n_ranks = f->n_ranks,
        .n_chunks = f->n_ranks * f->chunks_per_rank, .n_micro = c->micro_batches,
        .n_replicas = c->replicas, .micro_batch = c->micro_batch_size, .steps = 1,
        .theory_bubble = theory, .peak_inflight = f->peak_inflight,
    };
    return pw_trace_write(c->trace, path, &m);
}
