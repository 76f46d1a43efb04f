/* pipewright — graph stages on the engine: partition, programs, schedule,
 * data-parallel replicas (in one process or one process per stage and
 * replica under MPI). */
#include "stages/train/pipeline.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"
#include "runtime/topology.h"
#include "runtime/trace.h"
#include "stages/ops/backend.h"
#include "stages/ops/cpu/ops.h"

#define DEFAULT_BUCKETS 4
/* Tags of the blocking world messages: a parameter's is its graph index,
 * evaluation's activations use the largest tag (the phases never overlap). */
#define TAG_EVAL(t) ((t)->max_tag)

/* One stage chunk of one replica: the stage's nodes cut into `n_pieces`
 * programs (one per gradient bucket; one without replicas) chained through
 * per-slot link buffers, plus the data it loads. */
typedef struct gstage {
    pw_pipeline *pl;
    int index;                /* chunk id (= stage with one chunk per rank) */
    int replica;              /* global replica index */
    int n_pieces;
    pw_program **piece;       /* [n_pieces] in node order; bucket b is piece n_pieces−1−b */
    unsigned char *reads_input, *reads_label; /* [n_pieces] */
    int loss_piece;           /* -1: no loss here */
    void *links;              /* link buffers between pieces, every slot */
    size_t link_bytes;
    double *mb_loss;          /* [M]: loss sum of each micro-batch this step */
    int64_t *mb_correct;      /* [M] */
    /* Asynchronous (a device stage of one piece; pw_program_set_async):
     * the forward whose loss is read at completion (-1: none), and the
     * engine's done for the call in flight. */
    int async;
    int loss_mb, loss_slot;
    pw_stage_done_fn done;
    void *done_arg;
} gstage;

struct pw_pipeline {
    pw_pipeline_config cfg;
    const pw_graph *g;
    const pw_transport *t;
    int S, NR, NRL;           /* ranks (stages), replicas, replicas built here */
    int V, C;                 /* chunks per rank; chunks C = S·V (graph cut into C) */
    int post_optim;           /* 1: parameters tied across chunks; the pipeline runs the
                                 optimizer after the engine's step (see finish_step) */
    double grad_norm;         /* post_optim with clipping: last norm before clipping */
    pw_schedule_config sc;    /* the generated schedule's config (kind CUSTOM for CSV) */
    int n_buckets;            /* the schedule's */
    int64_t micro;            /* samples per micro-batch */
    int grad_groups;          /* K: each replica's micro-batches are summed in K groups */
    int64_t share;            /* samples per replica per step: batch / R */
    int64_t steps_per_epoch;
    int64_t step;             /* steps done */
    pw_sampler sampler;
    int64_t sampler_epoch;
    const int64_t *batch_idx; /* this step's samples, read by the workers */

    pw_partition part;
    pw_schedule *sched;
    pw_schedule_report *rep;
    gstage *stages;           /* [NRL][C]; with a transport only this process's chunk is built */
    pw_engine_chunk *chunks;  /* [NRL][C], chunk-id order (the engine's) */
    pw_engine *engine;
    pw_trace *trace;
    double last_bubble;
    char *schedule_name;
    void *msg_pinned;               /* the engine's message block, page-locked by msg_backend */
    const pw_backend_i *msg_backend;
    const pw_backend_i *dev_msgs;   /* messages in this backend's memory on msg_device */
    int msg_device;
};

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

static gstage *stage_at(pw_pipeline *pl, int lrep, int c) { return &pl->stages[(size_t)lrep * (size_t)pl->C + (size_t)c]; }
/* Chunk c is built in this process (always in one process; under a
 * transport, the chunks the schedule places on this process's rank). */
static int stage_here(const pw_pipeline *pl, int c) { return !pl->t || pw_schedule_rank_of(pl->sched, c) == pl->t->rank; }
static int rank_here(const pw_pipeline *pl, int r) { return !pl->t || pl->t->rank == r; }
/* Under a transport: the world rank of the process running chunk c of
 * global replica k. */
static int world_of_chunk(const pw_pipeline *pl, int k, int c)
{
    return pw_transport_world_of(pl->t, k, pw_schedule_rank_of(pl->sched, c));
}
/* The local replica index of global replica k, -1 when not here. */
static int lrep_of(const pw_pipeline *pl, int k)
{
    if (pl->t) return k == pl->t->replica ? 0 : -1;
    return k >= 0 && k < pl->NR ? k : -1;
}

/* ---- one stage's pieces ---- */

/* Forward of `n` rows of samples idx[0..n) in `slot` through every piece;
 * `train` sets the dropout stream (sample_offset: the micro-batch's first
 * sample within the global batch). */
static pw_status gs_run_forward(gstage *s, const pw_dataset *d, const int64_t *idx, int64_t n, int slot,
                                int train, int64_t step, int64_t sample_offset)
{
    const pw_graph *g = s->pl->g;
    for (int j = 0; j < s->n_pieces; j++) {
        pw_program *p = s->piece[j];
        if (s->reads_input[j] || s->reads_label[j])
            PW_CHECK(pw_dataset_gather(d, idx, n, s->reads_input[j] ? pw_program_data(p, g->input, slot) : NULL,
                                       s->reads_label[j] ? pw_program_data(p, g->label, slot) : NULL));
        if (train) {
            if (pw_program_needs_rng(p))
                PW_CHECK(pw_program_set_rng(p, slot, s->pl->cfg.seed, step, sample_offset));
            PW_CHECK(pw_program_forward(p, slot, n));
        } else {
            PW_CHECK(pw_program_forward_eval(p, slot, n));
        }
    }
    return PW_OK;
}

static pw_status gs_forward(void *self, int mb, int slot)
{
    gstage *s = self;
    pw_pipeline *pl = s->pl;
    const int64_t offset = (int64_t)s->replica * pl->share + (int64_t)mb * pl->micro;
    PW_CHECK(gs_run_forward(s, pl->cfg.train, pl->batch_idx + offset, pl->micro, slot, 1, pl->step + 1,
                            offset));
    if (s->loss_piece >= 0 && s->async) { /* the statistics reach the host at completion */
        s->loss_mb = mb;
        s->loss_slot = slot;
    } else if (s->loss_piece >= 0) {
        s->mb_loss[mb] = pw_program_loss_sum(s->piece[s->loss_piece], slot);
        s->mb_correct[mb] = pw_program_correct(s->piece[s->loss_piece], slot);
    }
    return PW_OK;
}

static pw_status gs_backward_input(void *self, int mb, int slot)
{
    (void)mb;
    gstage *s = self;
    for (int j = s->n_pieces - 1; j >= 0; j--) PW_CHECK(pw_program_backward_input(s->piece[j], slot));
    return PW_OK;
}

static pw_status gs_backward_weight(void *self, int mb, int slot)
{
    (void)mb;
    gstage *s = self;
    for (int j = s->n_pieces - 1; j >= 0; j--) PW_CHECK(pw_program_backward_weight(s->piece[j], slot));
    return PW_OK;
}

/* Bucket b is piece n_pieces−1−b: the last layers first, the order the
 * backward finishes them. */
static pw_status gs_backward_bucket(void *self, int mb, int slot, int bucket, pw_bwd_part part)
{
    (void)mb;
    gstage *s = self;
    int j = s->n_pieces - 1 - bucket;
    if (j < 0) return PW_OK; /* fewer pieces than buckets: an empty bucket */
    if (part == PW_BWD_FULL) PW_CHECK(pw_program_backward_input(s->piece[j], slot));
    return pw_program_backward_weight(s->piece[j], slot);
}

static int gs_grad_bucket(void *self, int bucket, int n_buckets, pw_span *spans, int max_spans)
{
    (void)n_buckets;
    gstage *s = self;
    int j = s->n_pieces - 1 - bucket;
    if (j < 0) return 0;
    /* Every use buffer of a tied parameter is summed across the replicas
     * (the uses are folded only before the optimizer). */
    int n = 0;
    for (int i = 0; i < pw_program_n_params(s->piece[j]); i++) {
        pw_program_param pp;
        pw_program_param_at(s->piece[j], i, &pp);
        float *uses[16];
        int nu = pw_program_param_uses(s->piece[j], i, uses, 16);
        if (nu > 16) nu = 16; /* PW_ASSERT-worthy; 16 uses of one weight in one piece */
        for (int u = 0; u < nu; u++, n++)
            if (n < max_spans) spans[n] = (pw_span){uses[u], pp.numel};
    }
    return n;
}

