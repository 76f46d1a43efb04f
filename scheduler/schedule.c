/* pipewright — schedule IR: storage, generators (GPipe, 1F1B), lowering,
 * names and closed-form theory. The validator lives in validate.c, the CSV
 * form in schedule_csv.c, the ASCII timeline in schedule_print.c. */
#include "scheduler/schedule.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "scheduler/schedule-internal.h"

/* ---------------------------------------------------------------- names */

static const char *const action_names[PW_ACT_COUNT] = {
    [PW_ACT_F] = "F",           [PW_ACT_B] = "B",
    [PW_ACT_W] = "W",           [PW_ACT_SEND_F] = "SEND_F",
    [PW_ACT_RECV_F] = "RECV_F", [PW_ACT_SEND_B] = "SEND_B",
    [PW_ACT_RECV_B] = "RECV_B", [PW_ACT_ALLREDUCE] = "ALLREDUCE",
    [PW_ACT_OPTIM] = "OPTIM",
};

/* CSV spelling of each kind between the chunk and the index. */
static const char *const action_cells[PW_ACT_COUNT] = {
    [PW_ACT_F] = "F",       [PW_ACT_B] = "B",       [PW_ACT_W] = "W",
    [PW_ACT_SEND_F] = "SF", [PW_ACT_RECV_F] = "RF", [PW_ACT_SEND_B] = "SB",
    [PW_ACT_RECV_B] = "RB", [PW_ACT_ALLREDUCE] = "AR", [PW_ACT_OPTIM] = "OPT",
};

static const char *const schedule_names[PW_SCHEDULE_KIND_COUNT] = {
    [PW_SCHEDULE_CUSTOM] = "custom",
    [PW_SCHEDULE_GPIPE] = "gpipe",
    [PW_SCHEDULE_1F1B] = "1f1b",
};

const char *pw_action_kind_name(pw_action_kind k)
{
    if ((unsigned)k >= PW_ACT_COUNT) return "?";
    return action_names[k];
}

const char *pw_schedule_kind_name(pw_schedule_kind k)
{
    if ((unsigned)k >= PW_SCHEDULE_KIND_COUNT) return "?";
    return schedule_names[k];
}

pw_status pw_schedule_kind_parse(const char *name, pw_schedule_kind *out)
{
    if (!name || !out) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_kind_parse: NULL argument");
    for (int k = 0; k < PW_SCHEDULE_KIND_COUNT; k++) {
        if (strcasecmp(name, schedule_names[k]) == 0) {
            *out = (pw_schedule_kind)k;
            return PW_OK;
        }
    }
    if (strcasecmp(name, "pipedream-flush") == 0) {
        *out = PW_SCHEDULE_1F1B;
        return PW_OK;
    }
    return pw_error(PW_ERR_INVALID_ARG, "unknown schedule '%s' (expected gpipe, 1f1b or custom)",
                    name);
}

int pw_action_format(const pw_action *a, int one_chunk_per_rank, char *buf, size_t n)
{
    if ((unsigned)a->kind >= PW_ACT_COUNT) return snprintf(buf, n, "?%d", (int)a->kind);
    if (a->kind == PW_ACT_OPTIM) return snprintf(buf, n, "OPT");
    if (a->kind == PW_ACT_ALLREDUCE && one_chunk_per_rank)
        return snprintf(buf, n, "AR%d", (int)a->mb);
    return snprintf(buf, n, "%d%s%d", (int)a->chunk, action_cells[a->kind], (int)a->mb);
}

/* -------------------------------------------------------------- storage */

