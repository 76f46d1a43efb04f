/* pipewright — one chunk of one replica of a pw_pipeline: its nodes cut into
 * programs (one per gradient bucket), the data it loads, and the engine's
 * callbacks for it (docs/architecture.md). */
#include "stages/train/pipeline-internal.h"

/* ---- one stage's pieces ---- */

/* ---- tensor parallelism (pl->T > 1): one piece, T rank programs ----
 *
 * Each engine call on the chunk runs on every rank: rank 0 on the engine's
 * worker, the others on the chunk's team; their split ops meet in the
 * chunk's group (stages/ops/tp.h). Every rank reads the chunk's inputs
 * from the engine's buffers; rank 0 alone writes its outputs and input
 * gradients there (the others compute the same values into their own
 * buffers: a cut never splits a tensor-parallel pair). The gradients of
 * the outputs arrive in rank 0's buffer and are copied into the others'
 * own before the backward: a program adds the gradient of an output it
 * also reads into that buffer, which the ranks therefore cannot share. */
enum { TP_FORWARD, TP_FORWARD_EVAL, TP_BACKWARD_INPUT, TP_BACKWARD_WEIGHT };

/* Rank r's (r >= 1) own GRAD_OUT buffer of `slot`. */
static char *tp_grad_buf(gstage *s, int r, int slot)
{
    const int slots = pw_program_get_config(s->piece[0])->slots;
    return s->tp_grad_mem + ((size_t)(r - 1) * (size_t)slots + (size_t)slot) * s->tp_grad_stride;
}

typedef struct tp_call {
    gstage *s;
    int what;                 /* TP_* */
    int slot;
    const pw_dataset *d;      /* forward: the samples */
    const int64_t *idx;
    int64_t n, step, offset;
} tp_call;

static pw_status tp_rank_call(void *arg, int k)
{
    const tp_call *c = arg;
    const pw_graph *g = c->s->pl->g;
    pw_program *p = c->s->rank_prog[k];
    switch (c->what) {
    case TP_FORWARD:
    case TP_FORWARD_EVAL:
        if (c->s->reads_input[0] || c->s->reads_label[0])
            PW_CHECK(pw_dataset_gather(c->d, c->idx, c->n,
                                       c->s->reads_input[0] ? pw_program_data(p, g->input, c->slot) : NULL,
                                       c->s->reads_label[0] ? pw_program_data(p, g->label, c->slot) : NULL));
        if (c->what == TP_FORWARD_EVAL) return pw_program_forward_eval(p, c->slot, c->n);
        if (pw_program_needs_rng(p)) PW_CHECK(pw_program_set_rng(p, c->slot, c->s->pl->cfg.seed, c->step, c->offset));
        return pw_program_forward(p, c->slot, c->n);
    case TP_BACKWARD_INPUT: return pw_program_backward_input(p, c->slot);
    case TP_BACKWARD_WEIGHT: return pw_program_backward_weight(p, c->slot);
    }
    return pw_error(PW_ERR_INTERNAL, "tensor-parallel call %d", c->what);
}

/* The output gradients of `slot`, as the engine delivered them (rank 0's
 * GRAD_OUT buffer), into the other ranks' own GRAD_OUT buffers. */
static void tp_copy_grad_out(gstage *s, int slot)
{
    if (!s->tp_grad_bytes || !s->tp_grad_out[slot]) return;
    for (int r = 1; r < s->pl->TL; r++)
        memcpy(tp_grad_buf(s, r, slot), s->tp_grad_out[slot], s->tp_grad_bytes);
}

static pw_status tp_run(gstage *s, tp_call c)
{
    if (c.what == TP_BACKWARD_INPUT) tp_copy_grad_out(s, c.slot);
    c.s = s;
    s->tp_tracing = c.what != TP_FORWARD_EVAL; /* evaluation runs on another thread than the track's */
    pw_status st = pw_tp_team_run(s->tp_team, tp_rank_call, &c);
    s->tp_tracing = 0;
    return st;
}

/* The engine call (its micro-batch and step) that tensor-parallel sums
 * about to run belong to. */
static void tp_call_of(gstage *s, int mb)
{
    s->tp_mb = mb;
    s->tp_step = s->pl->K > 1 ? pw_engine_current_step() : s->pl->step + 1;
}

