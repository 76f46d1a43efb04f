/* pipewright — what a training loop needs around its checkpoints
 * (stages/train/state.h): the run and layout a pipeline describes, and a
 * resumed run's layout fitted to its checkpoint. */
#include <stdio.h>

#include "stages/program/program.h"
#include "stages/train/pipeline-internal.h"
#include "stages/train/state.h"

pw_state_run pw_state_run_of(const pw_pipeline_config *pc, const char *data)
{
    const int R = pc->replicas > 0 ? pc->replicas : 1;
    pw_state_run r = {.data = data, .train_samples = pc->train ? pc->train->n : 0, .batch = pc->batch,
                      .micro_batch = pc->batch / ((int64_t)pc->micro_batches * R),
                      .grad_groups = pw_grad_groups(pc->grad_groups, R, pc->micro_batches, NULL),
                      .seed = pc->seed, .shuffle = pc->shuffle, .clip_grad_norm = pc->clip_grad_norm,
                      .optim = pc->optim};
    return r;
}

pw_state_layout pw_state_layout_of(const pw_pipeline *pl)
{
    pw_state_layout l = {.stages = pl->S, .chunks_per_rank = pl->V, .replicas = pl->NR,
                         .micro_batches = pl->cfg.micro_batches, .processes = pl->t ? pl->t->world_size : 1,
                         .threads = pl->cfg.threads, .tensor_parallel = pl->T, .schedule = pl->schedule_name,
                         .cuts = pl->part.begin,
                         .n_cuts = pl->part.n_stages + 1};
    return l;
}

pw_status pw_state_fit_layout(const pw_state_meta *m, int world, int stages, int64_t batch, int grad_groups,
                              int *replicas, int *micro_batches, int *micro_fixed)
{
    if (world > 1 && world != stages * *replicas && world % stages == 0) {
        *replicas = world / stages;
        *micro_fixed = 0;
    }
    const int64_t per = (int64_t)*replicas * m->run.micro_batch;
    if (!*micro_fixed && per > 0 && batch % per == 0) {
        *micro_batches = (int)(batch / per);
        *micro_fixed = 1;
    }
    if (batch % ((int64_t)*replicas * *micro_batches) != 0 ||
        pw_grad_groups(grad_groups, *replicas, *micro_batches, NULL) < 0)
        return pw_error(PW_ERR_INVALID_ARG, "resume: batch %lld does not split into %d replicas x %d micro-batches "
                        "(the checkpoint's micro-batches hold %lld samples)", (long long)batch, *replicas,
                        *micro_batches, (long long)m->run.micro_batch);
    return PW_OK;
}