pw_status pw_sched_check_shape(const pw_schedule *s)
{
    if (s->n_ranks < 1 || s->n_ranks > PW_SCHED_MAX_RANKS)
        return pw_error(PW_ERR_INVALID_ARG, "schedule: n_ranks must be in 1..%d (got %d)",
                        PW_SCHED_MAX_RANKS, s->n_ranks);
    if (s->chunks_per_rank < 1 || s->chunks_per_rank > PW_SCHED_MAX_CHUNKS_PER_RANK)
        return pw_error(PW_ERR_INVALID_ARG, "schedule: chunks_per_rank must be in 1..%d (got %d)",
                        PW_SCHED_MAX_CHUNKS_PER_RANK, s->chunks_per_rank);
    if ((int64_t)s->n_ranks * s->chunks_per_rank > INT_MAX / 2 ||
        s->n_chunks != s->n_ranks * s->chunks_per_rank)
        return pw_error(PW_ERR_INVALID_ARG,
                        "schedule: n_chunks (%d) must be n_ranks (%d) x chunks_per_rank (%d)",
                        s->n_chunks, s->n_ranks, s->chunks_per_rank);
    if (s->n_micro < 1 || s->n_micro > PW_SCHED_MAX_MICRO)
        return pw_error(PW_ERR_INVALID_ARG, "schedule: n_micro must be in 1..%d (got %d)",
                        PW_SCHED_MAX_MICRO, s->n_micro);
    if (s->split_w != 0 && s->split_w != 1)
        return pw_error(PW_ERR_INVALID_ARG, "schedule: split_w must be 0 or 1 (got %d)", s->split_w);
    if (s->n_buckets < 0 || s->n_buckets > PW_SCHED_MAX_BUCKETS)
        return pw_error(PW_ERR_INVALID_ARG, "schedule: n_buckets must be in 0..%d (got %d)",
                        PW_SCHED_MAX_BUCKETS, s->n_buckets);
    if ((unsigned)s->kind >= PW_SCHEDULE_KIND_COUNT)
        return pw_error(PW_ERR_INVALID_ARG, "schedule: unknown kind %d", (int)s->kind);
    return PW_OK;
}

pw_status pw_sched_alloc(const pw_schedule *shape, const int64_t *counts, pw_schedule **out)
{
    *out = NULL;
    PW_CHECK(pw_sched_check_shape(shape));
    /* Plan: the rank table, then every action, in one block. */
    int64_t total = 0;
    for (int r = 0; r < shape->n_ranks; r++) {
        if (counts[r] < 0 || counts[r] > INT_MAX)
            return pw_error(PW_ERR_INVALID_ARG, "schedule: rank %d would hold %lld actions (max %d)",
                            r, (long long)counts[r], INT_MAX);
        total += counts[r];
    }
    size_t head = (size_t)shape->n_ranks * sizeof(pw_rank_program);
    if ((uint64_t)total > (SIZE_MAX - head) / sizeof(pw_action))
        return pw_error(PW_ERR_NOMEM, "schedule: %lld actions do not fit in memory",
                        (long long)total);
    pw_schedule *s = malloc(sizeof *s);
    void *block = malloc(head + (size_t)total * sizeof(pw_action));
    if (!s || !block) {
        free(s);
        free(block);
        return pw_error(PW_ERR_NOMEM, "schedule: cannot allocate %lld actions", (long long)total);
    }
    *s = *shape;
    s->storage = block;
    s->ranks = block;
    pw_action *next = (pw_action *)((char *)block + head);
    for (int r = 0; r < s->n_ranks; r++) {
        s->ranks[r].n_actions = (int)counts[r];
        s->ranks[r].actions = next;
        next += counts[r];
    }
    *out = s;
    return PW_OK;
}

void pw_schedule_destroy(pw_schedule *s)
{
    if (!s) return;
    free(s->storage);
    free(s);
}

int pw_schedule_equal(const pw_schedule *a, const pw_schedule *b)
{
    if (!a || !b) return a == b;
    if (a->kind != b->kind || a->n_ranks != b->n_ranks ||
        a->chunks_per_rank != b->chunks_per_rank || a->n_chunks != b->n_chunks ||
        a->n_micro != b->n_micro || a->split_w != b->split_w ||
        a->n_buckets != b->n_buckets || a->lowered != b->lowered)
        return 0;
    for (int r = 0; r < a->n_ranks; r++) {
        const pw_rank_program *pa = &a->ranks[r], *pb = &b->ranks[r];
        if (pa->n_actions != pb->n_actions) return 0;
        for (int i = 0; i < pa->n_actions; i++) {
            const pw_action *x = &pa->actions[i], *y = &pb->actions[i];
            if (x->kind != y->kind || x->chunk != y->chunk || x->mb != y->mb) return 0;
        }
    }
    return 1;
}

/* ------------------------------------------------------ action checks */

