/* pipewright — graph stages on the engine: partition, programs, schedule,
 * data-parallel replicas (in one process or one process per stage and
 * replica under MPI). */
#include "stages/train/pipeline-internal.h"

int64_t pw_pipeline_trace_capacity(int micro_batches, int buckets, int64_t steps)
{
    const int64_t cap = INT64_C(1) << 23;
    if (micro_batches < 1 || steps < 1) return 64;
    /* F, B, W, two sends, two receives and their waits per micro-batch; a
     * few per bucket (all-reduce and its wait) and per step. */
    const int64_t per_step = 8 * (int64_t)micro_batches + 16 + 4 * (buckets > 0 ? buckets : DEFAULT_BUCKETS);
    return steps > cap / per_step ? cap : per_step * steps;
}

pw_pipeline_config pw_pipeline_defaults(void)
{
    pw_pipeline_config c;
    memset(&c, 0, sizeof c);
    c.batch = 64;
    c.micro_batches = 1;
    c.stages = 1;
    c.schedule = PW_SCHEDULE_1F1B;
    c.partition = PW_PARTITION_AUTO;
    c.optim = pw_optim_defaults(PW_OPTIM_SGD);
    c.seed = 1;
    c.watchdog_s = 60.0;
    c.pin = 1;
    c.replicas = 1;
    return c;
}


/* ---- construction ---- */

static pw_status make_schedule(pw_pipeline *pl)
{
    const pw_pipeline_config *c = &pl->cfg;
    if (c->schedule_csv) {
        PW_CHECK(pw_schedule_load_csv(c->schedule_csv, &pl->sched));
        const pw_schedule *s = pl->sched;
        pl->sc.kind = PW_SCHEDULE_CUSTOM;
        if (s->n_ranks != c->stages)
            return pw_error(PW_ERR_INVALID_ARG, "%s: the schedule has %d ranks but --stages is %d",
                            c->schedule_csv, s->n_ranks, c->stages);
        if (s->n_micro != c->micro_batches)
            return pw_error(PW_ERR_INVALID_ARG, "%s: the schedule has %d micro-batches but "
                            "--micro-batches is %d", c->schedule_csv, s->n_micro, c->micro_batches);
        if (pl->NR > 1 && s->n_buckets == 0)
            return pw_error(PW_ERR_INVALID_ARG, "%s: --replicas %d needs ALLREDUCE buckets in the "
                            "schedule (cells AR0, AR1, ... after each rank's last backward)",
                            c->schedule_csv, pl->NR);
        pl->schedule_name = strdup(c->schedule_csv);
    } else {
        pw_schedule_config sc = {.kind = c->schedule, .n_stages = c->stages,
                                 .n_micro = c->micro_batches, .split_w = c->split_w,
                                 .n_buckets = pl->NR > 1 ? (c->buckets > 0 ? c->buckets : DEFAULT_BUCKETS) : 0,
                                 .chunks_per_rank = c->chunks_per_rank,
                                 .memory_limit = c->memory_limit};
        pl->sc = sc;
        PW_CHECK(pw_schedule_generate(&sc, &pl->sched));
        PW_CHECK(pw_schedule_lower(pl->sched));
        pl->schedule_name = strdup(pw_schedule_kind_name(c->schedule));
    }
    pl->n_buckets = pl->sched->n_buckets;
    if (!pl->schedule_name) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    /* Rejected before anything runs, with the rank, position and action. */
    pw_status st = pw_schedule_validate(pl->sched, &pl->rep);
    if (st != PW_OK && c->schedule_csv) return pw_error_prefix(st, "%s: ", c->schedule_csv);
    return st;
}


/* zb-auto orders the stages by their times, which the partition predicts:
 * make_schedule built it on unit times (for its shape), and it is built again
 * here from the stages' predicted F, B, W and message times (a stage's comm
 * covers its two messages) and validated again. */
static pw_status retime_zb_auto(pw_pipeline *pl)
{
    if (pl->sc.kind != PW_SCHEDULE_ZB_AUTO) return PW_OK;
    const int S = pl->S;
    double *t = malloc(3 * (size_t)S * sizeof *t);
    if (!t) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    pw_schedule_costs costs = {.f = t, .b = t + S, .w = t + 2 * S};
    for (int s = 0; s < S; s++) {
        const pw_stage_cost *k = &pl->part.stage[s];
        t[s] = k->f;
        t[S + s] = k->b;
        t[2 * S + s] = k->w;
        if (k->comm / 2 > costs.comm) costs.comm = k->comm / 2;
    }
    pw_schedule_config sc = pl->sc;
    sc.costs = &costs;
    pw_schedule *sched = NULL;
    pw_schedule_report *rep = NULL;
    pw_status st = pw_schedule_generate(&sc, &sched);
    if (st == PW_OK) st = pw_schedule_lower(sched);
    if (st == PW_OK) st = pw_schedule_validate(sched, &rep);
    free(t);
    if (st != PW_OK) {
        pw_schedule_destroy(sched);
        return st;
    }
    pw_schedule_destroy(pl->sched);
    pw_schedule_report_destroy(pl->rep);
    pl->sched = sched;
    pl->rep = rep;
    return PW_OK;
}