/* The first local rank's cross-rank sums (pw_tp.on_sum) as TP_ALLREDUCE
 * events on the engine worker's track: that rank runs on the worker's
 * thread (the track's writer), inside the F, B or W event the worker
 * records around the call. The other ranks of one process are threads of
 * their own and record nothing: they wait in the same sums. Under MPI each
 * process's rank records its own. */
static void tp_traced(void *arg, int64_t t0, int64_t t1, int64_t bytes)
{
    gstage *s = arg;
    pw_pipeline *pl = s->pl;
    if (!s->tp_tracing || !pl->trace) return;
    pw_trace_event *ev = pw_trace_push(pl->trace, s->replica * pl->S + pw_schedule_rank_of(pl->sched, s->index));
    if (!ev) return; /* a full track: the trace counts the drop */
    ev->name = "TP_ALLREDUCE";
    ev->cat = PW_TRACE_TP;
    ev->chunk = s->index;
    ev->mb = s->tp_mb;
    ev->step = s->tp_step;
    ev->bytes = bytes;
    ev->t0_ns = t0;
    ev->t1_ns = t1;
}

/* Forward of `n` rows of samples idx[0..n) in `slot` through every piece;
 * `train` sets the dropout stream (sample_offset: the micro-batch's first
 * sample within the global batch). */
pw_status pl_gs_run_forward(gstage *s, const pw_dataset *d, const int64_t *idx, int64_t n, int slot,
                                int train, int64_t step, int64_t sample_offset)
{
    const pw_graph *g = s->pl->g;
    if (s->rank_prog)
        return tp_run(s, (tp_call){.what = train ? TP_FORWARD : TP_FORWARD_EVAL, .slot = slot, .d = d, .idx = idx,
                                   .n = n, .step = step, .offset = sample_offset});
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
    /* With overlapping steps the workers are in different steps: the
     * engine says which one this call is in. A run never crosses an epoch,
     * so the sampler's order is the step's. */
    const int64_t step = pl->K > 1 ? pw_engine_current_step() : pl->step + 1;
    const int64_t *batch = pl->sampler.order + ((step - 1) % pl->steps_per_epoch) * pl->cfg.batch;
    const int at = (int)(step - pl->run_first) * pl->cfg.micro_batches + mb; /* mb_loss index */
    s->tp_mb = mb;
    s->tp_step = step;
    PW_CHECK(pl_gs_run_forward(s, pl->cfg.train, batch + offset, pl->micro, slot, 1, step, offset));
    if (s->loss_piece >= 0 && s->async) { /* the statistics reach the host at completion */
        s->loss_mb = at;
        s->loss_slot = slot;
    } else if (s->loss_piece >= 0) {
        s->mb_loss[at] = pw_program_loss_sum(s->piece[s->loss_piece], slot);
        s->mb_correct[at] = pw_program_correct(s->piece[s->loss_piece], slot);
    }
    return PW_OK;
}

static pw_status gs_backward_input(void *self, int mb, int slot)
{
    (void)mb;
    gstage *s = self;
    if (s->rank_prog) {
        tp_call_of(s, mb);
        return tp_run(s, (tp_call){.what = TP_BACKWARD_INPUT, .slot = slot});
    }
    for (int j = s->n_pieces - 1; j >= 0; j--) PW_CHECK(pw_program_backward_input(s->piece[j], slot));
    return PW_OK;
}

static pw_status gs_backward_weight(void *self, int mb, int slot)
{
    (void)mb;
    gstage *s = self;
    if (s->rank_prog) {
        tp_call_of(s, mb);
        return tp_run(s, (tp_call){.what = TP_BACKWARD_WEIGHT, .slot = slot});
    }
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
    if (s->rank_prog) {
        tp_call_of(s, mb);
        if (part == PW_BWD_FULL) PW_CHECK(tp_run(s, (tp_call){.what = TP_BACKWARD_INPUT, .slot = slot}));
        return tp_run(s, (tp_call){.what = TP_BACKWARD_WEIGHT, .slot = slot});
    }
    if (part == PW_BWD_FULL) PW_CHECK(pw_program_backward_input(s->piece[j], slot));
    return pw_program_backward_weight(s->piece[j], slot);
}

