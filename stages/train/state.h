/* pipewright — training-state checkpoints: everything a run needs to go on
 * bit-identically from a step boundary, on any layout (docs/checkpoints.md).
 *
 * A checkpoint is a directory DIR/step-00000120/ holding
 *   model.safetensors      the parameters, the same bytes as --save writes
 *                          (stages/train/checkpoint.h): names from the graph,
 *                          PyTorch layouts, each tied parameter once;
 *   optimizer.safetensors  the optimizer state, one tensor per parameter and
 *                          state buffer, named "<param>.<buffer>" as in
 *                          PyTorch's optimizer state: "fc1.weight.exp_avg",
 *                          "fc1.weight.exp_avg_sq" (AdamW),
 *                          "fc1.weight.momentum_buffer" (SGD);
 *   manifest.json          the run state (step, epoch, sampler position, lr
 *                          schedule, optimizer hyper-parameters, the math
 *                          settings, the graph's parameter hash, the layout
 *                          that wrote it, the version) and every file's size
 *                          and CRC-32 (and each tensor's), written LAST and
 *                          atomically. A directory without it is incomplete:
 *                          never loaded, removed by the next writer.
 * Under MPI each process of replica 0 writes the parameters whose first use
 * is on its chunks (model-00002-of-00004.safetensors, the same for the
 * optimizer, index = pipeline rank + 1) and a note of what it wrote; world
 * rank 0 merges the notes into the manifest once every process has
 * finished. No process gathers the model.
 *
 * Nothing else is needed to resume: dropout masks, the learning rate of a
 * step and each epoch's sample order are pure functions of (seed, step,
 * epoch, sample index), and every parameter's optimizer step count is the
 * run's step.
 *
 * Writing (one pw_state_writer per run; the training thread only):
 *
 *     pw_state_writer *w;
 *     PW_CHECK(pw_state_writer_create(&cfg, &w));
 *     for each step: ...train...;
 *         if (due) PW_CHECK(pw_state_writer_save(w, pl, step));  // snapshot, then write in the background
 *         PW_CHECK(pw_state_writer_poll(w, 0, &done));           // every step boundary (MPI: every process)
 *     PW_CHECK(pw_state_writer_poll(w, 1, &done));               // the end: wait for the last one
 *     pw_state_writer_destroy(w);
 *
 * Resuming:
 *
 *     pw_state *s;
 *     PW_CHECK(pw_state_open("ckpts", &s));          // the newest complete checkpoint
 *     PW_CHECK(pw_state_check(s, g, &run));          // refuses another graph or other math
 *     ... create the pipeline ...
 *     PW_CHECK(pw_state_restore(s, pl, replicas));   // parameters, optimizer state, step
 *     pw_state_close(s);
 *
 * A training loop that checkpoints on a policy (every N steps, at each
 * epoch's end) and resumes can leave the bookkeeping to the loop helpers
 * (what pipeline-run does):
 *
 *     pw_state_config sc = {.dir = "ckpts", .keep = 2, .every = 100, .graph = g,
 *                           .run = pw_state_run_of(&pc, "my data"), .resumed = s};
 *     ... create the pipeline pl ...
 *     sc.layout = pw_state_layout_of(pl);
 *     PW_CHECK(pw_state_writer_create(&sc, &w));
 *     for each step: PW_CHECK(pw_pipeline_step(pl, &st));
 *                    PW_CHECK(pw_state_writer_step(w, pl, &st, total, report, arg));
 *     PW_CHECK(pw_state_writer_finish(w, pl, st.step, report, arg));  // the end, or a signal
 *
 * Ownership: a writer copies its config but borrows what it points to (the
 * strings, the graph, the transport, the resumed state): they must outlive
 * it. pw_state_meta and its strings belong to the pw_state.
 *
 * Thread-safety: a writer and a state belong to the thread that made them;
 * the writer's own thread touches only the snapshot it was handed. Under
 * MPI every process calls save, poll, step and finish at the same step
 * (they exchange progress); open, check and restore are local.
 */
#ifndef PW_STAGES_STATE_H
#define PW_STAGES_STATE_H

#include <stdint.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "runtime/transport.h"
#include "stages/ops/optim.h"
#include "stages/train/pipeline.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PW_STATE_FORMAT "pipewright-train-state-1"
#define PW_STATE_MANIFEST "manifest.json"
/* pipeline-run's exit status after a signal with --checkpoint-dir: the run
 * wrote a complete checkpoint and can be resumed (sysexits' EX_TEMPFAIL). */
#define PW_EXIT_RESUMABLE 75

/* What fixes the numbers of a run: a resume must agree on all of it. */
typedef struct pw_state_run {
    const char *data;          /* the --data spec */
    int64_t train_samples;
    int64_t batch;             /* global batch */
    int64_t micro_batch;       /* samples per micro-batch */
    int grad_groups;           /* G, resolved (pw_grad_groups) */
    uint64_t seed;
    int shuffle;
    double clip_grad_norm;     /* 0: none */
    pw_optim_config optim;     /* kind, hyper-parameters, lr schedule (decay_steps: the run's length) */
} pw_state_run;

