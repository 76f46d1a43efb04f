/* pipewright — safetensors reader and writer (see safetensors.h).
 *
 * Reading loads the whole file: the JSON header into a temporary buffer that
 * jansson parses, the data buffer into one 64-byte-aligned block that the
 * returned tensors point into. Validation is complete before the handle is
 * returned, so every accessor is a lookup that cannot meet a malformed file.
 */
#include "runtime/safetensors.h"
#include "runtime/tmpfile.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; a big-endian host needs byte swapping here"
#endif

#define ST_ALIGN 64

typedef struct st_entry {
    char *name;
    pw_dtype dtype;
    pw_shape shape;
    uint64_t begin, end;   /* byte range in the data buffer */
    const void *data;
    void *own;             /* aligned copy when `begin` is misaligned, else NULL */
} st_entry;

typedef struct st_kv {
    char *key, *value;
} st_kv;

struct pw_safetensors {
    char *path;
    unsigned char *buf;    /* data buffer, ST_ALIGN-aligned */
    size_t buf_len;
    int n;
    st_entry *t;           /* (n) sorted by name */
    int n_meta;
    st_kv *meta;           /* (n_meta) sorted by key */
};

/* ---------------------------------------------------------------- dtypes */

static const char *const st_dtype_names[PW_DTYPE_COUNT] = {
    [PW_F32] = "F32", [PW_I32] = "I32", [PW_U8] = "U8",
};

/* Dtypes of the safetensors specification that pipewright does not handle:
 * a file using them is valid but unsupported, not corrupt. */
static const char *const st_foreign_dtypes[] = {
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "U32", "F64", "I64", "U64", "C64",
};

const char *pw_safetensors_dtype_name(pw_dtype t)
{
    if ((unsigned)t >= PW_DTYPE_COUNT) return "?";
    return st_dtype_names[t];
}

/* ---------------------------------------------------------------- helpers */

