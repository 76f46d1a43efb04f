/* pipewright — a graph program as an engine chunk (stages/train/program_stage.h):
 * the program's ports, the data of each micro-batch, dropout's randomness,
 * the loss per micro-batch, one gradient bucket for the replicas. */
#include "stages/train/program_stage.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"
#include "stages/train/trainer.h"

struct pw_program_stage {
    pw_program *p;
    const pw_graph *g;
    pw_program_stage_config cfg;
    int64_t micro;            /* samples per micro-batch: B / (R·M) */
    int64_t share;            /* samples per replica per step: B / R */
    int64_t steps_per_epoch;  /* with data: n / B */
    int64_t next_step;        /* the step of the next forward */
    int reads_input, reads_label;
    pw_sampler sampler;       /* with data: this stage's copy of the epoch order */
    int sampler_epoch;        /* the epoch sampler.order holds; -1: none */
    int has_loss;
    double *mb_loss;          /* [M] loss sum of each micro-batch of the step */
    int64_t *mb_correct;      /* [M] */
    /* Asynchronous programs: the forward whose loss is read at completion
     * (-1: none), and the engine's done for the call in flight. */
    int async;
    int loss_mb, loss_slot;
    pw_stage_done_fn done;
    void *done_arg;
};

/* Input and label of micro-batch mb of the next step, into the program's
 * staging buffers of `slot`. */
static pw_status load_micro_batch(pw_program_stage *s, int mb, int slot)
{
    void *x = s->reads_input ? pw_program_data(s->p, s->g->input, slot) : NULL;
    int32_t *y = s->reads_label ? pw_program_data(s->p, s->g->label, slot) : NULL;
    if (!x && !y) return PW_OK;
    if (s->cfg.load) {
        pw_status st = s->cfg.load(s->cfg.load_arg, s->next_step, s->cfg.replica, mb, s->micro, x, y);
        if (st != PW_OK)
            return pw_error_prefix(st, "loading micro-batch %d of step %lld: ", mb, (long long)s->next_step);
        return PW_OK;
    }
    const int64_t t = s->next_step - 1;
    const int epoch = (int)(t / s->steps_per_epoch);
    if (epoch != s->sampler_epoch) {
        pw_sampler_epoch(&s->sampler, epoch);
        s->sampler_epoch = epoch;
    }
    const int64_t first = (t % s->steps_per_epoch) * s->cfg.batch + (int64_t)s->cfg.replica * s->share +
                          (int64_t)mb * s->micro;
    return pw_dataset_gather(s->cfg.data, s->sampler.order + first, s->micro, x, y);
}

static pw_status ps_forward(void *self, int mb, int slot)
{
    pw_program_stage *s = self;
    if (mb < 0 || mb >= s->cfg.micro_batches)
        return pw_error(PW_ERR_INVALID_ARG, "program stage: micro-batch %d of %d", mb, s->cfg.micro_batches);
    PW_CHECK(load_micro_batch(s, mb, slot));
    if (pw_program_needs_rng(s->p)) {
        /* Dropout masks follow the sample's place in the global batch. */
        const int64_t offset = (int64_t)s->cfg.replica * s->share + (int64_t)mb * s->micro;
        PW_CHECK(pw_program_set_rng(s->p, slot, s->cfg.seed, s->next_step, offset));
    }
    PW_CHECK(pw_program_forward(s->p, slot, s->micro));
    if (s->has_loss && s->async) { /* the statistics reach the host at completion */
        s->loss_mb = mb;
        s->loss_slot = slot;
    } else if (s->has_loss) {
        s->mb_loss[mb] = pw_program_loss_sum(s->p, slot);
        s->mb_correct[mb] = pw_program_correct(s->p, slot);
    }
    return PW_OK;
}

static pw_status ps_backward_input(void *self, int mb, int slot)
{
    (void)mb;
    return pw_program_backward_input(((pw_program_stage *)self)->p, slot);
}

static pw_status ps_backward_weight(void *self, int mb, int slot)
{
    (void)mb;
    return pw_program_backward_weight(((pw_program_stage *)self)->p, slot);
}

static pw_status ps_optimizer_step(void *self, long step)
{
    pw_program_stage *s = self;
    PW_CHECK(pw_program_optimizer_step(s->p, step));
    s->next_step = (int64_t)step + 1;
    return PW_OK;
}

