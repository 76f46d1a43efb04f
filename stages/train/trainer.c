/* pipewright — single-stage training loop. */
#include "stages/train/trainer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/collective.h"
#include "runtime/log.h"
#include "stages/ops/tp.h"
#include "stages/train/tp_team.h"

struct pw_trainer {
    pw_trainer_config cfg;
    pw_program *prog;          /* rank 0's (the only one at T = 1) */
    /* Tensor parallelism (cfg.tensor_parallel = T > 1): rank k's graph and
     * program, the group, and the team of threads (rank 0 is the caller). */
    int T;
    pw_graph **rank_g;         /* [T]; NULL at T = 1 */
    pw_program **progs;        /* [T]; progs[0] == prog */
    pw_shm_group *group;
    pw_tp_team *team;
    atomic_int abort;          /* raised when a rank fails: the others' all-reduces return */
    /* a run's arguments and per-rank results */
    const pw_dataset *job_data;
    const int64_t *job_order;
    double *rank_loss;         /* [T] */
    int64_t *rank_correct;     /* [T] */
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

/* Rank graphs, programs, the group and the helper threads (T > 1). */
static pw_status tp_open(pw_trainer *t, const pw_program_config *pc)
{
    const pw_trainer_config *c = &t->cfg;
    const int T = t->T;
    if (!pw_graph_tp_marked(c->graph))
        return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism %d: graph '%s' marks no op to split (tp=column, "
                        "tp=row or tp=vocab; docs/parallelism.md, \"Tensor parallelism\")", T, c->graph->name);
    t->rank_g = calloc((size_t)T, sizeof *t->rank_g);
    if (!t->rank_g) return pw_error(PW_ERR_NOMEM, "trainer: out of memory");
    PW_CHECK(pw_shm_group_create(T, &t->group));
    for (int k = 0; k < T; k++) {
        PW_CHECK(pw_graph_tp_rank(c->graph, T, k, &t->rank_g[k]));
        pw_program_config rc = *pc;
        rc.graph = t->rank_g[k];
        PW_CHECK(pw_program_create(&rc, &t->progs[k]));
        pw_tp tp = {.rank = k, .size = T, .coll = pw_shm_group_member(t->group, k), .abort = &t->abort};
        PW_CHECK(pw_program_set_tp(t->progs[k], &tp));
    }
    t->prog = t->progs[0];
    return PW_OK;
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
    if (c->tensor_parallel < 0 || c->tensor_parallel > 64)
        return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism %d: must be 1 to 64 ranks", c->tensor_parallel);

    pw_trainer *t = calloc(1, sizeof *t);
    if (!t) return pw_error(PW_ERR_NOMEM, "trainer: out of memory");
    t->cfg = *c;
    t->T = c->tensor_parallel > 1 ? c->tensor_parallel : 1;
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
    pw_status st = PW_OK;
    t->progs = calloc((size_t)t->T, sizeof *t->progs);
    t->rank_loss = calloc((size_t)t->T, sizeof *t->rank_loss);
    t->rank_correct = calloc((size_t)t->T, sizeof *t->rank_correct);
    if (!t->progs || !t->rank_loss || !t->rank_correct) st = pw_error(PW_ERR_NOMEM, "trainer: out of memory");
    else if ((st = pw_tp_team_create(t->T, &t->abort, &t->team)) != PW_OK) {
    } else if (t->T > 1) st = tp_open(t, &pc);
    else st = pw_program_create(&pc, &t->progs[0]);
    if (st == PW_OK) t->prog = t->progs[0];
    if (st == PW_OK) st = pw_sampler_init(&t->sampler, c->train->n, c->shuffle, c->seed);
    if (st != PW_OK) {
        pw_trainer_destroy(t);
        return st;
    }
    /* A split parameter starts as its slice of the full tensor's values. */
    for (int k = 0; k < t->T; k++) pw_program_init_params(t->progs[k], c->seed);
    *out = t;
    return PW_OK;
}

void pw_trainer_destroy(pw_trainer *t)
{
    if (!t) return;
    pw_tp_team_destroy(t->team); /* joins the helpers first */
    for (int k = 0; t->progs && k < t->T; k++) pw_program_destroy(t->progs[k]);
    for (int k = 0; t->rank_g && k < t->T; k++) pw_graph_destroy(t->rank_g[k]);
    pw_shm_group_destroy(t->group);
    free(t->rank_g);
    free(t->progs);
    free(t->rank_loss);
    free(t->rank_correct);
    pw_sampler_free(&t->sampler);
    free(t);
}

pw_program *pw_trainer_program(pw_trainer *t) { return t->prog; }

int pw_trainer_programs(pw_trainer *t, pw_program *const **progs)
{
    *progs = t->progs;
    return t->T;
}
int64_t pw_trainer_steps_per_epoch(const pw_trainer *t) { return t->steps_per_epoch; }
void pw_trainer_seek(pw_trainer *t, int64_t step) { t->step = step; }

/* Fills a program's input and label buffers for `n` samples. */
static pw_status load_micro(pw_trainer *t, pw_program *p, const pw_dataset *d, const int64_t *idx, int64_t n)
{
    const pw_graph *g = t->cfg.graph;
    return pw_dataset_gather(d, idx, n, pw_program_value(p, g->input, 0), pw_program_value(p, g->label, 0));
}

/* Rank k's share of a step: every micro-batch's forward and backward on its
 * program (all ranks the same samples; the split ops meet in the group). */
static pw_status rank_step(pw_trainer *t, int k, double *loss, int64_t *correct)
{
    pw_program *p = t->progs[k];
    *loss = 0.0;
    *correct = 0;
    for (int m = 0; m < t->cfg.micro_batches; m++) {
        PW_CHECK(load_micro(t, p, t->cfg.train, t->job_order + (int64_t)m * t->micro, t->micro));
        /* Dropout masks are keyed by (seed, step, global sample index). */
        if (pw_program_needs_rng(p))
            PW_CHECK(pw_program_set_rng(p, 0, t->cfg.seed, t->step + 1, (int64_t)m * t->micro));
        PW_CHECK(pw_program_forward(p, 0, t->micro));
        *loss += pw_program_loss_sum(p, 0);
        *correct += pw_program_correct(p, 0);
        PW_CHECK(pw_program_backward_input(p, 0));
        PW_CHECK(pw_program_backward_weight(p, 0));
    }
    return PW_OK;
}

/* Rank k's share of an evaluation over t->job_data. */
static pw_status rank_eval(pw_trainer *t, int k, double *loss, int64_t *correct)
{
    const pw_dataset *d = t->job_data;
    pw_program *p = t->progs[k];
    *loss = 0.0;
    *correct = 0;
    int64_t *idx = malloc((size_t)t->micro * sizeof *idx);
    if (!idx) return pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
    pw_status st = PW_OK;
    for (int64_t start = 0; st == PW_OK && start < d->n; start += t->micro) {
        int64_t n = d->n - start < t->micro ? d->n - start : t->micro;
        for (int64_t i = 0; i < n; i++) idx[i] = start + i;
        st = load_micro(t, p, d, idx, n);
        if (st == PW_OK) st = pw_program_forward_eval(p, 0, n);
        if (st == PW_OK) {
            *loss += pw_program_loss_sum(p, 0);
            *correct += pw_program_correct(p, 0);
        }
    }
    free(idx);
    return st;
}

static pw_status step_rank(void *arg, int k)
{
    pw_trainer *t = arg;
    return rank_step(t, k, &t->rank_loss[k], &t->rank_correct[k]);
}

static pw_status eval_rank(void *arg, int k)
{
    pw_trainer *t = arg;
    return rank_eval(t, k, &t->rank_loss[k], &t->rank_correct[k]);
}

pw_status pw_trainer_step(pw_trainer *t, pw_step_stats *out)
{
    const int64_t epoch = t->step / t->steps_per_epoch;
    const int64_t in_epoch = t->step % t->steps_per_epoch;
    if (epoch != t->sampler_epoch) {
        pw_sampler_epoch(&t->sampler, (int)epoch);
        t->sampler_epoch = epoch;
    }
    t->job_order = t->sampler.order + in_epoch * t->cfg.batch;
    PW_CHECK(pw_tp_team_run(t->team, step_rank, t));
    /* Every rank has the same loss (the cross-entropy is replicated or
     * reduced to the same numbers on each): rank 0's. */
    double loss = t->rank_loss[0];
    const int64_t correct = t->rank_correct[0];
    int64_t positions = t->cfg.batch * pw_program_loss_positions(t->prog);
    loss /= (double)positions;
    if (!isfinite(loss)) {
        for (int k = 0; k < t->T; k++) pw_program_zero_grads(t->progs[k]);
        return pw_error(PW_ERR_NUMERIC, "step %lld: loss is %f; lower the learning rate "
                        "(--lr %g now)", (long long)t->step + 1, loss, (double)t->cfg.optim.lr);
    }
    /* Element-wise updates: each rank steps its part. */
    for (int k = 0; k < t->T; k++) PW_CHECK(pw_program_optimizer_step(t->progs[k], t->step + 1));
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
    t->job_data = d;
    PW_CHECK(pw_tp_team_run(t->team, eval_rank, t));
    const double loss = t->rank_loss[0];
    const int64_t correct = t->rank_correct[0];
    int64_t positions = d->n * pw_program_loss_positions(t->prog);
    out->loss = positions ? loss / (double)positions : 0.0;
    out->accuracy = positions ? (double)correct / (double)positions : 0.0;
    out->samples = d->n;
    return PW_OK;
}
