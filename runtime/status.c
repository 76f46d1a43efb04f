/* pipewright — status codes and the per-thread last-error message. */
#include "runtime/status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PW_ERRMSG_MAX 2048

static _Thread_local char tls_msg[PW_ERRMSG_MAX];

static const char *const status_names[PW_STATUS_COUNT] = {
    [PW_OK] = "ok",
    [PW_ERR_INVALID_ARG] = "invalid argument",
    [PW_ERR_PARSE] = "parse error",
    [PW_ERR_SHAPE] = "shape error",
    [PW_ERR_IO] = "I/O error",
    [PW_ERR_FORMAT] = "bad file format",
    [PW_ERR_NOMEM] = "out of memory",
    [PW_ERR_UNSUPPORTED] = "unsupported",
    [PW_ERR_SCHEDULE] = "invalid schedule",
    [PW_ERR_TIMEOUT] = "timeout",
    [PW_ERR_NUMERIC] = "numeric error",
    [PW_ERR_INTERNAL] = "internal error",
};

const char *pw_status_str(pw_status st)
{
    if ((unsigned)st >= PW_STATUS_COUNT) return "unknown status";
    return status_names[st];
}

pw_status pw_verror(pw_status st, const char *fmt, va_list ap)
{
    vsnprintf(tls_msg, sizeof tls_msg, fmt, ap);
    return st;
}

pw_status pw_error(pw_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pw_verror(st, fmt, ap);
    va_end(ap);
    return st;
}

pw_status pw_error_prefix(pw_status st, const char *fmt, ...)
{
    char prefix[512];
    char old[PW_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, tls_msg, sizeof old);
    /* prefix, then as much of the old message as still fits */
    size_t np = strlen(prefix), no = strlen(old);
    if (np > sizeof tls_msg - 1) np = sizeof tls_msg - 1;
    if (no > sizeof tls_msg - 1 - np) no = sizeof tls_msg - 1 - np;
    memcpy(tls_msg, prefix, np);
    memcpy(tls_msg + np, old, no);
    tls_msg[np + no] = '\0';
    return st;
}

const char *pw_last_error(void) { return tls_msg; }

void pw_clear_error(void) { tls_msg[0] = '\0'; }

void pw_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "pipewright: internal error: assertion '%s' failed at %s:%d\n",
            expr, file, line);
    abort();
}