/* Post-validation (pw_stage_i.optimizer_try): complete inside the call. */
static pw_status ps_optimizer_try(void *self, long step)
{
    pw_program_stage *s = self;
    PW_CHECK(pw_program_optimizer_try(s->p, step));
    PW_CHECK(pw_program_wait(s->p));
    s->next_step = (int64_t)step + 1;
    return PW_OK;
}

static pw_status ps_optimizer_commit(void *self)
{
    pw_program_stage *s = self;
    PW_CHECK(pw_program_optimizer_commit(s->p));
    return pw_program_wait(s->p);
}

static pw_status ps_optimizer_undo(void *self)
{
    pw_program_stage *s = self;
    PW_CHECK(pw_program_optimizer_undo(s->p));
    return pw_program_wait(s->p);
}

static pw_status ps_zero_grads(void *self)
{
    pw_program_stage *s = self;
    pw_program_zero_grads(s->p);
    return pw_program_wait(s->p);
}

static size_t ps_port_bytes(void *self, pw_port port)
{
    return pw_program_port_bytes(((pw_program_stage *)self)->p, port);
}

static pw_status ps_bind(void *self, int slot, pw_port port, void *buf)
{
    return pw_program_bind_port(((pw_program_stage *)self)->p, slot, port, buf);
}

/* The spans of parameter i: each of its use buffers (one for an untied
 * parameter). Returns how many it has, writing up to max. */
static int param_spans(const pw_program *p, int i, pw_span *spans, int max)
{
    pw_program_param pp;
    pw_program_param_at(p, i, &pp);
    float *uses[PW_MAX_OP_PARAMS * 8];
    const int cap = (int)(sizeof uses / sizeof uses[0]);
    int nu = pw_program_param_uses(p, i, uses, cap);
    if (nu > cap) {
        PW_WARN("program stage: parameter %s has %d uses in one program; %d are all-reduced", pp.name, nu, cap);
        nu = cap;
    }
    for (int u = 0; u < nu && u < max; u++) spans[u] = (pw_span){uses[u], pp.numel};
    return nu;
}

/* With as many buckets as parameters, bucket b is parameter n−1−b alone
 * (the last first, the order the backward finishes them); otherwise bucket
 * 0 is every parameter in order and the others are empty. The spans stay
 * put: the program's arena never moves. */
static int ps_grad_bucket(void *self, int bucket, int n_buckets, pw_span *spans, int max_spans)
{
    pw_program_stage *s = self;
    const int np = pw_program_n_params(s->p);
    if (n_buckets >= np) {
        const int i = np - 1 - bucket;
        return i >= 0 ? param_spans(s->p, i, spans, max_spans) : 0;
    }
    if (bucket != 0) return 0;
    int n = 0;
    for (int i = 0; i < np; i++) n += param_spans(s->p, i, spans + (n < max_spans ? n : max_spans),
                                                  n < max_spans ? max_spans - n : 0);
    return n;
}

/* The rows of ps_grad_bucket's spans, in its order: a weight of 2 or more
 * dimensions is (dim 0, the rest), for PowerSGD (runtime/compress.h). */
static int param_rows(const pw_program *p, int i, int64_t *rows, int max)
{
    pw_program_param pp;
    pw_program_param_at(p, i, &pp);
    const int cap = PW_MAX_OP_PARAMS * 8; /* as param_spans */
    int nu = pw_program_param_uses(p, i, NULL, 0);
    if (nu > cap) nu = cap;
    for (int u = 0; u < nu && u < max; u++) rows[u] = pp.shape.ndim >= 2 ? pp.shape.d[0] : 0;
    return nu;
}

static void ps_grad_bucket_rows(void *self, int bucket, int n_buckets, int64_t *rows, int max)
{
    pw_program_stage *s = self;
    const int np = pw_program_n_params(s->p);
    if (n_buckets >= np) {
        const int i = np - 1 - bucket;
        if (i >= 0) (void)param_rows(s->p, i, rows, max);
        return;
    }
    if (bucket != 0) return;
    int n = 0;
    for (int i = 0; i < np; i++) n += param_rows(s->p, i, rows + (n < max ? n : max), n < max ? max - n : 0);
}

/* Parameter i's folded gradient as host floats: the program's own buffer on
 * the CPU, a downloaded copy in *tmp (grown as needed) on a device. */
