/* pipewright — the stage program: a range of graph nodes compiled to a flat
 * list of ops over planned buffers, run by a backend (stages/ops/backend.h: the
 * CPU by default, CUDA with cfg.device = "cuda:N").
 *
 * One pw_program runs one stage: nodes [node_begin, node_end) of a graph (the
 * whole graph for a single stage). All memory — parameters, gradients,
 * optimizer state, the activation stash (`slots` copies) and saved statistics
 * — is planned first and comes from one arena.
 *
 *     pw_program_config pc = { .graph = g, .micro_batch = 64, .loss_batch = 256,
 *                              .slots = 1, .optim = pw_optim_defaults(PW_OPTIM_SGD) };
 *     pw_program *p;
 *     PW_CHECK(pw_program_create(&pc, &p));
 *     pw_program_init_params(p, seed);
 *     // per micro-batch: fill the stage inputs, then
 *     memcpy(pw_program_data(p, g->input, slot), x, ...);  // = pw_program_value
 *     memcpy(pw_program_data(p, g->label, slot), y, ...);  //   on the CPU
 *     PW_CHECK(pw_program_forward(p, slot, 64));
 *     PW_CHECK(pw_program_backward_input(p, slot));
 *     PW_CHECK(pw_program_backward_weight(p, slot));
 *     // after all micro-batches of the step
 *     PW_CHECK(pw_program_optimizer_step(p, step));
 *
 * Stage boundaries: values consumed here but produced by an earlier stage are
 * inputs (the engine writes them into pw_program_value before forward) and
 * their gradients are read from pw_program_grad after backward_input; values
 * produced here and consumed later are outputs, and their gradients must be
 * written into pw_program_grad before backward_input.
 *
 * Determinism: gradients of a value used several times are summed in reverse
 * node order; weight gradients accumulate in the order backward_weight is
 * called (micro-batch order under every schedule). With cfg.grad_groups
 * K > 1 the step's M micro-batches (cfg.micro_batches) are summed as K
 * groups of M/K consecutive ones, each a running sum, and the K group sums
 * pairwise: (G0 + G1) + (G2 + G3) for K = 4, ((G0 + G1) + (G2 + G3)) +
 * (G4 + G5) for K = 6 — collective.h's tree over K members. That is the
 * shape of a sum that replicas can split: R replicas of M/R micro-batches
 * each, summing theirs with K/R groups (K/R a power of two) and the
 * replicas' sums with the same tree, add the same floats in the same order
 * as one replica (docs/api.md, "Determinism"). It costs ceil(log2 K) more
 * copies of the gradients
 * (pw_program_memory's grad_sums) and a pass over them per group. A tied parameter used by
 * several nodes (an LM head reusing the token embedding) accumulates each
 * use's gradient in its own buffer over the step and sums the uses once, in
 * reverse node order, before the optimizer (pw_program_fold_grads): the one
 * order that a pipeline whose stages hold different uses can reproduce.
 *
 * Randomness (dropout): before each training forward of a graph with
 * dropout, tell the program which step and which samples the slot holds:
 *
 *     pw_program_set_rng(p, slot, seed, step, first_sample_of_micro_batch);
 *     PW_CHECK(pw_program_forward(p, slot, n));
 *
 * Evaluation and generation use pw_program_forward_eval (dropout is the
 * identity there, and no randomness is needed).
 *
 * Recomputation (cfg.recompute): a slot keeps only the stage's inputs (and
 * the values it sends on); backward_input re-runs the slot's forward into
 * one shared scratch region first. Results are bit-identical to running
 * without it; activation memory falls from slots × everything to
 * slots × inputs + one shared copy (pw_program_memory_usage).
 *
 * Device programs (cfg.device = "cuda:N"; docs/cuda.md). The same plan, one
 * device block per memory category, every op through the backend table
 * (stages/ops/backend.h) on the program's compute stream. What changes for the
 * caller:
 *   - pw_program_value / pw_program_grad and pw_program_param's data / grad
 *     are DEVICE pointers; read and write parameters with
 *     pw_program_param_read / pw_program_param_write;
 *   - the graph input and label are written into the host buffer
 *     pw_program_data returns (for a CPU program that is pw_program_value),
 *     and each training or evaluation forward uploads them;
 *   - bound ports stay host memory (the engine's messages): forward uploads
 *     ACT_IN and downloads ACT_OUT, backward uploads GRAD_OUT and downloads
 *     GRAD_IN;
 *   - each call (forward, backward, optimizer step, ...) waits for its GPU
 *     work before returning, so it returns with its results in place and
 *     its errors reported — unless the program is asynchronous
 *     (pw_program_set_async, below: what a pipeline does under the engine),
 *     where the training calls return once their work is enqueued and
 *     report completion through pw_program_submitted;
 *   - pw_program_bind_memory does nothing.
 *
 * Ownership and threads: a program owns its memory (one host arena, or a
 * device backend's blocks) and its backend context, and borrows the graph
 * (which must outlive it). Pointers into its memory (pw_program_value,
 * pw_program_data, the gradient uses) are valid until destroy. A program is
 * used by one thread at a time: the engine calls each chunk from its rank's
 * worker; calls on different programs may run at once (they share only the
 * CPU thread team, stages/ops/cpu/ops.h, which is thread-safe). With
 * pw_program_set_async, completion is reported on another thread (below).
 */
