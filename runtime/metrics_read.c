/* pipewright — the metrics file reader (see metrics_read.h): one line at a
 * time into a bounded buffer, non-finite tokens marked, then jansson. */
#include "runtime/metrics_read.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* A value JSON cannot hold (NaN, Infinity) is rewritten to this string
 * before jansson parses the line, so it reads as "not finite" and not as a
 * syntax error. A real writer never puts a control character in a string. */
#define NONFINITE_MARK "\"\\u0001\""

typedef struct src {
    FILE *f;                        /* or ... */
    const unsigned char *p, *end;   /* ... memory */
} src;

static int src_getc(src *s)
{
    if (s->f) return getc_unlocked(s->f);
    return s->p < s->end ? *s->p++ : EOF;
}

typedef struct mr {
    pw_metrics *m;
    const char *name;
    int64_t line;
    char *buf;                      /* the line (grows up to PW_METRICS_MAX_LINE) */
    size_t buf_cap;
    char *json;                     /* the line with non-finite tokens marked: 3 x + 1 */
    size_t json_cap;
    size_t cap[PW_METRIC_COUNT];
    int64_t first_nonfinite_line;
    const char *first_nonfinite_key;
} mr;

static pw_status mr_fail(mr *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static pw_status mr_fail(mr *r, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return pw_error(PW_ERR_PARSE, "%s:%" PRId64 ": %s", r->name, r->line, what);
}

static void add_note(pw_metrics *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_note(pw_metrics *m, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char **p = realloc(m->notes, (size_t)(m->n_notes + 1) * sizeof *p);
    if (!p) return;
    m->notes = p;
    if ((m->notes[m->n_notes] = strdup(buf))) m->n_notes++;
}

/* Copies line[0, n) to out, each NaN / Infinity / inf token in a value
 * position (outside strings, after ':', ',' or '[') replaced by the mark.
 * out holds 3n + 1 bytes (a 3-byte token grows to 8). Returns the length. */
static size_t mark_nonfinite(const char *line, size_t n, char *out)
{
    static const char *const tok[] = {"-Infinity", "+Infinity", "Infinity", "-NaN", "+NaN", "NaN", "-nan",
                                      "+nan", "nan", "-inf", "+inf", "inf", "-INF", "+INF", "INF"};
    size_t o = 0;
    int in_str = 0, esc = 0;
    char prev = 0; /* last significant byte outside strings */
    for (size_t i = 0; i < n;) {
        const char c = line[i];
        if (in_str) {
            out[o++] = c, i++;
            if (esc) esc = 0;
            else if (c == '\\') esc = 1;
            else if (c == '"') in_str = 0, prev = '"';
            continue;
        }
        if (c == '"') {
            in_str = 1;
            out[o++] = c, i++;
            continue;
        }
        if (prev == ':' || prev == ',' || prev == '[') {
            size_t k = 0, len = 0;
            for (; k < sizeof tok / sizeof *tok; k++) {
                len = strlen(tok[k]);
                if (len > n - i || memcmp(line + i, tok[k], len)) continue;
                const char next = i + len < n ? line[i + len] : ',';
                if (next == ',' || next == '}' || next == ']' || next == ' ' || next == '\t' || next == '\r' ||
                    next == '\n')
                    break;
            }
            if (k < sizeof tok / sizeof *tok) {
                memcpy(out + o, NONFINITE_MARK, sizeof NONFINITE_MARK - 1);
                o += sizeof NONFINITE_MARK - 1;
                i += len;
                prev = '"';
                continue;
            }
        }
        if (c != ' ' && c != '\t' && c != '\r' && c != '\n') prev = c; /* JSON's whitespace */
        out[o++] = c, i++;
    }
    out[o] = '\0';
    return o;
}

static int is_mark(const json_t *v)
{
    return json_is_string(v) && json_string_length(v) == 1 && json_string_value(v)[0] == '\x01';
}

static const char *type_of(const json_t *v)
{
    return json_is_string(v) ? "a string" : json_is_object(v) ? "an object" : json_is_array(v) ? "an array"
         : json_is_boolean(v) ? "a boolean" : json_is_null(v) ? "null" : "a number";
}

enum { NUM_ABSENT = 0, NUM_VALUE, NUM_NONFINITE };

/* A number member: NUM_VALUE with *v, NUM_ABSENT, or NUM_NONFINITE (NaN,
 * Infinity, or null unless null_is_absent); the wrong type is an error. */
static pw_status get_num(mr *r, json_t *o, const char *key, int null_is_absent, double *v, int *state)
{
    json_t *x = json_object_get(o, key);
    *state = NUM_ABSENT;
    if (!x || (json_is_null(x) && null_is_absent)) return PW_OK;
    if (json_is_number(x)) {
        *v = json_number_value(x);
        *state = isfinite(*v) ? NUM_VALUE : NUM_NONFINITE;
    } else if (json_is_null(x) || is_mark(x)) {
        *state = NUM_NONFINITE;
    } else {
        return mr_fail(r, "\"%s\" is %s, expected a number", key, type_of(x));
    }
    if (*state == NUM_NONFINITE) {
        if (!r->m->nonfinite++) {
            r->first_nonfinite_line = r->line;
            r->first_nonfinite_key = key; /* a string literal of the caller */
        }
    }
    return PW_OK;
}

static pw_status push(mr *r, pw_metric k, int64_t step, double v)
{
    pw_metrics_series *s = &r->m->series[k];
    if ((size_t)s->n == r->cap[k]) {
        size_t nc = r->cap[k] ? 2 * r->cap[k] : 64;
        pw_metrics_point *p = realloc(s->p, nc * sizeof *p);
        if (!p) return pw_error(PW_ERR_NOMEM, "%s: out of memory", r->name);
        s->p = p;
        r->cap[k] = nc;
    }
    s->p[s->n++] = (pw_metrics_point){.step = step, .value = v};
    return PW_OK;
}

/* One parsed line of a known type. */
static pw_status take_line(mr *r, json_t *o, int eval)
{
    json_t *sv = json_object_get(o, "step");
    int64_t step;
    if (!sv) return mr_fail(r, "%s line without \"step\"", eval ? "an eval" : "a step");
    if (json_is_integer(sv) && json_integer_value(sv) >= 0) {
        step = json_integer_value(sv);
    } else if (json_is_real(sv) && json_real_value(sv) >= 0 && json_real_value(sv) <= 9007199254740992.0 &&
               json_real_value(sv) == floor(json_real_value(sv))) {
        step = (int64_t)json_real_value(sv);
    } else {
        return mr_fail(r, "\"step\" is %s, expected an integer >= 0",
                       json_is_number(sv) ? "not an integer >= 0" : is_mark(sv) ? "not finite" : type_of(sv));
    }
    json_t *ev = json_object_get(o, "epoch");
    if (ev && !json_is_null(ev) && !json_is_number(ev))
        return mr_fail(r, "\"epoch\" is %s, expected a number", is_mark(ev) ? "not finite" : type_of(ev));
    /* pipeline-run writes null for a value that is not finite and for one it
     * did not measure (grad_norm without clipping, accuracy of a language
     * model). Null counts as "not finite" only where a value is always
     * measured: the losses and the throughput, the curves pipe-trace draws. */
    static const struct { const char *key; pw_metric k; int eval, null_is_absent; } num[] = {
        {"loss", PW_METRIC_LOSS, 0, 0},
        {"lr", PW_METRIC_LR, 0, 1},
        {"grad_norm", PW_METRIC_GRAD_NORM, 0, 1},
        {"samples_per_s", PW_METRIC_SAMPLES_PER_S, 0, 0},
        {"step_ms", PW_METRIC_STEP_MS, 0, 1},
        {"bubble_pct", PW_METRIC_BUBBLE_PCT, 0, 1},
        {"loss", PW_METRIC_EVAL_LOSS, 1, 0},
        {"accuracy", PW_METRIC_EVAL_ACCURACY, 1, 1},
    };
    for (size_t i = 0; i < sizeof num / sizeof *num; i++) {
        if (num[i].eval != eval) continue;
        double v = 0;
        int state;
        PW_CHECK(get_num(r, o, num[i].key, num[i].null_is_absent, &v, &state));
        if (state == NUM_VALUE) PW_CHECK(push(r, num[i].k, step, v));
    }
    json_t *busy = json_object_get(o, "stage_busy_ms");
    if (!eval && busy) {
        if (!json_is_array(busy)) return mr_fail(r, "\"stage_busy_ms\" is %s, expected an array", type_of(busy));
        for (size_t i = 0; i < json_array_size(busy); i++) {
            json_t *x = json_array_get(busy, i);
            if (!json_is_number(x) && !json_is_null(x) && !is_mark(x))
                return mr_fail(r, "\"stage_busy_ms\"[%zu] is %s, expected a number", i, type_of(x));
        }
    }
    if (eval) r->m->eval_lines++;
    else r->m->step_lines++;
    return PW_OK;
}

static pw_status parse_line(mr *r, size_t n)
{
    while (n > 0 && (r->buf[n - 1] == '\r' || r->buf[n - 1] == ' ' || r->buf[n - 1] == '\t')) n--;
    size_t lead = 0;
    while (lead < n && (r->buf[lead] == ' ' || r->buf[lead] == '\t')) lead++;
    if (lead == n) return PW_OK; /* blank */
    if (3 * (n - lead) + 1 > r->json_cap) {
        char *p = realloc(r->json, 3 * (n - lead) + 1);
        if (!p) return pw_error(PW_ERR_NOMEM, "%s: out of memory", r->name);
        r->json = p;
        r->json_cap = 3 * (n - lead) + 1;
    }
    const size_t len = mark_nonfinite(r->buf + lead, n - lead, r->json);
    json_error_t jerr;
    json_t *o = json_loadb(r->json, len, 0, &jerr);
    if (!o) return mr_fail(r, "not a JSON object: %s (column %d)", jerr.text, jerr.column);
    pw_status st = PW_OK;
    if (!json_is_object(o)) {
        st = mr_fail(r, "%s, expected a JSON object", type_of(o));
        goto out;
    }
    json_t *type = json_object_get(o, "type");
    if (type && !json_is_string(type)) {
        st = mr_fail(r, "\"type\" is %s, expected a string", type_of(type));
        goto out;
    }
    const char *t = type ? json_string_value(type) : "";
    if (!strcmp(t, "step")) st = take_line(r, o, 0);
    else if (!strcmp(t, "eval")) st = take_line(r, o, 1);
    else r->m->ignored_lines++;
out:
    json_decref(o);
    return st;
}

static pw_status read_src(src *s, const char *name, pw_metrics **out)
{
    *out = NULL;
    mr r = {.name = name};
    pw_metrics *m = r.m = calloc(1, sizeof *m);
    pw_status st = PW_OK;
    if (!m || !(m->file = strdup(name))) {
        st = pw_error(PW_ERR_NOMEM, "%s: out of memory", name);
        goto fail;
    }
    for (int c = 0; c != EOF;) {
        size_t n = 0;
        while ((c = src_getc(s)) != EOF && c != '\n') {
            if (n == PW_METRICS_MAX_LINE) {
                r.line = m->lines + 1;
                st = mr_fail(&r, "line longer than %d bytes (not a metrics file?)", PW_METRICS_MAX_LINE);
                goto fail;
            }
            if (n == r.buf_cap) {
                size_t nc = r.buf_cap ? 2 * r.buf_cap : 4096;
                char *p = realloc(r.buf, nc);
                if (!p) {
                    st = pw_error(PW_ERR_NOMEM, "%s: out of memory", name);
                    goto fail;
                }
                r.buf = p;
                r.buf_cap = nc;
            }
            r.buf[n++] = (char)c;
        }
        if (c == EOF && n == 0) break;
        r.line = ++m->lines;
        PW_CHECK_GOTO(parse_line(&r, n), st, fail);
    }
    if (s->f && ferror(s->f)) {
        st = pw_error(PW_ERR_IO, "%s: read error: %s", name, strerror(errno));
        goto fail;
    }
    if (m->nonfinite)
        add_note(m, "%s: %" PRId64 " value%s not finite (NaN, Infinity or null) left out; the first at line %" PRId64
                 " (\"%s\")", name, m->nonfinite, m->nonfinite > 1 ? "s" : "", r.first_nonfinite_line,
                 r.first_nonfinite_key);
    if (m->ignored_lines)
        add_note(m, "%s: %" PRId64 " line%s of other types ignored", name, m->ignored_lines,
                 m->ignored_lines > 1 ? "s" : "");
    free(r.buf);
    free(r.json);
    *out = m;
    return PW_OK;
fail:
    free(r.buf);
    free(r.json);
    pw_metrics_destroy(m);
    return st;
}

pw_status pw_metrics_read_stream(FILE *f, const char *name, pw_metrics **out)
{
    src s = {.f = f};
    return read_src(&s, name ? name : "<stream>", out);
}

pw_status pw_metrics_read_memory(const void *data, size_t size, const char *name, pw_metrics **out)
{
    *out = NULL;
    if (!data && size) return pw_error(PW_ERR_INVALID_ARG, "%s: NULL data of %zu bytes", name ? name : "<memory>", size);
    src s = {.p = data, .end = (const unsigned char *)data + size};
    return read_src(&s, name ? name : "<memory>", out);
}

pw_status pw_metrics_read(const char *path, pw_metrics **out)
{
    *out = NULL;
    if (!strcmp(path, "-")) return pw_metrics_read_stream(stdin, "<stdin>", out);
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
    pw_status st = pw_metrics_read_stream(f, path, out);
    fclose(f);
    return st;
}

void pw_metrics_destroy(pw_metrics *m)
{
    if (!m) return;
    for (int k = 0; k < PW_METRIC_COUNT; k++) free(m->series[k].p);
    for (int i = 0; i < m->n_notes; i++) free(m->notes[i]);
    free(m->notes);
    free(m->file);
    free(m);
}

const char *pw_metric_name(pw_metric k)
{
    static const char *const n[PW_METRIC_COUNT] = {"loss", "lr", "grad_norm", "samples_per_s", "step_ms",
                                                   "bubble_pct", "eval loss", "eval accuracy"};
    return (unsigned)k < PW_METRIC_COUNT ? n[k] : "?";
}