static uint64_t le64_load(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void le64_store(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* numel × elem_size without overflow; returns 0 on overflow. */
static int shape_nbytes(const pw_shape *s, size_t elem, uint64_t *out)
{
    uint64_t n = elem;
    for (int i = 0; i < s->ndim; i++) {
        if (s->d[i] < 0) return 0;
        if (__builtin_mul_overflow(n, (uint64_t)s->d[i], &n)) return 0;
    }
    *out = n;
    return 1;
}

static void *aligned_block(size_t n)
{
    void *p = NULL;
    size_t sz = (n + ST_ALIGN - 1) / ST_ALIGN * ST_ALIGN;
    if (sz == 0) sz = ST_ALIGN;
    if (posix_memalign(&p, ST_ALIGN, sz) != 0) return NULL;
    return p;
}

/* Reads exactly n bytes unless the file ends first; *got says how many. */
static int read_full(int fd, void *buf, size_t n, size_t *got)
{
    unsigned char *p = buf;
    size_t done = 0;
    while (done < n) {
        size_t chunk = n - done > (1u << 30) ? (1u << 30) : n - done;
        ssize_t r = read(fd, p + done, chunk);
        if (r < 0) {
            if (errno == EINTR) continue;
            *got = done;
            return -1;
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    *got = done;
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const unsigned char *p = buf;
    while (n > 0) {
        size_t chunk = n > (1u << 30) ? (1u << 30) : n;
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---------------------------------------------------------------- reading */

static int entry_by_name(const void *a, const void *b)
{
    return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}

static int entry_by_offset(const void *a, const void *b)
{
    const st_entry *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int kv_by_key(const void *a, const void *b)
{
    return strcmp(((const st_kv *)a)->key, ((const st_kv *)b)->key);
}

static pw_status parse_metadata(const char *path, json_t *m, pw_safetensors *st)
{
    if (json_is_null(m)) return PW_OK;
    if (!json_is_object(m))
        return pw_error(PW_ERR_FORMAT, "%s: \"__metadata__\" is not a JSON object", path);
    size_t n = json_object_size(m);
    if (n == 0) return PW_OK;
    st->meta = calloc(n, sizeof *st->meta);
    if (!st->meta) return pw_error(PW_ERR_NOMEM, "%s: out of memory for metadata", path);
    const char *key;
    json_t *v;
    json_object_foreach(m, key, v) {
        if (!json_is_string(v))
            return pw_error(PW_ERR_FORMAT, "%s: metadata value for '%s' is not a string",
                            path, key);
        st_kv *kv = &st->meta[st->n_meta];
        kv->key = strdup(key);
        kv->value = strdup(json_string_value(v));
        if (!kv->key || !kv->value) {
            free(kv->key);
            free(kv->value);
            return pw_error(PW_ERR_NOMEM, "%s: out of memory for metadata", path);
        }
        st->n_meta++;
    }
    qsort(st->meta, (size_t)st->n_meta, sizeof *st->meta, kv_by_key);
    return PW_OK;
}

/* Reads a non-negative JSON integer. */
static int json_uint(json_t *v, uint64_t *out)
{
    if (!json_is_integer(v)) return 0;
    json_int_t x = json_integer_value(v);
    if (x < 0) return 0;
    *out = (uint64_t)x;
    return 1;
}

static pw_status parse_entry(const char *path, const char *name, json_t *e,
                             uint64_t data_len, st_entry *out)
{
    char sbuf[160];
    if (!json_is_object(e))
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': entry is not a JSON object", path, name);

    /* dtype */
    json_t *jd = json_object_get(e, "dtype");
    if (!jd) return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': missing \"dtype\"", path, name);
    if (!json_is_string(jd))
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': \"dtype\" is not a string", path, name);
    const char *ds = json_string_value(jd);
    int dt = -1;
    for (int i = 0; i < PW_DTYPE_COUNT; i++)
        if (strcmp(ds, st_dtype_names[i]) == 0) dt = i;
    if (dt < 0) {
        for (size_t i = 0; i < sizeof st_foreign_dtypes / sizeof *st_foreign_dtypes; i++)
            if (strcmp(ds, st_foreign_dtypes[i]) == 0)
                return pw_error(PW_ERR_UNSUPPORTED,
                                "%s: tensor '%s' has dtype %s, which pipewright does not "
                                "support (supported: F32, I32, U8)", path, name, ds);
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': unknown dtype \"%.40s\"", path, name, ds);
    }
    out->dtype = (pw_dtype)dt;

    /* shape */
    json_t *js = json_object_get(e, "shape");
    if (!js) return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': missing \"shape\"", path, name);
    if (!json_is_array(js))
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': \"shape\" is not an array", path, name);
    size_t nd = json_array_size(js);
    if (nd > PW_MAX_DIMS)
        return pw_error(PW_ERR_UNSUPPORTED, "%s: tensor '%s' has %zu dimensions; pipewright "
                        "supports at most %d", path, name, nd, PW_MAX_DIMS);
    memset(&out->shape, 0, sizeof out->shape);
    out->shape.ndim = (int)nd;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d))
            return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': shape dimension %zu is not an "
                            "integer", path, name, i);
        json_int_t v = json_integer_value(d);
        if (v < 0)
            return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': negative dimension %lld in shape",
                            path, name, (long long)v);
        out->shape.d[i] = v;
    }

    /* data_offsets */
    json_t *jo = json_object_get(e, "data_offsets");
    if (!jo) return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': missing \"data_offsets\"", path, name);
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        !json_uint(json_array_get(jo, 0), &out->begin) ||
        !json_uint(json_array_get(jo, 1), &out->end))
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': \"data_offsets\" must be "
                        "[begin, end] with non-negative integers", path, name);
    if (out->begin > out->end)
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] end before "
                        "they begin", path, name, (unsigned long long)out->begin,
                        (unsigned long long)out->end);
    if (out->end > data_len)
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] run past the "
                        "end of the data buffer (%llu bytes)", path, name,
                        (unsigned long long)out->begin, (unsigned long long)out->end,
                        (unsigned long long)data_len);

    uint64_t need;
    pw_shape_str(&out->shape, sbuf, sizeof sbuf);
    if (!shape_nbytes(&out->shape, pw_dtype_size(out->dtype), &need))
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': shape %s overflows", path, name, sbuf);
    if (need != out->end - out->begin)
        return pw_error(PW_ERR_FORMAT, "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu "
                        "bytes but %s %s needs %llu", path, name,
                        (unsigned long long)out->begin, (unsigned long long)out->end,
                        (unsigned long long)(out->end - out->begin), ds, sbuf,
                        (unsigned long long)need);
    return PW_OK;
}