static int ties_across_chunks(const pw_pipeline *pl)
{
    const pw_graph *g = pl->g;
    int *owner = malloc((size_t)(g->n_params > 0 ? g->n_params : 1) * sizeof *owner);
    int tied = 0;
    if (!owner) return 1; /* the slow path is correct for every graph */
    for (int p = 0; p < g->n_params; p++) owner[p] = -1;
    for (int ch = 0; ch < pl->C && !tied; ch++)
        for (int i = pl->part.begin[ch]; i < pl->part.begin[ch + 1] && !tied; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++) {
                int p = g->nodes[i].params[q];
                if (owner[p] >= 0 && owner[p] != ch) tied = 1;
                owner[p] = ch;
            }
    free(owner);
    return tied;
}

pw_status pl_tp_snap_cuts(const pw_pipeline *pl, int *cuts, int *moved)
{
    const pw_graph *r = pl->rank_g[0], *g = pl->g;
    const int C = pl->C, N = g->n_nodes;
    *moved = 0;
    unsigned char *ok = malloc((size_t)N + 1);
    if (!ok) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    /* ok[b]: no value produced before node b and read from b on is split */
    for (int b = 0; b <= N; b++) ok[b] = 1;
    for (int i = 0; i < N; i++)
        for (int q = 0; q < g->nodes[i].n_inputs; q++) {
            const int v = g->nodes[i].inputs[q], prod = g->values[v].producer;
            if (r->values[v].tp_full && prod >= 0)
                for (int b = prod + 1; b <= i; b++) ok[b] = 0;
        }
    pw_status st = PW_OK;
    for (int c = 1; c < C && st == PW_OK; c++) {
        if (ok[cuts[c]]) continue;
        int best = -1;
        for (int d = 1; best < 0 && (cuts[c] - d > cuts[c - 1] || cuts[c] + d < cuts[c + 1]); d++) {
            if (cuts[c] - d > cuts[c - 1] && ok[cuts[c] - d]) best = cuts[c] - d;
            else if (cuts[c] + d < cuts[c + 1] && ok[cuts[c] + d]) best = cuts[c] + d;
        }
        if (best < 0)
            st = pw_error(PW_ERR_INVALID_ARG, "tensor parallelism: chunk %d of %d cannot begin anywhere between "
                          "nodes %d and %d without splitting a tensor-parallel pair; use fewer stages or a `cut` "
                          "marker", c, C, cuts[c - 1] + 1, cuts[c + 1] - 1);
        cuts[c] = best;
        *moved = 1;
    }
    free(ok);
    return st;
}

/* Tensor parallelism: the partition method's cuts, each that splits a pair
 * moved (pl_tp_snap_cuts) and the partition re-evaluated there. User-given
 * cuts are left as given (pl_build_stage names a bad one). */
static pw_status tp_move_cuts(pw_pipeline *pl)
{
    const int C = pl->C;
    int *cuts = malloc(((size_t)C + 1) * sizeof *cuts), moved = 0;
    if (!cuts) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    for (int c = 0; c <= C; c++) cuts[c] = pl->part.begin[c];
    pw_status st = pl_tp_snap_cuts(pl, cuts, &moved);
    if (st == PW_OK && moved) {
        pw_partition_free(&pl->part);
        pw_partition_config pc = {.n_stages = C, .balance = PW_BALANCE_FLOPS};
        st = pw_partition_evaluate(pl->g, &pc, cuts, &pl->part);
    }
    free(cuts);
    return st;
}

/* The chunks' node ranges: the caller's cuts (a plan's, stages/plan/plan.h) or
 * the partition method's; both get the same FLOP-model predictions. */
static pw_status make_partition(pw_pipeline *pl)
{
    const pw_pipeline_config *c = &pl->cfg;
    if (!c->cuts && pl->T > 1) {
        PW_CHECK(pw_partition_make(pl->g, pl->C, c->partition, &pl->part));
        return tp_move_cuts(pl);
    }
    if (!c->cuts) return pw_partition_make(pl->g, pl->C, c->partition, &pl->part);
    if (c->n_cuts != pl->C + 1)
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: %d cut boundaries given for %d chunks (want %d: "
                        "0, the first node of each later chunk, %d)", c->n_cuts, pl->C, pl->C + 1,
                        pl->g->n_nodes);
    pw_partition_config pc = {.n_stages = pl->C, .balance = PW_BALANCE_FLOPS};
    return pw_partition_evaluate(pl->g, &pc, c->cuts, &pl->part);
}

/* The PCI bus id of each worker's GPU, worker k·S + rank as the engine
 * counts them (rank r on its chunks' device, as pl_chunk_device puts it), so
 * that the engine binds each worker near its GPU; NULL in one process
 * without a backend that knows PCI locality (the CPU), under a transport,
 * or when an id cannot be read (the engine then binds by the CPU rule).
 * Free with free(): one block, the pointers and the strings. */

pw_status pw_pipeline_create(const pw_pipeline_config *cfg, pw_pipeline **out)
{
    return pl_create(cfg, NULL, out);
}

/* pw_pipeline_create; `adopt` (optional) is the trace of a pipeline being
 * re-partitioned (stages/train/rebalance.c): the new engine records into
 * it and the new pipeline owns it on success (on failure it is untouched). */