/* The layout that wrote a checkpoint (recorded, never required). */
typedef struct pw_state_layout {
    int stages, chunks_per_rank, replicas, micro_batches, processes, threads;
    int tensor_parallel;       /* T (1: none; a checkpoint without it reads as 1) */
    const char *schedule;
    const int *cuts;           /* (optional) chunk boundaries, n_cuts of them */
    int n_cuts;
} pw_state_layout;

typedef struct pw_state_config {
    const char *dir;           /* holds the step-NNNNNNNN/ checkpoints; created if missing */
    int keep;                  /* keep the newest K complete checkpoints (0: all) */
    int foreground;            /* 1: write on the calling thread (save returns when done) */
    const pw_graph *graph;
    pw_state_run run;
    pw_state_layout layout;
    const char *extra;         /* model.safetensors' "run" metadata, as --save writes it */
    const pw_transport *transport; /* (optional) MPI: shards, rank 0 writes the manifest */
    int64_t every;             /* pw_state_writer_step's policy: > 0 every N steps,
                                  -1 at each epoch's end, 0 only at finish */
    const struct pw_state *resumed; /* (optional) the checkpoint this run resumed from:
                                  its step counts as saved (finish does not rewrite it) */
} pw_state_config;

/* A finished checkpoint, reported by pw_state_writer_poll. */
typedef struct pw_state_done {
    int64_t step;
    char path[4096];           /* DIR/step-NNNNNNNN */
    int64_t bytes;             /* written by this process (MPI: all processes') */
    double snapshot_s;         /* on the training thread: copying the state to host memory */
    double write_s;            /* files and manifest (on the writer's thread) */
    double stall_s;            /* the training thread waited for the previous write */
} pw_state_done;

typedef struct pw_state_writer pw_state_writer;

/* Creates DIR if needed and removes the incomplete checkpoints in it (no
 * manifest: a run that stopped while writing). MPI: collective-free; rank 0
 * cleans. PW_ERR_IO when DIR cannot be made. */
pw_status pw_state_writer_create(const pw_state_config *cfg, pw_state_writer **out);

/* Snapshots the state after `step` steps of `pl` (this process's
 * parameters and optimizer state, copied to host memory now) and writes it
 * to DIR/step-NNNNNNNN: in the background, or before returning with
 * cfg.foreground. A write still in flight is waited for first (stall_s).
 * Call on every process of an MPI run at the same step. */
pw_status pw_state_writer_save(pw_state_writer *w, pw_pipeline *pl, int64_t step);

/* At a step boundary (MPI: every process at the same one): whether the
 * checkpoint in flight is complete. wait = 1 waits for it. *completed = 1
 * and *done filled for a checkpoint that became complete (the manifest is
 * written; older ones beyond `keep` are removed) and was not reported yet:
 * one per call, so call it until *completed is 0 (a save that waited for
 * the previous write leaves that one to report). Returns the write's
 * error, if it failed (MPI: any process's, named). */
pw_status pw_state_writer_poll(pw_state_writer *w, int wait, pw_state_done *done, int *completed);

/* Waits for a write in flight (its result is lost: call poll first), frees. Accepts NULL. */
void pw_state_writer_destroy(pw_state_writer *w);

/* ---- the training loop's checkpoints ---- */

/* Called with each checkpoint that became complete (on the caller's thread,
 * inside step and finish). `done` is valid during the call. */
typedef void (*pw_state_report_fn)(const pw_state_done *done, void *arg);

/* After the step `s` of pl (every process at the same one): saves when the
 * config's `every` says it is due and s->step < last_step (finish writes
 * the last one), then reports every checkpoint that became complete
 * (report may be NULL). Errors: save's and poll's. */
pw_status pw_state_writer_step(pw_state_writer *w, pw_pipeline *pl, const pw_step_stats *s, int64_t last_step,
                               pw_state_report_fn report, void *arg);
/* The end of a run (its last step, or a signal that stopped it after `step`
 * steps): saves the state after `step` unless that step was saved already
 * (by step, or it is the resumed checkpoint's), then waits for every write
 * and reports each. Errors: save's and poll's. */
pw_status pw_state_writer_finish(pw_state_writer *w, pw_pipeline *pl, int64_t step, pw_state_report_fn report,
                                 void *arg);

/* The math of the run `pc` describes, for pw_state_config.run and
 * pw_state_check: `data` (its data spec, compared as written), the size of
 * pc->train (which must be set), the batch, micro-batch size and gradient
 * groups, seed, shuffle, clipping and the optimizer (its decay_steps
 * included). Strings point at the caller's. */
pw_state_run pw_state_run_of(const pw_pipeline_config *pc, const char *data);
/* The layout of `pl`, for pw_state_config.layout: its stages, chunks per
 * rank, replicas, micro-batches, processes, configured threads, schedule
 * name and cuts (pointers into pl: valid while it lives). */