/* A bucket's spans (spans) and their rows (rows) in one walk, so the two
 * lists always agree (PowerSGD reads span i's rows at i): every use buffer
 * of a tied parameter is summed across the replicas (the uses are folded
 * only before the optimizer); under tensor parallelism every rank's parts,
 * rank by rank (each replica's chunk lists the same spans). A weight of 2
 * or more dimensions has rows = dim 0 (runtime/compress.h), else 0. */
static int bucket_walk(gstage *s, int bucket, pw_span *spans, int64_t *rows, int max)
{
    const int j = s->n_pieces - 1 - bucket;
    if (j < 0) return 0;
    int n = 0;
    const int ranks = s->rank_prog ? s->pl->TL : 1;
    for (int r = 0; r < ranks; r++) {
        pw_program *p = s->rank_prog ? s->rank_prog[r] : s->piece[j];
        for (int i = 0; i < pw_program_n_params(p); i++) {
            pw_program_param pp;
            pw_program_param_at(p, i, &pp);
            float *uses[16];
            int nu = pw_program_param_uses(p, i, uses, 16);
            if (nu > 16) nu = 16; /* PW_ASSERT-worthy; 16 uses of one weight in one piece */
            for (int u = 0; u < nu; u++, n++) {
                if (n >= max) continue;
                if (spans) spans[n] = (pw_span){uses[u], pp.numel};
                if (rows) rows[n] = pp.shape.ndim >= 2 ? pp.shape.d[0] : 0;
            }
        }
    }
    return n;
}

static int gs_grad_bucket(void *self, int bucket, int n_buckets, pw_span *spans, int max_spans)
{
    (void)n_buckets;
    return bucket_walk(self, bucket, spans, NULL, max_spans);
}

/* The rows of gs_grad_bucket's spans, in its order, for PowerSGD. */
static void gs_grad_bucket_rows(void *self, int bucket, int n_buckets, int64_t *rows, int max)
{
    (void)n_buckets;
    bucket_walk(self, bucket, NULL, rows, max);
}

/* Parameter i's (folded) gradient as host floats, for clipping: *out =
 * pp->grad itself for a CPU program; a device program's downloaded into
 * *tmp (grown as needed; the caller frees it). */
pw_status pl_host_grad(pw_program *p, int i, const pw_program_param *pp, float **tmp, float **out)
{
    *out = pp->grad;
    if (!pw_program_on_device(p)) return PW_OK;
    float *t = realloc(*tmp, (size_t)pp->numel * sizeof *t + 1);
    if (!t) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory reading the gradient of %s", pp->name);
    *tmp = *out = t;
    return pw_program_param_read(p, i, PW_PARAM_GRAD, 0, t);
}

/* After scaling a host copy: back to the device (nothing on the CPU). */
pw_status pl_host_grad_done(pw_program *p, int i, const float *g)
{
    return pw_program_on_device(p) ? pw_program_param_write(p, i, PW_PARAM_GRAD, g) : PW_OK;
}

/* The programs whose gradients and optimizer state the chunk owns: its
 * pieces, or at T > 1 this process's TL rank programs (rank_prog[0] is its
 * one piece; all T in one process, one under MPI). */
static int gs_programs(gstage *s, pw_program ***out)
{
    if (s->rank_prog) {
        *out = s->rank_prog;
        return s->pl->TL;
    }
    *out = s->piece;
    return s->n_pieces;
}

/* Adds the squares of parameter i's gradient in program p to *sum, element
 * by element in order (0, or -1 after the warning: the norm becomes NaN and
 * the optimizer's finiteness check stops the step). */
static int add_sumsq(gstage *s, pw_program *p, int i, float **tmp, double *sum)
{
    pw_program_param pp;
    pw_program_param_at(p, i, &pp);
    float *gr;
    if (pl_host_grad(p, i, &pp, tmp, &gr) != PW_OK) {
        PW_WARN("stage %d: %s", s->index, pw_last_error());
        return -1;
    }
    for (int64_t k = 0; k < pp.numel; k++) *sum += (double)gr[k] * (double)gr[k];
    return 0;
}

