/* pipewright — status codes and error messages.
 *
 * Every library call that can fail returns a pw_status. On failure the call
 * also records a human-readable message on the calling thread that says what
 * went wrong and where ("model.graph:12:5: error: unknown op 'linaer'").
 *
 *     pw_graph *g;
 *     if (pw_graph_parse_file("model.graph", &g) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());
 *         return 1;
 *     }
 *
 * The library never exits and never aborts on bad input; PW_ASSERT is reserved
 * for broken internal invariants (bugs).
 *
 * Ownership and threads: every function here may be called from any
 * thread. The last error is per thread (thread-local storage): a call that
 * fails records its message on the calling thread only, and the string
 * pw_last_error returns belongs to the library, valid until the next error
 * recorded on that thread; pw_status_str's strings are static.
 */
#ifndef PW_RUNTIME_STATUS_H
#define PW_RUNTIME_STATUS_H

#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_status {
    PW_OK = 0,
    PW_ERR_INVALID_ARG,  /* a caller passed something unusable (flag, config) */
    PW_ERR_PARSE,        /* a text file (graph, schedule CSV) is malformed */
    PW_ERR_SHAPE,        /* shapes or dtypes do not agree */
    PW_ERR_IO,           /* open/read/write failed (errno in the message) */
    PW_ERR_FORMAT,       /* a binary file is truncated, corrupt or mismatched */
    PW_ERR_NOMEM,        /* allocation failed or a plan exceeds its budget */
    PW_ERR_UNSUPPORTED,  /* valid request this build or device cannot do */
    PW_ERR_SCHEDULE,     /* a schedule failed validation */
    PW_ERR_TIMEOUT,      /* a watchdog fired */
    PW_ERR_NUMERIC,      /* a non-finite loss or gradient */
    PW_ERR_INTERNAL,     /* a bug in pipewright */
    PW_STATUS_COUNT
} pw_status;

/* Short constant name of a status ("invalid argument"). Never NULL. */
const char *pw_status_str(pw_status st);

/* Records a formatted message as this thread's last error and returns `st`,
 * so a failing path reads `return pw_error(PW_ERR_IO, "%s: %s", path, ...);` */
pw_status pw_error(pw_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
pw_status pw_verror(pw_status st, const char *fmt, va_list ap);

/* Prepends context to this thread's last error ("loading checkpoint: " + msg)
 * and returns `st` unchanged. */
pw_status pw_error_prefix(pw_status st, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The last message recorded on this thread ("" when none). Valid until the
 * next pw_error on this thread. */
const char *pw_last_error(void);
void pw_clear_error(void);

#define PW_CHECK(call)                                                        \
    do {                                                                      \
        pw_status _pw_st = (call);                                            \
        if (_pw_st != PW_OK) return _pw_st;                                   \
    } while (0)

#define PW_CHECK_GOTO(call, st, label)                                        \
    do {                                                                      \
        (st) = (call);                                                        \
        if ((st) != PW_OK) goto label;                                        \
    } while (0)

/* A broken invariant: prints where and aborts. Never for bad input. */
void pw_assert_fail(const char *expr, const char *file, int line)
    __attribute__((noreturn));
#define PW_ASSERT(cond)                                                       \
    do {                                                                      \
        if (!(cond)) pw_assert_fail(#cond, __FILE__, __LINE__);               \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
