/* pipewright — data sets: IDX reader/writer, synthetic task, text, specs,
 * checks against a graph, sampler. Token shards: data_tokens.c. */
#include "stages/train/data.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "runtime/log.h"
#include "runtime/tmpfile.h"
#include "runtime/rng.h"
#include "stages/train/data-internal.h"

#define IDX_U8 0x08
#define IDX_I8 0x09
#define IDX_I16 0x0B
#define IDX_I32 0x0C
#define IDX_F32 0x0D
#define IDX_F64 0x0E

#define FASHION_MNIST_DIR "/usr/share/datasets/fashion-mnist"

static const char *idx_type_name(int type)
{
    switch (type) {
    case IDX_U8: return "u8";
    case IDX_I8: return "i8";
    case IDX_I16: return "i16";
    case IDX_I32: return "i32";
    case IDX_F32: return "f32";
    case IDX_F64: return "f64";
    default: return NULL;
    }
}

static size_t idx_type_size(int type)
{
    switch (type) {
    case IDX_U8: case IDX_I8: return 1;
    case IDX_I16: return 2;
    case IDX_I32: case IDX_F32: return 4;
    case IDX_F64: return 8;
    default: return 0;
    }
}

static uint32_t be32_load(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void be32_store(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

void pw_dataset_destroy(pw_dataset *d)
{
    if (!d) return;
    free(d->x);
    free(d->y);
    free(d->text);
    free(d->tokens);
    pw_token_shards_free(d->shards);
    free(d->name);
    free(d);
}

/* ---------------------------------------------------------------- IDX read */

/* One IDX file as stored: element bytes still big-endian. */
typedef struct idx_file {
    int type;
    int ndim;
    int64_t dims[PW_MAX_DIMS + 1];
    int64_t count;          /* product of dims */
    unsigned char *raw;     /* (count × element size) */
} idx_file;

/* Reads up to n bytes; *got says how many arrived before EOF. A gzip stream
 * that ends early (no end-of-stream marker or trailer) sets *cut and counts
 * as EOF, so the caller reports the truncation in its own terms. On a read or
 * decompression error returns the status with a message naming `path`. */
static pw_status gz_read_full(gzFile gz, const char *path, void *buf, size_t n, size_t *got,
                              int *cut)
{
    unsigned char *p = buf;
    size_t done = 0;
    while (done < n) {
        unsigned chunk = n - done > (1u << 30) ? (1u << 30) : (unsigned)(n - done);
        int r = gzread(gz, p + done, chunk);
        if (r > 0) {
            done += (size_t)r;
            continue;
        }
        int err = Z_OK;
        const char *msg = gzerror(gz, &err);
        *got = done;
        if (err == Z_ERRNO)
            return pw_error(PW_ERR_IO, "%s: read failed: %s", path, strerror(errno));
        if (err == Z_BUF_ERROR) *cut = 1;
        else if (err != Z_OK)
            return pw_error(PW_ERR_FORMAT, "%s: corrupt gzip data: %s", path, msg);
        return PW_OK;
    }
    *got = done;
    return PW_OK;
}

/* Reads an IDX file; with header_only, just its type and dimensions (raw
 * stays NULL and nothing past the header is read). */
static pw_status idx_read(const char *path, idx_file *f, int header_only)
{
    pw_status rc = PW_OK;
    memset(f, 0, sizeof *f);
    PW_INFO(PW_SUB_DATA, "reading %s%s", path, header_only ? " (its header only)" : "");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return pw_error(PW_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        close(fd);
        return pw_error(PW_ERR_IO, "%s: is a directory", path);
    }
    gzFile gz = gzdopen(fd, "rb"); /* reads plain files unchanged */
    if (!gz) {
        close(fd);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory opening", path);
    }
    gzbuffer(gz, 1u << 17);

    unsigned char head[4 + 4 * (PW_MAX_DIMS + 1)];
    size_t got;
    int cut = 0;
    PW_CHECK_GOTO(gz_read_full(gz, path, head, 4, &got, &cut), rc, fail);
    if (got < 4) {
        rc = pw_error(PW_ERR_FORMAT, "%s: truncated: %zu bytes, too short for an IDX header",
                      path, got);
        goto fail;
    }
    f->type = head[2];
    f->ndim = head[3];
    if (head[0] != 0 || head[1] != 0 || !idx_type_name(f->type)) {
        rc = pw_error(PW_ERR_FORMAT, "%s: bad magic 0x%08X: not an IDX file (expected bytes 00 "
                      "00 TYPE NDIMS with TYPE 08, 09, 0B, 0C, 0D or 0E)", path,
                      (unsigned)be32_load(head));
        goto fail;
    }
    if (f->ndim == 0) {
        rc = pw_error(PW_ERR_FORMAT, "%s: IDX header has 0 dimensions", path);
        goto fail;
    }
    if (f->ndim > PW_MAX_DIMS + 1) {
        rc = pw_error(PW_ERR_UNSUPPORTED, "%s: IDX file has %d dimensions; at most %d supported",
                      path, f->ndim, PW_MAX_DIMS + 1);
        goto fail;
    }
    size_t dlen = 4 * (size_t)f->ndim;
    PW_CHECK_GOTO(gz_read_full(gz, path, head + 4, dlen, &got, &cut), rc, fail);
    if (got < dlen) {
        rc = pw_error(PW_ERR_FORMAT, "%s: truncated: header declares %d dimensions but the file "
                      "ends after %zu of their %zu bytes", path, f->ndim, got, dlen);
        goto fail;
    }
    /* Dimensions are u32, so neither is negative; their products are
     * checked on their own: with a first dimension of 0 (no samples) the
     * total is 0 whatever the rest, but the per-sample shape must still be
     * a shape (pw_shape_numel of it overflowed before). */
    uint64_t per_sample = 1, count, nbytes;
    int overflow = 0;
    for (int i = 0; i < f->ndim; i++) {
        f->dims[i] = be32_load(head + 4 + 4 * i);
        if (i > 0 && __builtin_mul_overflow(per_sample, (uint64_t)f->dims[i], &per_sample))
            overflow = 1;
    }
    if (overflow || per_sample > INT64_MAX / 8 ||
        __builtin_mul_overflow(per_sample, (uint64_t)f->dims[0], &count) || count > INT64_MAX / 8 ||
        __builtin_mul_overflow(count, (uint64_t)idx_type_size(f->type), &nbytes) ||
        nbytes > SIZE_MAX / 2) {
        char dims[128];
        size_t used = 0;
        for (int i = 0; i < f->ndim && used < sizeof dims; i++)
            used += (size_t)snprintf(dims + used, sizeof dims - used, "%s%lld", i ? " x " : "",
                                     (long long)f->dims[i]);
        rc = pw_error(PW_ERR_FORMAT, "%s: IDX header: dimensions %s overflow (%s has more than "
                      "2^60 elements)", path, dims,
                      overflow || per_sample > INT64_MAX / 8 ? "one sample" : "the file");
        goto fail;
    }
    f->count = (int64_t)count;
    if (header_only) {
        gzclose(gz);
        return PW_OK;
    }

    /* Grow the buffer as data actually arrives, so a header that lies about
     * its size cannot make us allocate gigabytes for a tiny file. */
    size_t cap = nbytes < (1u << 20) ? (size_t)nbytes : (1u << 20), have = 0;
    f->raw = malloc(cap ? cap : 1);
    if (!f->raw) goto nomem;
    while (have < nbytes) {
        if (have == cap) {
            size_t ncap = cap * 2 < nbytes ? cap * 2 : (size_t)nbytes;
            unsigned char *p = realloc(f->raw, ncap);
            if (!p) goto nomem;
            f->raw = p;
            cap = ncap;
        }
        PW_CHECK_GOTO(gz_read_full(gz, path, f->raw + have, cap - have, &got, &cut), rc, fail);
        have += got;
        if (have < cap) break;   /* EOF */
    }
    if (have < nbytes) {
        rc = pw_error(PW_ERR_FORMAT, "%s: truncated: expected %llu bytes of data, got %zu", path,
                      (unsigned long long)nbytes, have);
        goto fail;
    }
    /* Trailing bytes usually mean the dimensions are wrong. */
    unsigned char scratch[4096];
    uint64_t extra = 0;
    do {
        PW_CHECK_GOTO(gz_read_full(gz, path, scratch, sizeof scratch, &got, &cut), rc, fail);
        extra += got;
    } while (got == sizeof scratch);
    if (extra) {
        rc = pw_error(PW_ERR_FORMAT, "%s: %llu unexpected bytes after the %llu bytes of data "
                      "the header declares", path, (unsigned long long)extra,
                      (unsigned long long)nbytes);
        goto fail;
    }
    if (cut) {
        rc = pw_error(PW_ERR_FORMAT, "%s: truncated gzip stream: all %llu bytes of data are "
                      "there but the end of the stream is missing", path,
                      (unsigned long long)nbytes);
        goto fail;
    }
    gzclose(gz);
    return PW_OK;

nomem:
    rc = pw_error(PW_ERR_NOMEM, "%s: out of memory reading %llu bytes", path,
                  (unsigned long long)nbytes);
fail:
    gzclose(gz);
    free(f->raw);
    f->raw = NULL;
    return rc;
}

static pw_status dataset_fill_images(const char *path, const idx_file *im, pw_dataset *d)
{
    if (im->type != IDX_U8 && im->type != IDX_F32)
        return pw_error(PW_ERR_UNSUPPORTED, "%s: images must be u8 (0x08) or f32 (0x0D), not %s "
                        "(0x%02X)", path, idx_type_name(im->type), im->type);
    d->n = im->dims[0];
    d->sample_shape = pw_shape_make(im->ndim - 1, im->dims + 1);
    if (!pw_shape_numel_checked(&d->sample_shape, &d->sample_numel)) /* idx_read checked it */
        return pw_error(PW_ERR_INTERNAL, "%s: per-sample shape overflows", path);
    d->label_numel = 1; /* label_shape [] */
    if (d->n == 0) return pw_error(PW_ERR_FORMAT, "%s: contains no samples", path);
    d->x = malloc(sizeof(float) * (size_t)im->count);
    if (!d->x) return pw_error(PW_ERR_NOMEM, "%s: out of memory for %lld samples", path,
                               (long long)d->n);
    if (im->type == IDX_U8) {
        for (int64_t i = 0; i < im->count; i++) d->x[i] = (float)im->raw[i] / 255.0f;
    } else {
        for (int64_t i = 0; i < im->count; i++) {
            uint32_t u = be32_load(im->raw + 4 * i);
            memcpy(&d->x[i], &u, 4);
        }
    }
    return PW_OK;
}

static pw_status dataset_fill_labels(const char *path, const idx_file *lb, pw_dataset *d)
{
    if (lb->ndim != 1)
        return pw_error(PW_ERR_FORMAT, "%s: a labels file has 1 dimension, this one has %d "
                        "(images and labels swapped?)", path, lb->ndim);
    if (lb->type != IDX_U8 && lb->type != IDX_I32)
        return pw_error(PW_ERR_UNSUPPORTED, "%s: labels must be u8 (0x08) or i32 (0x0C), not %s "
                        "(0x%02X)", path, idx_type_name(lb->type), lb->type);
    if (lb->dims[0] != d->n)
        return pw_error(PW_ERR_FORMAT, "%s: %lld labels but images file has %lld images", path,
                        (long long)lb->dims[0], (long long)d->n);
    d->y = malloc(sizeof(int32_t) * (size_t)d->n);
    if (!d->y) return pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
    int32_t maxl = 0;
    for (int64_t i = 0; i < d->n; i++) {
        int32_t v = lb->type == IDX_U8 ? (int32_t)lb->raw[i] : (int32_t)be32_load(lb->raw + 4 * i);
        if (v < 0 || v >= PW_DATA_MAX_CLASSES)
            return pw_error(PW_ERR_FORMAT, "%s: label %d at index %lld is out of range [0, %d)",
                            path, v, (long long)i, PW_DATA_MAX_CLASSES);
        if (v > maxl) maxl = v;
        d->y[i] = v;
    }
    d->n_classes = maxl + 1;
    return PW_OK;
}

pw_status pw_dataset_load_idx(const char *images, const char *labels, pw_dataset **out)
{
    return pw_dataset_load_idx_parts(images, labels, PW_DATA_ALL, out);
}

pw_status pw_dataset_load_idx_parts(const char *images, const char *labels, unsigned parts,
                                    pw_dataset **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_load_idx: out is NULL");
    *out = NULL;
    if (!images || !labels)
        return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_load_idx: NULL file name");

    pw_status rc;
    idx_file im = {0}, lb = {0};
    pw_dataset *d = calloc(1, sizeof *d);
    if (!d || !(d->name = strdup(images))) {
        free(d);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory", images);
    }
    d->missing = PW_DATA_ALL & ~parts;
    d->label_numel = 1; /* label_shape [] */
    if (parts & PW_DATA_INPUTS) {
        PW_CHECK_GOTO(idx_read(images, &im, 0), rc, fail);
        PW_CHECK_GOTO(dataset_fill_images(images, &im, d), rc, fail);
        free(im.raw);
        im.raw = NULL;
        d->loaded_bytes += (int64_t)sizeof(float) * im.count;
    }
    /* Without the images the labels file gives the count: read whole, or
     * just its header when the labels are not wanted either. */
    const int header_only = !(parts & PW_DATA_LABELS);
    if (!(parts & PW_DATA_INPUTS) || !header_only) {
        PW_CHECK_GOTO(idx_read(labels, &lb, header_only), rc, fail);
        if (!(parts & PW_DATA_INPUTS)) {
            if (lb.ndim != 1 || lb.dims[0] == 0) {
                rc = pw_error(PW_ERR_FORMAT, "%s: a labels file has 1 dimension and at least one "
                              "label (this one: %d dimensions, %lld entries)", labels, lb.ndim,
                              (long long)lb.dims[0]);
                goto fail;
            }
            d->n = lb.dims[0];
        }
        if (!header_only) {
            PW_CHECK_GOTO(dataset_fill_labels(labels, &lb, d), rc, fail);
            d->loaded_bytes += (int64_t)sizeof(int32_t) * d->n;
        }
        free(lb.raw);
        lb.raw = NULL;
    }

    char sbuf[96];
    PW_INFO(PW_SUB_DATA, "loaded %s: %lld samples of %s, %d classes (%s%s%s)", images, (long long)d->n,
            pw_shape_str(&d->sample_shape, sbuf, sizeof sbuf), d->n_classes,
            parts & PW_DATA_INPUTS ? "images" : "", (parts & PW_DATA_ALL) == PW_DATA_ALL ? " and " : "",
            parts & PW_DATA_LABELS ? "labels" : (parts & PW_DATA_INPUTS) ? "" : "the labels header only");
    *out = d;
    return PW_OK;

fail:
    free(im.raw);
    free(lb.raw);
    pw_dataset_destroy(d);
    return rc;
}

/* ---------------------------------------------------------------- IDX write */

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Writes one buffer to `fd`, through gzip when `gz` is set; 0 or -1 (errno). */
static int write_payload(int fd, int gz, const unsigned char *p, size_t n)
{
    if (!gz) {
        while (n > 0) {
            ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
            if (w < 0) {
                if (errno == EINTR) continue;
                return -1;
            }
            p += w;
            n -= (size_t)w;
        }
        return 0;
    }
    /* gzclose closes its descriptor, so give it a duplicate and keep `fd`
     * for the fsync. No name or time stamp: the bytes are reproducible. */
    int dfd = dup(fd);
    if (dfd < 0) return -1;
    gzFile g = gzdopen(dfd, "wb6");
    if (!g) {
        close(dfd);
        errno = ENOMEM;
        return -1;
    }
    int ok = 1;
    while (ok && n > 0) {
        unsigned chunk = n > (1u << 30) ? (1u << 30) : (unsigned)n;
        if (gzwrite(g, p, chunk) != (int)chunk) ok = 0;
        p += chunk;
        n -= chunk;
    }
    int saved = errno;
    if (gzclose(g) != Z_OK) ok = 0;
    else errno = saved;
    if (!ok && errno == 0) errno = EIO;
    return ok ? 0 : -1;
}

pw_status pw_idx_write(const char *path, pw_dtype dtype, const pw_shape *shape, const void *data)
{
    if (!path || !path[0] || !shape)
        return pw_error(PW_ERR_INVALID_ARG, "pw_idx_write: NULL path or shape");
    int type = dtype == PW_U8 ? IDX_U8 : dtype == PW_F32 ? IDX_F32 : dtype == PW_I32 ? IDX_I32 : 0;
    if (!type)
        return pw_error(PW_ERR_INVALID_ARG, "%s: IDX dtype must be u8, i32 or f32", path);
    if (shape->ndim < 1 || shape->ndim > PW_MAX_DIMS)
        return pw_error(PW_ERR_INVALID_ARG, "%s: IDX shape needs 1..%d dimensions, got %d", path,
                        PW_MAX_DIMS, shape->ndim);
    uint64_t count = 1;
    for (int i = 0; i < shape->ndim; i++) {
        if (shape->d[i] < 0 || shape->d[i] > (int64_t)UINT32_MAX ||
            __builtin_mul_overflow(count, (uint64_t)shape->d[i], &count))
            return pw_error(PW_ERR_INVALID_ARG, "%s: IDX dimension %d (%lld) out of range", path,
                            i, (long long)shape->d[i]);
    }
    size_t esize = pw_dtype_size(dtype), hlen = 4 + 4 * (size_t)shape->ndim;
    if (count > (SIZE_MAX - hlen) / esize)
        return pw_error(PW_ERR_INVALID_ARG, "%s: IDX data too large", path);
    if (count && !data) return pw_error(PW_ERR_INVALID_ARG, "%s: data is NULL", path);

    size_t total = hlen + (size_t)count * esize;
    unsigned char *buf = malloc(total);
    if (!buf) return pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
    buf[0] = buf[1] = 0;
    buf[2] = (unsigned char)type;
    buf[3] = (unsigned char)shape->ndim;
    for (int i = 0; i < shape->ndim; i++) be32_store(buf + 4 + 4 * i, (uint32_t)shape->d[i]);
    if (esize == 1) {
        if (count) memcpy(buf + hlen, data, (size_t)count);
    } else {
        /* f32 and i32 alike: 32-bit words, stored big-endian (memcpy, not a
         * uint32_t pointer, so reading floats stays within aliasing rules) */
        const unsigned char *src = data;
        for (uint64_t i = 0; i < count; i++) {
            uint32_t u;
            memcpy(&u, src + 4 * i, 4);
            be32_store(buf + hlen + 4 * i, u);
        }
    }

    pw_status rc = PW_OK;
    size_t tlen = strlen(path) + 32;
    char *tmp = malloc(tlen);
    int fd = -1, created = 0, tmp_slot = -1;
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
    if (write_payload(fd, ends_with(path, ".gz"), buf, total) != 0 || fsync(fd) != 0) {
        rc = pw_error(PW_ERR_IO, "%s: writing %s failed: %s", path, tmp, strerror(errno));
        goto done;
    }
    int cfd = fd;
    fd = -1;
    if (close(cfd) != 0) {
        rc = pw_error(PW_ERR_IO, "%s: writing %s failed: %s", path, tmp, strerror(errno));
        goto done;
    }
    if (rename(tmp, path) != 0) {
        rc = pw_error(PW_ERR_IO, "%s: cannot rename %s into place: %s", path, tmp,
                      strerror(errno));
        goto done;
    }
    created = 0;
done:
    if (fd >= 0) close(fd);
    if (created) unlink(tmp);
    pw_tmpfile_forget(tmp_slot);
    free(tmp);
    free(buf);
    return rc;
}

/* ---------------------------------------------------------------- synthetic */

pw_status pw_dataset_synthetic(const pw_synthetic_config *cfg, pw_dataset **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_synthetic: out is NULL");
    *out = NULL;
    if (!cfg) return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_synthetic: cfg is NULL");
    if (cfg->n <= 0)
        return pw_error(PW_ERR_INVALID_ARG, "synthetic data: n must be > 0 (got %lld)",
                        (long long)cfg->n);
    if (cfg->n_classes < 2 || cfg->n_classes > PW_DATA_MAX_CLASSES)
        return pw_error(PW_ERR_INVALID_ARG, "synthetic data: n_classes must be in [2, %d] "
                        "(got %d)", PW_DATA_MAX_CLASSES, cfg->n_classes);
    if (!(cfg->noise >= 0.0f) || !isfinite(cfg->noise))
        return pw_error(PW_ERR_INVALID_ARG, "synthetic data: noise must be finite and >= 0 "
                        "(got %g)", (double)cfg->noise);
    const pw_shape *s = &cfg->sample_shape;
    if (s->ndim < 1 || s->ndim > PW_MAX_DIMS)
        return pw_error(PW_ERR_INVALID_ARG, "synthetic data: sample shape needs 1..%d "
                        "dimensions (got %d)", PW_MAX_DIMS, s->ndim);
    int64_t numel = 1, total, protos;
    for (int i = 0; i < s->ndim; i++)
        if (s->d[i] <= 0 || __builtin_mul_overflow(numel, s->d[i], &numel))
            return pw_error(PW_ERR_INVALID_ARG, "synthetic data: sample dimension %d (%lld) "
                            "must be > 0 and the shape must not overflow", i,
                            (long long)s->d[i]);
    if (__builtin_mul_overflow(numel, cfg->n, &total) || total > (int64_t)(SIZE_MAX / 8) ||
        __builtin_mul_overflow(numel, (int64_t)cfg->n_classes, &protos))
        return pw_error(PW_ERR_INVALID_ARG, "synthetic data: %lld samples of %lld elements is "
                        "too large", (long long)cfg->n, (long long)numel);

    /* Labels are drawn first and cost one number per sample; the inputs
     * (prototype + noise) need them, the labels alone need nothing else. */
    const int want_x = !(cfg->missing & PW_DATA_INPUTS), want_y = !(cfg->missing & PW_DATA_LABELS);
    pw_dataset *d = calloc(1, sizeof *d);
    float *proto = want_x ? malloc(sizeof(float) * (size_t)protos) : NULL;
    const char *split = cfg->test ? "test" : "train";
    char name[64];
    snprintf(name, sizeof name, "synthetic/%s", split);
    if (d) {
        d->x = want_x ? malloc(sizeof(float) * (size_t)total) : NULL;
        d->y = want_x || want_y ? malloc(sizeof(int32_t) * (size_t)cfg->n) : NULL;
        d->name = strdup(name);
    }
    if (!d || (want_x && (!proto || !d->x)) || ((want_x || want_y) && !d->y) || !d->name) {
        free(proto);
        pw_dataset_destroy(d);
        return pw_error(PW_ERR_NOMEM, "synthetic data: out of memory for %lld samples",
                        (long long)cfg->n);
    }
    d->n = cfg->n;
    d->sample_shape = *s;
    d->sample_numel = numel;
    d->label_numel = 1; /* label_shape [] */
    d->n_classes = cfg->n_classes;
    d->missing = cfg->missing & PW_DATA_ALL;

    char kname[64];
    uint64_t kp = pw_rng_key(cfg->seed, "synthetic/proto");
    snprintf(kname, sizeof kname, "synthetic/%s/label", split);
    uint64_t kl = pw_rng_key(cfg->seed, kname);
    snprintf(kname, sizeof kname, "synthetic/%s/noise", split);
    uint64_t kn = pw_rng_key(cfg->seed, kname);

    for (int64_t i = 0; want_x && i < protos; i++) proto[i] = pw_rng_normal(kp, (uint64_t)i);
    for (int64_t i = 0; d->y && i < d->n; i++) {
        /* modulo bias is < n_classes / 2^64: immaterial */
        int32_t c = (int32_t)(pw_rng_u64(kl, (uint64_t)i) % (uint64_t)cfg->n_classes);
        d->y[i] = c;
        if (!want_x) continue;
        const float *p = proto + (int64_t)c * numel;
        float *x = d->x + i * numel;
        for (int64_t j = 0; j < numel; j++)
            x[j] = p[j] + cfg->noise * pw_rng_normal(kn, (uint64_t)(i * numel + j));
    }
    free(proto);
    if (!want_y) {
        free(d->y); /* drawn for the inputs only */
        d->y = NULL;
    }
    d->loaded_bytes = (want_x ? (int64_t)sizeof(float) * total : 0) +
                      (want_y ? (int64_t)sizeof(int32_t) * d->n : 0);
    *out = d;
    return PW_OK;
}

/* ---------------------------------------------------------------- specs */

static const char *const spec_help =
    "expected fashion-mnist[:DIR], idx:IMAGES,LABELS[,TEST_IMAGES,TEST_LABELS], "
    "synthetic[:N[:DIM[:CLASSES[:SEED]]]], text:FILE|DIR|fortunes or tokens:TRAIN[,HELDOUT]";

static int file_exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static pw_status load_fashion(const char *dir, int is_default, int train, unsigned parts, pw_dataset **out)
{
    const char *pre = train ? "train" : "t10k";
    const char *kind[2] = {"images-idx3", "labels-idx1"};
    char path[2][4096];
    for (int k = 0; k < 2; k++) {
        snprintf(path[k], sizeof path[k], "%s/%s-%s-ubyte.gz", dir, pre, kind[k]);
        if (file_exists(path[k])) continue;
        char plain[4096];
        snprintf(plain, sizeof plain, "%s/%s-%s-ubyte", dir, pre, kind[k]);
        if (file_exists(plain)) {
            memcpy(path[k], plain, sizeof plain);
            continue;
        }
        if (is_default)
            return pw_error(PW_ERR_IO, "fashion-mnist: %s not found; install the Debian package "
                            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or "
                            "pass --data idx:IMAGES,LABELS or --data synthetic", path[k]);
        return pw_error(PW_ERR_IO, "fashion-mnist: neither %s nor %s exists", path[k], plain);
    }
    PW_CHECK(pw_dataset_load_idx_parts(path[0], path[1], parts, out));
    char *name = strdup(train ? "fashion-mnist/train" : "fashion-mnist/test");
    if (name) {
        free((*out)->name);
        (*out)->name = name;
    }
    return PW_OK;
}

/* Splits "a,b[,c,d]" into its comma-separated parts (at most 4). */
static int split_commas(char *s, char **parts, int max)
{
    int n = 0;
    for (char *p = s;; p++) {
        if (n == max) return -1;
        parts[n++] = p;
        p = strchr(p, ',');
        if (!p) break;
        *p = '\0';
    }
    return n;
}

static pw_status load_idx_spec(const char *spec, int train, unsigned sides, pw_dataset **out)
{
    char *copy = strdup(spec + 4), *parts[4];
    if (!copy) return pw_error(PW_ERR_NOMEM, "out of memory");
    int n = split_commas(copy, parts, 4);
    pw_status rc;
    int empty = 0;
    for (int i = 0; i < n; i++) empty |= parts[i][0] == '\0';
    if ((n != 2 && n != 4) || empty)
        rc = pw_error(PW_ERR_INVALID_ARG, "data spec '%s': write idx:TRAIN_IMAGES,TRAIN_LABELS"
                      "[,TEST_IMAGES,TEST_LABELS]", spec);
    else if (!train && n == 2)
        rc = pw_error(PW_ERR_INVALID_ARG, "data spec '%s' has no test pair (write idx:TRAIN_IMAGES,"
                      "TRAIN_LABELS,TEST_IMAGES,TEST_LABELS)", spec);
    else
        rc = pw_dataset_load_idx_parts(parts[train ? 0 : 2], parts[train ? 1 : 3], sides, out);
    free(copy);
    return rc;
}

/* Parses a positive integer field; empty means "keep the default". */
static int parse_i64(const char *s, int64_t *v)
{
    if (!*s) return 1;
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || *end || x <= 0 || end == s) return 0;
    *v = x;
    return 1;
}

static pw_status load_synthetic_spec(const char *spec, int train, unsigned parts, pw_dataset **out)
{
    int64_t n = 8192, classes = 10, seed = 1234;
    pw_synthetic_config cfg = {0};
    cfg.sample_shape.ndim = 1;
    cfg.sample_shape.d[0] = 784;

    char *copy = strdup(spec);
    if (!copy) return pw_error(PW_ERR_NOMEM, "out of memory");
    /* strtok would merge empty fields; walk the colons by hand. */
    char *field[6];
    int nf = 0;
    for (char *p = copy;; p++) {
        if (nf == 6) break;
        field[nf++] = p;
        p = strchr(p, ':');
        if (!p) break;
        *p = '\0';
    }
    pw_status rc = PW_OK;
    if (nf > 5 || strcmp(field[0], "synthetic") != 0) goto bad;
    if (nf > 1 && !parse_i64(field[1], &n)) goto bad;
    if (nf > 2 && field[2][0]) {
        /* DIM is "784" or a shape "1x28x28" */
        pw_shape s = {0};
        char *p = field[2];
        while (1) {
            char *end;
            errno = 0;
            long long v = strtoll(p, &end, 10);
            if (errno || end == p || v <= 0 || s.ndim == PW_MAX_DIMS) goto bad;
            s.d[s.ndim++] = v;
            if (*end == '\0') break;
            if (*end != 'x') goto bad;
            p = end + 1;
        }
        cfg.sample_shape = s;
    }
    if (nf > 3 && !parse_i64(field[3], &classes)) goto bad;
    if (nf > 4 && field[4][0]) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(field[4], &end, 10);
        if (errno || *end || field[4][0] == '-') goto bad;
        seed = (int64_t)v;
    }
    if (classes > PW_DATA_MAX_CLASSES) goto bad;
    cfg.n = train ? n : (n / 4 > 0 ? n / 4 : 1);
    cfg.n_classes = (int)classes;
    cfg.seed = (uint64_t)seed;
    cfg.noise = 1.0f;
    cfg.test = !train;
    cfg.missing = PW_DATA_ALL & ~parts;
    free(copy);
    rc = pw_dataset_synthetic(&cfg, out);
    if (rc != PW_OK) pw_error_prefix(rc, "data spec '%s': ", spec);
    return rc;
bad:
    free(copy);
    rc = pw_error(PW_ERR_INVALID_ARG, "data spec '%s': expected synthetic[:N[:DIM[:CLASSES"
                  "[:SEED]]]] with positive integers, DIM a size or a shape like 1x28x28", spec);
    return rc;
}