/* Parses and validates the header; fills st->t (sorted by name) and st->meta. */
static pw_status parse_header(const char *path, const char *hdr, size_t hlen,
                              pw_safetensors *st)
{
    json_error_t jerr;
    pw_status rc = PW_OK;
    json_t *root = json_loadb(hdr, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return pw_error(PW_ERR_FORMAT, "%s: header is not valid JSON: %s (line %d, column %d, "
                        "header byte %d)", path, jerr.text, jerr.line, jerr.column,
                        jerr.position);
    if (!json_is_object(root)) {
        json_decref(root);
        return pw_error(PW_ERR_FORMAT, "%s: header is not a JSON object", path);
    }

    size_t nkeys = json_object_size(root);
    st->t = calloc(nkeys ? nkeys : 1, sizeof *st->t);
    if (!st->t) {
        json_decref(root);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory for %zu header entries", path, nkeys);
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            PW_CHECK_GOTO(parse_metadata(path, v, st), rc, done);
            continue;
        }
        st_entry *e = &st->t[st->n];
        PW_CHECK_GOTO(parse_entry(path, key, v, st->buf_len, e), rc, done);
        e->name = strdup(key);
        if (!e->name) {
            rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
            goto done;
        }
        st->n++;
    }

    /* Tensors must tile the data buffer: sorted by offset, each starts where
     * the previous one ended, and the last one ends at the buffer's end. */
    qsort(st->t, (size_t)st->n, sizeof *st->t, entry_by_offset);
    uint64_t expect = 0;
    const st_entry *prev = NULL;
    for (int i = 0; i < st->n; i++) {
        const st_entry *e = &st->t[i];
        if (e->begin < expect) {
            rc = pw_error(PW_ERR_FORMAT, "%s: tensor '%s' (bytes [%llu, %llu]) overlaps tensor "
                          "'%s' (bytes [%llu, %llu])", path, e->name,
                          (unsigned long long)e->begin, (unsigned long long)e->end, prev->name,
                          (unsigned long long)prev->begin, (unsigned long long)prev->end);
            goto done;
        }
        if (e->begin > expect) {
            rc = pw_error(PW_ERR_FORMAT, "%s: gap in the data buffer: bytes [%llu, %llu] belong "
                          "to no tensor (before tensor '%s')", path, (unsigned long long)expect,
                          (unsigned long long)e->begin, e->name);
            goto done;
        }
        expect = e->end;
        prev = e;
    }
    if (expect != st->buf_len) {
        rc = pw_error(PW_ERR_FORMAT, "%s: %llu trailing bytes after the last tensor (data buffer "
                      "is %llu bytes, tensors cover %llu)", path,
                      (unsigned long long)(st->buf_len - expect),
                      (unsigned long long)st->buf_len, (unsigned long long)expect);
        goto done;
    }
    qsort(st->t, (size_t)st->n, sizeof *st->t, entry_by_name);

done:
    json_decref(root);
    return rc;
}

/* Points each tensor into the buffer; a tensor whose offset is not a multiple
 * of its element size (legal, if unusual) gets an aligned private copy so
 * callers may read it through a typed pointer. */
static pw_status point_tensors(pw_safetensors *st)
{
    for (int i = 0; i < st->n; i++) {
        st_entry *e = &st->t[i];
        size_t nb = (size_t)(e->end - e->begin);
        if (e->begin % pw_dtype_size(e->dtype) == 0) {
            e->data = st->buf + e->begin;
            continue;
        }
        e->own = aligned_block(nb);
        if (!e->own) return pw_error(PW_ERR_NOMEM, "%s: out of memory", st->path);
        memcpy(e->own, st->buf + e->begin, nb);
        e->data = e->own;
    }
    return PW_OK;
}

