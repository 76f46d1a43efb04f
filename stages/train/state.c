/* pipewright — training-state checkpoints: snapshot, background write,
 * manifest, retention, resume (stages/train/state.h, docs/checkpoints.md). */
#include "stages/train/state.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "runtime/log.h"
#include "runtime/safetensors.h"
#include "runtime/tmpfile.h"
#include "stages/train/checkpoint.h"
#include "stages/train/pipeline-internal.h" /* the pipeline's generation */

#ifndef PW_VERSION
#define PW_VERSION "unknown"
#endif

#define PATH_MAX_LEN 4096
#define MAX_PIECES 64
#define PART_COMPRESS (-2)
#define PART_ZRESID (-3) /* T > 1: a use's residual, gathered from its tensor ranks' compressors */
#define PART_ZQ (-4)     /* T > 1: one tensor rank's PowerSGD Q */
#define COMPRESS_FORMAT "pipewright-compress-1"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- small helpers ---- */

/* PyTorch's names of the optimizer's per-parameter buffers. */
static const char *state_suffix(pw_optim_kind kind, int k)
{
    if (kind == PW_OPTIM_SGD) return "momentum_buffer";
    return k == 0 ? "exp_avg" : "exp_avg_sq";
}

static uint32_t crc_of(const void *data, size_t n)
{
    uLong c = crc32(0L, Z_NULL, 0);
    const unsigned char *p = data;
    while (n > 0) {
        uInt k = n > (1u << 30) ? (1u << 30) : (uInt)n;
        c = crc32(c, p, k);
        p += k;
        n -= k;
    }
    return (uint32_t)c;
}

void pw_state_graph_hash(const pw_graph *g, char out[17])
{
    uint64_t h = 1469598103934665603ull;
    char buf[64];
    for (int i = 0; i < g->n_params; i++) {
        const pw_param *p = &g->params[i];
        for (const char *c = p->name; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
        h = (h ^ ':') * 1099511628211ull;
        for (int d = 0; d < p->shape.ndim; d++) {
            int k = snprintf(buf, sizeof buf, d ? ",%lld" : "%lld", (long long)p->shape.d[d]);
            for (int j = 0; j < k; j++) h = (h ^ (unsigned char)buf[j]) * 1099511628211ull;
        }
        h = (h ^ ';') * 1099511628211ull;
    }
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

/* Whole file into memory (caller frees); PW_ERR_IO naming it. */
static pw_status read_file(const char *path, unsigned char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return pw_error(PW_ERR_IO, "%s: not a regular file", path);
    }
    unsigned char *b = malloc((size_t)sb.st_size + 1);
    if (!b) {
        fclose(f);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory (%lld bytes)", path, (long long)sb.st_size);
    }
    size_t n = fread(b, 1, (size_t)sb.st_size, f);
    int bad = ferror(f);
    fclose(f);
    if (bad || n != (size_t)sb.st_size) {
        free(b);
        return pw_error(PW_ERR_IO, "%s: read failed: %s", path, strerror(errno));
    }
    *out = b;
    *len = n;
    return PW_OK;
}

/* A JSON document to `path`, atomically (temp file registered with
 * runtime/tmpfile.h, fsync, rename, the directory synced). */
static pw_status write_json_atomic(const char *path, json_t *doc)
{
    char tmp[PATH_MAX_LEN + 32];
    if (pw_tmpfile_name(path, tmp, sizeof tmp) != 0) return pw_error(PW_ERR_IO, "%s: path too long", path);
    char *text = json_dumps(doc, JSON_INDENT(2) | JSON_REAL_PRECISION(17));
    if (!text) return pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
    int slot = pw_tmpfile_register(tmp);
    pw_status st = PW_OK;
    int fd = pw_tmpfile_create(slot, tmp);
    if (fd < 0) {
        st = pw_error(PW_ERR_IO, "%s: cannot create %s: %s", path, tmp, strerror(errno));
        goto out;
    }
    size_t len = strlen(text), done = 0;
    while (done < len) {
        ssize_t k = write(fd, text + done, len - done);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        done += (size_t)k;
    }
    int ok = done == len && write(fd, "\n", 1) == 1 && fsync(fd) == 0;
    if (close(fd) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        st = pw_error(PW_ERR_IO, "%s: writing failed: %s", path, strerror(errno));
        unlink(tmp);
        goto out;
    }
    char dir[PATH_MAX_LEN];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            (void)fsync(dfd);
            close(dfd);
        }
    }
out:
    pw_tmpfile_forget(slot);
    free(text);
    return st;
}

/* "step-00000120" -> 120; -1 for any other name. */
static int64_t step_of_name(const char *name)
{
    if (strncmp(name, "step-", 5) != 0 || !name[5]) return -1;
    int64_t v = 0;
    for (const char *c = name + 5; *c; c++) {
        if (*c < '0' || *c > '9' || v > INT64_MAX / 10 - 10) return -1;
        v = v * 10 + (*c - '0');
    }
    return v;
}