static pw_status load_text(const char *path, int is_fortunes, int64_t T, int train,
                           pw_dataset **out);

/* The context length a text or tokens spec needs from the graph: its input
 * i32 [T]. */
static pw_status text_context(const char *spec, const pw_graph *g, int64_t *T)
{
    const int bytes = strncmp(spec, "text:", 5) == 0;
    if (!g)
        return pw_error(PW_ERR_INVALID_ARG, "data spec '%s': %s data is cut into windows of the "
                        "model's context length; load it with pw_dataset_from_spec_for_graph", spec,
                        bytes ? "text" : "token");
    const pw_value *in = &g->values[g->input];
    char b[96];
    if (in->dtype != PW_I32 || in->shape.ndim != 1)
        return pw_error(PW_ERR_SHAPE, "%s: data spec '%s' gives %s, so input '%s' must be "
                        "i32[T] (got %s%s)", g->file, spec, bytes ? "byte tokens" : "tokens", in->name,
                        pw_dtype_name(in->dtype), pw_shape_str(&in->shape, b, sizeof b));
    *T = in->shape.d[0];
    return PW_OK;
}

/* "tokens:TRAIN[,HELDOUT]" with the graph's context T. */
static pw_status load_tokens_spec(const char *spec, int64_t T, int train, unsigned parts,
                                  pw_dataset **out)
{
    char *copy = strdup(spec + 7), *pat[2];
    if (!copy) return pw_error(PW_ERR_NOMEM, "out of memory");
    int n = split_commas(copy, pat, 2);
    pw_status rc;
    if (n < 1 || !pat[0][0] || (n == 2 && !pat[1][0])) {
        rc = pw_error(PW_ERR_INVALID_ARG, "data spec '%s': write tokens:TRAIN[,HELDOUT], each a shard "
                      "file or a glob", spec);
    } else {
        pw_tokens_config tc = {.train = pat[0], .heldout = n == 2 ? pat[1] : NULL, .context = T,
                               .test = !train, .missing = PW_DATA_ALL & ~parts};
        rc = pw_dataset_load_tokens(&tc, out);
    }
    free(copy);
    return rc;
}

