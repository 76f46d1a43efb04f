/* pipewright — helpers shared by the schedule files (schedule.c, validate.c,
 * schedule_csv.c, schedule_print.c). Not installed. */
#ifndef PW_SCHEDULER_SCHEDULE_INTERNAL_H
#define PW_SCHEDULER_SCHEDULE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler/schedule.h"

/* Upper bounds that keep every count in an int and every index product in an
 * int64 (n_chunks * n_micro fits comfortably). */
#define PW_SCHED_MAX_RANKS (1 << 20)
#define PW_SCHED_MAX_CHUNKS_PER_RANK 1024
#define PW_SCHED_MAX_MICRO (1 << 24)
#define PW_SCHED_MAX_BUCKETS (1 << 16)

/* What the library keeps beside a schedule's public fields: every
 * pw_schedule is made by pw_sched_alloc as the head of one of these (a
 * schedule is only ever handed out by pointer), and only the schedule files
 * look past the head. */
typedef struct pw_sched_impl {
    pw_schedule pub;         /* first: a pw_schedule * points here */
    const int *chunk_local;  /* [n_chunks] c's index among its rank's chunks, in
                              * chunk order (NULL when looping) */
    const int *rank_chunks;  /* [n_ranks][chunks_per_rank] each rank's chunks in
                              * chunk order (NULL when looping) */
    void *storage;           /* one block holding every action and the placement
                              * tables */
} pw_sched_impl;

static inline const pw_sched_impl *pw_sched_impl_of(const pw_schedule *s) { return (const pw_sched_impl *)s; }

/* The placement. Looping (chunk_rank == NULL): chunk c runs on rank
 * c mod n_ranks and is that rank's (c / n_ranks)-th chunk (its local index).
 * Otherwise the tables built by pw_sched_alloc say. `chunk` must be in
 * 0 .. n_chunks-1. */
/* (The branch skips a division on the hot path: GPipe and 1F1B have one
 * chunk per rank, and the validator asks this several times per action.) */
static inline int pw_sched_rank_of(const pw_schedule *s, int chunk)
{
    if (s->chunk_rank) return s->chunk_rank[chunk];
    return chunk < s->n_ranks ? chunk : chunk % s->n_ranks;
}
static inline int pw_sched_local(const pw_schedule *s, int chunk)
{
    const pw_sched_impl *im = pw_sched_impl_of(s);
    if (im->chunk_local) return im->chunk_local[chunk];
    return chunk < s->n_ranks ? 0 : chunk / s->n_ranks;
}
/* The chunk that is `rank`'s local-th chunk (inverse of the two above). */
static inline int pw_sched_chunk_at(const pw_schedule *s, int rank, int local)
{
    const pw_sched_impl *im = pw_sched_impl_of(s);
    if (im->rank_chunks) return im->rank_chunks[(size_t)rank * (size_t)s->chunks_per_rank + (size_t)local];
    return local * s->n_ranks + rank;
}

/* Fills table[n_chunks] with the V placement of n_ranks ranks: chunk c on
 * rank c for c < n_ranks, 2 n_ranks - 1 - c for the next n_ranks, and on
 * zig-zagging for more chunks per rank (ZB-V uses two). */
void pw_sched_v_placement(int n_ranks, int n_chunks, int *table);
/* 1 when table[n_chunks] is the V placement. */
int pw_sched_is_v_placement(int n_ranks, int n_chunks, const int *table);

/* Fast form of pw_sched_action_ok (no message): 1 when `a` names a real kind,
 * a chunk of `rank` and an mb (bucket) in range. */
static inline int pw_sched_action_valid(const pw_schedule *s, int rank, const pw_action *a)
{
    if ((unsigned)a->kind >= PW_ACT_COUNT) return 0;
    if (a->kind == PW_ACT_OPTIM) return a->chunk == -1 && a->mb == -1;
    if (a->chunk < 0 || a->chunk >= s->n_chunks || pw_sched_rank_of(s, a->chunk) != rank) return 0;
    int limit = a->kind == PW_ACT_ALLREDUCE ? s->n_buckets : s->n_micro;
    return a->mb >= 0 && a->mb < limit;
}

/* Allocates a schedule (a pw_sched_impl) with the shape fields of `shape`
 * (its ranks pointer ignored; a shape is any pw_schedule, not one of ours) and room for counts[r] actions on rank r, all in one block;
 * the actions are left for the caller to fill. A placement table in
 * shape->chunk_rank (the derived tables ignored) is checked (every rank holds
 * chunks_per_rank chunks; PW_ERR_INVALID_ARG otherwise) and copied into the
 * block with its derived tables, or stored as NULL when it is looping. */
pw_status pw_sched_alloc(const pw_schedule *shape, const int64_t *counts, pw_schedule **out);

/* Checks the shape fields (ranks, chunks, micro-batches, buckets) are in
 * range and agree. PW_OK or PW_ERR_INVALID_ARG. */
pw_status pw_sched_check_shape(const pw_schedule *s);

/* Checks that `a` names a real kind, a chunk of `rank` and an mb (bucket) in
 * range. Returns 0 when it does, otherwise writes the reason ("chunk 3 runs on
 * rank 1, not rank 0") into why and returns -1. */
int pw_sched_action_ok(const pw_schedule *s, int rank, const pw_action *a, char *why, size_t n);

/* Human form of an action as run by `rank`, for messages: "F mb 3",
 * "RECV_F mb 2 from rank 0", "SEND_B chunk 5 mb 1 to rank 0", "OPTIM". The
 * chunk is named when it is not simply the rank's own single chunk. */
void pw_sched_describe(const pw_schedule *s, int rank, const pw_action *a, char *buf, size_t n);

/* The validator's replay. rep (may be NULL) receives the figures (its arrays
 * already sized); start (may be NULL) receives, for every action in rank
 * order (rank 0's actions, then rank 1's, ...), the unit-cost step at which it
 * starts. */
pw_status pw_sched_replay(const pw_schedule *s, pw_schedule_report *rep, uint32_t *start);

/* zb-auto (schedule_auto.c). pw_sched_auto_check: 0 when cfg's memory
 * limit and costs are usable, else -1 with the reason in why (silent). The
 * generator writes each rank's compute actions at pos[r] and advances it;
 * span (may be NULL) receives the longest rank's span (first F start to last
 * W end) on the cost clock, in ns. */
int pw_sched_auto_check(const pw_schedule_config *cfg, char *why, size_t n);
pw_status pw_sched_gen_zb_auto(const pw_schedule *s, const pw_schedule_config *cfg, pw_action **pos,
                               int64_t *span);

#endif