/* Parameter i's (folded) gradient as host floats, for clipping: *out =
 * pp->grad itself for a CPU program; a device program's downloaded into
 * *tmp (grown as needed; the caller frees it). */
static pw_status host_grad(pw_program *p, int i, const pw_program_param *pp, float **tmp, float **out)
{
    *out = pp->grad;
    if (!pw_program_on_device(p)) return PW_OK;
    float *t = realloc(*tmp, (size_t)pp->numel * sizeof *t + 1);
    if (!t) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory reading the gradient of %s", pp->name);
    *tmp = *out = t;
    return pw_program_param_read(p, i, PW_PARAM_GRAD, 0, t);
}

/* After scaling a host copy: back to the device (nothing on the CPU). */
static pw_status host_grad_done(pw_program *p, int i, const float *g)
{
    return pw_program_on_device(p) ? pw_program_param_write(p, i, PW_PARAM_GRAD, g) : PW_OK;
}

static double gs_grad_sumsq(void *self)
{
    gstage *s = self;
    double sum = 0.0;
    float *tmp = NULL;
    for (int j = 0; j < s->n_pieces; j++) pw_program_fold_grads(s->piece[j]);
    for (int j = 0; j < s->n_pieces; j++)
        for (int i = 0; i < pw_program_n_params(s->piece[j]); i++) {
            pw_program_param pp;
            pw_program_param_at(s->piece[j], i, &pp);
            float *gr;
            if (host_grad(s->piece[j], i, &pp, &tmp, &gr) != PW_OK) {
                /* the norm becomes NaN: the optimizer's finiteness check stops the step */
                PW_WARN("stage %d: %s", s->index, pw_last_error());
                free(tmp);
                return NAN;
            }
            for (int64_t k = 0; k < pp.numel; k++) sum += (double)gr[k] * (double)gr[k];
        }
    free(tmp);
    return sum;
}

static void gs_scale_grads(void *self, float scale)
{
    gstage *s = self;
    float *tmp = NULL;
    for (int j = 0; j < s->n_pieces; j++) pw_program_fold_grads(s->piece[j]);
    for (int j = 0; j < s->n_pieces; j++)
        for (int i = 0; i < pw_program_n_params(s->piece[j]); i++) {
            pw_program_param pp;
            pw_program_param_at(s->piece[j], i, &pp);
            float *gr;
            pw_status st = host_grad(s->piece[j], i, &pp, &tmp, &gr);
            if (st == PW_OK)
                for (int64_t k = 0; k < pp.numel; k++) gr[k] *= scale;
            if (st != PW_OK || host_grad_done(s->piece[j], i, gr) != PW_OK)
                PW_WARN("stage %d: clipping the gradient of %s: %s", s->index, pp.name, pw_last_error());
        }
    free(tmp);
}

static pw_status gs_optimizer_step(void *self, long step)
{
    gstage *s = self;
    for (int j = 0; j < s->n_pieces; j++) PW_CHECK(pw_program_optimizer_step(s->piece[j], step));
    return PW_OK;
}

/* The program's completion (a backend thread): the forward's loss is on
 * the host now; then the engine's. */
static void gs_completed(void *arg, pw_status st, const char *msg)
{
    gstage *s = arg;
    if (s->loss_mb >= 0 && st == PW_OK) {
        s->mb_loss[s->loss_mb] = pw_program_loss_sum(s->piece[s->loss_piece], s->loss_slot);
        s->mb_correct[s->loss_mb] = pw_program_correct(s->piece[s->loss_piece], s->loss_slot);
    }
    s->loss_mb = -1;
    s->done(s->done_arg, st, msg);
}

/* An asynchronous stage has one piece (several come only with replicas,
 * which a device refuses), so its call in flight is that program's. */
static int gs_submitted(void *self, pw_stage_done_fn done, void *arg)
{
    gstage *s = self;
    if (!s->async) return 0;
    s->done = done;
    s->done_arg = arg;
    if (pw_program_submitted(s->piece[0], gs_completed, s)) return 1;
    s->loss_mb = -1;
    return 0;
}

/* The stage's inputs enter its first piece; its outputs leave its last. */
static pw_program *port_piece(const gstage *s, pw_port port)
{
    return port == PW_PORT_ACT_IN || port == PW_PORT_GRAD_IN ? s->piece[0] : s->piece[s->n_pieces - 1];
}

static size_t gs_port_bytes(void *self, pw_port port)
{
    gstage *s = self;
    return pw_program_port_bytes(port_piece(s, port), port);
}

static pw_status gs_bind(void *self, int slot, pw_port port, void *buf)
{
    gstage *s = self;
    return pw_program_bind_port(port_piece(s, port), slot, port, buf);
}

static const pw_stage_i gstage_i = {
    .name = "graph-stage",
    .forward = gs_forward,
    .backward_input = gs_backward_input,
    .backward_weight = gs_backward_weight,
    .optimizer_step = gs_optimizer_step,
    .port_bytes = gs_port_bytes,
    .bind = gs_bind,
    .grad_bucket = gs_grad_bucket,
    .backward_bucket = gs_backward_bucket,
    .grad_sumsq = gs_grad_sumsq,
    .scale_grads = gs_scale_grads,
    .submitted = gs_submitted,
};

/* The same stage without an optimizer: with parameters tied across chunks
 * the pipeline applies it after the engine's step (finish_step). */
static const pw_stage_i gstage_post_i = {
    .name = "graph-stage",
    .forward = gs_forward,
    .backward_input = gs_backward_input,
    .backward_weight = gs_backward_weight,
    .port_bytes = gs_port_bytes,
    .bind = gs_bind,
    .grad_bucket = gs_grad_bucket,
    .backward_bucket = gs_backward_bucket,
    .grad_sumsq = gs_grad_sumsq,
    .scale_grads = gs_scale_grads,
    .submitted = gs_submitted,
};

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
                                 .chunks_per_rank = c->chunks_per_rank};
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

static int node_range_reads(const pw_graph *g, int begin, int end, int value)
{
    if (value < 0) return 0;
    for (int i = begin; i < end; i++)
        for (int k = 0; k < g->nodes[i].n_inputs; k++)
            if (g->nodes[i].inputs[k] == value) return 1;
    return 0;
}

/* Cuts nodes [b, e) into at most k pieces of roughly equal parameter bytes
 * (each parameter counted at its first use in the range). A cut may not
 * separate two uses of one parameter (a tied weight keeps one gradient) and
 * every piece holds parameters. cut[0] = b < cut[1] < ... < cut[n] = e;
 * returns n. Deterministic: the same graph and k give the same pieces in
 * every process. */
static int cut_pieces(const pw_graph *g, int b, int e, int k, int *cut)
{
    cut[0] = b;
    int n = 1;
    const int len = e - b;
    int64_t *before = calloc((size_t)len + 1, sizeof *before);
    int *first = malloc((size_t)g->n_params * sizeof *first), *last = malloc((size_t)g->n_params * sizeof *last);
    if (!before || !first || !last || k <= 1) goto out;
    for (int p = 0; p < g->n_params; p++) first[p] = last[p] = -1;
    for (int i = b; i < e; i++)
        for (int q = 0; q < g->nodes[i].n_params; q++) {
            int p = g->nodes[i].params[q];
            if (first[p] < 0) first[p] = i;
            last[p] = i;
        }
    for (int i = b; i < e; i++) {
        int64_t add = 0;
        for (int q = 0; q < g->nodes[i].n_params; q++) {
            int p = g->nodes[i].params[q];
            if (first[p] == i) add += pw_shape_numel(&g->params[p].shape) * (int64_t)sizeof(float);
        }
        before[i - b + 1] = before[i - b] + add;
    }
    const int64_t total = before[len];
    int prev = b;
    for (int j = 1; j < k; j++) {
        const double target = (double)total * j / k;
        int best = -1;
        double best_d = 0;
        for (int i = prev + 1; i < e; i++) {
            int64_t at = before[i - b];
            if (at <= before[prev - b] || at >= total) continue; /* a piece without parameters */
            int ok = 1;
            for (int p = 0; p < g->n_params && ok; p++)
                if (first[p] >= 0 && first[p] < i && last[p] >= i) ok = 0;
            if (!ok) continue;
            double d = fabs((double)at - target);
            if (best < 0 || d < best_d) {
                best = i;
                best_d = d;
            }
        }
        if (best < 0) break;
        cut[n++] = best;
        prev = best;
    }
out:
    cut[n] = e;
    free(before);
    free(first);
    free(last);
    return n;
}

