/* pipewright — the metrics log's writer (runtime/metrics_log.h). */
#include "runtime/metrics_log.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct pw_metrics_log {
    int fd;
    char *path;
    char *line;                /* the line being formatted, cap bytes */
    size_t cap, len;
};

pw_status pw_metrics_log_open(const char *path, int max_stages, pw_metrics_log **out)
{
    *out = NULL;
    if (!path || max_stages < 0) return pw_error(PW_ERR_INVALID_ARG, "metrics log: a path and a stage count >= 0 are needed");
    pw_metrics_log *log = calloc(1, sizeof *log);
    if (!log) return pw_error(PW_ERR_NOMEM, "out of memory");
    log->fd = -1;
    log->cap = 1024 + 32 * (size_t)max_stages; /* a line's fixed keys, then one number per stage */
    log->line = malloc(log->cap);
    log->path = strdup(path);
    if (!log->line || !log->path) {
        pw_metrics_log_close(log);
        return pw_error(PW_ERR_NOMEM, "out of memory");
    }
    log->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (log->fd < 0) {
        pw_status st = pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
        pw_metrics_log_close(log);
        return st;
    }
    *out = log;
    return PW_OK;
}

void pw_metrics_log_close(pw_metrics_log *log)
{
    if (!log) return;
    if (log->fd >= 0) close(log->fd);
    free(log->path);
    free(log->line);
    free(log);
}

static void jput(pw_metrics_log *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jput(pw_metrics_log *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(m->line + m->len, m->cap - m->len, fmt, ap);
    va_end(ap);
    if (k > 0) m->len += (size_t)k < m->cap - m->len ? (size_t)k : m->cap - m->len - 1;
}

/* `,"key":x`; JSON has no NaN or infinity, so those (and "not measured") are null. */
static void jnum(pw_metrics_log *m, const char *key, double x)
{
    if (isfinite(x)) jput(m, ",\"%s\":%.9g", key, x);
    else jput(m, ",\"%s\":null", key);
}

/* A float (the lr) with the fewest digits that read back as the same float:
 * 0.01, not 0.00999999978. */
static void jfloat(pw_metrics_log *m, const char *key, float x)
{
    if (!isfinite(x)) {
        jnum(m, key, x);
        return;
    }
    char b[40];
    for (int digits = 6; digits <= 9; digits++) {
        snprintf(b, sizeof b, "%.*g", digits, (double)x);
        if ((float)strtod(b, NULL) == x) break;
    }
    jput(m, ",\"%s\":%s", key, b);
}

/* Ends the line and writes it in one piece. */
static pw_status flush_line(pw_metrics_log *m)
{
    jput(m, "}\n");
    for (size_t done = 0; done < m->len;) {
        ssize_t w = write(m->fd, m->line + done, m->len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            m->len = 0;
            return pw_error(PW_ERR_IO, "%s: write failed: %s", m->path, w < 0 ? strerror(errno) : "nothing written");
        }
        done += (size_t)w;
    }
    m->len = 0;
    return PW_OK;
}

pw_status pw_metrics_log_step(pw_metrics_log *m, const pw_metrics_step_rec *r)
{
    jput(m, "{\"type\":\"step\",\"step\":%lld,\"epoch\":%lld", (long long)r->step, (long long)r->epoch);
    jnum(m, "loss", r->loss);
    jfloat(m, "lr", r->lr);
    jnum(m, "grad_norm", r->grad_norm);
    jnum(m, "samples_per_s", r->samples_per_s);
    if (!(r->tokens_per_s <= 0)) jnum(m, "tokens_per_s", r->tokens_per_s);
    jnum(m, "step_ms", r->step_ms);
    jnum(m, "bubble_pct", r->bubble_pct);
    jput(m, ",\"stage_busy_ms\":[");
    for (int s = 0; s < r->n_stages; s++) {
        if (isfinite(r->stage_busy_ms[s])) jput(m, "%s%.6g", s ? "," : "", r->stage_busy_ms[s]);
        else jput(m, "%snull", s ? "," : "");
    }
    jput(m, "]");
    jnum(m, "elapsed_s", r->elapsed_s);
    return flush_line(m);
}

pw_status pw_metrics_log_eval(pw_metrics_log *m, const pw_metrics_eval_rec *r)
{
    jput(m, "{\"type\":\"eval\",\"step\":%lld,\"epoch\":%lld", (long long)r->step, (long long)r->epoch);
    jnum(m, "loss", r->loss);
    if (r->unigram_entropy >= 0) {
        jput(m, ",\"accuracy\":null");
        jnum(m, "ppl", exp(r->loss));
        jnum(m, "token_accuracy", r->accuracy);
        jnum(m, "unigram_entropy", r->unigram_entropy);
    } else {
        jnum(m, "accuracy", r->accuracy);
    }
    jput(m, ",\"samples\":%lld", (long long)r->samples);
    jnum(m, "eval_ms", r->eval_ms);
    jnum(m, "elapsed_s", r->elapsed_s);
    return flush_line(m);
}

pw_status pw_metrics_log_move(pw_metrics_log *m, const pw_metrics_move_rec *r)
{
    jput(m, "{\"type\":\"rebalance\",\"step\":%lld,\"forced\":%s,\"revert\":%s,\"refine\":%s", (long long)r->step,
         r->forced ? "true" : "false", r->revert ? "true" : "false", r->refine ? "true" : "false");
    for (int k = 0; k < 2; k++) {
        const int *c = k ? r->new_cuts : r->old_cuts;
        jput(m, ",\"%s\":[", k ? "new_cuts" : "old_cuts");
        for (int i = 0; i < r->n_cuts; i++) jput(m, "%s%d", i ? "," : "", c[i]);
        jput(m, "]");
    }
    jnum(m, "predicted_gain", r->predicted_gain);
    jnum(m, "step_ms_before", r->step_ms_before);
    jnum(m, "predicted_step_ms", r->predicted_step_ms);
    jnum(m, "move_ms", r->move_ms);
    jput(m, ",\"moved_bytes\":%lld", (long long)r->moved_bytes);
    return flush_line(m);
}

pw_status pw_metrics_log_move_gain(pw_metrics_log *m, const pw_metrics_move_gain_rec *r)
{
    jput(m, "{\"type\":\"rebalance_gain\",\"step\":%lld,\"move_step\":%lld", (long long)r->step,
         (long long)r->move_step);
    jnum(m, "step_ms_before", r->step_ms_before);
    jnum(m, "step_ms_after", r->step_ms_after);
    jnum(m, "measured_gain", r->measured_gain);
    return flush_line(m);
}