#ifndef PW_STAGES_PROGRAM_H
#define PW_STAGES_PROGRAM_H

#include <stdint.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "runtime/topology.h"
#include "scheduler/stage.h"
#include "stages/ops/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_program pw_program;

typedef struct pw_program_config {
    const pw_graph *graph;
    int node_begin, node_end;  /* [begin, end); both 0 = the whole graph */
    int64_t micro_batch;       /* samples per micro-batch (buffer rows) */
    int64_t loss_batch;        /* samples the loss is averaged over (the global
                                  batch); 0 = micro_batch */
    int slots;                 /* activation stash slots; 0 = 1 */
    pw_optim_config optim;
    int recompute;             /* 1: keep only stage inputs per slot and re-run the
                                  forward of a slot in backward_input (see above).
                                  With a split W (zero-bubble), a backward_weight
                                  that does not directly follow its slot's
                                  backward_input re-runs forward and input backward
                                  once more (its input gradients are not resent). */
    const char *device;        /* backend and device (stages/ops/backend.h): NULL or "cpu"
                                  (default), "cuda:N", "cuda" (= "cuda:0" here). Read
                                  in create only. See "Device programs" above. */
    int math;                  /* a device program's GEMM mode, a pw_math of
                                  stages/ops/backend.h: 0 = fp32 (default), tf32, bf16;
                                  the CPU ignores it */
    int no_graphs;             /* 1: a device program runs every call as made,
                                  never recording a training call for replay
                                  (stages/ops/backend.h, record_begin; docs/cuda.md) */
    int micro_batches;         /* backward_weight calls per step (with grad_groups; a
                                  step with fewer still sums every call, the
                                  optimizer step taking in what is pending, but not
                                  in the documented tree) */
    int grad_groups;           /* K: sum the micro-batches' weight gradients in K
                                  groups, pairwise (see "Determinism" above);
                                  dividing micro_batches; 0 or 1: one running
                                  sum */
    int post_validate;         /* 1: keep room for a copy of the parameters and the
                                  optimizer state, so that an optimizer step can be
                                  taken before the global checks and undone
                                  (pw_program_optimizer_try; docs/engine.md,
                                  "Post-validation") */
} pw_program_config;

/* The default G: at most this many groups. */
#define PW_GRAD_GROUPS_DEFAULT 4

/* The gradient groups of a step of R replicas × M micro-batches
 * (docs/api.md, "Determinism"). Returns G: `requested` when it divides
 * R·M, or for 0 the largest power of two dividing R·M up to
 * PW_GRAD_GROUPS_DEFAULT; -1 when `requested` is not valid. *per_replica
 * (optional) receives K = G / gcd(G, R), the groups each replica sums its M
 * micro-batches in: R | G gives G/R, and the replicas' tree all-reduce then
 * completes the same sum over the G groups that one replica forms when
 * pw_grad_groups_identical(G, R). Each program holds ceil(log2 K) extra
 * copies of its gradients. Pure functions: any thread. */
int pw_grad_groups(int requested, int replicas, int micro_batches, int *per_replica);

/* 1 when R replicas give the same bits as one replica with G gradient
 * groups: R = 1, or R divides G and G / R is a power of two (each replica's
 * groups are then one subtree of the documented tree); else 0. */
int pw_grad_groups_identical(int grad_groups, int replicas);

pw_status pw_program_create(const pw_program_config *cfg, pw_program **out);
void pw_program_destroy(pw_program *p); /* accepts NULL */

/* Bytes of the single arena, by category. `activations` is all slots
 * together (slots × the per-slot stash); `shared` is what one copy serves
 * every slot: kernel workspace, and under recompute the recomputed
 * activations, their gradients and the ops' statistics. */
typedef struct pw_program_memory {
    size_t params, grads, optim_state, activations, total;
    size_t shared;
    size_t grad_sums;          /* log2(grad_groups) copies of grads (counted in total) */
    size_t backup;             /* cfg.post_validate: a copy of params and optim_state
                                  (counted in total) */
} pw_program_memory;
void pw_program_memory_usage(const pw_program *p, pw_program_memory *out);

/* Binds the whole arena (every byte counted above) to the NUMA node(s)
 * `nodes` of `topo` (this machine's), migrating the pages already touched:
 * a stage's memory on the node of the core its worker runs on. Returns
 * pw_mem_bind_area's result: 0 bound; -1 refused, with one PW_WARN naming
 * `who` (the memory stays where it is; never an error). */
int pw_program_bind_memory(const pw_program *p, hwloc_topology_t topo, hwloc_const_nodeset_t nodes,
                           const char *who);

/* ---- parameters (only those used by this stage's nodes) ---- */
int pw_program_n_params(const pw_program *p);
typedef struct pw_program_param {
    int graph_param;     /* index into graph->params */
    const char *name;
    pw_shape shape;
    float *data;
    float *grad;         /* for a parameter used by several nodes of the range:
                            the total only after pw_program_fold_grads */
    int64_t numel;
} pw_program_param;
void pw_program_param_at(const pw_program *p, int i, pw_program_param *out);

/* Whether the program's memory is on a device (pointers not host-addressable). */
int pw_program_on_device(const pw_program *p);
/* Host copies of parameter i, for any program (a memcpy on the CPU, a
 * download or upload that waits on a device): PW_PARAM_DATA its values;
 * PW_PARAM_GRAD use `use` of its gradient (pw_program_param_uses' order; 0
 * is pw_program_param.grad); PW_PARAM_STATE the optimizer's state buffer
 * `use`, 0 <= use < pw_optim_state_floats (SGD: 0 the momentum buffer;
 * AdamW: 0 exp_avg, 1 exp_avg_sq — training-state checkpoints,
 * stages/train/state.h). numel floats each. PW_ERR_INVALID_ARG for a bad index
 * or use; the backend's error otherwise. A write of the gradient writes use
 * 0; a write of the state writes buffer `use` (pw_program_param_write_state). */
typedef enum pw_param_part { PW_PARAM_DATA = 0, PW_PARAM_GRAD, PW_PARAM_STATE } pw_param_part;
pw_status pw_program_param_read(const pw_program *p, int i, pw_param_part part, int use, float *dst);
pw_status pw_program_param_write(pw_program *p, int i, pw_param_part part, const float *src);
/* Writes optimizer state buffer `which` of parameter i (see above). */
pw_status pw_program_param_write_state(pw_program *p, int i, int which, const float *src);

/* Tied parameters. Parameter i accumulates the weight gradient of each node
 * of the range that uses it in its own buffer; writes up to `max` of them
 * into grads (reverse node order of the users: grads[0] is the last user's,
 * and is pw_program_param.grad) and returns how many uses there are (1 for
 * an untied parameter), or -1 for a bad index.
 *
 * The gradient of a tied parameter is defined, whatever the partition, as
 *     total = use_k + use_(k-1) + ... + use_1   (left to right)
 * over ALL its uses in the graph in reverse node order, each use summed over
 * the step's micro-batches in micro-batch order. pw_program_fold_grads
 * computes it for the uses within one program. A pipeline whose stages hold
 * different uses (the embedding on the first stage, the head on the last)
 * reproduces it exactly by, after the step's last backward_weight: reading
 * every copy's use buffers, stages last to first, and adding them up left to
 * right; then on each stage calling pw_program_fold_grads and overwriting
 * the parameter's grad with that total; then the optimizer step, which
 * updates every copy identically. */
int pw_program_param_uses(const pw_program *p, int i, float **grads, int max);
/* (For a device program the pointers are device pointers: read a use with
 * pw_program_param_read(p, i, PW_PARAM_GRAD, use, host).) */