/* The device of chunk s: the configured one, except that a bare device
 * name with several devices ("cuda" on a machine with 4 GPUs) puts rank r's
 * chunks on device r mod the count (ARCHITECTURE.md: one rank per GPU). */
static const char *chunk_device(const pw_pipeline *pl, int s, char *buf, size_t size)
{
    const pw_backend_i *be;
    int idx;
    if (pw_backend_find(pl->cfg.device, &be, &idx) != PW_OK || idx >= 0 || !be->device_count)
        return pl->cfg.device;
    int n = be->device_count();
    if (n < 2) return pl->cfg.device;
    snprintf(buf, size, "%s:%d", be->name, pw_schedule_rank_of(pl->sched, s) % n);
    return buf;
}

static pw_status build_stage(pw_pipeline *pl, gstage *gs, int s, int replica)
{
    const pw_pipeline_config *c = &pl->cfg;
    const pw_graph *g = pl->g;
    const int b = pl->part.begin[s], e = pl->part.begin[s + 1], M = c->micro_batches;
    const int slots = pl->rep->peak_inflight_chunk[s];
    gs->pl = pl;
    gs->index = s;
    gs->replica = replica;
    gs->loss_piece = -1;
    int k = pl->NR > 1 ? pl->n_buckets : 1;
    char device[48];
    int *cut = calloc((size_t)(k > 1 ? k : 1) + 1, sizeof *cut);
    if (!cut) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    gs->n_pieces = cut_pieces(g, b, e, k, cut);
    gs->loss_mb = -1;
    gs->piece = calloc((size_t)gs->n_pieces, sizeof *gs->piece);
    gs->reads_input = calloc((size_t)gs->n_pieces, 1);
    gs->reads_label = calloc((size_t)gs->n_pieces, 1);
    gs->mb_loss = calloc((size_t)M, sizeof(double));
    gs->mb_correct = calloc((size_t)M, sizeof(int64_t));
    pw_status st = PW_OK;
    if (!gs->piece || !gs->reads_input || !gs->reads_label || !gs->mb_loss || !gs->mb_correct) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
        goto out;
    }
    for (int j = 0; j < gs->n_pieces; j++) {
        pw_program_config pc = {
            .graph = g, .node_begin = cut[j], .node_end = cut[j + 1], .micro_batch = pl->micro,
            .loss_batch = c->batch, .slots = slots, .optim = c->optim, .recompute = c->recompute,
            .device = chunk_device(pl, s, device, sizeof device), .math = c->math,
            .no_graphs = c->no_graphs, .micro_batches = M, .grad_groups = pl->grad_groups,
        };
        PW_CHECK_GOTO(pw_program_create(&pc, &gs->piece[j]), st, out);
        pw_program_init_params(gs->piece[j], c->seed);
        gs->reads_input[j] = (unsigned char)node_range_reads(g, cut[j], cut[j + 1], g->input);
        gs->reads_label[j] = (unsigned char)node_range_reads(g, cut[j], cut[j + 1], g->label);
        if (pw_program_has_loss(gs->piece[j])) gs->loss_piece = j;
    }
    /* One device piece runs asynchronously under the engine (stage.h,
     * "Asynchronous stages"); pieces chained through host links could not. */
    if (gs->n_pieces == 1) gs->async = pw_program_set_async(gs->piece[0], 1);
    /* Link buffers between pieces, one set per slot, bound once for good:
     * piece j writes its outputs straight into piece j+1's inputs. */
    if (gs->n_pieces > 1) {
        size_t per_slot = 0;
        for (int j = 0; j + 1 < gs->n_pieces; j++) {
            size_t a = pw_program_port_bytes(gs->piece[j], PW_PORT_ACT_OUT);
            size_t r = pw_program_port_bytes(gs->piece[j], PW_PORT_GRAD_OUT);
            if (a != pw_program_port_bytes(gs->piece[j + 1], PW_PORT_ACT_IN) ||
                r != pw_program_port_bytes(gs->piece[j + 1], PW_PORT_GRAD_IN)) {
                st = pw_error(PW_ERR_INTERNAL, "pipeline: stage %d pieces %d and %d disagree on their link",
                              s, j, j + 1);
                goto out;
            }
            per_slot += (a + 63) / 64 * 64 + (r + 63) / 64 * 64;
        }
        gs->link_bytes = per_slot * (size_t)slots;
        if (gs->link_bytes && posix_memalign(&gs->links, 64, gs->link_bytes) != 0) {
            gs->links = NULL;
            st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory for stage %d's link buffers", s);
            goto out;
        }
        if (gs->links) memset(gs->links, 0, gs->link_bytes);
        char *at = gs->links;
        for (int slot = 0; slot < slots; slot++)
            for (int j = 0; j + 1 < gs->n_pieces; j++) {
                size_t a = pw_program_port_bytes(gs->piece[j], PW_PORT_ACT_OUT);
                size_t r = pw_program_port_bytes(gs->piece[j], PW_PORT_GRAD_OUT);
                if (a) {
                    PW_CHECK_GOTO(pw_program_bind_port(gs->piece[j], slot, PW_PORT_ACT_OUT, at), st, out);
                    PW_CHECK_GOTO(pw_program_bind_port(gs->piece[j + 1], slot, PW_PORT_ACT_IN, at), st, out);
                    at += (a + 63) / 64 * 64;
                }
                if (r) {
                    PW_CHECK_GOTO(pw_program_bind_port(gs->piece[j], slot, PW_PORT_GRAD_OUT, at), st, out);
                    PW_CHECK_GOTO(pw_program_bind_port(gs->piece[j + 1], slot, PW_PORT_GRAD_IN, at), st, out);
                    at += (r + 63) / 64 * 64;
                }
            }
    }
out:
    free(cut);
    return st;
}

static void free_stage(gstage *gs)
{
    for (int j = 0; gs->piece && j < gs->n_pieces; j++) pw_program_destroy(gs->piece[j]);
    free(gs->piece);
    free(gs->reads_input);
    free(gs->reads_label);
    free(gs->links);
    free(gs->mb_loss);
    free(gs->mb_correct);
    memset(gs, 0, sizeof *gs);
}

/* 1 when some parameter is used by nodes of two different chunks (an
 * embedding on the first chunk tied with the head on the last). */
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

/* The chunks' node ranges: the caller's cuts (a plan's, stages/plan/plan.h) or
 * the partition method's; both get the same FLOP-model predictions. */
static pw_status make_partition(pw_pipeline *pl)
{
    const pw_pipeline_config *c = &pl->cfg;
    if (!c->cuts) return pw_partition_make(pl->g, pl->C, c->partition, &pl->part);
    if (c->n_cuts != pl->C + 1)
        return pw_error(PW_ERR_INVALID_ARG, "pipeline: %d cut boundaries given for %d chunks (want %d: "
                        "0, the first node of each later chunk, %d)", c->n_cuts, pl->C, pl->C + 1,
                        pl->g->n_nodes);
    pw_partition_config pc = {.n_stages = pl->C, .balance = PW_BALANCE_FLOPS};
    return pw_partition_evaluate(pl->g, &pc, c->cuts, &pl->part);
}

/* The PCI bus id of each worker's GPU, worker k·S + rank as the engine
 * counts them (rank r on its chunks' device, as chunk_device puts it), so
 * that the engine binds each worker near its GPU; NULL in one process
 * without a backend that knows PCI locality (the CPU), under a transport,
 * or when an id cannot be read (the engine then binds by the CPU rule).
 * Free with free(): one block, the pointers and the strings. */
static const char **worker_gpu_pci(const pw_pipeline *pl)
{
    const pw_backend_i *be;
    int idx;
    if (pl->t || pw_backend_find(pl->cfg.device, &be, &idx) != PW_OK || !be->device_pci) return NULL;
    const int NW = pl->NRL * pl->S;
    const int n = idx < 0 && be->device_count ? be->device_count() : 1;
    const char **ids = calloc((size_t)NW, sizeof *ids + 16);
    if (!ids) return NULL;
    char *text = (char *)(ids + NW);
    for (int w = 0; w < NW; w++) {
        int dev = idx >= 0 ? idx : n >= 2 ? (w % pl->S) % n : 0;
        ids[w] = text + (size_t)16 * (size_t)w;
        if (be->device_pci(dev, text + (size_t)16 * (size_t)w, 16) != PW_OK) {
            PW_WARN("pipeline: %s; workers bind by the CPU rule", pw_last_error());
            free(ids);
            return NULL;
        }
    }
    return ids;
}

