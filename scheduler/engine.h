/* pipewright — the event-driven pipeline engine.
 *
 * Runs a validated schedule over stage chunks, one worker thread per rank,
 * each with its own libevent loop. A worker executes its rank's actions in
 * order; a RECV whose message has not arrived parks the worker until the
 * sender wakes it (event_active from the sender's thread). Sends never block.
 * Messages are engine-owned buffers handed between chunks without copying
 * (see the ports in scheduler/stage.h).
 *
 *     pw_engine_chunk chunks[S];   // {&pw_graph_stage_i, stage_object} per chunk
 *     pw_engine_config ec = {
 *         .schedule = sched,       // lowered and validated
 *         .report = rep,           // from pw_schedule_validate: slot counts
 *         .chunks = chunks,
 *         .watchdog_s = 30,
 *         .pin = 1,
 *     };
 *     pw_engine *e;
 *     PW_CHECK(pw_engine_create(&ec, &e));
 *     for (long step = 1; step <= n; step++)
 *         PW_CHECK(pw_engine_run_step(e, step));  // all ranks, one step
 *     pw_engine_destroy(e);
 *
 * Failure is loud and bounded: a chunk callback that fails, or a rank that
 * waits longer than watchdog_s for a message, stops every worker; run_step
 * returns the first error with its message ("rank 1 (chunk 1): waited 30.0 s
 * for RECV_F of micro-batch 7 from rank 0"). No hang. With a transport the
 * worker publishes what it runs and whom it waits for on the process's
 * progress board, and the watchdog first names the process the run is stuck
 * on (pw_transport_blame: "MPI rank 3 (replica 1, stage 1) stalled in
 * training step 5 (B of micro-batch 0): ...; " then its own wait); it waits
 * on while the chain of waits ends at a process that still makes progress.
 *
 * Details (docs/engine.md has the whole design):
 *   - pw_engine_create checks shapes, every action's fields, the report's
 *     per-chunk peaks and that each link's port sizes agree on both ends; it
 *     does not re-run the validator. A schedule that was never validated
 *     still cannot crash the engine: a receive nobody sends ends in the
 *     watchdog error, a misplaced action in a clear PW_ERR_SCHEDULE.
 *   - After any failed step the engine only accepts pw_engine_destroy
 *     (run_step repeats the error). A stage callback cannot be interrupted:
 *     when one has not returned max(2 s, watchdog_s) after the failure,
 *     run_step returns anyway ("rank R did not stop: still inside a stage
 *     callback"), destroy returns at once and the stuck worker frees the
 *     engine when its callback returns; the schedule and the chunks must
 *     stay valid until then.
 *   - Statistics and chunk peaks are read between steps, not during one.
 *
 * Data parallelism (docs/distributed.md). With replicas = R > 1 the engine
 * runs R copies of the pipeline: in one process R × n_ranks workers (chunks
 * then holds R × n_chunks entries, replica-major), or, with a transport, the
 * one (replica, rank) of this process (chunks holds n_chunks entries, only
 * that rank's are used). Each chunk's gradients are summed across the
 * replicas in the schedule's n_buckets buckets (pw_stage_i.grad_bucket): a
 * bucket's all-reduce starts on the worker's communication thread as soon as
 * the last backward that touches it returns, overlapping the rest of the
 * backward; OPTIM waits for the rank's buckets through the event loop (never
 * blocking it), then optionally clips the global gradient norm.
 *
 * Ownership and threads: the engine copies its config and borrows what it
 * points to (the lowered schedule and its report, the chunks, the transport,
 * the trace): they must outlive it. It owns its workers, one thread per rank,
 * started by create and joined by destroy, and its message memory (its own,
 * or the config's msg_alloc's, handed back through msg_free). One
 * thread drives it (not a worker): pw_engine_run_step runs one step at a
 * time and returns when every worker has finished it (pw_engine_run_steps
 * several, overlapping with overlap_steps); while it runs, the
 * workers call the chunks (scheduler/stage.h says from where). The figures
 * (rank stats, peaks, norm, message memory) are read between steps.
 */
#ifndef PW_SCHEDULER_ENGINE_H
#define PW_SCHEDULER_ENGINE_H

#include <stdint.h>

#include "runtime/compress.h"
#include "runtime/status.h"
#include "runtime/trace.h"
#include "runtime/link.h"
#include "runtime/transport.h"
#include "scheduler/schedule.h"
#include "scheduler/stage.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_engine pw_engine;

typedef struct pw_engine_chunk {
    const pw_stage_i *vt;
    void *self;
} pw_engine_chunk;

/* Allocates `bytes` of zeroed message memory at *base (see msg_alloc). */
typedef pw_status (*pw_engine_msg_memory_fn)(void *arg, size_t bytes, void **base);

typedef struct pw_engine_config {
    const pw_schedule *schedule;       /* lowered + validated; outlives the engine */
    const pw_schedule_report *report;  /* its validation report (slot counts) */
    const pw_engine_chunk *chunks;     /* [replicas × n_chunks] in one process, replica-major;
                                          [n_chunks] with a transport */
    double watchdog_s;                 /* 0: default 60 s */
    int pin;                           /* 1: bind each worker to its own core(s) with hwloc */
    pw_trace *trace;                   /* (optional) one track per worker: track
                                          replica × n_ranks + rank */
    int check;                         /* 1: run the schedule checker on every action
                                          (also when PW_DEBUG_CHECK=1) */
    int replicas;                      /* data-parallel replicas R (0: 1); R > 1 needs a
                                          schedule with n_buckets >= 1 */
    const pw_transport *transport;     /* (optional) multi-process run: this process is
                                          (transport->replica, transport->rank); outlives
                                          the engine */
    double clip_grad_norm;             /* > 0: before OPTIM, scale all gradients so that
                                          their global L2 norm (all chunks) is at most this */
    int post_validate;                 /* 1 (with clip_grad_norm): each rank steps its
                                          optimizer before the global norm is known and
                                          validates afterwards, undoing and redoing the
                                          step with the clip factor when clipping
                                          triggers (docs/engine.md, "Post-validation");
                                          the chunks need optimizer_try/_commit/_undo */
    int overlap_steps;                 /* 1: pw_engine_run_steps runs its steps back to back:
                                          each rank starts step n+1 as soon as its own part
                                          of step n is done, while the other ranks still
                                          finish theirs (docs/engine.md, "Steps that
                                          overlap"). Doubles the message buffers. With
                                          post_validate the optimistic step n is validated
                                          during step n+1, before the rank's first backward
                                          of it; the chunks then also need zero_grads. In
                                          one process only (no transport) */
    const char *const *gpu_pci;        /* (optional, with pin, in one process) [replicas ×
                                          n_ranks], indexed like the workers: the PCI bus id
                                          ("0000:11:00.0") of the GPU each worker's rank
                                          computes on; the worker then binds to the cores near
                                          that GPU (pw_cpu_place_gpus) instead of the CPU rule.
                                          A bus id the machine's topology lacks (a VM) logs one
                                          warning and falls back to the CPU rule. */
    pw_engine_msg_memory_fn msg_alloc; /* (optional) allocates the block of every message
                                          buffer (bytes, zeroed) instead of host memory: a
                                          pipeline whose stages all compute on one GPU keeps
                                          its messages there. The engine never reads or
                                          writes message bytes itself; the stages do, through
                                          the ports. msg_free(msg_arg, base) frees it. */
    void (*msg_free)(void *arg, void *base);
    void *msg_arg;
    pw_link link;                      /* (optional, in one process) a slow link between
                                          workers (runtime/link.h): each worker's messages
                                          to other ranks arrive when the model says, and the
                                          replicas' all-reduce waits its link time; results
                                          are unchanged. Under MPI the transport carries it
                                          (pw_mpi_config). All zero: none */
    const pw_span_mem *span_mem;       /* (optional) where the stages' gradients live when
                                          not in host memory (a GPU): the in-process
                                          all-reduce of replicas works through it
                                          (runtime/collective.h) */
    const pw_compress_config *compress; /* (optional) with replicas: each bucket's sum is
                                          compressed (runtime/compress.h; kind none or NULL:
                                          the plain all-reduce, bit for bit); host gradients
                                          only (no span_mem). The engine keeps one compressor
                                          per bucket of each of its replicas' chunks. */
} pw_engine_config;

