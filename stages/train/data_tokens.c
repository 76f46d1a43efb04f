/* pipewright — llm.c token shards as a data set (pw_dataset_load_tokens,
 * stages/train/data.h has the format and the rules).
 *
 * pattern ──expand──▶ shard files in byte order of their names
 *         ──read_header──▶ each header checked against its file's size
 *         ──▶ the split's range of the concatenated stream, read with pread
 *             into one array of the shards' width (2 or 4 bytes per id).
 *
 * Nothing is allocated from what a header says before the file's size has
 * confirmed it, so a corrupt count cannot ask for more memory than the files
 * hold. */
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/log.h"
#include "stages/train/data-internal.h"

/* The largest id taken: n_tokens (max id + 1) is an int. */
#define MAX_TOKEN_ID ((uint32_t)INT32_MAX - 1)

typedef struct shard {
    char *path;
    uint32_t magic;
    int width;              /* bytes per id: 2 (GPT-2) or 4 (llama-3) */
    int64_t count;          /* ids, header[2] */
    int64_t size;           /* file bytes: PW_TOKENS_HEADER_BYTES + count · width */
} shard;

typedef struct shard_list {
    shard *s;
    int n;
    int64_t total;          /* ids of all shards */
} shard_list;

static void list_free(shard_list *l)
{
    for (int i = 0; i < l->n; i++) free(l->s[i].path);
    free(l->s);
    memset(l, 0, sizeof *l);
}

void pw_token_shards_free(struct pw_token_shards *s)
{
    if (!s) return;
    for (int i = 0; i < s->n; i++) free(s->path[i]);
    free(s->path);
    free(s->first);
    free(s->skip);
    free(s);
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static const char *format_name(uint32_t magic)
{
    return magic == PW_TOKENS_MAGIC_GPT2 ? "GPT-2 (uint16 ids)" : "llama-3 (uint32 ids)";
}

/* Reads up to n bytes at `off`; *got is short only at the end of the file. */
static pw_status pread_full(int fd, const char *path, void *buf, size_t n, int64_t off, size_t *got)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, (char *)buf + done, n - done, (off_t)(off + (int64_t)done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0)
            return pw_error(PW_ERR_IO, "%s: read failed at byte %lld: %s", path,
                            (long long)(off + (int64_t)done), strerror(errno));
        if (r == 0) break;
        done += (size_t)r;
    }
    *got = done;
    return PW_OK;
}

/* Opens a shard and checks what it is: a regular file of this size
 * (O_NONBLOCK: a FIFO a glob matched must not hang the open). */