static pw_status from_spec(const char *spec, int train, const pw_graph *g, unsigned parts,
                           pw_dataset **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_from_spec: out is NULL");
    *out = NULL;
    parts &= PW_DATA_ALL;
    if (!spec || !*spec || strcmp(spec, "fashion-mnist") == 0)
        return load_fashion(FASHION_MNIST_DIR, 1, train, parts, out);
    if (strncmp(spec, "fashion-mnist:", 14) == 0 && spec[14])
        return load_fashion(spec + 14, 0, train, parts, out);
    if (strncmp(spec, "idx:", 4) == 0) return load_idx_spec(spec, train, parts, out);
    if (strcmp(spec, "synthetic") == 0 || strncmp(spec, "synthetic:", 10) == 0)
        return load_synthetic_spec(spec, train, parts, out);
    if (strncmp(spec, "text:", 5) == 0 && spec[5]) {
        int64_t T = 0;
        PW_CHECK(text_context(spec, g, &T));
        if (strcmp(spec + 5, "fortunes") == 0) return load_text(PW_FORTUNES_DIR, 1, T, train, out);
        return load_text(spec + 5, 0, T, train, out);
    }
    if (strncmp(spec, "tokens:", 7) == 0 && spec[7]) {
        int64_t T = 0;
        PW_CHECK(text_context(spec, g, &T));
        return load_tokens_spec(spec, T, train, parts, out);
    }
    return pw_error(PW_ERR_INVALID_ARG, "unknown data spec '%s' (%s)", spec, spec_help);
}

