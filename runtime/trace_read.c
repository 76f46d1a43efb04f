/* pipewright — streaming Chrome Trace Event JSON reader (see trace_read.h).
 *
 * A hand-written strict JSON scanner over a 1 MiB buffer: the top level is a
 * small state machine that yields one traceEvents element per call; each
 * element is parsed member by member, keeping only the members pipe-trace
 * uses and skipping the rest without storing them. The "pipewright" block is
 * captured as text and handed to jansson (it is small). Line numbers are
 * counted in whitespace only: strict JSON has no raw line breaks elsewhere.
 */
#define _FILE_OFFSET_BITS 64
#include "runtime/trace_read.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#define RD_BUF (1u << 20)
#define RD_MAX_DEPTH 512
#define RD_MAX_META (64u << 20)   /* the metadata block is a few KB; refuse absurd ones */
#define RD_MAX_STR (1u << 24)     /* longest string kept (names); longer ones are errors */

enum rd_state {
    S_START,      /* nothing read yet */
    S_OBJ_FIRST,  /* after '{': a member or '}' */
    S_OBJ_NEXT,   /* after a member: ',' or '}' */
    S_EV_FIRST,   /* after '[': an event or ']' */
    S_EV_ELEM,    /* an event must come next (after ',' or a seek) */
    S_EV_NEXT,    /* after an event: ',' or ']' */
    S_END,        /* after the top-level value: only whitespace */
    S_DONE,
    S_FAILED,
};

/* A growable byte buffer. */
typedef struct rd_str {
    char *s;
    size_t n, cap;
} rd_str;

struct pw_trace_reader {
    FILE *f;              /* what we read from now */
    FILE *own;            /* opened by us (closed at the end) */
    FILE *spool;          /* copy of a non-seekable input (for seek) */
    int seekable;
    int64_t base;         /* file position of offset 0 */
    char *name;

    unsigned char *buf;   /* RD_BUF bytes read from f (NULL when reading memory) */
    const unsigned char *data, *p, *end; /* the bytes in hand: buf, or the caller's memory */
    size_t mem_size;      /* reading memory: all of it is in [data, data + mem_size) */
    int mem;              /* 1: reading the caller's memory, never a file */
    int64_t buf_off;      /* offset of data[0] */
    int64_t line;
    int eof;

    enum rd_state state;
    int array_format;     /* top level is [ ... ] */
    int seen_events;      /* a traceEvents member was found */
    int seeked;           /* re-reading after a seek: the metadata is known */
    int64_t n_events;     /* traceEvents elements started (1-based index of the current one) */
    int in_event;         /* parsing an element: messages name it */
    pw_status err;        /* sticky error */
    char *errmsg;

    rd_str key, sval, name_s, cat_s, argname_s, ph_s, meta;
    rd_str *capture;      /* skip_value copies consumed bytes here when set */
    int capture_bad;      /* the capture outgrew RD_MAX_META or memory */
    char note[256];
    pw_trace_info info;
};

/* ------------------------------------------------------------ errors */

