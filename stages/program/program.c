/* pipewright — stage program: plan buffers for a node range, run its ops.
 *
 * Memory (one arena, planned in create):
 *   params | grads | optimizer state | shared | slot 0 | slot 1 | ...
 * A slot holds what one in-flight micro-batch keeps between its forward and
 * its last backward. Without recompute that is every value the range
 * touches, its gradient and the ops' statistics. With recompute a slot keeps
 * only the stage's inputs (graph input, label, values received from the
 * previous stage), the values it sends on, and the boundary gradients; the
 * activations, interior gradients and statistics live once, in `shared`, and
 * are rebuilt there by re-running the forward of the slot being
 * differentiated. `shared` also holds kernel workspace (attention's T×T).
 *
 * Backends: every op, copy and fill goes through p->be (stages/ops/backend.h).
 * The plan is the same for every backend; the categories (params, grads,
 * optimizer state, activations = shared + slots) are one host arena for the
 * CPU (one block, bindable to a NUMA node) and one block each for a device
 * backend. at() maps a plan offset into its category's block. A device
 * program stages the data and the engine's (host) messages through
 * uploads and downloads and waits for its stream at the end of each call
 * (see program.h, "Device programs") — or, asynchronous
 * (pw_program_set_async, under the engine), leaves the call's work in
 * flight and reports its completion through the backend's notify
 * (pw_program_submitted).
 */
#include <unistd.h>

#include "stages/program/program-internal.h"

void *pw_program_value(const pw_program *p, int v, int slot)
{
    if (v < 0 || v >= p->g->n_values || !p->touched[v] || slot < 0 || slot >= p->cfg.slots)
        return NULL;
    const prog_value *pv = &p->values[v];
    if (pv->off_act == NO_OFF) return shared_at(p, pv->off_act_s);
    /* A device program's ports are host memory it copies through. */
    void *b = p->dev ? NULL : p->bind_act[sv(p, slot, v)];
    return b ? b : slot_base(p, slot) + pv->off_act;
}

float *pw_program_grad(const pw_program *p, int v, int slot)
{
    if (v < 0 || v >= p->g->n_values || !p->touched[v] || !p->requires_grad[v] || slot < 0 ||
        slot >= p->cfg.slots)
        return NULL;
    const prog_value *pv = &p->values[v];
    if (pv->off_grad == NO_OFF) return (float *)shared_at(p, pv->off_grad_s);
    float *b = p->dev ? NULL : p->bind_grad[sv(p, slot, v)];
    return b ? b : (float *)(slot_base(p, slot) + pv->off_grad);
}

/* requires_grad over the whole graph, so a stage knows which boundary
 * gradients exist whatever the partition. */
static void analyse_grad(pw_program *p)
{
    const pw_graph *g = p->g;
    for (int i = 0; i < g->n_nodes; i++) {
        const pw_node *nd = &g->nodes[i];
        int rg = nd->n_params > 0;
        for (int k = 0; k < nd->n_inputs; k++) rg |= p->requires_grad[nd->inputs[k]];
        if (nd->op == PW_OP_SOFTMAX_XENT) rg = 0; /* the loss is the seed */
        p->requires_grad[nd->output] = (unsigned char)(rg && g->values[nd->output].dtype == PW_F32);
    }
}

/* Statistics a node keeps for its backward, planned into `a` (the op
 * table's plan_stats). */
static void plan_stats(pw_program *p, int i, pw_arena *a)
{
    const prog_op *o = &pw_prog_ops[p->g->nodes[i].op];
    if (o->plan_stats) o->plan_stats(p, i, a);
}