/* Sums each tied parameter's use buffers into its gradient (grads[0] +=
 * grads[1], += grads[2], ...) and zeroes them. Idempotent until the next
 * backward_weight; pw_program_optimizer_step calls it first. Call it before
 * reading or all-reducing parameter gradients of a range with a tie. */
void pw_program_fold_grads(pw_program *p);
/* Fills every parameter from (seed, parameter name): independent of stage. */
void pw_program_init_params(pw_program *p, uint64_t seed);

/* ---- activations ---- */
/* Tensor parallelism (docs/parallelism.md, "Tensor parallelism"): a program
 * of a rank graph (pw_graph_tp_rank, cfg.graph->tp_size > 1) needs its
 * group's endpoint before its first training or evaluation forward; the
 * split linears, embedding and cross-entropy then all-reduce through it
 * (stages/ops/tp.h) inside forward and backward_input, so the T programs of
 * a group must make the same calls in the same order, each on its own
 * thread. tp's rank and size must be the graph's. CPU only (a device
 * program of a rank graph is refused at create). PW_OK or
 * PW_ERR_INVALID_ARG. pw_program_init_params gives a split parameter its
 * slice of the full tensor's initial values: T ranks start where one does. */
typedef struct pw_tp pw_tp;
pw_status pw_program_set_tp(pw_program *p, const pw_tp *tp);

/* Buffer of a value for a slot: (micro_batch, numel) of its dtype; NULL if the
 * value is not touched by this stage. Under recompute, a value that is
 * neither a stage input nor sent on lives in the shared region: the pointer
 * is the same for every slot and holds the slot computed last. */
void *pw_program_value(const pw_program *p, int value, int slot);
/* Gradient buffer (f32, same shape); NULL if the value needs no gradient.
 * Under recompute, interior gradients are shared the same way. */
float *pw_program_grad(const pw_program *p, int value, int slot);
/* The host buffer the caller fills with the graph input or label `value`
 * of `slot` before a forward: pw_program_value for a CPU program; for a
 * device program a host staging buffer that each training or evaluation
 * forward uploads. NULL for any other value or one this stage does not
 * read. */
void *pw_program_data(const pw_program *p, int value, int slot);
/* Values this stage receives from the previous stage (live-in: produced by an
 * earlier node, used here or later) and sends to the next (live-out: produced
 * here or earlier, used later), in value-id order. A value used only by a
 * later stage is both: received and passed on. Graph inputs and labels are
 * not messages; each stage that reads them loads them from the data. */
int pw_program_inputs(const pw_program *p, const int **values);
int pw_program_outputs(const pw_program *p, const int **values);

/* Ports (scheduler/stage.h): one message per micro-batch per direction,
 * holding the live values in id order, each 64-byte aligned. ACT_IN / ACT_OUT
 * hold all live-in / live-out values; GRAD_IN / GRAD_OUT those that need a
 * gradient. 0 bytes = no such port. */
size_t pw_program_port_bytes(const pw_program *p, pw_port port);
/* Points a port of `slot` at a message buffer (NULL: back to the program's
 * own buffers). Forward then reads inputs from ACT_IN and writes outputs
 * straight into ACT_OUT; backward reads GRAD_OUT and writes GRAD_IN. */
pw_status pw_program_bind_port(pw_program *p, int slot, pw_port port, void *buf);

/* The randomness of the next training forward of `slot` (dropout masks):
 *   seed           the run's seed (the one parameters are initialised from);
 *   step           the optimizer step this forward belongs to (from 1);
 *   sample_offset  the index, within the step's global batch (all
 *                  micro-batches, all replicas), of the slot's first sample.
 * Element j of sample i (global index sample_offset + i) of the dropout node
 * whose output value is named NAME is kept when
 *   pw_rng_uniform(pw_rng_u64(pw_rng_key(seed, "dropout:" NAME), step),
 *                  (sample_offset + i) · numel + j) ≥ p,
 * so a sample's mask depends on (seed, node, step, its global index) only:
 * not on the micro-batch size, the schedule or the stage count. A training
 * forward of a range with dropout (p > 0) requires a call since the previous
 * training forward of that slot (PW_ERR_INVALID_ARG otherwise, naming the
 * dropout), so a forgotten update cannot silently reuse masks.
 * Returns PW_ERR_INVALID_ARG for a bad slot or a negative offset. */
pw_status pw_program_set_rng(pw_program *p, int slot, uint64_t seed, int64_t step,
                             int64_t sample_offset);
