/* pipewright — a graph program as an engine chunk: ports, data and loss.
 *
 * pw_program_stage_i (stages/program/program.h) is the bare program: no message
 * ports, no data. To run a program under the engine a chunk also has to
 * hand its boundary values to its neighbours (the ports of
 * scheduler/stage.h), load the graph input and label of each micro-batch
 * when its nodes read them, give dropout its randomness, keep each
 * micro-batch's loss, and describe its gradients to the replicas'
 * all-reduce. A pw_program_stage does all of that for one program:
 *
 *     int K;                                  // the gradient groups pw_pipeline uses
 *     pw_grad_groups(0, R, M, &K);
 *     pw_program_config pc = {.graph = g, .node_begin = cut[c], .node_end = cut[c + 1],
 *                             .micro_batch = B / (R * M), .loss_batch = B,
 *                             .slots = spec->slots, .optim = optim,
 *                             .micro_batches = M, .grad_groups = K};
 *     pw_program *p;
 *     PW_CHECK(pw_program_create(&pc, &p));
 *     pw_program_init_params(p, seed);
 *     pw_program_stage_config sc = {.program = p, .data = train, .batch = B,
 *                                   .micro_batches = M, .replica = k, .replicas = R,
 *                                   .seed = seed, .shuffle = 1};
 *     pw_program_stage *s;
 *     PW_CHECK(pw_program_stage_create(&sc, &s));
 *     chunks[k * C + c] = pw_program_stage_chunk(s);   // {vtable, s} for the engine
 *     ...
 *     pw_program_stage_destroy(s);                      // after the engine
 *     pw_program_destroy(p);
 *
 * Data. Step t (counting from 1) takes the B samples order[j·B .. j·B + B)
 * of epoch e = (t − 1) / (n / B), j = (t − 1) mod (n / B), where order is
 * the pw_sampler order of the data set (file order, or the seeded shuffle);
 * micro-batch m of replica k is the `B / (R·M)` samples from
 * k·B/R + m·B/(R·M) on. This is pw_pipeline's and pw_trainer's order, so the
 * same programs give the same bits through either. A chunk whose nodes read
 * neither the graph input nor the label (a middle chunk) needs no data; a
 * custom source can fill them through `load` instead of a data set. A stage
 * that reads a data set keeps its own copy of the epoch order (8 bytes a
 * sample), so no two workers share mutable state.
 *
 * Steps. The stage counts steps itself: its first forward belongs to step
 * `first_step` (0: 1) and optimizer_step(t) makes the next forward's step
 * t + 1, which is the engine's numbering when it is run from step 1 (or
 * from first_step) on. The step selects the data and the dropout masks.
 *
 * Replicas. The engine sums each gradient bucket across the replicas with
 * the tree of runtime/collective.h: every element is the pairwise sum over
 * the replicas in index order whatever the bucket's length, so the bucket
 * layout does not change a bit. With fewer buckets per chunk than the
 * program has parameters, bucket 0 is every gradient buffer of the program
 * (each parameter's use buffers, in parameter order) and the others are
 * empty; with at least as many buckets as parameters, bucket b is
 * parameter n − 1 − b alone (the last layers first), so each bucket's
 * all-reduce can start as soon as its layer's last backward is done. For
 * the bits of pw_pipeline (and of one replica, for R dividing the gradient
 * groups), create the program with the gradient groups pw_pipeline uses
 * (pw_grad_groups, above).
 *
 * What it does not do: sum a parameter tied across two programs (a GPT's
 * token embedding on the first chunk reused by its head on the last).
 * pw_pipeline handles that case (stages/train/pipeline.h, "Chunks"); a tie within
 * one program is fine.
 *
 * Ownership, lifetime, threads. The stage borrows the program, the data
 * set and load_arg: each must outlive it. The engine calls a chunk from its
 * rank's worker thread only, never two calls at once, so the stage needs no
 * lock; every other function here is for the thread that owns the stage,
 * between steps (never while pw_engine_run_step runs). One stage per
 * program: two stages over one program would share its slots.
 */
