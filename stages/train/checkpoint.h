/* pipewright — checkpoints: a graph's parameters in one safetensors file.
 *
 * Tensor names are the graph's parameter names ("fc1.weight"), row-major in
 * PyTorch layouts (a linear weight is [out, in]), so a file loads into
 * torch/safetensors unchanged. A tied parameter is stored once. Metadata
 * records the format, graph name, step and run settings, so a run with any
 * stage count can resume from a run with any other.
 *
 *     pw_program *stages[] = {p};
 *     pw_checkpoint_info info = {.step = 1200, .epoch = 3};
 *     PW_CHECK(pw_checkpoint_save("run.safetensors", g, stages, 1, &info));
 *     PW_CHECK(pw_checkpoint_load("run.safetensors", g, stages, 1, &info));
 *
 * Tensor parallelism: the programs may be the T ranks' programs of rank
 * graphs of `g` (pw_graph_tp_rank; pw_trainer_programs): save gathers each
 * split parameter's parts into the full tensor, load gives each rank its
 * slice, so a file holds the same named full tensors at every T and loads
 * at any T. Every rank's program must then be passed.
 *
 * Ownership and threads: save and load borrow the graph and the programs for
 * the call; save writes atomically (a temp file renamed into place). The
 * programs must be idle (between steps, on the thread that drives them).
 * Calls on different programs share nothing.
 */
#ifndef PW_STAGES_CHECKPOINT_H
#define PW_STAGES_CHECKPOINT_H

#include <stdint.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "stages/program/program.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PW_CHECKPOINT_FORMAT "pipewright-checkpoint-1"

typedef struct pw_checkpoint_info {
    int64_t step;          /* optimizer steps taken */
    int64_t epoch;         /* epochs completed */
    uint64_t seed;
    const char *extra;     /* (optional) free text stored as "run" metadata */
} pw_checkpoint_info;

/* Writes every parameter held by `programs` (each graph parameter once, from
 * the first program that holds it), atomically. PW_ERR_INVALID_ARG when the
 * programs together do not hold every parameter of the graph. */
pw_status pw_checkpoint_save(const char *path, const pw_graph *g, pw_program *const *programs,
                             int n_programs, const pw_checkpoint_info *info);

/* Loads parameters into every program. Fails without touching any program
 * (PW_ERR_FORMAT / PW_ERR_SHAPE / PW_ERR_IO, naming file and tensor) when the
 * file is unreadable or corrupt, is not a pipewright checkpoint of a graph
 * with the same parameters, misses a parameter, has one of another shape or
 * dtype, or has tensors the graph does not define. `info` (optional)
 * receives the stored step/epoch/seed. */
pw_status pw_checkpoint_load(const char *path, const pw_graph *g, pw_program *const *programs,
                             int n_programs, pw_checkpoint_info *info);

#ifdef __cplusplus
}
#endif
#endif