static pw_status plan(pw_program *p)
{
    const pw_graph *g = p->g;
    const int64_t mb = p->cfg.micro_batch;
    const int rc = p->cfg.recompute;
    pw_arena *a = &p->arena;

    /* Live-in: produced by a node before the range and consumed in or after
     * it (a value that skips this stage is received and passed on).
     * Live-out: produced by a node before the range's end and consumed after
     * it. Graph inputs and labels are not messages: every stage that reads
     * them loads them from the data itself. */
    int *last_use = malloc((size_t)g->n_values * sizeof(int));
    p->inputs = calloc((size_t)g->n_values, sizeof(int));
    p->outputs = calloc((size_t)g->n_values, sizeof(int));
    p->is_in = calloc((size_t)g->n_values, 1);
    p->is_out = calloc((size_t)g->n_values, 1);
    if (!last_use || !p->inputs || !p->outputs || !p->is_in || !p->is_out) {
        free(last_use);
        return pw_error(PW_ERR_NOMEM, "program: out of memory");
    }
    for (int v = 0; v < g->n_values; v++) last_use[v] = -1;
    for (int i = 0; i < g->n_nodes; i++)
        for (int k = 0; k < g->nodes[i].n_inputs; k++) last_use[g->nodes[i].inputs[k]] = i;
    for (int i = p->begin; i < p->end; i++) {
        const pw_node *nd = &g->nodes[i];
        for (int k = 0; k < nd->n_inputs; k++) p->touched[nd->inputs[k]] = 1;
        p->touched[nd->output] = 1;
    }
    for (int v = 0; v < g->n_values; v++) {
        int prod = g->values[v].producer;
        if (prod < 0) continue;
        if (prod < p->begin && last_use[v] >= p->begin) p->is_in[v] = 1;
        if (prod < p->end && last_use[v] >= p->end) p->is_out[v] = 1;
        if (p->is_in[v]) p->inputs[p->n_inputs++] = v;
        if (p->is_out[v]) p->outputs[p->n_outputs++] = v;
        if (p->is_in[v] || p->is_out[v]) p->touched[v] = 1;
    }
    free(last_use);

    /* Parameters used by the range, each once (tied parameters share). */
    for (int i = p->begin; i < p->end; i++) {
        const pw_node *nd = &g->nodes[i];
        for (int k = 0; k < nd->n_params; k++) {
            int gp = nd->params[k];
            if (p->param_of_graph[gp] >= 0) continue;
            p->param_of_graph[gp] = p->n_params;
            p->params[p->n_params].gp = gp;
            p->params[p->n_params].numel = pw_shape_numel(&g->params[gp].shape);
            p->n_params++;
        }
    }
    int n_uses = 0;
    for (int i = p->begin; i < p->end; i++)
        for (int k = 0; k < g->nodes[i].n_params; k++) {
            prog_param *pp = &p->params[p->param_of_graph[g->nodes[i].params[k]]];
            pp->n_uses++;
            n_uses++;
        }
    p->use_off = malloc((size_t)(n_uses + 1) * sizeof *p->use_off);
    p->node_grad_off = malloc((size_t)(p->end - p->begin) * PW_MAX_OP_PARAMS * sizeof(size_t));
    if (!p->use_off || !p->node_grad_off) return pw_error(PW_ERR_NOMEM, "program: out of memory");
    int sf = pw_optim_state_floats(p->cfg.optim.kind);
    size_t before = a->size;
    p->cat_start[PW_MEM_PARAMS] = before;
    for (int i = 0; i < p->n_params; i++)
        p->params[i].off_data = pw_arena_plan(a, (size_t)p->params[i].numel * 4);
    p->mem.params = a->size - before;
    /* Gradients, then the extra per-use buffers of tied parameters, in one
     * region (pw_program_zero_grads clears it at once). */
    before = a->size;
    p->cat_start[PW_MEM_GRADS] = before;
    for (int i = 0; i < p->n_params; i++)
        p->params[i].off_grad = pw_arena_plan(a, (size_t)p->params[i].numel * 4);
    for (int i = 0, at = 0; i < p->n_params; i++) {
        prog_param *pp = &p->params[i];
        pp->use_first = at;
        p->use_off[at++] = pp->off_grad;
        for (int u = 1; u < pp->n_uses; u++)
            p->use_off[at++] = pw_arena_plan(a, (size_t)pp->numel * 4);
    }
    for (int i = 0; i < p->n_params; i++) p->params[i].n_uses = 0; /* recounted below */
    for (int i = p->end - 1; i >= p->begin; i--)
        for (int k = 0; k < g->nodes[i].n_params; k++) {
            prog_param *pp = &p->params[p->param_of_graph[g->nodes[i].params[k]]];
            p->node_grad_off[(size_t)(i - p->begin) * PW_MAX_OP_PARAMS + (size_t)k] =
                p->use_off[pp->use_first + pp->n_uses++];
        }
    p->mem.grads = a->size - before;
    p->off_sums = pw_arena_plan(a, (size_t)p->n_sum_bufs * p->mem.grads);
    p->mem.grad_sums = (size_t)p->n_sum_bufs * p->mem.grads;
    const size_t grads_category = a->size - before;
    before = a->size;
    p->cat_start[PW_MEM_OPTIM] = before;
    for (int i = 0; i < p->n_params; i++)
        p->params[i].off_state = pw_arena_plan(a, (size_t)p->params[i].numel * 4 * (size_t)sf);
    p->mem.optim_state = a->size - before;
    if (p->cfg.post_validate) {
        p->off_backup = pw_arena_plan(a, p->mem.params + p->mem.optim_state);
        p->mem.backup = p->mem.params + p->mem.optim_state;
    }

    /* One slot's layout (offsets relative to the slot's base, the same for
     * every slot) and the shared region's. */
    pw_arena slot, shared;
    pw_arena_init(&slot, "slot");
    pw_arena_init(&shared, "shared");
    for (int v = 0; v < g->n_values; v++) {
        prog_value *pv = &p->values[v];
        pv->off_act = pv->off_act_s = pv->off_grad = pv->off_grad_s = NO_OFF;
        if (!p->touched[v]) continue;
        const size_t bytes = value_bytes(&g->values[v], mb);
        /* Under recompute a slot keeps the stage's inputs and what it sends
         * on (sent values are also rebuilt in the shared region, since the
         * message may be gone by the backward). */
        const int kept = g->values[v].producer < 0 || p->is_in[v];
        const int sent = p->is_out[v] && !p->is_in[v];
        if (!rc || kept || sent) pv->off_act = pw_arena_plan(&slot, bytes);
        if (rc && !kept) pv->off_act_s = pw_arena_plan(&shared, bytes);
        if (!p->requires_grad[v]) continue;
        if (!rc || p->is_in[v] || p->is_out[v]) pv->off_grad = pw_arena_plan(&slot, bytes);
        if (rc) pv->off_grad_s = pw_arena_plan(&shared, bytes);
    }
    p->loss_node = -1;
    int64_t work = 0;
    for (int i = p->begin; i < p->end; i++) {
        const pw_node *nd = &g->nodes[i];
        p->nodes[i].off_stat0 = p->nodes[i].off_stat1 = p->nodes[i].off_stat2 = NO_OFF;
        plan_stats(p, i, rc ? &shared : &slot);
        if (nd->op == PW_OP_SOFTMAX_XENT) p->loss_node = i;
        if (nd->op == PW_OP_CAUSAL_ATTENTION) {
            int64_t T = g->values[nd->inputs[0]].shape.d[0];
            int64_t w = p->be->attention_scratch(T, nd->attrs.heads); /* H·T·T */
            if (w > work) work = w;
        }
    }
    p->off_work = pw_arena_plan(&shared, (size_t)work * 4);
    p->slot_bytes = slot.size;

    /* Message layouts: values in id order, each 64-byte aligned, so both
     * sides of a link compute the same offsets from the same graph. */
    for (int port = 0; port < PW_PORT_COUNT; port++) {
        p->port_off[port] = malloc((size_t)g->n_values * sizeof(size_t));
        if (!p->port_off[port]) return pw_error(PW_ERR_NOMEM, "program: out of memory");
        pw_arena msg;
        pw_arena_init(&msg, "message");
        for (int v = 0; v < g->n_values; v++) {
            p->port_off[port][v] = NO_OFF;
            int in_port = (port == PW_PORT_ACT_IN || port == PW_PORT_GRAD_IN) ? p->is_in[v] : p->is_out[v];
            int grad_port = port == PW_PORT_GRAD_IN || port == PW_PORT_GRAD_OUT;
            if (!in_port || (grad_port && !p->requires_grad[v])) continue;
            p->port_off[port][v] = pw_arena_plan(&msg, value_bytes(&g->values[v], mb));
        }
        p->port_bytes[port] = msg.size;
    }
    p->shared_base = pw_arena_plan(a, shared.size);
    p->mem.shared = shared.size;
    p->act_base = a->size;
    for (int s = 0; s < p->cfg.slots; s++) pw_arena_plan(a, p->slot_bytes);
    p->mem.activations = a->size - p->act_base;
    p->mem.total = a->size;
    p->cat_start[PW_MEM_ACTIVATIONS] = p->shared_base;
    p->cat_bytes[PW_MEM_PARAMS] = p->mem.params;
    p->cat_bytes[PW_MEM_GRADS] = grads_category;
    p->cat_bytes[PW_MEM_OPTIM] = p->mem.optim_state + p->mem.backup;
    p->cat_bytes[PW_MEM_ACTIVATIONS] = a->size - p->shared_base;
    return PW_OK;
}

static size_t host_page(void)
{
    long pg = sysconf(_SC_PAGESIZE);
    return pg > 0 ? (size_t)pg : 4096;
}

/* The planned memory: the host arena (one block; CPU) or one block per
 * category from the backend; then a device program's host staging of the
 * graph input and label. */
static pw_status commit(pw_program *p)
{
    const pw_graph *g = p->g;
    if (!p->be->open) {
        PW_CHECK(pw_arena_commit(&p->arena));
        for (int c = 0; c < PW_MEM_COUNT; c++) p->cat_base[c] = (char *)p->arena.base + p->cat_start[c];
    } else {
        char who[96];
        snprintf(who, sizeof who, "program nodes [%d, %d) of '%s'", p->begin, p->end, g->name);
        void *base[PW_MEM_COUNT];
        PW_CHECK(p->be->open(p->dev_index, (pw_math)p->cfg.math, who, p->cat_bytes, &p->be_ctx, base));
        for (int c = 0; c < PW_MEM_COUNT; c++) p->cat_base[c] = base[c];
    }
    p->gptr = malloc(((size_t)p->n_params + 1) * sizeof *p->gptr);
    p->gnum = malloc(((size_t)p->n_params + 1) * sizeof *p->gnum);
    if (!p->gptr || !p->gnum) return pw_error(PW_ERR_NOMEM, "program: out of memory");
    for (int i = 0; i < p->n_params; i++) {
        p->gptr[i] = at(p, p->params[i].off_grad);
        p->gnum[i] = p->params[i].numel;
    }
    if (!p->dev) return PW_OK;
    const int64_t mb = p->cfg.micro_batch;
    size_t in = g->input >= 0 && p->touched[g->input] ? value_bytes(&g->values[g->input], mb) : 0;
    size_t lab = g->label >= 0 && p->touched[g->label] ? value_bytes(&g->values[g->label], mb) : 0;
    p->stage_in_bytes = (in + 63) / 64 * 64;
    p->stage_slot_bytes = p->stage_in_bytes + (lab + 63) / 64 * 64;
    /* One page-aligned host block: each slot's staged input and label, then
     * each slot's loss statistics (2 doubles) as the device writes them.
     * The backend page-locks it when it can, so that these copies do not
     * wait for the device (a download to pageable memory would). */
    const size_t page = host_page();
    size_t bytes = (size_t)p->cfg.slots * (p->stage_slot_bytes + 2 * sizeof(double));
    bytes = (bytes + page - 1) / page * page;
    if (posix_memalign((void **)&p->staging, page, bytes) != 0) {
        p->staging = NULL;
        return pw_error(PW_ERR_NOMEM, "program: out of memory for %zu bytes of input staging", bytes);
    }
    memset(p->staging, 0, bytes);
    p->dev_stats = (double *)(p->staging + (size_t)p->cfg.slots * p->stage_slot_bytes);
    if (p->be->host_register) {
        if (p->be->host_register(p->staging, bytes) == PW_OK)
            p->staging_pinned = 1;
        else
            PW_WARN("program: staging memory stays pageable (copies through it wait for the "
                    "device): %s", pw_last_error());
    }
    return PW_OK;
}