pw_status pw_dataset_from_spec(const char *spec, int train, pw_dataset **out)
{
    return from_spec(spec, train, NULL, PW_DATA_ALL, out);
}

pw_status pw_dataset_from_spec_parts(const char *spec, int train, const pw_graph *g, unsigned parts,
                                     pw_dataset **out)
{
    return from_spec(spec, train, g, parts, out);
}

pw_status pw_dataset_from_spec_for_graph(const char *spec, int train, const pw_graph *g,
                                         pw_dataset **out)
{
    if (!g) {
        if (out) *out = NULL;
        return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_from_spec_for_graph: graph is NULL");
    }
    return from_spec(spec, train, g, PW_DATA_ALL, out);
}

int pw_dataset_spec_has_test(const char *spec)
{
    if (!spec || strncmp(spec, "idx:", 4) != 0) return 1;
    int commas = 0;
    for (const char *p = spec; *p; p++) commas += *p == ',';
    return commas == 3;
}

pw_status pw_dataset_gather(const pw_dataset *d, const int64_t *idx, int64_t count,
                            void *x_out, int32_t *y_out)
{
    if (!d || (count > 0 && !idx) || count < 0)
        return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_gather: bad arguments");
    if ((x_out && (d->missing & PW_DATA_INPUTS)) || (y_out && (d->missing & PW_DATA_LABELS)))
        return pw_error(PW_ERR_INVALID_ARG, "%s: its %s not loaded in this process (a process loads "
                        "only the sides its stages read: pw_pipeline_data_parts)",
                        d->name ? d->name : "dataset",
                        x_out && (d->missing & PW_DATA_INPUTS) ? "inputs were" : "labels were");
    for (int64_t i = 0; i < count; i++)
        if (idx[i] < 0 || idx[i] >= d->n)
            return pw_error(PW_ERR_INVALID_ARG, "%s: sample index %lld (batch position %lld) out "
                            "of range [0, %lld)", d->name ? d->name : "dataset",
                            (long long)idx[i], (long long)i, (long long)d->n);
    const int64_t T = d->sample_numel;
    if (d->text) {
        int32_t *x = x_out;
        for (int64_t i = 0; i < count; i++) {
            const unsigned char *w = d->text + idx[i] * d->stride;
            for (int64_t t = 0; t < T; t++) {
                if (x) x[i * T + t] = w[t];
                if (y_out) y_out[i * T + t] = w[t + 1];
            }
        }
        return PW_OK;
    }
    if (d->tokens) {
        int32_t *x = x_out;
        for (int64_t i = 0; i < count; i++) {
            const int64_t w = idx[i] * d->stride;
            for (int64_t t = 0; t < T; t++) {
                if (x) x[i * T + t] = (int32_t)pw_token_at(d, w + t);
                if (y_out) y_out[i * T + t] = (int32_t)pw_token_at(d, w + t + 1);
            }
        }
        return PW_OK;
    }
    const int64_t L = d->label_numel > 0 ? d->label_numel : 1;
    size_t row = sizeof(float) * (size_t)T;
    for (int64_t i = 0; i < count; i++) {
        if (x_out) memcpy((float *)x_out + i * T, d->x + idx[i] * T, row);
        if (y_out) memcpy(y_out + i * L, d->y + idx[i] * L, sizeof(int32_t) * (size_t)L);
    }
    return PW_OK;
}