static pw_status host_grad(pw_program *p, int i, const pw_program_param *pp, float **tmp, float **out)
{
    *out = pp->grad;
    if (!pw_program_on_device(p)) return PW_OK;
    float *t = realloc(*tmp, (size_t)pp->numel * sizeof *t + 1);
    if (!t) return pw_error(PW_ERR_NOMEM, "program stage: out of memory reading the gradient of %s", pp->name);
    *tmp = *out = t;
    return pw_program_param_read(p, i, PW_PARAM_GRAD, 0, t);
}

static double ps_grad_sumsq(void *self)
{
    pw_program_stage *s = self;
    double sum = 0.0;
    float *tmp = NULL;
    pw_program_fold_grads(s->p);
    for (int i = 0; i < pw_program_n_params(s->p); i++) {
        pw_program_param pp;
        pw_program_param_at(s->p, i, &pp);
        float *gr;
        if (host_grad(s->p, i, &pp, &tmp, &gr) != PW_OK) {
            /* A NaN norm: the optimizer's finiteness check stops the step. */
            PW_WARN("program stage: %s", pw_last_error());
            free(tmp);
            return NAN;
        }
        for (int64_t k = 0; k < pp.numel; k++) sum += (double)gr[k] * (double)gr[k];
    }
    free(tmp);
    return sum;
}

static void ps_scale_grads(void *self, float scale)
{
    pw_program_stage *s = self;
    float *tmp = NULL;
    pw_program_fold_grads(s->p);
    for (int i = 0; i < pw_program_n_params(s->p); i++) {
        pw_program_param pp;
        pw_program_param_at(s->p, i, &pp);
        float *gr;
        pw_status st = host_grad(s->p, i, &pp, &tmp, &gr);
        if (st == PW_OK) {
            for (int64_t k = 0; k < pp.numel; k++) gr[k] *= scale;
            if (pw_program_on_device(s->p)) st = pw_program_param_write(s->p, i, PW_PARAM_GRAD, gr);
        }
        if (st != PW_OK) PW_WARN("program stage: clipping the gradient of %s: %s", pp.name, pw_last_error());
    }
    free(tmp);
}

/* The program's completion (a backend thread): the forward's loss is on
 * the host now; then the engine's done. */
static void ps_completed(void *arg, pw_status st, const char *msg)
{
    pw_program_stage *s = arg;
    if (s->loss_mb >= 0 && st == PW_OK) {
        s->mb_loss[s->loss_mb] = pw_program_loss_sum(s->p, s->loss_slot);
        s->mb_correct[s->loss_mb] = pw_program_correct(s->p, s->loss_slot);
    }
    s->loss_mb = -1;
    s->done(s->done_arg, st, msg);
}

static int ps_submitted(void *self, pw_stage_done_fn done, void *arg)
{
    pw_program_stage *s = self;
    if (!s->async) return 0;
    s->done = done;
    s->done_arg = arg;
    if (pw_program_submitted(s->p, ps_completed, s)) return 1;
    s->loss_mb = -1;
    return 0;
}

static const pw_stage_i program_stage_i = {
    .name = "program-stage",
    .forward = ps_forward,
    .backward_input = ps_backward_input,
    .backward_weight = ps_backward_weight,
    .optimizer_step = ps_optimizer_step,
    .port_bytes = ps_port_bytes,
    .bind = ps_bind,
    .grad_bucket = ps_grad_bucket,
    .grad_bucket_rows = ps_grad_bucket_rows,
    .grad_sumsq = ps_grad_sumsq,
    .scale_grads = ps_scale_grads,
    .submitted = ps_submitted,
    .optimizer_try = ps_optimizer_try,
    .optimizer_commit = ps_optimizer_commit,
    .optimizer_undo = ps_optimizer_undo,
    .zero_grads = ps_zero_grads,
};

