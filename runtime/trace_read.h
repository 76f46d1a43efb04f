/* pipewright — a streaming reader of Chrome Trace Event JSON, with the
 * "pipewright" metadata block that pw_trace_write puts in front of the events.
 *
 *     pw_trace_reader *rd;
 *     if (pw_trace_reader_open("run.json", &rd) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());   // "run.json:line 7: ..."
 *         return 1;
 *     }
 *     pw_trace_record ev;
 *     int more;
 *     while (pw_trace_reader_next(rd, &ev, &more) == PW_OK && more)
 *         if (ev.ph == 'X') use(ev.name, ev.tid, ev.ts_ns, ev.dur_ns, ev.step, ev.mb);
 *     // pw_last_error() says what went wrong when the loop ended on an error
 *     const pw_trace_info *info = pw_trace_reader_info(rd);  // info->present
 *     pw_trace_reader_close(rd);
 *
 * What it reads. The JSON Object Format ({"traceEvents": [...], ...}, members
 * in any order) and the JSON Array Format ([event, ...], which the Chrome
 * format lets end without its closing bracket). It holds one event at a time
 * plus a 1 MiB read buffer, so traces of any size stream in constant memory;
 * whitespace and line breaks may be anywhere (one event a line, as pipewright
 * writes, is not required). The "pipewright" block may come before or after
 * the events; pipewright writes it first, so pw_trace_reader_info() is
 * complete as soon as the first event is returned. Other top-level members
 * are skipped without being stored.
 *
 * What it checks. The JSON is parsed strictly (RFC 8259: no trailing commas,
 * no comments, valid UTF-8, no \u0000) and every error is reported as
 * PW_ERR_PARSE "FILE:line N: what is wrong" with the line where it was found.
 * Each event must be an object with a string "ph"; complete events ("X") need
 * "name", "ts", "dur" and "tid", begin/end events ("B"/"E") need "ts" and
 * "tid"; "pid"/"tid" must be 64-bit integers, "ts"/"dur" numbers in
 * [0, PW_TRACE_MAX_US] (JSON has no NaN or infinity), so that ts + dur and any difference of two times fit in int64
 * nanoseconds. Those are hard errors; an error inside an event names it:
 * "run.json:line 9: event 3: \"ts\" is negative (-5.000 us)", events counted
 * from 1 in file order. The "args" members pipewright uses (step, stage, mb,
 * peer, bytes) are optional; one of the wrong type or sign (a generic trace
 * may use the same names for other things) is dropped and flagged in the
 * record (PW_TREC_BAD_ARGS) rather than failing the read.
 *
 * Times. Chrome's ts and dur are microseconds; records carry integer
 * nanoseconds, converted from the decimal text exactly (no floating-point
 * rounding for up to 3 fractional digits, which is what pipewright writes).
 *
 * Memory. The reader holds one event, its 1 MiB buffer and the metadata
 * block (at most 64 MiB); nothing it allocates is sized by a number read from
 * the file. Thread safety: one reader per thread; readers share nothing.
 */
#ifndef PW_RUNTIME_TRACE_READ_H
#define PW_RUNTIME_TRACE_READ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "runtime/status.h"
#include "runtime/trace.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest "ts" or "dur" accepted, in microseconds (4e15 us, about 127
 * years): ts + dur stays below INT64_MAX nanoseconds. */
#define PW_TRACE_MAX_US INT64_C(4000000000000000)
#define PW_TRACE_MAX_NS (PW_TRACE_MAX_US * 1000)

/* The "pipewright" metadata block (see pw_trace_write). */
typedef struct pw_trace_info {
    int present;                 /* 1: the file has the block */
    int64_t line;                /* line where the block starts */
    int version;                 /* 1 */
    char *schedule;              /* "1f1b", "gpipe", a CSV path; "" when absent */
    char *graph;                 /* "" when absent */
    int ranks;                   /* >= 1 */
    int stages;                  /* >= 1 (ranks when absent) */
    int micro_batches;           /* >= 1, or 0 when absent */
    int replicas;                /* >= 1 */
    int64_t micro_batch_size;    /* 0 when absent */
    int64_t steps;               /* 0 when absent */
    double theory_bubble;        /* < 0: unknown or absent */
    int n_peak_inflight;         /* entries in peak_inflight (0: absent) */
    int *peak_inflight;
    int n_measured_peak;
    int *measured_peak;
    int n_costs;                 /* entries in costs (0: absent) */
    pw_trace_stage_cost *costs;
    int64_t dropped_events;      /* events the writer could not record */
    /* "clock": written by a process of a multi-process run (pw_trace_clock);
     * pw_trace_merge puts the processes' files on one clock with it. */
    int has_clock;               /* 1: the block is there (then t0_ns is) */
    int64_t clock_t0_ns;         /* the process's clock at "ts" 0, in [0, 2^61] */
    int64_t clock_offset_ns;     /* add to reach world rank 0's clock, |.| <= 2^61 (0 absent) */
    int64_t clock_measured_ns;   /* the ping-pong estimate (0 absent) */
    int64_t clock_rtt_ns;        /* its round trip; -1 absent */
    int clock_same_host;         /* 1: on world rank 0's host */
    int world_rank, world_size;  /* -1 and 0 when absent; rank < size */
    char host[64];               /* "" absent (longer names are cut) */
    char run_id[40];             /* "" absent */
    char display_time_unit[8];   /* top-level "displayTimeUnit" ("" absent) */
} pw_trace_info;