pw_status pl_create(const pw_pipeline_config *cfg, pw_trace *adopt, pw_pipeline **out)
{
    static atomic_ullong generations;
    *out = NULL;
    const pw_pipeline_config *c = cfg;
    if (!c->graph || !c->train)
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: graph and training data are required");
    if (c->stages < 1)
        return pw_error(PW_ERR_INVALID_ARG, "stages must be at least 1 (got %d)", c->stages);
    if (c->micro_batches < 1)
        return pw_error(PW_ERR_INVALID_ARG, "micro-batches must be at least 1 (got %d)",
                        c->micro_batches);
    if (c->chunks_per_rank < 0)
        return pw_error(PW_ERR_INVALID_ARG, "chunks per rank must not be negative (got %d)",
                        c->chunks_per_rank);
    const int NR = c->replicas > 0 ? c->replicas : 1;
    if (c->replicas < 0 || c->buckets < 0)
        return pw_error(PW_ERR_INVALID_ARG, "replicas (%d) and buckets (%d) must not be negative",
                        c->replicas, c->buckets);
    if (c->clip_grad_norm < 0 || c->clip_grad_norm != c->clip_grad_norm)
        return pw_error(PW_ERR_INVALID_ARG, "clip_grad_norm must be >= 0 (got %g)", c->clip_grad_norm);
    const pw_transport *t = c->transport;
    if (t && (t->n_ranks != c->stages || t->n_replicas != NR))
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: the transport runs %d stages x %d replicas, the "
                        "configuration asks for %d x %d", t->n_ranks, t->n_replicas, c->stages, NR);
    PW_CHECK(pw_trainer_check_batching(c->graph, c->train, c->batch, c->micro_batches, NR));
    PW_CHECK(pl_check_device(c, NR));
    int K;
    if (pw_grad_groups(c->grad_groups, NR, c->micro_batches, &K) < 0)
        return pw_error(PW_ERR_INVALID_ARG, "gradient groups %d: must divide the "
                        "%d micro-batches of a step (%d replicas x %d)", c->grad_groups,
                        NR * c->micro_batches, NR, c->micro_batches);

    const int T = c->tensor_parallel > 1 ? c->tensor_parallel : 1;
    if (c->tensor_parallel < 0 || c->tensor_parallel > 64)
        return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism %d: must be 1 to 64 ranks", c->tensor_parallel);
    if (t && (t->n_tp > 1 ? t->n_tp : 1) != T)
        return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism %d under MPI: the transport runs %d "
                        "tensor-parallel ranks per stage (pw_mpi_config.n_tensor)", T, t->n_tp > 1 ? t->n_tp : 1);
    if (T > 1) {
        /* What tensor parallelism does not cover yet (docs/parallelism.md). */
        if (t && c->ps_servers > 0)
            return pw_error(PW_ERR_UNSUPPORTED, "tensor parallelism %d with parameter servers under MPI is not "
                            "built", T);
        if (c->device && strcmp(c->device, "cpu") != 0)
            return pw_error(PW_ERR_UNSUPPORTED, "tensor parallelism %d runs on the CPU only (device '%s')", T,
                            c->device);
        if (!pw_graph_tp_marked(c->graph))
            return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism %d: graph '%s' marks no op to split (tp=column, "
                            "tp=row or tp=vocab; docs/parallelism.md, \"Tensor parallelism\")", T, c->graph->name);
    }

    pw_pipeline *pl = calloc(1, sizeof *pl);
    if (!pl) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    pl->cfg = *c;
    pl->T = T;
    pl->TL = t ? 1 : T;
    pl->tp0 = t && T > 1 ? t->tp_rank : 0;
    pl->g = c->graph;
    pl->t = t;
    pl->S = c->stages;
    pl->NR = NR;
    pl->NRL = t ? 1 : NR;
    pl->share = c->batch / NR;
    pl->micro = pl->share / c->micro_batches;
    pl->grad_groups = K;
    pl->steps_per_epoch = c->train->n / c->batch;
    pl->sampler_epoch = -1;
    pl->generation = atomic_fetch_add(&generations, 1) + 1;
    pw_status st;
    const pw_graph *g = c->graph;
    const int S = c->stages;

    PW_CHECK_GOTO(pw_sampler_init(&pl->sampler, c->train->n, c->shuffle, c->seed), st, fail);
    if (T > 1) {
        if (!(pl->rank_g = calloc((size_t)T, sizeof *pl->rank_g))) {
            st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
            goto fail;
        }
        for (int k = 0; k < T; k++) PW_CHECK_GOTO(pw_graph_tp_rank(g, T, k, &pl->rank_g[k]), st, fail);
    }
    PW_CHECK_GOTO(make_schedule(pl), st, fail);
    pl->cfg.schedule_csv = NULL; /* the caller's string; pl->schedule_name keeps a copy */
    pl->V = pl->sched->chunks_per_rank;
    pl->C = pl->sched->n_chunks;
    if (pl->C > g->n_nodes) {
        st = pw_error(PW_ERR_INVALID_ARG, "pipeline: %d chunks (%d stages x %d chunks per rank) but graph "
                      "'%s' has only %d nodes", pl->C, S, pl->V, g->name, g->n_nodes);
        goto fail;
    }
    PW_CHECK_GOTO(make_partition(pl), st, fail);
    PW_CHECK_GOTO(retime_zb_auto(pl), st, fail);
    pl->cfg.cuts = NULL; /* the caller's array; pl->part keeps a copy */
    pl->post_optim = ties_across_chunks(pl);
    if (c->overlap_steps < 0 || c->overlap_steps > 64) {
        st = pw_error(PW_ERR_INVALID_ARG, "pipeline: overlap_steps must be 0..64 (got %d)", c->overlap_steps);
        goto fail;
    }
    if (t && c->overlap_steps > 1) {
        st = pw_error(PW_ERR_UNSUPPORTED, "pipeline: overlap_steps runs in one process only (this run "
                      "has %d processes)", t->world_size);
        goto fail;
    }
    /* Tied parameters are summed and stepped after the engine's step
     * (finish_step): every step needs the barrier. */
    pl->K = c->overlap_steps > 1 && !pl->post_optim ? c->overlap_steps : 1;
    if (t && pl->post_optim && g->n_params >= t->max_tag) {
        /* finish_step's messages are tagged by parameter (and n_params). */
        st = pw_error(PW_ERR_UNSUPPORTED, "pipeline: graph '%s' ties parameters across stages; summing "
                      "its %d parameters across processes needs more message tags than MPI's %d", g->name,
                      g->n_params, t->max_tag);
        goto fail;
    }
    pl->grad_norm = -1.0;
    pl->stages = calloc((size_t)pl->NRL * (size_t)pl->C, sizeof *pl->stages);
    pl->chunks = calloc((size_t)pl->NRL * (size_t)pl->C, sizeof *pl->chunks);
    if (!pl->stages || !pl->chunks) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
        goto fail;
    }
    for (int k = 0; k < pl->NRL; k++)
        for (int ch = 0; ch < pl->C; ch++) {
            if (!stage_here(pl, ch)) continue;
            gstage *gs = stage_at(pl, k, ch);
            PW_CHECK_GOTO(pl_build_stage(pl, gs, ch, t ? t->replica : k), st, fail);
            pl->chunks[(size_t)k * (size_t)pl->C + (size_t)ch] = (pw_engine_chunk){pl_chunk_vt(pl), gs};
        }
    if (c->ps_servers > 0) {
        PW_CHECK_GOTO(pl_ps_create(pl), st, fail);
        const pw_stage_i *vt = pl_ps_vt(pl, pl_chunk_vt(pl));
        for (size_t i = 0; i < (size_t)pl->NRL * (size_t)pl->C; i++)
            if (pl->chunks[i].vt) pl->chunks[i].vt = vt;
    } else if (c->ps_staleness != 0) {
        st = pw_error(PW_ERR_INVALID_ARG, "pipeline: a staleness (%d) applies to a parameter server only",
                      c->ps_staleness);
        goto fail;
    }
    const char **gpu_pci = c->pin ? pl_worker_gpu_pci(pl) : NULL;
    if (c->pin) pl_bind_stage_memory(pl, gpu_pci);
    /* By default one core per worker: more kernel threads would only fight
     * the other stages and replicas (and every process of an MPI run has one
     * worker). Either way the bits are the same (stages/ops/cpu/gemm.h). */
    if (c->threads > 0) pw_cpu_set_threads(c->threads);
    else if (S * pl->NRL * T > 1 || t) pw_cpu_set_threads(1);
    if (adopt) pl->trace = adopt;
    else if (c->trace_events > 0 && (st = pw_trace_create(S * NR, c->trace_events, &pl->trace)) != PW_OK) {
        free(gpu_pci);
        goto fail;
    }
    if (t && T > 1) pw_trace_set_pid(pl->trace, t->tp_rank); /* the T processes of a stage apart */
    pw_engine_config ec = {
        .schedule = pl->sched, .report = pl->rep, .chunks = pl->chunks,
        .watchdog_s = c->watchdog_s, .pin = c->pin, .trace = pl->trace, .check = c->check,
        .replicas = NR, .transport = pl->ps ? pl_ps_transport(pl) : t, .link = c->link,
        /* With ties across chunks the norm is taken after their sum (finish_step). */
        .clip_grad_norm = pl->post_optim || pl->ps ? 0.0 : c->clip_grad_norm, /* --sync ps: the server clips */
        .post_validate = c->post_validate,
        .overlap_steps = pl->K > 1,
        .gpu_pci = gpu_pci,
        .compress = &c->compress,
    };
    {
        const pw_backend_i *be;
        int idx;
        if (pw_backend_find(c->device, &be, &idx) == PW_OK && be->device_memory)
            ec.span_mem = be->span_memory; /* the replicas' gradients are there */
    }
    if (pl_messages_on_device(pl)) {
        ec.msg_alloc = pl_msgs_alloc;
        ec.msg_free = pl_msgs_free;
        ec.msg_arg = pl;
    }
    st = pw_engine_create(&ec, &pl->engine);
    free(gpu_pci);
    if (st != PW_OK) goto fail;
    if (pl->ps) PW_CHECK_GOTO(pl_ps_start(pl), st, fail);
    pl_pin_messages(pl);
    *out = pl;
    return PW_OK;
