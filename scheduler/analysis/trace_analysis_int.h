/* pipewright — trace analysis internals shared by trace_analysis.c (pass 1:
 * the streaming sweep, finish, explanation) and trace_detail.c (pass 2: the
 * detail step's segments and gaps, and its critical path). Not installed;
 * users include scheduler/analysis/trace_analysis.h.
 */
#ifndef PW_RUNTIME_TRACE_ANALYSIS_INT_H
#define PW_RUNTIME_TRACE_ANALYSIS_INT_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler/analysis/trace_analysis.h"
#include "runtime/trace_read.h"

#define CLS_STEP 100            /* a "step" event: defines the rank's span */
#define CLS_TP 101              /* a tensor-parallel all-reduce ("TP_ALLREDUCE", cat "tp"): nested
                                   inside an F, B or W, so it takes no part in the sweep; its
                                   time is counted on its own (pw_ta_times.tp_allreduce) */
#define MAX_NAMES (1 << 16)     /* distinct event names kept; more share "(other)" */

enum { WK_NONE = 0, WK_RECV, WK_ALLREDUCE, WK_OTHER };

#define VEC_PUSH(arr, n, cap, fail_label)                                              \
    do {                                                                               \
        if ((n) >= (cap)) {                                                            \
            size_t _nc = (cap) ? 2 * (size_t)(cap) : 16;                               \
            void *_p = realloc((arr), _nc * sizeof *(arr));                            \
            if (!_p) goto fail_label;                                                  \
            (arr) = _p;                                                                \
            (cap) = _nc;                                                               \
        }                                                                              \
    } while (0)

/* ------------------------------------------------------------ state */

typedef struct ta_ev {          /* one event of an open group */
    int64_t t0, t1;
    int64_t bytes;
    int32_t name;
    int32_t stage, mb, peer;
    int8_t cls;                 /* pw_ta_class or CLS_STEP */
    int8_t wk;                  /* WK_* for waits and comm actions */
} ta_ev;

typedef struct ta_group {
    int64_t step;
    int64_t off0, line0, off1;  /* file range of its events (pass 2 seeks there) */
    ta_ev *ev;
    size_t n, cap;
} ta_group;

typedef struct ta_bopen {       /* an unmatched "B" event */
    int64_t t0, off, line, step;
    int32_t name, stage, mb, peer;
    int8_t cls, wk;
} ta_bopen;

typedef struct ta_rank {
    int64_t pid, tid;
    char label[64];
    int has_label;
    ta_group *open;             /* open groups, ascending step */
    size_t n_open, cap_open;
    int64_t max_closed;         /* highest step reduced; -1 none */
    ta_bopen *bstack;
    size_t n_b, cap_b;
    int has_events;             /* 0: only named by metadata events */
    int new_index;              /* after sorting ranks */
    pw_ta_times total;          /* analysed steps, inside the rank's spans (finish adds the rest) */
} ta_rank;

/* One reduced (rank, step): what finish() needs once the step's window is
 * known (the rank's other figures went straight into its totals). */
typedef struct ta_rec {
    int64_t step;
    int64_t t0, t1;             /* the rank's own span */
    int64_t head_ns, tail_ns;   /* idle before its first / after its last event, inside the span */
    int64_t compute;            /* for the step's bubble */
    int64_t off0, line0, off1;  /* file range of its events (pass 2 seeks there) */
    int64_t full;               /* index in ta.full (cfg->per_step), else -1 */
    int32_t rank;
    int8_t tail_phase;          /* phase of the idle after the span */
} ta_rec;

typedef struct ta_cause_key {
    int32_t rank, kind, what, peer, stage, mb;
} ta_cause_key;

typedef struct ta_detail_rank { /* detail-step output of one rank (local indices) */
    pw_ta_event *ev;
    size_t n_ev;
    pw_ta_segment *seg;
    size_t n_seg, cap_seg;
    pw_ta_gap *gap;
    size_t n_gap, cap_gap;
} ta_detail_rank;

typedef struct ta {
    pw_trace_analysis *a;
    const pw_trace_analysis_config *cfg;
    pw_trace_reader *rd;

    char **names;
    int8_t *name_cls;           /* [cap_names] class by name alone, or -1: depends on "cat" */
    int8_t *name_wk;
    size_t n_names, cap_names;
    int32_t *name_ht;           /* index + 1; 0 empty */
    size_t name_ht_cap;
    int32_t id_step, id_other;

    ta_rank *ranks;
    size_t n_ranks, cap_ranks;
    int32_t *rank_ht;
    size_t rank_ht_cap;
    int last_rank;              /* lookup cache */
    int64_t last_pid, last_tid;

    ta_rec *recs;
    size_t n_recs, cap_recs;
    pw_ta_times *full;          /* per (rank, step) figures, only with cfg->per_step */
    size_t n_full, cap_full;
    int64_t max_f;              /* most F events of one rank in one step */

    pw_ta_cause *causes;
    size_t n_causes, cap_causes;
    ta_cause_key *cause_keys;
    int32_t *cause_ht;
    size_t cause_ht_cap;

    int64_t *skip;              /* the first skip_steps distinct steps met, sorted */
    size_t n_skip, cap_skip;

    int64_t n_late, n_bad_args, n_other_ph, n_unmatched_e, n_unclosed_b;
    int64_t n_with_step, n_without_step, n_step_events, n_x;
    int overflow;               /* a sum of times passed INT64_MAX ns (see acc) */

    /* sweep scratch */
    int64_t *bounds;
    size_t cap_bounds;
    int *active;
    size_t cap_active;
    int *order;
    size_t cap_order;
    struct ta_key *keys;
    size_t cap_keys;

    /* pass 2 */
    int detail;                 /* 1 while reading the detail step */
    int64_t win_t0, win_t1;     /* the detail step's window */
    int win_last_rank;
    ta_detail_rank *drank;      /* [n_ranks] */
} ta;

pw_status ta_oom(void);
/* qsort and memcpy without the undefined cases (NULL with n = 0). */
void ta_sort_n(void *base, size_t n, size_t size, int (*cmp)(const void *, const void *));
void ta_copy_n(void *dst, const void *src, size_t bytes);
/* Pass 1 ingestion; pass 2 replays the detail step's records through it. */
pw_status ta_ingest(ta *s, const pw_trace_record *rec);
pw_status ta_close_group(ta *s, int r, size_t i);
/* Pass 2 (trace_detail.c): seek back to the detail step, keep its segments,
 * gaps and critical path. */
pw_status ta_detail_pass(ta *s);

#endif