/* Stage memory on its worker's NUMA node: each program's arena (and the
 * links between a stage's pieces) is bound to the node(s) of the core the
 * engine pins the stage's worker to, by the engine's own rule
 * (pw_cpu_place_pipeline: worker k·S + rank; pw_cpu_place_ranks with this
 * process's local rank under a transport; pw_cpu_place_gpus near each
 * worker's GPU when gpu_pci is given and the GPUs are in the topology).
 * One NUMA node: nothing to do (said at PW_DEBUG=INFO).
 * A refusal warns once (pw_mem_bind_area) and leaves the rest unbound. */
static void bind_stage_memory(pw_pipeline *pl, const char *const *gpu_pci)
{
    const pw_transport *t = pl->t;
    hwloc_topology_t topo = NULL;
    pw_cpu_placement *place = NULL;
    if (!t && gpu_pci) {
        /* Host memory of GPU stages (messages, links) near the GPU's cores. */
        if (pw_topology_load_spec("this", &topo) != PW_OK) return;
        if (pw_cpu_place_gpus(topo, pl->NRL * pl->S, gpu_pci, &place) != PW_OK) {
            hwloc_topology_destroy(topo); /* the engine says why, once */
            topo = NULL;
        }
    }
    if (!topo && pw_topology_load(&topo) != PW_OK) return; /* the engine warns about pinning */
    if (hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE) < 2) {
        PW_INFO(PW_SUB_MEM, "pipeline: one NUMA node; stage memory is not bound");
        goto out;
    }
    int n = pl->NRL * pl->S, first = 0;
    /* As the engine places this process's worker (one rule for both). A
     * process mpirun or taskset has bound keeps its binding: its memory
     * follows it by first touch. */
    if (t && pw_transport_host_place(t, topo, &first, &n)) {
        PW_INFO(PW_SUB_MEM, "pipeline: this process is already bound (mpirun or taskset); its stage memory "
                "follows that binding");
        goto out;
    }
    if (!place &&
        (t ? pw_cpu_place_ranks(topo, n, &place) : pw_cpu_place_pipeline(topo, pl->S, pl->NRL, &place)) != PW_OK)
        goto out;
    for (int k = 0; k < pl->NRL; k++)
        for (int ch = 0; ch < pl->C; ch++) {
            if (!stage_here(pl, ch)) continue;
            const int slot = t ? first : k * pl->S + pw_schedule_rank_of(pl->sched, ch);
            gstage *gs = stage_at(pl, k, ch);
            char who[64];
            snprintf(who, sizeof who, "stage %d (replica %d) memory", ch, t ? t->replica : k);
            for (int j = 0; j < gs->n_pieces; j++)
                if (pw_program_bind_memory(gs->piece[j], topo, place->nodesets[slot], who) != 0) goto out;
            if (pw_mem_bind_area(topo, gs->links, gs->link_bytes, place->nodesets[slot], who) != 0) goto out;
        }
out:
    pw_cpu_placement_destroy(place);
    if (topo) hwloc_topology_destroy(topo);
}

/* Whether every chunk of this process computes on one device of a backend
 * that can hold the messages (stages/ops/backend.h, message_alloc): then they
 * live there and a hand-over between stages never crosses to the host. */
static int messages_on_device(pw_pipeline *pl)
{
    const pw_backend_i *be;
    int idx, dev = -1;
    if (pl->t || pw_backend_find(pl->cfg.device, &be, &idx) != PW_OK || !be->message_alloc)
        return 0;
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        char buf[64];
        const pw_backend_i *b;
        int i;
        if (pw_backend_find(chunk_device(pl, ch, buf, sizeof buf), &b, &i) != PW_OK || b != be) return 0;
        if (i < 0) i = 0;
        if (dev >= 0 && i != dev) return 0;
        dev = i;
    }
    pl->dev_msgs = be;
    pl->msg_device = dev < 0 ? 0 : dev;
    return 1;
}

static pw_status msgs_alloc(void *arg, size_t bytes, void **base)
{
    pw_pipeline *pl = arg;
    return pl->dev_msgs->message_alloc(pl->msg_device, bytes, base);
}

static void msgs_free(void *arg, void *base) { ((pw_pipeline *)arg)->dev_msgs->message_free(base); }

/* A device pipeline page-locks the engine's message buffers once: the
 * programs download what they send into them and upload what they receive
 * from them, and from pageable memory a download waits for the device
 * (the worker would block inside every action that sends). A refusal
 * leaves them pageable: slower, still correct. */
static void pin_messages(pw_pipeline *pl)
{
    const pw_backend_i *be;
    int idx;
    if (pw_backend_find(pl->cfg.device, &be, &idx) != PW_OK || !be->host_register) return;
    void *base;
    size_t bytes;
    pw_engine_message_memory(pl->engine, &base, &bytes);
    if (!bytes) return;
    if (be->host_register(base, bytes) != PW_OK) {
        PW_WARN("pipeline: message buffers (%zu bytes) stay pageable: %s", bytes, pw_last_error());
        return;
    }
    pl->msg_pinned = base;
    pl->msg_backend = be;
}

/* A device backend (CUDA) runs the stage programs; what the pipeline does
 * with gradients on the host between processes or replicas (the all-reduce,
 * the processes' messages) is not wired to device memory yet: refused up
 * front. (Clipping and tied gradients go through host copies.) */
static pw_status check_device(const pw_pipeline_config *c, int NR)
{
    const pw_backend_i *be;
    int dev;
    PW_CHECK(pw_backend_find(c->device, &be, &dev));
    if (!be->device_memory) return PW_OK;
    const char *no = c->transport ? "several processes (MPI; the NCCL transport is not written yet)"
                     : NR > 1 && !be->span_memory ? "--replicas > 1 (its all-reduce cannot reach the gradients)"
                     : NULL;
    if (no)
        return pw_error(PW_ERR_UNSUPPORTED, "device '%s': %s is not supported on %s yet (docs/cuda.md)",
                        c->device, no, be->name);
    return PW_OK;
}

pw_status pw_pipeline_create(const pw_pipeline_config *cfg, pw_pipeline **out)
{
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
    PW_CHECK(check_device(c, NR));
    int K;
    if (pw_grad_groups(c->grad_groups, NR, c->micro_batches, &K) < 0)
        return pw_error(PW_ERR_INVALID_ARG, "gradient groups %d: must be a power of two dividing the "
                        "%d micro-batches of a step (%d replicas x %d)", c->grad_groups,
                        NR * c->micro_batches, NR, c->micro_batches);

    pw_pipeline *pl = calloc(1, sizeof *pl);
    if (!pl) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    pl->cfg = *c;
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
    pw_status st;
    const pw_graph *g = c->graph;
    const int S = c->stages;

    PW_CHECK_GOTO(pw_sampler_init(&pl->sampler, c->train->n, c->shuffle, c->seed), st, fail);
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
    pl->cfg.cuts = NULL; /* the caller's array; pl->part keeps a copy */
    pl->post_optim = ties_across_chunks(pl);
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
            PW_CHECK_GOTO(build_stage(pl, gs, ch, t ? t->replica : k), st, fail);
            pl->chunks[(size_t)k * (size_t)pl->C + (size_t)ch] =
                (pw_engine_chunk){pl->post_optim ? &gstage_post_i : &gstage_i, gs};
        }
    const char **gpu_pci = c->pin ? worker_gpu_pci(pl) : NULL;
    if (c->pin) bind_stage_memory(pl, gpu_pci);
    /* By default one core per worker: more kernel threads would only fight
     * the other stages and replicas (and every process of an MPI run has one
     * worker). Either way the bits are the same (stages/ops/cpu/gemm.h). */
    if (c->threads > 0) pw_cpu_set_threads(c->threads);
    else if (S * pl->NRL > 1 || t) pw_cpu_set_threads(1);
    if (c->trace_events > 0 && (st = pw_trace_create(S * NR, c->trace_events, &pl->trace)) != PW_OK) {
        free(gpu_pci);
        goto fail;
    }
    pw_engine_config ec = {
        .schedule = pl->sched, .report = pl->rep, .chunks = pl->chunks,
        .watchdog_s = c->watchdog_s, .pin = c->pin, .trace = pl->trace, .check = c->check,
        .replicas = NR, .transport = t,
        /* With ties across chunks the norm is taken after their sum (finish_step). */
        .clip_grad_norm = pl->post_optim ? 0.0 : c->clip_grad_norm,
        .gpu_pci = gpu_pci,
    };
    {
        const pw_backend_i *be;
        int idx;
        if (pw_backend_find(c->device, &be, &idx) == PW_OK && be->device_memory)
            ec.span_mem = be->span_memory; /* the replicas' gradients are there */
    }
    if (messages_on_device(pl)) {
        ec.msg_alloc = msgs_alloc;
        ec.msg_free = msgs_free;
        ec.msg_arg = pl;
    }
    st = pw_engine_create(&ec, &pl->engine);
    free(gpu_pci);
    if (st != PW_OK) goto fail;
    pin_messages(pl);
    *out = pl;
    return PW_OK;