fail:
    if (adopt) pl->trace = NULL; /* still the caller's */
    pw_pipeline_destroy(pl);
    return st;
}

void pw_pipeline_destroy(pw_pipeline *pl)
{
    if (!pl) return;
    pl_ps_destroy(pl);
    if (pl->msg_pinned) pl->msg_backend->host_unregister(pl->msg_pinned);
    pw_engine_destroy(pl->engine);
    for (size_t i = 0; pl->stages && i < (size_t)pl->NRL * (size_t)pl->C; i++) pl_free_stage(&pl->stages[i]);
    free(pl->stages);
    free(pl->chunks);
    pw_trace_destroy(pl->trace);
    pw_schedule_report_destroy(pl->rep);
    pw_schedule_destroy(pl->sched);
    pw_partition_free(&pl->part);
    pw_sampler_free(&pl->sampler);
    for (int k = 0; pl->rank_g && k < pl->T; k++) pw_graph_destroy(pl->rank_g[k]);
    free(pl->rank_g);
    free(pl->schedule_name);
    free(pl);
}

int pw_pipeline_tensor_parallel(const pw_pipeline *pl) { return pl->T; }

pw_status pw_pipeline_data_parts(const pw_pipeline_config *cfg, int evaluation, unsigned *parts)
{
    *parts = PW_DATA_ALL;
    const pw_transport *t = cfg->transport;
    if (!t) return PW_OK; /* every chunk runs in this process */
    if (evaluation && t->replica != 0) {
        *parts = 0; /* evaluation runs on replica 0 */
        return PW_OK;
    }
    if (!cfg->graph) return pw_error(PW_ERR_INVALID_ARG, "pipeline: graph is required");
    if (cfg->stages < 1 || cfg->micro_batches < 1)
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: %d stages and %d micro-batches (each must be at "
                        "least 1)", cfg->stages, cfg->micro_batches);
    /* The chunks and their placement, as pw_pipeline_create computes them. */
    pw_pipeline *pl = calloc(1, sizeof *pl);
    if (!pl) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    pl->cfg = *cfg;
    pl->g = cfg->graph;
    pl->t = t;
    pl->S = cfg->stages;
    pl->NR = cfg->replicas > 0 ? cfg->replicas : 1;
    pw_status st = make_schedule(pl);
    if (st == PW_OK) {
        pl->V = pl->sched->chunks_per_rank;
        pl->C = pl->sched->n_chunks;
        st = pl->C > pl->g->n_nodes
                 ? pw_error(PW_ERR_INVALID_ARG, "pipeline: %d chunks (%d stages x %d chunks per rank) but "
                            "graph '%s' has only %d nodes", pl->C, pl->S, pl->V, pl->g->name, pl->g->n_nodes)
                 : make_partition(pl);
    }
    if (st == PW_OK) {
        const pw_graph *g = pl->g;
        unsigned p = 0;
        for (int ch = 0; ch < pl->C; ch++) {
            if (pw_schedule_rank_of(pl->sched, ch) != t->rank) continue;
            if (pl_node_range_reads(g, pl->part.begin[ch], pl->part.begin[ch + 1], g->input)) p |= PW_DATA_INPUTS;
            if (pl_node_range_reads(g, pl->part.begin[ch], pl->part.begin[ch + 1], g->label)) p |= PW_DATA_LABELS;
        }
        *parts = p;
    }
    pl->cfg.schedule_csv = NULL;
    pl->cfg.cuts = NULL;
    pw_pipeline_destroy(pl);
    return st;
}