static int has_manifest(const char *ckpt)
{
    char p[PATH_MAX_LEN + 400];
    snprintf(p, sizeof p, "%s/" PW_STATE_MANIFEST, ckpt);
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* The manifest goes first: a half-removed checkpoint is incomplete, never
 * complete with files missing. */
static void remove_checkpoint(const char *ckpt)
{
    char p[PATH_MAX_LEN + 300];
    snprintf(p, sizeof p, "%s/" PW_STATE_MANIFEST, ckpt);
    unlink(p);
    DIR *d = opendir(ckpt);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(p, sizeof p, "%s/%s", ckpt, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    if (rmdir(ckpt) != 0) PW_WARN("checkpoint: cannot remove %s: %s", ckpt, strerror(errno));
}

typedef struct ckpt_entry {
    int64_t step;
    int complete;
} ckpt_entry;

static int by_step_desc(const void *a, const void *b)
{
    const ckpt_entry *x = a, *y = b;
    return x->step < y->step ? 1 : x->step > y->step ? -1 : 0;
}

/* The step-* directories of dir, newest first; returns the count (-1 when
 * dir cannot be read). *out is malloc'ed. */
static int list_checkpoints(const char *dir, ckpt_entry **out)
{
    *out = NULL;
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0, cap = 0;
    ckpt_entry *v = NULL;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int64_t s = step_of_name(e->d_name);
        if (s < 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            ckpt_entry *nv = realloc(v, (size_t)cap * sizeof *v);
            if (!nv) break;
            v = nv;
        }
        char p[PATH_MAX_LEN + 300];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        v[n].step = s;
        v[n].complete = has_manifest(p);
        n++;
    }
    closedir(d);
    if (n > 1) qsort(v, (size_t)n, sizeof *v, by_step_desc);
    *out = v;
    return n;
}

static void ckpt_path(const char *dir, int64_t step, char *out, size_t n)
{
    snprintf(out, n, "%s/step-%08lld", dir, (long long)step);
}

/* Keeps the newest `keep` complete checkpoints (0: all) and removes the
 * incomplete ones: every one at start-up (`all_incomplete`: nothing is in
 * flight yet), else only those older than the newest complete one — a
 * newer one may be a checkpoint other processes are writing now. */
static void retain(const char *dir, int keep, int all_incomplete)
{
    ckpt_entry *v;
    int n = list_checkpoints(dir, &v), kept = 0, seen_complete = 0;
    for (int i = 0; i < n; i++) {
        char p[PATH_MAX_LEN];
        ckpt_path(dir, v[i].step, p, sizeof p);
        seen_complete |= v[i].complete;
        if (!v[i].complete && !seen_complete && !all_incomplete) continue;
        if (!v[i].complete) {
            PW_INFO(PW_SUB_TRAIN, "checkpoint: removing incomplete %s", p);
            remove_checkpoint(p);
        } else if (keep > 0 && ++kept > keep) {
            PW_INFO(PW_SUB_TRAIN, "checkpoint: removing %s (--keep %d)", p, keep);
            remove_checkpoint(p);
        }
    }
    free(v);
}

/* ---- the writer ---- */

/* One tensor of the snapshot. */
typedef struct item {
    pw_program *prog;          /* where it is read from */
    int local;                 /* the parameter's index there */
    int part;                  /* -1: the parameter; k >= 0: optimizer buffer k;
                                  PART_COMPRESS: a compressor's state (z, zspan);
                                  PART_ZRESID, PART_ZQ: at T > 1, of the writer's zs[zi] */
    pw_compressor *z;
    int zspan;
    int zi;
    int gp;
    char *name;                /* "fc1.weight" or "fc1.weight.exp_avg" */
    pw_shape shape;
    int64_t numel;             /* the full tensor's */
    size_t off;                /* floats into the block */
    pw_program **ranks;        /* tensor parallelism, a split parameter: the T rank
                                  programs that hold its parts (same local index);
                                  NULL: prog holds it whole */
    int gather;                /* tensor parallelism under MPI, a split parameter: prog
                                  holds this process's part; the others' come over the
                                  transport's tensor-parallel group */
} item;

struct pw_state_writer {
    pw_state_config cfg;
    const pw_transport *t;
    int shard, n_shards;       /* MPI: pipeline rank, ranks; one process: -1, 0 */
    int snaps;                 /* 1: takes the snapshot (one process; under MPI replica 0's) */
    int writes;                /* 0: a process of another replica, or a tensor rank after the
                                  first (writes nothing but its compressors' state) */
    item *items;
    int n_items, n_model;
    int n_compress;            /* the last n_compress items: --compress's error-feedback state
                                  (every process writes its replicas': "compress" files) */
    char zmode[48];            /* its mode ("topk:0.01"), for the files' metadata */
    char zreplicas[16];
    pl_zstate *zs;             /* T > 1: the compressors' spans the PART_Z items read (owned) */
    int nzs;
    float *ztmp;               /* T > 1: one span's state */
    float *block;              /* the snapshot: every item's floats */
    size_t block_floats;
    int64_t spe;
    /* The checkpoint in flight. */
    int pending;
    int64_t step;
    char path[PATH_MAX_LEN];
    pthread_t thread;
    int thread_live;
    atomic_int finished;
    pw_status result;
    char err[512];
    json_t *files;             /* this process's file records */
    int64_t bytes;
    double write_s, snapshot_s, stall_s;
    pw_state_done stash;       /* completed inside save (a write waited for), not reported yet */
    int stashed;
    int64_t last_saved;        /* the step of the last checkpoint started (or resumed from); -1 none */
    uint64_t generation;       /* of the pipeline the items point into (a re-partition
                                  replaces it: stages/train/rebalance.h) */
    int T;                     /* the pipeline's tensor-parallel degree */
    pw_graph **rank_g;         /* [T] at T > 1: its rank graphs (borrowed) */
    float *part;               /* a split parameter's part, read before it is gathered;
                                  under MPI then the T parts all-gathered ([T][most]) */
    size_t part_floats;
    int *cuts;                 /* the layout's cuts, owned: cfg.layout.cuts points here */
    char *schedule;            /* the layout's schedule name, owned: cfg.layout.schedule
                                  (the caller's may live in a pipeline a move replaces) */
};

static void free_items(pw_state_writer *w)
{
    for (int i = 0; w->items && i < w->n_items; i++) free(w->items[i].name);
    free(w->items);
    free(w->block);
    free(w->part);
    free(w->zs);
    free(w->ztmp);
    w->zs = NULL;
    w->ztmp = NULL;
    w->nzs = 0;
    w->items = NULL;
    w->block = NULL;
    w->part = NULL;
    w->part_floats = 0;
    w->n_items = w->n_model = w->n_compress = 0;
    w->block_floats = 0;
}

/* Whether two entries are spans of one (replica, parameter, use). */
static int same_use(const pl_zstate *a, const pl_zstate *b)
{
    return a->replica == b->replica && a->gp == b->gp && a->use == b->use;
}

/* At T > 1 (docs/checkpoints.md, "compress"): a use's residual gathered
 * into the full tensor — top-k's under the T = 1 name (the same tensor
 * then, whatever T), PowerSGD's as "<name>.residual" — and PowerSGD's Q
 * per tensor rank, "<name>.Q.T<T>.rank<r>" (q: 1). */
static void ztp_name(const pw_graph *g, const pl_zstate *z, int powersgd, int q, int T, char *out, size_t n)
{
    char base[400];
    pl_zstate_name(g, z, base, sizeof base);
    if (q) snprintf(out, n, "%s.Q.T%d.rank%d", base, T, z->tp_rank);
    else snprintf(out, n, "%s%s", base, powersgd ? ".residual" : "");
}

/* The residual floats of entry z's use in the checkpoint: the full tensor's
 * for a split parameter, else the span's. */
static int64_t zresid_floats(const pw_graph *g, const pl_zstate *z)
{
    return z->split ? pw_shape_numel(&g->params[z->gp].shape) : z->numel;
}

static pw_status build_items(pw_state_writer *w, pw_pipeline *pl)
{
    const pw_graph *g = w->cfg.graph;
    const pw_partition *part = pw_pipeline_partition(pl);
    const int C = pw_pipeline_n_chunks(pl), sf = pw_optim_state_floats(w->cfg.run.optim.kind);
    const int rep = w->t ? w->t->replica : 0;
    int *first = malloc((size_t)(g->n_params + 1) * sizeof *first);
    unsigned char *taken = calloc((size_t)g->n_params + 1, 1);
    w->items = calloc((size_t)g->n_params * (size_t)(1 + sf) + 1, sizeof *w->items);
    if (!first || !taken || !w->items) {
        free(first);
        free(taken);
        return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    }
    for (int p = 0; p < g->n_params; p++) first[p] = -1;
    for (int c = C - 1; c >= 0; c--)
        for (int i = part->begin[c]; i < part->begin[c + 1]; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++) first[g->nodes[i].params[q]] = c;
    /* The parameters first, then their state, each in graph order (the
     * files are canonical whatever the order). */
    item *tmp = calloc((size_t)g->n_params + 1, sizeof *tmp);
    int n = 0;
    for (int c = 0; tmp && c < C && w->snaps; c++) {
        pw_program *progs[MAX_PIECES];
        int np = pw_pipeline_programs(pl, rep, c, progs, MAX_PIECES);
        for (int j = 0; j < np && j < MAX_PIECES; j++)
            for (int i = 0; i < pw_program_n_params(progs[j]); i++) {
                pw_program_param pp;
                pw_program_param_at(progs[j], i, &pp);
                if (first[pp.graph_param] != c || taken[pp.graph_param]) continue;
                taken[pp.graph_param] = 1;
                tmp[pp.graph_param] = (item){.prog = progs[j], .local = i, .part = -1, .gp = pp.graph_param,
                                             .shape = pp.shape, .numel = pp.numel};
                if (pl->T > 1 && pl->rank_g[0]->params[pp.graph_param].tp_full > 0) {
                    /* Gathered from the T ranks' parts into the full tensor
                     * (docs/parallelism.md, "Checkpoints"): in one process
                     * from its rank programs, under MPI from the stage's T
                     * processes. */
                    item *it = &tmp[pp.graph_param];
                    if (pl->t) it->gather = 1;
                    else it->ranks = stage_at(pl, lrep_of(pl, rep), c)->rank_prog; /* progs[j] is its [0] */
                    it->shape = g->params[pp.graph_param].shape;
                    it->numel = pw_shape_numel(&it->shape);
                    if ((size_t)pp.numel > w->part_floats) w->part_floats = (size_t)pp.numel;
                }
            }
    }
    if (!tmp) {
        free(first);
        free(taken);
        return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    }
    size_t off = 0;
    for (int k = -1; k < sf; k++)
        for (int p = 0; p < g->n_params; p++) {
            if (!taken[p]) continue;
            item *it = &w->items[n++];
            *it = tmp[p];
            it->part = k;
            it->off = off;
            off += (size_t)it->numel;
            size_t len = strlen(g->params[p].name) + 32;
            it->name = malloc(len);
            if (!it->name) break;
            if (k < 0) snprintf(it->name, len, "%s", g->params[p].name);
            else snprintf(it->name, len, "%s.%s", g->params[p].name, state_suffix(w->cfg.run.optim.kind, k));
            if (k < 0) w->n_model++;
        }
    free(tmp);
    free(first);
    free(taken);
    w->n_items = n;
    for (int i = 0; i < n; i++)
        if (!w->items[i].name) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    /* --compress: every replica's error-feedback state, one tensor per
     * (replica, parameter, use) (stages/train/pipeline_compress.c). */
    pl_zstate *zs = NULL;
    int nz = 0;
    const char *zwhy = NULL;
    PW_CHECK(pl_compress_states(pl, &zs, &nz, &zwhy));
    if (nz > 0) {
        item *grown = realloc(w->items, (size_t)(n + 2 * nz) * sizeof *w->items);
        if (!grown) {
            free(zs);
            return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        }
        w->items = grown;
        pw_compress_name(&pl->cfg.compress, w->zmode, sizeof w->zmode);
        snprintf(w->zreplicas, sizeof w->zreplicas, "%d", pl->NR);
    }
    if (nz > 0 && pl->T > 1) {
        /* Each tensor rank's compressor holds its part of a split parameter
         * and its own copy of a whole one (the same floats on every rank:
         * a whole parameter's gradient is computed alike on each). */
        const int psgd = pl->cfg.compress.kind == PW_COMPRESS_POWERSGD;
        int64_t most = 1;
        for (int i = 0; i < nz; i++)
            if (zs[i].floats > most) most = zs[i].floats;
        w->zs = zs;
        w->nzs = nz;
        zs = NULL;
        if (!(w->ztmp = malloc((size_t)most * sizeof(float)))) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        for (int q = 0; q < 1 + psgd; q++)
            for (int i = 0; i < nz; i++) {
                const pl_zstate *e = &w->zs[i];
                int first = 1;
                for (int j = 0; j < i && first; j++) first = !same_use(&w->zs[j], e);
                if (q == 0 ? !first : e->floats <= e->numel) continue;
                item *it = &w->items[n];
                const int64_t len = q ? e->floats - e->numel : zresid_floats(g, e);
                *it = (item){.part = q ? PART_ZQ : PART_ZRESID, .zi = i, .gp = e->gp,
                             .shape = {.ndim = 1, .d = {len}}, .numel = len, .off = off};
                off += (size_t)len;
                const size_t nlen = strlen(g->params[it->gp].name) + 96;
                if (!(it->name = malloc(nlen))) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
                ztp_name(g, e, psgd, q, pl->T, it->name, nlen);
                w->n_items = ++n;
                w->n_compress++;
            }
        nz = 0;
    }
    for (int i = 0; i < nz; i++) {
        item *it = &w->items[n];
        *it = (item){.part = PART_COMPRESS, .z = zs[i].z, .zspan = zs[i].span, .gp = zs[i].gp,
                     .shape = {.ndim = 1, .d = {zs[i].floats}}, .numel = zs[i].floats, .off = off};
        off += (size_t)it->numel;
        const size_t len = strlen(g->params[it->gp].name) + 64;
        if (!(it->name = malloc(len))) {
            free(zs);
            return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        }
        pl_zstate_name(g, &zs[i], it->name, len);
        w->n_items = ++n;
        w->n_compress++;
    }
    free(zs);
    w->block_floats = off;
    w->generation = pl->generation;
    w->T = pl->T;
    w->rank_g = pl->rank_g;
    if (w->part_floats) {
        /* room for any rank's part (at most the full tensor) */
        size_t most = 0;
        for (int i = 0; i < n; i++)
            if ((w->items[i].ranks || w->items[i].gather) && (size_t)w->items[i].numel > most)
                most = (size_t)w->items[i].numel;
        w->part_floats = most;
        const size_t parts = pl->t ? 1 + (size_t)pl->T : 1; /* MPI: this process's, then all T */
        if (!(w->part = malloc(parts * most * sizeof(float) + 64)))
            return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    }
    w->block = malloc(off * sizeof(float) + 64);
    if (!w->block) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory for a %zu-byte snapshot",
                                   off * sizeof(float));
    return PW_OK;
}