/* ---------------------------------------------------------------- text */

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Appends the bytes of `path` to *buf (size *len, capacity *cap). */
static pw_status append_file(const char *path, unsigned char **buf, size_t *len, size_t *cap)
{
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    pw_status rc = PW_OK;
    for (;;) {
        if (*cap - *len < 65536) {
            size_t ncap = *cap ? *cap * 2 : (1u << 20);
            unsigned char *nb = realloc(*buf, ncap);
            if (!nb) {
                rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
                break;
            }
            *buf = nb;
            *cap = ncap;
        }
        size_t got = fread(*buf + *len, 1, *cap - *len, f);
        *len += got;
        if (got == 0) {
            if (ferror(f)) rc = pw_error(PW_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            break;
        }
    }
    fclose(f);
    return rc;
}

/* Every regular file of a directory (not links; not *.dat when skip_dat),
 * in byte order of their names. */
static pw_status append_dir(const char *dir, int skip_dat, unsigned char **buf, size_t *len,
                            size_t *cap)
{
    DIR *dh = opendir(dir);
    if (!dh) return pw_error(PW_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0, ncap = 0;
    pw_status rc = PW_OK;
    struct dirent *e;
    while (rc == PW_OK && (e = readdir(dh)) != NULL) {
        size_t nl = strlen(e->d_name);
        if (e->d_name[0] == '.') continue;
        if (skip_dat && nl > 4 && strcmp(e->d_name + nl - 4, ".dat") == 0) continue;
        size_t pl = strlen(dir) + nl + 2;
        char *path = malloc(pl);
        if (!path) {
            rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", dir);
            break;
        }
        snprintf(path, pl, "%s/%s", dir, e->d_name);
        struct stat sb;
        if (lstat(path, &sb) != 0 || !S_ISREG(sb.st_mode)) {
            free(path);
            continue;
        }
        if (n == ncap) {
            size_t c2 = ncap ? ncap * 2 : 64;
            char **nn = realloc(names, c2 * sizeof *nn);
            if (!nn) {
                free(path);
                rc = pw_error(PW_ERR_NOMEM, "%s: out of memory", dir);
                break;
            }
            names = nn;
            ncap = c2;
        }
        names[n++] = path;
    }
    closedir(dh);
    if (rc == PW_OK && n == 0) rc = pw_error(PW_ERR_IO, "%s: no regular files to read", dir);
    if (rc == PW_OK) qsort(names, n, sizeof *names, name_cmp);
    for (size_t i = 0; i < n; i++) {
        if (rc == PW_OK) rc = append_file(names[i], buf, len, cap);
        free(names[i]);
    }
    free(names);
    return rc;
}

static pw_status load_text(const char *path, int is_fortunes, int64_t T, int train,
                           pw_dataset **out)
{
    *out = NULL;
    if (T < 1)
        return pw_error(PW_ERR_INVALID_ARG, "text data %s: context must be >= 1 (got %lld)", path,
                        (long long)T);
    struct stat sb;
    if (stat(path, &sb) != 0) {
        if (is_fortunes)
            return pw_error(PW_ERR_IO, "text:fortunes: %s not found; install the Debian package "
                            "fortunes (apt-get install fortunes), or pass --data text:FILE",
                            path);
        return pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
    }
    unsigned char *buf = NULL;
    size_t len = 0, cap = 0;
    pw_status rc = S_ISDIR(sb.st_mode) ? append_dir(path, is_fortunes, &buf, &len, &cap)
                                       : append_file(path, &buf, &len, &cap);
    if (rc != PW_OK) {
        free(buf);
        return rc;
    }
    size_t split = len - len / 10;
    size_t from = train ? 0 : split, part = train ? split : len - split;
    if (part < (size_t)T + 1) {
        free(buf);
        return pw_error(PW_ERR_INVALID_ARG, "text data %s: the %s split has %zu bytes but a "
                        "window of context %lld needs at least %llu", path,
                        train ? "training" : "held-out", part, (long long)T,
                        (unsigned long long)T + 1); /* T may be INT64_MAX */
    }
    pw_dataset *d = calloc(1, sizeof *d);
    size_t nl = strlen(path) + 16;
    if (d) d->name = malloc(nl);
    if (d) d->text = malloc(part);
    if (!d || !d->name || !d->text) {
        free(buf);
        pw_dataset_destroy(d);
        return pw_error(PW_ERR_NOMEM, "text data %s: out of memory", path);
    }
    memcpy(d->text, buf + from, part);
    free(buf);
    snprintf(d->name, nl, "%s/%s", is_fortunes ? "fortunes" : path, train ? "train" : "test");
    d->text_len = (int64_t)part;
    d->loaded_bytes = (int64_t)part;
    d->stride = T;
    d->n = ((int64_t)part - 1) / T;
    d->sample_shape = pw_shape_make(1, &T);
    d->sample_numel = T;
    d->x_dtype = PW_I32;
    d->label_shape = pw_shape_make(1, &T);
    d->label_numel = T;
    d->n_classes = 256;
    d->n_tokens = 256;
    PW_INFO(PW_SUB_DATA, "%s: %lld bytes, %lld windows of %lld", d->name, (long long)part,
            (long long)d->n, (long long)T);
    *out = d;
    return PW_OK;
}

pw_status pw_dataset_load_text(const char *path, int64_t context, int train, pw_dataset **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_load_text: out is NULL");
    *out = NULL;
    if (!path || !*path) return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_load_text: no path");
    return load_text(path, 0, context, train, out);
}

double pw_dataset_unigram_entropy(const pw_dataset *d)
{
    if (d && d->tokens) return pw_tokens_entropy(d);
    if (!d || d->n <= 0 || (!d->text && !d->y)) return 0.0;
    int64_t bins = d->n_classes > 0 ? d->n_classes : 1, total = 0;
    int64_t *count = calloc((size_t)bins, sizeof *count);
    if (!count) return 0.0;
    if (d->text) {
        /* the targets of the windows: bytes 1 .. n·T */
        for (int64_t i = 1; i <= d->n * d->stride; i++) count[d->text[i] % bins]++;
        total = d->n * d->stride;
    } else {
        int64_t L = d->label_numel > 0 ? d->label_numel : 1;
        for (int64_t i = 0; i < d->n * L; i++)
            if (d->y[i] >= 0 && d->y[i] < bins) count[d->y[i]]++, total++;
    }
    double h = 0.0;
    for (int64_t c = 0; c < bins; c++)
        if (count[c]) {
            double q = (double)count[c] / (double)total;
            h -= q * log(q);
        }
    free(count);
    return h;
}

pw_status pw_dataset_check_graph(const pw_graph *g, const pw_dataset *d)
{
    const pw_value *in = &g->values[g->input];
    char a[96], b[96], where[4200];
    /* Without its inputs an IDX set knows no sample shape: the process that
     * loads them checks it. */
    const int shape_known = !(d->missing & PW_DATA_INPUTS) || d->sample_numel > 0;
    if (in->dtype != d->x_dtype)
        return pw_error(PW_ERR_SHAPE, "%s: input '%s' is %s but data set '%s' gives %s samples%s",
                        g->file, in->name, pw_dtype_name(in->dtype), d->name,
                        pw_dtype_name(d->x_dtype),
                        d->x_dtype == PW_I32 ? " (tokens: start the graph with an embedding)" : "");
    if (shape_known && pw_shape_numel(&in->shape) != d->sample_numel)
        return pw_error(PW_ERR_SHAPE, "%s: input '%s' has shape %s but data set '%s' has samples "
                        "of shape %s", g->file, in->name, pw_shape_str(&in->shape, a, sizeof a),
                        d->name, pw_shape_str(&d->sample_shape, b, sizeof b));
    if (g->label < 0)
        return pw_error(PW_ERR_SHAPE, "%s: the graph declares no `label`, so it cannot be trained",
                        g->file);
    const pw_value *lab = &g->values[g->label];
    int64_t L = d->label_numel > 0 ? d->label_numel : 1;
    if (pw_shape_numel(&lab->shape) != L) {
        pw_shape ls = d->label_numel > 0 ? d->label_shape : pw_shape_make(0, NULL);
        return pw_error(PW_ERR_SHAPE, "%s: label '%s' has shape %s but data set '%s' gives labels "
                        "of shape %s per sample", g->file, lab->name,
                        pw_shape_str(&lab->shape, a, sizeof a), d->name,
                        pw_shape_str(&ls, b, sizeof b));
    }
    for (int i = 0; i < g->n_nodes; i++) {
        const pw_node *nd = &g->nodes[i];
        if (nd->op == PW_OP_SOFTMAX_XENT) {
            const pw_value *lg = &g->values[nd->inputs[0]];
            int64_t C = lg->shape.ndim ? lg->shape.d[lg->shape.ndim - 1] : 0;
            if (d->n_classes > C && d->tokens &&
                pw_tokens_first_at_least(d, 1, C > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)C, where,
                                         sizeof where))
                return pw_error(PW_ERR_SHAPE, "%s is not a class of the loss at %s:%d:%d (%lld "
                                "classes; data set '%s')", where, g->file, nd->line, nd->col,
                                (long long)C, d->name);
            if (d->n_classes > C)
                return pw_error(PW_ERR_SHAPE, "%s: the loss has %lld classes but data set '%s' "
                                "has labels up to %d", g->file, (long long)C, d->name,
                                d->n_classes - 1);
        }
        if (nd->op == PW_OP_EMBEDDING && nd->inputs[0] == g->input && d->n_tokens > nd->attrs.vocab) {
            /* Shards: the first id that does not fit, where it is. */
            const uint32_t V = nd->attrs.vocab > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)nd->attrs.vocab;
            if (d->tokens && pw_tokens_first_at_least(d, 0, V, where, sizeof where))
                return pw_error(PW_ERR_SHAPE, "%s is outside the vocabulary of %s:%d:%d (embedding "
                                "vocab=%lld; data set '%s')", where, g->file, nd->line, nd->col,
                                (long long)nd->attrs.vocab, d->name);
            return pw_error(PW_ERR_SHAPE, "%s:%d:%d: embedding has vocab=%lld but data set '%s' "
                            "has tokens up to %d", g->file, nd->line, nd->col,
                            (long long)nd->attrs.vocab, d->name, d->n_tokens - 1);
        }
    }
    return PW_OK;
}