pw_status pw_safetensors_open(const char *path, pw_safetensors **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_safetensors_open: out is NULL");
    *out = NULL;
    if (!path) return pw_error(PW_ERR_INVALID_ARG, "pw_safetensors_open: path is NULL");

    pw_status rc = PW_OK;
    char *hdr = NULL;
    pw_safetensors *st = calloc(1, sizeof *st);
    if (!st || !(st->path = strdup(path))) {
        free(st);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = pw_error(PW_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        rc = pw_error(PW_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        rc = pw_error(PW_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    uint64_t fsize = (uint64_t)sb.st_size;
    if (fsize < 8) {
        rc = pw_error(PW_ERR_FORMAT, "%s: file is %llu bytes, too short for a safetensors "
                      "header (needs at least 8)", path, (unsigned long long)fsize);
        goto fail;
    }

    unsigned char lenbuf[8];
    size_t got;
    errno = 0;
    if (read_full(fd, lenbuf, 8, &got) != 0 || got != 8) {
        rc = pw_error(PW_ERR_IO, "%s: cannot read the header length: %s", path,
                      errno ? strerror(errno) : "file shrank while reading");
        goto fail;
    }
    uint64_t hlen = le64_load(lenbuf);
    if (hlen > PW_SAFETENSORS_MAX_HEADER) {
        rc = pw_error(PW_ERR_FORMAT, "%s: header length %llu is absurd (limit %u bytes); not a "
                      "safetensors file?", path, (unsigned long long)hlen,
                      PW_SAFETENSORS_MAX_HEADER);
        goto fail;
    }
    if (hlen > fsize - 8) {
        rc = pw_error(PW_ERR_FORMAT, "%s: header length %llu exceeds the %llu bytes after the "
                      "length field (truncated file?)", path, (unsigned long long)hlen,
                      (unsigned long long)(fsize - 8));
        goto fail;
    }
    st->buf_len = (size_t)(fsize - 8 - hlen);

    hdr = malloc(hlen ? hlen : 1);
    st->buf = aligned_block(st->buf_len);
    if (!hdr || !st->buf) {
        rc = pw_error(PW_ERR_NOMEM, "%s: out of memory reading %llu bytes", path,
                      (unsigned long long)fsize);
        goto fail;
    }
    errno = 0;
    if (read_full(fd, hdr, hlen, &got) != 0 || got != hlen ||
        read_full(fd, st->buf, st->buf_len, &got) != 0 || got != st->buf_len) {
        rc = pw_error(PW_ERR_IO, "%s: read failed: %s", path,
                      errno ? strerror(errno) : "file shrank while reading");
        goto fail;
    }
    close(fd);
    fd = -1;

    PW_CHECK_GOTO(parse_header(path, hdr, hlen, st), rc, fail);
    PW_CHECK_GOTO(point_tensors(st), rc, fail);
    free(hdr);
    *out = st;
    return PW_OK;

fail:
    if (fd >= 0) close(fd);
    free(hdr);
    pw_safetensors_close(st);
    return rc;
}

int pw_safetensors_count(const pw_safetensors *st) { return st ? st->n : 0; }

const char *pw_safetensors_path(const pw_safetensors *st) { return st ? st->path : ""; }

static void fill_tensor(const st_entry *e, pw_st_tensor *out)
{
    out->name = e->name;
    out->dtype = e->dtype;
    out->shape = e->shape;
    out->data = e->data;
    out->nbytes = (size_t)(e->end - e->begin);
}

pw_status pw_safetensors_get(const pw_safetensors *st, const char *name, pw_st_tensor *out)
{
    if (!st || !name || !out)
        return pw_error(PW_ERR_INVALID_ARG, "pw_safetensors_get: NULL argument");
    st_entry key = {.name = (char *)name};
    const st_entry *e = bsearch(&key, st->t, (size_t)st->n, sizeof *st->t, entry_by_name);
    if (!e) return pw_error(PW_ERR_FORMAT, "%s: no tensor '%s'", st->path, name);
    fill_tensor(e, out);
    return PW_OK;
}

pw_status pw_safetensors_get_as(const pw_safetensors *st, const char *name, pw_dtype dtype,
                                const pw_shape *shape, pw_st_tensor *out)
{
    pw_st_tensor t;
    PW_CHECK(pw_safetensors_get(st, name, &t));
    if (t.dtype != dtype || (shape && !pw_shape_equal(&t.shape, shape))) {
        char have[160], want[160];
        pw_shape_str(&t.shape, have, sizeof have);
        if (shape) pw_shape_str(shape, want, sizeof want);
        else snprintf(want, sizeof want, "(any shape)");
        return pw_error(PW_ERR_SHAPE, "%s: tensor '%s' is %s %s, expected %s %s", st->path,
                        name, pw_safetensors_dtype_name(t.dtype), have,
                        pw_safetensors_dtype_name(dtype), want);
    }
    *out = t;
    return PW_OK;
}

pw_status pw_safetensors_at(const pw_safetensors *st, int i, pw_st_tensor *out)
{
    if (!st || !out) return pw_error(PW_ERR_INVALID_ARG, "pw_safetensors_at: NULL argument");
    if (i < 0 || i >= st->n)
        return pw_error(PW_ERR_INVALID_ARG, "%s: tensor index %d out of range [0, %d)",
                        st->path, i, st->n);
    fill_tensor(&st->t[i], out);
    return PW_OK;
}

const char *pw_safetensors_meta(const pw_safetensors *st, const char *key)
{
    if (!st || !key || st->n_meta == 0) return NULL; /* bsearch wants a non-NULL base */
    st_kv k = {.key = (char *)key};
    const st_kv *kv = bsearch(&k, st->meta, (size_t)st->n_meta, sizeof *st->meta, kv_by_key);
    return kv ? kv->value : NULL;
}

int pw_safetensors_meta_count(const pw_safetensors *st) { return st ? st->n_meta : 0; }

pw_status pw_safetensors_meta_at(const pw_safetensors *st, int i, pw_st_meta *out)
{
    if (!st || !out) return pw_error(PW_ERR_INVALID_ARG, "pw_safetensors_meta_at: NULL argument");
    if (i < 0 || i >= st->n_meta)
        return pw_error(PW_ERR_INVALID_ARG, "%s: metadata index %d out of range [0, %d)",
                        st->path, i, st->n_meta);
    out->key = st->meta[i].key;
    out->value = st->meta[i].value;
    return PW_OK;
}

void pw_safetensors_close(pw_safetensors *st)
{
    if (!st) return;
    for (int i = 0; i < st->n; i++) {
        free(st->t[i].name);
        free(st->t[i].own);
    }
    free(st->t);
    for (int i = 0; i < st->n_meta; i++) {
        free(st->meta[i].key);
        free(st->meta[i].value);
    }
    free(st->meta);
    free(st->buf);
    free(st->path);
    free(st);
}

/* ---------------------------------------------------------------- writing */

static int tensor_by_name(const void *a, const void *b)
{
    return strcmp((*(const pw_st_tensor *const *)a)->name, (*(const pw_st_tensor *const *)b)->name);
}

/* Data order: larger elements first (keeps every tensor aligned for its dtype
 * given an 8-aligned buffer start), then by name. */
static int tensor_by_layout(const void *a, const void *b)
{
    const pw_st_tensor *x = *(const pw_st_tensor *const *)a, *y = *(const pw_st_tensor *const *)b;
    size_t sx = pw_dtype_size(x->dtype), sy = pw_dtype_size(y->dtype);
    if (sx != sy) return sx > sy ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int meta_by_key(const void *a, const void *b)
{
    return strcmp((*(const pw_st_meta *const *)a)->key, (*(const pw_st_meta *const *)b)->key);
}

static pw_status check_tensor(const char *path, const pw_st_tensor *t)
{
    if (!t->name || !t->name[0])
        return pw_error(PW_ERR_INVALID_ARG, "%s: a tensor has an empty or NULL name", path);
    if (strcmp(t->name, "__metadata__") == 0)
        return pw_error(PW_ERR_INVALID_ARG, "%s: '__metadata__' is reserved and cannot name a "
                        "tensor", path);
    if ((unsigned)t->dtype >= PW_DTYPE_COUNT)
        return pw_error(PW_ERR_INVALID_ARG, "%s: tensor '%s': invalid dtype %d", path, t->name,
                        (int)t->dtype);
    if (t->shape.ndim < 0 || t->shape.ndim > PW_MAX_DIMS)
        return pw_error(PW_ERR_INVALID_ARG, "%s: tensor '%s': ndim %d out of range [0, %d]",
                        path, t->name, t->shape.ndim, PW_MAX_DIMS);
    char sbuf[160];
    uint64_t need;
    pw_shape_str(&t->shape, sbuf, sizeof sbuf);
    if (!shape_nbytes(&t->shape, pw_dtype_size(t->dtype), &need))
        return pw_error(PW_ERR_INVALID_ARG, "%s: tensor '%s': shape %s is negative or overflows",
                        path, t->name, sbuf);
    if (need != t->nbytes)
        return pw_error(PW_ERR_INVALID_ARG, "%s: tensor '%s': nbytes is %zu but %s %s needs "
                        "%llu", path, t->name, t->nbytes, pw_safetensors_dtype_name(t->dtype),
                        sbuf, (unsigned long long)need);
    if (t->nbytes && !t->data)
        return pw_error(PW_ERR_INVALID_ARG, "%s: tensor '%s': data is NULL", path, t->name);
    return PW_OK;
}

/* Builds the canonical header (length field + JSON + space padding) for
 * tensors already in data order. */
static pw_status build_header(const char *path, const pw_st_tensor *const *order, int n,
                              const pw_st_meta *const *meta, int n_meta,
                              unsigned char **out, size_t *out_len)
{
    pw_status rc = PW_OK;
    char *js = NULL;
    json_t *root = json_object();
    if (!root) return pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
    if (n_meta > 0) {
        json_t *m = json_object();
        if (!m || json_object_set_new(root, "__metadata__", m) != 0) {
            rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
            goto done;
        }
        for (int i = 0; i < n_meta; i++) {
            json_t *v = json_string(meta[i]->value);
            if (!v) {
                rc = pw_error(PW_ERR_INVALID_ARG, "%s: metadata value for '%s' is not valid "
                              "UTF-8", path, meta[i]->key);
                goto done;
            }
            if (json_object_set_new(m, meta[i]->key, v) != 0) {
                rc = pw_error(PW_ERR_INVALID_ARG, "%s: metadata key '%s' is not valid UTF-8",
                              path, meta[i]->key);
                goto done;
            }
        }
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const pw_st_tensor *t = order[i];
        json_t *shape = json_array();
        for (int d = 0; shape && d < t->shape.ndim; d++)
            json_array_append_new(shape, json_integer((json_int_t)t->shape.d[d]));
        /* "o" steals `shape`, also when json_pack fails. */
        json_t *e = json_pack("{s:s, s:o, s:[I, I]}", "dtype", pw_safetensors_dtype_name(t->dtype),
                              "shape", shape, "data_offsets", (json_int_t)off,
                              (json_int_t)(off + t->nbytes));
        if (!e) {
            rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
            goto done;
        }
        if (json_object_set_new(root, t->name, e) != 0) {
            rc = pw_error(PW_ERR_INVALID_ARG, "%s: tensor name '%s' is not valid UTF-8", path,
                          t->name);
            goto done;
        }
        off += t->nbytes;
    }
    js = json_dumps(root, JSON_COMPACT);
    if (!js) {
        rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    size_t jlen = strlen(js);
    size_t padded = (jlen + 7) / 8 * 8;
    unsigned char *buf = malloc(8 + padded);
    if (!buf) {
        rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    le64_store(buf, padded);
    memcpy(buf + 8, js, jlen);
    memset(buf + 8 + jlen, ' ', padded - jlen);
    *out = buf;
    *out_len = 8 + padded;
done:
    free(js);
    json_decref(root);
    return rc;
}

/* fsync the directory holding `path` so the rename itself is durable. Best
 * effort: some file systems refuse to open or sync directories. */
static void sync_parent_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir) return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
}

pw_status pw_safetensors_write(const char *path, const pw_st_tensor *t, int n,
                               const pw_st_meta *meta, int n_meta)
{
    if (!path || !path[0]) return pw_error(PW_ERR_INVALID_ARG, "pw_safetensors_write: no path");
    if (n < 0 || n_meta < 0 || (n > 0 && !t) || (n_meta > 0 && !meta))
        return pw_error(PW_ERR_INVALID_ARG, "%s: bad tensor or metadata list (n=%d, n_meta=%d)",
                        path, n, n_meta);

    pw_status rc = PW_OK;
    unsigned char *hdr = NULL;
    size_t hdr_len = 0;
    char *tmp = NULL;
    int fd = -1, created = 0, tmp_slot = -1;
    const pw_st_tensor **order = malloc(sizeof *order * (size_t)(n ? n : 1));
    const pw_st_meta **mord = malloc(sizeof *mord * (size_t)(n_meta ? n_meta : 1));
    if (!order || !mord) {
        rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }

    for (int i = 0; i < n; i++) {
        PW_CHECK_GOTO(check_tensor(path, &t[i]), rc, done);
        order[i] = &t[i];
    }
    qsort(order, (size_t)n, sizeof *order, tensor_by_name);
    for (int i = 1; i < n; i++)
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) {
            rc = pw_error(PW_ERR_INVALID_ARG, "%s: duplicate tensor name '%s'", path,
                          order[i]->name);
            goto done;
        }
    qsort(order, (size_t)n, sizeof *order, tensor_by_layout);

    for (int i = 0; i < n_meta; i++) {
        if (!meta[i].key || !meta[i].value) {
            rc = pw_error(PW_ERR_INVALID_ARG, "%s: metadata entry %d has a NULL key or value",
                          path, i);
            goto done;
        }
        mord[i] = &meta[i];
    }
    qsort(mord, (size_t)n_meta, sizeof *mord, meta_by_key);
    for (int i = 1; i < n_meta; i++)
        if (strcmp(mord[i - 1]->key, mord[i]->key) == 0) {
            rc = pw_error(PW_ERR_INVALID_ARG, "%s: duplicate metadata key '%s'", path,
                          mord[i]->key);
            goto done;
        }

    PW_CHECK_GOTO(build_header(path, order, n, mord, n_meta, &hdr, &hdr_len), rc, done);

    size_t tlen = strlen(path) + 32;
    tmp = malloc(tlen);
    if (!tmp) {
        rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    pw_tmpfile_name(path, tmp, tlen);
    /* Registered before it exists, so an interrupted run unlinks it
     * wherever the signal lands. */
    tmp_slot = pw_tmpfile_register(tmp);
    fd = pw_tmpfile_create(tmp_slot, tmp);
    if (fd < 0) {
        rc = pw_error(PW_ERR_IO, "%s: cannot create %s: %s", path, tmp, strerror(errno));
        goto done;
    }
    created = 1;
    if (write_full(fd, hdr, hdr_len) != 0) goto io_fail;
    for (int i = 0; i < n; i++)
        if (order[i]->nbytes && write_full(fd, order[i]->data, order[i]->nbytes) != 0)
            goto io_fail;
    if (fsync(fd) != 0) goto io_fail;
    int cfd = fd;
    fd = -1;
    if (close(cfd) != 0) goto io_fail;
    if (rename(tmp, path) != 0) {
        rc = pw_error(PW_ERR_IO, "%s: cannot rename %s into place: %s", path, tmp,
                      strerror(errno));
        goto done;
    }
    created = 0;
    sync_parent_dir(path);
    goto done;

io_fail:
    rc = pw_error(PW_ERR_IO, "%s: writing %s failed: %s", path, tmp, strerror(errno));
done:
    if (fd >= 0) close(fd);
    if (created) unlink(tmp);
    pw_tmpfile_forget(tmp_slot);
    free(tmp);
    free(hdr);
    free(order);
    free(mord);
    return rc;
}
