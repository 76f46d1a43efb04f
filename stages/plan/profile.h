/* pipewright — measured op times: a profile of a graph on this CPU.
 *
 * `--balance time` balances stages by measured time instead of FLOPs. A
 * profile times each node's forward, backward-input and backward-weight at
 * the run's micro-batch size, a few iterations each (median kept), and is
 * cached in a JSON file that later runs reuse:
 *
 *     pw_profile_config pc = { .micro_batch = 16, .threads = 1 };
 *     pw_profile *prof = NULL;
 *     int measured = 0;
 *     if (pw_profile_load_or_measure("model.profile.json", g, &pc, &prof, &measured) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());  // stale, mismatched or corrupt file
 *         return 1;
 *     }
 *     pw_partition_config cfg = { ..., .balance = PW_BALANCE_TIME, .node_times = prof->times };
 *     ...
 *     pw_profile_destroy(prof);
 *
 * How a node is timed. Each node runs alone as a one-node stage program
 * (pw_program over [i, i+1)) with its parameters seeded, its inputs and
 * output gradient filled with fixed pseudo-random values (integer inputs
 * with 0, a valid class or index), exactly the kernels and buffers a stage
 * runs. Each phase is repeated until one sample lasts at least 200 µs (so
 * tiny ops are not lost in the clock), `iterations` samples are taken, and
 * the median is kept. BLAS threads are set to `threads` while measuring
 * (pipeline stages run one BLAS thread each when there are several).
 * The optimizer time `o` of a node is the engine's optimizer step on that
 * program (pw_program_optimizer_step: the non-finite check of the
 * gradients, pw_optim_update of the run's optimizer kind at its default
 * hyper-parameters past step 1, zeroing the gradients), timed the same way,
 * for the parameters the node introduces: 0 without any, and a tied
 * parameter's later uses add nothing. Once per step, not per micro-batch.
 *
 * The file (docs/partition.md "Profiles"):
 *     {"format": "pipewright-profile", "version": 2, "graph": "p_mlp",
 *      "micro_batch": 16, "device": "cpu: <model> (OpenBLAS, 1 thread)",
 *      "optimizer": "sgd", "iterations": 5,
 *      "nodes": [{"name": "fc1", "sig": "linear(f32[24]) -> f32[24], 2 params",
 *                 "f": 1.2e-06, "b": 0.0, "w": 1.5e-06, "o": 4.1e-07}, ...]}
 * keyed by graph name, each node's name and signature (op, input and output
 * shapes, parameter count), micro-batch size, device string and optimizer.
 * A file made for another graph, a changed graph, another micro-batch size,
 * device or optimizer is stale and refused with a message that says which
 * key differs; so is a version-1 file or a node without "o" (measured
 * before the optimizer was timed). A file that is not such JSON is corrupt
 * and refused with where.
 *
 * Ownership and threads: measure, load and load_or_measure return a new
 * profile owned by the caller (pw_profile_destroy); the graph is borrowed
 * for the call. Measuring sets the process's CPU thread team
 * (pw_cpu_set_threads) while it runs: call it when no other kernels run.
 * Loading, checking and saving share nothing.
 */
#ifndef PW_STAGES_PROFILE_H
#define PW_STAGES_PROFILE_H

#include <stddef.h>
#include <stdint.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "runtime/status.h"
#include "stages/ops/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_profile {
    char *graph;            /* graph name */
    char *device;           /* where it was measured (pw_profile_device_string) */
    int64_t micro_batch;    /* samples per micro-batch it was measured at */
    int iterations;         /* timed samples per phase */
    pw_optim_kind optim;    /* the optimizer `o` was measured for */
    int n_nodes;
    char **names;           /* [n_nodes] output value names */
    char **sigs;            /* [n_nodes] "linear(f32[24]) -> f32[24], 2 params" */
    pw_op_time *times;      /* [n_nodes] median s per micro-batch, speed 1 =
                               this device: pw_partition_config.node_times */
} pw_profile;

typedef struct pw_profile_config {
    int64_t micro_batch;    /* samples per micro-batch, >= 1 (required) */
    int iterations;         /* timed samples per phase; 0 means 5 */
    int threads;            /* BLAS threads while measuring; 0: leave as set */
    const char *device;     /* key; NULL: pw_profile_device_string() */
    uint64_t seed;          /* parameters and inputs; 0 means 1 */
    pw_optim_kind optim;    /* the optimizer to time (key); 0 is SGD */
} pw_profile_config;

/* Measures every node of g. PW_OK: *out is new. PW_ERR_INVALID_ARG (bad
 * config), PW_ERR_UNSUPPORTED (an op without a CPU kernel, named with its
 * file:line), PW_ERR_NOMEM. */
pw_status pw_profile_measure(const pw_graph *g, const pw_profile_config *cfg, pw_profile **out);

/* Writes the JSON file atomically (temporary file + rename). PW_ERR_IO. */
pw_status pw_profile_save(const pw_profile *p, const char *path);

/* Reads a profile file without checking it against a graph. PW_ERR_IO when
 * it cannot be read; PW_ERR_FORMAT when it is corrupt: "FILE:LINE:COL:
 * error: not valid JSON (...)", "FILE: error: not a pipewright profile (...)"
 * or a missing / mistyped field, named; or stale whatever the graph: "FILE
 * is stale: it is a version 1 profile, measured without the optimizer step;
 * ..." (likewise a node without "o"). */
pw_status pw_profile_load(const char *path, pw_profile **out);

/* Whether p fits this run. PW_ERR_FORMAT, the first key that differs, e.g.
 * "FILE is stale: it was measured at micro-batch 16, this run uses 32;
 * delete it or choose another --profile file to measure again" or "... its
 * optimizer times are for sgd, this run uses adamw; ...". `path` is for
 * messages (NULL: "profile"). device NULL: pw_profile_device_string(). */
pw_status pw_profile_check(const pw_profile *p, const char *path, const pw_graph *g,
                           int64_t micro_batch, const char *device, pw_optim_kind optim);

/* The CLI's one call: a readable file at path is loaded and checked (stale
 * or corrupt: the error above, the file is left alone); a missing one is
 * measured and written. path NULL: measured, not saved. *measured (may be
 * NULL) says which happened. */
pw_status pw_profile_load_or_measure(const char *path, const pw_graph *g,
                                     const pw_profile_config *cfg, pw_profile **out,
                                     int *measured);

void pw_profile_destroy(pw_profile *p); /* accepts NULL */

/* "cpu: <model name> (<BLAS>, N thread(s))" for this machine and the current
 * BLAS thread setting. */
void pw_profile_device_string(char *buf, size_t n);

/* A node's signature as the file stores it. */
void pw_profile_node_sig(const pw_graph *g, int node, char *buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif
