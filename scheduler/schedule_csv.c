/* pipewright — the schedule's text form: one CSV row per rank, one action per
 * cell ("0F3", "1RB2", "AR0", "OPT"), with an optional header comment that
 * fixes the shape. Grammar and examples: schedule.h and docs/schedules.md.
 *
 * Parsing reads every cell into a flat list (with its line and column, for
 * messages), then settles the shape from the header or from the cells, checks
 * each cell against it, and only then builds the schedule in one block. */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "scheduler/schedule-internal.h"
#include "scheduler/schedule.h"

#define HEADER_TAG "pipewright schedule"
#define NO_CHUNK (-2)       /* "AR0": the chunk comes from the row */
#define MAX_INDEX 999999999 /* largest number a cell may hold */
#define CELL_SLACK 65536    /* settle_shape: (chunk, micro-batch) pairs beyond the cells */

typedef struct cell {
    pw_action a;
    int row, line, col;
} cell;

/* One header field: value, or -1 when absent; where it was written. */
typedef struct field {
    int value, col;
} field;

typedef struct parser {
    const char *text, *fname;
    size_t len;
    cell *cells;
    size_t n_cells, cap_cells;
    int n_rows;
    int *row_line;          /* [n_rows] line of each row, for messages */
    size_t cap_rows;
    int header_line;        /* 0: no header */
    int kind;               /* -1 when absent */
    field ranks, chunks_per_rank, micro_batches, split_w, buckets;
    /* placement=: PLACE_* (absent: looping, or V with kind=zb-v or dualpipev); a list is
     * kept as text until the shape is known. */
    int placement, placement_col;
    const char *place_list;
    size_t place_len;
    int *place;             /* the table handed to pw_sched_alloc */
} parser;

enum { PLACE_ABSENT = -1, PLACE_LOOP = 0, PLACE_V, PLACE_LIST };