pw_status pw_engine_create(const pw_engine_config *cfg, pw_engine **out);
void pw_engine_destroy(pw_engine *e); /* accepts NULL; joins the workers */

/* The host block that holds every message buffer of the engine (the
 * ports bound to the stages point into it): page-aligned, whole pages,
 * valid until pw_engine_destroy. A device pipeline page-locks it
 * (stages/ops/backend.h, host_register). *base is NULL and *bytes 0 when there
 * are none, or when msg_alloc provided them. */
void pw_engine_message_memory(const pw_engine *e, void **base, size_t *bytes);

/* Runs one training step on every rank (through each rank's OPTIM) and
 * returns when all have finished or one has failed. */
pw_status pw_engine_run_step(pw_engine *e, int64_t step);

/* Runs steps first .. first+n-1 (n >= 1) and returns when every worker has
 * finished them or one has failed; *n_done (optional) is how many of them
 * stand. With overlap_steps the workers run them back to back (step n+1 of
 * a rank overlaps step n of the others); otherwise it is n run_step calls.
 * *n_done < n only with overlap_steps and post_validate, when clipping
 * triggered at step first + *n_done − 1: that step was undone and redone
 * with the clip factor (the synchronous bits), and step first + *n_done,
 * which had started on the optimistic parameters, was discarded (its
 * gradients zeroed, its optimizer step not taken; its forwards' losses are
 * stale): the caller runs it again, and the steps after it. On an error
 * *n_done is the steps that completed before the failed one; with
 * post_validate the failed step and any started after it are undone. */
pw_status pw_engine_run_steps(pw_engine *e, int64_t first, int n, int *n_done);

/* Inside a stage callback the engine calls on its worker thread (forward,
 * backward_*, optimizer_*): the step the call belongs to (with
 * overlap_steps, workers are in different steps at once). 0 elsewhere. */
int64_t pw_engine_current_step(void);

/* Per-rank figures since creation. */
typedef struct pw_engine_rank_stats {
    int slots;              /* activation slots allocated per chunk (sum over the rank's chunks) */
    int peak_slots_used;    /* high-water mark of slots in use (sum over chunks at the peak) */
    double busy_s;          /* time inside compute callbacks */
    double wait_s;          /* time parked on RECVs and, with replicas, on all-reduces */
    double total_s;         /* wall time inside run_step */
    int64_t actions;        /* actions executed */
    double allreduce_s;     /* sum over buckets of start-to-finish all-reduce time */
    double allreduce_wait_s;/* of which OPTIM waited for (exposed) */
    int64_t rollbacks;      /* post_validate: optimizer steps undone and redone (the
                               norm was over clip_grad_norm), over the rank's steps */
    int64_t allreduce_bytes;      /* with replicas: the buckets' fp32 bytes summed, all steps */
    int64_t allreduce_wire_bytes; /* of which put on the wire after compression (the same
                                     without --compress; runtime/compress.h says what counts) */
} pw_engine_rank_stats;
/* `rank` is the worker: replica × n_ranks + rank (just the rank with one
 * replica); with a transport only this process's own worker has figures. */
void pw_engine_rank_stats_get(const pw_engine *e, int rank, pw_engine_rank_stats *out);
/* Measured high-water mark of slots in use for one chunk (first replica of
 * this process). */
int pw_engine_chunk_peak(const pw_engine *e, int chunk);
/* The global gradient norm before clipping of the last step (first replica
 * of this process); -1 when clip_grad_norm is off. */
double pw_engine_grad_norm(const pw_engine *e);
/* Message bytes allocated (communication buffers), all links. */
int64_t pw_engine_message_bytes(const pw_engine *e);
/* The compressor of bucket `bucket` of chunk `chunk` of this process's
 * replica `k` (0 .. local replicas − 1), or NULL: no compression, or an
 * empty bucket. For checkpoints of its error-feedback state
 * (runtime/compress.h); between steps only. */
pw_compressor *pw_engine_compressor(pw_engine *e, int k, int chunk, int bucket);

#ifdef __cplusplus
}
#endif
#endif