pw_status pl_tp_sumsq(gstage *gs, const unsigned char *skip, float **tmp, double *sum)
{
    pw_pipeline *pl = gs->pl;
    const int T = pl->T, n = pw_program_n_params(gs->rank_prog[0]);
    if (n == 0) return PW_OK; /* the same on every rank: no exchange */
    const pw_graph *rg = pl->rank_g[0];
    double *parts = calloc((size_t)T * (size_t)n, sizeof *parts); /* [T][n] */
    if (!parts) return pw_error(PW_ERR_NOMEM, "chunk %d: out of memory for the gradient norm", gs->index);
    pw_status st = PW_OK;
    for (int r = 0; r < pl->TL; r++) pw_program_fold_grads(gs->rank_prog[r]);
    for (int r = 0; r < pl->TL && st == PW_OK; r++) {
        const int rank = pl->tp0 + r;
        for (int i = 0; i < n && st == PW_OK; i++) {
            pw_program_param pp;
            pw_program_param_at(gs->rank_prog[r], i, &pp);
            if ((skip && skip[pp.graph_param]) || (rank > 0 && rg->params[pp.graph_param].tp_full <= 0)) continue;
            float *gr;
            if ((st = pl_host_grad(gs->rank_prog[r], i, &pp, tmp, &gr)) != PW_OK) break;
            double part = 0.0;
            for (int64_t e = 0; e < pp.numel; e++) part += (double)gr[e] * (double)gr[e];
            parts[(size_t)rank * (size_t)n + (size_t)i] = part;
        }
    }
    if (pl->t) {
        /* Under MPI every process of the stage holds one row: the others'
         * from them (every one then adds the same numbers). A process that
         * failed above still takes part, so that its peers do not wait for
         * it; its own error stands. */
        double *mine = malloc((size_t)n * sizeof *mine);
        pw_status gst;
        if (!mine) gst = pw_error(PW_ERR_NOMEM, "chunk %d: out of memory for the gradient norm", gs->index);
        else {
            memcpy(mine, parts + (size_t)pl->tp0 * (size_t)n, (size_t)n * sizeof *mine);
            gst = pw_coll_allgather_bytes(&pl->t->tp_coll, mine, (int64_t)n * (int64_t)sizeof *mine, parts,
                                          &gs->tp_abort);
            free(mine);
            if (gst != PW_OK) gst = pw_error_prefix(gst, "chunk %d: the gradient norm's parts across its tensor "
                                                    "ranks: ", gs->index);
        }
        if (st == PW_OK) st = gst;
    }
    for (int i = 0; i < n && st == PW_OK; i++) {
        pw_program_param pp;
        pw_program_param_at(gs->rank_prog[0], i, &pp);
        if (skip && skip[pp.graph_param]) continue;
        const int ranks = rg->params[pp.graph_param].tp_full > 0 ? T : 1;
        for (int r = 0; r < ranks; r++) *sum += parts[(size_t)r * (size_t)n + (size_t)i];
    }
    free(parts);
    return st;
}

/* The chunk's share of the squared global norm: every parameter in piece
 * and program order; at T > 1 pl_tp_sumsq's order (docs/parallelism.md,
 * "Clipping at T > 1"). 0, or NaN after a warning: the norm becomes NaN
 * and the optimizer's finiteness check stops the step. */
static double gs_grad_sumsq(void *self)
{
    gstage *s = self;
    double sum = 0.0;
    float *tmp = NULL;
    int bad = 0;
    if (s->rank_prog) {
        if (pl_tp_sumsq(s, NULL, &tmp, &sum) != PW_OK) {
            PW_WARN("stage %d: %s", s->index, pw_last_error());
            bad = 1;
        }
    } else {
        pw_program **progs;
        const int np = gs_programs(s, &progs);
        for (int j = 0; j < np; j++) pw_program_fold_grads(progs[j]);
        for (int j = 0; j < np && !bad; j++)
            for (int i = 0; i < pw_program_n_params(progs[j]) && !bad; i++) bad = add_sumsq(s, progs[j], i, &tmp, &sum);
    }
    free(tmp);
    return bad ? NAN : sum;
}

/* Scales every gradient of the chunk (at T > 1 every rank's, so the whole
 * parameters' copies stay the same). */
