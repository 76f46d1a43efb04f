/* pipewright — schedule IR: storage and placement, generators (GPipe, 1F1B,
 * interleaved 1F1B, ZB-H1, ZB-H2, ZB-V, DualPipeV), lowering, names and closed-form
 * theory. The validator lives in validate.c, the CSV form in schedule_csv.c,
 * the ASCII timeline in schedule_print.c, the simulator in simulate.c. */
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
    [PW_SCHEDULE_INTERLEAVED] = "interleaved",
    [PW_SCHEDULE_ZB_H1] = "zb-h1",
    [PW_SCHEDULE_ZB_H2] = "zb-h2",
    [PW_SCHEDULE_ZB_V] = "zb-v",
    [PW_SCHEDULE_ZB_AUTO] = "zb-auto",
    [PW_SCHEDULE_DUALPIPE_V] = "dualpipev",
};

/* Other spellings pw_schedule_kind_parse accepts. */
static const struct {
    const char *name;
    pw_schedule_kind kind;
} schedule_aliases[] = {
    {"pipedream-flush", PW_SCHEDULE_1F1B},
    {"interleaved-1f1b", PW_SCHEDULE_INTERLEAVED},
    {"zb_h1", PW_SCHEDULE_ZB_H1}, {"zbh1", PW_SCHEDULE_ZB_H1},
    {"zb_h2", PW_SCHEDULE_ZB_H2}, {"zbh2", PW_SCHEDULE_ZB_H2},
    {"zb_v", PW_SCHEDULE_ZB_V},   {"zbv", PW_SCHEDULE_ZB_V},
    {"zb_auto", PW_SCHEDULE_ZB_AUTO}, {"zbauto", PW_SCHEDULE_ZB_AUTO},
    {"dualpipe-v", PW_SCHEDULE_DUALPIPE_V}, {"dualpipe_v", PW_SCHEDULE_DUALPIPE_V},
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
    for (size_t i = 0; i < sizeof schedule_aliases / sizeof schedule_aliases[0]; i++) {
        if (strcasecmp(name, schedule_aliases[i].name) == 0) {
            *out = schedule_aliases[i].kind;
            return PW_OK;
        }
    }
    return pw_error(PW_ERR_INVALID_ARG,
                    "unknown schedule '%s' (expected gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, "
                    "zb-auto, dualpipev or custom)", name);
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

void pw_sched_v_placement(int n_ranks, int n_chunks, int *table)
{
    for (int c = 0; c < n_chunks; c++) {
        int row = c / n_ranks, i = c % n_ranks;
        table[c] = row % 2 == 0 ? i : n_ranks - 1 - i;
    }
}

int pw_sched_is_v_placement(int n_ranks, int n_chunks, const int *table)
{
    for (int c = 0; c < n_chunks; c++) {
        int row = c / n_ranks, i = c % n_ranks;
        if (table[c] != (row % 2 == 0 ? i : n_ranks - 1 - i)) return 0;
    }
    return 1;
}

int pw_schedule_rank_of(const pw_schedule *s, int chunk)
{
    if (!s || chunk < 0 || chunk >= s->n_chunks) return -1;
    return pw_sched_rank_of(s, chunk);
}

/* Checks a placement table against the shape; 1 when it is the looping one. */
static pw_status check_placement(const pw_schedule *shape, int *is_loop)
{
    const int R = shape->n_ranks, C = shape->n_chunks, v = shape->chunks_per_rank;
    int *held = calloc((size_t)R, sizeof *held);
    if (!held) return pw_error(PW_ERR_NOMEM, "schedule: cannot allocate the placement check");
    *is_loop = 1;
    pw_status st = PW_OK;
    for (int c = 0; c < C && st == PW_OK; c++) {
        int r = shape->chunk_rank[c];
        if (r < 0 || r >= R)
            st = pw_error(PW_ERR_INVALID_ARG, "schedule placement: chunk %d on rank %d, but the "
                          "ranks are 0..%d", c, r, R - 1);
        else if (++held[r] > v)
            st = pw_error(PW_ERR_INVALID_ARG, "schedule placement: rank %d holds more than %d "
                          "chunks (chunks_per_rank)", r, v);
        if (r != c % R) *is_loop = 0;
    }
    free(held); /* every rank holding at most v of R*v chunks means exactly v each */
    return st;
}

pw_status pw_sched_alloc(const pw_schedule *shape, const int64_t *counts, pw_schedule **out)
{
    *out = NULL;
    PW_CHECK(pw_sched_check_shape(shape));
    int is_loop = 1;
    if (shape->chunk_rank) PW_CHECK(check_placement(shape, &is_loop));
    /* Plan: the rank table, the placement tables (chunk_rank, chunk_local
     * [n_chunks] each, rank_chunks [n_ranks][v]), then every action, in one
     * block. */
    int64_t total = 0;
    for (int r = 0; r < shape->n_ranks; r++) {
        if (counts[r] < 0 || counts[r] > INT_MAX)
            return pw_error(PW_ERR_INVALID_ARG, "schedule: rank %d would hold %lld actions (max %d)",
                            r, (long long)counts[r], INT_MAX);
        total += counts[r];
    }
    size_t place = is_loop ? 0 : (3 * (size_t)shape->n_chunks) * sizeof(int);
    size_t head = (size_t)shape->n_ranks * sizeof(pw_rank_program) + place;
    if ((uint64_t)total > (SIZE_MAX - head) / sizeof(pw_action))
        return pw_error(PW_ERR_NOMEM, "schedule: %lld actions do not fit in memory",
                        (long long)total);
    pw_sched_impl *im = malloc(sizeof *im);
    void *block = malloc(head + (size_t)total * sizeof(pw_action));
    if (!im || !block) {
        free(im);
        free(block);
        return pw_error(PW_ERR_NOMEM, "schedule: cannot allocate %lld actions", (long long)total);
    }
    pw_schedule *s = &im->pub;
    *s = *shape;
    im->storage = block;
    s->ranks = block;
    s->chunk_rank = im->chunk_local = im->rank_chunks = NULL;
    if (!is_loop) {
        const int C = shape->n_chunks, v = shape->chunks_per_rank;
        int *rank_of = (int *)((char *)block + (size_t)shape->n_ranks * sizeof(pw_rank_program));
        int *local = rank_of + C, *chunks = local + C;
        memcpy(rank_of, shape->chunk_rank, (size_t)C * sizeof(int));
        /* Local indices count each rank's chunks in chunk order; `local`
         * doubles as the per-rank counter while rank_chunks fills. */
        int *seen = calloc((size_t)shape->n_ranks, sizeof *seen);
        if (!seen) {
            free(block);
            free(im);
            return pw_error(PW_ERR_NOMEM, "schedule: cannot allocate the placement tables");
        }
        for (int c = 0; c < C; c++) {
            int r = rank_of[c];
            local[c] = seen[r]++;
            chunks[(size_t)r * (size_t)v + (size_t)local[c]] = c;
        }
        free(seen);
        s->chunk_rank = rank_of;
        im->chunk_local = local;
        im->rank_chunks = chunks;
    }
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
    pw_sched_impl *im = (pw_sched_impl *)s;
    free(im->storage);
    free(im);
}

int pw_schedule_equal(const pw_schedule *a, const pw_schedule *b)
{
    if (!a || !b) return a == b;
    if (a->kind != b->kind || a->n_ranks != b->n_ranks ||
        a->chunks_per_rank != b->chunks_per_rank || a->n_chunks != b->n_chunks ||
        a->n_micro != b->n_micro || a->split_w != b->split_w ||
        a->n_buckets != b->n_buckets || a->lowered != b->lowered)
        return 0;
    if (!a->chunk_rank != !b->chunk_rank) return 0; /* looping is stored as NULL */
    if (a->chunk_rank &&
        memcmp(a->chunk_rank, b->chunk_rank, (size_t)a->n_chunks * sizeof(int)) != 0)
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

/* The shape a config asks for: v (chunks per rank) and whether W is split.
 * 0, or -1 with the reason in why. Silent, so the theory functions can use
 * it too. */
static int config_shape(const pw_schedule_config *cfg, int *v_out, int *split_out, char *why,
                        size_t n)
{
    const pw_schedule_kind k = cfg->kind;
    if (k <= PW_SCHEDULE_CUSTOM || k >= PW_SCHEDULE_KIND_COUNT) {
        snprintf(why, n, "kind must be gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, zb-auto or "
                 "dualpipev (got %s)", pw_schedule_kind_name(k));
        return -1;
    }
    if (cfg->n_stages < 1 || cfg->n_stages > PW_SCHED_MAX_RANKS) {
        snprintf(why, n, "n_stages must be in 1..%d (got %d)", PW_SCHED_MAX_RANKS, cfg->n_stages);
        return -1;
    }
    if (cfg->n_micro < 1 || cfg->n_micro > PW_SCHED_MAX_MICRO) {
        snprintf(why, n, "n_micro must be in 1..%d (got %d)", PW_SCHED_MAX_MICRO, cfg->n_micro);
        return -1;
    }
    if (cfg->split_w != 0 && cfg->split_w != 1) {
        snprintf(why, n, "split_w must be 0 or 1 (got %d)", cfg->split_w);
        return -1;
    }
    if (cfg->n_buckets < 0 || cfg->n_buckets > PW_SCHED_MAX_BUCKETS) {
        snprintf(why, n, "n_buckets must be in 0..%d (got %d)", PW_SCHED_MAX_BUCKETS, cfg->n_buckets);
        return -1;
    }
    int v = cfg->chunks_per_rank;
    if (k == PW_SCHEDULE_INTERLEAVED) {
        if (v == 0) v = 2;
        if (v < 2 || v > PW_SCHED_MAX_CHUNKS_PER_RANK) {
            snprintf(why, n, "interleaved needs chunks_per_rank in 2..%d (got %d%s)",
                     PW_SCHED_MAX_CHUNKS_PER_RANK, v, v == 1 ? "; with one chunk per rank use 1f1b" : "");
            return -1;
        }
        if (cfg->n_micro % cfg->n_stages != 0) {
            /* Megatron's grouping: each chunk takes the micro-batches in
             * groups of p, so that the first group's output of chunk c reaches
             * rank 0's chunk c+1 just as rank 0 finishes the group. */
            int lo = cfg->n_micro / cfg->n_stages * cfg->n_stages;
            char use[64];
            if (lo) snprintf(use, sizeof use, "%d or %d", lo, lo + cfg->n_stages);
            else snprintf(use, sizeof use, "%d", cfg->n_stages);
            snprintf(why, n, "interleaved 1F1B needs n_micro to be a multiple of n_stages, as "
                     "Megatron-LM does (micro-batches pass each chunk in groups of n_stages): got "
                     "n_micro=%d with n_stages=%d; use %s", cfg->n_micro, cfg->n_stages, use);
            return -1;
        }
    } else if (k == PW_SCHEDULE_ZB_V || k == PW_SCHEDULE_DUALPIPE_V) {
        if (v == 0) v = 2;
        if (v != 2) {
            snprintf(why, n, "%s has exactly 2 chunks per rank (got chunks_per_rank=%d)",
                     pw_schedule_kind_name(k), v);
            return -1;
        }
        if (k == PW_SCHEDULE_DUALPIPE_V && cfg->n_micro < 2 * (int64_t)cfg->n_stages) {
            /* DeepSeek's DualPipeV and PyTorch's ScheduleDualPipeV both
             * refuse fewer (one micro-batch per chunk); the phases' counts
             * stay >= 0 down to 2p−1, but that is neither reference's
             * schedule. */
            snprintf(why, n, "dualpipev needs n_micro >= 2 x n_stages (one micro-batch per "
                     "chunk), as DeepSeek's DualPipeV does: got n_micro=%d with n_stages=%d; use "
                     "%lld or more", cfg->n_micro, cfg->n_stages, 2 * (long long)cfg->n_stages);
            return -1;
        }
    } else {
        if (v == 0) v = 1;
        if (v != 1) {
            snprintf(why, n, "%s has one chunk per rank (got chunks_per_rank=%d; interleaved takes "
                     "more)", pw_schedule_kind_name(k), v);
            return -1;
        }
    }
    if (k == PW_SCHEDULE_ZB_AUTO && pw_sched_auto_check(cfg, why, n) != 0) return -1;
    if ((int64_t)cfg->n_stages * v > INT_MAX / 2) {
        snprintf(why, n, "n_stages x chunks_per_rank (%d x %d) is too large", cfg->n_stages, v);
        return -1;
    }
    *v_out = v;
    *split_out = k == PW_SCHEDULE_ZB_H1 || k == PW_SCHEDULE_ZB_H2 || k == PW_SCHEDULE_ZB_V ||
                 k == PW_SCHEDULE_ZB_AUTO || k == PW_SCHEDULE_DUALPIPE_V ? 1 : cfg->split_w;
    return 0;
}

static pw_status check_config(const pw_schedule_config *cfg, int *v, int *split)
{
    char why[400];
    if (config_shape(cfg, v, split, why, sizeof why) != 0)
        return pw_error(PW_ERR_INVALID_ARG, "schedule config: %s", why);
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

/* GPipe and 1F1B (PipeDream-Flush), one chunk per rank. */
static pw_action *gen_gpipe_1f1b(const pw_schedule *s, int r, pw_action *p)
{
    const int S = s->n_ranks, M = s->n_micro, W = s->split_w;
    if (s->kind == PW_SCHEDULE_GPIPE) {
        for (int m = 0; m < M; m++) *p++ = act(PW_ACT_F, r, m);
        for (int m = 0; m < M; m++) p = emit_backward(p, r, m, W);
        return p;
    }
    /* Rank r runs `warm` forwards ahead, so that the first backward reaches
     * it just as its next forward would; then alternates F(warm+i), B(i);
     * then drains the remaining B. Peak in-flight: warm + 1 = min(S - r, M). */
    int warm = S - r - 1 < M ? S - r - 1 : M;
    for (int m = 0; m < warm; m++) *p++ = act(PW_ACT_F, r, m);
    for (int i = 0; i < M - warm; i++) {
        *p++ = act(PW_ACT_F, r, warm + i);
        p = emit_backward(p, r, i, W);
    }
    for (int m = M - warm; m < M; m++) p = emit_backward(p, r, m, W);
    return p;
}

/* Interleaved 1F1B as Megatron-LM builds it
 * (forward_backward_pipelining_with_interleaving): rank r walks k = 0 ..
 * v·M−1 "virtual micro-batches". The k-th forward is micro-batch
 * (k / pv)·p + k mod p of the rank's (k mod pv) / p -th chunk, so every
 * chunk takes micro-batches in groups of p; the k-th backward walks the
 * chunks in reverse. Warm-up: 2(p−r−1) + (v−1)p forwards, then one forward
 * and one backward at a time, then the remaining backwards. */
static pw_action *gen_interleaved(const pw_schedule *s, int r, pw_action *p)
{
    const int64_t P = s->n_ranks, v = s->chunks_per_rank, M = s->n_micro, W = s->split_w;
    const int64_t total = v * M, group = P * v;
    int64_t warm = 2 * (P - r - 1) + (v - 1) * P;
    if (warm > total) warm = total;
#define FCHUNK(k) ((int)((((k) % group) / P) * P + r))
#define BCHUNK(k) ((int)((v - 1 - ((k) % group) / P) * P + r))
#define MB(k) ((int)(((k) / group) * P + (k) % P))
    for (int64_t k = 0; k < warm; k++) *p++ = act(PW_ACT_F, FCHUNK(k), MB(k));
    for (int64_t k = 0; k < total - warm; k++) {
        *p++ = act(PW_ACT_F, FCHUNK(warm + k), MB(warm + k));
        p = emit_backward(p, BCHUNK(k), MB(k), (int)W);
    }
    for (int64_t k = total - warm; k < total; k++) p = emit_backward(p, BCHUNK(k), MB(k), (int)W);
#undef FCHUNK
#undef BCHUNK
#undef MB
    return p;
}

/* ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023, §3.1, the
 * authors' ZeroBubbleH1Pipeline; PyTorch's ZB1P with one stage per rank).
 * 1F1B's warm-up (p−r−1 forwards) and its order of F and B, with B computing
 * only the input gradient; rank r holds back its first r weight passes, runs
 * one W after each later B, and ends with the r held back: the W passes fill
 * the cool-down where 1F1B waits. Peak in-flight min(p, m) on every rank (F
 * to W), the first rank's equal to 1F1B's. */
static pw_action *gen_zb_h1(const pw_schedule *s, int r, pw_action *p)
{
    const int S = s->n_ranks, M = s->n_micro;
    int f = 0, b = 0, w = 0;
    int warm = S - r - 1 < M ? S - r - 1 : M;
    while (f < warm) *p++ = act(PW_ACT_F, r, f++);
    for (int i = 0; i < r && f < M; i++) {       /* F B, W held back */
        *p++ = act(PW_ACT_F, r, f++);
        *p++ = act(PW_ACT_B, r, b++);
    }
    while (f < M) {                              /* F B W */
        *p++ = act(PW_ACT_F, r, f++);
        *p++ = act(PW_ACT_B, r, b++);
        *p++ = act(PW_ACT_W, r, w++);
    }
    while (b < M) {                              /* B W */
        *p++ = act(PW_ACT_B, r, b++);
        *p++ = act(PW_ACT_W, r, w++);
    }
    while (w < M) *p++ = act(PW_ACT_W, r, w++);  /* the held-back W */
    return p;
}

/* ZB-H2 (ibid.): ZB-H1 with more memory. Rank r runs 2(p−r)−1 warm-up
 * forwards, which fill the bubble before its first B, and the W passes go
 * wherever nothing else is ready, which moves them to the tail and turns the
 * trapezoid into a parallelogram: every rank is then busy without a gap from
 * its first action to its last once m >= 2p−1. The order is built the way
 * the paper builds it by hand, on the unit-cost clock (F = B = W = 1): at
 * each step a rank runs the first that is ready of its next B, its next F
 * (while fewer than 2p−1 micro-batches are in flight, F to W), its oldest
 * pending W. Peak in-flight min(2p−1, m) on every rank.
 *
 * The clock is stepped for the ranks that can act only: everything decided
 * at step t ends at t+1, so a rank with nothing ready either sees its input
 * arrive at t+1 (and retries then) or sleeps until the neighbour that
 * produces it acts, which wakes it. O(actions + p). */
static pw_status gen_zb_h2(pw_schedule *s, pw_action **pos)
{
    const int S = s->n_ranks, M = s->n_micro;
    const int64_t cap = 2 * (int64_t)S - 1;
    size_t keys = (size_t)S * (size_t)M;
    uint32_t *end_f = malloc(keys * sizeof *end_f), *end_b = malloc(keys * sizeof *end_b);
    int *cnt = calloc((size_t)S * 6, sizeof *cnt);
    if (!end_f || !end_b || !cnt) {
        free(end_f);
        free(end_b);
        free(cnt);
        return pw_error(PW_ERR_NOMEM, "zb-h2: cannot allocate the %d x %d build clock", S, M);
    }
    memset(end_f, 0xff, keys * sizeof *end_f); /* UINT32_MAX: not run yet */
    memset(end_b, 0xff, keys * sizeof *end_b);
    int *f = cnt, *b = cnt + S, *w = cnt + 2 * S;
    int *cur = cnt + 3 * S, *nxt = cnt + 4 * S, *queued = cnt + 5 * S; /* queued: step+1 it is in */
    int n_cur = 0, n_nxt = 0, left = S;
    for (int r = 0; r < S; r++) cur[n_cur++] = r;
#define QUEUE(x)                                                               \
    do {                                                                       \
        if (queued[x] != (int)t + 2) {                                         \
            queued[x] = (int)t + 2;                                            \
            nxt[n_nxt++] = (x);                                                \
        }                                                                      \
    } while (0)
    for (uint32_t t = 0; left > 0; t++) {
        PW_ASSERT(n_cur > 0); /* someone can always move: the order is a greedy schedule */
        n_nxt = 0;
        for (int i = 0; i < n_cur; i++) {
            const int r = cur[i];
            uint32_t *ef = end_f + (size_t)r * M, *eb = end_b + (size_t)r * M;
            const uint32_t *down_b = r + 1 < S ? end_b + (size_t)(r + 1) * M : NULL;
            const uint32_t *up_f = r > 0 ? end_f + (size_t)(r - 1) * M : NULL;
            const int can_f = f[r] < M && f[r] - w[r] < cap;
            if (b[r] < f[r] && ef[b[r]] <= t && (!down_b || down_b[b[r]] <= t)) {
                eb[b[r]] = t + 1;
                *pos[r]++ = act(PW_ACT_B, r, b[r]++);
                if (r > 0) QUEUE(r - 1); /* its gradient may be what rank r-1 waits for */
            } else if (can_f && (!up_f || up_f[f[r]] <= t)) {
                ef[f[r]] = t + 1;
                *pos[r]++ = act(PW_ACT_F, r, f[r]++);
                if (r + 1 < S) QUEUE(r + 1);
            } else if (w[r] < b[r]) { /* its B ended by t: W is ready */
                *pos[r]++ = act(PW_ACT_W, r, w[r]++);
                if (w[r] == M) {
                    left--;
                    continue;
                }
            } else {
                /* Idle: retry at t+1 only if an input lands then; else sleep
                 * until the neighbour acts. */
                int soon = (b[r] < f[r] && down_b && down_b[b[r]] == t + 1) ||
                           (can_f && up_f && up_f[f[r]] == t + 1);
                if (soon) QUEUE(r);
                continue;
            }
            QUEUE(r);
        }
        int *tmp = cur;
        cur = nxt;
        nxt = tmp;
        n_cur = n_nxt;
    }
#undef QUEUE
    free(end_f);
    free(end_b);
    free(cnt);
    return PW_OK;
}

/* Emits `times` actions (kind, chunk, *cnt ...) of which those below m; the
 * counter advances by `times`. O(actions emitted). */
static pw_action *emit_run(pw_action *p, pw_action_kind k, int chunk, int *cnt, int times, int m)
{
    int end = *cnt + times;
    for (int i = *cnt; i < end && i < m; i++) *p++ = act(k, chunk, i);
    *cnt = end;
    return p;
}

/* ZB-V (ibid., §4; the authors' handcrafted get_zb_v_schedule). Rank r holds
 * chunk r (going down) and chunk 2p−1−r (coming back up), so the first rank
 * both starts the forward and ends the backward. Warm-up: 2(p−r)−1 forwards
 * of the down chunk, r pairs (up, down), p−r triples F B W of the up chunk;
 * steady: F B W of the down chunk, then of the up chunk; cool-down: r pairs
 * of B (down, up), p−r pairs B W of the down chunk, then the remaining W.
 * The pattern is laid out for n = max(2p−1, m) micro-batches and those
 * >= m are dropped (as the authors do); the loops skip ahead over the
 * dropped ones, so a rank costs O(m) however many ranks there are. Peak
 * in-flight min(2p, 2m, m+1+r) half-stage chunks: p stages. */
static pw_action *gen_zb_v(const pw_schedule *s, int r, pw_action *p)
{
    const int S = s->n_ranks, M = s->n_micro;
    const int n = 2 * S - 1 > M ? 2 * S - 1 : M;
    const int c0 = r, c1 = 2 * S - 1 - r;
    int f0 = 0, f1 = 0, b0 = 0, b1 = 0;
#define EMIT(kind, chunk, mb)                                                  \
    do {                                                                       \
        int mb_ = (mb);                                                        \
        if (mb_ < M) *p++ = act(kind, chunk, mb_);                             \
    } while (0)
    p = emit_run(p, PW_ACT_F, c0, &f0, 2 * (S - r) - 1, M);
    for (int i = 0; i < r; i++) {
        if (f0 >= M && f1 >= M) { /* the rest is dropped */
            f0 += r - i;
            f1 += r - i;
            break;
        }
        EMIT(PW_ACT_F, c1, f1++);
        EMIT(PW_ACT_F, c0, f0++);
    }
    for (int i = 0; i < S - r; i++) {
        if (f1 >= M && b1 >= M) {
            f1 += S - r - i;
            b1 += S - r - i;
            break;
        }
        EMIT(PW_ACT_F, c1, f1++);
        EMIT(PW_ACT_B, c1, b1);
        EMIT(PW_ACT_W, c1, b1++);
    }
    while (f1 < f0 || f0 < n) {
        if (f0 >= M && b0 >= M && f1 >= M && b1 >= M) {
            /* Each further round moves f0 up to n and the others by one;
             * the loop ends once f0 = n and f1 >= n. */
            int k = n - f0 > n - f1 ? n - f0 : n - f1;
            f0 = n;
            f1 += k;
            b0 += k;
            b1 += k;
            break;
        }
        if (f0 < n) EMIT(PW_ACT_F, c0, f0++);
        EMIT(PW_ACT_B, c0, b0);
        EMIT(PW_ACT_W, c0, b0++);
        EMIT(PW_ACT_F, c1, f1++);
        EMIT(PW_ACT_B, c1, b1);
        EMIT(PW_ACT_W, c1, b1++);
    }
    int w0 = b0, w1 = b1;
    for (int i = 0; i < r; i++) {
        if (b0 >= M && b1 >= M) {
            b0 += r - i;
            b1 += r - i;
            break;
        }
        EMIT(PW_ACT_B, c0, b0++);
        EMIT(PW_ACT_B, c1, b1++);
    }
    for (int i = 0; i < S - r; i++) {
        if (b0 >= M && w0 >= M) {
            b0 += S - r - i;
            w0 += S - r - i;
            break;
        }
        EMIT(PW_ACT_B, c0, b0++);
        EMIT(PW_ACT_W, c0, w0++);
    }
    p = emit_run(p, PW_ACT_W, c1, &w1, b1 - w1, M);
    p = emit_run(p, PW_ACT_W, c0, &w0, b0 - w0, M);
#undef EMIT
    PW_ASSERT(f0 == n && b0 == n && w0 == n && f1 == n && b1 == n && w1 == n);
    return p;
}

/* DualPipeV (DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, §3.2.1;
 * the "cut-in-half" DualPipe of Sea AI Lab, as deepseek-ai/DualPipe's
 * dualpipev.py and PyTorch's ScheduleDualPipeV order it). ZB-V's placement:
 * rank r holds chunk r (phase 0, going down) and chunk 2p−1−r (phase 1,
 * coming back up). Eight phases, with q = p−r−1 (the ranks after r):
 *   1. 2q forwards of the down chunk;
 *   2. r+1 pairs: F down, F up;
 *   3. q triples of the up chunk: B, its W, F (zero bubble: W split);
 *   4. m−2p+r+1 rounds of two overlapped pairs, F down & B up, F up & B down;
 *   5. q rounds: B up, then the pair F up & B down;
 *   6. r+1 pairs of B up, B down, the second half of them with W deferred;
 *   7. q rounds: a deferred W, then B down with its W deferred;
 *   8. the r+1 deferred W left.
 * DeepSeek runs each pair "F&B" as one overlapped call (one micro-batch's
 * forward computing while the other's backward communicates); the IR has no
 * fused action, so a pair is its F followed by its B, which is what
 * dualpipev.py itself runs when the module has no overlapped_forward_backward.
 * A backward without zero bubble is B with its W right behind it; a deferred
 * W joins a FIFO that phases 3, 7 and 8 pop (DeepSeek's WeightGradStore).
 * Every phase count is >= 0 once m >= 2p−1; both references, and
 * config_shape, ask m >= 2p. `fifo` has room for 2m actions. */
static pw_action *gen_dualpipe_v(const pw_schedule *s, int r, pw_action *p, pw_action *fifo)
{
    const int S = s->n_ranks, M = s->n_micro, q = S - r - 1;
    const int c0 = r, c1 = 2 * S - 1 - r;
    int f0 = 0, f1 = 0, b0 = 0, b1 = 0, head = 0, tail = 0;
#define F(c, n) (*p++ = act(PW_ACT_F, c, (n)++))
#define B_FULL(c, n) (*p++ = act(PW_ACT_B, c, n), *p++ = act(PW_ACT_W, c, (n)++))
#define B_ZB(c, n) (*p++ = act(PW_ACT_B, c, n), fifo[tail++] = act(PW_ACT_W, c, (n)++))
#define W_POP() (*p++ = fifo[head++])
    for (int i = 0; i < 2 * q; i++) F(c0, f0);
    for (int i = 0; i <= r; i++) {
        F(c0, f0);
        F(c1, f1);
    }
    for (int i = 0; i < q; i++) {
        B_ZB(c1, b1);
        W_POP();
        F(c1, f1);
    }
    for (int i = 0; i < M - 2 * S + r + 1; i++) {
        F(c0, f0);
        B_FULL(c1, b1);
        F(c1, f1);
        B_FULL(c0, b0);
    }
    for (int i = 0; i < q; i++) {
        B_FULL(c1, b1);
        F(c1, f1);
        B_FULL(c0, b0);
    }
    /* From the middle of phase 6 on, W waits: the odd ranks switch before
     * the up chunk's B of round (r+1)/2, the even ones after it. */
    int zb = 0;
    for (int i = 0; i <= r; i++) {
        if (i == (r + 1) / 2 && r % 2 == 1) zb = 1;
        if (zb) B_ZB(c1, b1);
        else B_FULL(c1, b1);
        if (i == (r + 1) / 2 && r % 2 == 0) zb = 1;
        if (zb) B_ZB(c0, b0);
        else B_FULL(c0, b0);
    }
    for (int i = 0; i < q; i++) {
        W_POP();
        B_ZB(c0, b0);
    }
    for (int i = 0; i <= r; i++) W_POP();
#undef F
#undef B_FULL
#undef B_ZB
#undef W_POP
    PW_ASSERT(f0 == M && f1 == M && b0 == M && b1 == M && head == tail && tail <= 2 * M);
    return p;
}

/* Completes rank r, whose first n_compute actions are its compute order: the
 * ALLREDUCE of each bucket of a chunk goes right after the chunk's last
 * backward (B, or W when split), so the reduction overlaps what the rank
 * still computes; OPTIM goes last. In place, from the back. */
static void finish_rank(pw_schedule *s, int r, int n_compute, uint8_t *seen)
{
    pw_action *a = s->ranks[r].actions;
    const int total = s->ranks[r].n_actions, nb = s->n_buckets;
    const pw_action_kind final = s->split_w ? PW_ACT_W : PW_ACT_B;
    int dst = total - 1;
    a[dst--] = act(PW_ACT_OPTIM, -1, -1);
    if (nb > 0) {
        memset(seen, 0, (size_t)s->chunks_per_rank);
        for (int i = n_compute - 1; i >= 0; i--) {
            const pw_action x = a[i];
            int l = pw_sched_local(s, x.chunk);
            if (x.kind == final && !seen[l]) { /* walking back: its last backward */
                seen[l] = 1;
                for (int bk = nb - 1; bk >= 0; bk--) a[dst--] = act(PW_ACT_ALLREDUCE, x.chunk, bk);
            }
            a[dst--] = x;
        }
    }
    PW_ASSERT(dst == (nb > 0 ? -1 : n_compute - 1));
}

pw_status pw_schedule_generate(const pw_schedule_config *cfg, pw_schedule **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_generate: out is NULL");
    *out = NULL;
    if (!cfg) return pw_error(PW_ERR_INVALID_ARG, "pw_schedule_generate: cfg is NULL");
    int v = 1, split = 0;
    PW_CHECK(check_config(cfg, &v, &split));

    const int S = cfg->n_stages, M = cfg->n_micro, C = S * v;
    pw_schedule shape = {
        .kind = cfg->kind, .n_ranks = S, .chunks_per_rank = v, .n_chunks = C,
        .n_micro = M, .split_w = split, .n_buckets = cfg->n_buckets,
    };
    /* Every rank runs the same multiset of actions; only the order differs. */
    const int64_t n_compute = (int64_t)v * M * (2 + split);
    const int64_t per_rank = n_compute + (int64_t)v * cfg->n_buckets + 1;
    int64_t *counts = calloc((size_t)S, sizeof *counts);
    const int is_v = cfg->kind == PW_SCHEDULE_ZB_V || cfg->kind == PW_SCHEDULE_DUALPIPE_V;
    int *place = is_v ? malloc((size_t)C * sizeof *place) : NULL;
    pw_action **pos = malloc((size_t)S * sizeof *pos);
    uint8_t *seen = malloc((size_t)v);
    pw_action *fifo = cfg->kind == PW_SCHEDULE_DUALPIPE_V ? malloc(2 * (size_t)M * sizeof *fifo) : NULL;
    pw_schedule *s = NULL;
    pw_status st = PW_OK;
    if (!counts || !pos || !seen || (is_v && !place) ||
        (cfg->kind == PW_SCHEDULE_DUALPIPE_V && !fifo)) {
        st = pw_error(PW_ERR_NOMEM, "schedule: cannot allocate the tables of %d ranks", S);
        goto out;
    }
    for (int r = 0; r < S; r++) counts[r] = per_rank;
    if (place) {
        pw_sched_v_placement(S, C, place);
        shape.chunk_rank = place;
    }
    PW_CHECK_GOTO(pw_sched_alloc(&shape, counts, &s), st, out);

    for (int r = 0; r < S; r++) pos[r] = s->ranks[r].actions;
    if (cfg->kind == PW_SCHEDULE_ZB_H2) {
        PW_CHECK_GOTO(gen_zb_h2(s, pos), st, out);
    } else if (cfg->kind == PW_SCHEDULE_ZB_AUTO) {
        PW_CHECK_GOTO(pw_sched_gen_zb_auto(s, cfg, pos, NULL), st, out);
    } else {
        for (int r = 0; r < S; r++) {
            switch (cfg->kind) {
            case PW_SCHEDULE_INTERLEAVED: pos[r] = gen_interleaved(s, r, pos[r]); break;
            case PW_SCHEDULE_ZB_H1: pos[r] = gen_zb_h1(s, r, pos[r]); break;
            case PW_SCHEDULE_ZB_V: pos[r] = gen_zb_v(s, r, pos[r]); break;
            case PW_SCHEDULE_DUALPIPE_V: pos[r] = gen_dualpipe_v(s, r, pos[r], fifo); break;
            default: pos[r] = gen_gpipe_1f1b(s, r, pos[r]); break;
            }
        }
    }
    for (int r = 0; r < S; r++) {
        PW_ASSERT(pos[r] == s->ranks[r].actions + n_compute);
        finish_rank(s, r, (int)n_compute, seen);
    }
    *out = s;
    s = NULL;
out:
    pw_schedule_destroy(s);
    free(counts);
    free(place);
    free(pos);
    free(seen);
    free(fifo);
    return st;
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
    pw_sched_impl *si = (pw_sched_impl *)s, *ni = (pw_sched_impl *)n;
    free(si->storage);
    si->storage = ni->storage;
    s->ranks = n->ranks;
    s->chunk_rank = n->chunk_rank; /* the placement moved with the block */
    si->chunk_local = ni->chunk_local;
    si->rank_chunks = ni->rank_chunks;
    s->lowered = 1;
    free(ni);
    return PW_OK;
}

/* ----------------------------------------------------------------- theory */

static int zero_bubble_kind(pw_schedule_kind k)
{
    return k == PW_SCHEDULE_ZB_H1 || k == PW_SCHEDULE_ZB_H2 || k == PW_SCHEDULE_ZB_V ||
           k == PW_SCHEDULE_ZB_AUTO || k == PW_SCHEDULE_DUALPIPE_V;
}

double pw_schedule_theoretical_bubble(pw_schedule_kind kind, int n_stages, int n_micro)
{
    if (n_stages < 1 || n_micro < 1) return -1.0;
    if (zero_bubble_kind(kind)) {
        pw_schedule_config cfg = {.kind = kind, .n_stages = n_stages, .n_micro = n_micro};
        return pw_schedule_config_bubble(&cfg);
    }
    if (kind != PW_SCHEDULE_GPIPE && kind != PW_SCHEDULE_1F1B) return -1.0;
    /* Fill and drain each cost (p-1) slots of F and of B on every stage,
     * against m slots of useful work: (p-1)/(m+p-1) of the step is idle. */
    return (double)(n_stages - 1) / (double)(n_micro + n_stages - 1);
}

pw_schedule_model pw_schedule_kind_model(pw_schedule_kind kind)
{
    switch (kind) {
    case PW_SCHEDULE_GPIPE: return PW_SCHEDULE_MODEL_FILL_DRAIN;
    case PW_SCHEDULE_1F1B: return PW_SCHEDULE_MODEL_ONE_F_ONE_B;
    default: return PW_SCHEDULE_MODEL_NONE;
    }
}

double pw_schedule_named_bubble(const char *name, int n_stages, int n_micro)
{
    pw_schedule_kind k;
    if (!name || pw_schedule_kind_parse(name, &k) != PW_OK) {
        pw_clear_error();
        return -1.0;
    }
    return pw_schedule_theoretical_bubble(k, n_stages, n_micro);
}

int pw_schedule_theoretical_peak(pw_schedule_kind kind, int n_stages, int n_micro, int stage)
{
    if (n_stages < 1 || n_micro < 1 || stage < 0 || stage >= n_stages) return -1;
    if (kind == PW_SCHEDULE_GPIPE || kind == PW_SCHEDULE_1F1B || zero_bubble_kind(kind)) {
        pw_schedule_config cfg = {.kind = kind, .n_stages = n_stages, .n_micro = n_micro};
        return pw_schedule_config_peak(&cfg, stage);
    }
    return -1;
}

/* zb-auto has no closed form: its order is generated and replayed on the
 * validator's unit-cost clock. rank < 0: the bubble; else that rank's peak
 * in-flight count. -1 when it cannot be generated (no memory). */
static double auto_replayed(const pw_schedule_config *cfg, int rank)
{
    pw_schedule *s = NULL;
    pw_schedule_report *rep = NULL;
    double out = -1.0;
    if (pw_schedule_generate(cfg, &s) == PW_OK && pw_schedule_lower(s) == PW_OK &&
        pw_schedule_validate(s, &rep) == PW_OK)
        out = rank < 0 ? rep->bubble : (double)rep->peak_inflight[rank];
    else
        pw_clear_error();
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    return out;
}

/* The closed forms below were derived on the unit-cost clock and are checked
 * against the validator's replay for every p <= 8, m <= 16 by the tests. The
 * busy time of a rank is its number of compute actions: v m (2 + split). */
double pw_schedule_config_bubble(const pw_schedule_config *cfg)
{
    int v, split;
    char why[400];
    if (!cfg || config_shape(cfg, &v, &split, why, sizeof why) != 0) return -1.0;
    const int64_t p = cfg->n_stages, m = cfg->n_micro;
    int64_t T;
    switch (cfg->kind) {
    case PW_SCHEDULE_GPIPE:
    case PW_SCHEDULE_1F1B:
    case PW_SCHEDULE_INTERLEAVED:
        /* Fill and drain: the first forward takes p−1 steps to reach the last
         * rank and the last backward p−1 to come back, each step one chunk
         * action; with split W the gradient leaves after B, before W. An
         * interleaved rank has v m chunk actions of each kind. */
        T = split ? 3 * v * m + 2 * (p - 1) : 2 * (v * m + p - 1);
        break;
    case PW_SCHEDULE_ZB_H1:
    case PW_SCHEDULE_ZB_H2:
        /* p−1 fill steps, W fills the drain; with m < p the cool-down is
         * longer than the W passes left to fill it. */
        T = 3 * m + p - 1 + (p > m ? p - m : 0);
        break;
    case PW_SCHEDULE_ZB_V:
        /* Two chunks: 6m busy steps plus the p−1 fill steps; with m < 2p−1
         * the V has too few micro-batches to close its gaps. */
        T = 6 * m + p - 1 > 4 * m + 4 * p - 2 ? 6 * m + p - 1 : 4 * m + 4 * p - 2;
        break;
    case PW_SCHEDULE_ZB_AUTO:
        /* No closed form: the generated order's unit-cost replay. */
        return auto_replayed(cfg, -1);
    case PW_SCHEDULE_DUALPIPE_V:
        /* Two chunks, 6m busy steps and the p−1 fill steps, with no gap:
         * (p−1)(F&B + B − 3W) in DeepSeek's terms, with F&B = F + B (no
         * overlap here) and B = B + W (a full backward). m >= 2p. */
        T = 6 * m + p - 1;
        break;
    default:
        return -1.0;
    }
    int64_t busy = (int64_t)v * m * (2 + split);
    return 1.0 - (double)busy / (double)T;
}

int pw_schedule_config_peak(const pw_schedule_config *cfg, int rank)
{
    int v, split;
    char why[400];
    if (!cfg || config_shape(cfg, &v, &split, why, sizeof why) != 0) return -1;
    const int64_t p = cfg->n_stages, m = cfg->n_micro, r = rank;
    if (rank < 0 || rank >= p) return -1;
    int64_t k;
    switch (cfg->kind) {
    case PW_SCHEDULE_GPIPE: k = m; break;
    case PW_SCHEDULE_1F1B: k = p - r; break;
    case PW_SCHEDULE_INTERLEAVED:
        /* Megatron's warm-up forwards, plus the one of the first 1F1B step. */
        k = 2 * (p - r - 1) + (v - 1) * p + 1;
        if (k > v * m) k = v * m;
        break;
    case PW_SCHEDULE_ZB_H1: k = p; break;
    case PW_SCHEDULE_ZB_H2: k = 2 * p - 1; break;
    case PW_SCHEDULE_ZB_V:
        k = 2 * p;
        if (k > 2 * m) k = 2 * m;
        if (k > m + 1 + r) k = m + 1 + r;
        break;
    case PW_SCHEDULE_ZB_AUTO: return (int)auto_replayed(cfg, rank);
    case PW_SCHEDULE_DUALPIPE_V: k = 2 * p + 1; break; /* DeepSeek's PP + 1, PP = 2p chunks */
    default: return -1;
    }
    if (v == 1 && k > m) k = m;
    return (int)k;
}
