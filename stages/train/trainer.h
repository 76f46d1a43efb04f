/* pipewright — single-stage training loop over a graph program.
 *
 * Runs one optimizer step as M micro-batches of batch/M samples: forward,
 * backward-input and backward-weight per micro-batch (weight gradients
 * accumulate in micro-batch order), then the optimizer. The loss is averaged
 * over the global batch, so M micro-batches of b samples give the same update
 * as one batch of M·b (up to float summation order).
 *
 *     pw_trainer_config tc = {.graph = g, .train = ds, .batch = 64,
 *                             .micro_batches = 4, .optim = oc, .seed = 1};
 *     pw_trainer *t;
 *     PW_CHECK(pw_trainer_create(&tc, &t));
 *     pw_step_stats s;
 *     for (int i = 0; i < 100; i++) PW_CHECK(pw_trainer_step(t, &s));
 *     pw_eval_stats e;
 *     PW_CHECK(pw_trainer_evaluate(t, test_ds, &e));
 *     pw_trainer_destroy(t);
 *
 * The pipeline engine (several stages) drives the same programs through the
 * scheduler's stage interface; this loop is the one-stage reference.
 *
 * Tensor parallelism (cfg.tensor_parallel = T > 1): the trainer makes the
 * graph's T rank graphs (pw_graph_tp_rank), a program for each and an
 * in-process group (runtime/collective.h), and runs rank k's forward and
 * backward on its own thread (rank 0 on the caller's, T − 1 helper threads
 * owned by the trainer); each rank steps its part of the parameters. When a
 * rank fails, the others' collectives are aborted and the trainer may then
 * only be destroyed.
 *
 * Ownership and threads: a trainer copies its config, borrows the graph and
 * the data sets (they must outlive it) and owns its programs
 * (pw_trainer_program's pointer is valid until destroy). One thread uses a
 * trainer; the kernels it calls spread over the CPU thread team.
 */
#ifndef PW_STAGES_TRAINER_H
#define PW_STAGES_TRAINER_H

#include <stdint.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "stages/train/data.h"
#include "stages/ops/optim.h"
#include "stages/program/program.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_trainer pw_trainer;

typedef struct pw_trainer_config {
    const pw_graph *graph;
    const pw_dataset *train;   /* borrowed; must outlive the trainer */
    int64_t batch;             /* samples per optimizer step (global batch) */
    int micro_batches;         /* M ≥ 1, divides batch */
    pw_optim_config optim;
    uint64_t seed;             /* parameter init and shuffling */
    int shuffle;               /* 0: data in file order every epoch */
    int recompute;             /* keep only inputs; recompute the forward in backward */
    int grad_groups;           /* G (pw_grad_groups, stages/program/program.h): the micro-batch
                                  gradients are summed in G groups, pairwise; 0: the
                                  default, as a pipeline's */
    int tensor_parallel;       /* T: the graph's tp= ops split over T ranks, threads of this
                                  process (docs/parallelism.md, "Tensor parallelism");
                                  0 or 1: none. CPU only */
} pw_trainer_config;

typedef struct pw_step_stats {
    int64_t step;              /* optimizer steps done, counting this one */
    int64_t epoch;             /* epoch this step belonged to (from 0) */
    int64_t step_in_epoch;     /* from 1 */
    double loss;               /* mean loss over the batch */
    double accuracy;           /* fraction of correct argmax predictions */
} pw_step_stats;

typedef struct pw_eval_stats {
    double loss;
    double accuracy;
    int64_t samples;
} pw_eval_stats;

/* Checks that the data set fits the graph (sample shape, labels against the
 * loss's classes) and plans the program. */
pw_status pw_trainer_create(const pw_trainer_config *cfg, pw_trainer **out);
void pw_trainer_destroy(pw_trainer *t); /* accepts NULL */

/* Rank 0's program (the only one at T = 1; at T > 1 its parameters are
 * rank 0's parts). */
pw_program *pw_trainer_program(pw_trainer *t);
/* Every rank's program, rank order (T of them): what pw_checkpoint_save and
 * pw_checkpoint_load take with the full graph (checkpoint.h: split
 * parameters are gathered and split there). */
int pw_trainer_programs(pw_trainer *t, pw_program *const **progs);
int64_t pw_trainer_steps_per_epoch(const pw_trainer *t);
/* Moves to an absolute step count (resuming from a checkpoint): the next
 * step is step+1, its batch the one a fresh run would use then. */
void pw_trainer_seek(pw_trainer *t, int64_t step);

/* One optimizer step on the next batch. PW_ERR_NUMERIC on a non-finite loss
 * (parameters are left as they were before the step). */
pw_status pw_trainer_step(pw_trainer *t, pw_step_stats *out);

/* Forward-only pass over a whole data set (any size). */
pw_status pw_trainer_evaluate(pw_trainer *t, const pw_dataset *d, pw_eval_stats *out);

/* Checks a run's batching against its data (M ≥ 1, the batch a positive
 * multiple of replicas × M and no larger than the data set) and then the data
 * against the graph. Shared by the trainer and the pipeline. */
pw_status pw_trainer_check_batching(const pw_graph *g, const pw_dataset *d, int64_t batch,
                                    int micro_batches, int replicas);

/* Checks a data set against the graph's input and label
 * (pw_dataset_check_graph). */
pw_status pw_trainer_check_data(const pw_graph *g, const pw_dataset *d);

#ifdef __cplusplus
}
#endif
#endif