static pw_status open_shard(const char *path, int *fd, int64_t *size)
{
    *fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (*fd < 0) return pw_error(PW_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    pw_status rc = PW_OK;
    if (fstat(*fd, &sb) != 0) rc = pw_error(PW_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(sb.st_mode)) rc = pw_error(PW_ERR_IO, "%s: not a regular file", path);
    if (rc != PW_OK) {
        close(*fd);
        *fd = -1;
        return rc;
    }
    *size = (int64_t)sb.st_size;
    return PW_OK;
}

/* The header of sh->path: magic, version, count, and the file's size. */
static pw_status read_header(shard *sh)
{
    const char *path = sh->path;
    int fd;
    int64_t size;
    PW_CHECK(open_shard(path, &fd, &size));
    unsigned char h[12];
    size_t got = 0;
    pw_status rc = pread_full(fd, path, h, sizeof h, 0, &got);
    close(fd);
    if (rc != PW_OK) return rc;
    const uint32_t magic = got >= 4 ? le32(h) : 0;
    /* A file that is not a shard at all says so by its first word. */
    if (got >= 4 && magic != PW_TOKENS_MAGIC_GPT2 && magic != PW_TOKENS_MAGIC_LLAMA3)
        return pw_error(PW_ERR_FORMAT, "%s: bad magic: %u at byte 0 (an llm.c token shard starts with "
                        "%d, GPT-2 uint16 ids, or %d, llama-3 uint32 ids)", path, magic,
                        PW_TOKENS_MAGIC_GPT2, PW_TOKENS_MAGIC_LLAMA3);
    if (size < PW_TOKENS_HEADER_BYTES || got < sizeof h)
        return pw_error(PW_ERR_FORMAT, "%s: truncated header: the file has %lld bytes, the header "
                        "alone %d (256 little-endian int32)", path, (long long)size,
                        PW_TOKENS_HEADER_BYTES);
    const uint32_t version = le32(h + 4), count = le32(h + 8);
    const uint32_t want = magic == PW_TOKENS_MAGIC_GPT2 ? 1 : 7;
    if (version != want)
        return pw_error(PW_ERR_FORMAT, "%s: unsupported version: %u at byte 4 (magic %u is version "
                        "%u)", path, version, magic, want);
    if (count > (uint32_t)INT32_MAX)
        return pw_error(PW_ERR_FORMAT, "%s: negative token count: %d at byte 8", path, (int)(int32_t)count);
    sh->magic = magic;
    sh->width = magic == PW_TOKENS_MAGIC_GPT2 ? 2 : 4;
    sh->count = count;
    sh->size = PW_TOKENS_HEADER_BYTES + sh->count * sh->width;
    if (size != sh->size)
        return pw_error(PW_ERR_FORMAT, "%s: token count does not match the file size: %lld tokens at "
                        "byte 8 make %lld bytes with the header, the file has %lld (%s)", path,
                        (long long)sh->count, (long long)sh->size, (long long)size,
                        size < sh->size ? "truncated" : "trailing bytes");
    return PW_OK;
}

static int shard_cmp(const void *a, const void *b)
{
    return strcmp(((const shard *)a)->path, ((const shard *)b)->path);
}

/* "tokens 'd/x_*.bin': no file matches", with the reason when the pattern's
 * directory (free of wildcards) does not exist. */
static pw_status no_match(const char *pattern)
{
    const char *slash = strrchr(pattern, '/');
    char dir[4096];
    struct stat sb;
    if (slash && slash > pattern && (size_t)(slash - pattern) < sizeof dir) {
        memcpy(dir, pattern, (size_t)(slash - pattern));
        dir[slash - pattern] = '\0';
        if (!strpbrk(dir, "*?[") && stat(dir, &sb) != 0)
            return pw_error(PW_ERR_IO, "tokens '%s': no file matches (%s: %s)", pattern, dir, strerror(errno));
    }
    return pw_error(PW_ERR_IO, "tokens '%s': no file matches", pattern);
}

/* The shards a pattern names, sorted, each header checked; one format. An
 * existing path is taken as it is (a name may contain '['); anything else
 * with a wildcard is a glob. On failure *l is empty. */
static pw_status expand(const char *pattern, shard_list *l)
{
    memset(l, 0, sizeof *l);
    struct stat sb;
    glob_t g;
    memset(&g, 0, sizeof g);
    const char *one = NULL;
    size_t n = 1;
    if (stat(pattern, &sb) == 0) {
        if (S_ISDIR(sb.st_mode))
            return pw_error(PW_ERR_IO, "%s: is a directory; name its shards with a glob ('%s/*.bin')",
                            pattern, pattern);
        one = pattern;
    } else if (!strpbrk(pattern, "*?[")) {
        return pw_error(PW_ERR_IO, "%s: %s", pattern, strerror(errno));
    } else {
        int rc = glob(pattern, GLOB_NOSORT, NULL, &g);
        if (rc == GLOB_NOSPACE) return pw_error(PW_ERR_NOMEM, "tokens '%s': out of memory", pattern);
        if (rc == GLOB_NOMATCH || (rc == 0 && g.gl_pathc == 0)) {
            globfree(&g);
            return no_match(pattern);
        }
        if (rc != 0) {
            globfree(&g);
            return pw_error(PW_ERR_IO, "tokens '%s': cannot search for files (a directory could not "
                            "be read)", pattern);
        }
        n = g.gl_pathc;
    }
    pw_status rc = PW_OK;
    l->s = calloc(n, sizeof *l->s);
    if (!l->s) rc = pw_error(PW_ERR_NOMEM, "tokens '%s': out of memory", pattern);
    for (size_t i = 0; rc == PW_OK && i < n; i++) {
        l->s[i].path = strdup(one ? one : g.gl_pathv[i]);
        if (!l->s[i].path) rc = pw_error(PW_ERR_NOMEM, "tokens '%s': out of memory", pattern);
        l->n++;
    }
    if (!one) globfree(&g);
    if (rc == PW_OK) qsort(l->s, (size_t)l->n, sizeof *l->s, shard_cmp);
    for (int i = 0; rc == PW_OK && i < l->n; i++) {
        rc = read_header(&l->s[i]);
        if (rc == PW_OK && l->s[i].magic != l->s[0].magic)
            rc = pw_error(PW_ERR_FORMAT, "%s: a %s shard after %s, a %s shard: one data set takes one "
                          "format", l->s[i].path, format_name(l->s[i].magic), l->s[0].path,
                          format_name(l->s[0].magic));
        l->total += l->s[i].count;
    }
    if (rc != PW_OK) list_free(l);
    return rc;
}

/* 1: an llm.c training shard name, 2: a validation one, 0: neither. */
static int llmc_role(const char *path)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (strstr(b, "_val_") || (n >= 8 && strcmp(b + n - 8, "_val.bin") == 0)) return 2;
    if (strstr(b, "_train_") || (n >= 10 && strcmp(b + n - 10, "_train.bin") == 0)) return 1;
    return 0;
}