int pw_sched_action_ok(const pw_schedule *s, int rank, const pw_action *a, char *why, size_t n)
{
    if ((unsigned)a->kind >= PW_ACT_COUNT) {
        snprintf(why, n, "unknown action kind %d", (int)a->kind);
        return -1;
    }
    if (a->kind == PW_ACT_OPTIM) {
        if (a->chunk != -1 || a->mb != -1) {
            snprintf(why, n, "OPTIM takes no chunk or micro-batch (got chunk %d, mb %d)",
                     (int)a->chunk, (int)a->mb);
            return -1;
        }
        return 0;
    }
    if (a->chunk < 0 || a->chunk >= s->n_chunks) {
        snprintf(why, n, "chunk %d does not exist (the schedule has chunks 0..%d)", (int)a->chunk,
                 s->n_chunks - 1);
        return -1;
    }
    if (pw_sched_rank_of(s, a->chunk) != rank) {
        snprintf(why, n, "chunk %d runs on rank %d, not on rank %d", (int)a->chunk,
                 pw_sched_rank_of(s, a->chunk), rank);
        return -1;
    }
    if (a->kind == PW_ACT_ALLREDUCE) {
        if (a->mb < 0 || a->mb >= s->n_buckets) {
            if (s->n_buckets == 0)
                snprintf(why, n, "all-reduce bucket %d, but the schedule has no buckets", (int)a->mb);
            else
                snprintf(why, n, "all-reduce bucket %d does not exist (buckets 0..%d)", (int)a->mb,
                         s->n_buckets - 1);
            return -1;
        }
        return 0;
    }
    if (a->mb < 0 || a->mb >= s->n_micro) {
        snprintf(why, n, "micro-batch %d does not exist (micro-batches 0..%d)", (int)a->mb,
                 s->n_micro - 1);
        return -1;
    }
    return 0;
}

void pw_sched_describe(const pw_schedule *s, int rank, const pw_action *a, char *buf, size_t n)
{
    if ((unsigned)a->kind >= PW_ACT_COUNT) {
        snprintf(buf, n, "kind %d chunk %d mb %d", (int)a->kind, (int)a->chunk, (int)a->mb);
        return;
    }
    if (a->kind == PW_ACT_OPTIM) {
        snprintf(buf, n, "OPTIM");
        return;
    }
    const char *name = action_names[a->kind];
    char chunk[32] = "";
    if (s->chunks_per_rank != 1 || a->chunk != rank) snprintf(chunk, sizeof chunk, " chunk %d", (int)a->chunk);
    if (a->kind == PW_ACT_ALLREDUCE) {
        snprintf(buf, n, "%s%s bucket %d", name, chunk, (int)a->mb);
        return;
    }
    /* The peer of a send/receive, when the chunk has one. */
    int peer_chunk = -1;
    const char *dir = NULL;
    switch (a->kind) {
    case PW_ACT_SEND_F: peer_chunk = a->chunk + 1; dir = "to"; break;
    case PW_ACT_RECV_F: peer_chunk = a->chunk - 1; dir = "from"; break;
    case PW_ACT_SEND_B: peer_chunk = a->chunk - 1; dir = "to"; break;
    case PW_ACT_RECV_B: peer_chunk = a->chunk + 1; dir = "from"; break;
    default: break;
    }
    if (dir && peer_chunk >= 0 && peer_chunk < s->n_chunks && a->chunk >= 0)
        snprintf(buf, n, "%s%s mb %d %s rank %d", name, chunk, (int)a->mb, dir,
                 pw_sched_rank_of(s, peer_chunk));
    else if (dir)
        snprintf(buf, n, "%s%s mb %d %s no rank", name, chunk, (int)a->mb, dir);
    else
        snprintf(buf, n, "%s%s mb %d", name, chunk, (int)a->mb);
}

/* ------------------------------------------------------------ generators */