/* pw_trace_record.has bits. */
enum {
    PW_TREC_TS = 1u << 0,
    PW_TREC_DUR = 1u << 1,
    PW_TREC_PID = 1u << 2,
    PW_TREC_TID = 1u << 3,
    PW_TREC_CAT = 1u << 4,
    PW_TREC_NAME = 1u << 5,
    PW_TREC_STEP = 1u << 6,
    PW_TREC_STAGE = 1u << 7,
    PW_TREC_MB = 1u << 8,
    PW_TREC_PEER = 1u << 9,
    PW_TREC_BYTES = 1u << 10,
    PW_TREC_ARG_NAME = 1u << 11,
    PW_TREC_BAD_ARGS = 1u << 12,  /* an args member we read had the wrong type */
    PW_TREC_WIRE_BYTES = 1u << 13,
};

/* One event as read. The strings belong to the reader and stay valid until
 * the next pw_trace_reader_next / _seek / _close. */
typedef struct pw_trace_record {
    char ph;                     /* 'X', 'B', 'E', 'M', 'i', ... (first byte of "ph") */
    unsigned has;                /* PW_TREC_* */
    const char *name;            /* "" when absent */
    const char *cat;             /* "" when absent */
    const char *arg_name;        /* args.name (thread_name metadata); "" when absent */
    int64_t pid, tid;            /* 0 when absent */
    int64_t ts_ns, dur_ns;       /* 0 when absent */
    int64_t step;                /* args.step, -1 when absent */
    int32_t stage, mb, peer;     /* args.*, -1 when absent */
    int64_t bytes;               /* args.bytes, 0 when absent */
    int64_t wire_bytes;          /* args.wire_bytes (a compressed ALLREDUCE's payload), 0 when absent */
    int64_t line;                /* line where the event's '{' is */
    int64_t offset;              /* byte offset of that '{' (for pw_trace_reader_seek) */
} pw_trace_record;

typedef struct pw_trace_reader pw_trace_reader;

/* Opens `path` ("-" reads stdin). PW_ERR_IO when it cannot be opened,
 * PW_ERR_PARSE "PATH:line 1: empty file ..." when it holds nothing but
 * whitespace, or when it does not start like a JSON object or array. */
pw_status pw_trace_reader_open(const char *path, pw_trace_reader **out);
/* Reads an already open stream, named `name` in messages; the caller keeps
 * ownership of `f` (close it after pw_trace_reader_close). */
pw_status pw_trace_reader_open_stream(FILE *f, const char *name, pw_trace_reader **out);
/* Reads the `size` bytes at `data` (a trace already in memory), named `name`
 * in messages. Nothing is copied: `data` must stay valid and unchanged until
 * pw_trace_reader_close; the reader never writes to it. Seeking works. */
pw_status pw_trace_reader_open_memory(const void *data, size_t size, const char *name,
                                      pw_trace_reader **out);
/* Closes the reader (and the file it opened). Accepts NULL. */
void pw_trace_reader_close(pw_trace_reader *rd);

/* Next event. PW_OK with *more = 1 and *ev filled, or PW_OK with *more = 0
 * at the end of a well-formed trace; PW_ERR_PARSE "FILE:line N: ..." on
 * malformed input (truncation included), PW_ERR_IO on a read error. After an
 * error every further call returns the same error. */
pw_status pw_trace_reader_next(pw_trace_reader *rd, pw_trace_record *ev, int *more);

/* The metadata block; ->present is 0 until the block has been read (a trace
 * without one never sets it). Valid until pw_trace_reader_close. */
const pw_trace_info *pw_trace_reader_info(const pw_trace_reader *rd);
/* The file's name as used in messages. */
const char *pw_trace_reader_name(const pw_trace_reader *rd);
/* Notes on accepted oddities ("array not closed ..."), "" when none. */
const char *pw_trace_reader_note(const pw_trace_reader *rd);

/* Repositions at an event that an earlier pw_trace_reader_next returned
 * (its offset and line), so a second pass can re-read parts of the trace.
 * Works on any input: a stream that cannot seek (a pipe) is copied to a
 * temporary file as it is read. The next call returns that event; reading
 * then continues with the events after it. PW_ERR_IO when seeking fails. */
pw_status pw_trace_reader_seek(pw_trace_reader *rd, int64_t offset, int64_t line);

#ifdef __cplusplus
}
#endif
#endif
