/* pipewright — run traces: preallocated per-track event buffers written as
 * Chrome Trace Event JSON (opens in Perfetto and chrome://tracing) with a
 * "pipewright" metadata block that pipe-trace reads.
 *
 *     pw_trace *t;
 *     PW_CHECK(pw_trace_create(n_ranks, events_per_rank, &t));
 *     // on rank r's thread, no locks, no allocation:
 *     pw_trace_event *e = pw_trace_push(t, r);
 *     if (e) { e->name = "F"; e->chunk = 1; e->mb = 3; e->t0_ns = a; e->t1_ns = b; }
 *     // after the run:
 *     pw_trace_meta m = {...};
 *     PW_CHECK(pw_trace_write(t, "run.json", &m));
 *     pw_trace_destroy(t);
 *
 * One track per rank, written only by that rank's thread. A full track drops
 * further events and counts them (the file says how many were dropped).
 *
 * Ownership and threads: a trace owns its event buffers (allocated once by
 * create, freed by destroy); pw_trace_events' pointer is valid until destroy.
 * Each track is written by one thread (push takes no lock); count, events,
 * dropped and pw_trace_write read every track, so call them when no thread
 * pushes. The clock (pw_trace_set_clock) is one per process: set it before
 * any thread records. pw_now_ns may be called from any thread.
 */
#ifndef PW_RUNTIME_TRACE_H
#define PW_RUNTIME_TRACE_H

#include <stdint.h>
#include <stdio.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_trace_cat {
    PW_TRACE_COMPUTE = 0,   /* F, B, W, OPTIM */
    PW_TRACE_COMM,          /* SEND_*, RECV_* (the hand-off itself) */
    PW_TRACE_WAIT,          /* idle: waiting for a message / all-reduce / data */
    PW_TRACE_STEP,          /* a whole training step */
    PW_TRACE_REBALANCE,     /* a re-partition between steps (stages/train/rebalance.h):
                               name "rebalance", step = the steps done before it,
                               bytes = parameter and optimizer bytes it moved */
    PW_TRACE_TP,            /* a tensor-parallel all-reduce inside an F, B or W (name
                               "TP_ALLREDUCE", cat "tp"; stages/ops/tp.h): chunk and mb
                               of the call it is in, bytes = the floats summed × 4;
                               nested in that event's time on the same track */
} pw_trace_cat;

typedef struct pw_trace_event {
    const char *name;       /* static string: "F", "B", "W", "RECV_F", "wait RECV_F", ... */
    int32_t cat;            /* pw_trace_cat */
    int32_t chunk;          /* stage chunk, -1 none */
    int32_t mb;             /* micro-batch (bucket for all-reduce), -1 none */
    int32_t peer;           /* rank waited on / sent to, -1 none */
    int64_t step;           /* training step, from 1 */
    int64_t bytes;          /* bytes moved, 0 none */
    int64_t t0_ns, t1_ns;   /* CLOCK_MONOTONIC */
    int64_t wire_bytes;     /* ALLREDUCE with --compress: the bucket's payload after
                               compression (bytes is then its fp32 size), 0 none */
} pw_trace_event;

typedef struct pw_trace pw_trace;

pw_status pw_trace_create(int n_tracks, int64_t events_per_track, pw_trace **out);
/* The "pid" of the file's events (0 unless set): a process of a
 * tensor-parallel MPI run writes its tensor-parallel rank there, so that
 * the T processes holding the same pipeline ranks (tracks) stay apart when
 * their files are read as one run ("rank 1 tp 1"; pid 0 is tp rank 0, named
 * "rank 1" as in any run). Before pw_trace_write. */
void pw_trace_set_pid(pw_trace *t, int pid);
void pw_trace_destroy(pw_trace *t); /* accepts NULL */
/* The file one process of a multi-process run writes for the run's trace
 * `path`: "run.json" -> "run.rank3.json" (before the last extension; the
 * suffix ".rank3" without one) for world rank 3, `path` itself for a
 * world rank < 0 (one process). pipe-trace reads such files as one run. */
void pw_trace_rank_path(const char *path, int world_rank, char *out, size_t n);

/* Next free event of `track` (zeroed except chunk/mb/peer = -1), or NULL when
 * the track is full. Only the track's own thread may call it. */