/* Host order for little-endian ids read as bytes. */
static void from_le(void *p, int64_t n, int width)
{
    const uint16_t probe = 1;
    unsigned char first;
    memcpy(&first, &probe, 1);
    if (first == 1) return; /* little-endian host */
    if (width == 2)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)p)[i] = __builtin_bswap16(((uint16_t *)p)[i]);
    else
        for (int64_t i = 0; i < n; i++) ((uint32_t *)p)[i] = __builtin_bswap32(((uint32_t *)p)[i]);
}

/* Reads stream ids [from, from + count) of the shards into buf (host order),
 * refusing ids above MAX_TOKEN_ID. */
static pw_status read_range(const shard_list *l, int64_t from, int64_t count, unsigned char *buf)
{
    int64_t start = 0; /* stream index of shard k's first id */
    for (int k = 0; k < l->n && count > 0; start += l->s[k].count, k++) {
        const shard *sh = &l->s[k];
        const int64_t lo = from > start ? from : start;
        const int64_t hi = from + count < start + sh->count ? from + count : start + sh->count;
        if (lo >= hi) continue;
        const int64_t skip = lo - start, take = hi - lo;
        const int w = sh->width;
        unsigned char *dst = buf + (size_t)(lo - from) * (size_t)w;
        int fd;
        int64_t size;
        PW_CHECK(open_shard(sh->path, &fd, &size));
        size_t got = 0;
        pw_status rc = PW_OK;
        if (size != sh->size)
            rc = pw_error(PW_ERR_FORMAT, "%s: changed while being read: %lld bytes, its header was read "
                          "at %lld", sh->path, (long long)size, (long long)sh->size);
        else
            rc = pread_full(fd, sh->path, dst, (size_t)take * (size_t)w, PW_TOKENS_HEADER_BYTES + skip * w, &got);
        close(fd);
        if (rc != PW_OK) return rc;
        if (got != (size_t)take * (size_t)w)
            return pw_error(PW_ERR_FORMAT, "%s: changed while being read: ended at byte %lld, expected "
                            "%lld", sh->path, (long long)(PW_TOKENS_HEADER_BYTES + skip * w + (int64_t)got),
                            (long long)sh->size);
        from_le(dst, take, w);
        if (w == 4)
            for (int64_t i = 0; i < take; i++) {
                const uint32_t id = ((const uint32_t *)dst)[i];
                if (id > MAX_TOKEN_ID)
                    return pw_error(PW_ERR_FORMAT, "%s: token id too large: %u at position %lld (byte %lld); "
                                    "ids up to %u are taken", sh->path, id, (long long)(skip + i),
                                    (long long)(PW_TOKENS_HEADER_BYTES + (skip + i) * w), MAX_TOKEN_ID);
            }
    }
    return PW_OK;
}