pw_status pw_program_stage_create(const pw_program_stage_config *cfg, pw_program_stage **out)
{
    *out = NULL;
    if (!cfg || !cfg->program) return pw_error(PW_ERR_INVALID_ARG, "program stage: no program given");
    const pw_program_config *pc = pw_program_get_config(cfg->program);
    const pw_graph *g = pc->graph;
    const int R = cfg->replicas > 0 ? cfg->replicas : 1, M = cfg->micro_batches;
    if (M < 1 || cfg->replicas < 0)
        return pw_error(PW_ERR_INVALID_ARG, "program stage: micro-batches (%d) must be at least 1 and "
                        "replicas (%d) not negative", M, cfg->replicas);
    if (cfg->batch < 1 || cfg->batch % ((int64_t)R * M) != 0)
        return pw_error(PW_ERR_INVALID_ARG, "program stage: batch %lld is not a positive multiple of "
                        "replicas x micro-batches (%d x %d)", (long long)cfg->batch, R, M);
    if (cfg->replica < 0 || cfg->replica >= R)
        return pw_error(PW_ERR_INVALID_ARG, "program stage: replica %d of %d", cfg->replica, R);
    const int64_t micro = cfg->batch / R / M;
    if (pc->micro_batch != micro)
        return pw_error(PW_ERR_INVALID_ARG, "program stage: the program (nodes [%d, %d)) runs micro-batches "
                        "of %lld samples, but batch %lld over %d replica(s) x %d micro-batches makes %lld",
                        pc->node_begin, pc->node_end, (long long)pc->micro_batch, (long long)cfg->batch, R, M,
                        (long long)micro);
    pw_program_stage *s = calloc(1, sizeof *s);
    if (!s) return pw_error(PW_ERR_NOMEM, "program stage: out of memory");
    s->p = cfg->program;
    s->g = g;
    s->cfg = *cfg;
    s->cfg.replicas = R;
    s->micro = micro;
    s->share = cfg->batch / R;
    s->next_step = cfg->first_step > 0 ? cfg->first_step : 1;
    s->sampler_epoch = -1;
    s->loss_mb = -1;
    /* pw_program_data is non-NULL exactly for the graph input and label
     * that the program's nodes read. */
    s->reads_input = g->input >= 0 && pw_program_data(s->p, g->input, 0) != NULL;
    s->reads_label = g->label >= 0 && pw_program_data(s->p, g->label, 0) != NULL;
    s->has_loss = pw_program_has_loss(s->p);
    pw_status st = PW_OK;
    if ((s->reads_input || s->reads_label) && !cfg->data && !cfg->load) {
        st = pw_error(PW_ERR_INVALID_ARG, "program stage: the program (nodes [%d, %d)) reads the graph's "
                      "%s, but the stage has neither data nor a load function", pc->node_begin, pc->node_end,
                      s->reads_input ? "input" : "label");
        goto fail;
    }
    if ((s->reads_input || s->reads_label) && !cfg->load) {
        PW_CHECK_GOTO(pw_trainer_check_batching(g, cfg->data, cfg->batch, M, R), st, fail);
        s->steps_per_epoch = cfg->data->n / cfg->batch;
        PW_CHECK_GOTO(pw_sampler_init(&s->sampler, cfg->data->n, cfg->shuffle, cfg->seed), st, fail);
    }
    s->mb_loss = calloc((size_t)M, sizeof *s->mb_loss);
    s->mb_correct = calloc((size_t)M, sizeof *s->mb_correct);
    if (!s->mb_loss || !s->mb_correct) {
        st = pw_error(PW_ERR_NOMEM, "program stage: out of memory");
        goto fail;
    }
    s->async = pw_program_set_async(s->p, cfg->async != 0);
    *out = s;
    return PW_OK;
fail:
    pw_program_stage_destroy(s);
    return st;
}

void pw_program_stage_destroy(pw_program_stage *s)
{
    if (!s) return;
    pw_sampler_free(&s->sampler);
    free(s->mb_loss);
    free(s->mb_correct);
    free(s);
}

pw_engine_chunk pw_program_stage_chunk(pw_program_stage *s) { return (pw_engine_chunk){&program_stage_i, s}; }

pw_program *pw_program_stage_program(const pw_program_stage *s) { return s->p; }

int pw_program_stage_loss(const pw_program_stage *s, double *loss_sum, int64_t *correct)
{
    double l = 0.0;
    int64_t c = 0;
    for (int m = 0; s->has_loss && m < s->cfg.micro_batches; m++) {
        l += s->mb_loss[m];
        c += s->mb_correct[m];
    }
    if (loss_sum) *loss_sum = l;
    if (correct) *correct = c;
    return s->has_loss;
}

void pw_program_stage_seek(pw_program_stage *s, int64_t next_step) { s->next_step = next_step; }
