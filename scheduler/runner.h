/* pipewright — the engine from a schedule name, a micro-batch count and a
 * stage table.
 *
 * pw_engine (scheduler/engine.h) takes a lowered, validated schedule, its
 * report and the chunks already built with the right number of activation
 * slots. A runner does those steps: it generates the schedule from its name
 * (or reads a CSV file), lowers and validates it, asks the stage table to
 * build each chunk of each replica (telling it the slots the chunk needs),
 * starts the engine and counts the steps; it can record and write a trace
 * that pipe-trace reads.
 *
 *     // the stage table: how many stages, and how to build one chunk
 *     static pw_status make(void *user, const pw_chunk_spec *c, pw_engine_chunk *out)
 *     {
 *         my_chunk *m = my_chunk_new(user, c->chunk, c->n_chunks, c->slots);
 *         if (!m) return pw_error(PW_ERR_NOMEM, "out of memory");
 *         *out = (pw_engine_chunk){&my_stage_i, m};
 *         return PW_OK;
 *     }
 *     static void unmake(void *user, const pw_chunk_spec *c, pw_engine_chunk *chunk)
 *     {
 *         my_chunk_free(chunk->self);
 *     }
 *     pw_stage_table table = {.stages = 4, .make = make, .unmake = unmake, .user = &model};
 *
 *     // one call: 100 steps of 1F1B over 8 micro-batches
 *     PW_CHECK(pw_engine_run_simple("1f1b", 8, &table, 100));
 *
 *     // or step by step, with replicas and a trace
 *     pw_runner_config rc = pw_runner_defaults();
 *     rc.schedule = "zb-v";
 *     rc.micro_batches = 8;
 *     rc.table = table;
 *     rc.table.replicas = 2;
 *     rc.trace_events = 1 << 16;
 *     pw_runner *r;
 *     PW_CHECK(pw_runner_create(&rc, &r));
 *     for (int i = 0; i < 100; i++) PW_CHECK(pw_runner_step(r));
 *     PW_CHECK(pw_runner_write_trace(r, "run.json"));    // pipe-trace run.json
 *     pw_runner_destroy(r);
 *
 * Chunks. A schedule cuts the model into n_chunks = stages × chunks_per_rank
 * chunks (interleaved and zb-v: 2 per rank by default), numbered in layer
 * order; pw_chunk_spec says which one make builds, the rank (worker) that
 * runs it, and `slots`: calls to the chunk use activation slots 0 ..
 * slots − 1, so a chunk must be able to hold that many micro-batches'
 * activations at once (the validator's peak for it). The chunk's stage
 * vtable follows scheduler/stage.h; with replicas > 1 it needs grad_bucket
 * (the schedule has `buckets` all-reduce buckets per chunk).
 *
 * Steps. pw_runner_step runs step first_step + (steps run so far): every
 * micro-batch through every chunk of every replica, then each chunk's
 * optimizer_step(step). Replica k's chunk c is the table's (k, c); the
 * engine sums each chunk's gradient buckets across the replicas before
 * OPTIM (docs/distributed.md).
 *
 * Ownership, lifetime, threads. The runner copies its config (the schedule
 * string and table included: `user` is borrowed and must outlive the
 * runner). make and unmake run on the thread calling pw_runner_create /
 * pw_runner_destroy, in replica-major chunk order (unmake in reverse); the
 * objects they build belong to the table, the runner only holds their
 * {vtable, self}. While pw_runner_step runs, the engine's workers call the
 * chunks (each chunk from one worker thread, one call at a time; see
 * scheduler/engine.h); between steps nothing does, and the owner may read
 * the chunks' state. A runner is not thread-safe: one thread uses it. After
 * a failed step only pw_runner_destroy is allowed (as for the engine); when
 * the error says a rank "did not stop" (a chunk callback that never
 * returned), its worker may still use the chunks, so report and exit
 * instead of destroying the runner.
 * CPU kernel threads are the caller's (a graph program's GEMMs share the
 * process's team, stages/ops/cpu/ops.h); the results do not depend on them.
 */
#ifndef PW_SCHEDULER_RUNNER_H
#define PW_SCHEDULER_RUNNER_H

#include <stdint.h>

#include "runtime/status.h"
#include "scheduler/engine.h"
#include "scheduler/schedule.h"
#include "scheduler/stage.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What make builds: one chunk of one replica. */
typedef struct pw_chunk_spec {
    int chunk;               /* 0 .. n_chunks − 1, in layer order */
    int n_chunks;            /* stages × chunks_per_rank */
    int rank;                /* the pipeline rank (worker) that runs it */
    int replica;             /* 0 .. replicas − 1 */
    int replicas;            /* R */
    int slots;               /* activation slots it must hold (≥ 1): calls use 0 .. slots − 1 */
    int micro_batches;       /* M per step */
    int n_buckets;           /* gradient buckets per chunk (0 with one replica) */
    const pw_schedule *schedule; /* the validated schedule (valid for the runner's lifetime) */
} pw_chunk_spec;

/* The model's side: how many stages, and how to build and free a chunk. */
typedef struct pw_stage_table {
    int stages;              /* S pipeline ranks (worker threads per replica), ≥ 1 */
    int replicas;            /* R in-process data-parallel replicas (0: 1) */
    /* Builds the chunk described by spec into *out ({vtable, self}).
     * PW_OK, or an error with its message after freeing whatever it built
     * (creation then fails with it, prefixed by the chunk). */
    pw_status (*make)(void *user, const pw_chunk_spec *spec, pw_engine_chunk *out);
    /* (optional) Frees what make built; called after the engine is gone. */
    void (*unmake)(void *user, const pw_chunk_spec *spec, pw_engine_chunk *chunk);
    void *user;
} pw_stage_table;

typedef struct pw_runner_config {
    const char *schedule;    /* a generated kind, any name pw_schedule_kind_parse takes
                                ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v"),
                                or the path of a schedule CSV (docs/schedules.md) */
    int micro_batches;       /* M ≥ 1 (a CSV: its count, or 0 to take it) */
    pw_stage_table table;
    int split_w;             /* gpipe, 1f1b, interleaved: split B and W (zero-bubble
                                kinds always do) */
    int chunks_per_rank;     /* 0: the kind's default (interleaved, zb-v 2; others 1) */
    int buckets;             /* gradient buckets per chunk with replicas (0: 1) */
    double watchdog_s;       /* 0: 60 s */
    int pin;                 /* 1: bind each worker to its own core(s) */
    int check;               /* 1: check every action against the schedule */
    double clip_grad_norm;   /* > 0: clip the global gradient norm (chunks need
                                grad_sumsq and scale_grads) */
    int64_t trace_events;    /* > 0: record up to this many events per worker */
    const char *model;       /* (optional) the model's name in the trace ("custom") */
    int64_t micro_batch_size;/* (optional) samples per micro-batch, for the trace */
    int64_t first_step;      /* the step number of the first pw_runner_step (0: 1) */
    const pw_span_mem *span_mem; /* (optional) with replicas, where the chunks' gradients
                                    live when not in host memory: a device program's
                                    backend's span_memory (stages/ops/backend.h) */
} pw_runner_config;

typedef struct pw_runner pw_runner;

/* watchdog_s 60, pin 1, check 0, one replica, everything else 0. */
pw_runner_config pw_runner_defaults(void);

/* PW_OK: *out runs the schedule over the table's chunks. On error *out is
 * NULL, every chunk made so far has been unmade, and the message says what:
 * PW_ERR_INVALID_ARG for a config field out of range, an unknown schedule
 * name that is not a readable file either ("schedule 'zbv2' is not gpipe,
 * ..."), a CSV whose ranks or micro-batches disagree with the table and
 * config, or replicas with a CSV that has no ALLREDUCE buckets; the
 * generator's, the CSV parser's and the validator's errors (PW_ERR_PARSE,
 * PW_ERR_SCHEDULE); make's error prefixed "replica K, chunk C: "; and
 * pw_engine_create's (PW_ERR_SHAPE when neighbouring chunks disagree on a
 * port's size). */
pw_status pw_runner_create(const pw_runner_config *cfg, pw_runner **out);
/* Stops the engine, then unmakes every chunk (reverse order). Accepts NULL. */
void pw_runner_destroy(pw_runner *r);

/* Runs the next step (first_step, first_step + 1, ...) on every rank of
 * every replica, through each chunk's optimizer_step. PW_OK or the engine's
 * error (a chunk's own, a watchdog's); after an error only destroy. */
pw_status pw_runner_step(pw_runner *r);
/* Steps run so far. */
int64_t pw_runner_steps_done(const pw_runner *r);

/* Writes the trace of every step so far (Chrome Trace Event JSON with
 * pipewright's metadata; `pipe-trace FILE` reads it) atomically.
 * PW_ERR_INVALID_ARG when trace_events was 0; PW_ERR_IO. */
pw_status pw_runner_write_trace(const pw_runner *r, const char *path);

/* What the runner built (valid until pw_runner_destroy). */
const pw_schedule *pw_runner_schedule(const pw_runner *r);
const pw_schedule_report *pw_runner_report(const pw_runner *r);
pw_engine *pw_runner_engine(pw_runner *r);
int pw_runner_n_chunks(const pw_runner *r);
/* The chunk make built for (replica, chunk); NULL when out of range. */
const pw_engine_chunk *pw_runner_chunk(const pw_runner *r, int replica, int chunk);
/* The schedule's name as given (a kind's canonical name, or the CSV path). */
const char *pw_runner_schedule_name(const pw_runner *r);
/* The schedule's bubble under unit costs: pw_schedule_config_bubble for a
 * generated kind, the validator's replayed figure for a CSV. */
double pw_runner_theory_bubble(const pw_runner *r);

/* pw_runner_create with pw_runner_defaults() and this schedule, micro-batch
 * count and table, `steps` steps, pw_runner_destroy. The chunks' state (the
 * trained parameters) is the table's: read it in unmake, or keep the
 * objects and free them yourself. PW_OK or the first error. */
pw_status pw_engine_run_simple(const char *schedule, int micro_batches, const pw_stage_table *table,
                               int64_t steps);

#ifdef __cplusplus
}
#endif
#endif