static pw_status perr(const parser *p, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static pw_status perr(const parser *p, int line, int col, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return pw_error(PW_ERR_PARSE, "%s:%d:%d: error: %s", p->fname, line, col, msg);
}

static pw_status grow(void **arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return PW_OK;
    size_t n = *cap ? *cap * 2 : 256;
    while (n < need) n *= 2;
    void *q = realloc(*arr, n * elem);
    if (!q) return pw_error(PW_ERR_NOMEM, "schedule CSV: out of memory");
    *arr = q;
    *cap = n;
    return PW_OK;
}

/* Reads a decimal number at s[*i] (bounded by end). -1: no digit there;
 * -2: too large. */
static long read_number(const char *s, size_t *i, size_t end)
{
    if (*i >= end || !isdigit((unsigned char)s[*i])) return -1;
    long v = 0;
    while (*i < end && isdigit((unsigned char)s[*i])) {
        if (v > MAX_INDEX / 10) return -2;
        v = v * 10 + (s[*i] - '0');
        (*i)++;
    }
    return v > MAX_INDEX ? -2 : v;
}

/* Parses the cell text[b, e) found at (line, col of b). */
static pw_status parse_cell(parser *p, size_t b, size_t e, int line, int col, pw_action *out)
{
    const char *t = p->text;
    const int cell_len = (int)(e - b);
    if (e - b == 3 && strncasecmp(t + b, "OPT", 3) == 0) {
        *out = (pw_action){.kind = PW_ACT_OPTIM, .chunk = -1, .mb = -1};
        return PW_OK;
    }
    size_t i = b;
    long chunk = read_number(t, &i, e);
    if (chunk == -2)
        return perr(p, line, col, "chunk number too large in cell '%.*s'", cell_len, t + b);
    size_t kb = i;
    while (i < e && isalpha((unsigned char)t[i])) i++;
    char tok[4] = "";
    size_t tl = i - kb;
    for (size_t k = 0; k < tl && k < 3; k++) tok[k] = (char)toupper((unsigned char)t[kb + k]);
    int kcol = col + (int)(kb - b);
    static const struct { const char *tok; pw_action_kind kind; } kinds[] = {
        {"F", PW_ACT_F},       {"B", PW_ACT_B},       {"W", PW_ACT_W},
        {"SF", PW_ACT_SEND_F}, {"RF", PW_ACT_RECV_F}, {"SB", PW_ACT_SEND_B},
        {"RB", PW_ACT_RECV_B}, {"AR", PW_ACT_ALLREDUCE},
    };
    int kind = -1;
    for (size_t k = 0; tl <= 2 && k < sizeof kinds / sizeof kinds[0]; k++)
        if (strcmp(tok, kinds[k].tok) == 0) kind = (int)kinds[k].kind;
    if (kind < 0) {
        if (tl == 3 && strcmp(tok, "OPT") == 0)
            return perr(p, line, col, "malformed cell '%.*s': OPT takes no chunk or number",
                        cell_len, t + b);
        if (tl == 0)
            return perr(p, line, kcol, "malformed cell '%.*s': expected an action letter after the chunk "
                        "(F, B, W, SF, RF, SB, RB, AR) or OPT", cell_len, t + b);
        return perr(p, line, kcol, "malformed cell '%.*s': unknown action '%.*s' "
                    "(expected F, B, W, SF, RF, SB, RB, AR or OPT)", cell_len, t + b, (int)tl, t + kb);
    }
    if (chunk < 0 && kind != PW_ACT_ALLREDUCE)
        return perr(p, line, col, "malformed cell '%.*s': missing chunk number before '%.*s' "
                    "(write <chunk>%s<micro-batch>, e.g. 0%s3)", cell_len, t + b, (int)tl, t + kb,
                    tok, tok);
    int ncol = col + (int)(i - b);
    long idx = read_number(t, &i, e);
    if (idx == -1)
        return perr(p, line, ncol, "malformed cell '%.*s': missing %s number after '%.*s'", cell_len,
                    t + b, kind == PW_ACT_ALLREDUCE ? "bucket" : "micro-batch", (int)tl, t + kb);
    if (idx == -2) return perr(p, line, ncol, "number too large in cell '%.*s'", cell_len, t + b);
    if (i < e)
        return perr(p, line, col + (int)(i - b), "malformed cell '%.*s': unexpected '%c'", cell_len,
                    t + b, t[i]);
    *out = (pw_action){.kind = (pw_action_kind)kind, .chunk = chunk < 0 ? NO_CHUNK : (int32_t)chunk,
                       .mb = (int32_t)idx};
    return PW_OK;
}

static pw_status parse_row(parser *p, size_t b, size_t e, int line)
{
    if (p->n_rows >= PW_SCHED_MAX_RANKS)
        return perr(p, line, 1, "more than %d rows (ranks)", PW_SCHED_MAX_RANKS);
    PW_CHECK(grow((void **)&p->row_line, &p->cap_rows, (size_t)p->n_rows + 1, sizeof(int)));
    int row = p->n_rows++;
    p->row_line[row] = line;
    size_t i = b;
    while (i <= e) {
        size_t ce = i;
        while (ce < e && p->text[ce] != ',') ce++;
        size_t cb = i, cend = ce;
        while (cb < cend && (p->text[cb] == ' ' || p->text[cb] == '\t')) cb++;
        while (cend > cb && (p->text[cend - 1] == ' ' || p->text[cend - 1] == '\t')) cend--;
        if (cend > cb) { /* empty cells (spreadsheet padding) are skipped */
            PW_CHECK(grow((void **)&p->cells, &p->cap_cells, p->n_cells + 1, sizeof(cell)));
            cell *c = &p->cells[p->n_cells];
            c->row = row;
            c->line = line;
            c->col = (int)(cb - b) + 1; /* b is the start of the line */
            PW_CHECK(parse_cell(p, cb, cend, line, c->col, &c->a));
            p->n_cells++;
        }
        i = ce + 1;
    }
    return PW_OK;
}

static pw_status header_int(parser *p, field *f, const char *key, const char *v, size_t vl,
                            int line, int col, int lo, int hi)
{
    size_t i = 0;
    long x = read_number(v, &i, vl);
    if (x < 0 || i != vl || x < lo || x > hi)
        return perr(p, line, col, "header: %s must be a number in %d..%d (got '%.*s')", key, lo, hi,
                    (int)vl, v);
    f->value = (int)x;
    f->col = col;
    return PW_OK;
}

/* "# pipewright schedule v1: key=value ..." — `at` points just past the tag. */
static pw_status parse_header(parser *p, size_t line_b, size_t at, size_t e, int line)
{
    const char *t = p->text;
    if (p->header_line) return perr(p, line, 1, "second header (the first is on line %d)", p->header_line);
    if (p->n_rows) return perr(p, line, 1, "the header must come before the first row");
    p->header_line = line;
    size_t i = at;
    while (i < e && t[i] == ' ') i++;
    if (i < e && (t[i] == 'v' || t[i] == 'V')) {
        size_t vb = i++;
        long ver = read_number(t, &i, e);
        if (ver != 1)
            return perr(p, line, (int)(vb - line_b) + 1, "unsupported schedule format version '%.*s' "
                        "(this pipewright reads v1)", (int)(i - vb), t + vb);
    }
    if (i < e && t[i] == ':') i++;
    for (;;) {
        while (i < e && (t[i] == ' ' || t[i] == '\t')) i++;
        if (i >= e) break;
        size_t kb = i;
        while (i < e && t[i] != '=' && t[i] != ' ' && t[i] != '\t') i++;
        int col = (int)(kb - line_b) + 1;
        if (i >= e || t[i] != '=')
            return perr(p, line, col, "header: expected key=value, got '%.*s'", (int)(i - kb), t + kb);
        size_t kl = i - kb, vb = ++i;
        while (i < e && t[i] != ' ' && t[i] != '\t') i++;
        const char *v = t + vb;
        size_t vl = i - vb;
        char key[32];
        snprintf(key, sizeof key, "%.*s", (int)(kl < 31 ? kl : 31), t + kb);
        if (strcmp(key, "kind") == 0) {
            char name[32];
            pw_schedule_kind k;
            snprintf(name, sizeof name, "%.*s", (int)(vl < 31 ? vl : 31), v);
            if (vl >= 31 || pw_schedule_kind_parse(name, &k) != PW_OK)
                return perr(p, line, col, "header: unknown kind '%.*s' (gpipe, 1f1b, interleaved, "
                            "zb-h1, zb-h2, zb-v, zb-auto, dualpipev or custom)", (int)vl, v);
            p->kind = (int)k;
        } else if (strcmp(key, "placement") == 0) {
            p->placement_col = col;
            if (vl == 4 && strncasecmp(v, "loop", 4) == 0) {
                p->placement = PLACE_LOOP;
            } else if (vl == 1 && (v[0] == 'v' || v[0] == 'V')) {
                p->placement = PLACE_V;
            } else if (vl > 0 && isdigit((unsigned char)v[0])) {
                p->placement = PLACE_LIST;
                p->place_list = v;
                p->place_len = vl;
            } else {
                return perr(p, line, col, "header: placement must be loop, v or the rank of each "
                            "chunk (0,1,1,0), got '%.*s'", (int)vl, v);
            }
        } else if (strcmp(key, "ranks") == 0) {
            PW_CHECK(header_int(p, &p->ranks, key, v, vl, line, col, 1, PW_SCHED_MAX_RANKS));
        } else if (strcmp(key, "chunks_per_rank") == 0) {
            PW_CHECK(header_int(p, &p->chunks_per_rank, key, v, vl, line, col, 1,
                                PW_SCHED_MAX_CHUNKS_PER_RANK));
        } else if (strcmp(key, "micro_batches") == 0) {
            PW_CHECK(header_int(p, &p->micro_batches, key, v, vl, line, col, 1, PW_SCHED_MAX_MICRO));
        } else if (strcmp(key, "split_w") == 0) {
            PW_CHECK(header_int(p, &p->split_w, key, v, vl, line, col, 0, 1));
        } else if (strcmp(key, "buckets") == 0) {
            PW_CHECK(header_int(p, &p->buckets, key, v, vl, line, col, 0, PW_SCHED_MAX_BUCKETS));
        } else {
            return perr(p, line, col, "header: unknown key '%.*s' (kind, ranks, chunks_per_rank, "
                        "micro_batches, split_w, buckets, placement)", (int)kl, t + kb);
        }
    }
    return PW_OK;
}

/* Reads every line into p->cells / p->row_line. */
static pw_status scan(parser *p)
{
    const char *t = p->text;
    size_t pos = 0;
    int line = 0;
    while (pos < p->len) {
        size_t b = pos, e = pos;
        while (e < p->len && t[e] != '\n') e++;
        pos = e + 1;
        line++;
        if (e > b && t[e - 1] == '\r') e--;
        size_t i = b;
        while (i < e && (t[i] == ' ' || t[i] == '\t')) i++;
        if (i == e) continue;
        if (memchr(t + b, '\0', e - b))
            return perr(p, line, (int)((const char *)memchr(t + b, '\0', e - b) - (t + b)) + 1,
                        "NUL byte in the text");
        if (t[i] == '#') {
            size_t h = i + 1;
            while (h < e && t[h] == ' ') h++;
            size_t tl = strlen(HEADER_TAG);
            if (e - h >= tl && strncmp(t + h, HEADER_TAG, tl) == 0)
                PW_CHECK(parse_header(p, b, h + tl, e, line));
            continue;
        }
        PW_CHECK(parse_row(p, b, e, line));
    }
    return PW_OK;
}

/* The placement table for `shape` into p->place (NULL for looping): the
 * header's placement=, or V when the kind is zb-v or dualpipev and the header
 * is silent.
 * list_n: the entries of a placement=R0,R1,... list. */
static pw_status settle_placement(parser *p, pw_schedule *shape, size_t list_n)
{
    int how = p->placement;
    if (how == PLACE_ABSENT)
        how = shape->kind == PW_SCHEDULE_ZB_V || shape->kind == PW_SCHEDULE_DUALPIPE_V ? PLACE_V : PLACE_LOOP;
    if (how == PLACE_LOOP) return PW_OK;
    const int n = shape->n_ranks, C = shape->n_chunks, v = shape->chunks_per_rank;
    const int line = p->header_line, col = p->placement_col ? p->placement_col : 1;
    if (how == PLACE_LIST && list_n != (size_t)C)
        return perr(p, line, col, "header: placement lists %zu ranks, but there are %d chunks "
                    "(%d ranks x %d chunks per rank)", list_n, C, n, v);
    p->place = malloc((size_t)C * sizeof *p->place);
    int *held = calloc((size_t)n, sizeof *held);
    if (!p->place || !held) {
        free(held);
        return pw_error(PW_ERR_NOMEM, "schedule CSV: out of memory");
    }
    if (how == PLACE_V) {
        pw_sched_v_placement(n, C, p->place);
        free(held);
        shape->chunk_rank = p->place;
        return PW_OK;
    }
    size_t i = 0;
    for (int c = 0; c < C; c++) {
        long r = read_number(p->place_list, &i, p->place_len);
        if (r < 0 || r >= n || (i < p->place_len && p->place_list[i] != ',') ||
            (c == C - 1 && i != p->place_len)) {
            free(held);
            return perr(p, line, col, "header: placement entry %d must be a rank in 0..%d "
                        "(placement=%.*s)", c, n - 1, (int)p->place_len, p->place_list);
        }
        if (++held[r] > v) {
            free(held);
            return perr(p, line, col, "header: placement puts more than %d chunks on rank %ld "
                        "(every rank holds chunks_per_rank=%d)", v, r, v);
        }
        p->place[c] = (int)r;
        i++; /* the comma */
    }
    free(held);
    shape->chunk_rank = p->place;
    return PW_OK;
}

/* Settles the shape from the header, or from the cells where it is silent. */
static pw_status settle_shape(parser *p, pw_schedule *shape)
{
    if (p->n_rows == 0)
        return perr(p, p->header_line ? p->header_line : 1, 1,
                    "no schedule rows (one line of actions per rank)");
    if (p->ranks.value >= 0 && p->ranks.value != p->n_rows)
        return perr(p, p->header_line, p->ranks.col, "header says ranks=%d but there are %d rows",
                    p->ranks.value, p->n_rows);
    long max_chunk = -1, max_mb = -1, max_bucket = -1;
    const cell *at_chunk = NULL, *at_mb = NULL; /* where the largest ones are written */
    int any_w = 0;
    for (size_t i = 0; i < p->n_cells; i++) {
        const pw_action *a = &p->cells[i].a;
        if (a->kind == PW_ACT_OPTIM) continue;
        if (a->chunk > max_chunk) max_chunk = a->chunk, at_chunk = &p->cells[i];
        if (a->kind == PW_ACT_ALLREDUCE) {
            if (a->mb > max_bucket) max_bucket = a->mb;
        } else if (a->mb > max_mb) {
            max_mb = a->mb, at_mb = &p->cells[i];
        }
        if (a->kind == PW_ACT_W) any_w = 1;
    }
    const int n = p->n_rows;
    int v = p->chunks_per_rank.value;
    size_t list_n = 0; /* entries of placement=R0,R1,... */
    if (p->placement == PLACE_LIST) {
        for (size_t i = 0; i < p->place_len; i++) list_n += p->place_list[i] == ',';
        list_n++;
        if (v < 0 && list_n % (size_t)n == 0 && list_n / (size_t)n <= PW_SCHED_MAX_CHUNKS_PER_RANK)
            v = (int)(list_n / (size_t)n); /* the list says how many chunks there are */
    }
    if (v < 0) {
        long need = (max_chunk + 1 + n - 1) / n;
        v = need < 1 ? 1 : need > PW_SCHED_MAX_CHUNKS_PER_RANK ? PW_SCHED_MAX_CHUNKS_PER_RANK + 1
                                                                : (int)need;
    }
    int m = p->micro_batches.value;
    if (m < 0) {
        if (max_mb < 0)
            return perr(p, p->row_line[0], 1, "no cell names a micro-batch; say micro_batches= in "
                        "the header (# " HEADER_TAG " v1: micro_batches=N)");
        if (max_mb + 1 > PW_SCHED_MAX_MICRO)
            return perr(p, p->row_line[0], 1, "too many micro-batches (%ld, max %d)", max_mb + 1,
                        PW_SCHED_MAX_MICRO);
        m = (int)max_mb + 1;
    }
    *shape = (pw_schedule){
        .kind = p->kind >= 0 ? (pw_schedule_kind)p->kind : PW_SCHEDULE_CUSTOM,
        .n_ranks = n,
        .chunks_per_rank = v,
        .n_chunks = v <= PW_SCHED_MAX_CHUNKS_PER_RANK ? n * v : 0,
        .n_micro = m,
        .split_w = p->split_w.value >= 0 ? p->split_w.value : any_w,
        .n_buckets = p->buckets.value >= 0 ? p->buckets.value : (int)(max_bucket + 1),
    };
    if (v > PW_SCHED_MAX_CHUNKS_PER_RANK || (int64_t)n * v > INT_MAX / 2)
        return perr(p, p->row_line[0], 1, "chunk %ld needs more than %d chunks per rank", max_chunk,
                    PW_SCHED_MAX_CHUNKS_PER_RANK);
    /* Every chunk runs an F for each micro-batch and an ALLREDUCE for each
     * bucket, so a shape with many more of those than the file has cells
     * cannot make a schedule, and sizing tables by it (placement here, the
     * validator's state later) would let a few bytes ask for gigabytes. The
     * slack keeps small unfinished schedules for the validator to explain. */
    const uint64_t pairs = (uint64_t)shape->n_chunks * ((uint64_t)m + (uint64_t)shape->n_buckets);
    if (pairs > (uint64_t)p->n_cells + CELL_SLACK) {
        char why[200] = "";
        if (p->micro_batches.value < 0 && at_mb)
            snprintf(why, sizeof why, "; micro-batch %ld at line %d, column %d sets micro_batches",
                     max_mb, at_mb->line, at_mb->col);
        if (p->chunks_per_rank.value < 0 && p->placement != PLACE_LIST && at_chunk && v > 1)
            snprintf(why + strlen(why), sizeof why - strlen(why), "; chunk %ld at line %d, column "
                     "%d sets chunks_per_rank", max_chunk, at_chunk->line, at_chunk->col);
        char nb[48] = "";
        if (shape->n_buckets) snprintf(nb, sizeof nb, " and %d buckets", shape->n_buckets);
        return perr(p, p->header_line ? p->header_line : p->row_line[0], 1,
                    "%zu cell%s cannot make a schedule of %d chunks x %d micro-batches%s (each "
                    "chunk runs an F for every micro-batch%s)%s", p->n_cells,
                    p->n_cells == 1 ? "" : "s", shape->n_chunks, m, nb,
                    shape->n_buckets ? " and an ALLREDUCE for every bucket" : "", why);
    }
    PW_CHECK(settle_placement(p, shape, list_n));
    const int *where = p->place; /* NULL: looping */

    /* Each cell against the shape, so the message can point at it. */
    for (size_t i = 0; i < p->n_cells; i++) {
        cell *c = &p->cells[i];
        pw_action *a = &c->a;
        if (a->kind == PW_ACT_OPTIM) continue;
        if (a->chunk == NO_CHUNK) {
            if (v != 1)
                return perr(p, c->line, c->col, "'AR%d' names no chunk, but ranks hold %d chunks "
                            "each: write <chunk>AR%d", (int)a->mb, v, (int)a->mb);
            a->chunk = c->row;
        }
        if (a->chunk >= shape->n_chunks)
            return perr(p, c->line, c->col, "chunk %d does not exist (%d ranks x %d chunks per rank: "
                        "chunks 0..%d)", (int)a->chunk, n, v, shape->n_chunks - 1);
        if (!where && a->chunk % n != c->row)
            return perr(p, c->line, c->col, "chunk %d runs on rank %d (chunk mod %d), but this row "
                        "is rank %d", (int)a->chunk, (int)a->chunk % n, n, c->row);
        if (where && where[a->chunk] != c->row)
            return perr(p, c->line, c->col, "chunk %d runs on rank %d (placement=%s), but this row "
                        "is rank %d", (int)a->chunk, where[a->chunk],
                        p->placement == PLACE_LIST ? "list" : "v", c->row);
        if (a->kind == PW_ACT_ALLREDUCE) {
            if (a->mb >= shape->n_buckets)
                return perr(p, c->line, c->col, "bucket %d out of range (buckets=%d)", (int)a->mb,
                            shape->n_buckets);
        } else if (a->mb >= m) {
            return perr(p, c->line, c->col, "micro-batch %d out of range (micro_batches=%d)",
                        (int)a->mb, m);
        }
    }
    return PW_OK;
}

pw_status pw_schedule_parse_csv(const char *text, size_t len, const char *filename,
                                pw_schedule **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_parse_csv: out is NULL");
    *out = NULL;
    if (!text && len) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_parse_csv: text is NULL");
    parser p = {
        .text = text ? text : "", .len = len, .fname = filename ? filename : "<string>",
        .kind = -1,
        .ranks = {-1, 0}, .chunks_per_rank = {-1, 0}, .micro_batches = {-1, 0},
        .split_w = {-1, 0}, .buckets = {-1, 0}, .placement = PLACE_ABSENT,
    };
    pw_schedule shape, *s = NULL;
    int64_t *counts = NULL;
    pw_status st;
    PW_CHECK_GOTO(scan(&p), st, fail);
    PW_CHECK_GOTO(settle_shape(&p, &shape), st, fail);
    counts = calloc((size_t)p.n_rows, sizeof *counts);
    if (!counts) {
        st = pw_error(PW_ERR_NOMEM, "schedule CSV: out of memory");
        goto fail;
    }
    for (size_t i = 0; i < p.n_cells; i++) counts[p.cells[i].row]++;
    PW_CHECK_GOTO(pw_sched_alloc(&shape, counts, &s), st, fail);
    /* Cells are in row order, rows in rank order. */
    for (size_t i = 0, k = 0; i < p.n_cells; i++) {
        if (i > 0 && p.cells[i].row != p.cells[i - 1].row) k = 0;
        s->ranks[p.cells[i].row].actions[k++] = p.cells[i].a;
    }
    PW_CHECK_GOTO(pw_schedule_lower(s), st, fail);
    *out = s;
    s = NULL;
fail:
    pw_schedule_destroy(s);
    free(counts);
    free(p.cells);
    free(p.row_line);
    free(p.place);
    return st;
}

pw_status pw_schedule_load_csv(const char *path, pw_schedule **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_load_csv: out is NULL");
    *out = NULL;
    if (!path) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_load_csv: path is NULL");
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            size_t ncap = cap ? cap * 2 : 65536;
            char *q = realloc(buf, ncap);
            if (!q) {
                free(buf);
                fclose(f);
                return pw_error(PW_ERR_NOMEM, "%s: out of memory reading the schedule", path);
            }
            buf = q;
            cap = ncap;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return pw_error(PW_ERR_IO, "%s: read error", path);
    }
    pw_status st = pw_schedule_parse_csv(buf, len, path, out);
    free(buf);
    return st;
}