/* Whether this range has a dropout with p > 0 (needs pw_program_set_rng). */
int pw_program_needs_rng(const pw_program *p);

/* Training forward of `n` samples (1 ≤ n ≤ micro_batch) in `slot`. */
pw_status pw_program_forward(pw_program *p, int slot, int64_t n);
/* Evaluation forward: dropout is the identity, no randomness is used, and
 * the slot cannot be differentiated afterwards (a backward returns
 * PW_ERR_INVALID_ARG). Loss statistics are kept as for training. */
pw_status pw_program_forward_eval(pw_program *p, int slot, int64_t n);
/* Input gradients, in reverse node order. */
pw_status pw_program_backward_input(pw_program *p, int slot);
/* Weight gradients, added into the parameters' gradients. */
pw_status pw_program_backward_weight(pw_program *p, int slot);
/* Applies the optimizer (step counts from 1) and zeroes the gradients. */
pw_status pw_program_optimizer_step(pw_program *p, int64_t step);
/* Post-validation (cfg.post_validate; docs/engine.md): the optimizer step
 * taken before the global checks of the step (gradient-norm clipping) are
 * known. _try does what _optimizer_step does — the same non-finite check
 * and the same update, with the same bits — but first copies the
 * parameters and the optimizer state aside and keeps the gradients. Then
 * exactly one of: _commit (the step stands: zeroes the gradients, as
 * _optimizer_step would have) or _undo (parameters and optimizer state
 * back to their copy; the gradients are still the step's, so the caller
 * may scale them and call _optimizer_step: the synchronous step's bits).
 * _try fails with PW_ERR_INVALID_ARG without cfg.post_validate; _commit and
 * _undo without a _try before are no-ops. */
pw_status pw_program_optimizer_try(pw_program *p, int64_t step);
pw_status pw_program_optimizer_commit(pw_program *p);
pw_status pw_program_optimizer_undo(pw_program *p);
void pw_program_zero_grads(pw_program *p);
/* Sum of per-position losses and count of correct argmax predictions from the
 * last forward in `slot` (0 when this stage has no loss). The training loss
 * is the mean over every position of the global batch: divide the sum over
 * the step's micro-batches by batch × pw_program_loss_positions (the
 * backward scales by 1 / (loss_batch × positions) to match). */
double pw_program_loss_sum(const pw_program *p, int slot);
int64_t pw_program_correct(const pw_program *p, int slot);
/* Positions the loss covers per sample (numel of the label). */
int64_t pw_program_loss_positions(const pw_program *p);
int pw_program_has_loss(const pw_program *p);

/* Asynchronous completion (device programs whose backend has `notify`, e.g.
 * CUDA; the engine's pending path, scheduler/stage.h "Asynchronous
 * stages"). pw_program_set_async(p, 1) makes pw_program_forward,
 * _backward_input, _backward_weight and _optimizer_step return once their
 * work is ENQUEUED: outgoing messages, the loss statistics and gradients
 * are not in place yet, and kernel errors surface later. Right after each
 * such call returns PW_OK the caller must call pw_program_submitted: 0 =
 * nothing is in flight; 1 = done(arg, st, msg) follows once, from another
 * thread, when the work (the downloads into the bound ports included) has
 * finished — then pw_program_loss_sum/_correct hold that forward's values.
 * No other call of the program until then. Every other call (evaluation,
 * parameters, zeroing, checkpoints) still waits for its work. Returns
 * whether the program is asynchronous now (0 for a CPU program or a backend
 * without notify: those complete every call before returning). */
int pw_program_set_async(pw_program *p, int on);
int pw_program_submitted(pw_program *p, pw_stage_done_fn done, void *arg);
/* Instead of pw_program_submitted, outside an engine: waits for the work in
 * flight and returns its first error (PW_OK when nothing is in flight). */
pw_status pw_program_wait(pw_program *p);

/* The scheduler's stage vtable over a program (self = pw_program*). The
 * micro-batch size used is the config's micro_batch. It has no ports and
 * loads no data: stages/train/program_stage.h wraps a program with both, for the
 * engine. */
extern const pw_stage_i pw_program_stage_i;
/* The configuration the program was created with, normalised: node_end set
 * (not 0), slots >= 1, loss_batch set; device is NULL (read in create only).
 * Valid until pw_program_destroy. */
const pw_program_config *pw_program_get_config(const pw_program *p);

#ifdef __cplusplus
}
#endif
#endif