#ifndef PW_STAGES_PROGRAM_STAGE_H
#define PW_STAGES_PROGRAM_STAGE_H

#include <stdint.h>

#include "runtime/status.h"
#include "scheduler/engine.h"
#include "scheduler/stage.h"
#include "stages/train/data.h"
#include "stages/program/program.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_program_stage pw_program_stage;

/* Fills the graph input and label of `rows` samples: micro-batch `mb` of
 * replica `replica` in step `step` (from 1). `x` is (rows, numel of the
 * input) of the input's dtype (float, or int32_t tokens), NULL when the
 * program does not read the input; `y` is (rows, numel of the label) class
 * indices, NULL when it does not read the label. Called on the worker
 * thread of the chunk, before its forward. */
typedef pw_status (*pw_program_stage_load_fn)(void *arg, int64_t step, int replica, int mb,
                                              int64_t rows, void *x, int32_t *y);

typedef struct pw_program_stage_config {
    pw_program *program;         /* borrowed; its micro_batch must be batch / (replicas ×
                                    micro_batches) and its slots at least the schedule's
                                    peak for the chunk */
    int64_t batch;               /* B: samples per optimizer step, all replicas and
                                    micro-batches together (what the loss averages over:
                                    the program's loss_batch) */
    int micro_batches;           /* M per step */
    int replica;                 /* k: this chunk's replica, 0 .. replicas − 1 */
    int replicas;                /* R (0: 1) */
    const pw_dataset *data;      /* (optional) borrowed: where the graph input and label
                                    come from when the program reads them */
    int shuffle;                 /* with data: a seeded shuffle each epoch (pw_sampler) */
    uint64_t seed;               /* the shuffle's and dropout's seed: the run's seed */
    pw_program_stage_load_fn load;  /* (optional) instead of data */
    void *load_arg;
    int64_t first_step;          /* the step of the first forward (0: 1) */
    int async;                   /* 1: a device program returns from each call once its
                                    work is queued (pw_program_set_async; the engine's
                                    pending completions). 0: every call completes
                                    before it returns */
} pw_program_stage_config;

/* PW_OK: *out is a new stage. PW_ERR_INVALID_ARG (*out NULL) when the
 * program is missing, the batch is not a positive multiple of replicas × M,
 * the program's micro_batch is not batch / (replicas × M), the replica is
 * out of range, or the program reads the graph input or label and neither
 * data nor load is given; a data set that does not fit the graph or the
 * batch gives pw_trainer_check_batching's error. PW_ERR_NOMEM. */
pw_status pw_program_stage_create(const pw_program_stage_config *cfg, pw_program_stage **out);
void pw_program_stage_destroy(pw_program_stage *s); /* accepts NULL */

/* The engine chunk: {the stage vtable, s}. The vtable has forward,
 * backward_input, backward_weight, optimizer_step, port_bytes and bind
 * (the program's ports), grad_bucket, grad_sumsq and scale_grads (replicas
 * and clipping) and submitted (async programs). */
pw_engine_chunk pw_program_stage_chunk(pw_program_stage *s);

pw_program *pw_program_stage_program(const pw_program_stage *s);

/* The loss of the last step's micro-batches: *loss_sum the sum over them,
 * in micro-batch order, of pw_program_loss_sum, *correct the correct
 * predictions. Returns 1 when the program holds the loss, else 0 (both
 * outputs 0). The step's mean loss is the sum over every replica's
 * last chunk divided by batch × pw_program_loss_positions. */
int pw_program_stage_loss(const pw_program_stage *s, double *loss_sum, int64_t *correct);

/* The step of the next forward (resuming a run). */
void pw_program_stage_seek(pw_program_stage *s, int64_t next_step);

#ifdef __cplusplus
}
#endif
#endif