int64_t pw_pipeline_steps_per_epoch(const pw_pipeline *pl) { return pl->steps_per_epoch; }
void pw_pipeline_seek(pw_pipeline *pl, int64_t step) { pl->step = step; }

/* The engine workers of this process: their busy time summed, the longest
 * step time in *total_max. */
static double busy_sum(const pw_pipeline *pl, double *total_max, int *n_workers)
{
    double busy = 0.0, tmax = 0.0;
    int n = 0;
    for (int k = 0; k < pl->NR; k++)
        for (int r = 0; r < pl->S; r++) {
            if (lrep_of(pl, k) < 0 || !rank_here(pl, r)) continue;
            pw_engine_rank_stats rs;
            pw_engine_rank_stats_get(pl->engine, k * pl->S + r, &rs);
            busy += rs.busy_s;
            if (rs.total_s > tmax) tmax = rs.total_s;
            n++;
        }
    *total_max = tmax;
    *n_workers = n;
    return busy;
}

loss_part pl_replica_loss(const pw_pipeline *pl, int lrep, int j)
{
    loss_part lp = {0};
    for (int s = 0; s < pl->C; s++) {
        const gstage *gs = &pl->stages[(size_t)lrep * (size_t)pl->C + (size_t)s];
        if (!gs->piece || gs->loss_piece < 0) continue;
        lp.has = 1;
        lp.loss = 0.0;
        lp.correct = 0;
        const int M = pl->cfg.micro_batches;
        for (int m = 0; m < M; m++) {
            lp.loss += gs->mb_loss[j * M + m];
            lp.correct += gs->mb_correct[j * M + m];
        }
    }
    return lp;
}


/* Tensor parallelism in one process: the squared global norm of replica
 * k's gradients here, chunk by chunk, each parameter once (seen[graph
 * parameter], zeroed by the caller: a tie counts once) in pl_tp_sumsq's
 * order. The gradients are folded. */
static pw_status tp_sumsq(pw_pipeline *pl, int k, unsigned char *seen, float **tmp, double *sumsq)
{
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        gstage *gs = stage_at(pl, k, ch);
        PW_CHECK(pl_tp_sumsq(gs, seen, tmp, sumsq));
        for (int i = 0; i < pw_program_n_params(gs->rank_prog[0]); i++) {
            pw_program_param pp;
            pw_program_param_at(gs->rank_prog[0], i, &pp);
            seen[pp.graph_param] = 1;
        }
    }
    return PW_OK;
}