/* ---------------------------------------------------------------- sampler */

pw_status pw_sampler_init(pw_sampler *s, int64_t n, int shuffle, uint64_t seed)
{
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "pw_sampler_init: sampler is NULL");
    memset(s, 0, sizeof *s);
    if (n <= 0 || (uint64_t)n > SIZE_MAX / sizeof(int64_t))
        return pw_error(PW_ERR_INVALID_ARG, "sampler: sample count must be > 0 (got %lld)",
                        (long long)n);
    s->order = malloc(sizeof(int64_t) * (size_t)n);
    if (!s->order) return pw_error(PW_ERR_NOMEM, "sampler: out of memory for %lld samples",
                                   (long long)n);
    s->n = n;
    s->shuffle = shuffle != 0;
    s->seed = seed;
    s->epoch = -1;
    return PW_OK;
}

void pw_sampler_epoch(pw_sampler *s, int epoch)
{
    PW_ASSERT(s && s->order && epoch >= 0);
    for (int64_t i = 0; i < s->n; i++) s->order[i] = i;
    if (s->shuffle) {
        pw_rng r = pw_rng_make(pw_rng_u64(pw_rng_key(s->seed, "shuffle"), (uint64_t)epoch));
        for (int64_t i = s->n - 1; i > 0; i--) {
            int64_t j = (int64_t)pw_rng_below(&r, (uint64_t)i + 1);
            int64_t t = s->order[i];
            s->order[i] = s->order[j];
            s->order[j] = t;
        }
    }
    s->epoch = epoch;
}

int64_t pw_sampler_batches(const pw_sampler *s, int64_t batch)
{
    if (!s || batch <= 0) return 0;
    return s->n / batch;
}

const int64_t *pw_sampler_batch(const pw_sampler *s, int64_t b, int64_t batch)
{
    if (!s || !s->order || b < 0 || b >= pw_sampler_batches(s, batch)) return NULL;
    return s->order + b * batch;
}

void pw_sampler_free(pw_sampler *s)
{
    if (!s) return;
    free(s->order);
    s->order = NULL;
    s->n = 0;
}
