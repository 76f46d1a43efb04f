/* pipewright — one timeline from the per-process traces of a multi-process
 * run. Under mpirun each process of pipeline-run writes its own trace
 * (run.rank0.json, run.rank1.json, ...: its own track, timed by its own
 * clock); pw_trace_merge writes them as the one trace the same run in one
 * process would have written, so the analysis (trace_analysis.h) reads it
 * unchanged.
 *
 *     const char *files[] = {"run.rank0.json", "run.rank1.json"};
 *     pw_trace_merge_report rep;
 *     if (pw_trace_merge_files(files, 2, out, &rep) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());  // names the file(s)
 *         return 1;
 *     }
 *     for (int i = 0; i < rep.n_notes; i++) fprintf(stderr, "%s\n", rep.notes[i]);
 *     pw_trace_merge_report_free(&rep);
 *
 * What it writes. One Chrome trace: the metadata block of the first input
 * (in world-rank order), with each rank's measured peak taken from that
 * rank's own file and the dropped events summed, and no "clock" block; then
 * every input's events, input after input, their times moved onto one clock
 * so that the earliest event of the run is at 0. Metadata events ("ph": "M",
 * thread names) that several inputs repeat are written once. Events keep the
 * members pipe-trace reads (name, cat, ph, pid, tid, ts, dur and args step,
 * stage, mb, peer, bytes, name); other args are dropped.
 *
 * Clocks. A file written by a process of an mpirun job carries a "clock"
 * block (pw_trace_clock, trace.h): t0_ns, its CLOCK_MONOTONIC at "ts" 0, and
 * offset_ns, which puts that clock on world rank 0's (0 for processes on rank
 * 0's host; elsewhere measured at start-up from the ping-pong with the
 * shortest round trip, so within +-rtt/2). An event at "ts" t is placed at
 * t0_ns + offset_ns + t on rank 0's clock. When every input has a clock
 * block, that is the merge (PW_MERGE_CLOCK_OFFSETS). When any input lacks
 * one (traces written before pipewright recorded clocks, or not by a process
 * of an MPI run), all are merged with their times as written
 * (PW_MERGE_CLOCK_AS_WRITTEN), which lines the files up on their first
 * events, and a note says so.
 *
 * Checks. Inputs whose metadata disagree (graph, schedule, ranks, stages,
 * replicas, micro-batches, micro-batch size), that come from different runs
 * (the run id rank 0 drew) or that hold the same MPI rank or the same track
 * twice are an error naming both files (PW_ERR_INVALID_ARG). Missing ranks,
 * a rank whose file traced fewer steps, or clocks that could not be used are
 * notes ("warning: ...", "note: ..."), and the merge goes on. A malformed
 * input is the reader's PW_ERR_PARSE "FILE:line N: ...".
 *
 * Bounds. Each input is read twice with trace_read.h's streaming reader (its
 * metadata, then its events), one at a time; memory holds the inputs'
 * metadata and one entry per distinct track and per distinct metadata event,
 * never a number read from a file. Fuzzed by tests/fuzz/fuzz_trace_merge.c.
 *
 * Thread safety: none needed; a call shares nothing with another call.
 */
#ifndef PW_RUNTIME_TRACE_MERGE_H
#define PW_RUNTIME_TRACE_MERGE_H

#include <stdint.h>
#include <stdio.h>

#include "runtime/status.h"
#include "runtime/trace_read.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_trace_merge_clock {
    PW_MERGE_CLOCK_OFFSETS = 0,  /* every input has a clock block: times on world rank 0's clock */
    PW_MERGE_CLOCK_AS_WRITTEN,   /* some input has none: times as written */
} pw_trace_merge_clock;

typedef struct pw_trace_merge_report {
    int n_inputs;
    pw_trace_merge_clock clock;
    int n_hosts;                 /* distinct hosts the clock blocks name (0: none named) */
    int64_t max_rtt_ns;          /* largest round trip behind an applied offset (a rank
                                  * off rank 0's host): alignment within +-max_rtt/2;
                                  * 0 when every rank shares rank 0's clock */
    int64_t max_estimate_ns;     /* largest |start-up estimate| of the ranks on rank
                                  * 0's host, whose true offset is 0 (a check of the
                                  * method: at most their rtt/2) */
    int64_t events;              /* events written */
    int *order;                  /* [n_inputs] input indices in the order written */
    int n_notes;
    char **notes;                /* "warning: ..." / "note: ...", naming the files */
} pw_trace_merge_report;

/* Opens input i (0 <= i < n) at its start; the merge closes it. Each input is
 * opened twice. */
typedef pw_status (*pw_trace_merge_open_fn)(void *user, int i, pw_trace_reader **out);

/* Merges n >= 1 inputs into `out` (written, not closed or flushed). *rep
 * is filled on success and on failure (free it either way). Errors: see
 * "Checks"; PW_ERR_IO when writing fails; PW_ERR_NOMEM. On error `out`
 * holds a partial trace. */
pw_status pw_trace_merge(int n, pw_trace_merge_open_fn open, void *user, FILE *out, pw_trace_merge_report *rep);
/* The same for files ("-", stdin, cannot be read twice: PW_ERR_INVALID_ARG). */
pw_status pw_trace_merge_files(const char *const *paths, int n, FILE *out, pw_trace_merge_report *rep);
void pw_trace_merge_report_free(pw_trace_merge_report *rep); /* accepts NULL and a zeroed report */

#ifdef __cplusplus
}
#endif
#endif