static pw_status rd_fail_at(pw_trace_reader *rd, int64_t line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static pw_status rd_fail_at(pw_trace_reader *rd, int64_t line, const char *fmt, ...)
{
    if (rd->state == S_FAILED) return rd->err;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (rd->in_event)
        rd->err = pw_error(PW_ERR_PARSE, "%s:line %" PRId64 ": event %" PRId64 ": %s", rd->name, line,
                           rd->n_events, msg);
    else
        rd->err = pw_error(PW_ERR_PARSE, "%s:line %" PRId64 ": %s", rd->name, line, msg);
    free(rd->errmsg);
    rd->errmsg = strdup(pw_last_error());
    rd->state = S_FAILED;
    return rd->err;
}

#define rd_fail(rd, ...) rd_fail_at((rd), (rd)->line, __VA_ARGS__)

static pw_status rd_io_fail(pw_trace_reader *rd, const char *what)
{
    if (rd->state == S_FAILED) return rd->err;
    rd->err = pw_error(PW_ERR_IO, "%s: %s: %s", rd->name, what, strerror(errno ? errno : EIO));
    free(rd->errmsg);
    rd->errmsg = strdup(pw_last_error());
    rd->state = S_FAILED;
    return rd->err;
}

/* ------------------------------------------------------------ bytes */

/* Loads the next chunk. 0 at end of input (or on a read error, which sets
 * rd->eof = -1). */
static int refill(pw_trace_reader *rd)
{
    if (rd->eof) return 0;
    if (rd->mem) { /* everything was in hand from the start */
        rd->eof = 1;
        return 0;
    }
    rd->buf_off += rd->end - rd->data;
    size_t n = fread(rd->buf, 1, RD_BUF, rd->f);
    if (n == 0) {
        rd->eof = ferror(rd->f) ? -1 : 1;
        rd->data = rd->p = rd->end = rd->buf;
        return 0;
    }
    if (rd->spool && rd->f != rd->spool && fwrite(rd->buf, 1, n, rd->spool) != n) {
        rd->eof = -1;
        return 0;
    }
    rd->data = rd->p = rd->buf;
    rd->end = rd->buf + n;
    return 1;
}

static inline int peekc(pw_trace_reader *rd)
{
    if (rd->p == rd->end && !refill(rd)) return -1;
    return *rd->p;
}

static inline int64_t cur_off(const pw_trace_reader *rd) { return rd->buf_off + (rd->p - rd->data); }

/* Appends a consumed byte to the capture buffer (the metadata block). */
static void capture_byte(pw_trace_reader *rd, int c)
{
    rd_str *s = rd->capture;
    if (rd->capture_bad) return;
    if (s->n + 1 >= s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 4096;
        char *ns = cap <= RD_MAX_META ? realloc(s->s, cap) : NULL;
        if (!ns) {
            rd->capture_bad = 1; /* reported once the value ends */
            return;
        }
        s->s = ns;
        s->cap = cap;
    }
    s->s[s->n++] = (char)c;
}

static inline void take(pw_trace_reader *rd, int c)
{
    rd->p++;
    if (rd->capture) capture_byte(rd, c);
}

/* Skips whitespace; returns the next byte without consuming it, -1 at end. */
static inline int skip_ws(pw_trace_reader *rd)
{
    for (;;) {
        if (rd->p == rd->end && !refill(rd)) return -1;
        int c = *rd->p;
        if (c == '\n') {
            rd->line++;
        } else if (c != ' ' && c != '\t' && c != '\r') {
            return c;
        }
        take(rd, c);
    }
}

/* What a value starting with byte `c` is, for messages ("a string", "']'"). */
typedef struct what_buf {
    char s[24];
} what_buf;

static what_buf what_is(int c)
{
    what_buf w;
    const char *k;
    switch (c) {
    case -1: k = "the end of the file"; break;
    case '{': k = "an object"; break;
    case '[': k = "an array"; break;
    case '"': k = "a string"; break;
    case 't': case 'f': k = "a boolean"; break;
    case 'n': k = "null"; break;
    default:
        if (c == '-' || (c >= '0' && c <= '9')) k = "a number";
        else if (c > 0x20 && c < 0x7f) {
            snprintf(w.s, sizeof w.s, "'%c'", c);
            return w;
        } else {
            snprintf(w.s, sizeof w.s, "byte 0x%02x", c & 0xff);
            return w;
        }
    }
    snprintf(w.s, sizeof w.s, "%s", k);
    return w;
}

/* Error for an unexpected byte `c` where `expected` should be. */
static pw_status unexpected(pw_trace_reader *rd, int c, const char *expected)
{
    if (c < 0) {
        if (rd->eof < 0) return rd_io_fail(rd, "read error");
        return rd_fail(rd, "unexpected end of file (truncated trace?): expected %s", expected);
    }
    if (c >= 0x20 && c < 0x7f) return rd_fail(rd, "expected %s, found '%c'", expected, c);
    return rd_fail(rd, "expected %s, found byte 0x%02x", expected, c);
}

/* ------------------------------------------------------------ strings */

static int str_reserve(rd_str *s, size_t n)
{
    if (n <= s->cap) return 1;
    size_t cap = s->cap ? s->cap : 64;
    while (cap < n) cap *= 2;
    char *ns = realloc(s->s, cap);
    if (!ns) return 0;
    s->s = ns;
    s->cap = cap;
    return 1;
}

static int str_put(rd_str *s, const void *b, size_t n)
{
    if (!str_reserve(s, s->n + n + 1)) return 0;
    memcpy(s->s + s->n, b, n);
    s->n += n;
    s->s[s->n] = 0;
    return 1;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int read_hex4(pw_trace_reader *rd, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int c = peekc(rd), h = hexval(c);
        if (h < 0) return 0;
        take(rd, c);
        v = v << 4 | (unsigned)h;
    }
    *out = v;
    return 1;
}

static void put_utf8(rd_str *out, unsigned cp)
{
    unsigned char b[4];
    size_t n;
    if (cp < 0x80) { b[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { b[0] = 0xc0 | cp >> 6; b[1] = 0x80 | (cp & 0x3f); n = 2; }
    else if (cp < 0x10000) { b[0] = 0xe0 | cp >> 12; b[1] = 0x80 | (cp >> 6 & 0x3f); b[2] = 0x80 | (cp & 0x3f); n = 3; }
    else { b[0] = 0xf0 | cp >> 18; b[1] = 0x80 | (cp >> 12 & 0x3f); b[2] = 0x80 | (cp >> 6 & 0x3f); b[3] = 0x80 | (cp & 0x3f); n = 4; }
    if (out) str_put(out, b, n);
}

/* Length of the UTF-8 sequence starting with lead byte `c` (2-4), 0 if it is
 * not a valid lead byte. */
static int utf8_len(int c)
{
    if (c >= 0xc2 && c <= 0xdf) return 2;
    if (c >= 0xe0 && c <= 0xef) return 3;
    if (c >= 0xf0 && c <= 0xf4) return 4;
    return 0;
}

/* Reads a string whose opening quote is next; decodes it into `out` (NULL:
 * only validates). */
static pw_status read_string(pw_trace_reader *rd, rd_str *out)
{
    if (out) {
        out->n = 0;
        if (!str_reserve(out, 64)) return pw_error(PW_ERR_NOMEM, "%s: out of memory", rd->name);
        out->s[0] = 0;
    }
    take(rd, '"');
    for (;;) {
        if (rd->p == rd->end && !refill(rd)) return unexpected(rd, -1, "the end of a string");
        /* Fast path: a run of plain bytes. */
        const unsigned char *q = rd->p;
        while (q < rd->end && *q != '"' && *q != '\\' && *q >= 0x20 && *q < 0x80) q++;
        if (q > rd->p) {
            size_t n = (size_t)(q - rd->p);
            if (out) {
                if (out->n + n > RD_MAX_STR) return rd_fail(rd, "string longer than %u bytes", RD_MAX_STR);
                if (!str_put(out, rd->p, n)) return pw_error(PW_ERR_NOMEM, "%s: out of memory", rd->name);
            }
            if (rd->capture) {
                for (const unsigned char *b = rd->p; b < q; b++) take(rd, *b);
            } else {
                rd->p = q;
            }
            continue;
        }
        int c = *rd->p;
        if (c == '"') {
            take(rd, c);
            return PW_OK;
        }
        if (c < 0x20) return rd_fail(rd, "control character 0x%02x inside a string (unescaped)", c);
        if (c == '\\') {
            take(rd, c);
            int e = peekc(rd);
            if (e < 0) return unexpected(rd, -1, "an escape sequence");
            take(rd, e);
            char ch;
            switch (e) {
            case '"': ch = '"'; break;
            case '\\': ch = '\\'; break;
            case '/': ch = '/'; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'n': ch = '\n'; break;
            case 'r': ch = '\r'; break;
            case 't': ch = '\t'; break;
            case 'u': {
                unsigned cp, lo;
                if (!read_hex4(rd, &cp)) return rd_fail(rd, "bad \\u escape (four hex digits expected)");
                if (cp >= 0xdc00 && cp <= 0xdfff) return rd_fail(rd, "lone low surrogate \\u%04x", cp);
                if (cp >= 0xd800 && cp <= 0xdbff) {
                    if (peekc(rd) != '\\') return rd_fail(rd, "high surrogate \\u%04x without its pair", cp);
                    take(rd, '\\');
                    if (peekc(rd) != 'u') return rd_fail(rd, "high surrogate \\u%04x without its pair", cp);
                    take(rd, 'u');
                    if (!read_hex4(rd, &lo) || lo < 0xdc00 || lo > 0xdfff)
                        return rd_fail(rd, "high surrogate \\u%04x without its pair", cp);
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                }
                if (cp == 0) return rd_fail(rd, "\\u0000 inside a string is not supported");
                put_utf8(out, cp);
                continue;
            }
            default: return rd_fail(rd, "invalid escape '\\%c'", e >= 0x20 && e < 0x7f ? e : '?');
            }
            if (out && !str_put(out, &ch, 1)) return pw_error(PW_ERR_NOMEM, "%s: out of memory", rd->name);
            continue;
        }
        /* A multi-byte UTF-8 sequence: validate it. */
        int n = utf8_len(c);
        if (!n) return rd_fail(rd, "invalid UTF-8 byte 0x%02x inside a string", c);
        unsigned char seq[4];
        seq[0] = (unsigned char)c;
        take(rd, c);
        for (int i = 1; i < n; i++) {
            int d = peekc(rd);
            if (d < 0x80 || d > 0xbf) return rd_fail(rd, "invalid UTF-8 sequence inside a string");
            seq[i] = (unsigned char)d;
            take(rd, d);
        }
        /* Overlong 3/4-byte forms, surrogates and > U+10FFFF. */
        if ((c == 0xe0 && seq[1] < 0xa0) || (c == 0xed && seq[1] > 0x9f) ||
            (c == 0xf0 && seq[1] < 0x90) || (c == 0xf4 && seq[1] > 0x8f))
            return rd_fail(rd, "invalid UTF-8 sequence inside a string");
        if (out && !str_put(out, seq, (size_t)n)) return pw_error(PW_ERR_NOMEM, "%s: out of memory", rd->name);
    }
}

/* ------------------------------------------------------------ numbers */

#define NUM_MAX 64

/* Whether [s, s+n) is exactly one JSON number. */
static int valid_number(const unsigned char *s, size_t n)
{
    size_t i = 0;
    if (i < n && s[i] == '-') i++;
    if (i >= n) return 0;
    if (s[i] == '0') {
        i++;
    } else if (s[i] >= '1' && s[i] <= '9') {
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    } else {
        return 0;
    }
    if (i < n && s[i] == '.') {
        size_t d = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        if (i == d) return 0;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        size_t d = i;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
        if (i == d) return 0;
    }
    return i == n;
}

/* Reads a JSON number into buf (NUL terminated), checking its grammar. */
static pw_status read_number(pw_trace_reader *rd, char *buf)
{
    /* Fast path: the number and the byte after it are in the buffer. The
     * slow path below handles buffer edges and reports errors precisely. */
    if (!rd->capture) {
        const unsigned char *q = rd->p, *lim = rd->end - rd->p > NUM_MAX - 1 ? rd->p + NUM_MAX - 1 : rd->end;
        while (q < lim && ((*q >= '0' && *q <= '9') || *q == '.' || *q == '-' || *q == '+' || *q == 'e' || *q == 'E'))
            q++;
        if (q < rd->end && q < lim && valid_number(rd->p, (size_t)(q - rd->p))) {
            size_t n = (size_t)(q - rd->p);
            memcpy(buf, rd->p, n);
            buf[n] = 0;
            rd->p = q;
            return PW_OK;
        }
    }
    int n = 0, c = peekc(rd);
#define NUM_PUT(ch)                                                                    \
    do {                                                                               \
        if (n >= NUM_MAX - 1) return rd_fail(rd, "number longer than %d characters", NUM_MAX - 1); \
        buf[n++] = (char)(ch);                                                         \
        take(rd, ch);                                                                  \
    } while (0)
    if (c == '-') {
        NUM_PUT(c);
        c = peekc(rd);
    }
    if (c == '0') {
        NUM_PUT(c);
        c = peekc(rd);
        if (c >= '0' && c <= '9') return rd_fail(rd, "invalid number (leading zero)");
    } else if (c >= '1' && c <= '9') {
        while (c >= '0' && c <= '9') {
            NUM_PUT(c);
            c = peekc(rd);
        }
    } else {
        return unexpected(rd, c, "a digit");
    }
    if (c == '.') {
        NUM_PUT(c);
        c = peekc(rd);
        if (!(c >= '0' && c <= '9')) return unexpected(rd, c, "a digit after '.'");
        while (c >= '0' && c <= '9') {
            NUM_PUT(c);
            c = peekc(rd);
        }
    }
    if (c == 'e' || c == 'E') {
        NUM_PUT(c);
        c = peekc(rd);
        if (c == '+' || c == '-') {
            NUM_PUT(c);
            c = peekc(rd);
        }
        if (!(c >= '0' && c <= '9')) return unexpected(rd, c, "a digit in the exponent");
        while (c >= '0' && c <= '9') {
            NUM_PUT(c);
            c = peekc(rd);
        }
    }
#undef NUM_PUT
    buf[n] = 0;
    return PW_OK;
}

/* A number (valid JSON text) as an exact integer; 0 if it has a fraction,
 * an exponent or does not fit. */
static int num_int(const char *s, int64_t *out)
{
    int neg = *s == '-';
    const char *q = s + neg;
    uint64_t v = 0;
    for (; *q >= '0' && *q <= '9'; q++) {
        if (v > (UINT64_MAX - 9) / 10) return 0;
        v = v * 10 + (uint64_t)(*q - '0');
    }
    if (*q == '.') { /* allow 3.0 */
        for (q++; *q == '0'; q++) {}
        if (*q >= '1' && *q <= '9') return 0;
    }
    if (*q) return 0; /* exponent: refuse rather than guess */
    if (v > (uint64_t)INT64_MAX + (uint64_t)neg) return 0;
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return 1;
}

/* Microseconds (valid JSON text) to integer nanoseconds, rounding half away
 * from zero. Exact for plain decimals; exponents go through strtod. 0 when
 * the value is out of range. */
static int num_us_to_ns(const char *s, int64_t *out)
{
    int neg = *s == '-';
    const char *q = s + neg;
    uint64_t ip = 0;
    int digits = 0;
    for (; *q >= '0' && *q <= '9'; q++, digits++) ip = ip * 10 + (uint64_t)(*q - '0');
    if (digits <= 15 && *q != 'e' && *q != 'E') {
        uint64_t frac = 0;
        int nf = 0, round = 0;
        if (*q == '.') {
            for (q++; *q >= '0' && *q <= '9'; q++, nf++) {
                if (nf < 3) frac = frac * 10 + (uint64_t)(*q - '0');
                else if (nf == 3) round = *q >= '5';
            }
        }
        if (!*q) {
            for (int k = nf; k < 3; k++) frac *= 10;
            uint64_t v = ip * 1000 + frac + (uint64_t)round;
            *out = neg ? -(int64_t)v : (int64_t)v;
            return 1;
        }
    }
    double d = strtod(s, NULL) * 1e3;
    if (!isfinite(d) || fabs(d) > 9.0e18) return 0;
    *out = (int64_t)llround(d);
    return 1;
}

/* One pass over a plain decimal wholly in the buffer: -?digits(.digits)?
 * followed by a delimiter; `int_only` refuses a fraction. Sets *ip (the
 * integer part, at most 15 digits), *frac and *nf (the first 9 fraction
 * digits and how many), *neg, and advances. 0, with nothing consumed, for
 * anything else (exponents, long numbers, the buffer's edge, bad grammar):
 * the caller then takes the general path, which also words the errors. */
static inline int fast_decimal(pw_trace_reader *rd, int int_only, uint64_t *ip, uint64_t *frac, int *nf, int *neg)
{
    if (rd->capture) return 0;
    const unsigned char *q = rd->p, *end = rd->end;
    int n = 0, f = 0;
    uint64_t v = 0, fr = 0;
    *neg = 0;
    if (q < end && *q == '-') {
        *neg = 1;
        q++;
    }
    if (q >= end || *q < '0' || *q > '9') return 0;
    if (*q == '0' && q + 1 < end && q[1] >= '0' && q[1] <= '9') return 0; /* leading zero */
    while (q < end && *q >= '0' && *q <= '9') {
        v = v * 10 + (uint64_t)(*q++ - '0');
        if (++n > 15) return 0;
    }
    if (q < end && *q == '.') {
        if (int_only) return 0;
        const unsigned char *d = ++q;
        while (q < end && *q >= '0' && *q <= '9') {
            if (f < 9) {
                fr = fr * 10 + (uint64_t)(*q - '0');
                f++;
            }
            q++;
        }
        if (q == d) return 0;
    }
    if (q >= end || *q == 'e' || *q == 'E' || *q == '.' || *q == '+' || *q == '-') return 0;
    *ip = v;
    *frac = fr;
    *nf = f;
    rd->p = q;
    return 1;
}

/* ------------------------------------------------------------ values */

static pw_status skip_value(pw_trace_reader *rd, int depth);
static pw_status time_value(pw_trace_reader *rd, const char *key, int64_t *ns);

static pw_status skip_literal(pw_trace_reader *rd, const char *lit)
{
    for (const char *l = lit; *l; l++) {
        int c = peekc(rd);
        if (c != *l) return unexpected(rd, c, "a JSON value");
        take(rd, c);
    }
    return PW_OK;
}

/* Skips (validating) the members of an object whose '{' is next. */
static pw_status skip_object(pw_trace_reader *rd, int depth)
{
    take(rd, '{');
    int c = skip_ws(rd);
    if (c == '}') {
        take(rd, c);
        return PW_OK;
    }
    for (;;) {
        if (c != '"') return unexpected(rd, c, "a member name");
        PW_CHECK(read_string(rd, NULL));
        if ((c = skip_ws(rd)) != ':') return unexpected(rd, c, "':'");
        take(rd, c);
        PW_CHECK(skip_value(rd, depth + 1));
        c = skip_ws(rd);
        if (c == '}') {
            take(rd, c);
            return PW_OK;
        }
        if (c != ',') return unexpected(rd, c, "',' or '}'");
        take(rd, c);
        c = skip_ws(rd);
    }
}

static pw_status skip_array(pw_trace_reader *rd, int depth)
{
    take(rd, '[');
    int c = skip_ws(rd);
    if (c == ']') {
        take(rd, c);
        return PW_OK;
    }
    for (;;) {
        PW_CHECK(skip_value(rd, depth + 1));
        c = skip_ws(rd);
        if (c == ']') {
            take(rd, c);
            return PW_OK;
        }
        if (c != ',') return unexpected(rd, c, "',' or ']'");
        take(rd, c);
    }
}

static pw_status skip_value(pw_trace_reader *rd, int depth)
{
    if (depth > RD_MAX_DEPTH) return rd_fail(rd, "values nested deeper than %d levels", RD_MAX_DEPTH);
    int c = skip_ws(rd);
    char num[NUM_MAX];
    switch (c) {
    case '{': return skip_object(rd, depth);
    case '[': return skip_array(rd, depth);
    case '"': return read_string(rd, NULL);
    case 't': return skip_literal(rd, "true");
    case 'f': return skip_literal(rd, "false");
    case 'n': return skip_literal(rd, "null");
    default:
        if (c == '-' || (c >= '0' && c <= '9')) return read_number(rd, num);
        return unexpected(rd, c, "a JSON value");
    }
}

/* ------------------------------------------------------------ events */

/* Member names the reader keeps; K_OTHER is skipped. */
enum { K_OTHER = 0, K_NAME, K_CAT, K_PH, K_PID, K_TID, K_TS, K_DUR, K_ARGS, K_STEP, K_STAGE, K_MB, K_PEER, K_BYTES,
       K_WIRE_BYTES };

static int key_id(const char *k, size_t n)
{
    switch (n) {
    case 2:
        if (!memcmp(k, "ph", 2)) return K_PH;
        if (!memcmp(k, "ts", 2)) return K_TS;
        if (!memcmp(k, "mb", 2)) return K_MB;
        break;
    case 3:
        if (!memcmp(k, "pid", 3)) return K_PID;
        if (!memcmp(k, "tid", 3)) return K_TID;
        if (!memcmp(k, "cat", 3)) return K_CAT;
        if (!memcmp(k, "dur", 3)) return K_DUR;
        break;
    case 4:
        if (!memcmp(k, "name", 4)) return K_NAME;
        if (!memcmp(k, "args", 4)) return K_ARGS;
        if (!memcmp(k, "step", 4)) return K_STEP;
        if (!memcmp(k, "peer", 4)) return K_PEER;
        break;
    case 5:
        if (!memcmp(k, "stage", 5)) return K_STAGE;
        if (!memcmp(k, "bytes", 5)) return K_BYTES;
        break;
    case 10:
        if (!memcmp(k, "wire_bytes", 10)) return K_WIRE_BYTES;
        break;
    }
    return K_OTHER;
}

/* Reads a member name (its quote is next), then the ':' after it; *id is
 * its K_* (names with escapes are decoded first). */
static pw_status read_key(pw_trace_reader *rd, int *id)
{
    int c;
    const unsigned char *q = rd->p + 1;
    if (!rd->capture) {
        while (q < rd->end && *q != '"' && *q != '\\' && *q >= 0x20 && *q < 0x80) q++;
    }
    if (!rd->capture && q < rd->end && *q == '"') {
        *id = key_id((const char *)rd->p + 1, (size_t)(q - rd->p - 1));
        rd->p = q + 1;
    } else {
        PW_CHECK(read_string(rd, &rd->key));
        *id = key_id(rd->key.s, rd->key.n);
    }
    if ((c = skip_ws(rd)) != ':') return unexpected(rd, c, "':'");
    take(rd, c);
    return PW_OK;
}

/* Reads an integer member value. *ok = 0 when it is not an integer (the
 * value is consumed either way); `what` names it for hard errors. */
static pw_status read_int_member(pw_trace_reader *rd, int64_t *v, int *ok)
{
    int c = skip_ws(rd);
    char num[NUM_MAX];
    uint64_t ip, frac;
    int nf, neg;
    if (fast_decimal(rd, 1, &ip, &frac, &nf, &neg)) {
        *ok = 1;
        *v = neg ? -(int64_t)ip : (int64_t)ip;
        return PW_OK;
    }
    *ok = 0;
    if (c == '-' || (c >= '0' && c <= '9')) {
        PW_CHECK(read_number(rd, num));
        *ok = num_int(num, v);
        return PW_OK;
    }
    return skip_value(rd, 1);
}

static pw_status event_args(pw_trace_reader *rd, pw_trace_record *ev)
{
    int c = skip_ws(rd);
    if (c != '{') return skip_value(rd, 1); /* args of another shape: not ours */
    take(rd, c);
    c = skip_ws(rd);
    if (c == '}') {
        take(rd, c);
        return PW_OK;
    }
    for (;;) {
        if (c != '"') return unexpected(rd, c, "a member name");
        int k;
        PW_CHECK(read_key(rd, &k));
        int64_t v;
        int ok;
        unsigned bit = k == K_STEP ? PW_TREC_STEP : k == K_STAGE ? PW_TREC_STAGE : k == K_MB ? PW_TREC_MB
                     : k == K_PEER ? PW_TREC_PEER : k == K_BYTES ? PW_TREC_BYTES
                     : k == K_WIRE_BYTES ? PW_TREC_WIRE_BYTES : 0;
        if (bit) {
            PW_CHECK(read_int_member(rd, &v, &ok));
            int32_t *small = bit == PW_TREC_STAGE ? &ev->stage : bit == PW_TREC_MB ? &ev->mb
                           : bit == PW_TREC_PEER ? &ev->peer : NULL;
            if (ok && small && (v < 0 || v > INT32_MAX)) ok = 0;
            if (ok && (bit == PW_TREC_STEP || bit == PW_TREC_BYTES || bit == PW_TREC_WIRE_BYTES) && v < 0) ok = 0;
            if (!ok) {
                ev->has |= PW_TREC_BAD_ARGS;
            } else {
                ev->has |= bit;
                if (small) *small = (int32_t)v;
                else if (bit == PW_TREC_STEP) ev->step = v;
                else if (bit == PW_TREC_WIRE_BYTES) ev->wire_bytes = v;
                else ev->bytes = v;
            }
        } else if (k == K_NAME && skip_ws(rd) == '"') {
            PW_CHECK(read_string(rd, &rd->argname_s));
            ev->has |= PW_TREC_ARG_NAME;
        } else {
            PW_CHECK(skip_value(rd, 2));
        }
        c = skip_ws(rd);
        if (c == '}') {
            take(rd, c);
            return PW_OK;
        }
        if (c != ',') return unexpected(rd, c, "',' or '}'");
        take(rd, c);
        c = skip_ws(rd);
    }
}

/* Reads a time member (microseconds) into ns; a hard error naming `key`
 * when it is not a number in [0, PW_TRACE_MAX_US]. */
static pw_status time_member(pw_trace_reader *rd, const char *key, int64_t *ns)
{
    PW_CHECK(time_value(rd, key, ns));
    if (*ns < 0) {
        uint64_t m = 0 - (uint64_t)*ns;
        return rd_fail(rd, "\"%s\" is negative (-%" PRIu64 ".%03u us); times must be >= 0", key, m / 1000,
                       (unsigned)(m % 1000));
    }
    if (*ns > PW_TRACE_MAX_NS)
        return rd_fail(rd, "\"%s\" %.6g us is out of range (at most %" PRId64 " us)", key, (double)*ns / 1e3,
                       PW_TRACE_MAX_US);
    return PW_OK;
}

/* Reads a number member into ns, any sign; hard error naming `key` when it
 * is not a number or beyond int64 nanoseconds. */
static pw_status time_value(pw_trace_reader *rd, const char *key, int64_t *ns)
{
    int c = skip_ws(rd);
    char num[NUM_MAX];
    uint64_t ip, frac;
    int nf, neg;
    if (fast_decimal(rd, 0, &ip, &frac, &nf, &neg)) {
        /* microseconds -> ns: the first 3 fraction digits, rounded half up by
         * the 4th (as num_us_to_ns) */
        int round = 0;
        for (; nf > 3; nf--) {
            if (nf == 4) round = frac % 10 >= 5;
            frac /= 10;
        }
        for (; nf < 3; nf++) frac *= 10;
        uint64_t v = ip * 1000 + frac + (uint64_t)round;
        *ns = neg ? -(int64_t)v : (int64_t)v;
        return PW_OK;
    }
    if (!(c == '-' || (c >= '0' && c <= '9')))
        return rd_fail(rd, "\"%s\" is %s, expected a number (microseconds)", key, what_is(c).s);
    PW_CHECK(read_number(rd, num));
    if (!num_us_to_ns(num, ns))
        return rd_fail(rd, "\"%s\" %s is out of range (0 to %" PRId64 " us)", key, num, PW_TRACE_MAX_US);
    return PW_OK;
}

static pw_status id_member(pw_trace_reader *rd, const char *key, int64_t *v)
{
    int c = skip_ws(rd);
    char num[NUM_MAX];
    uint64_t ip, frac;
    int nf, neg;
    if (fast_decimal(rd, 1, &ip, &frac, &nf, &neg)) {
        *v = neg ? -(int64_t)ip : (int64_t)ip;
        return PW_OK;
    }
    if (!(c == '-' || (c >= '0' && c <= '9')))
        return rd_fail(rd, "\"%s\" is %s, expected an integer", key, what_is(c).s);
    PW_CHECK(read_number(rd, num));
    if (!num_int(num, v)) return rd_fail(rd, "\"%s\" %s is not a 64-bit integer", key, num);
    return PW_OK;
}

static pw_status string_member(pw_trace_reader *rd, const char *key, rd_str *out)
{
    int c = skip_ws(rd);
    if (c != '"') return rd_fail(rd, "\"%s\" is %s, expected a string", key, what_is(c).s);
    return read_string(rd, out);
}

/* Parses one traceEvents element (its first byte is next) into *ev. */
static pw_status read_event(pw_trace_reader *rd, pw_trace_record *ev)
{
    int c = skip_ws(rd);
    memset(ev, 0, sizeof *ev);
    rd->n_events++;
    rd->in_event = 1;
    ev->step = -1;
    ev->stage = ev->mb = ev->peer = -1;
    ev->line = rd->line;
    ev->offset = cur_off(rd);
    if (c != '{') {
        if (c < 0) return unexpected(rd, c, "an event object");
        return rd_fail(rd, "traceEvents element is %s, expected an event object", what_is(c).s);
    }
    take(rd, c);
    rd->name_s.n = rd->cat_s.n = rd->argname_s.n = rd->ph_s.n = 0;
    int has_ph = 0;
    c = skip_ws(rd);
    if (c == '}') {
        take(rd, c);
    } else {
        for (;;) {
            if (c != '"') return unexpected(rd, c, "a member name");
            int k;
            PW_CHECK(read_key(rd, &k));
            switch (k) {
            case K_ARGS: PW_CHECK(event_args(rd, ev)); break;
            case K_CAT:
                PW_CHECK(string_member(rd, "cat", &rd->cat_s));
                ev->has |= PW_TREC_CAT;
                break;
            case K_DUR:
                PW_CHECK(time_member(rd, "dur", &ev->dur_ns));
                ev->has |= PW_TREC_DUR;
                break;
            case K_NAME:
                PW_CHECK(string_member(rd, "name", &rd->name_s));
                ev->has |= PW_TREC_NAME;
                break;
            case K_PH:
                PW_CHECK(string_member(rd, "ph", &rd->ph_s));
                if (rd->ph_s.n == 0) return rd_fail(rd, "\"ph\" is empty");
                has_ph = 1;
                break;
            case K_PID:
                PW_CHECK(id_member(rd, "pid", &ev->pid));
                ev->has |= PW_TREC_PID;
                break;
            case K_TS:
                PW_CHECK(time_member(rd, "ts", &ev->ts_ns));
                ev->has |= PW_TREC_TS;
                break;
            case K_TID:
                PW_CHECK(id_member(rd, "tid", &ev->tid));
                ev->has |= PW_TREC_TID;
                break;
            default: PW_CHECK(skip_value(rd, 1));
            }
            c = skip_ws(rd);
            if (c == '}') {
                take(rd, c);
                break;
            }
            if (c != ',') return unexpected(rd, c, "',' or '}' after an event member");
            take(rd, c);
            c = skip_ws(rd);
        }
    }
    ev->name = ev->has & PW_TREC_NAME ? rd->name_s.s : "";
    ev->cat = ev->has & PW_TREC_CAT ? rd->cat_s.s : "";
    ev->arg_name = ev->has & PW_TREC_ARG_NAME ? rd->argname_s.s : "";
    if (!has_ph) return rd_fail_at(rd, ev->line, "no \"ph\" (phase)");
    ev->ph = rd->ph_s.s[0];
    const char *need = NULL;
    if (ev->ph == 'X') {
        if (!(ev->has & PW_TREC_NAME)) need = "name";
        else if (!(ev->has & PW_TREC_TS)) need = "ts";
        else if (!(ev->has & PW_TREC_DUR)) need = "dur";
        else if (!(ev->has & PW_TREC_TID)) need = "tid";
    } else if (ev->ph == 'B' || ev->ph == 'E') {
        if (!(ev->has & PW_TREC_TS)) need = "ts";
        else if (!(ev->has & PW_TREC_TID)) need = "tid";
    }
    if (need) return rd_fail_at(rd, ev->line, "\"%c\" event has no \"%s\"", ev->ph, need);
    rd->in_event = 0;
    return PW_OK;
}

/* ------------------------------------------------------------ metadata */

static pw_status meta_fail(pw_trace_reader *rd, const char *field, const char *expected, json_t *v)
{
    const char *got = !v ? "missing" : json_is_string(v) ? "a string" : json_is_integer(v) ? "an integer"
                    : json_is_real(v) ? "a number" : json_is_object(v) ? "an object"
                    : json_is_array(v) ? "an array" : json_is_null(v) ? "null" : "a boolean";
    return rd_fail_at(rd, rd->info.line, "pipewright.%s: expected %s, got %s", field, expected,
                      v && json_is_integer(v) ? "an out-of-range integer" : got);
}

/* Integer member within [lo, hi]; `def` when absent and not required. A
 * dotted name ("clock.t0_ns") is looked up by its last part in `o` and
 * named whole in the message. */
static pw_status meta_int(pw_trace_reader *rd, json_t *o, const char *k, int required, int64_t lo,
                          int64_t hi, int64_t def, int64_t *out)
{
    const char *dot = strrchr(k, '.');
    json_t *v = json_object_get(o, dot ? dot + 1 : k);
    char expect[96];
    if (!v && !required) {
        *out = def;
        return PW_OK;
    }
    if (hi == INT64_MAX) snprintf(expect, sizeof expect, "an integer >= %" PRId64, lo);
    else snprintf(expect, sizeof expect, "an integer in [%" PRId64 ", %" PRId64 "]", lo, hi);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return meta_fail(rd, k, expect, v);
    *out = json_integer_value(v);
    return PW_OK;
}

static pw_status meta_int_array(pw_trace_reader *rd, json_t *o, const char *k, int **out, int *n)
{
    json_t *v = json_object_get(o, k);
    if (!v) return PW_OK;
    if (!json_is_array(v)) return meta_fail(rd, k, "an array of integers", v);
    size_t len = json_array_size(v);
    if (len > (1u << 20)) return rd_fail_at(rd, rd->info.line, "pipewright.%s: too long", k);
    *out = calloc(len ? len : 1, sizeof **out);
    if (!*out) return pw_error(PW_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < len; i++) {
        json_t *x = json_array_get(v, i);
        if (!json_is_integer(x) || json_integer_value(x) < INT32_MIN || json_integer_value(x) > INT32_MAX)
            return meta_fail(rd, k, "an array of integers", x);
        (*out)[i] = (int)json_integer_value(x);
    }
    *n = (int)len;
    return PW_OK;
}

static pw_status meta_costs(pw_trace_reader *rd, json_t *o)
{
    json_t *v = json_object_get(o, "stage_costs");
    if (!v) return PW_OK;
    if (!json_is_array(v)) return meta_fail(rd, "stage_costs", "an array of objects", v);
    size_t len = json_array_size(v);
    if (len > (1u << 16)) return rd_fail_at(rd, rd->info.line, "pipewright.stage_costs: too long");
    rd->info.costs = calloc(len ? len : 1, sizeof *rd->info.costs);
    if (!rd->info.costs) return pw_error(PW_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < len; i++) {
        json_t *c = json_array_get(v, i);
        pw_trace_stage_cost *k = &rd->info.costs[i];
        if (!json_is_object(c)) return meta_fail(rd, "stage_costs", "an array of objects", c);
        struct { const char *key; double *dst; } dbl[] = {
            {"flops_fwd", &k->flops_fwd}, {"flops_bwd_input", &k->flops_bwd_input},
            {"flops_bwd_weight", &k->flops_bwd_weight},
        };
        for (size_t j = 0; j < sizeof dbl / sizeof *dbl; j++) {
            json_t *x = json_object_get(c, dbl[j].key);
            if (x && !json_is_number(x)) return meta_fail(rd, "stage_costs[].flops", "a number", x);
            *dbl[j].dst = x ? json_number_value(x) : 0;
        }
        int64_t pb, ab;
        PW_CHECK(meta_int(rd, c, "param_bytes", 0, 0, INT64_MAX, 0, &pb));
        PW_CHECK(meta_int(rd, c, "act_bytes", 0, 0, INT64_MAX, 0, &ab));
        k->param_bytes = pb;
        k->act_bytes = ab;
        json_t *nodes = json_object_get(c, "nodes");
        k->node_begin = k->node_end = -1;
        if (nodes) {
            json_t *a = json_array_get(nodes, 0), *b = json_array_get(nodes, 1);
            if (!json_is_array(nodes) || json_array_size(nodes) != 2 || !json_is_integer(a) ||
                !json_is_integer(b))
                return meta_fail(rd, "stage_costs[].nodes", "[begin, end]", nodes);
            k->node_begin = (int)json_integer_value(a);
            k->node_end = (int)json_integer_value(b);
        }
    }
    rd->info.n_costs = (int)len;
    return PW_OK;
}

/* The "clock" block (pw_trace_clock as pw_trace_write_meta writes it). */
static pw_status meta_clock(pw_trace_reader *rd, json_t *o)
{
    pw_trace_info *in = &rd->info;
    json_t *c = json_object_get(o, "clock");
    if (!c) return PW_OK;
    if (!json_is_object(c)) return meta_fail(rd, "clock", "an object", c);
    /* 2^61 ns is 73 years of uptime; it keeps t0 + offset, and the difference
     * of two such sums, inside int64 (pw_trace_merge). */
    const int64_t lim = INT64_C(1) << 61;
    int64_t v;
    PW_CHECK(meta_int(rd, c, "clock.t0_ns", 1, 0, lim, 0, &in->clock_t0_ns));
    PW_CHECK(meta_int(rd, c, "clock.offset_ns", 0, -lim, lim, 0, &in->clock_offset_ns));
    PW_CHECK(meta_int(rd, c, "clock.measured_offset_ns", 0, -lim, lim, 0, &in->clock_measured_ns));
    PW_CHECK(meta_int(rd, c, "clock.rtt_ns", 0, 0, lim, -1, &in->clock_rtt_ns));
    PW_CHECK(meta_int(rd, c, "clock.world_size", 0, 1, 1 << 20, 0, &v));
    in->world_size = (int)v;
    PW_CHECK(meta_int(rd, c, "clock.world_rank", 0, 0, (1 << 20) - 1, -1, &v));
    in->world_rank = (int)v;
    if (in->world_rank >= 0 && in->world_rank >= in->world_size)
        return rd_fail_at(rd, in->line, "pipewright.clock: world_rank %d is not below world_size %d",
                          in->world_rank, in->world_size);
    json_t *sh = json_object_get(c, "same_host");
    if (sh && !json_is_boolean(sh)) return meta_fail(rd, "clock.same_host", "a boolean", sh);
    in->clock_same_host = sh && json_is_true(sh);
    const struct { const char *key; char *dst; size_t n; } strs[] = {
        {"host", in->host, sizeof in->host}, {"run", in->run_id, sizeof in->run_id}};
    static const char *const labels[] = {"clock.host", "clock.run"};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++) {
        json_t *x = json_object_get(c, strs[i].key);
        if (x && !json_is_string(x)) return meta_fail(rd, labels[i], "a string", x);
        /* Cut at a character boundary, so the copy stays valid UTF-8. */
        const char *t = x ? json_string_value(x) : "";
        size_t n = strlen(t);
        if (n >= strs[i].n) {
            n = strs[i].n - 1;
            while (n > 0 && ((unsigned char)t[n] & 0xC0) == 0x80) n--;
        }
        memcpy(strs[i].dst, t, n);
        strs[i].dst[n] = '\0';
    }
    in->has_clock = 1;
    return PW_OK;
}

static pw_status meta_string(pw_trace_reader *rd, json_t *o, const char *k, char **out)
{
    json_t *v = json_object_get(o, k);
    if (v && !json_is_string(v)) return meta_fail(rd, k, "a string", v);
    free(*out);
    *out = strdup(v ? json_string_value(v) : "");
    return *out ? PW_OK : pw_error(PW_ERR_NOMEM, "out of memory");
}

/* Captures the block's text (its '{' is next) and decodes it with jansson. */
static pw_status read_meta(pw_trace_reader *rd)
{
    pw_trace_info *in = &rd->info;
    if (in->present) return rd_fail(rd, "a second \"pipewright\" block");
    in->line = rd->line;
    int c = skip_ws(rd);
    if (c != '{') return rd_fail(rd, "\"pipewright\" is %s, expected an object", what_is(c).s);
    rd->meta.n = 0;
    rd->capture_bad = 0;
    rd->capture = &rd->meta;
    pw_status st = skip_value(rd, 1);
    rd->capture = NULL;
    PW_CHECK(st);
    if (rd->capture_bad)
        return rd_fail_at(rd, in->line, "\"pipewright\" block larger than %u bytes", RD_MAX_META);
    json_error_t jerr;
    json_t *o = json_loadb(rd->meta.s, rd->meta.n, 0, &jerr);
    if (!o) return rd_fail_at(rd, in->line + (jerr.line > 0 ? jerr.line - 1 : 0), "pipewright: %s", jerr.text);
    int64_t v;
    st = PW_OK;
    PW_CHECK_GOTO(meta_int(rd, o, "version", 1, 0, INT32_MAX, 0, &v), st, out);
    if (v != 1) {
        st = rd_fail_at(rd, in->line, "pipewright trace version %" PRId64 " is not supported (this reader knows version 1)", v);
        goto out;
    }
    in->version = 1;
    PW_CHECK_GOTO(meta_string(rd, o, "schedule", &in->schedule), st, out);
    PW_CHECK_GOTO(meta_string(rd, o, "graph", &in->graph), st, out);
    PW_CHECK_GOTO(meta_int(rd, o, "ranks", 1, 1, 1 << 20, 0, &v), st, out);
    in->ranks = (int)v;
    PW_CHECK_GOTO(meta_int(rd, o, "stages", 0, 1, 1 << 20, in->ranks, &v), st, out);
    in->stages = (int)v;
    PW_CHECK_GOTO(meta_int(rd, o, "micro_batches", 0, 1, 1 << 24, 0, &v), st, out);
    in->micro_batches = (int)v;
    PW_CHECK_GOTO(meta_int(rd, o, "replicas", 0, 1, 1 << 20, 1, &v), st, out);
    in->replicas = (int)v;
    PW_CHECK_GOTO(meta_int(rd, o, "micro_batch_size", 0, 0, INT64_MAX, 0, &in->micro_batch_size), st, out);
    PW_CHECK_GOTO(meta_int(rd, o, "steps", 0, 0, INT64_MAX, 0, &in->steps), st, out);
    PW_CHECK_GOTO(meta_int(rd, o, "dropped_events", 0, 0, INT64_MAX, 0, &in->dropped_events), st, out);
    json_t *tb = json_object_get(o, "theory_bubble");
    if (tb && !json_is_number(tb)) {
        st = meta_fail(rd, "theory_bubble", "a number", tb);
        goto out;
    }
    in->theory_bubble = tb ? json_number_value(tb) : -1.0;
    if (in->theory_bubble >= 1.0) {
        st = rd_fail_at(rd, in->line, "pipewright.theory_bubble: %g is not a fraction below 1", in->theory_bubble);
        goto out;
    }
    PW_CHECK_GOTO(meta_int_array(rd, o, "peak_inflight", &in->peak_inflight, &in->n_peak_inflight), st, out);
    PW_CHECK_GOTO(meta_int_array(rd, o, "measured_peak", &in->measured_peak, &in->n_measured_peak), st, out);
    PW_CHECK_GOTO(meta_costs(rd, o), st, out);
    PW_CHECK_GOTO(meta_clock(rd, o), st, out);
    in->present = 1;
out:
    json_decref(o);
    return st;
}

/* ------------------------------------------------------------ top level */

static pw_status top_member(pw_trace_reader *rd)
{
    int c = skip_ws(rd);
    if (c != '"') return unexpected(rd, c, "a member name");
    PW_CHECK(read_string(rd, &rd->key));
    if ((c = skip_ws(rd)) != ':') return unexpected(rd, c, "':'");
    take(rd, c);
    c = skip_ws(rd);
    if (!strcmp(rd->key.s, "traceEvents")) {
        if (c != '[') return rd_fail(rd, "\"traceEvents\" is %s, expected an array", what_is(c).s);
        take(rd, c);
        rd->seen_events = 1;
        rd->state = S_EV_FIRST;
        return PW_OK;
    }
    if (!strcmp(rd->key.s, "pipewright") && !rd->seeked) {
        PW_CHECK(read_meta(rd));
    } else if (!strcmp(rd->key.s, "displayTimeUnit") && c == '"') {
        PW_CHECK(read_string(rd, &rd->sval));
        snprintf(rd->info.display_time_unit, sizeof rd->info.display_time_unit, "%s", rd->sval.s);
    } else {
        PW_CHECK(skip_value(rd, 1));
    }
    rd->state = S_OBJ_NEXT;
    return PW_OK;
}

pw_status pw_trace_reader_next(pw_trace_reader *rd, pw_trace_record *ev, int *more)
{
    *more = 0;
    for (;;) {
        int c;
        switch (rd->state) {
        case S_FAILED:
            pw_error(rd->err, "%s", rd->errmsg ? rd->errmsg : "trace reader failed");
            return rd->err;
        case S_DONE:
            return PW_OK;
        case S_START:
            c = skip_ws(rd);
            if (c == 0xef) return rd_fail(rd, "byte-order mark at the start of the file (not JSON)");
            if (c == '{') {
                take(rd, c);
                rd->state = S_OBJ_FIRST;
            } else if (c == '[') {
                take(rd, c);
                rd->array_format = 1;
                rd->seen_events = 1;
                rd->state = S_EV_FIRST;
            } else if (c < 0) {
                if (rd->eof < 0) return rd_io_fail(rd, "read error");
                return rd_fail(rd, "empty file (expected a Chrome trace: a JSON object or array)");
            } else {
                return rd_fail(rd, "not a Chrome trace: the file starts with %s, expected a JSON object or array",
                               what_is(c).s);
            }
            break;
        case S_OBJ_FIRST:
            c = skip_ws(rd);
            if (c == '}') {
                take(rd, c);
                rd->state = S_END;
            } else {
                PW_CHECK(top_member(rd));
            }
            break;
        case S_OBJ_NEXT:
            c = skip_ws(rd);
            if (c == '}') {
                take(rd, c);
                rd->state = S_END;
            } else if (c == ',') {
                take(rd, c);
                PW_CHECK(top_member(rd));
            } else {
                return unexpected(rd, c, "',' or '}' in the top-level object");
            }
            break;
        case S_EV_FIRST:
        case S_EV_NEXT:
            c = skip_ws(rd);
            if (c == ']') {
                take(rd, c);
                rd->state = rd->array_format ? S_END : S_OBJ_NEXT;
                break;
            }
            if (c < 0 && rd->array_format && rd->eof >= 0) {
                /* The Chrome format lets the array form end without ']'. */
                snprintf(rd->note, sizeof rd->note, "the event array is not closed (allowed by the Chrome trace format)");
                rd->state = S_DONE;
                return PW_OK;
            }
            if (rd->state == S_EV_NEXT) {
                if (c != ',') return unexpected(rd, c, "',' or ']' after an event");
                take(rd, c);
                if (rd->array_format && skip_ws(rd) < 0 && rd->eof >= 0) {
                    snprintf(rd->note, sizeof rd->note, "the event array is not closed (allowed by the Chrome trace format)");
                    rd->state = S_DONE;
                    return PW_OK;
                }
            }
            /* fall through */
        case S_EV_ELEM:
            PW_CHECK(read_event(rd, ev));
            rd->state = S_EV_NEXT;
            *more = 1;
            return PW_OK;
        case S_END:
            c = skip_ws(rd);
            if (c >= 0) return rd_fail(rd, "data after the end of the trace ('%c')", c >= 0x20 && c < 0x7f ? c : '?');
            if (rd->eof < 0) return rd_io_fail(rd, "read error");
            if (!rd->seen_events) return rd_fail(rd, "no \"traceEvents\" array in the trace object");
            rd->state = S_DONE;
            return PW_OK;
        }
    }
}

/* ------------------------------------------------------------ lifecycle */

/* A reader with its strings, reading nothing yet. */
static pw_status reader_alloc(const char *name, pw_trace_reader **out)
{
    *out = NULL;
    pw_trace_reader *rd = calloc(1, sizeof *rd);
    if (!rd) return pw_error(PW_ERR_NOMEM, "%s: out of memory", name);
    rd->name = strdup(name);
    rd->info.theory_bubble = -1.0;
    rd->info.world_rank = -1;
    rd->info.clock_rtt_ns = -1;
    rd->info.schedule = strdup("");
    rd->info.graph = strdup("");
    if (!rd->name || !rd->info.schedule || !rd->info.graph) {
        pw_trace_reader_close(rd);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory", name);
    }
    rd->line = 1;
    *out = rd;
    return PW_OK;
}

static pw_status reader_new(FILE *f, FILE *own, const char *name, pw_trace_reader **out)
{
    pw_trace_reader *rd;
    PW_CHECK(reader_alloc(name, &rd));
    rd->buf = malloc(RD_BUF);
    if (!rd->buf) {
        pw_trace_reader_close(rd);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory", name);
    }
    rd->f = f;
    rd->own = own;
    rd->data = rd->p = rd->end = rd->buf;
    off_t pos = ftello(f);
    rd->seekable = pos >= 0 && fseeko(f, pos, SEEK_SET) == 0;
    rd->base = rd->seekable ? (int64_t)pos : 0;
    /* A pipe is copied aside as it is read so that a second pass can seek;
     * without a temporary file only seeking fails. */
    if (!rd->seekable) rd->spool = tmpfile();
    *out = rd;
    return PW_OK;
}

pw_status pw_trace_reader_open_stream(FILE *f, const char *name, pw_trace_reader **out)
{
    return reader_new(f, NULL, name ? name : "<stream>", out);
}

pw_status pw_trace_reader_open_memory(const void *data, size_t size, const char *name,
                                      pw_trace_reader **out)
{
    *out = NULL;
    if (!name) name = "<memory>";
    if (!data && size) return pw_error(PW_ERR_INVALID_ARG, "%s: NULL data of %zu bytes", name, size);
    if (size > (size_t)INT64_MAX) return pw_error(PW_ERR_INVALID_ARG, "%s: %zu bytes is too large", name, size);
    pw_trace_reader *rd;
    PW_CHECK(reader_alloc(name, &rd));
    static const unsigned char empty[1];
    rd->mem = 1;
    rd->mem_size = size;
    rd->seekable = 1;
    rd->data = rd->p = size ? (const unsigned char *)data : empty;
    rd->end = rd->data + size;
    *out = rd;
    return PW_OK;
}

pw_status pw_trace_reader_open(const char *path, pw_trace_reader **out)
{
    *out = NULL;
    if (!strcmp(path, "-")) return reader_new(stdin, NULL, "<stdin>", out);
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
    pw_status st = reader_new(f, f, path, out);
    if (st != PW_OK) fclose(f);
    return st;
}

void pw_trace_reader_close(pw_trace_reader *rd)
{
    if (!rd) return;
    if (rd->own) fclose(rd->own);
    if (rd->spool) fclose(rd->spool);
    free(rd->name);
    free(rd->buf);
    free(rd->errmsg);
    rd_str *strs[] = {&rd->key, &rd->sval, &rd->name_s, &rd->cat_s, &rd->argname_s, &rd->ph_s, &rd->meta};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++) free(strs[i]->s);
    free(rd->info.schedule);
    free(rd->info.graph);
    free(rd->info.peak_inflight);
    free(rd->info.measured_peak);
    free(rd->info.costs);
    free(rd);
}

const pw_trace_info *pw_trace_reader_info(const pw_trace_reader *rd) { return &rd->info; }
const char *pw_trace_reader_name(const pw_trace_reader *rd) { return rd->name; }
const char *pw_trace_reader_note(const pw_trace_reader *rd) { return rd->note; }

pw_status pw_trace_reader_seek(pw_trace_reader *rd, int64_t offset, int64_t line)
{
    if (rd->state == S_FAILED) {
        pw_error(rd->err, "%s", rd->errmsg ? rd->errmsg : "trace reader failed");
        return rd->err;
    }
    if (offset < 0) return pw_error(PW_ERR_INVALID_ARG, "%s: negative seek offset", rd->name);
    if (rd->mem) {
        if ((uint64_t)offset > rd->mem_size)
            return pw_error(PW_ERR_INVALID_ARG, "%s: seek to byte %" PRId64 " of %zu", rd->name, offset, rd->mem_size);
        rd->p = rd->data + offset;
        rd->end = rd->data + rd->mem_size;
        rd->eof = 0;
        rd->line = line;
        rd->state = S_EV_ELEM;
        rd->seeked = 1;
        return PW_OK;
    }
    if (!rd->seekable && !rd->spool)
        return pw_error(PW_ERR_IO, "%s: cannot seek (a pipe?) and nothing was spooled: call "
                        "pw_trace_reader_seek only after reading", rd->name);
    if (rd->spool && rd->f != rd->spool) {
        /* Keep the rest of the pipe in the spool, then read from the spool. */
        while (refill(rd)) {}
        if (rd->eof < 0 || fflush(rd->spool) != 0) return rd_io_fail(rd, "spooling the input");
        rd->f = rd->spool;
        rd->base = 0;
    }
    if (fseeko(rd->f, (off_t)(rd->base + offset), SEEK_SET) != 0) return rd_io_fail(rd, "seek");
    rd->eof = 0;
    rd->buf_off = offset;
    rd->data = rd->p = rd->end = rd->buf;
    rd->line = line;
    rd->state = S_EV_ELEM;
    rd->seeked = 1;
    return PW_OK;
}