pw_status pw_schedule_write_csv(const pw_schedule *s, FILE *f)
{
    if (!s || !f) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_write_csv: NULL argument");
    PW_CHECK(pw_sched_check_shape(s));
    fprintf(f, "# " HEADER_TAG " v1: kind=%s ranks=%d chunks_per_rank=%d micro_batches=%d "
            "split_w=%d buckets=%d", pw_schedule_kind_name(s->kind), s->n_ranks,
            s->chunks_per_rank, s->n_micro, s->split_w, s->n_buckets);
    if (s->chunk_rank && pw_sched_is_v_placement(s->n_ranks, s->n_chunks, s->chunk_rank)) {
        fputs(" placement=v", f);
    } else if (s->chunk_rank) {
        fputs(" placement=", f);
        for (int c = 0; c < s->n_chunks; c++) fprintf(f, "%s%d", c ? "," : "", s->chunk_rank[c]);
    }
    fputc('\n', f);
    const int one = s->chunks_per_rank == 1;
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        for (int i = 0; i < p->n_actions; i++) {
            char cellbuf[48];
            pw_action_format(&p->actions[i], one, cellbuf, sizeof cellbuf);
            if (i) fputc(',', f);
            fputs(cellbuf, f);
        }
        fputc('\n', f);
    }
    if (ferror(f)) return pw_error(PW_ERR_IO, "writing the schedule CSV: %s", strerror(errno));
    return PW_OK;
}

pw_status pw_schedule_save_csv(const pw_schedule *s, const char *path)
{
    if (!path) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_save_csv: path is NULL");
    FILE *f = fopen(path, "w");
    if (!f) return pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
    pw_status st = pw_schedule_write_csv(s, f);
    if (st != PW_OK) pw_error_prefix(st, "%s: ", path);
    if (fclose(f) != 0 && st == PW_OK) st = pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
    return st;
}