static pw_status finish_step(pw_pipeline *pl, int64_t step)
{
    const pw_graph *g = pl->g;
    int total = 0;
    for (int ch = 0; ch < pl->C; ch++) total += stage_here(pl, ch) ? stage_at(pl, 0, ch)->n_pieces : 0;
    pw_program **p = malloc((size_t)(total > 0 ? total : 1) * sizeof *p);
    unsigned char *seen = calloc((size_t)(g->n_params > 0 ? g->n_params : 1), 1);
    float *tmp = NULL; /* a device program's gradient, for clipping */
    pw_status st = PW_OK;
    if (!p || !seen) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
        goto out;
    }
    for (int k = 0; k < pl->NRL && st == PW_OK; k++) {
        /* Tensor parallelism: each rank's parts summed with the same rank's
         * in the other chunks; with clipping, stepped after the norm. */
        const int clip = pl->cfg.clip_grad_norm > 0;
        for (int r = 1; r < pl->TL; r++) {
            int nr = pl_replica_rank_programs(pl, k, r, p);
            PW_CHECK_GOTO(pl_sum_ties(pl->rank_g[r], p, nr), st, out);
            for (int j = 0; j < nr && !clip; j++) PW_CHECK_GOTO(pw_program_optimizer_step(p[j], (long)step), st, out);
        }
        int np = pl_replica_programs(pl, k, p);
        PW_CHECK_GOTO(pl->t ? pl_sum_ties_across(pl) : pl_sum_ties(pl->T > 1 ? pl->rank_g[0] : g, p, np), st, out);
        if (clip) {
            /* Every parameter once, in node order (copies hold the same total). */
            double sumsq = 0.0;
            memset(seen, 0, (size_t)g->n_params);
            if (pl->t) PW_CHECK_GOTO(pl_sumsq_across(pl, &sumsq), st, out);
            else if (pl->T > 1) PW_CHECK_GOTO(tp_sumsq(pl, k, seen, &tmp, &sumsq), st, out);
            for (int j = 0; j < np && !pl->t && pl->T == 1; j++) {
                pw_program_fold_grads(p[j]);
                for (int i = 0; i < pw_program_n_params(p[j]); i++) {
                    pw_program_param pp;
                    pw_program_param_at(p[j], i, &pp);
                    if (seen[pp.graph_param]) continue;
                    seen[pp.graph_param] = 1;
                    float *gr;
                    PW_CHECK_GOTO(pl_host_grad(p[j], i, &pp, &tmp, &gr), st, out);
                    for (int64_t e = 0; e < pp.numel; e++) sumsq += (double)gr[e] * (double)gr[e];
                }
            }
            double norm = sqrt(sumsq), coef = pl->cfg.clip_grad_norm / (norm + 1e-6);
            if (k == 0) pl->grad_norm = norm;
            for (int r = pl->TL - 1; r >= 0; r--) { /* every local rank's, the first last (p holds them after) */
                np = pl_replica_rank_programs(pl, k, r, p);
                for (int j = 0; j < np && coef < 1.0; j++)
                    for (int i = 0; i < pw_program_n_params(p[j]); i++) {
                        pw_program_param pp;
                        pw_program_param_at(p[j], i, &pp);
                        float *gr;
                        PW_CHECK_GOTO(pl_host_grad(p[j], i, &pp, &tmp, &gr), st, out);
                        for (int64_t e = 0; e < pp.numel; e++) gr[e] *= (float)coef;
                        PW_CHECK_GOTO(pl_host_grad_done(p[j], i, gr), st, out);
                    }
                for (int j = 0; j < np && r > 0; j++) PW_CHECK_GOTO(pw_program_optimizer_step(p[j], (long)step), st, out);
            }
        }
        for (int j = 0; j < np; j++) {
            PW_CHECK_GOTO(pw_program_optimizer_step(p[j], (long)step), st, out);
            PW_CHECK_GOTO(pw_program_wait(p[j]), st, out); /* outside the engine: no completion */
        }
    }
out:
    free(p);
    free(seen);
    free(tmp);
    return st;
}

/* One engine run of up to n steps from pl->step + 1, all in one epoch;
 * *n_done of them stand (fewer when post-validation discarded one), each
 * with its stats in out[j] (optional). */
static pw_status run_steps(pw_pipeline *pl, int n, pw_step_stats *out, int *n_done)
{
    *n_done = 0;
    const int64_t epoch = pl->step / pl->steps_per_epoch;
    const int64_t in_epoch = pl->step % pl->steps_per_epoch;
    if (epoch != pl->sampler_epoch) {
        pw_sampler_epoch(&pl->sampler, (int)epoch);
        pl->sampler_epoch = epoch;
    }
    pl->batch_idx = pl->sampler.order + in_epoch * pl->cfg.batch;
    pl->run_first = pl->step + 1;
    if (pl->ps) PW_CHECK(pl_ps_begin(pl)); /* the first: the parameters to the servers */
    pw_transport_phase(pl->t, PW_PHASE_STEP, pl->step + 1); /* the other processes' watchdogs read it */
    double t0_busy, t0_wall, t1_wall;
    int nw, done = 1;
    t0_busy = busy_sum(pl, &t0_wall, &nw);
    int64_t t0 = pw_now_ns();
    if (n > 1) PW_CHECK(pw_engine_run_steps(pl->engine, pl->step + 1, n, &done));
    else PW_CHECK(pw_engine_run_step(pl->engine, pl->step + 1));
    if (pl->post_optim) PW_CHECK(finish_step(pl, pl->step + 1));
    int64_t t1 = pw_now_ns();
    double busy = busy_sum(pl, &t1_wall, &nw) - t0_busy;
    double wall = (double)(t1 - t0) * 1e-9;
    pl->last_bubble = wall > 0 && nw > 0 ? 1.0 - busy / ((double)nw * wall) : 0.0;
    if (pl->last_bubble < 0) pl->last_bubble = 0;

    const pw_graph *g = pl->g;
    int64_t per_sample = g->label >= 0 ? pw_shape_numel(&g->values[g->label].shape) : 1;
    int64_t positions = pl->cfg.batch * (per_sample > 0 ? per_sample : 1);
    /* With a parameter server's staleness s the processes agree on the loss
     * every s + 1 steps only (an all-gather is a barrier): the mean over
     * that window, reported until the next (docs/distributed.md). */
    const int window = pl->ps ? pl->cfg.ps_staleness + 1 : 1;
    for (int j = 0; j < done; j++) {
        /* Loss of the step: each replica's sum in micro-batch order, then
         * the replicas in order (the same bytes in one process or many). */
        double loss = 0.0;
        int64_t correct = 0, steps = 1;
        if (pl->t && (pl->step + 1) % window != 0) {
            const loss_part lp = pl_replica_loss(pl, 0, j);
            pl->win.loss += lp.loss;
            pl->win.correct += lp.correct;
            pl->win_steps++;
            loss = pl->win_last_loss;
            correct = pl->win_last_correct;
            steps = 0;
        } else if (pl->t) {
            const int W = pl->t->world_size;
            loss_part mine = pl_replica_loss(pl, 0, j);
            mine.loss += pl->win.loss;
            mine.correct += pl->win.correct;
            steps = pl->win_steps + 1;
            pl->win = (loss_part){0};
            pl->win_steps = 0;
            loss_part *all = calloc((size_t)W, sizeof *all);
            if (!all) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
            pw_status st = pl->t->vt->allgather(pl->t->self, &mine, sizeof mine, all);
            if (st != PW_OK) {
                free(all);
                return pw_error_prefix(st, "step %lld: gathering the loss: ", (long long)pl->step + 1);
            }
            for (int k = 0; k < pl->NR; k++)
                for (int r = 0; r < pl->S; r++) {
                    const loss_part *lp = &all[pw_transport_world_of(pl->t, k, r)];
                    if (!lp->has) continue;
                    loss += lp->loss;
                    correct += lp->correct;
                }
            free(all);
        } else {
            for (int k = 0; k < pl->NR; k++) {
                loss_part lp = pl_replica_loss(pl, k, j);
                loss += lp.loss;
                correct += lp.correct;
            }
        }
        if (steps > 0) { /* a window's figures (one step's without staleness) */
            loss /= (double)steps;
            correct /= steps;
            pl->win_last_loss = loss;
            pl->win_last_correct = correct;
        }
        const int64_t ep = pl->step / pl->steps_per_epoch, in_ep = pl->step % pl->steps_per_epoch;
        pl->step++;
        (*n_done)++;
        if (out) {
            out[j].step = pl->step;
            out[j].epoch = ep;
            out[j].step_in_epoch = in_ep + 1;
            out[j].loss = loss / (double)positions;
            out[j].accuracy = (double)correct / (double)positions;
        }
    }
    return PW_OK;
}

pw_status pw_pipeline_step(pw_pipeline *pl, pw_step_stats *out)
{
    int done;
    return run_steps(pl, 1, out, &done);
}

pw_status pw_pipeline_steps(pw_pipeline *pl, int n, pw_step_stats *out)
{
    if (!pl) return pw_error(PW_ERR_INVALID_ARG, "pw_pipeline_steps: pipeline is NULL");
    if (n < 0) return pw_error(PW_ERR_INVALID_ARG, "pw_pipeline_steps: %d steps", n);
    for (int i = 0; i < n;) {
        int k = n - i < pl->K ? n - i : pl->K;
        const int64_t left = pl->steps_per_epoch - pl->step % pl->steps_per_epoch;
        if (k > left) k = (int)left;
        int done;
        PW_CHECK(run_steps(pl, k, out ? out + i : NULL, &done));
        if (done < 1) return pw_error(PW_ERR_INTERNAL, "pipeline: a run of %d steps from step %lld made no "
                                      "progress", k, (long long)pl->step + 1);
        i += done; /* >= 1: a run's first step is never the discarded one */
    }
    return PW_OK;
}

const pw_partition *pw_pipeline_partition(const pw_pipeline *pl) { return &pl->part; }
const pw_schedule *pw_pipeline_schedule(const pw_pipeline *pl) { return pl->sched; }
const pw_schedule_report *pw_pipeline_report(const pw_pipeline *pl) { return pl->rep; }
pw_engine *pw_pipeline_engine(pw_pipeline *pl) { return pl->engine; }
double pw_pipeline_last_bubble(const pw_pipeline *pl) { return pl->last_bubble; }
double pw_pipeline_grad_norm(const pw_pipeline *pl)
{
    /* --sync ps: the norm the servers sent back with the parameters */
    return pl->post_optim || pl->ps ? pl->grad_norm : pw_engine_grad_norm(pl->engine);
}
int pw_pipeline_n_chunks(const pw_pipeline *pl) { return pl->C; }
int pw_pipeline_chunks_per_rank(const pw_pipeline *pl) { return pl->V; }