/* Which shards the split [from, from + count) draws from. */
static pw_status make_table(const shard_list *l, int64_t from, int64_t count, struct pw_token_shards **out)
{
    struct pw_token_shards *t = calloc(1, sizeof *t);
    int m = 0;
    int64_t start = 0;
    for (int k = 0; k < l->n; start += l->s[k].count, k++)
        if (start < from + count && start + l->s[k].count > from) m++;
    if (t) {
        t->path = calloc((size_t)m + 1, sizeof *t->path);
        t->first = calloc((size_t)m + 1, sizeof *t->first);
        t->skip = calloc((size_t)m + 1, sizeof *t->skip);
    }
    if (!t || !t->path || !t->first || !t->skip) {
        pw_token_shards_free(t);
        return pw_error(PW_ERR_NOMEM, "tokens: out of memory");
    }
    start = 0;
    for (int k = 0; k < l->n; start += l->s[k].count, k++) {
        if (!(start < from + count && start + l->s[k].count > from)) continue;
        t->path[t->n] = strdup(l->s[k].path);
        if (!t->path[t->n]) {
            pw_token_shards_free(t);
            return pw_error(PW_ERR_NOMEM, "tokens: out of memory");
        }
        t->first[t->n] = start > from ? start - from : 0;
        t->skip[t->n] = start > from ? 0 : from - start;
        t->n++;
    }
    t->first[t->n] = count;
    *out = t;
    return PW_OK;
}

pw_status pw_dataset_load_tokens(const pw_tokens_config *cfg, pw_dataset **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_load_tokens: out is NULL");
    *out = NULL;
    if (!cfg || !cfg->train || !*cfg->train)
        return pw_error(PW_ERR_INVALID_ARG, "pw_dataset_load_tokens: no shard file or pattern");
    if (cfg->heldout && !*cfg->heldout)
        return pw_error(PW_ERR_INVALID_ARG, "tokens '%s': the held-out pattern is empty", cfg->train);
    const int64_t T = cfg->context;
    const char *pattern = cfg->test && cfg->heldout ? cfg->heldout : cfg->train;
    if (T < 1)
        return pw_error(PW_ERR_INVALID_ARG, "tokens '%s': context must be >= 1 (got %lld)", pattern,
                        (long long)T);
    shard_list l;
    PW_CHECK(expand(pattern, &l));
    pw_status rc = PW_OK;
    pw_dataset *d = NULL;
    if (!cfg->heldout) {
        /* llm.c's validation shards must not leak into training. */
        int tr = -1, va = -1;
        for (int i = 0; i < l.n; i++) {
            int role = llmc_role(l.s[i].path);
            if (role == 1 && tr < 0) tr = i;
            if (role == 2 && va < 0) va = i;
        }
        if (tr >= 0 && va >= 0) {
            rc = pw_error(PW_ERR_INVALID_ARG, "tokens '%s' matches llm.c training shards (%s) and "
                          "validation shards (%s); give them apart: tokens:TRAIN,HELDOUT", pattern,
                          l.s[tr].path, l.s[va].path);
            goto fail;
        }
    }
    /* The split: the whole stream, or the first 90% / last 10% as for text. */
    const int64_t held = cfg->heldout ? 0 : l.total / 10;
    const int64_t from = cfg->heldout || !cfg->test ? 0 : l.total - held;
    const int64_t part = cfg->heldout ? l.total : cfg->test ? held : l.total - held;
    if (part - 1 < T) { /* T may be INT64_MAX */
        rc = pw_error(PW_ERR_INVALID_ARG, "tokens '%s': the %s split has %lld tokens but a window of "
                      "context %lld needs at least %llu", pattern, cfg->test ? "held-out" : "training",
                      (long long)part, (long long)T, (unsigned long long)T + 1);
        goto fail;
    }
    const int64_t n = (part - 1) / T, used = n * T + 1; /* the ids the windows read */
    const int w = l.s[0].width;
    const int load = (cfg->missing & PW_DATA_ALL) != PW_DATA_ALL;
    d = calloc(1, sizeof *d);
    size_t nl = strlen(pattern) + 8;
    if (d) d->name = malloc(nl);
    if (!d || !d->name) {
        rc = pw_error(PW_ERR_NOMEM, "tokens '%s': out of memory", pattern);
        goto fail;
    }
    snprintf(d->name, nl, "%s/%s", pattern, cfg->test ? "test" : "train");
    PW_CHECK_GOTO(make_table(&l, from, used, &d->shards), rc, fail);
    if (load) {
        if ((uint64_t)used > SIZE_MAX / (uint64_t)w || !(d->tokens = malloc((size_t)used * (size_t)w))) {
            rc = pw_error(PW_ERR_NOMEM, "tokens '%s': out of memory for %lld tokens", pattern, (long long)used);
            goto fail;
        }
        PW_CHECK_GOTO(read_range(&l, from, used, d->tokens), rc, fail);
    }
    d->token_width = w;
    d->text_len = load ? used : 0;
    d->loaded_bytes = load ? used * w : 0;
    d->stride = T;
    d->n = n;
    d->sample_shape = pw_shape_make(1, &T);
    d->sample_numel = T;
    d->x_dtype = PW_I32;
    d->label_shape = pw_shape_make(1, &T);
    d->label_numel = T;
    d->missing = load ? 0 : PW_DATA_ALL;
    if (load) {
        /* Inputs are ids [0, used − 1), targets [1, used). */
        uint32_t top_in = 0, top_label = 0;
        for (int64_t i = 0; i < used; i++) {
            uint32_t id = pw_token_at(d, i);
            if (i + 1 < used && id > top_in) top_in = id;
            if (i > 0 && id > top_label) top_label = id;
        }
        d->n_tokens = (int)top_in + 1;
        d->n_classes = (int)top_label + 1;
    }
    PW_INFO(PW_SUB_DATA, "%s: %d shard%s of %s, %lld tokens from stream position %lld, %lld windows of %lld%s",
            d->name, d->shards->n, d->shards->n == 1 ? "" : "s", format_name(l.s[0].magic), (long long)used,
            (long long)from, (long long)n, (long long)T, load ? "" : " (headers only)");
    list_free(&l);
    *out = d;
    return PW_OK;
fail:
    list_free(&l);
    pw_dataset_destroy(d);
    return rc;
}