static void gs_scale_grads(void *self, float scale)
{
    gstage *s = self;
    float *tmp = NULL;
    pw_program **progs;
    const int np = gs_programs(s, &progs);
    for (int j = 0; j < np; j++) pw_program_fold_grads(progs[j]);
    for (int j = 0; j < np; j++)
        for (int i = 0; i < pw_program_n_params(progs[j]); i++) {
            pw_program_param pp;
            pw_program_param_at(progs[j], i, &pp);
            float *gr;
            pw_status st = pl_host_grad(progs[j], i, &pp, &tmp, &gr);
            if (st == PW_OK)
                for (int64_t k = 0; k < pp.numel; k++) gr[k] *= scale;
            if (st != PW_OK || pl_host_grad_done(progs[j], i, gr) != PW_OK)
                PW_WARN("stage %d: clipping the gradient of %s: %s", s->index, pp.name, pw_last_error());
        }
    free(tmp);
}

static pw_status gs_optimizer_step(void *self, long step)
{
    gstage *s = self;
    for (int j = 0; j < s->n_pieces; j++) PW_CHECK(pw_program_optimizer_step(s->piece[j], step));
    for (int r = 1; s->rank_prog && r < s->pl->TL; r++) /* element-wise: each rank its parts */
        PW_CHECK(pw_program_optimizer_step(s->rank_prog[r], step));
    return PW_OK;
}

/* Post-validation: the pieces' steps (at T > 1 every rank's), complete
 * when the call returns (the engine does not ask `submitted` for these). A
 * program that fails its try has changed nothing; the ones before it are
 * undone. */
static pw_status gs_optimizer_try(void *self, long step)
{
    gstage *s = self;
    pw_program **progs;
    const int np = gs_programs(s, &progs);
    for (int j = 0; j < np; j++) {
        pw_status st = pw_program_optimizer_try(progs[j], step);
        if (st == PW_OK) st = pw_program_wait(progs[j]);
        if (st != PW_OK) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", pw_last_error());
            for (int k = 0; k < j; k++)
                if (pw_program_optimizer_undo(progs[k]) != PW_OK || pw_program_wait(progs[k]) != PW_OK)
                    PW_WARN("stage %d: undoing the optimizer step: %s", s->index, pw_last_error());
            return pw_error(st, "%s", msg);
        }
    }
    return PW_OK;
}

static pw_status gs_optimizer_settle(gstage *s, int undo)
{
    pw_program **progs;
    const int np = gs_programs(s, &progs);
    for (int j = 0; j < np; j++) {
        PW_CHECK(undo ? pw_program_optimizer_undo(progs[j]) : pw_program_optimizer_commit(progs[j]));
        PW_CHECK(pw_program_wait(progs[j]));
    }
    return PW_OK;
}

static pw_status gs_optimizer_commit(void *self) { return gs_optimizer_settle(self, 0); }
static pw_status gs_optimizer_undo(void *self) { return gs_optimizer_settle(self, 1); }