fail:
    pw_pipeline_destroy(pl);
    return st;
}

void pw_pipeline_destroy(pw_pipeline *pl)
{
    if (!pl) return;
    if (pl->msg_pinned) pl->msg_backend->host_unregister(pl->msg_pinned);
    pw_engine_destroy(pl->engine);
    for (size_t i = 0; pl->stages && i < (size_t)pl->NRL * (size_t)pl->C; i++) free_stage(&pl->stages[i]);
    free(pl->stages);
    free(pl->chunks);
    pw_trace_destroy(pl->trace);
    pw_schedule_report_destroy(pl->rep);
    pw_schedule_destroy(pl->sched);
    pw_partition_free(&pl->part);
    pw_sampler_free(&pl->sampler);
    free(pl->schedule_name);
    free(pl);
}

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
            if (node_range_reads(g, pl->part.begin[ch], pl->part.begin[ch + 1], g->input)) p |= PW_DATA_INPUTS;
            if (node_range_reads(g, pl->part.begin[ch], pl->part.begin[ch + 1], g->label)) p |= PW_DATA_LABELS;
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

/* Loss and correct count of one replica's loss stage this step, summed in
 * micro-batch order. */
typedef struct loss_part {
    double loss;
    int64_t correct;
    int32_t has;
    int32_t pad;
} loss_part;

static loss_part replica_loss(const pw_pipeline *pl, int lrep)
{
    loss_part lp = {0};
    for (int s = 0; s < pl->C; s++) {
        const gstage *gs = &pl->stages[(size_t)lrep * (size_t)pl->C + (size_t)s];
        if (!gs->piece || gs->loss_piece < 0) continue;
        lp.has = 1;
        lp.loss = 0.0;
        lp.correct = 0;
        for (int m = 0; m < pl->cfg.micro_batches; m++) {
            lp.loss += gs->mb_loss[m];
            lp.correct += gs->mb_correct[m];
        }
    }
    return lp;
}

/* ---- parameters tied across chunks ----
 *
 * Design. A tied parameter's gradient is defined (stages/program/program.h) as the
 * sum of all its uses in reverse node order over the whole graph. Its uses
 * sit in different chunks, which run on different engine workers
 * concurrently, and the engine's OPTIM is per rank: no worker can know when
 * the other ranks' backwards are done. So when the graph has such a tie the
 * chunks get a stage vtable without optimizer_step (gstage_post_i), the
 * engine only runs F/B/W and the replica all-reduces (it sums every use
 * buffer across replicas: gs_grad_bucket), and after pw_engine_run_step has
 * returned — every worker idle, every backward of the step done — this
 * thread, for each replica: sums the uses across chunks in reverse node
 * order (chunks last to first, pieces last to first, each program's uses as
 * pw_program_param_uses lists them), writes the total into every copy,
 * optionally clips by the global norm (each tied parameter counted once),
 * and runs every program's optimizer. Every copy sees the same gradient and
 * the same optimizer state, so copies never drift, and the bytes match one
 * stage. Replicas: the cross-replica sum happens first (per use), then the
 * cross-chunk sum. Multi-process runs pass the partial sums between the
 * chunks' processes in the same order (sum_ties_across below). */

/* The programs of local replica k in node order; returns the count. */
static int replica_programs(pw_pipeline *pl, int k, pw_program **out)
{
    int n = 0;
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        gstage *gs = stage_at(pl, k, ch);
        for (int j = 0; j < gs->n_pieces; j++) out[n++] = gs->piece[j];
    }
    return n;
}

static pw_status sum_ties(const pw_graph *g, pw_program **p, int np)
{
    int *where = malloc((size_t)np * sizeof *where), *local = malloc((size_t)np * sizeof *local);
    float *acc = NULL, *host = NULL; /* host: a device program's use, downloaded */
    pw_status st = PW_OK;
    if (!where || !local) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
        goto out;
    }
    for (int gp = 0; gp < g->n_params; gp++) {
        int n = 0;
        for (int s = 0; s < np; s++)
            for (int i = 0; i < pw_program_n_params(p[s]); i++) {
                pw_program_param pp;
                pw_program_param_at(p[s], i, &pp);
                if (pp.graph_param == gp) {
                    where[n] = s;
                    local[n++] = i;
                    break;
                }
            }
        if (n < 2) continue; /* held by one program: its optimizer folds it */
        const int64_t numel = pw_shape_numel(&g->params[gp].shape);
        float *a = realloc(acc, (size_t)numel * sizeof *acc);
        if (!a) {
            st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
            goto out;
        }
        acc = a;
        int first = 1;
        for (int k = n - 1; k >= 0; k--) {
            float *bufs[16];
            int uses = pw_program_param_uses(p[where[k]], local[k], bufs, 16);
            if (uses < 1 || uses > 16) {
                st = pw_error(PW_ERR_INTERNAL, "pipeline: parameter %s has %d uses in one program",
                              g->params[gp].name, uses);
                goto out;
            }
            for (int u = 0; u < uses; u++) {
                if (pw_program_on_device(p[where[k]])) { /* a host copy of the use, then the same sum */
                    float *h = realloc(host, (size_t)numel * sizeof *host);
                    if (!h) {
                        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
                        goto out;
                    }
                    host = h;
                    PW_CHECK_GOTO(pw_program_param_read(p[where[k]], local[k], PW_PARAM_GRAD, u, host), st, out);
                    bufs[u] = host;
                }
                if (first) memcpy(acc, bufs[u], (size_t)numel * sizeof *acc);
                else
                    for (int64_t j = 0; j < numel; j++) acc[j] += bufs[u][j];
                first = 0;
            }
        }
        for (int k = 0; k < n; k++) {
            pw_program_param pp;
            pw_program_fold_grads(p[where[k]]);
            pw_program_param_at(p[where[k]], local[k], &pp);
            if (pw_program_on_device(p[where[k]]))
                PW_CHECK_GOTO(pw_program_param_write(p[where[k]], local[k], PW_PARAM_GRAD, acc), st, out);
            else
                memcpy(pp.grad, acc, (size_t)numel * sizeof *acc);
        }
    }
out:
    free(where);
    free(local);
    free(acc);
    free(host);
    return st;
}

/* ---- the same across processes (a transport) ----
 *
 * Each process holds the chunks of its rank, so a tied parameter's uses sit
 * in several processes of the replica. The sum keeps the one-process order
 * by passing the partial sum along: the process of the last chunk using the
 * parameter starts it, each process holding an earlier use receives it,
 * adds its uses (pw_program_param_uses order) and passes it on, down to the
 * first chunk's process (the owner), which sends the total to every other
 * process holding a use. The squared norm for clipping travels the same way
 * through the chunks in order. Every message is a blocking world send or
 * receive on this thread between the engine's step and the optimizer, and
 * every process walks the parameters and chunks in the same order, so each
 * send meets its receive: no deadlock, and the bytes of one process. */

/* Chunks whose nodes use graph parameter gp, ascending; returns the count. */
static int chunks_using(const pw_pipeline *pl, int gp, int *out)
{
    const pw_graph *g = pl->g;
    int n = 0;
    for (int ch = 0; ch < pl->C; ch++) {
        int uses = 0;
        for (int i = pl->part.begin[ch]; i < pl->part.begin[ch + 1] && !uses; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++) uses |= g->nodes[i].params[q] == gp;
        if (uses) out[n++] = ch;
    }
    return n;
}