int pw_tokens_first_at_least(const pw_dataset *d, int labels, uint32_t limit, char *buf, size_t n)
{
    if (!d->tokens || !d->shards) return 0;
    const int64_t used = d->n * d->stride + 1 < d->text_len ? d->n * d->stride + 1 : d->text_len;
    const struct pw_token_shards *s = d->shards;
    int k = 0;
    for (int64_t i = labels ? 1 : 0; i < used - (labels ? 0 : 1); i++) {
        const uint32_t id = pw_token_at(d, i);
        if (id < limit) continue;
        while (k + 1 < s->n && s->first[k + 1] <= i) k++;
        const int64_t pos = s->skip[k] + (i - s->first[k]);
        snprintf(buf, n, "%s: token %u at position %lld (byte %lld)", s->path[k], id, (long long)pos,
                 (long long)(PW_TOKENS_HEADER_BYTES + pos * d->token_width));
        return 1;
    }
    return 0;
}

static int u32_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

double pw_tokens_entropy(const pw_dataset *d)
{
    if (!d->tokens || d->n <= 0 || d->n_classes <= 0) return 0.0;
    const int64_t total = d->n * d->stride; /* targets: stream ids 1 .. n·T */
    double h = 0.0;
    if ((int64_t)d->n_classes <= total + 65536) {
        /* A count per class: no more memory than the data justify. */
        int64_t *count = calloc((size_t)d->n_classes, sizeof *count);
        if (!count) return 0.0;
        for (int64_t i = 1; i <= total; i++) count[pw_token_at(d, i)]++;
        for (int64_t c = 0; c < d->n_classes; c++)
            if (count[c]) {
                double q = (double)count[c] / (double)total;
                h -= q * log(q);
            }
        free(count);
        return h;
    }
    /* Few targets, large ids: count runs of the sorted targets. */
    uint32_t *v = malloc((size_t)total * sizeof *v);
    if (!v) return 0.0;
    for (int64_t i = 0; i < total; i++) v[i] = pw_token_at(d, i + 1);
    qsort(v, (size_t)total, sizeof *v, u32_cmp);
    for (int64_t i = 0, j; i < total; i = j) {
        for (j = i + 1; j < total && v[j] == v[i]; j++) {}
        double q = (double)(j - i) / (double)total;
        h -= q * log(q);
    }
    free(v);
    return h;
}