static pw_status check_config(const pw_schedule_config *cfg)
{
    if (cfg->kind != PW_SCHEDULE_GPIPE && cfg->kind != PW_SCHEDULE_1F1B)
        return pw_error(PW_ERR_INVALID_ARG,
                        "schedule config: kind must be gpipe or 1f1b (got %s)",
                        pw_schedule_kind_name(cfg->kind));
    if (cfg->n_stages < 1 || cfg->n_stages > PW_SCHED_MAX_RANKS)
        return pw_error(PW_ERR_INVALID_ARG, "schedule config: n_stages must be in 1..%d (got %d)",
                        PW_SCHED_MAX_RANKS, cfg->n_stages);
    if (cfg->n_micro < 1 || cfg->n_micro > PW_SCHED_MAX_MICRO)
        return pw_error(PW_ERR_INVALID_ARG, "schedule config: n_micro must be in 1..%d (got %d)",
                        PW_SCHED_MAX_MICRO, cfg->n_micro);
    if (cfg->split_w != 0 && cfg->split_w != 1)
        return pw_error(PW_ERR_INVALID_ARG, "schedule config: split_w must be 0 or 1 (got %d)",
                        cfg->split_w);
    if (cfg->n_buckets < 0 || cfg->n_buckets > PW_SCHED_MAX_BUCKETS)
        return pw_error(PW_ERR_INVALID_ARG, "schedule config: n_buckets must be in 0..%d (got %d)",
                        PW_SCHED_MAX_BUCKETS, cfg->n_buckets);
    return PW_OK;
}

static inline pw_action act(pw_action_kind k, int chunk, int mb)
{
    return (pw_action){.kind = k, .chunk = chunk, .mb = mb};
}

/* Emits the backward of micro-batch `mb`: B, and W right after it when split
 * (the plain, non-zero-bubble placement). */
static pw_action *emit_backward(pw_action *p, int chunk, int mb, int split_w)
{
    *p++ = act(PW_ACT_B, chunk, mb);
    if (split_w) *p++ = act(PW_ACT_W, chunk, mb);
    return p;
}

pw_status pw_schedule_generate(const pw_schedule_config *cfg, pw_schedule **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_generate: out is NULL");
    *out = NULL;
    if (!cfg) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_generate: cfg is NULL");
    PW_CHECK(check_config(cfg));

    const int S = cfg->n_stages, M = cfg->n_micro;
    pw_schedule shape = {
        .kind = cfg->kind, .n_ranks = S, .chunks_per_rank = 1, .n_chunks = S,
        .n_micro = M, .split_w = cfg->split_w, .n_buckets = cfg->n_buckets,
    };
    /* Every rank runs the same multiset of actions; only the order differs. */
    int64_t per_rank = (int64_t)M * (2 + cfg->split_w) + cfg->n_buckets + 1;
    int64_t *counts = calloc((size_t)S, sizeof *counts);
    if (!counts) return pw_error(PW_ERR_NOMEM, "schedule: cannot allocate %d rank counts", S);
    for (int r = 0; r < S; r++) counts[r] = per_rank;
    pw_schedule *s = NULL;
    pw_status st = pw_sched_alloc(&shape, counts, &s);
    free(counts);
    if (st != PW_OK) return st;

    for (int r = 0; r < S; r++) {
        pw_action *p = s->ranks[r].actions;
        if (cfg->kind == PW_SCHEDULE_GPIPE) {
            for (int m = 0; m < M; m++) *p++ = act(PW_ACT_F, r, m);
            for (int m = 0; m < M; m++) p = emit_backward(p, r, m, cfg->split_w);
        } else {
            /* PipeDream-Flush: rank r runs `warm` forwards ahead, so that the
             * first backward reaches it just as its next forward would; then
             * alternates F(warm+i), B(i); then drains the remaining B. Peak
             * in-flight: warm + 1 = min(S - r, M). */
            int warm = S - r - 1 < M ? S - r - 1 : M;
            for (int m = 0; m < warm; m++) *p++ = act(PW_ACT_F, r, m);
            for (int i = 0; i < M - warm; i++) {
                *p++ = act(PW_ACT_F, r, warm + i);
                p = emit_backward(p, r, i, cfg->split_w);
            }
            for (int m = M - warm; m < M; m++) p = emit_backward(p, r, m, cfg->split_w);
        }
        for (int b = 0; b < cfg->n_buckets; b++) *p++ = act(PW_ACT_ALLREDUCE, r, b);
        *p++ = act(PW_ACT_OPTIM, -1, -1);
        PW_ASSERT(p == s->ranks[r].actions + s->ranks[r].n_actions);
    }
    *out = s;
    return PW_OK;
}

/* -------------------------------------------------------------- lowering */

static int is_comm(pw_action_kind k)
{
    return k == PW_ACT_SEND_F || k == PW_ACT_RECV_F || k == PW_ACT_SEND_B || k == PW_ACT_RECV_B;
}

