/* pipewright — single-stage training loop. */
#include "stages/train/trainer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"

struct pw_trainer {
    pw_trainer_config cfg;
    pw_program *prog;
    int64_t micro;             /* samples per micro-batch */
    int64_t steps_per_epoch;
    int64_t step;              /* steps done */
    pw_sampler sampler;
    int64_t sampler_epoch;     /* epoch the sampler's order is for; -1 none */
};

pw_status pw_trainer_check_data(const pw_graph *g, const pw_dataset *d)
{
    return pw_dataset_check_graph(g, d);
}

pw_status pw_trainer_check_batching(const pw_graph *g, const pw_dataset *d, int64_t batch,
                                    int micro_batches, int replicas)
{
    if (micro_batches < 1)
        return pw_error(PW_ERR_INVALID_ARG, "micro-batches must be at least 1 (got %d)",
                        micro_batches);
    if (replicas < 1) replicas = 1;
    if (batch < 1 || batch % ((int64_t)micro_batches * replicas) != 0)
        return pw_error(PW_ERR_INVALID_ARG, "batch %lld is not a positive multiple of the %d "
                        "micro-batches%s", (long long)batch, micro_batches * replicas,
                        replicas > 1 ? " of every replica (replicas x micro-batches)" : "");
    if (batch > d->n)
        return pw_error(PW_ERR_INVALID_ARG, "batch %lld is larger than the %lld samples of '%s'",
                        (long long)batch, (long long)d->n, d->name);
    return pw_trainer_check_data(g, d);
}

pw_status pw_trainer_create(const pw_trainer_config *cfg, pw_trainer **out)
{
    *out = NULL;
    const pw_trainer_config *c = cfg;
    PW_CHECK(pw_trainer_check_batching(c->graph, c->train, c->batch, c->micro_batches, 1));
    const int G = pw_grad_groups(c->grad_groups, 1, c->micro_batches, NULL);
    if (G < 0)
        return pw_error(PW_ERR_INVALID_ARG, "gradient groups %d: must divide the %d "
                        "micro-batches", c->grad_groups, c->micro_batches);

    pw_trainer *t = calloc(1, sizeof *t);
    if (!t) return pw_error(PW_ERR_NOMEM, "trainer: out of memory");
    t->cfg = *c;
    t->micro = c->batch / c->micro_batches;
    t->steps_per_epoch = c->train->n / c->batch; /* the remainder is dropped */
    t->sampler_epoch = -1;
    pw_program_config pc = {
        .graph = c->graph,
        .micro_batch = t->micro,
        .loss_batch = c->batch,
        .slots = 1,
        .optim = c->optim,
        .recompute = c->recompute,
        .micro_batches = c->micro_batches,
        .grad_groups = G,
    };
    pw_status st = pw_program_create(&pc, &t->prog);
    if (st == PW_OK) st = pw_sampler_init(&t->sampler, c->train->n, c->shuffle, c->seed);
    if (st != PW_OK) {
        pw_trainer_destroy(t);
        return st;
    }
    pw_program_init_params(t->prog, c->seed);
    *out = t;
    return PW_OK;
}

void pw_trainer_destroy(pw_trainer *t)
{
    if (!t) return;
    pw_program_destroy(t->prog);
    pw_sampler_free(&t->sampler);
    free(t);
}

pw_program *pw_trainer_program(pw_trainer *t) { return t->prog; }
int64_t pw_trainer_steps_per_epoch(const pw_trainer *t) { return t->steps_per_epoch; }
void pw_trainer_seek(pw_trainer *t, int64_t step) { t->step = step; }

/* Fills the program's input and label buffers for `n` samples. */
static pw_status load_micro(pw_trainer *t, const pw_dataset *d, const int64_t *idx, int64_t n)
{
    const pw_graph *g = t->cfg.graph;
    return pw_dataset_gather(d, idx, n, pw_program_value(t->prog, g->input, 0),
                             pw_program_value(t->prog, g->label, 0));
}

pw_status pw_trainer_step(pw_trainer *t, pw_step_stats *out)
{
    const int64_t epoch = t->step / t->steps_per_epoch;
    const int64_t in_epoch = t->step % t->steps_per_epoch;
    if (epoch != t->sampler_epoch) {
        pw_sampler_epoch(&t->sampler, (int)epoch);
        t->sampler_epoch = epoch;
    }
    const int64_t *order = t->sampler.order + in_epoch * t->cfg.batch;
    double loss = 0.0;
    int64_t correct = 0;
    for (int m = 0; m < t->cfg.micro_batches; m++) {
        PW_CHECK(load_micro(t, t->cfg.train, order + (int64_t)m * t->micro, t->micro));
        /* Dropout masks are keyed by (seed, step, global sample index). */
        if (pw_program_needs_rng(t->prog))
            PW_CHECK(pw_program_set_rng(t->prog, 0, t->cfg.seed, t->step + 1, (int64_t)m * t->micro));
        PW_CHECK(pw_program_forward(t->prog, 0, t->micro));
        loss += pw_program_loss_sum(t->prog, 0);
        correct += pw_program_correct(t->prog, 0);
        PW_CHECK(pw_program_backward_input(t->prog, 0));
        PW_CHECK(pw_program_backward_weight(t->prog, 0));
    }
    int64_t positions = t->cfg.batch * pw_program_loss_positions(t->prog);
    loss /= (double)positions;
    if (!isfinite(loss)) {
        pw_program_zero_grads(t->prog);
        return pw_error(PW_ERR_NUMERIC, "step %lld: loss is %f; lower the learning rate "
                        "(--lr %g now)", (long long)t->step + 1, loss, (double)t->cfg.optim.lr);
    }
    PW_CHECK(pw_program_optimizer_step(t->prog, t->step + 1));
    t->step++;
    if (out) {
        out->step = t->step;
        out->epoch = epoch;
        out->step_in_epoch = in_epoch + 1;
        out->loss = loss;
        out->accuracy = (double)correct / (double)positions;
    }
    return PW_OK;
}

pw_status pw_trainer_evaluate(pw_trainer *t, const pw_dataset *d, pw_eval_stats *out)
{
    PW_CHECK(pw_trainer_check_data(t->cfg.graph, d));
    int64_t *idx = malloc((size_t)t->micro * sizeof *idx);
    if (!idx) return pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
    double loss = 0.0;
    int64_t correct = 0;
    for (int64_t start = 0; start < d->n; start += t->micro) {
        int64_t n = d->n - start < t->micro ? d->n - start : t->micro;
        for (int64_t i = 0; i < n; i++) idx[i] = start + i;
        pw_status st = load_micro(t, d, idx, n);
        if (st == PW_OK) st = pw_program_forward_eval(t->prog, 0, n);
        if (st != PW_OK) {
            free(idx);
            return st;
        }
        loss += pw_program_loss_sum(t->prog, 0);
        correct += pw_program_correct(t->prog, 0);
    }
    free(idx);
    int64_t positions = d->n * pw_program_loss_positions(t->prog);
    out->loss = positions ? loss / (double)positions : 0.0;
    out->accuracy = positions ? (double)correct / (double)positions : 0.0;
    out->samples = d->n;
    return PW_OK;
}
