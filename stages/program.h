/* pipewright — the stage program: a range of graph nodes compiled to a flat
 * list of CPU ops over planned buffers.
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
 *     memcpy(pw_program_value(p, g->input, slot), x, ...);
 *     memcpy(pw_program_value(p, g->label, slot), y, ...);
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
 * called (micro-batch order under every schedule).
 */
#ifndef PW_STAGES_PROGRAM_H
#define PW_STAGES_PROGRAM_H

#include <stdint.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "scheduler/stage.h"
#include "stages/optim.h"

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
} pw_program_config;

pw_status pw_program_create(const pw_program_config *cfg, pw_program **out);
void pw_program_destroy(pw_program *p); /* accepts NULL */

/* Bytes of the single arena, by category. */
typedef struct pw_program_memory {
    size_t params, grads, optim_state, activations, total;
} pw_program_memory;
void pw_program_memory_usage(const pw_program *p, pw_program_memory *out);

/* ---- parameters (only those used by this stage's nodes) ---- */
int pw_program_n_params(const pw_program *p);
typedef struct pw_program_param {
    int graph_param;     /* index into graph->params */
    const char *name;
    pw_shape shape;
    float *data;
    float *grad;
    int64_t numel;
} pw_program_param;
void pw_program_param_at(const pw_program *p, int i, pw_program_param *out);
/* Fills every parameter from (seed, parameter name): independent of stage. */
void pw_program_init_params(pw_program *p, uint64_t seed);

/* ---- activations ---- */
/* Buffer of a value for a slot: (micro_batch, numel) of its dtype; NULL if the
 * value is not touched by this stage. */
void *pw_program_value(const pw_program *p, int value, int slot);
/* Gradient buffer (f32, same shape); NULL if the value needs no gradient. */
float *pw_program_grad(const pw_program *p, int value, int slot);
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

/* Forward of `n` samples (1 ≤ n ≤ micro_batch) in `slot`. */
pw_status pw_program_forward(pw_program *p, int slot, int64_t n);
/* Input gradients, in reverse node order. */
pw_status pw_program_backward_input(pw_program *p, int slot);
/* Weight gradients, added into the parameters' gradients. */
pw_status pw_program_backward_weight(pw_program *p, int slot);
/* Applies the optimizer (step counts from 1) and zeroes the gradients. */
pw_status pw_program_optimizer_step(pw_program *p, int64_t step);
void pw_program_zero_grads(pw_program *p);
/* Sum of per-position losses and count of correct argmax predictions from the
 * last forward in `slot` (0 when this stage has no loss). */
double pw_program_loss_sum(const pw_program *p, int slot);
int64_t pw_program_correct(const pw_program *p, int slot);
/* Positions the loss covers per sample (numel of the label). */
int64_t pw_program_loss_positions(const pw_program *p);
int pw_program_has_loss(const pw_program *p);

/* The scheduler's stage vtable over a program (self = pw_program*). The
 * micro-batch size used is the config's micro_batch. */
extern const pw_stage_i pw_program_stage_i;

#ifdef __cplusplus
}
#endif
#endif