pw_status pw_state_writer_create(const pw_state_config *cfg, pw_state_writer **out)
{
    *out = NULL;
    if (!cfg->dir || !cfg->graph) return pw_error(PW_ERR_INVALID_ARG, "checkpoint: a directory and a graph are needed");
    if (strlen(cfg->dir) > PATH_MAX_LEN - 64) return pw_error(PW_ERR_INVALID_ARG, "checkpoint: path too long");
    pw_state_writer *w = calloc(1, sizeof *w);
    if (!w) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    w->cfg = *cfg;
    w->t = cfg->transport;
    w->shard = w->t ? w->t->rank : -1;
    w->n_shards = w->t ? w->t->n_ranks : 0;
    w->snaps = !w->t || w->t->replica == 0;
    w->writes = w->snaps && (!w->t || w->t->n_tp <= 1 || w->t->tp_rank == 0);
    w->last_saved = cfg->resumed ? pw_state_get_meta(cfg->resumed)->step : -1;
    if (cfg->layout.cuts && cfg->layout.n_cuts > 0) {
        w->cuts = malloc(sizeof(int) * (size_t)cfg->layout.n_cuts);
        if (!w->cuts) {
            free(w);
            return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        }
        memcpy(w->cuts, cfg->layout.cuts, sizeof(int) * (size_t)cfg->layout.n_cuts);
        w->cfg.layout.cuts = w->cuts;
    }
    if (cfg->layout.schedule) {
        w->schedule = strdup(cfg->layout.schedule);
        if (!w->schedule) {
            free(w->cuts);
            free(w);
            return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        }
        w->cfg.layout.schedule = w->schedule;
    }
    if (mkdir(cfg->dir, 0777) != 0 && errno != EEXIST) {
        pw_status st = pw_error(PW_ERR_IO, "--checkpoint-dir %s: cannot create: %s", cfg->dir, strerror(errno));
        free(w->schedule);
        free(w->cuts);
        free(w);
        return st;
    }
    struct stat sb;
    if (stat(cfg->dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        free(w->schedule);
        free(w->cuts);
        free(w);
        return pw_error(PW_ERR_IO, "--checkpoint-dir %s: not a directory", cfg->dir);
    }
    /* A run that stopped while writing left an incomplete checkpoint. */
    if (!w->t || w->t->world_rank == 0) retain(cfg->dir, 0, 1);
    *out = w;
    return PW_OK;
}

/* The files' names: one process writes model.safetensors; MPI shards are
 * numbered by pipeline rank, Hugging Face style. */
static void file_name(const pw_state_writer *w, const char *kind, char *out, size_t n)
{
    if (w->shard < 0) snprintf(out, n, "%s.safetensors", kind);
    else if (!strcmp(kind, "compress")) /* every process's replica: numbered by world rank */
        snprintf(out, n, "%s-%05d-of-%05d.safetensors", kind, w->t->world_rank + 1, w->t->world_size);
    else snprintf(out, n, "%s-%05d-of-%05d.safetensors", kind, w->shard + 1, w->n_shards);
}

/* Writes items [from, to) as `name` in the checkpoint and records it. */
static pw_status write_file(pw_state_writer *w, const char *kind, int from, int to, const pw_st_meta *meta,
                            int n_meta)
{
    const pw_graph *g = w->cfg.graph;
    char name[128], path[PATH_MAX_LEN + 160];
    file_name(w, kind, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", w->path, name);
    pw_st_tensor *t = calloc((size_t)(to - from) + 1, sizeof *t);
    json_t *tensors = json_object();
    if (!t || !tensors) {
        free(t);
        json_decref(tensors);
        return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    }
    for (int i = from; i < to; i++) {
        const item *it = &w->items[i];
        t[i - from] = (pw_st_tensor){.name = it->name, .dtype = PW_F32,
                                     .shape = it->part <= PART_COMPRESS ? it->shape : g->params[it->gp].shape,
                                     .data = w->block + it->off, .nbytes = (size_t)it->numel * sizeof(float)};
        char crc[16];
        snprintf(crc, sizeof crc, "%08" PRIx32, crc_of(t[i - from].data, t[i - from].nbytes));
        json_object_set_new(tensors, it->name, json_string(crc));
    }
    pw_status st = pw_safetensors_write(path, t, to - from, meta, n_meta);
    free(t);
    unsigned char *bytes = NULL;
    size_t len = 0;
    /* The file's own checksum, of the bytes on disk (header included). */
    if (st == PW_OK) st = read_file(path, &bytes, &len);
    if (st != PW_OK) {
        json_decref(tensors);
        return st;
    }
    char crc[16];
    snprintf(crc, sizeof crc, "%08" PRIx32, crc_of(bytes, len));
    free(bytes);
    json_array_append_new(w->files, json_pack("{s:s, s:s, s:I, s:s, s:o}", "name", name, "kind", kind,
                                              "bytes", (json_int_t)len, "crc32", crc, "tensors", tensors));
    w->bytes += (int64_t)len;
    return PW_OK;
}

static json_t *optim_json(const pw_optim_config *o)
{
    return json_pack("{s:s, s:f, s:f, s:f, s:f, s:f, s:f}", "kind", pw_optim_name(o->kind), "lr", (double)o->lr,
                     "momentum", (double)o->momentum, "weight_decay", (double)o->weight_decay, "beta1",
                     (double)o->beta1, "beta2", (double)o->beta2, "eps", (double)o->eps);
}

/* Everything but the files. */
static json_t *manifest_json(const pw_state_writer *w)
{
    const pw_state_config *c = &w->cfg;
    const pw_state_run *r = &c->run;
    char hash[17];
    pw_state_graph_hash(c->graph, hash);
    json_t *opt = optim_json(&r->optim);
    json_object_set_new(opt, "step", json_integer(w->step));
    json_t *cuts = json_array();
    for (int i = 0; i < c->layout.n_cuts && c->layout.cuts; i++) json_array_append_new(cuts, json_integer(c->layout.cuts[i]));
    const int64_t spe = w->spe > 0 ? w->spe : 1;
    json_t *m = json_pack(
        "{s:s, s:s, s:I, s:I, s:I, s:I,"
        " s:{s:s, s:s, s:i},"
        " s:{s:s, s:I, s:I, s:I, s:i, s:I, s:b, s:f},"
        " s:{s:I, s:b, s:I, s:I, s:I},"
        " s:{s:s, s:I},"
        " s:o,"
        " s:{s:s, s:I, s:I, s:f, s:f, s:f},"
        " s:{s:i, s:s, s:i, s:o, s:i, s:i, s:i, s:i, s:i}}",
        "format", PW_STATE_FORMAT, "pipewright_version", PW_VERSION, "step", (json_int_t)w->step, "epoch",
        (json_int_t)(w->step / spe), "step_in_epoch", (json_int_t)(w->step % spe), "steps_per_epoch", (json_int_t)spe,
        "graph", "name", c->graph->name, "hash", hash, "params", c->graph->n_params,
        "run", "data", r->data ? r->data : "", "train_samples", (json_int_t)r->train_samples, "batch",
        (json_int_t)r->batch, "micro_batch", (json_int_t)r->micro_batch, "grad_groups", r->grad_groups, "seed",
        (json_int_t)r->seed, "shuffle", r->shuffle, "clip_grad_norm", r->clip_grad_norm,
        "sampler", "samples", (json_int_t)r->train_samples, "shuffle", r->shuffle, "seed", (json_int_t)r->seed,
        "epoch", (json_int_t)(w->step / spe), "position", (json_int_t)(w->step % spe * r->batch),
        "rng", "kind", "pw_rng counter-based: dropout masks are a function of (seed, node, step, sample index)",
        "seed", (json_int_t)r->seed,
        "optimizer", opt,
        "lr_schedule", "kind", pw_lr_schedule_name(r->optim.schedule), "warmup_steps",
        (json_int_t)r->optim.warmup_steps, "decay_steps", (json_int_t)r->optim.decay_steps, "min_lr",
        (double)r->optim.min_lr, "lr", (double)r->optim.lr, "next_lr", (double)pw_optim_lr_at(&r->optim, w->step + 1),
        "layout", "stages", c->layout.stages, "schedule", c->layout.schedule ? c->layout.schedule : "",
        "chunks_per_rank", c->layout.chunks_per_rank, "cuts", cuts, "replicas", c->layout.replicas,
        "micro_batches", c->layout.micro_batches, "processes", c->layout.processes > 0 ? c->layout.processes : 1,
        "threads", c->layout.threads, "tensor_parallel", c->layout.tensor_parallel > 1 ? c->layout.tensor_parallel : 1);
    return m;
}

/* The write itself (the writer's thread, or the caller's in foreground). */
static pw_status write_checkpoint(pw_state_writer *w)
{
    const double t0 = now_s();
    const pw_graph *g = w->cfg.graph;
    char step[32], epoch[32], seed[32], nparams[32];
    const int64_t spe = w->spe > 0 ? w->spe : 1;
    /* model.safetensors' metadata is --save's (pw_checkpoint_save): its
     * "epoch" is that of the last step, counted from 1. */
    snprintf(step, sizeof step, "%" PRId64, w->step);
    snprintf(epoch, sizeof epoch, "%" PRId64, w->step > 0 ? (w->step - 1) / spe + 1 : 0);
    snprintf(seed, sizeof seed, "%" PRIu64, w->cfg.run.seed);
    snprintf(nparams, sizeof nparams, "%d", g->n_params);
    pw_st_meta meta[] = {
        {"format", PW_CHECKPOINT_FORMAT}, {"graph", g->name}, {"step", step}, {"epoch", epoch},
        {"seed", seed}, {"n_params", nparams}, {"run", w->cfg.extra ? w->cfg.extra : ""},
    };
    pw_st_meta ometa[] = {
        {"format", "pipewright-optimizer-1"}, {"graph", g->name}, {"step", step},
        {"optimizer", pw_optim_name(w->cfg.run.optim.kind)},
    };
    w->bytes = 0;
    json_decref(w->files);
    w->files = json_array();
    if (!w->files) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    pw_st_meta zmeta[] = {
        {"format", COMPRESS_FORMAT}, {"graph", g->name}, {"step", step}, {"compress", w->zmode},
        {"replicas", w->zreplicas},
    };
    if (w->writes) {
        PW_CHECK(write_file(w, "model", 0, w->n_model, meta, (int)(sizeof meta / sizeof meta[0])));
        PW_CHECK(write_file(w, "optimizer", w->n_model, w->n_items - w->n_compress, ometa,
                            (int)(sizeof ometa / sizeof ometa[0])));
    }
    if (w->n_compress > 0)
        PW_CHECK(write_file(w, "compress", w->n_items - w->n_compress, w->n_items, zmeta,
                            (int)(sizeof zmeta / sizeof zmeta[0])));
    char p[PATH_MAX_LEN + 64];
    if (w->t) {
        /* MPI: a note of what this process wrote (every process: the
         * compressors' state is every replica's); rank 0 merges them. */
        {
            snprintf(p, sizeof p, "%s/shard-%05d.json", w->path, w->t->world_rank + 1);
            json_t *note = json_pack("{s:O}", "files", w->files);
            pw_status st = note ? write_json_atomic(p, note) : pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
            json_decref(note);
            PW_CHECK(st);
        }
    } else {
        json_t *m = manifest_json(w);
        if (!m) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        json_object_set(m, "files", w->files);
        json_object_set_new(m, "bytes", json_integer(w->bytes));
        snprintf(p, sizeof p, "%s/" PW_STATE_MANIFEST, w->path);
        pw_status st = write_json_atomic(p, m);
        json_decref(m);
        PW_CHECK(st);
        retain(w->cfg.dir, w->cfg.keep, 0);
    }
    w->write_s = now_s() - t0;
    return PW_OK;
}

static void *writer_main(void *arg)
{
    pw_state_writer *w = arg;
    w->result = write_checkpoint(w);
    if (w->result != PW_OK) snprintf(w->err, sizeof w->err, "%s", pw_last_error());
    atomic_store(&w->finished, 1);
    return NULL;
}

/* Tensor parallelism under MPI: a split parameter (or its optimizer state)
 * gathered from the T processes of its stage into its place in the full
 * tensor. Each process reads its part, the T parts (padded to the largest)
 * are all-gathered over the tensor-parallel group, and each goes where
 * pw_graph_tp_slice puts rank r's, as in one process. Every process of the
 * stage of replica 0 calls it for the same items in the same order. */
static pw_status gather_item(pw_state_writer *w, const item *it)
{
    const int T = w->T;
    int64_t most = 0; /* the largest part of this tensor */
    for (int r = 0; r < T; r++) {
        const int64_t k = pw_shape_numel(&w->rank_g[r]->params[it->gp].shape);
        if (k > most) most = k;
    }
    float *mine = w->part, *all = w->part + w->part_floats;
    pw_status st = it->part < 0 ? pw_program_param_read(it->prog, it->local, PW_PARAM_DATA, 0, mine)
                                : pw_program_param_read(it->prog, it->local, PW_PARAM_STATE, it->part, mine);
    /* A process whose read failed still takes part (its peers would wait
     * for it); its own error stands. */
    const pw_status gst = pw_coll_allgather_bytes(&w->t->tp_coll, mine, most * (int64_t)sizeof(float), all, NULL);
    if (st == PW_OK) st = gst;
    if (st != PW_OK) return pw_error_prefix(st, "checkpoint: snapshot of %s (tensor rank %d of %d): ", it->name,
                                            w->t->tp_rank, T);
    for (int r = 0; r < T; r++) pw_graph_tp_slice(w->rank_g[r], it->gp, w->block + it->off, all + (size_t)r * (size_t)most, 0);
    return PW_OK;
}

/* T > 1: a PART_ZRESID item (the use's residual: each rank's part into its
 * place; a rank whose part has no state, a PowerSGD span sent
 * uncompressed, has none: zeros) or a PART_ZQ item (one rank's Q). */
static void snap_ztp(pw_state_writer *w, const item *it)
{
    const pl_zstate *a = &w->zs[it->zi];
    float *dst = w->block + it->off;
    if (it->part == PART_ZQ) {
        pw_compressor_span_state_get(a->z, a->span, w->ztmp);
        memcpy(dst, w->ztmp + a->numel, (size_t)it->numel * sizeof(float));
        return;
    }
    memset(dst, 0, (size_t)it->numel * sizeof(float));
    for (int i = it->zi; i < w->nzs; i++) {
        const pl_zstate *e = &w->zs[i];
        if (!same_use(e, a)) continue;
        pw_compressor_span_state_get(e->z, e->span, w->ztmp);
        if (!e->split) { /* a whole parameter: the first rank's copy */
            memcpy(dst, w->ztmp, (size_t)e->numel * sizeof(float));
            return;
        }
        pw_graph_tp_slice(w->rank_g[e->tp_rank], e->gp, dst, w->ztmp, 0);
    }
}

pw_status pw_state_writer_save(pw_state_writer *w, pw_pipeline *pl, int64_t step)
{
    if (w->pending) {
        /* The previous write is still going: training waits for it. */
        const double t0 = now_s();
        int completed;
        PW_CHECK(pw_state_writer_poll(w, 1, &w->stash, &completed));
        w->stashed = completed;
        w->stall_s = now_s() - t0;
    } else {
        w->stall_s = 0;
    }
    if (w->items && w->generation != pl->generation) {
        /* Re-partitioned since the last save: other programs, other cuts
         * (no write is in flight: it was waited for above). */
        free_items(w);
        const pw_partition *part = pw_pipeline_partition(pl);
        if (w->cuts && w->cfg.layout.n_cuts == part->n_stages + 1)
            memcpy(w->cuts, part->begin, sizeof(int) * (size_t)w->cfg.layout.n_cuts);
    }
    if (!w->items) PW_CHECK(build_items(w, pl));
    w->spe = pw_pipeline_steps_per_epoch(pl);
    w->step = step;
    ckpt_path(w->cfg.dir, step, w->path, sizeof w->path);
    if (mkdir(w->path, 0777) != 0 && errno != EEXIST)
        return pw_error(PW_ERR_IO, "checkpoint: cannot create %s: %s", w->path, strerror(errno));
    /* Rewriting a step (a resumed run that reaches it again): incomplete
     * until the new manifest is in. */
    char p[PATH_MAX_LEN + 32];
    snprintf(p, sizeof p, "%s/" PW_STATE_MANIFEST, w->path);
    if (!w->t || w->t->world_rank == 0) unlink(p);
    /* The snapshot: host copies at this step boundary (the workers are idle). */
    const double t0 = now_s();
    PW_CHECK(pl_ps_checkpoint(pl)); /* --sync ps: the servers hold the optimizer state */
    for (int i = 0; i < w->n_items; i++) {
        const item *it = &w->items[i];
        if (it->part == PART_COMPRESS) {
            pw_compressor_span_state_get(it->z, it->zspan, w->block + it->off);
            continue;
        }
        if (it->part == PART_ZRESID || it->part == PART_ZQ) {
            snap_ztp(w, it);
            continue;
        }
        if (it->gather) {
            PW_CHECK(gather_item(w, it));
            continue;
        }
        /* A split parameter (and its state): each rank's part into its
         * place in the full tensor; the parts tile it exactly. */
        for (int r = 0; r < (it->ranks ? w->T : 1); r++) {
            pw_program *p = it->ranks ? it->ranks[r] : it->prog;
            float *dst = it->ranks ? w->part : w->block + it->off;
            pw_status st = it->part < 0 ? pw_program_param_read(p, it->local, PW_PARAM_DATA, 0, dst)
                                        : pw_program_param_read(p, it->local, PW_PARAM_STATE, it->part, dst);
            if (st != PW_OK) return pw_error_prefix(st, "checkpoint: snapshot of %s: ", it->name);
            if (it->ranks) pw_graph_tp_slice(w->rank_g[r], it->gp, w->block + it->off, w->part, 0);
        }
    }
    w->snapshot_s = now_s() - t0;
    w->pending = 1;
    w->result = PW_OK;
    w->err[0] = '\0';
    atomic_store(&w->finished, 0);
    if (w->cfg.foreground || pthread_create(&w->thread, NULL, writer_main, w) != 0) {
        writer_main(w); /* on this thread: no thread, or asked so */
        return PW_OK;
    }
    w->thread_live = 1;
    return PW_OK;
}

/* MPI: rank 0 merges the processes' notes into the manifest. */
static pw_status merge_manifest(pw_state_writer *w, int64_t *bytes)
{
    json_t *m = manifest_json(w), *files = json_array();
    pw_status st = PW_OK;
    if (!m || !files) {
        st = pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        goto out;
    }
    *bytes = 0;
    for (int r = 0; r < w->t->world_size; r++) { /* world ranks 0 .. S-1 are replica 0's pipeline ranks */
        char p[PATH_MAX_LEN + 64];
        snprintf(p, sizeof p, "%s/shard-%05d.json", w->path, r + 1);
        json_error_t je;
        json_t *note = json_load_file(p, 0, &je);
        json_t *fs = note ? json_object_get(note, "files") : NULL;
        if (!json_is_array(fs)) {
            json_decref(note);
            st = pw_error(PW_ERR_FORMAT, "checkpoint: %s: %s", p, note ? "no \"files\" list" : je.text);
            goto out;
        }
        size_t i;
        json_t *f;
        json_array_foreach(fs, i, f) {
            json_array_append(files, f);
            *bytes += json_integer_value(json_object_get(f, "bytes"));
        }
        json_decref(note);
    }
    json_object_set(m, "files", files);
    json_object_set_new(m, "bytes", json_integer(*bytes));
    char p[PATH_MAX_LEN + 32];
    snprintf(p, sizeof p, "%s/" PW_STATE_MANIFEST, w->path);
    PW_CHECK_GOTO(write_json_atomic(p, m), st, out);
    for (int r = 0; r < w->t->world_size; r++) {
        snprintf(p, sizeof p, "%s/shard-%05d.json", w->path, r + 1);
        unlink(p);
    }
    retain(w->cfg.dir, w->cfg.keep, 0);
out:
    json_decref(m);
    json_decref(files);
    return st;
}

pw_status pw_state_writer_poll(pw_state_writer *w, int wait, pw_state_done *done, int *completed)
{
    *completed = 0;
    if (w && w->stashed) {
        *done = w->stash;
        w->stashed = 0;
        *completed = 1;
        return PW_OK;
    }
    if (!w || !w->pending) return PW_OK;
    int mine = atomic_load(&w->finished);
    if (wait || mine) {
        if (w->thread_live) pthread_join(w->thread, NULL);
        w->thread_live = 0;
        mine = 1;
    }
    /* The writer's results, once it has finished (joined: read after its writes). */
    pw_status st = mine ? w->result : PW_OK;
    int64_t bytes = mine ? w->bytes : 0;
    if (w->t) {
        /* Every process's progress; all finished: rank 0 writes the manifest. */
        typedef struct { int32_t state; int32_t pad; int64_t bytes; char msg[240]; } part;
        part me = {mine ? (st == PW_OK ? 1 : -1) : 0, 0, bytes, ""};
        if (me.state < 0) snprintf(me.msg, sizeof me.msg, "%.200s", w->err);
        part *all = calloc((size_t)w->t->world_size, sizeof *all);
        if (!all) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        pw_status gs = w->t->vt->allgather(w->t->self, &me, sizeof me, all);
        if (gs != PW_OK) {
            free(all);
            return pw_error_prefix(gs, "checkpoint step %lld: ", (long long)w->step);
        }
        int ready = 1, bad = -1;
        bytes = 0;
        for (int r = 0; r < w->t->world_size; r++) {
            if (all[r].state == 0) ready = 0;
            if (all[r].state < 0 && bad < 0) bad = r;
            bytes += all[r].bytes;
        }
        if (bad >= 0) {
            w->pending = 0;
            st = pw_error(PW_ERR_IO, "checkpoint step %lld: MPI rank %d: %s", (long long)w->step, bad, all[bad].msg);
            free(all);
            return st;
        }
        free(all);
        if (!ready) return PW_OK;
        w->pending = 0;
        if (w->t->world_rank == 0) {
            const double t0 = now_s();
            PW_CHECK(merge_manifest(w, &bytes));
            w->write_s += now_s() - t0;
        }
    } else {
        if (!mine) return PW_OK;
        w->pending = 0;
        if (st != PW_OK) return pw_error(st, "%s", w->err);
    }
    *completed = 1;
    memset(done, 0, sizeof *done);
    done->step = w->step;
    snprintf(done->path, sizeof done->path, "%s", w->path);
    done->bytes = bytes;
    done->snapshot_s = w->snapshot_s;
    done->write_s = w->write_s;
    done->stall_s = w->stall_s;
    return PW_OK;
}

/* Reports every checkpoint that became complete (wait: all in flight). */
static pw_status report_completed(pw_state_writer *w, int wait, pw_state_report_fn report, void *arg)
{
    pw_state_done d;
    int completed = 0;
    do {
        PW_CHECK(pw_state_writer_poll(w, wait, &d, &completed));
        if (completed && report) report(&d, arg);
    } while (completed);
    return PW_OK;
}

pw_status pw_state_writer_step(pw_state_writer *w, pw_pipeline *pl, const pw_step_stats *s, int64_t last_step,
                               pw_state_report_fn report, void *arg)
{
    const int64_t every = w->cfg.every;
    const int due = every > 0 ? s->step % every == 0
                    : every < 0 && s->step_in_epoch == pw_pipeline_steps_per_epoch(pl);
    if (due && s->step < last_step) {
        PW_CHECK(pw_state_writer_save(w, pl, s->step));
        w->last_saved = s->step;
    }
    /* At every step boundary: whether the write in flight is complete (MPI: everyone's). */
    return report_completed(w, 0, report, arg);
}

pw_status pw_state_writer_finish(pw_state_writer *w, pw_pipeline *pl, int64_t step, pw_state_report_fn report,
                                 void *arg)
{
    if (step != w->last_saved) PW_CHECK(pw_state_writer_save(w, pl, step));
    w->last_saved = step;
    return report_completed(w, 1, report, arg);
}

void pw_state_writer_destroy(pw_state_writer *w)
{
    if (!w) return;
    if (w->thread_live) pthread_join(w->thread, NULL);
    free_items(w);
    json_decref(w->files);
    free(w->schedule);
    free(w->cuts);
    free(w);
}

/* ---- resuming ---- */

struct pw_state {
    json_t *root;
    char path[PATH_MAX_LEN];
    pw_state_meta meta;
    const char *hash, *graph_name;
    int n_params;
};

static const char *jstr(json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "";
}

static int64_t jint(json_t *o, const char *key) { return json_integer_value(json_object_get(o, key)); }
static double jnum(json_t *o, const char *key) { return json_number_value(json_object_get(o, key)); }

pw_status pw_state_open(const char *path, pw_state **out)
{
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0) return pw_error(PW_ERR_IO, "--resume %s: %s", path, strerror(errno));
    char ckpt[PATH_MAX_LEN];
    if (S_ISREG(sb.st_mode)) {
        pw_safetensors *f = NULL;
        const char *fmt = NULL;
        if (pw_safetensors_open(path, &f) == PW_OK) fmt = pw_safetensors_meta(f, "format");
        int weights = fmt && !strcmp(fmt, PW_CHECKPOINT_FORMAT);
        pw_safetensors_close(f);
        if (weights || strstr(path, ".safetensors"))
            return pw_error(PW_ERR_FORMAT, "--resume %s: a weights-only file (what --save writes: no optimizer "
                            "state, step or data position); resume needs a training-state checkpoint (a "
                            "--checkpoint-dir directory). Use --init-from %s to start from these weights with "
                            "a fresh optimizer at step 1", path, path);
        return pw_error(PW_ERR_FORMAT, "--resume %s: not a checkpoint directory", path);
    }
    if (strlen(path) > PATH_MAX_LEN - 64) return pw_error(PW_ERR_INVALID_ARG, "--resume: path too long");
    if (has_manifest(path)) {
        snprintf(ckpt, sizeof ckpt, "%s", path);
    } else {
        ckpt_entry *v;
        int n = list_checkpoints(path, &v), found = -1;
        for (int i = 0; i < n && found < 0; i++)
            if (v[i].complete) found = i;
        if (found < 0) {
            char inc[256] = "";
            for (int i = 0, k = 0; i < n; i++) {
                if (k < 200) k += snprintf(inc + k, sizeof inc - (size_t)k, "%sstep-%08lld", i ? ", " : "",
                                           (long long)v[i].step);
            }
            free(v);
            return pw_error(PW_ERR_IO, "--resume %s: no complete checkpoint there (a checkpoint is complete "
                            "once its " PW_STATE_MANIFEST " is written)%s%s%s", path, n > 0 ? "; incomplete: " : "",
                            inc, n > 0 ? "" : "; neither a checkpoint nor a --checkpoint-dir");
        }
        ckpt_path(path, v[found].step, ckpt, sizeof ckpt);
        free(v);
    }
    char mpath[PATH_MAX_LEN + 32];
    snprintf(mpath, sizeof mpath, "%s/" PW_STATE_MANIFEST, ckpt);
    return pw_state_open_manifest(mpath, out);
}

pw_status pw_state_open_manifest(const char *mpath, pw_state **out)
{
    *out = NULL;
    char ckpt[PATH_MAX_LEN];
    if (strlen(mpath) >= sizeof ckpt) return pw_error(PW_ERR_INVALID_ARG, "--resume: path too long");
    snprintf(ckpt, sizeof ckpt, "%s", mpath);
    char *slash = strrchr(ckpt, '/');
    if (slash) *slash = '\0';
    else snprintf(ckpt, sizeof ckpt, ".");
    json_error_t je;
    json_t *root = json_load_file(mpath, 0, &je);
    if (!root) return pw_error(PW_ERR_FORMAT, "%s: line %d column %d: %s", mpath, je.line, je.column, je.text);
    if (!json_is_object(root) || strcmp(jstr(root, "format"), PW_STATE_FORMAT) != 0) {
        json_decref(root);
        return pw_error(PW_ERR_FORMAT, "%s: \"format\" is not \"" PW_STATE_FORMAT "\"", mpath);
    }
    json_t *run = json_object_get(root, "run"), *opt = json_object_get(root, "optimizer"),
           *lrs = json_object_get(root, "lr_schedule"), *lay = json_object_get(root, "layout"),
           *gr = json_object_get(root, "graph");
    if (!json_is_object(run) || !json_is_object(opt) || !json_is_object(lrs) || !json_is_object(lay) ||
        !json_is_object(gr) || !json_is_array(json_object_get(root, "files")) || jint(root, "step") < 0) {
        json_decref(root);
        return pw_error(PW_ERR_FORMAT, "%s: missing \"run\", \"optimizer\", \"lr_schedule\", \"layout\", \"graph\" "
                        "or \"files\"", mpath);
    }
    pw_state *s = calloc(1, sizeof *s);
    if (!s) {
        json_decref(root);
        return pw_error(PW_ERR_NOMEM, "--resume: out of memory");
    }
    s->root = root;
    snprintf(s->path, sizeof s->path, "%s", ckpt);
    pw_state_meta *m = &s->meta;
    m->path = s->path;
    m->step = jint(root, "step");
    m->epoch = jint(root, "epoch");
    m->step_in_epoch = jint(root, "step_in_epoch");
    m->version = jstr(root, "pipewright_version");
    m->run.data = jstr(run, "data");
    m->run.train_samples = jint(run, "train_samples");
    m->run.batch = jint(run, "batch");
    m->run.micro_batch = jint(run, "micro_batch");
    m->run.grad_groups = (int)jint(run, "grad_groups");
    m->run.seed = (uint64_t)jint(run, "seed");
    m->run.shuffle = json_is_true(json_object_get(run, "shuffle"));
    m->run.clip_grad_norm = jnum(run, "clip_grad_norm");
    pw_optim_kind kind = PW_OPTIM_SGD;
    if (pw_optim_parse_kind(jstr(opt, "kind"), &kind) != PW_OK) {
        pw_state_close(s);
        return pw_error(PW_ERR_FORMAT, "%s: unknown optimizer '%s'", mpath, jstr(opt, "kind"));
    }
    pw_optim_config *o = &m->run.optim;
    *o = pw_optim_defaults(kind);
    o->lr = (float)jnum(opt, "lr");
    o->momentum = (float)jnum(opt, "momentum");
    o->weight_decay = (float)jnum(opt, "weight_decay");
    o->beta1 = (float)jnum(opt, "beta1");
    o->beta2 = (float)jnum(opt, "beta2");
    o->eps = (float)jnum(opt, "eps");
    pw_lr_schedule_parse(jstr(lrs, "kind"), &o->schedule);
    o->warmup_steps = jint(lrs, "warmup_steps");
    o->decay_steps = jint(lrs, "decay_steps");
    o->min_lr = (float)jnum(lrs, "min_lr");
    m->layout.stages = (int)jint(lay, "stages");
    m->layout.schedule = jstr(lay, "schedule");
    m->layout.chunks_per_rank = (int)jint(lay, "chunks_per_rank");
    m->layout.replicas = (int)jint(lay, "replicas");
    m->layout.micro_batches = (int)jint(lay, "micro_batches");
    m->layout.processes = (int)jint(lay, "processes");
    m->layout.threads = (int)jint(lay, "threads");
    m->layout.tensor_parallel = jint(lay, "tensor_parallel") > 1 ? (int)jint(lay, "tensor_parallel") : 1;
    s->hash = jstr(gr, "hash");
    s->graph_name = jstr(gr, "name");
    s->n_params = (int)jint(gr, "params");
    *out = s;
    return PW_OK;
}

void pw_state_close(pw_state *s)
{
    if (!s) return;
    json_decref(s->root);
    free(s);
}

const pw_state_meta *pw_state_get_meta(const pw_state *s) { return &s->meta; }

/* The file record and tensor of `name` in the manifest, or NULL. */
static json_t *find_tensor(const pw_state *s, const char *name, const char **crc)
{
    size_t i;
    json_t *f;
    json_array_foreach(json_object_get(s->root, "files"), i, f) {
        json_t *c = json_object_get(json_object_get(f, "tensors"), name);
        if (c) {
            if (crc) *crc = json_string_value(c);
            return f;
        }
    }
    return NULL;
}

#define DIFF(cond, ...)                                                                           \
    do {                                                                                          \
        if (cond && k < (int)sizeof msg - 2)                                                      \
            k += snprintf(msg + k, sizeof msg - (size_t)k, "%s", k ? "; " : ""),                  \
                k += snprintf(msg + k, k < (int)sizeof msg ? sizeof msg - (size_t)k : 0, __VA_ARGS__); \
    } while (0)

pw_status pw_state_check(const pw_state *s, const pw_graph *g, const pw_state_run *run)
{
    char msg[2048] = "";
    int k = 0;
    char hash[17];
    pw_state_graph_hash(g, hash);
    if (strcmp(hash, s->hash) != 0 || strcmp(g->name, s->graph_name) != 0) {
        /* Say which parameter, where the manifest's tensor lists tell. */
        const char *first = NULL;
        for (int i = 0; i < g->n_params && !first; i++)
            if (!find_tensor(s, g->params[i].name, NULL)) first = g->params[i].name;
        DIFF(1, "another graph: the checkpoint is of graph '%s' (%d parameters, hash %s), this run's is '%s' (%d "
             "parameters, hash %s)%s%s%s", s->graph_name, s->n_params, s->hash, g->name, g->n_params, hash,
             first ? "; parameter '" : strcmp(hash, s->hash) ? "; a parameter's shape differs" : "",
             first ? first : "", first ? "' is not in the checkpoint" : "");
    }
    const pw_state_run *c = &s->meta.run;
    DIFF(strcmp(c->data, run->data ? run->data : ""), "--data: checkpoint '%s', this run '%s'", c->data, run->data);
    DIFF(c->train_samples != run->train_samples, "training samples: checkpoint %lld, this run %lld",
         (long long)c->train_samples, (long long)run->train_samples);
    DIFF(c->batch != run->batch, "--batch (the global batch): checkpoint %lld, this run %lld", (long long)c->batch,
         (long long)run->batch);
    DIFF(c->micro_batch != run->micro_batch, "micro-batch size (batch / (replicas x micro-batches)): checkpoint "
         "%lld samples, this run %lld", (long long)c->micro_batch, (long long)run->micro_batch);
    DIFF(c->grad_groups != run->grad_groups, "--grad-groups: checkpoint %d, this run %d", c->grad_groups,
         run->grad_groups);
    DIFF(c->seed != run->seed, "--seed: checkpoint %llu, this run %llu", (unsigned long long)c->seed,
         (unsigned long long)run->seed);
    DIFF(c->shuffle != run->shuffle, "--shuffle: checkpoint %s, this run %s", c->shuffle ? "on" : "off",
         run->shuffle ? "on" : "off");
    DIFF((float)c->clip_grad_norm != (float)run->clip_grad_norm, "--clip-grad-norm: checkpoint %g, this run %g",
         c->clip_grad_norm, run->clip_grad_norm);
    const pw_optim_config *a = &c->optim, *b = &run->optim;
    DIFF(a->kind != b->kind, "--optimizer: checkpoint %s, this run %s", pw_optim_name(a->kind), pw_optim_name(b->kind));
    DIFF(a->lr != b->lr, "--lr: checkpoint %g, this run %g", (double)a->lr, (double)b->lr);
    DIFF(a->kind == b->kind && a->momentum != b->momentum, "--momentum: checkpoint %g, this run %g",
         (double)a->momentum, (double)b->momentum);
    DIFF(a->weight_decay != b->weight_decay, "--weight-decay: checkpoint %g, this run %g", (double)a->weight_decay,
         (double)b->weight_decay);
    DIFF(a->kind == b->kind && (a->beta1 != b->beta1 || a->beta2 != b->beta2 || a->eps != b->eps),
         "AdamW betas/eps: checkpoint %g/%g/%g, this run %g/%g/%g", (double)a->beta1, (double)a->beta2,
         (double)a->eps, (double)b->beta1, (double)b->beta2, (double)b->eps);
    DIFF(a->schedule != b->schedule, "--lr-schedule: checkpoint %s, this run %s", pw_lr_schedule_name(a->schedule),
         pw_lr_schedule_name(b->schedule));
    DIFF(a->warmup_steps != b->warmup_steps, "--warmup: checkpoint %lld, this run %lld", (long long)a->warmup_steps,
         (long long)b->warmup_steps);
    DIFF(a->schedule != PW_LR_CONSTANT && a->decay_steps != b->decay_steps,
         "the lr decays over the run's steps: checkpoint %lld, this run %lld (give the same --steps/--epochs)",
         (long long)a->decay_steps, (long long)b->decay_steps);
    DIFF(a->schedule != PW_LR_CONSTANT && a->min_lr != b->min_lr, "--min-lr: checkpoint %g, this run %g",
         (double)a->min_lr, (double)b->min_lr);
    if (k == 0) return PW_OK;
    return pw_error(PW_ERR_FORMAT, "--resume %s: cannot continue this run bit-identically: %s", s->path, msg);
}

/* One file of the checkpoint, read and checked against the manifest. */
typedef struct open_file {
    json_t *rec;
    pw_safetensors *st;
} open_file;

static pw_status check_file(const pw_state *s, json_t *rec, pw_safetensors **out)
{
    *out = NULL;
    const char *name = jstr(rec, "name");
    if (!name[0] || strchr(name, '/') || !strcmp(name, "..") || strlen(name) > 255)
        return pw_error(PW_ERR_FORMAT, "%s/" PW_STATE_MANIFEST ": file name '%.80s' is not a plain name in the "
                        "checkpoint directory", s->path, name);
    char path[PATH_MAX_LEN + 300];
    snprintf(path, sizeof path, "%s/%s", s->path, jstr(rec, "name"));
    unsigned char *b = NULL;
    size_t len = 0;
    PW_CHECK(read_file(path, &b, &len));
    const int64_t want = jint(rec, "bytes");
    char crc[16];
    snprintf(crc, sizeof crc, "%08" PRIx32, crc_of(b, len));
    free(b);
    if ((int64_t)len != want) {
        /* The reader names the first tensor that is cut off. */
        pw_safetensors *f = NULL;
        const char *why = pw_safetensors_open(path, &f) != PW_OK ? pw_last_error() : "";
        char reason[600];
        snprintf(reason, sizeof reason, "%s", why);
        pw_safetensors_close(f);
        return pw_error(PW_ERR_FORMAT, "%s: truncated or grown: %zu bytes, the manifest says %lld%s%s%s", path, len,
                        (long long)want, reason[0] ? " (" : "", reason[0] ? reason : "", reason[0] ? ")" : "");
    }
    pw_safetensors *f = NULL;
    pw_status st = pw_safetensors_open(path, &f);
    if (st != PW_OK) return st;
    if (strcmp(crc, jstr(rec, "crc32")) != 0) {
        /* Which tensor: the one whose bytes no longer match their CRC. */
        const char *bad = NULL;
        const char *tname;
        json_t *c;
        json_object_foreach(json_object_get(rec, "tensors"), tname, c) {
            pw_st_tensor t;
            if (pw_safetensors_get(f, tname, &t) != PW_OK) {
                bad = tname;
                break;
            }
            char tc[16];
            snprintf(tc, sizeof tc, "%08" PRIx32, crc_of(t.data, t.nbytes));
            if (strcmp(tc, json_string_value(c) ? json_string_value(c) : "")) {
                bad = tname;
                break;
            }
        }
        st = bad ? pw_error(PW_ERR_FORMAT, "%s: corrupt: tensor '%s' does not match its CRC-32 in the manifest "
                            "(file CRC-32 %s, the manifest says %s)", path, bad, crc, jstr(rec, "crc32"))
                 : pw_error(PW_ERR_FORMAT, "%s: corrupt: CRC-32 %s, the manifest says %s (the header differs)", path,
                            crc, jstr(rec, "crc32"));
        pw_safetensors_close(f);
        return st;
    }
    *out = f;
    return PW_OK;
}

pw_status pw_state_restore(const pw_state *s, pw_pipeline *pl, int replicas)
{
    /* Tensor parallelism: this process's TL rank programs, ranks tp0 on
     * (one process: all T; MPI: its own, each process reading its slices). */
    const int C = pw_pipeline_n_chunks(pl), T = pl->T, TL = pl->TL, tp0 = pl->tp0;
    pw_status st = PW_OK;
    json_t *files = json_object_get(s->root, "files");
    const size_t nf = json_array_size(files);
    open_file *of = calloc(nf + 1, sizeof *of);
    float *part = NULL; /* tensor parallelism: a rank's part of a split tensor */
    size_t part_floats = 0;
    if (!of) return pw_error(PW_ERR_NOMEM, "--resume: out of memory");
    const pw_optim_kind kind = s->meta.run.optim.kind;
    const int sf = pw_optim_state_floats(kind);
    /* Pass 1: every tensor this process needs, found and checked. At T > 1
     * every rank's programs take the full tensors of the file (the names
     * and shapes of T = 1, whatever T wrote them), each its own part of a
     * split one (docs/parallelism.md, "Checkpoints"). */
    for (int pass = 0; pass < 2 && st == PW_OK; pass++)
        for (int rep = 0; rep < replicas && st == PW_OK; rep++)
            for (int c = 0; c < C && st == PW_OK; c++)
                for (int r = 0; r < TL && st == PW_OK; r++) {
                    pw_program *progs[MAX_PIECES];
                    int np;
                    if (T > 1) { /* one piece per chunk: rank r's program of it */
                        np = lrep_of(pl, rep) >= 0 && stage_here(pl, c) ? 1 : 0;
                        if (np) progs[0] = stage_at(pl, lrep_of(pl, rep), c)->rank_prog[r];
                    } else {
                        np = pw_pipeline_programs(pl, rep, c, progs, MAX_PIECES);
                    }
                    for (int j = 0; j < np && j < MAX_PIECES && st == PW_OK; j++)
                        for (int i = 0; i < pw_program_n_params(progs[j]) && st == PW_OK; i++) {
                            pw_program_param pp;
                            pw_program_param_at(progs[j], i, &pp);
                            const pw_graph *rg = T > 1 ? pl->rank_g[tp0 + r] : NULL;
                            const int split = rg && rg->params[pp.graph_param].tp_full > 0;
                            const pw_shape full = split ? pl->g->params[pp.graph_param].shape : pp.shape;
                            if (split && (size_t)pp.numel > part_floats) {
                                float *np2 = realloc(part, (size_t)pp.numel * sizeof *np2);
                                if (!np2) {
                                    st = pw_error(PW_ERR_NOMEM, "--resume: out of memory");
                                    break;
                                }
                                part = np2;
                                part_floats = (size_t)pp.numel;
                            }
                            for (int k = -1; k < sf && st == PW_OK; k++) {
                                char name[512];
                                if (k < 0) snprintf(name, sizeof name, "%s", pp.name);
                                else snprintf(name, sizeof name, "%s.%s", pp.name, state_suffix(kind, k));
                                json_t *rec = find_tensor(s, name, NULL);
                                if (!rec) {
                                    st = pw_error(PW_ERR_FORMAT, "%s: the manifest lists no tensor '%s' in any file",
                                                  s->path, name);
                                    break;
                                }
                                size_t fi = 0;
                                while (fi < nf && json_array_get(files, fi) != rec) fi++;
                                if (!of[fi].st) {
                                    of[fi].rec = rec;
                                    PW_CHECK_GOTO(check_file(s, rec, &of[fi].st), st, out);
                                }
                                pw_st_tensor t;
                                PW_CHECK_GOTO(pw_safetensors_get_as(of[fi].st, name, PW_F32, &full, &t), st, out);
                                if (pass == 0) continue;
                                const float *src = t.data;
                                if (split) { /* this rank's slice of the full tensor */
                                    pw_graph_tp_slice(rg, pp.graph_param, (float *)t.data, part, 1);
                                    src = part;
                                }
                                st = k < 0 ? pw_program_param_write(progs[j], i, PW_PARAM_DATA, src)
                                           : pw_program_param_write_state(progs[j], i, k, src);
                            }
                        }
                }
    if (st == PW_OK) pw_pipeline_seek(pl, s->meta.step);
out:
    for (size_t i = 0; i < nf; i++) pw_safetensors_close(of[i].st);
    free(of);
    free(part);
    return st;
}

/* The compress tensor `name` of the checkpoint, checked against `shape`
 * (its file opened once, of[]); *why set (PW_OK) when the checkpoint has
 * none of that name. */
static pw_status zfetch(const pw_state *s, open_file *of, size_t nf, const char *name, const pw_shape *shape,
                        pw_st_tensor *t, char *why, size_t why_n)
{
    json_t *files = json_object_get(s->root, "files");
    json_t *rec = find_tensor(s, name, NULL);
    if (!rec) {
        snprintf(why, why_n, "the checkpoint has no '%s'", name);
        return PW_OK;
    }
    size_t fi = 0;
    while (fi < nf && json_array_get(files, fi) != rec) fi++;
    if (!of[fi].st) {
        of[fi].rec = rec;
        PW_CHECK(check_file(s, rec, &of[fi].st));
    }
    return pw_safetensors_get_as(of[fi].st, name, PW_F32, shape, t);
}

/* One span's state at T > 1, or PowerSGD's at another T than the
 * checkpoint's (Tc): its slice of the use's residual (ztp_name's at
 * Tc > 1; at Tc = 1 the first floats of the T = 1 tensor, residual then Q),
 * and PowerSGD's Q of this rank at the same T, else the compressor's own
 * (the seed's: a resumed run's compressors are new). Pass 0 checks, 1
 * copies. */
static pw_status zrestore_tp(const pw_state *s, open_file *of, size_t nf, pw_pipeline *pl, const pl_zstate *z,
                             int Tc, int pass, float *tmp, char *why, size_t why_n)
{
    const int psgd = pl->cfg.compress.kind == PW_COMPRESS_POWERSGD, qfresh = psgd && Tc != pl->T;
    const int64_t full = zresid_floats(pl->g, z);
    char name[512];
    pw_st_tensor t;
    /* the residual: a T = 1 PowerSGD tensor is longer (its Q follows) */
    if (Tc > 1) ztp_name(pl->g, z, psgd, 0, Tc, name, sizeof name);
    else pl_zstate_name(pl->g, z, name, sizeof name);
    const pw_shape shape = {.ndim = 1, .d = {full}};
    PW_CHECK(zfetch(s, of, nf, name, psgd && Tc == 1 ? NULL : &shape, &t, why, why_n));
    if (why[0]) return PW_OK;
    if (t.nbytes < (size_t)full * sizeof(float))
        return pw_error(PW_ERR_FORMAT, "%s: '%s' has %zu floats, fewer than the %lld of its residual", s->path, name,
                        t.nbytes / sizeof(float), (long long)full);
    if (pass == 1) {
        if (qfresh) pw_compressor_span_state_get(z->z, z->span, tmp); /* the seed's Q */
        if (z->split) pw_graph_tp_slice(pl->rank_g[z->tp_rank], z->gp, (float *)t.data, tmp, 1);
        else memcpy(tmp, t.data, (size_t)z->numel * sizeof *tmp);
    }
    if (psgd && !qfresh) { /* this rank's Q */
        ztp_name(pl->g, z, psgd, 1, pl->T, name, sizeof name);
        const pw_shape qs = {.ndim = 1, .d = {z->floats - z->numel}};
        PW_CHECK(zfetch(s, of, nf, name, &qs, &t, why, why_n));
        if (why[0]) return PW_OK;
        if (pass == 1) memcpy(tmp + z->numel, t.data, (size_t)qs.d[0] * sizeof *tmp);
    }
    if (pass == 1) pw_compressor_span_state_set(z->z, z->span, tmp);
    return PW_OK;
}

pw_status pw_state_restore_compress(const pw_state *s, pw_pipeline *pl, char *why, size_t why_n)
{
    why[0] = '\0';
    pl_zstate *zs = NULL;
    int nz = 0;
    const char *zwhy = NULL;
    PW_CHECK(pl_compress_states(pl, &zs, &nz, &zwhy));
    if (zwhy) {
        snprintf(why, why_n, "%s", zwhy);
        return PW_OK;
    }
    if (nz == 0) return PW_OK;
    char mode[48], reps[16];
    pw_compress_name(&pl->cfg.compress, mode, sizeof mode);
    snprintf(reps, sizeof reps, "%d", pl->NR);
    json_t *files = json_object_get(s->root, "files");
    const size_t nf = json_array_size(files);
    open_file *of = calloc(nf + 1, sizeof *of);
    if (!of) {
        free(zs);
        return pw_error(PW_ERR_NOMEM, "--resume: out of memory");
    }
    pw_status st = PW_OK;
    float *tmp = NULL; /* T > 1: one span's state */
    /* The mode and replica count the state was written with (every
     * compress file says them; the first one found is asked). */
    int any = 0;
    for (size_t fi = 0; fi < nf && st == PW_OK && !any; fi++) {
        json_t *rec = json_array_get(files, fi);
        if (strcmp(jstr(rec, "kind"), "compress") != 0) continue;
        any = 1;
        PW_CHECK_GOTO(check_file(s, rec, &of[fi].st), st, out);
        of[fi].rec = rec;
        const char *m = pw_safetensors_meta(of[fi].st, "compress"), *r = pw_safetensors_meta(of[fi].st, "replicas");
        if (!m || !r || strcmp(m, mode) || strcmp(r, reps))
            snprintf(why, why_n, "the checkpoint's state is of --compress %s on %s replicas, this run's %s on %s",
                     m ? m : "?", r ? r : "?", mode, reps);
    }
    if (!any) snprintf(why, why_n, "the checkpoint holds none (it was written without it)");
    /* PowerSGD's Q is per tensor rank, a matrix of its part's columns: only
     * the T that wrote it takes it; at another T the residuals (per
     * element, the full tensor's whatever T, as top-k's: docs/checkpoints.md)
     * are restored and Q stays the seed's. */
    const int T = pl->T, Tc = s->meta.layout.tensor_parallel > 1 ? s->meta.layout.tensor_parallel : 1;
    const int psgd = pl->cfg.compress.kind == PW_COMPRESS_POWERSGD, qfresh = psgd && Tc != T;
    if (T > 1 || qfresh) {
        int64_t most = 1;
        for (int i = 0; i < nz; i++)
            if (zs[i].floats > most) most = zs[i].floats;
        if (!(tmp = malloc((size_t)most * sizeof *tmp))) {
            st = pw_error(PW_ERR_NOMEM, "--resume: out of memory");
            goto out;
        }
    }
    /* Pass 0: every tensor found and checked; pass 1: copied. At T > 1
     * each rank's span takes its slice of the use's residual, and with
     * PowerSGD its own Q (zrestore_tp). */
    for (int pass = 0; pass < 2 && st == PW_OK && !why[0]; pass++)
        for (int i = 0; i < nz && st == PW_OK && !why[0]; i++) {
            char name[512];
            if (T > 1 || qfresh) {
                st = zrestore_tp(s, of, nf, pl, &zs[i], Tc, pass, tmp, why, why_n);
                continue;
            }
            pl_zstate_name(pl->g, &zs[i], name, sizeof name);
            json_t *rec = find_tensor(s, name, NULL);
            if (!rec) {
                snprintf(why, why_n, "the checkpoint has no '%s'", name);
                break;
            }
            size_t fi = 0;
            while (fi < nf && json_array_get(files, fi) != rec) fi++;
            if (!of[fi].st) {
                of[fi].rec = rec;
                PW_CHECK_GOTO(check_file(s, rec, &of[fi].st), st, out);
            }
            const pw_shape shape = {.ndim = 1, .d = {zs[i].floats}};
            pw_st_tensor t;
            PW_CHECK_GOTO(pw_safetensors_get_as(of[fi].st, name, PW_F32, &shape, &t), st, out);
            if (pass == 1) pw_compressor_span_state_set(zs[i].z, zs[i].span, t.data);
        }
    if (st == PW_OK && !why[0] && qfresh)
        PW_WARN("--resume with --compress %s: PowerSGD's Q is per tensor rank, and the checkpoint's is of "
                "--tensor-parallel %d, this run's %d: the residuals are restored, Q starts again from the seed",
                mode, Tc, T);
out:
    for (size_t i = 0; i < nf; i++) pw_safetensors_close(of[i].st);
    free(of);
    free(tmp);
    free(zs);
    return st;
}