pw_state_layout pw_state_layout_of(const pw_pipeline *pl);

/* ---- resuming ---- */

typedef struct pw_state pw_state;

/* Opens a checkpoint: `path` is a checkpoint directory (holding
 * manifest.json) or a directory of them (the newest complete one is taken).
 * Reads and checks the manifest only; the tensors are read by restore.
 * Returns PW_OK, or
 *   PW_ERR_IO      no such path, or no complete checkpoint in it (the
 *                  message names the incomplete ones);
 *   PW_ERR_FORMAT  a manifest that is not valid JSON or not this format;
 *                  a weights-only file (--save's) with a hint to use
 *                  --init-from. */
pw_status pw_state_open(const char *path, pw_state **out);
/* The same for one manifest file (its directory holds the checkpoint's
 * files): what pw_state_open does once it has found it; the fuzz harness's
 * entry (tests/fuzz/fuzz_manifest.c). */
pw_status pw_state_open_manifest(const char *manifest, pw_state **out);
void pw_state_close(pw_state *s); /* accepts NULL */

/* What the manifest says. Valid until close. */
typedef struct pw_state_meta {
    const char *path;          /* the checkpoint directory */
    int64_t step;              /* optimizer steps done */
    int64_t epoch;             /* epochs completed (the next step's epoch index) */
    int64_t step_in_epoch;     /* steps done in that epoch */
    pw_state_run run;          /* strings point into the state */
    pw_state_layout layout;    /* the writer's */
    const char *version;
} pw_state_meta;
const pw_state_meta *pw_state_get_meta(const pw_state *s);

/* Refuses (PW_ERR_FORMAT) a checkpoint of another graph (name and parameter
 * hash) or with other math settings than `run`, naming every difference
 * ("optimizer: checkpoint adamw, this run sgd; batch: checkpoint 64, this
 * run 32"). The layout may differ. */
pw_status pw_state_check(const pw_state *s, const pw_graph *g, const pw_state_run *run);

/* Reads the files this process needs, checks each file's size and CRC-32
 * (naming the file, and the tensor whose bytes differ) and every tensor's
 * name, shape and dtype, and only then copies the parameters and optimizer
 * state into every program of `pl` held here (`replicas`: the run's
 * replica count; under MPI only this process's replica is held) and seeks
 * the pipeline to the checkpoint's step. On failure nothing is changed. */
pw_status pw_state_restore(const pw_state *s, pw_pipeline *pl, int replicas);

/* --compress: restores this process's compressors' error-feedback state
 * (top-k's residuals, PowerSGD's residuals and Q; per replica and
 * parameter, and per use for a tied one, in the checkpoint's "compress"
 * files) after pw_state_restore, before the first step. PW_OK with
 * why[0] == '\0' when restored, or when there is nothing to restore (no
 * compression, or a mode without state); PW_OK with `why` saying why not
 * when the checkpoint cannot give it (one written without it, by an older
 * version or an uncompressed run, or one of a graph with tied parameters
 * written before their state was kept; another mode or replica count;
 * tensor parallelism under mpirun): the state then starts from zero, as in
 * a new run. At T > 1 in one process each tensor rank's compressor takes
 * its part (docs/checkpoints.md); PowerSGD's Q is per tensor rank, so at
 * another T than the checkpoint's only the residuals are restored, Q
 * starts from the seed, and a warning says so on stderr.
 * Errors: a corrupt or truncated file (named). */
pw_status pw_state_restore_compress(const pw_state *s, pw_pipeline *pl, char *why, size_t why_n);

/* Resuming on another layout (docs/checkpoints.md): the replica and
 * micro-batch counts for a run of `stages` stages and global batch `batch`
 * that resumes the checkpoint `m`. Under MPI (world > 1 processes; with
 * T tensor-parallel ranks per stage, the process count / T) a count that
 * is not stages x *replicas but a multiple of stages takes world / stages
 * replicas, and the micro-batches then follow the
 * checkpoint. Unless *micro_fixed, *micro_batches becomes batch /
 * (*replicas x the checkpoint's micro-batch size) when that divides (the
 * checkpoint's micro-batch size, so its bits: docs/checkpoints.md) and
 * *micro_fixed is set. PW_ERR_INVALID_ARG when batch then does not split
 * into *replicas x *micro_batches or `grad_groups` (pw_grad_groups' request)
 * does not fit them; the counts are left as computed, for the message. */
pw_status pw_state_fit_layout(const pw_state_meta *m, int world, int stages, int64_t batch, int grad_groups,
                              int *replicas, int *micro_batches, int *micro_fixed);

/* FNV-1a 64 of every parameter's "name:d0,d1,...;" in graph order, as
 * 16 hex digits (the manifest's graph.hash). */
void pw_state_graph_hash(const pw_graph *g, char out[17]);

#ifdef __cplusplus
}
#endif
#endif