pw_program *pw_pipeline_program(pw_pipeline *pl, int stage)
{
    if (stage < 0 || stage >= pl->C || !stage_here(pl, stage)) return NULL;
    gstage *gs = stage_at(pl, 0, stage);
    return gs->n_pieces > 0 ? gs->piece[0] : NULL;
}

int pw_pipeline_programs(pw_pipeline *pl, int replica, int stage, pw_program **progs, int max)
{
    int k = lrep_of(pl, replica);
    if (k < 0 || stage < 0 || stage >= pl->C || !stage_here(pl, stage)) return 0;
    gstage *gs = stage_at(pl, k, stage);
    for (int j = 0; j < gs->n_pieces && j < max; j++) progs[j] = gs->piece[j];
    return gs->n_pieces;
}

double pw_pipeline_theory_bubble(const pw_pipeline *pl)
{
    if (pl->sc.kind == PW_SCHEDULE_CUSTOM) return pl->rep->bubble;
    return pw_schedule_config_bubble(&pl->sc);
}

void pw_pipeline_stage_stats_get(const pw_pipeline *pl, int stage, pw_pipeline_stage_stats *out)
{
    memset(out, 0, sizeof *out);
    if (stage < 0 || stage >= pl->C) return;
    out->slots = pl->rep->peak_inflight_chunk[stage];
    out->node_begin = pl->part.begin[stage];
    out->node_end = pl->part.begin[stage + 1];
    out->flops = pl->part.flops[stage];
    if (!stage_here(pl, stage)) return;
    const int replica = pl->t ? pl->t->replica : 0;
    const int rank = pw_schedule_rank_of(pl->sched, stage);
    out->rank = rank;
    pw_engine_rank_stats rs;
    pw_engine_rank_stats_get(pl->engine, replica * pl->S + rank, &rs);
    out->busy_s = rs.busy_s;
    out->wait_s = rs.wait_s;
    out->total_s = rs.total_s;
    out->peak_slots = pw_engine_chunk_peak(pl->engine, stage);
    const gstage *gs = &pl->stages[stage];
    for (int j = 0; j < gs->n_pieces; j++) {
        pw_program_memory mem;
        pw_program_memory_usage(gs->piece[j], &mem);
        out->memory += mem.total;
    }
    out->memory += gs->link_bytes;
}

const struct pw_trace *pw_pipeline_trace(const pw_pipeline *pl)
{
    return pl->trace;
}

pw_status pw_pipeline_write_trace(const pw_pipeline *pl, const char *path)
{
    if (!pl->trace)
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: tracing was not enabled");
    const int S = pl->S, NR = pl->NR, C = pl->C;
    pw_trace_stage_cost costs[C];
    int *measured = calloc((size_t)S * (size_t)NR, sizeof *measured);
    int *peaks = calloc((size_t)S * (size_t)NR, sizeof *peaks);
    if (!measured || !peaks) {
        free(measured);
        free(peaks);
        return pw_error(PW_ERR_NOMEM, "trace: out of memory");
    }
    for (int s = 0; s < C; s++) {
        memset(&costs[s], 0, sizeof costs[s]);
        costs[s].node_begin = pl->part.begin[s];
        costs[s].node_end = pl->part.begin[s + 1];
        for (int i = costs[s].node_begin; i < costs[s].node_end; i++) {
            pw_op_cost c;
            if (pw_graph_node_cost(pl->g, i, &c) != PW_OK) continue;
            costs[s].flops_fwd += c.flops_fwd * (double)pl->micro;
            costs[s].flops_bwd_input += c.flops_bwd_input * (double)pl->micro;
            costs[s].flops_bwd_weight += c.flops_bwd_weight * (double)pl->micro;
            costs[s].param_bytes += c.param_bytes;
            costs[s].act_bytes += c.act_bytes * pl->micro;
        }
    }
    /* Tracks are replica-major: track k·S + r is rank r of replica k; a rank's
     * measured peak is the sum of its chunks' (an upper bound when they peak
     * at different times). */
    for (int r = 0; r < S; r++) {
        int m = 0;
        for (int ch = 0; ch < C; ch++)
            if (pw_schedule_rank_of(pl->sched, ch) == r && stage_here(pl, ch))
                m += pw_engine_chunk_peak(pl->engine, ch);
        for (int k = 0; k < NR; k++) {
            measured[k * S + r] = m;
            peaks[k * S + r] = pl->rep->peak_inflight[r];
        }
    }
    pw_trace_meta m = {
        .schedule = pl->schedule_name, .graph = pl->g->name, .n_ranks = S * NR, .n_chunks = C,
        .n_micro = pl->cfg.micro_batches, .n_replicas = NR, .micro_batch = pl->micro,
        .steps = pl->step, .theory_bubble = pw_pipeline_theory_bubble(pl),
        .peak_inflight = peaks, .measured_peak = measured, .costs = costs,
    };
    pw_status st = pw_trace_write(pl->trace, path, &m);
    free(measured);
    free(peaks);
    return st;
}