/* The piece of local chunk ch holding graph parameter gp (one: cut_pieces
 * never separates two uses), and the parameter's index there. */
static pw_program *chunk_param(pw_pipeline *pl, int ch, int gp, int *local)
{
    gstage *gs = stage_at(pl, 0, ch);
    for (int j = 0; j < gs->n_pieces; j++)
        for (int i = 0; i < pw_program_n_params(gs->piece[j]); i++) {
            pw_program_param pp;
            pw_program_param_at(gs->piece[j], i, &pp);
            if (pp.graph_param == gp) {
                *local = i;
                return gs->piece[j];
            }
        }
    return NULL;
}

static pw_status sum_ties_across(pw_pipeline *pl)
{
    const pw_graph *g = pl->g;
    const pw_transport *t = pl->t;
    const int me = t->rank, k = t->replica;
    int *list = malloc((size_t)pl->C * sizeof *list);
    float *acc = NULL;
    pw_status st = PW_OK;
    if (!list) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
    for (int gp = 0; gp < g->n_params && st == PW_OK; gp++) {
        const int nc = chunks_using(pl, gp, list);
        if (nc < 2) continue; /* held by one chunk: its optimizer folds it */
        const int64_t numel = pw_shape_numel(&g->params[gp].shape);
        const size_t bytes = (size_t)numel * sizeof *acc;
        float *a = realloc(acc, bytes ? bytes : sizeof *acc);
        if (!a) {
            st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
            break;
        }
        acc = a;
        /* Last use to first; the partial sum follows the chunks' ranks. */
        int prev = -1;
        for (int i = nc - 1; i >= 0 && st == PW_OK; i--) {
            const int ch = list[i], r = pw_schedule_rank_of(pl->sched, ch);
            if (prev >= 0 && prev != r) {
                if (prev == me) st = t->vt->send(t->self, pw_transport_world_of(t, k, r), gp, acc, bytes);
                else if (r == me) st = t->vt->recv(t->self, pw_transport_world_of(t, k, prev), gp, acc, bytes);
            }
            prev = r;
            if (st != PW_OK || r != me) continue;
            int li = 0;
            pw_program *p = chunk_param(pl, ch, gp, &li);
            float *bufs[16];
            int uses = p ? pw_program_param_uses(p, li, bufs, 16) : 0;
            if (uses < 1 || uses > 16) {
                st = pw_error(PW_ERR_INTERNAL, "pipeline: parameter %s has %d uses in chunk %d",
                              g->params[gp].name, uses, ch);
                break;
            }
            for (int u = 0; u < uses; u++) {
                if (i == nc - 1 && u == 0) memcpy(acc, bufs[u], bytes);
                else
                    for (int64_t j = 0; j < numel; j++) acc[j] += bufs[u][j];
            }
        }
        /* The owner (first use) sends the total to the other holders, in
         * rank order. */
        const int owner = pw_schedule_rank_of(pl->sched, list[0]);
        for (int r = 0; r < pl->S && st == PW_OK; r++) {
            int holds = 0;
            for (int i = 1; i < nc; i++) holds |= pw_schedule_rank_of(pl->sched, list[i]) == r;
            if (r == owner || !holds) continue;
            if (me == owner) st = t->vt->send(t->self, pw_transport_world_of(t, k, r), gp, acc, bytes);
            else if (me == r) st = t->vt->recv(t->self, pw_transport_world_of(t, k, owner), gp, acc, bytes);
        }
        for (int i = 0; i < nc && st == PW_OK; i++) {
            if (pw_schedule_rank_of(pl->sched, list[i]) != me) continue;
            int li = 0;
            pw_program *p = chunk_param(pl, list[i], gp, &li);
            pw_program_param pp;
            pw_program_fold_grads(p);
            pw_program_param_at(p, li, &pp);
            memcpy(pp.grad, acc, bytes);
        }
        if (st != PW_OK) st = pw_error_prefix(st, "summing tied parameter %s across processes: ",
                                              g->params[gp].name);
    }
    free(list);
    free(acc);
    return st;
}

/* The sum of squared gradients of the replica, every parameter once at its
 * first chunk, added in chunk order through the chunks' processes (the
 * order of one process); every process of the replica learns the total. */
static pw_status sumsq_across(pw_pipeline *pl, double *out)
{
    const pw_graph *g = pl->g;
    const pw_transport *t = pl->t;
    const int me = t->rank, k = t->replica, tag = g->n_params;
    int *first = malloc((size_t)(g->n_params > 0 ? g->n_params : 1) * sizeof *first);
    double *all = calloc((size_t)t->world_size, sizeof *all);
    double sumsq = 0.0;
    pw_status st = PW_OK;
    if (!first || !all) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory for the gradient norm");
        goto out;
    }
    for (int p = 0; p < g->n_params; p++) first[p] = -1;
    for (int ch = pl->C - 1; ch >= 0; ch--)
        for (int i = pl->part.begin[ch]; i < pl->part.begin[ch + 1]; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++) first[g->nodes[i].params[q]] = ch;
    for (int ch = 0; ch < pl->C && st == PW_OK; ch++) {
        const int r = pw_schedule_rank_of(pl->sched, ch);
        const int pr = ch > 0 ? pw_schedule_rank_of(pl->sched, ch - 1) : r;
        if (pr != r && pr == me) st = t->vt->send(t->self, pw_transport_world_of(t, k, r), tag, &sumsq, sizeof sumsq);
        else if (pr != r && r == me)
            st = t->vt->recv(t->self, pw_transport_world_of(t, k, pr), tag, &sumsq, sizeof sumsq);
        if (st != PW_OK || r != me) continue;
        gstage *gs = stage_at(pl, 0, ch);
        for (int j = 0; j < gs->n_pieces; j++) {
            pw_program_fold_grads(gs->piece[j]);
            for (int i = 0; i < pw_program_n_params(gs->piece[j]); i++) {
                pw_program_param pp;
                pw_program_param_at(gs->piece[j], i, &pp);
                if (first[pp.graph_param] != ch) continue;
                for (int64_t e = 0; e < pp.numel; e++) sumsq += (double)pp.grad[e] * (double)pp.grad[e];
            }
        }
    }
    if (st == PW_OK) {
        /* The last chunk's process holds the replica's total. */
        double mine = pw_schedule_rank_of(pl->sched, pl->C - 1) == me ? sumsq : 0.0;
        st = t->vt->allgather(t->self, &mine, sizeof mine, all);
        if (st == PW_OK) *out = all[world_of_chunk(pl, k, pl->C - 1)];
    }
    if (st != PW_OK) st = pw_error_prefix(st, "gradient norm across processes: ");
out:
    free(first);
    free(all);
    return st;
}