pw_trace_event *pw_trace_push(pw_trace *t, int track);
int64_t pw_trace_count(const pw_trace *t, int track);
const pw_trace_event *pw_trace_events(const pw_trace *t, int track);
int64_t pw_trace_dropped(const pw_trace *t, int track);

/* Monotonic clock in nanoseconds. */
int64_t pw_now_ns(void);

/* Per-stage cost estimate recorded in the metadata. */
typedef struct pw_trace_stage_cost {
    double flops_fwd, flops_bwd_input, flops_bwd_weight;  /* per micro-batch */
    int64_t param_bytes;
    int64_t act_bytes;       /* per micro-batch */
    int node_begin, node_end;
} pw_trace_stage_cost;

typedef struct pw_trace_meta {
    const char *schedule;        /* "1f1b", "gpipe", a CSV path */
    const char *graph;           /* graph name */
    int n_ranks, n_chunks, n_micro, n_replicas;
    int64_t micro_batch;         /* samples per micro-batch */
    int64_t steps;               /* steps traced */
    double theory_bubble;        /* schedule's theoretical bubble fraction; <0 unknown */
    const int *peak_inflight;    /* [n_ranks] validator's prediction, or NULL */
    const int *measured_peak;    /* [n_ranks] engine's high-water mark, or NULL */
    const pw_trace_stage_cost *costs; /* [n_chunks] or NULL */
} pw_trace_meta;

/* Where this process's clock stands in a multi-process run. Each process
 * of an mpirun job writes its own trace, timed by its own CLOCK_MONOTONIC;
 * pw_mpi_transport_create measures this at start-up (a few ping-pongs with
 * world rank 0, keeping the one with the shortest round trip) and sets it
 * with pw_trace_set_clock, and every trace the process writes records it in
 * a "clock" block, so pw_trace_merge can put all ranks on rank 0's clock. */
typedef struct pw_trace_clock {
    int world_rank, world_size;
    int64_t offset_ns;       /* add to this process's pw_now_ns() to get rank 0's:
                              * 0 on rank 0's host (one kernel, one clock), else
                              * measured_ns */
    int64_t measured_ns;     /* the ping-pong estimate: rank 0's time at the
                              * reply minus the midpoint of the round trip */
    int64_t rtt_ns;          /* that round trip: the estimate is within +-rtt/2 */
    int same_host;           /* 1: shares rank 0's host (MPI_COMM_TYPE_SHARED) */
    uint64_t run_id;         /* drawn by rank 0, the same in every process of the run */
    char host[64];           /* gethostname() */
} pw_trace_clock;

/* Sets (or with NULL clears) the process's clock record. Call it before any
 * thread writes a trace (pw_mpi_transport_create does, at start-up); the
 * record is process-wide because the clock is. */
void pw_trace_set_clock(const pw_trace_clock *c);
/* Copies the record into *out and returns 1, or returns 0 when none is set. */
int pw_trace_get_clock(pw_trace_clock *out);

/* Writes {"displayTimeUnit": "ns", "pipewright": {...}, "traceEvents": [...]}
 * (metadata first, so a streaming reader has it before the events; one event a line)
 * atomically (temp file + rename). Timestamps are microseconds from the first
 * event. With a clock record set (pw_trace_set_clock) the metadata carries
 * "clock": {"t0_ns": the process's clock at "ts" 0, "world_rank",
 * "world_size", "offset_ns", "measured_offset_ns", "rtt_ns", "same_host",
 * "host", "run": 16 hex digits}. PW_ERR_IO on failure. */
pw_status pw_trace_write(const pw_trace *t, const char *path, const pw_trace_meta *meta);

/* The `"pipewright": {...}` member exactly as pw_trace_write puts it (no
 * comma around it), for tools that write traces of their own (pw_trace_merge):
 * `dropped` events the writer lost; `clock` NULL writes no "clock" block,
 * else one whose "t0_ns" is `t0_ns`, the process's clock at the file's
 * "ts": 0. Arrays are written with n_ranks (n_chunks) entries;
 * "micro_batches" only when n_micro > 0. */
void pw_trace_write_meta(FILE *f, const pw_trace_meta *m, int64_t dropped, const pw_trace_clock *clock,
                         int64_t t0_ns);
/* `s` (UTF-8; NULL writes "") as a JSON string literal: quotes, backslashes
 * and control characters escaped, everything else as is. */
void pw_trace_write_string(FILE *f, const char *s);

#ifdef __cplusplus
}
#endif
#endif