/* Whether chunk c's neighbour c+dir exists and runs on another rank. */
static inline int remote(const pw_schedule *s, int c, int dir)
{
    int n = c + dir;
    return n >= 0 && n < s->n_chunks && pw_sched_rank_of(s, n) != pw_sched_rank_of(s, c);
}

pw_status pw_schedule_lower(pw_schedule *s)
{
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_lower: schedule is NULL");
    PW_CHECK(pw_sched_check_shape(s));

    /* Pass 1: check every action and count the lowered length of each rank. */
    int64_t *counts = malloc((size_t)s->n_ranks * sizeof *counts);
    if (!counts) return pw_error(PW_ERR_NOMEM, "lowering: cannot allocate %d rank counts", s->n_ranks);
    int has_comm = 0;
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        int64_t n = p->n_actions;
        for (int i = 0; i < p->n_actions; i++) {
            const pw_action *a = &p->actions[i];
            char why[160];
            if (!pw_sched_action_valid(s, r, a) && pw_sched_action_ok(s, r, a, why, sizeof why) != 0) {
                char desc[96];
                pw_sched_describe(s, r, a, desc, sizeof desc);
                free(counts);
                return pw_error(PW_ERR_SCHEDULE, "lowering: rank %d, position %d (%s): %s", r, i,
                                desc, why);
            }
            if (is_comm(a->kind)) has_comm = 1;
            if (a->kind == PW_ACT_F || a->kind == PW_ACT_B)
                n += remote(s, a->chunk, -1) + remote(s, a->chunk, +1);
        }
        counts[r] = n;
    }
    if (has_comm) {
        /* Hand-lowered (or already lowered): the author's placement stands. */
        free(counts);
        s->lowered = 1;
        return PW_OK;
    }

    /* Pass 2: copy into a fresh block with the messages placed tight around
     * their compute: a receive right before its consumer (nothing is held
     * earlier than needed), a send right after its producer (the peer is
     * unblocked as early as possible). */
    pw_schedule *n = NULL;
    pw_status st = pw_sched_alloc(s, counts, &n);
    free(counts);
    if (st != PW_OK) return st;
    for (int r = 0; r < s->n_ranks; r++) {
        const pw_rank_program *p = &s->ranks[r];
        pw_action *q = n->ranks[r].actions;
        for (int i = 0; i < p->n_actions; i++) {
            const pw_action a = p->actions[i];
            if (a.kind == PW_ACT_F) {
                if (remote(s, a.chunk, -1)) *q++ = act(PW_ACT_RECV_F, a.chunk, a.mb);
                *q++ = a;
                if (remote(s, a.chunk, +1)) *q++ = act(PW_ACT_SEND_F, a.chunk, a.mb);
            } else if (a.kind == PW_ACT_B) {
                if (remote(s, a.chunk, +1)) *q++ = act(PW_ACT_RECV_B, a.chunk, a.mb);
                *q++ = a;
                if (remote(s, a.chunk, -1)) *q++ = act(PW_ACT_SEND_B, a.chunk, a.mb);
            } else {
                *q++ = a;
            }
        }
        PW_ASSERT(q == n->ranks[r].actions + n->ranks[r].n_actions);
    }
    /* Swap the new storage in; s keeps its identity for the caller. */
    free(s->storage);
    s->storage = n->storage;
    s->ranks = n->ranks;
    s->lowered = 1;
    free(n);
    return PW_OK;
}

/* ----------------------------------------------------------------- theory */

double pw_schedule_theoretical_bubble(pw_schedule_kind kind, int n_stages, int n_micro)
{
    if ((kind != PW_SCHEDULE_GPIPE && kind != PW_SCHEDULE_1F1B) || n_stages < 1 || n_micro < 1)
        return -1.0;
    /* Fill and drain each cost (p-1) slots of F and of B on every stage,
     * against m slots of useful work: (p-1)/(m+p-1) of the step is idle. */
    return (double)(n_stages - 1) / (double)(n_micro + n_stages - 1);
}

int pw_schedule_theoretical_peak(pw_schedule_kind kind, int n_stages, int n_micro, int stage)
{
    if (n_stages < 1 || n_micro < 1 || stage < 0 || stage >= n_stages) return -1;
    if (kind == PW_SCHEDULE_GPIPE) return n_micro;
    if (kind == PW_SCHEDULE_1F1B) return n_stages - stage < n_micro ? n_stages - stage : n_micro;
    return -1;
}