/* The rest of the step after the engine's: see the design note above. */
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
        int np = replica_programs(pl, k, p);
        PW_CHECK_GOTO(pl->t ? sum_ties_across(pl) : sum_ties(g, p, np), st, out);
        if (pl->cfg.clip_grad_norm > 0) {
            /* Every parameter once, in node order (copies hold the same total). */
            double sumsq = 0.0;
            memset(seen, 0, (size_t)g->n_params);
            if (pl->t) PW_CHECK_GOTO(sumsq_across(pl, &sumsq), st, out);
            for (int j = 0; j < np && !pl->t; j++) {
                pw_program_fold_grads(p[j]);
                for (int i = 0; i < pw_program_n_params(p[j]); i++) {
                    pw_program_param pp;
                    pw_program_param_at(p[j], i, &pp);
                    if (seen[pp.graph_param]) continue;
                    seen[pp.graph_param] = 1;
                    float *gr;
                    PW_CHECK_GOTO(host_grad(p[j], i, &pp, &tmp, &gr), st, out);
                    for (int64_t e = 0; e < pp.numel; e++) sumsq += (double)gr[e] * (double)gr[e];
                }
            }
            double norm = sqrt(sumsq), coef = pl->cfg.clip_grad_norm / (norm + 1e-6);
            if (k == 0) pl->grad_norm = norm;
            if (coef < 1.0)
                for (int j = 0; j < np; j++)
                    for (int i = 0; i < pw_program_n_params(p[j]); i++) {
                        pw_program_param pp;
                        pw_program_param_at(p[j], i, &pp);
                        float *gr;
                        PW_CHECK_GOTO(host_grad(p[j], i, &pp, &tmp, &gr), st, out);
                        for (int64_t e = 0; e < pp.numel; e++) gr[e] *= (float)coef;
                        PW_CHECK_GOTO(host_grad_done(p[j], i, gr), st, out);
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

pw_status pw_pipeline_step(pw_pipeline *pl, pw_step_stats *out)
{
    const int64_t epoch = pl->step / pl->steps_per_epoch;
    const int64_t in_epoch = pl->step % pl->steps_per_epoch;
    if (epoch != pl->sampler_epoch) {
        pw_sampler_epoch(&pl->sampler, (int)epoch);
        pl->sampler_epoch = epoch;
    }
    pl->batch_idx = pl->sampler.order + in_epoch * pl->cfg.batch;
    pw_transport_phase(pl->t, PW_PHASE_STEP, pl->step + 1); /* the other processes' watchdogs read it */
    double t0_busy, t0_wall, t1_wall;
    int nw;
    t0_busy = busy_sum(pl, &t0_wall, &nw);
    int64_t t0 = pw_now_ns();
    PW_CHECK(pw_engine_run_step(pl->engine, pl->step + 1));
    if (pl->post_optim) PW_CHECK(finish_step(pl, pl->step + 1));
    int64_t t1 = pw_now_ns();
    double busy = busy_sum(pl, &t1_wall, &nw) - t0_busy;
    double wall = (double)(t1 - t0) * 1e-9;
    pl->last_bubble = wall > 0 && nw > 0 ? 1.0 - busy / ((double)nw * wall) : 0.0;
    if (pl->last_bubble < 0) pl->last_bubble = 0;

    /* Loss of the step: each replica's sum in micro-batch order, then the
     * replicas in order (the same bytes in one process or many). */
    double loss = 0.0;
    int64_t correct = 0;
    if (pl->t) {
        const int W = pl->t->world_size;
        loss_part mine = replica_loss(pl, 0);
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
            loss_part lp = replica_loss(pl, k);
            loss += lp.loss;
            correct += lp.correct;
        }
    }
    const pw_graph *g = pl->g;
    int64_t per_sample = g->label >= 0 ? pw_shape_numel(&g->values[g->label].shape) : 1;
    int64_t positions = pl->cfg.batch * (per_sample > 0 ? per_sample : 1);
    pl->step++;
    if (out) {
        out->step = pl->step;
        out->epoch = epoch;
        out->step_in_epoch = in_epoch + 1;
        out->loss = loss / (double)positions;
        out->accuracy = (double)correct / (double)positions;
    }
    return PW_OK;
}

/* Forward-only over a data set, stage after stage, on replica 0. In one
 * process the stages run one after the other on this thread (the workers
 * are idle between steps); with a transport each process of replica 0 runs
 * its chunks and passes the activations to the next chunk's process with
 * blocking world messages (in chunk order, so a rank holding several chunks
 * takes its turn each time the chain comes back to it). */
pw_status pw_pipeline_evaluate(pw_pipeline *pl, const pw_dataset *d, pw_eval_stats *out)
{
    const pw_graph *g = pl->g;
    const int S = pl->C; /* chunks, run in chunk order */
    const pw_transport *t = pl->t;
    PW_CHECK(pw_trainer_check_data(g, d));
    pw_transport_phase(t, PW_PHASE_EVAL, pl->step);
    void **link = calloc((size_t)S + 1, sizeof(void *));
    int64_t *idx = malloc((size_t)pl->micro * sizeof *idx);
    pw_status st = PW_OK;
    double loss = 0.0;
    int64_t correct = 0;
    const int run = !t || t->replica == 0; /* other replicas only hear the result */
    if (!link || !idx) {
        st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
        goto out;
    }
    /* link[s]: the activations from stage s to s+1 (bound to slot 0). */
    for (int s = 0; run && s + 1 < S; s++) {
        if (!stage_here(pl, s) && !stage_here(pl, s + 1)) continue;
        gstage *from = stage_here(pl, s) ? stage_at(pl, 0, s) : NULL;
        gstage *to = stage_here(pl, s + 1) ? stage_at(pl, 0, s + 1) : NULL;
        size_t n = from ? gs_port_bytes(from, PW_PORT_ACT_OUT) : gs_port_bytes(to, PW_PORT_ACT_IN);
        if (posix_memalign(&link[s], 64, n ? n : 64) != 0) {
            link[s] = NULL;
            st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
            goto out;
        }
        if (from) PW_CHECK_GOTO(gs_bind(from, 0, PW_PORT_ACT_OUT, link[s]), st, out);
        if (to) PW_CHECK_GOTO(gs_bind(to, 0, PW_PORT_ACT_IN, link[s]), st, out);
    }
    for (int64_t start = 0; run && start < d->n; start += pl->micro) {
        int64_t n = d->n - start < pl->micro ? d->n - start : pl->micro;
        for (int64_t i = 0; i < n; i++) idx[i] = start + i;
        for (int s = 0; s < S; s++) {
            if (!stage_here(pl, s)) continue;
            gstage *gs = stage_at(pl, 0, s);
            if (s > 0 && !stage_here(pl, s - 1))
                PW_CHECK_GOTO(t->vt->recv(t->self, world_of_chunk(pl, 0, s - 1), TAG_EVAL(t), link[s - 1],
                                          gs_port_bytes(gs, PW_PORT_ACT_IN)), st, out);
            PW_CHECK_GOTO(gs_run_forward(gs, d, idx, n, 0, 0, 0, 0), st, out);
            if (s + 1 < S && !stage_here(pl, s + 1))
                PW_CHECK_GOTO(t->vt->send(t->self, world_of_chunk(pl, 0, s + 1), TAG_EVAL(t), link[s],
                                          gs_port_bytes(gs, PW_PORT_ACT_OUT)), st, out);
            if (gs->loss_piece >= 0) {
                loss += pw_program_loss_sum(gs->piece[gs->loss_piece], 0);
                correct += pw_program_correct(gs->piece[gs->loss_piece], 0);
            }
        }
        /* A tick per micro-batch: the processes waiting for this one
         * (replica 1 in its all-gather) see it is alive and go on waiting. */
        pw_transport_progress(t);
        if (start == 0) pw_transport_test_point(t, "eval", pl->step);
    }
    if (t && !run) pw_transport_test_point(t, "eval", pl->step);
    if (t) {
        /* Everyone learns replica 0's figures (a failed process sends has = 0). */
        loss_part lp = {.loss = loss, .correct = correct, .has = run && st == PW_OK &&
                        stage_here(pl, S - 1) ? 1 : 0};
        loss_part *all = calloc((size_t)t->world_size, sizeof *all);
        if (!all) {
            st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
            goto out;
        }
        PW_CHECK_GOTO(t->vt->allgather(t->self, &lp, sizeof lp, all), st, out_all);
        const loss_part *last = &all[world_of_chunk(pl, 0, S - 1)];
        loss = last->loss;
        correct = last->correct;
    out_all:
        free(all);
        if (st != PW_OK) goto out;
    }
    {
        int64_t per_sample = g->label >= 0 ? pw_shape_numel(&g->values[g->label].shape) : 1;
        int64_t positions = d->n * (per_sample > 0 ? per_sample : 1);
        out->loss = positions ? loss / (double)positions : 0.0;
        out->accuracy = positions ? (double)correct / (double)positions : 0.0;
        out->samples = d->n;
    }
out:
    for (int s = 0; link && s + 1 < S; s++) {
        if (!link[s]) continue;
        if (stage_here(pl, s)) gs_bind(stage_at(pl, 0, s), 0, PW_PORT_ACT_OUT, NULL);
        if (stage_here(pl, s + 1)) gs_bind(stage_at(pl, 0, s + 1), 0, PW_PORT_ACT_IN, NULL);
        free(link[s]);
    }
    free(link);
    free(idx);
    return st;
}

/* Every program of replica 0 (this process's), stage by stage, pieces in
 * node order; returns the count. */
static int programs_of_replica(pw_pipeline *pl, pw_program **out)
{
    return replica_programs(pl, 0, out);
}

static int total_pieces(const pw_pipeline *pl)
{
    int n = 0;
    for (size_t i = 0; i < (size_t)pl->NRL * (size_t)pl->C; i++) n += pl->stages[i].n_pieces;
    return n;
}

/* A program over the whole graph with one row and one slot: the parameters
 * of every stage in one place (MPI save and load). */
static pw_status whole_program(const pw_pipeline *pl, pw_program **out)
{
    pw_program_config pc = {.graph = pl->g, .micro_batch = 1, .loss_batch = 1, .slots = 1,
                            .optim = pl->cfg.optim};
    return pw_program_create(&pc, out);
}

/* The stage whose programs hold parameter p first (the checkpoint's rule:
 * the first program in stage order). */
static int first_holder(const pw_pipeline *pl, int p)
{
    const pw_graph *g = pl->g;
    for (int s = 0; s < pl->C; s++)
        for (int i = pl->part.begin[s]; i < pl->part.begin[s + 1]; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++)
                if (g->nodes[i].params[q] == p) return s;
    return -1;
}

/* The pipeline rank that runs that chunk (MPI save: the process that sends
 * p; every copy of a tied parameter holds the same bytes). */
static int holder_rank(const pw_pipeline *pl, int p)
{
    int c = first_holder(pl, p);
    return c < 0 ? -1 : pw_schedule_rank_of(pl->sched, c);
}

/* This process's copy of graph parameter p (the first piece holding it, in
 * chunk order). */
static float *local_param(pw_pipeline *pl, int p, int64_t *numel)
{
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        gstage *gs = stage_at(pl, 0, ch);
        for (int j = 0; j < gs->n_pieces; j++)
            for (int i = 0; i < pw_program_n_params(gs->piece[j]); i++) {
                pw_program_param pp;
                pw_program_param_at(gs->piece[j], i, &pp);
                if (pp.graph_param == p) {
                    *numel = pp.numel;
                    return pp.data;
                }
            }
    }
    return NULL;
}