static pw_status gs_zero_grads(void *self)
{
    gstage *s = self;
    pw_program **progs;
    const int np = gs_programs(s, &progs);
    for (int j = 0; j < np; j++) {
        pw_program_zero_grads(progs[j]);
        PW_CHECK(pw_program_wait(progs[j]));
    }
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

size_t pl_gs_port_bytes(void *self, pw_port port)
{
    gstage *s = self;
    return pw_program_port_bytes(port_piece(s, port), port);
}

pw_status pl_gs_bind(void *self, int slot, pw_port port, void *buf)
{
    gstage *s = self;
    /* Tensor parallelism: every rank reads the activations that arrive;
     * rank 0 holds the rest (above). */
    if (s->rank_prog && port == PW_PORT_GRAD_OUT) s->tp_grad_out[slot] = buf;
    for (int r = 1; s->rank_prog && r < s->pl->TL && port == PW_PORT_ACT_IN; r++)
        PW_CHECK(pw_program_bind_port(s->rank_prog[r], slot, port, buf));
    return pw_program_bind_port(port_piece(s, port), slot, port, buf);
}

const pw_stage_i pl_gstage_i = {
    .name = "graph-stage",
    .forward = gs_forward,
    .backward_input = gs_backward_input,
    .backward_weight = gs_backward_weight,
    .optimizer_step = gs_optimizer_step,
    .port_bytes = pl_gs_port_bytes,
    .bind = pl_gs_bind,
    .grad_bucket = gs_grad_bucket,
    .grad_bucket_rows = gs_grad_bucket_rows,
    .backward_bucket = gs_backward_bucket,
    .grad_sumsq = gs_grad_sumsq,
    .scale_grads = gs_scale_grads,
    .submitted = gs_submitted,
    .optimizer_try = gs_optimizer_try,
    .optimizer_commit = gs_optimizer_commit,
    .optimizer_undo = gs_optimizer_undo,
    .zero_grads = gs_zero_grads,
};

/* The same stage without an optimizer: with parameters tied across chunks
 * the pipeline applies it after the engine's step (finish_step). */
const pw_stage_i pl_gstage_post_i = {
    .name = "graph-stage",
    .forward = gs_forward,
    .backward_input = gs_backward_input,
    .backward_weight = gs_backward_weight,
    .port_bytes = pl_gs_port_bytes,
    .bind = pl_gs_bind,
    .grad_bucket = gs_grad_bucket,
    .grad_bucket_rows = gs_grad_bucket_rows,
    .backward_bucket = gs_backward_bucket,
    .grad_sumsq = gs_grad_sumsq,
    .scale_grads = gs_scale_grads,
    .submitted = gs_submitted,
};


int pl_node_range_reads(const pw_graph *g, int begin, int end, int value)
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
const char *pl_chunk_device(const pw_pipeline *pl, int s, char *buf, size_t size)
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

/* Tensor parallelism: this process's rank programs of chunk s after the
 * first (piece 0), the group and the team; refuses a cut inside a
 * tensor-parallel pair. In one process the chunk runs all T ranks, over an
 * in-process group; under MPI its one rank (pl->tp0) meets the other
 * processes of its stage over the transport's tp_coll. */
static pw_status build_tp(pw_pipeline *pl, gstage *gs, int s, int b, int e, int slots)
{
    const pw_pipeline_config *c = &pl->cfg;
    const int T = pl->T, TL = pl->TL;
    const pw_graph *r0 = pl->rank_g[pl->tp0];
    for (int port = 0; port < 2; port++) {
        const int *vals;
        const int nv = port ? pw_program_outputs(gs->piece[0], &vals) : pw_program_inputs(gs->piece[0], &vals);
        for (int i = 0; i < nv; i++)
            if (r0->values[vals[i]].tp_full)
                return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism: the cut %s chunk %d (nodes %d-%d) splits a "
                                "tensor-parallel pair: value '%s' is split across ranks there; cut elsewhere (a "
                                "`cut` marker in the graph)", port ? "after" : "before", s, b, e - 1,
                                r0->values[vals[i]].name);
    }
    gs->rank_prog = calloc((size_t)TL, sizeof *gs->rank_prog);
    if (!gs->rank_prog) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    gs->rank_prog[0] = gs->piece[0];
    if (!pl->t) PW_CHECK(pw_shm_group_create(T, &gs->tp_group));
    else if (!pl->t->tp_coll.vt || pl->t->tp_coll.n_members != T)
        return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism %d: the transport has no tensor-parallel group of "
                        "%d processes", T, T);
    PW_CHECK(pw_tp_team_create(TL, &gs->tp_abort, &gs->tp_team));
    {
        const size_t bytes = pw_program_port_bytes(gs->piece[0], PW_PORT_GRAD_OUT);
        gs->tp_grad_out = calloc((size_t)slots, sizeof *gs->tp_grad_out);
        if (!gs->tp_grad_out) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
        gs->tp_grad_bytes = bytes;
        gs->tp_grad_stride = (bytes + 63) / 64 * 64;
        if (bytes && TL > 1 && posix_memalign((void **)&gs->tp_grad_mem, 64,
                                    gs->tp_grad_stride * (size_t)slots * (size_t)(TL - 1)) != 0) {
            gs->tp_grad_mem = NULL;
            return pw_error(PW_ERR_NOMEM, "pipeline: out of memory for chunk %d's tensor-parallel buffers", s);
        }
        if (gs->tp_grad_mem) memset(gs->tp_grad_mem, 0, gs->tp_grad_stride * (size_t)slots * (size_t)(TL - 1));
    }
    for (int r = 0; r < TL; r++) {
        if (r > 0) {
            pw_program_config pc = *pw_program_get_config(gs->piece[0]);
            pc.graph = pl->rank_g[pl->tp0 + r];
            pc.slots = slots;
            PW_CHECK(pw_program_create(&pc, &gs->rank_prog[r]));
            pw_program_init_params(gs->rank_prog[r], c->seed);
            for (int slot = 0; gs->tp_grad_bytes && slot < slots; slot++)
                PW_CHECK(pw_program_bind_port(gs->rank_prog[r], slot, PW_PORT_GRAD_OUT, tp_grad_buf(gs, r, slot)));
        }
        pw_tp tp = {.rank = pl->tp0 + r, .size = T, .abort = &gs->tp_abort,
                    .coll = pl->t ? pl->t->tp_coll : pw_shm_group_member(gs->tp_group, r),
                    .on_sum = r == 0 ? tp_traced : NULL, .on_sum_arg = gs};
        PW_CHECK(pw_program_set_tp(gs->rank_prog[r], &tp));
    }
    return PW_OK;
}