static int64_t gcd64(int64_t a, int64_t b)
{
    while (b) {
        const int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

int pw_grad_groups(int requested, int replicas, int micro_batches, int *per_replica)
{
    if (per_replica) *per_replica = 1;
    if (replicas < 1) replicas = 1;
    if (micro_batches < 1 || requested < 0) return -1;
    const int64_t n = (int64_t)replicas * micro_batches;
    int64_t G = requested;
    if (G == 0) {
        G = 1;
        while (G < PW_GRAD_GROUPS_DEFAULT && n % (2 * G) == 0) G *= 2;
    } else if (n % G != 0) {
        return -1;
    }
    if (per_replica) *per_replica = (int)(G / gcd64(G, replicas));
    return (int)G;
}

int pw_grad_groups_identical(int grad_groups, int replicas)
{
    if (replicas <= 1) return 1;
    if (grad_groups < 1 || grad_groups % replicas) return 0;
    const int k = grad_groups / replicas;
    return (k & (k - 1)) == 0;
}

pw_status pw_program_create(const pw_program_config *cfg, pw_program **out)
{
    *out = NULL;
    if (!cfg || !cfg->graph)
        return pw_error(PW_ERR_INVALID_ARG, "program: no graph given");
    const pw_graph *g = cfg->graph;
    pw_program_config c = *cfg;
    if (c.node_begin == 0 && c.node_end == 0) c.node_end = g->n_nodes;
    if (c.slots <= 0) c.slots = 1;
    if (c.node_begin < 0 || c.node_end > g->n_nodes || c.node_begin >= c.node_end)
        return pw_error(PW_ERR_INVALID_ARG, "program: node range [%d, %d) is not within the "
                        "graph's %d nodes", c.node_begin, c.node_end, g->n_nodes);
    if (c.micro_batch <= 0)
        return pw_error(PW_ERR_INVALID_ARG, "program: micro-batch size must be positive (got %lld)",
                        (long long)c.micro_batch);
    if (c.loss_batch <= 0) c.loss_batch = c.micro_batch;
    c.recompute = c.recompute != 0;
    if (c.grad_groups <= 0) c.grad_groups = 1;
    if (c.grad_groups > 1 && (c.micro_batches <= 0 || c.micro_batches % c.grad_groups))
        return pw_error(PW_ERR_INVALID_ARG, "program: %d gradient groups must divide the %d micro-batches "
                        "of a step", c.grad_groups, c.micro_batches);
    /* The binary counter over K groups holds at most bit-length(K - 1)
     * pending sums (group_end). */
    int sum_bufs = 0;
    while (sum_bufs < 30 && (1 << sum_bufs) < c.grad_groups) sum_bufs++;

    const pw_backend_i *be;
    int dev_index;
    PW_CHECK(pw_backend_find(c.device, &be, &dev_index));
    if (dev_index < 0) dev_index = 0; /* "cuda" = "cuda:0" for one program */
    c.device = NULL; /* the caller's string: read here only */

    if (g->tp_size > 1 && be->device_memory)
        return pw_error(PW_ERR_UNSUPPORTED, "program: tensor parallelism (graph '%s', rank %d of %d) runs on the "
                        "CPU only; device '%s' is not supported", g->name, g->tp_rank, g->tp_size, be->name);
    pw_program *p = calloc(1, sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "program: out of memory");
    p->be = be;
    p->tp = (pw_tp){.rank = g->tp_size > 1 ? g->tp_rank : 0, .size = g->tp_size > 1 ? g->tp_size : 1};
    p->dev = be->device_memory;
    p->dev_index = dev_index;
    p->cfg = c;
    p->g = g;
    p->begin = c.node_begin;
    p->end = c.node_end;
    p->shared_slot = -1;
    p->loss_slot = -1;
    p->n_sum_bufs = sum_bufs;
    for (int l = 0; l < 32; l++) p->sum_level[l] = -1;
    pw_arena_init(&p->arena, "stage program");
    size_t nv = (size_t)g->n_values;
    p->params = calloc((size_t)g->n_params + 1, sizeof *p->params);
    p->param_of_graph = malloc(((size_t)g->n_params + 1) * sizeof(int));
    p->values = calloc(nv, sizeof *p->values);
    p->touched = calloc(nv, 1);
    p->requires_grad = calloc(nv, 1);
    p->grad_valid = calloc(nv * (size_t)c.slots, 1);
    p->nodes = calloc((size_t)g->n_nodes, sizeof *p->nodes);
    p->slots = calloc((size_t)c.slots, sizeof *p->slots);
    p->bind_act = calloc(nv * (size_t)c.slots, sizeof(void *));
    p->bind_grad = calloc(nv * (size_t)c.slots, sizeof(float *));
    p->fwd_act_dst = calloc(nv * (size_t)c.slots, sizeof(char *));
    p->fwd_grad_src = calloc(nv * (size_t)c.slots, sizeof(float *));
    if (!p->bind_act || !p->bind_grad || !p->fwd_act_dst || !p->fwd_grad_src ||
        !p->params || !p->param_of_graph || !p->values || !p->touched || !p->requires_grad ||
        !p->grad_valid || !p->nodes || !p->slots) {
        pw_program_destroy(p);
        return pw_error(PW_ERR_NOMEM, "program: out of memory");
    }
    for (int i = 0; i < g->n_params; i++) p->param_of_graph[i] = -1;
    for (int i = p->begin; i < p->end; i++) {
        const pw_node *nd = &g->nodes[i];
        if (nd->op != PW_OP_DROPOUT) continue;
        const char *vname = g->values[nd->output].name;
        size_t len = strlen(vname) + sizeof "dropout:";
        p->nodes[i].rng_name = malloc(len);
        if (!p->nodes[i].rng_name) {
            pw_program_destroy(p);
            return pw_error(PW_ERR_NOMEM, "program: out of memory");
        }
        snprintf(p->nodes[i].rng_name, len, "dropout:%s", vname);
        if (nd->attrs.p > 0.0f) p->needs_rng = 1;
    }
    analyse_grad(p);
    pw_status st = plan(p);
    if (st == PW_OK) st = commit(p);
    if (st != PW_OK) {
        pw_program_destroy(p);
        return st;
    }
    PW_INFO(PW_SUB_MEM, "program nodes [%d, %d): params %zu B, grads %zu B, optimizer %zu B, "
            "activations %zu B (%d slots), shared %zu B%s on %s:%d", p->begin, p->end, p->mem.params,
            p->mem.grads, p->mem.optim_state, p->mem.activations, c.slots, p->mem.shared,
            c.recompute ? " (recompute)" : "", be->name, dev_index);
    *out = p;
    return PW_OK;
}

void pw_program_destroy(pw_program *p)
{
    if (!p) return;
    if (p->be && p->be->close) p->be->close(p->be_ctx);
    pw_arena_release(&p->arena);
    if (p->staging_pinned) p->be->host_unregister(p->staging);
    free(p->staging);
    free(p->gptr);
    free(p->gnum);
    if (p->nodes)
        for (int i = 0; i < p->g->n_nodes; i++) free(p->nodes[i].rng_name);
    free(p->params);
    free(p->param_of_graph);
    free(p->use_off);
    free(p->node_grad_off);
    free(p->values);
    free(p->touched);
    free(p->requires_grad);
    free(p->grad_valid);
    free(p->nodes);
    free(p->inputs);
    free(p->outputs);
    free(p->is_in);
    free(p->is_out);
    for (int port = 0; port < PW_PORT_COUNT; port++) free(p->port_off[port]);
    free(p->bind_act);
    free(p->bind_grad);
    free(p->fwd_act_dst);
    free(p->fwd_grad_src);
    free(p->slots);
    free(p);
}

void pw_program_memory_usage(const pw_program *p, pw_program_memory *out) { *out = p->mem; }

int pw_program_bind_memory(const pw_program *p, hwloc_topology_t topo, hwloc_const_nodeset_t nodes,
                           const char *who)
{
    /* The arena is one block: one call moves parameters, state and stash. */
    if (p->dev) return 0; /* device memory: nothing to bind */
    return pw_mem_bind_area(topo, p->arena.base, p->arena.size, nodes, who);
}

int pw_program_n_params(const pw_program *p) { return p->n_params; }

void pw_program_param_at(const pw_program *p, int i, pw_program_param *out)
{
    const prog_param *pp = &p->params[i];
    const pw_param *gp = &p->g->params[pp->gp];
    out->graph_param = pp->gp;
    out->name = gp->name;
    out->shape = gp->shape;
    out->data = at(p, pp->off_data);
    out->grad = at(p, pp->off_grad);
    out->numel = pp->numel;
}

int pw_program_on_device(const pw_program *p) { return p->dev; }

pw_status pw_program_param_read(const pw_program *p, int i, pw_param_part part, int use, float *dst)
{
    const int sf = pw_optim_state_floats(p->cfg.optim.kind);
    if (i < 0 || i >= p->n_params || (part != PW_PARAM_DATA && part != PW_PARAM_GRAD && part != PW_PARAM_STATE) ||
        use < 0 || (part == PW_PARAM_GRAD ? use >= p->params[i].n_uses : part == PW_PARAM_STATE ? use >= sf : use != 0))
        return pw_error(PW_ERR_INVALID_ARG, "program: no parameter %d (part %d, use %d) to read", i,
                        (int)part, use);
    const prog_param *pp = &p->params[i];
    size_t off = part == PW_PARAM_DATA ? pp->off_data
                 : part == PW_PARAM_STATE ? pp->off_state + (size_t)use * (size_t)pp->numel * sizeof(float)
                 : p->use_off[pp->use_first + use];
    PW_CHECK(be_begin(p));
    BE(download, dst, at(p, off), (size_t)pp->numel * sizeof(float));
    return be_end(p, PW_OK);
}

pw_status pw_program_param_write(pw_program *p, int i, pw_param_part part, const float *src)
{
    if (i < 0 || i >= p->n_params || (part != PW_PARAM_DATA && part != PW_PARAM_GRAD))
        return pw_error(PW_ERR_INVALID_ARG, "program: no parameter %d (part %d) to write", i, (int)part);
    const prog_param *pp = &p->params[i];
    PW_CHECK(be_begin(p));
    BE(upload, at(p, part == PW_PARAM_DATA ? pp->off_data : pp->off_grad), src,
       (size_t)pp->numel * sizeof(float));
    return be_end(p, PW_OK);
}

pw_status pw_program_param_write_state(pw_program *p, int i, int which, const float *src)
{
    if (i < 0 || i >= p->n_params || which < 0 || which >= pw_optim_state_floats(p->cfg.optim.kind))
        return pw_error(PW_ERR_INVALID_ARG, "program: no optimizer state %d of parameter %d to write", which, i);
    const prog_param *pp = &p->params[i];
    PW_CHECK(be_begin(p));
    BE(upload, at(p, pp->off_state + (size_t)which * (size_t)pp->numel * sizeof(float)), src,
       (size_t)pp->numel * sizeof(float));
    return be_end(p, PW_OK);
}

/* The values of parameter `gp` from (seed, name) into w (numel floats, host). */
static void init_values(const pw_param *gp, uint64_t seed, float *w, int64_t n)
{
    uint64_t key = pw_rng_key(seed, gp->name);
    switch (gp->init) {
    case PW_INIT_ZEROS: memset(w, 0, (size_t)n * 4); break;
    case PW_INIT_ONES: for (int64_t j = 0; j < n; j++) w[j] = 1.0f; break;
    case PW_INIT_UNIFORM:
        for (int64_t j = 0; j < n; j++)
            w[j] = (2.0f * pw_rng_uniform(key, (uint64_t)j) - 1.0f) * gp->init_scale;
        break;
    case PW_INIT_NORMAL:
        for (int64_t j = 0; j < n; j++) w[j] = pw_rng_normal(key, (uint64_t)j) * gp->init_scale;
        break;
    }
}

void pw_program_init_params(pw_program *p, uint64_t seed)
{
    if (p->dev) {
        /* Computed on the host (the same bits), then uploaded one by one. */
        pw_status st = be_begin(p);
        for (int i = 0; st == PW_OK && i < p->n_params; i++) {
            float *w = malloc((size_t)p->params[i].numel * sizeof *w + 1);
            if (!w) {
                st = pw_error(PW_ERR_NOMEM, "program: out of memory initialising parameters");
                break;
            }
            init_values(&p->g->params[p->params[i].gp], seed, w, p->params[i].numel);
            st = pw_program_param_write(p, i, PW_PARAM_DATA, w); /* waits: w may go */
            free(w);
        }
        if (st != PW_OK) PW_WARN("program: initialising parameters on %s failed: %s", p->be->name,
                                 pw_last_error());
        return;
    }
    for (int i = 0; i < p->n_params; i++) {
        const pw_param *gp = &p->g->params[p->params[i].gp];
        if (gp->tp_full) { /* a tensor-parallel rank's part: the full tensor's values, sliced */
            const int64_t part = gp->shape.d[gp->tp_dim];
            const int64_t full = p->params[i].numel / (part ? part : 1) * gp->tp_full;
            float *w = malloc((size_t)full * sizeof *w + 1);
            if (w) {
                init_values(gp, seed, w, full);
                pw_graph_tp_slice(p->g, p->params[i].gp, w, at(p, p->params[i].off_data), 1);
                free(w);
                continue;
            }
            PW_WARN("program: out of memory initialising '%s'; its part is zeros", gp->name);
            memset(at(p, p->params[i].off_data), 0, (size_t)p->params[i].numel * 4);
            continue;
        }
        init_values(gp, seed, at(p, p->params[i].off_data), p->params[i].numel);
    }
}

pw_status pw_program_set_tp(pw_program *p, const pw_tp *tp)
{
    if (tp->size != p->tp.size || tp->rank != p->tp.rank || (tp->size > 1 && tp->coll.member != tp->rank))
        return pw_error(PW_ERR_INVALID_ARG, "program: tensor-parallel endpoint for rank %d of %d (member %d), but "
                        "graph '%s' is rank %d of %d", tp->rank, tp->size, tp->coll.member, p->g->name, p->tp.rank,
                        p->tp.size);
    p->tp = *tp;
    p->tp_ready = 1;
    return PW_OK;
}

int pw_program_inputs(const pw_program *p, const int **values)
{
    *values = p->inputs;
    return p->n_inputs;
}

int pw_program_outputs(const pw_program *p, const int **values)
{
    *values = p->outputs;
    return p->n_outputs;
}



int pw_program_param_uses(const pw_program *p, int i, float **grads, int max)
{
    if (i < 0 || i >= p->n_params) return -1;
    const prog_param *pp = &p->params[i];
    for (int u = 0; u < pp->n_uses && u < max; u++)
        grads[u] = at(p, p->use_off[pp->use_first + u]);
    return pp->n_uses;
}

static pw_status fold(pw_program *p)
{
    for (int i = 0; i < p->n_params; i++) {
        const prog_param *pp = &p->params[i];
        if (pp->n_uses < 2) continue;
        float *g0 = at(p, pp->off_grad);
        for (int u = 1; u < pp->n_uses; u++) {
            float *gu = at(p, p->use_off[pp->use_first + u]);
            BE(copy_grad, gu, g0, pp->numel, 1); /* g0[j] += gu[j] */
            BE(zero, gu, (size_t)pp->numel * 4);
        }
    }
    return PW_OK;
}

void pw_program_fold_grads(pw_program *p)
{
    if (p->folded) return;
    pw_status st = be_begin(p);
    if (st == PW_OK) st = be_end(p, fold(p));
    if (st != PW_OK) /* only a device can fail here; its next call reports it again */
        PW_WARN("program: summing tied gradients on %s failed: %s", p->be->name, pw_last_error());
    p->folded = 1;
}


pw_status pw_program_set_rng(pw_program *p, int slot, uint64_t seed, int64_t step,
                             int64_t sample_offset)
{
    if (!p || slot < 0 || slot >= p->cfg.slots)
        return pw_error(PW_ERR_INVALID_ARG, "program: set_rng of slot %d out of range", slot);
    if (sample_offset < 0)
        return pw_error(PW_ERR_INVALID_ARG, "program: sample offset must be >= 0 (got %lld)",
                        (long long)sample_offset);
    slot_state *s = &p->slots[slot];
    s->seed = seed;
    s->step = step;
    s->offset = sample_offset;
    s->rng_pending = 1;
    return PW_OK;
}




/* The loss statistics of the slot's last forward join its totals; a device
 * program's arrive in the staging block (call once its download is done). */
static void take_stats(pw_program *p, int slot)
{
    slot_state *ss = &p->slots[slot];
    if (p->dev) memcpy(ss->stats, p->dev_stats + 2 * (size_t)slot, sizeof ss->stats);
    ss->loss_sum += ss->stats[0];
    ss->correct += (int64_t)ss->stats[1];
}

/* Device program, before a training or evaluation forward: the data the
 * caller staged (pw_program_data) and the received messages (host ports)
 * go to the slot's device buffers. */
static pw_status upload_inputs(pw_program *p, int slot, int64_t n)
{
    const pw_graph *g = p->g;
    const int data[2] = {g->input, g->label};
    for (int k = 0; k < 2; k++) {
        int v = data[k];
        if (v < 0 || !p->touched[v]) continue;
        BE(upload, pw_program_value(p, v, slot), pw_program_data(p, v, slot), value_bytes(&g->values[v], n));
    }
    for (int k = 0; k < p->n_inputs; k++) {
        int v = p->inputs[k];
        const void *src = p->bind_act[sv(p, slot, v)];
        if (src) BE(upload, pw_program_value(p, v, slot), src, value_bytes(&g->values[v], n));
    }
    return PW_OK;
}

/* ---- recording (stages/ops/backend.h, record_begin) ----
 * A device program whose calls complete asynchronously hands each training
 * call's ops to its backend between record brackets, one key per (kind,
 * slot): the same kernels on the same buffers every step, so the CUDA
 * backend records them once as a graph and replays it (docs/cuda.md).
 * Uploads of inputs and downloads of messages stay outside. Not under
 * recompute (its redo paths vary) nor with cfg.no_graphs. */
enum { REC_FORWARD = 0, REC_BACKWARD_INPUT, REC_BACKWARD_WEIGHT };

static int recording(const pw_program *p)
{
    return p->async && p->be->record_begin && p->be->record_end && !p->cfg.recompute &&
           !p->cfg.no_graphs;
}

typedef pw_status (*ops_fn)(pw_program *p, int slot, int64_t n, int how);

static pw_status recorded(pw_program *p, int kind, int slot, ops_fn fn, int64_t n, int how)
{
    const int key = kind * p->cfg.slots + slot;
    PW_CHECK(p->be->record_begin(p->be_ctx, key));
    return p->be->record_end(p->be_ctx, key, fn(p, slot, n, how));
}

/* The forward ops of the range (run_forward's middle), in node order. */
static pw_status forward_ops(pw_program *p, int slot, int64_t n, int how)
{
    const pw_graph *g = p->g;
    for (int i = p->begin; i < p->end; i++) {
        const pw_node *nd = &g->nodes[i];
        const prog_op *o = &pw_prog_ops[nd->op];
        if (!o->forward)
            return pw_error(PW_ERR_UNSUPPORTED, "%s:%d:%d: op '%s' has no %s kernel", g->file, nd->line,
                            nd->col, pw_op_name(nd->op), p->be->name);
        const prog_op_call c = {.p = p, .i = i, .nd = nd, .slot = slot, .n = n, .how = how};
        PW_CHECK(o->forward(&c));
    }
    return PW_OK;
}

/* The ops of the range over n samples of `slot`. RUN_RECOMPUTE rebuilds the
 * activations of the last training forward in the shared region: the same
 * kernels on the same inputs with the same randomness, so the same bits; it
 * leaves the loss statistics and the outgoing messages alone. */
static pw_status run_forward(pw_program *p, int slot, int64_t n, int how)
{
    const pw_graph *g = p->g;
    slot_state *ss = &p->slots[slot];
    if (how != RUN_RECOMPUTE) {
        ss->loss_sum = 0.0;
        ss->correct = 0;
        ss->stats[0] = ss->stats[1] = 0.0;
        if (p->dev) PW_CHECK(upload_inputs(p, slot, n));
    }
    if (how == RUN_TRAIN && recording(p)) PW_CHECK(recorded(p, REC_FORWARD, slot, forward_ops, n, how));
    else PW_CHECK(forward_ops(p, slot, n, how));
    if (how == RUN_RECOMPUTE) return PW_OK;
    /* Values sent on. Under recompute, those produced here were computed in
     * the shared region and go to the slot's message now. Values received
     * and passed on are the one copy the zero-copy ports cannot avoid (the
     * two messages have different owners). A device program downloads
     * what it sends into the (host) messages. */
    for (int k = 0; k < p->n_outputs; k++) {
        int v = p->outputs[k];
        size_t bytes = value_bytes(&g->values[v], n);
        if (p->is_in[v]) {
            char *dst = p->fwd_act_dst[sv(p, slot, v)];
            if (dst) BE(download, dst, pw_program_value(p, v, slot), bytes);
        } else {
            if (p->cfg.recompute) BE(copy, pw_program_value(p, v, slot), act(p, v, slot), bytes);
            void *msg = p->dev ? p->bind_act[sv(p, slot, v)] : NULL;
            if (msg) BE(download, msg, pw_program_value(p, v, slot), bytes);
        }
    }
    if (p->loss_node >= 0) {
        if (p->dev) { /* the statistics the host reads: 16 bytes per forward */
            BE(download, p->dev_stats + 2 * (size_t)slot, loss_stats(p, p->loss_node, slot, how),
               sizeof ss->stats);
            if (p->async && how == RUN_TRAIN) {
                p->loss_slot = slot; /* added up at completion (program_completed) */
                return PW_OK;
            }
            PW_CHECK(be_end(p, PW_OK)); /* before the host reads them */
        }
        take_stats(p, slot);
    }
    return PW_OK;
}

static pw_status check_forward(const pw_program *p, int slot, int64_t n)
{
    if (slot < 0 || slot >= p->cfg.slots)
        return pw_error(PW_ERR_INVALID_ARG, "program: slot %d out of range (0..%d)", slot,
                        p->cfg.slots - 1);
    if (n < 1 || n > p->cfg.micro_batch)
        return pw_error(PW_ERR_INVALID_ARG, "program: %lld samples do not fit a micro-batch of %lld",
                        (long long)n, (long long)p->cfg.micro_batch);
    return PW_OK;
}

pw_status pw_program_forward(pw_program *p, int slot, int64_t n)
{
    PW_CHECK(check_forward(p, slot, n));
    slot_state *ss = &p->slots[slot];
    if (p->needs_rng && !ss->rng_pending) {
        for (int i = p->begin; i < p->end; i++) {
            const pw_node *nd = &p->g->nodes[i];
            if (nd->op == PW_OP_DROPOUT && nd->attrs.p > 0.0f)
                return pw_error(PW_ERR_INVALID_ARG,
                                "%s:%d:%d: dropout needs the step and sample offset of each "
                                "training forward: call pw_program_set_rng(slot %d) before "
                                "pw_program_forward (or use pw_program_forward_eval)",
                                p->g->file, nd->line, nd->col, slot);
        }
    }
    ss->used_seed = ss->seed;
    ss->used_step = ss->step;
    ss->used_offset = ss->offset;
    ss->rng_pending = 0;
    ss->rows = n;
    ss->eval = 0;
    PW_CHECK(be_begin(p));
    pw_status st = be_end_call(p, run_forward(p, slot, n, RUN_TRAIN));
    p->shared_slot = slot;
    p->shared_state = st == PW_OK ? SHARED_FWD : SHARED_NONE;
    return st;
}

pw_status pw_program_forward_eval(pw_program *p, int slot, int64_t n)
{
    PW_CHECK(check_forward(p, slot, n));
    p->slots[slot].rows = n;
    p->slots[slot].eval = 1;
    p->shared_state = SHARED_NONE; /* an evaluation forward is no base for a backward */
    PW_CHECK(be_begin(p));
    return be_end(p, run_forward(p, slot, n, RUN_EVAL));
}



static pw_status check_backward(const pw_program *p, int slot)
{
    if (slot < 0 || slot >= p->cfg.slots)
        return pw_error(PW_ERR_INVALID_ARG, "program: slot %d out of range", slot);
    if (p->slots[slot].rows <= 0)
        return pw_error(PW_ERR_INTERNAL, "program: backward of slot %d before its forward", slot);
    if (p->slots[slot].eval)
        return pw_error(PW_ERR_INVALID_ARG, "program: backward of slot %d after an evaluation "
                        "forward (use pw_program_forward for training)", slot);
    return PW_OK;
}

/* Under recompute: makes the shared region hold slot's activations. */
static pw_status ensure_forward(pw_program *p, int slot)
{
    if (p->shared_slot == slot && p->shared_state != SHARED_NONE) return PW_OK;
    p->shared_state = SHARED_NONE;
    PW_CHECK(run_forward(p, slot, p->slots[slot].rows, RUN_RECOMPUTE));
    p->shared_slot = slot;
    p->shared_state = SHARED_FWD;
    return PW_OK;
}

/* The input-backward ops of the range, in reverse node order
 * (run_backward_input's middle). */
static pw_status backward_input_ops(pw_program *p, int slot, int64_t n, int how)
{
    const pw_graph *g = p->g;
    for (int i = p->end - 1; i >= p->begin; i--) {
        const pw_node *nd = &g->nodes[i];
        const prog_op *o = &pw_prog_ops[nd->op];
        /* No gradient flows here, unless the node is the loss, which seeds it. */
        if (!o->loss && !grad_ready(p, slot, nd->output)) continue;
        if (!o->backward_input)
            return pw_error(PW_ERR_UNSUPPORTED, "%s:%d:%d: op '%s' has no %s backward", g->file, nd->line,
                            nd->col, pw_op_name(nd->op), p->be->name);
        const prog_op_call c = {.p = p, .i = i, .nd = nd, .slot = slot, .n = n, .how = how};
        PW_CHECK(o->backward_input(&c));
    }
    return PW_OK;
}

/* The input gradients of one slot, in reverse node order. */
static pw_status run_backward_input(pw_program *p, int slot)
{
    const pw_graph *g = p->g;
    int64_t n = p->slots[slot].rows;
    unsigned char *valid = &p->grad_valid[(size_t)slot * (size_t)g->n_values];
    memset(valid, 0, (size_t)g->n_values);
    /* Gradients of this stage's outputs were written by the next stage. A
     * value passed through arrives in GRAD_OUT and leaves in GRAD_IN: copy,
     * then local uses add to it — the order a single stage sums in. Under
     * recompute the gradient of a value produced here is summed in the
     * shared region, starting from what the next stage sent, so the message
     * is only read (and a redo can start over from it). */
    for (int k = 0; k < p->n_outputs; k++) {
        int v = p->outputs[k];
        if (!p->requires_grad[v]) continue;
        size_t bytes = value_bytes(&g->values[v], n);
        if (p->is_in[v]) {
            if (p->redo) continue; /* its gradient is not needed again */
            valid[v] = 1;
            const float *src = p->fwd_grad_src[sv(p, slot, v)];
            if (src) BE(upload, pw_program_grad(p, v, slot), src, bytes);
        } else {
            valid[v] = 1;
            /* A device program's copy of the (host) message, once. */
            const float *msg = p->dev && !p->redo ? p->bind_grad[sv(p, slot, v)] : NULL;
            if (msg) BE(upload, pw_program_grad(p, v, slot), msg, bytes);
            if (p->cfg.recompute) BE(copy, grad_at(p, v, slot), pw_program_grad(p, v, slot), bytes);
        }
    }

    if (!p->redo && recording(p)) PW_CHECK(recorded(p, REC_BACKWARD_INPUT, slot, backward_input_ops, n, 0));
    else PW_CHECK(backward_input_ops(p, slot, n, 0));
    if (p->redo) return PW_OK;
    /* A received value no local op sent a gradient to still owes the previous
     * stage a (zero) gradient. A device program then downloads the input
     * gradients into the (host) messages. */
    for (int k = 0; k < p->n_inputs; k++) {
        int v = p->inputs[k];
        if (!p->requires_grad[v]) continue;
        size_t bytes = value_bytes(&g->values[v], n);
        if (!valid[v]) BE(zero, pw_program_grad(p, v, slot), bytes);
        float *msg = p->dev ? p->bind_grad[sv(p, slot, v)] : NULL;
        if (msg) BE(download, msg, pw_program_grad(p, v, slot), bytes);
    }
    return PW_OK;
}

static pw_status backward_input(pw_program *p, int slot)
{
    if (p->cfg.recompute) {
        PW_CHECK(ensure_forward(p, slot));
        p->shared_state = SHARED_NONE; /* until the backward is complete */
    }
    PW_CHECK(run_backward_input(p, slot));
    if (p->cfg.recompute) p->shared_state = SHARED_BWD;
    return PW_OK;
}

pw_status pw_program_backward_input(pw_program *p, int slot)
{
    PW_CHECK(check_backward(p, slot));
    PW_CHECK(be_begin(p));
    return be_end_call(p, backward_input(p, slot));
}

/* The weight-backward ops of the range, in reverse node order. */
static pw_status backward_weight_ops(pw_program *p, int slot, int64_t n, int how)
{
    const pw_graph *g = p->g;
    for (int i = p->end - 1; i >= p->begin; i--) {
        const pw_node *nd = &g->nodes[i];
        if (nd->n_params == 0 || !grad_ready(p, slot, nd->output)) continue;
        const prog_op *o = &pw_prog_ops[nd->op];
        if (!o->backward_weight)
            return pw_error(PW_ERR_UNSUPPORTED, "%s:%d:%d: op '%s' has no %s weight backward", g->file,
                            nd->line, nd->col, pw_op_name(nd->op), p->be->name);
        const prog_op_call c = {.p = p, .i = i, .nd = nd, .slot = slot, .n = n, .how = how};
        PW_CHECK(o->backward_weight(&c));
    }
    return PW_OK;
}

static pw_status backward_weight(pw_program *p, int slot)
{
    int64_t n = p->slots[slot].rows;
    if (p->cfg.recompute && !(p->shared_slot == slot && p->shared_state == SHARED_BWD)) {
        /* Other work ran since this slot's backward_input (a split-W
         * schedule): rebuild its activations and interior gradients. The
         * input gradients were sent already; the redo keeps them local. */
        PW_CHECK(ensure_forward(p, slot));
        p->shared_state = SHARED_NONE;
        p->redo = 1;
        pw_status st = run_backward_input(p, slot);
        p->redo = 0;
        PW_CHECK(st);
        p->shared_state = SHARED_BWD;
    }
    /* Reverse node order, as the fused backward would visit them. A tied
     * parameter's uses each add into their own buffer (micro-batch order),
     * summed once per step by pw_program_fold_grads: the same order however
     * the uses are spread over stages. */
    p->folded = 0;
    if (recording(p)) return recorded(p, REC_BACKWARD_WEIGHT, slot, backward_weight_ops, n, 0);
    return backward_weight_ops(p, slot, n, 0);
}

/* The end of a group of micro-batches (cfg.grad_groups): its running sum,
 * in the gradients, joins the pending sums like a binary counter — the sum
 * of 2^l groups waits at level l until its right neighbour of the same size
 * arrives — and the gradients start again from zero. The last group takes
 * every pending sum, smallest first, which closes the tree:
 * ((G0 + G1) + ((G2 + G3) ... )) for K groups. Float addition commutes, so
 * which operand is the destination does not change a bit. */
static pw_status group_end(pw_program *p)
{
    const int q = p->cfg.micro_batches / p->cfg.grad_groups;
    if (p->cfg.grad_groups <= 1 || p->n_bw % q) return PW_OK;
    if (p->n_params == 0) return PW_OK;
    float *grad = at(p, p->params[0].off_grad);
    const int64_t n = (int64_t)(p->mem.grads / sizeof(float));
#define SUM_BUF(b) ((float *)at(p, p->off_sums + (size_t)(b) * p->mem.grads))
    if (p->n_bw >= p->cfg.micro_batches) { /* the last group: close the tree in the gradients */
        for (int l = 0; l < p->n_sum_bufs; l++)
            if (p->sum_level[l] >= 0) {
                BE(copy_grad, SUM_BUF(p->sum_level[l]), grad, n, 1);
                p->sum_level[l] = -1;
            }
        p->sum_busy = 0;
        return PW_OK;
    }
    int carry = -1; /* the buffer holding the sum being carried; -1: the gradients */
    for (int l = 0; l < p->n_sum_bufs; l++) {
        if (p->sum_level[l] < 0) {
            if (carry < 0) {
                for (carry = 0; p->sum_busy & (1u << carry); carry++) {}
                p->sum_busy |= 1u << carry;
                BE(copy_grad, grad, SUM_BUF(carry), n, 0);
            }
            p->sum_level[l] = carry;
            break;
        }
        const int b = p->sum_level[l];
        BE(copy_grad, carry < 0 ? grad : SUM_BUF(carry), SUM_BUF(b), n, 1);
        if (carry >= 0) p->sum_busy &= ~(1u << carry);
        carry = b;
        p->sum_level[l] = -1;
    }
#undef SUM_BUF
    BE(zero, grad, p->mem.grads);
    return PW_OK;
}

pw_status pw_program_backward_weight(pw_program *p, int slot)
{
    PW_CHECK(check_backward(p, slot));
    PW_CHECK(be_begin(p));
    pw_status st = backward_weight(p, slot);
    if (st == PW_OK) {
        p->n_bw++;
        st = group_end(p);
    }
    return be_end_call(p, st);
}

/* A new step's gradient bookkeeping; `memory`: zero the gradient region
 * too (not needed after optim_update_zero, which left it zero). */
static pw_status restart_grads(pw_program *p, int memory)
{
    p->folded = 0;
    p->n_bw = 0;
    p->sum_busy = 0;
    for (int l = 0; l < p->n_sum_bufs; l++) p->sum_level[l] = -1;
    if (p->n_params == 0 || !memory) return PW_OK;
    BE(zero, at(p, p->params[0].off_grad), p->mem.grads);
    return PW_OK;
}

static pw_status zero_grads(pw_program *p) { return restart_grads(p, 1); }

void pw_program_zero_grads(pw_program *p)
{
    pw_status st = be_begin(p);
    if (st == PW_OK) st = be_end(p, zero_grads(p));
    if (st != PW_OK) /* only a device can fail here; its next call reports it again */
        PW_WARN("program: zeroing gradients on %s failed: %s", p->be->name, pw_last_error());
}

/* The step's gradients, final and checked: pending group sums joined, tied
 * uses folded, PW_ERR_NUMERIC when one is not finite. */
static pw_status final_grads(pw_program *p, int64_t step)
{
    if (p->sum_busy) {
        /* A step with fewer backward_weight calls than cfg.micro_batches left
         * group sums pending: they join the gradients (smallest first), so
         * nothing is lost, though the sum is then not the documented tree. */
        float *grad = at(p, p->params[0].off_grad);
        for (int l = 0; l < p->n_sum_bufs; l++)
            if (p->sum_level[l] >= 0) {
                BE(copy_grad, (float *)at(p, p->off_sums + (size_t)p->sum_level[l] * p->mem.grads), grad,
                   (int64_t)(p->mem.grads / sizeof(float)), 1);
                p->sum_level[l] = -1;
            }
        p->sum_busy = 0;
    }
    if (!p->folded) PW_CHECK(fold(p));
    p->folded = 1;
    /* A non-finite gradient would silently poison every weight. */
    int bad = -1;
    BE(find_nonfinite, p->gptr, p->gnum, p->n_params, &bad);
    if (bad >= 0)
        return pw_error(PW_ERR_NUMERIC, "step %lld: gradient of '%s' is not finite", (long long)step,
                        p->g->params[p->params[bad].gp].name);
    return PW_OK;
}

/* The update of every parameter; `fused`: with the backend's
 * optim_update_zero, which clears each gradient in the update's own sweep
 * (the rest of the region — tied uses, cleared by fold, and the alignment
 * between arrays, never written — is zero already). A post-validated try
 * keeps its gradients for a redo: not fused. */
static pw_status update(pw_program *p, int64_t step, int fused)
{
    for (int i = 0; i < p->n_params; i++) {
        const prog_param *pp = &p->params[i];
        if (fused)
            BE(optim_update_zero, &p->cfg.optim, step, at(p, pp->off_data), at(p, pp->off_grad),
               at(p, pp->off_state), pp->numel, p->g->params[pp->gp].decay);
        else
            BE(optim_update, &p->cfg.optim, step, at(p, pp->off_data), at(p, pp->off_grad),
               at(p, pp->off_state), pp->numel, p->g->params[pp->gp].decay);
    }
    return PW_OK;
}

static pw_status optimizer_step(pw_program *p, int64_t step)
{
    if (p->n_params == 0) return PW_OK;
    p->tried = 0;
    PW_CHECK(final_grads(p, step));
    const int fused = p->be->optim_update_zero != NULL;
    PW_CHECK(update(p, step, fused));
    return restart_grads(p, !fused);
}

pw_status pw_program_optimizer_step(pw_program *p, int64_t step)
{
    if (step < 1) return pw_error(PW_ERR_INVALID_ARG, "optimizer step must count from 1");
    PW_CHECK(be_begin(p));
    return be_end_call(p, optimizer_step(p, step));
}

/* Parameters and optimizer state to the backup (save) or back from it. */
static pw_status backup_copy(pw_program *p, int save)
{
    char *params = at(p, p->cat_start[PW_MEM_PARAMS]), *state = at(p, p->cat_start[PW_MEM_OPTIM]);
    char *copy = at(p, p->off_backup);
    if (save) {
        BE(copy, copy, params, p->mem.params);
        BE(copy, copy + p->mem.params, state, p->mem.optim_state);
    } else {
        BE(copy, params, copy, p->mem.params);
        BE(copy, state, copy + p->mem.params, p->mem.optim_state);
    }
    return PW_OK;
}

static pw_status optimizer_try(pw_program *p, int64_t step)
{
    if (p->n_params == 0) return PW_OK;
    PW_CHECK(final_grads(p, step));
    PW_CHECK(backup_copy(p, 1));
    p->tried = 1;
    return update(p, step, 0);
}

pw_status pw_program_optimizer_try(pw_program *p, int64_t step)
{
    if (step < 1) return pw_error(PW_ERR_INVALID_ARG, "optimizer step must count from 1");
    if (!p->cfg.post_validate)
        return pw_error(PW_ERR_INVALID_ARG, "program: an optimizer step to validate later needs "
                        "post_validate in the program's configuration");
    PW_CHECK(be_begin(p));
    return be_end_call(p, optimizer_try(p, step));
}

pw_status pw_program_optimizer_commit(pw_program *p)
{
    if (!p->tried) return PW_OK;
    p->tried = 0;
    PW_CHECK(be_begin(p));
    return be_end_call(p, zero_grads(p));
}

pw_status pw_program_optimizer_undo(pw_program *p)
{
    if (!p->tried) return PW_OK;
    p->tried = 0;
    PW_CHECK(be_begin(p));
    return be_end_call(p, backup_copy(p, 0));
}

/* ---- asynchronous completion ---- */

int pw_program_set_async(pw_program *p, int on)
{
    p->async = on && p->dev && p->be->notify && p->be->sync;
    return p->async;
}

/* The backend's notify callback, on its own thread, once the call's work
 * (downloads included) has finished: the loss statistics are in host
 * memory now. Touches no backend. */
static void program_completed(void *arg)
{
    pw_program *p = arg;
    if (p->loss_slot >= 0) {
        take_stats(p, p->loss_slot);
        p->loss_slot = -1;
    }
    p->done(p->done_arg, PW_OK, NULL);
}

pw_status pw_program_wait(pw_program *p)
{
    if (!p->unsynced) return PW_OK;
    p->unsynced = 0;
    PW_CHECK(be_begin(p));
    pw_status st = be_end(p, PW_OK);
    if (p->loss_slot >= 0 && st == PW_OK) take_stats(p, p->loss_slot);
    p->loss_slot = -1;
    return st;
}

int pw_program_submitted(pw_program *p, pw_stage_done_fn done, void *arg)
{
    if (!p->unsynced) return 0;
    p->unsynced = 0;
    p->done = done;
    p->done_arg = arg;
    pw_status st = p->be->notify(p->be_ctx, program_completed, p);
    if (st != PW_OK) {
        /* Nothing will call back: wait here and report the failure. */
        char msg[256];
        snprintf(msg, sizeof msg, "%s", pw_last_error());
        (void)p->be->sync(p->be_ctx);
        p->loss_slot = -1;
        done(arg, st, msg);
    }
    return 1;
}

double pw_program_loss_sum(const pw_program *p, int slot) { return p->slots[slot].loss_sum; }
int64_t pw_program_correct(const pw_program *p, int slot) { return p->slots[slot].correct; }
int pw_program_has_loss(const pw_program *p) { return p->loss_node >= 0; }

void *pw_program_data(const pw_program *p, int v, int slot)
{
    const pw_graph *g = p->g;
    if (v < 0 || (v != g->input && v != g->label) || !p->touched[v] || slot < 0 || slot >= p->cfg.slots)
        return NULL;
    if (!p->dev) return pw_program_value(p, v, slot);
    return p->staging + (size_t)slot * p->stage_slot_bytes + (v == g->input ? 0 : p->stage_in_bytes);
}
int pw_program_needs_rng(const pw_program *p) { return p->needs_rng; }

int64_t pw_program_loss_positions(const pw_program *p)
{
    if (p->g->label < 0) return 0;
    return pw_shape_numel(&p->g->values[p->g->label].shape);
}

size_t pw_program_port_bytes(const pw_program *p, pw_port port)
{
    return (unsigned)port < PW_PORT_COUNT ? p->port_bytes[port] : 0;
}

pw_status pw_program_bind_port(pw_program *p, int slot, pw_port port, void *buf)
{
    if (slot < 0 || slot >= p->cfg.slots || (unsigned)port >= PW_PORT_COUNT)
        return pw_error(PW_ERR_INVALID_ARG, "program: bind of slot %d port %d out of range", slot,
                        (int)port);
    const pw_graph *g = p->g;
    for (int v = 0; v < g->n_values; v++) {
        size_t off = p->port_off[port][v];
        if (off == NO_OFF) continue;
        char *at = buf ? (char *)buf + off : NULL;
        size_t i = sv(p, slot, v);
        switch (port) {
        case PW_PORT_ACT_IN: p->bind_act[i] = at; break;
        case PW_PORT_GRAD_IN: p->bind_grad[i] = (float *)at; break;
        case PW_PORT_ACT_OUT:
            /* Produced here: the op writes straight into the message (under
             * recompute the forward copies it there at its end). */
            if (p->is_in[v]) p->fwd_act_dst[i] = at;
            else p->bind_act[i] = at;
            break;
        case PW_PORT_GRAD_OUT:
            if (p->is_in[v]) p->fwd_grad_src[i] = (float *)at;
            else p->bind_grad[i] = (float *)at;
            break;
        default: break;
        }
    }
    return PW_OK;
}

/* ---- the scheduler's stage vtable ---- */
const pw_program_config *pw_program_get_config(const pw_program *p) { return &p->cfg; }

static pw_status stage_forward(void *self, int mb, int slot)
{
    (void)mb;
    pw_program *p = self;
    return pw_program_forward(p, slot, p->cfg.micro_batch);
}

static pw_status stage_backward_input(void *self, int mb, int slot)
{
    (void)mb;
    return pw_program_backward_input(self, slot);
}

static pw_status stage_backward_weight(void *self, int mb, int slot)
{
    (void)mb;
    return pw_program_backward_weight(self, slot);
}

static pw_status stage_optimizer_step(void *self, long step)
{
    return pw_program_optimizer_step(self, step);
}

static int stage_submitted(void *self, pw_stage_done_fn done, void *arg)
{
    return pw_program_submitted(self, done, arg);
}

const pw_stage_i pw_program_stage_i = {
    .name = "graph-program",
    .forward = stage_forward,
    .backward_input = stage_backward_input,
    .backward_weight = stage_backward_weight,
    .optimizer_step = stage_optimizer_step,
    .submitted = stage_submitted,
};