/* MPI: replica 0's processes send each parameter they hold first to world
 * rank 0, which writes the file with the same content as one process would;
 * every process returns rank 0's verdict. */
static pw_status save_gathered(pw_pipeline *pl, const char *path, const pw_checkpoint_info *info)
{
    const pw_transport *t = pl->t;
    const pw_graph *g = pl->g;
    pw_status st = PW_OK;
    pw_program *whole = NULL;
    if (g->n_params >= t->max_tag)
        return pw_error(PW_ERR_UNSUPPORTED, "save: %d parameters need more message tags than MPI's %d",
                        g->n_params, t->max_tag);
    pw_transport_phase(t, PW_PHASE_SAVE, pl->step);
    pw_transport_test_point(t, "save", pl->step);
    if (t->replica == 0 && t->rank != 0) {
        for (int p = 0; p < g->n_params && st == PW_OK; p++) {
            if (holder_rank(pl, p) != t->rank) continue;
            int64_t n = 0;
            float *data = local_param(pl, p, &n);
            st = data ? t->vt->send(t->self, 0, p, data, (size_t)n * sizeof(float))
                      : pw_error(PW_ERR_INTERNAL, "save: stage %d lost parameter %s", t->rank, g->params[p].name);
        }
    } else if (t->world_rank == 0) {
        st = whole_program(pl, &whole);
        /* In graph order, the order the holders send in (blocking sends of
         * large messages wait for their matching receive). */
        for (int p = 0; st == PW_OK && p < g->n_params; p++) {
            pw_program_param pp = {0};
            for (int i = 0; i < pw_program_n_params(whole); i++) {
                pw_program_param_at(whole, i, &pp);
                if (pp.graph_param == p) break;
            }
            if (pp.graph_param != p || !pp.data) {
                st = pw_error(PW_ERR_INTERNAL, "save: parameter %s has no place", g->params[p].name);
                break;
            }
            int holder = holder_rank(pl, pp.graph_param);
            if (holder == 0) {
                int64_t n = 0;
                float *data = local_param(pl, pp.graph_param, &n);
                if (data) memcpy(pp.data, data, (size_t)n * sizeof(float));
            } else {
                st = t->vt->recv(t->self, pw_transport_world_of(t, 0, holder), pp.graph_param, pp.data,
                                 (size_t)pp.numel * sizeof(float));
            }
        }
        if (st == PW_OK) st = pw_checkpoint_save(path, g, &whole, 1, info);
    }
    char msg[512] = "";
    if (st != PW_OK) snprintf(msg, sizeof msg, "%s", pw_last_error());
    pw_program_destroy(whole);
    /* Everyone returns rank 0's verdict (and its message). */
    struct { int32_t st; char msg[252]; } mine = {(int32_t)st, ""}, *all = calloc((size_t)t->world_size, sizeof mine);
    snprintf(mine.msg, sizeof mine.msg, "%s", msg);
    if (!all) return pw_error(PW_ERR_NOMEM, "save: out of memory");
    pw_status gs = t->vt->allgather(t->self, &mine, sizeof mine, all);
    pw_status worst = PW_OK;
    const char *why = "";
    int who = -1;
    for (int w = 0; gs == PW_OK && w < t->world_size; w++)
        if (all[w].st != PW_OK && worst == PW_OK) {
            worst = (pw_status)all[w].st;
            why = all[w].msg;
            who = w;
        }
    if (gs != PW_OK) worst = gs;
    else if (worst != PW_OK) worst = pw_error(worst, "%s (MPI rank %d)", why, who);
    free(all);
    return worst;
}

pw_status pw_pipeline_save(pw_pipeline *pl, const char *path, const pw_checkpoint_info *info)
{
    pw_checkpoint_info def = {.step = pl->step, .seed = pl->cfg.seed};
    if (!info) info = &def;
    if (pl->t) return save_gathered(pl, path, info);
    int n = total_pieces(pl);
    pw_program **p = malloc((size_t)n * sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "save: out of memory");
    int k = programs_of_replica(pl, p);
    pw_status st = pw_checkpoint_save(path, pl->g, p, k, info);
    free(p);
    return st;
}

pw_status pw_pipeline_load(pw_pipeline *pl, const char *path, pw_checkpoint_info *info)
{
    if (pl->t) {
        /* Every process reads the file into a whole-graph program and keeps
         * its own parameters: the same checks, no messages. */
        pw_program *whole = NULL;
        PW_CHECK(whole_program(pl, &whole));
        pw_status st = pw_checkpoint_load(path, pl->g, &whole, 1, info);
        for (int i = 0; st == PW_OK && i < pw_program_n_params(whole); i++) {
            pw_program_param pp;
            pw_program_param_at(whole, i, &pp);
            for (int ch = 0; ch < pl->C; ch++) {
                if (!stage_here(pl, ch)) continue;
                gstage *gs = stage_at(pl, 0, ch);
                for (int j = 0; j < gs->n_pieces; j++)
                    for (int q = 0; q < pw_program_n_params(gs->piece[j]); q++) {
                        pw_program_param mine;
                        pw_program_param_at(gs->piece[j], q, &mine);
                        if (mine.graph_param == pp.graph_param)
                            memcpy(mine.data, pp.data, (size_t)pp.numel * sizeof(float));
                    }
            }
        }
        pw_program_destroy(whole);
        return st;
    }
    /* Every replica's programs: each loads the same weights. */
    int n = total_pieces(pl), k = 0;
    pw_program **p = malloc((size_t)n * sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "load: out of memory");
    for (size_t i = 0; i < (size_t)pl->NRL * (size_t)pl->C; i++)
        for (int j = 0; j < pl->stages[i].n_pieces; j++) p[k++] = pl->stages[i].piece[j];
    pw_status st = pw_checkpoint_load(path, pl->g, p, k, info);
    free(p);
    return st;
}

const pw_partition *pw_pipeline_partition(const pw_pipeline *pl) { return &pl->part; }
const pw_schedule *pw_pipeline_schedule(const pw_pipeline *pl) { return pl->sched; }
const pw_schedule_report *pw_pipeline_report(const pw_pipeline *pl) { return pl->rep; }
pw_engine *pw_pipeline_engine(pw_pipeline *pl) { return pl->engine; }
double pw_pipeline_last_bubble(const pw_pipeline *pl) { return pl->last_bubble; }
double pw_pipeline_grad_norm(const pw_pipeline *pl)
{
    return pl->post_optim ? pl->grad_norm : pw_engine_grad_norm(pl->engine);
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