pw_status pl_build_stage(pw_pipeline *pl, gstage *gs, int s, int replica)
{
    const pw_pipeline_config *c = &pl->cfg;
    const pw_graph *g = pl->g;
    const int b = pl->part.begin[s], e = pl->part.begin[s + 1], M = c->micro_batches;
    const int slots = pl->rep->peak_inflight_chunk[s];
    gs->pl = pl;
    gs->index = s;
    gs->replica = replica;
    gs->loss_piece = -1;
    int k = pl->NR > 1 && pl->T == 1 ? pl->n_buckets : 1; /* tensor parallelism: one piece */
    char device[48];
    int *cut = calloc((size_t)(k > 1 ? k : 1) + 1, sizeof *cut);
    if (!cut) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
    gs->n_pieces = cut_pieces(g, b, e, k, cut);
    gs->loss_mb = -1;
    gs->piece = calloc((size_t)gs->n_pieces, sizeof *gs->piece);
    gs->reads_input = calloc((size_t)gs->n_pieces, 1);
    gs->reads_label = calloc((size_t)gs->n_pieces, 1);
    gs->mb_loss = calloc((size_t)M * (size_t)pl->K, sizeof(double));
    gs->mb_correct = calloc((size_t)M * (size_t)pl->K, sizeof(int64_t));
    pw_status st = PW_OK;
    if (!gs->piece || !gs->reads_input || !gs->reads_label || !gs->mb_loss || !gs->mb_correct) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory");
        goto out;
    }
    for (int j = 0; j < gs->n_pieces; j++) {
        pw_program_config pc = {
            .graph = pl->T > 1 ? pl->rank_g[pl->tp0] : g, .node_begin = cut[j], .node_end = cut[j + 1], .micro_batch = pl->micro,
            .loss_batch = c->batch, .slots = slots, .optim = c->optim, .recompute = c->recompute,
            .device = pl_chunk_device(pl, s, device, sizeof device), .math = c->math,
            .no_graphs = c->no_graphs, .micro_batches = M, .grad_groups = pl->grad_groups,
            .post_validate = c->post_validate && c->clip_grad_norm > 0 && !pl->post_optim,
        };
        PW_CHECK_GOTO(pw_program_create(&pc, &gs->piece[j]), st, out);
        pw_program_init_params(gs->piece[j], c->seed);
        gs->reads_input[j] = (unsigned char)pl_node_range_reads(g, cut[j], cut[j + 1], g->input);
        gs->reads_label[j] = (unsigned char)pl_node_range_reads(g, cut[j], cut[j + 1], g->label);
        if (pw_program_has_loss(gs->piece[j])) gs->loss_piece = j;
    }
    if (pl->T > 1) PW_CHECK_GOTO(build_tp(pl, gs, s, b, e, slots), st, out);
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

void pl_free_stage(gstage *gs)
{
    pw_tp_team_destroy(gs->tp_team); /* joins its threads */
    for (int r = 1; gs->rank_prog && gs->pl && r < gs->pl->TL; r++) pw_program_destroy(gs->rank_prog[r]);
    free(gs->rank_prog);
    free(gs->tp_grad_out);
    free(gs->tp_grad_mem);
    pw_shm_group_destroy(gs->tp_group);
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
