/* pipewright — the engine's private state, shared by engine.c (planning,
 * memory, lifecycle, run_step), engine-worker.c (the per-rank event loop and
 * the actions) and engine-comm.c (gradient buckets, the communication
 * threads, messages to other processes). Not installed. See docs/engine.md
 * and docs/distributed.md for the design.
 *
 * Who is where. The schedule has S pipeline ranks and C chunks; the engine
 * runs R data-parallel replicas of it. In one process every (replica, rank)
 * is a local worker: worker index lrep × S + rank. With a transport (one
 * process per rank of each replica) the process holds exactly one worker,
 * index 0, for (transport->replica, transport->rank). Per-replica arrays
 * (chunks, micro-batch state, mailboxes, pools, buckets) are indexed by the
 * local replica `lrep` (always 0 with a transport).
 *
 * Ownership, by thread:
 *   - pw_echunk, pw_mbstate of chunk c of replica k: only the worker of
 *     (k, rank of c), while a step runs; the caller of run_step between steps
 *     (after the engine mutex hand-off).
 *   - mailbox entries addressed to a worker, and its `wait_*` key: under the
 *     worker's mbox_mu (senders on other threads write them). Entries of
 *     messages from another process are the worker's own (its poll timer
 *     completes them).
 *   - message buffers: their pool (pool mutex) while free; `refs` (atomic)
 *     while handed out.
 *   - bucket states, the job queue and the norm result of a worker: under its
 *     comm_mu (its communication thread writes them).
 *   - run state (epoch, n_stopped, error): the engine mutex; `abort` is an
 *     atomic flag the workers poll before every action and the collectives
 *     poll while they wait.
 */
#ifndef PW_SCHEDULER_ENGINE_INTERNAL_H
#define PW_SCHEDULER_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <event2/event.h>

#include "runtime/arena.h"
#include "runtime/collective.h"
#include "runtime/topology.h"
#include "runtime/transport.h"
#include "scheduler/engine.h"
#include "scheduler/schedule-internal.h"

#define PW_ENGINE_ERRMSG 2048
/* How often (µs) a worker with messages to or from other processes tests
 * them while a step runs. */
#define PW_ENG_POLL_US 50

/* Message direction: index of the mailbox plane. */
enum { PW_DIR_F = 0, PW_DIR_B = 1 };

/* pw_mbstate.done bits: what has happened to one (chunk, mb) this step. */
enum {
    PW_MB_F = 1 << 0,
    PW_MB_B = 1 << 1,
    PW_MB_W = 1 << 2,
    PW_MB_RF = 1 << 3,   /* its input arrived (RECV_F) */
    PW_MB_RB = 1 << 4,   /* its output gradient arrived (RECV_B) */
    PW_MB_REL = 1 << 5,  /* slot and buffers released (last backward done) */
};

/* One message buffer. Handed out with refs = 2: its producer and its
 * consumer each drop one reference after their own last backward of the
 * micro-batch; the drop that reaches 0 returns it to its pool. Across
 * processes the two ends have their own buffers: the sender's second
 * reference belongs to the pending send (dropped when it completes), the
 * receiver's buffer is handed out with refs = 1. */
typedef struct pw_msgbuf {
    void *data;           /* pool bytes, 64-byte aligned */
    atomic_int refs;
    int index;            /* in its pool */
    struct pw_pool *pool;
} pw_msgbuf;

/* A fixed pool of equal buffers for one link and direction of one replica. */
typedef struct pw_pool {
    pthread_mutex_t mu;
    size_t bytes;         /* per buffer; 0: the link has no port, no buffers */
    int n;                /* buffers */
    int top;              /* free buffers: free_idx[0 .. top-1] */
    int *free_idx;        /* [n] */
    pw_msgbuf *bufs;      /* [n] */
    int link;             /* chunk c of the link c -> c+1 */
    int grad;             /* 0: activations (c -> c+1), 1: gradients (c+1 -> c) */
    int init;             /* mu initialised */
} pw_pool;

/* Mailbox entry, addressed by (direction, receiving chunk, mb). */
typedef struct pw_mail {
    pw_msgbuf *buf;       /* NULL when the link carries no bytes */
    uint8_t arrived;
    uint8_t posted;       /* from another process: its receive is posted in req */
    int64_t due_ns;       /* in process, behind a slow link: not to be taken before */
    pw_treq req;
} pw_mail;

/* Per (chunk, mb) bookkeeping of the chunk's rank. */
typedef struct pw_mbstate {
    int slot;             /* -1: none */
    uint8_t done;         /* PW_MB_* */
    pw_msgbuf *act_in;    /* link c-1 activations (read) */
    pw_msgbuf *act_out;   /* link c activations (written by F) */
    pw_msgbuf *grad_out;  /* link c gradient (read by B/W) */
    pw_msgbuf *grad_in;   /* link c-1 gradient (written by B) */
} pw_mbstate;

typedef struct pw_echunk {
    const pw_stage_i *vt; /* NULL: the chunk runs in another process */
    void *self;
    int rank;
    int n_slots;          /* report->peak_inflight_chunk[c] */
    int n_free;           /* free slots: free_slots[0 .. n_free-1] */
    int *free_slots;      /* [n_slots] */
    int in_use, peak;     /* slots in use now / high-water mark */
    size_t bytes[PW_PORT_COUNT];
} pw_echunk;

/* Bucket states (comm_mu). */
enum { PW_BK_IDLE = 0, PW_BK_QUEUED, PW_BK_DONE, PW_BK_FAILED };

/* One gradient bucket of one chunk of one replica: the spans the stage
 * reported (pointers into its gradients, fixed for the engine's life). */
typedef struct pw_bucket {
    pw_span *spans;
    int n_spans;
    int64_t floats;
    int state;            /* PW_BK_* (comm_mu) */
    int64_t t0, t1;       /* queued (worker) / finished (comm thread, comm_mu) */
    pw_compressor *z;     /* (optional) the bucket's compressor (pw_engine_config.compress) */
    int64_t wire_bytes;   /* the last sum's bytes on the wire (comm_mu) */
} pw_bucket;

/* A communication thread's work item. */
enum { PW_JOB_ALLREDUCE = 1, PW_JOB_NORM };
typedef struct pw_job {
    int kind;
    int chunk, bucket;    /* ALLREDUCE */
    int discarded;        /* ALLREDUCE of a step post-validation discards (overlap_steps):
                             summed uncompressed, so a compressor's state between steps
                             (error feedback) never sees a step that does not stand */
    double value;         /* NORM: this rank's sum of squares */
} pw_job;

/* What a parked worker waits for (worker thread only; the watchdog reads it). */
enum { PW_WAIT_NONE = 0, PW_WAIT_RECV, PW_WAIT_BUCKET, PW_WAIT_NORM, PW_WAIT_SENDS, PW_WAIT_DONE };

typedef struct pw_worker {
    _Alignas(64) struct pw_engine *e;
    int lrep;                 /* local replica index */
    int replica;              /* global replica index */
    int rank;
    int gid;                  /* replica × S + rank: trace track, stats index */
    int n_chunks;             /* chunks of the rank (chunks_per_rank) */
    int *chunk_ids;           /* [n_chunks] in chunk order */
    pthread_t thread;
    int started;
    struct event_base *base;
    struct event *wake;       /* step start, message arrival, abort, collective done */
    struct event *quit;       /* destroy: break the loop */
    struct event *watchdog;   /* persistent timer */
    struct event *poll;       /* transport or slow link: progresses messages to/from other
                                 processes, or retries a receive held back by the link */
    pw_link_clock link_clock; /* this worker's outgoing link (pw_engine_config.link) */
    pw_schedule_checker *checker;

    /* Guarded by mbox_mu: the receive this worker is parked on (dir -1:
     * none), and the mailbox entries addressed to the worker's chunks. */
    pthread_mutex_t mbox_mu;
    int mbox_init;            /* mbox_mu initialised */
    int wait_dir, wait_chunk, wait_mb;
    /* The pending stage call's completion (asynchronous stages; see
     * stage.h): written by pw_stage_done_fn on any thread, read by the
     * worker once `fired` is set, all under mbox_mu. */
    int done_fired;
    pw_status done_st;
    int64_t done_t1;          /* ns when the stage reported it */
    char done_msg[256];

    /* Worker thread only (read by others after the step, through the engine
     * mutex). */
    int64_t epoch;            /* step generation seen last */
    int running;              /* 1 while this step's actions are in progress */
    int pc;                   /* next action */
    int resumed;              /* actions[pc] parked before (the checker saw it) */
    int optim_phase;          /* OPTIM: 0 buckets, 1 norm queued, 2 optimizer */
    int tried;                /* post-validation: chunks (of chunk_ids, in order) whose
                               * optimizer step awaits the norm's verdict */
    int redo;                 /* post-validation: the verdict was "clip": redo the step */
    int64_t rollbacks;        /* post-validation: steps undone and redone */
    /* Steps of one run (pw_engine_run_steps; worker thread only, read by the
     * caller after the run through the engine mutex). */
    int64_t step;             /* the step the worker is in */
    int64_t last_step;        /* the run's last step (lowered when a step is discarded) */
    int steps_ok;             /* steps of the run finished and standing */
    int verdict;              /* overlap: the previous step's optimistic optimizer step
                               * (w->tried chunks) awaits the norm's verdict */
    int discard;              /* overlap: this step started on parameters that were
                               * rolled back: its work is dropped, the run ends with it */
    int flushing;             /* actions done; sends to other processes pending */
    /* Asynchronous stage calls of actions[pc] (a compute action is a short
     * run of calls: F one, B one or two or one per bucket, OPTIM one per
     * chunk): how many have completed, and whether the next is pending. */
    int calls_done;
    int call_pending;
    int pending_chunk;        /* the chunk whose call is pending (watchdog) */
    int64_t act_t0;           /* ns: the action's first entry (trace) */
    int64_t act_t1;           /* ns: its last async completion; 0: none */
    int64_t pend_t0;          /* ns: when the pending call was submitted */
    int wait_kind;            /* PW_WAIT_* while parked */
    int wait_key_chunk, wait_key_bucket;
    int64_t step_t0;          /* ns */
    int64_t wait_t0;          /* ns when parked on actions[pc]; 0: not parked */
    int in_use, peak;         /* slots in use over the rank's chunks */
    int n_slots;
    int64_t busy_ns, wait_ns, total_ns, actions;
    int64_t coll_wait_ns, coll_ns;
    int64_t coll_bytes, coll_wire_bytes; /* the buckets' fp32 bytes / on the wire, all steps */
    double grad_norm;         /* last step's global norm (clip only) */

    /* Sends to other processes still in flight. */
    struct pw_pending {
        pw_treq req;
        pw_msgbuf *buf;
    } *pending;               /* [max_pending] */
    int n_pending, max_pending;

    /* The communication thread and what it shares with the worker. */
    pthread_t comm_thread;
    int comm_started;
    int comm_init;            /* comm_mu/comm_cv initialised */
    pthread_mutex_t comm_mu;
    pthread_cond_t comm_cv;
    int comm_quit;            /* (comm_mu) */
    pw_job *jobs;             /* (comm_mu) ring of jobs_cap */
    int jobs_cap, jobs_head, jobs_n;
    int norm_state;           /* (comm_mu) PW_BK_* of the step's NORM job */
    double *norm_vals;        /* [S] (comm_mu) every rank's sum of squares */
    pw_status comm_err;       /* (comm_mu) first collective failure */
    char comm_msg[256];       /* (comm_mu) */

    int64_t stopped_epoch;    /* (engine mutex) last epoch this worker finished or left */
    int orphan;               /* (engine mutex) destroy left it running inside a callback */
} pw_worker;

struct pw_engine {
    const pw_schedule *s;
    const pw_schedule_report *rep;
    int S, C, M, V, NB, split_w;
    int NR;                   /* replicas, all processes */
    int NRL;                  /* replicas in this process (1 with a transport) */
    int NW;                   /* local workers */
    const pw_transport *t;    /* NULL: in-process */
    double clip;              /* > 0: clip the global gradient norm */
    int post_validate;        /* clip > 0: optimizer steps before the norm, validated after */
    int overlap;              /* overlap_steps: a run's steps back to back */
    int64_t run_first;        /* (mu) the current run's first step and count */
    int run_n;
    int bucketed;             /* NR > 1: gradients are all-reduced */
    int use_comm;             /* workers have communication threads */
    int64_t watchdog_ns;
    struct timeval watchdog_tv;
    pw_trace *trace;
    int check;

    pw_worker *workers;       /* [NW] */
    pw_echunk *chunks;        /* [NRL][C] */
    pw_mbstate *mb;           /* [NRL][C][M] */
    pw_mail *mail;            /* [NRL][2][C][M] */
    pw_pool *pools;           /* [NRL][2][C-1]: activations of link c at [c], gradients at [C-1+c] */
    pw_bucket *buckets;       /* [NRL][C][NB] when bucketed */
    int *last_bwd;            /* [C] position of each chunk's last backward in its rank's program */
    pw_shm_group **groups;    /* in-process, bucketed: [C] one ring per chunk (R members) */
    pw_shm_group **norm_groups; /* in-process, clip: [NRL] one per replica (S members) */
    pw_arena book;            /* everything above but the groups */
    pw_arena msgs;            /* the message buffers */
    int64_t msg_bytes;
    pw_engine_msg_memory_fn msg_alloc; /* (optional) where msgs.base came from, else */
    void (*msg_free)(void *arg, void *base); /* pw_arena_commit; see pw_engine_config */
    void *msg_arg;
    const pw_span_mem *span_mem; /* the replicas' gradient memory (pw_engine_config) */
    pw_compress_config compress; /* kind PW_COMPRESS_NONE: the plain all-reduce */
    pw_link link;             /* in process: a slow link (pw_engine_config) */
    pw_coll *slow_colls;      /* in process, bucketed, behind the link: [C × NR] chunk-major */

    hwloc_topology_t topo;    /* pin only */
    pw_cpu_placement *place;
    int place_first;          /* this process's first worker's index in the placement */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sync_init;            /* mu/cv initialised */
    atomic_llong epoch;       /* run_step generation; workers compare theirs */
    atomic_llong step;        /* the user's step number */
    int n_stopped;            /* workers done with the current epoch (mu) */
    atomic_int abort;         /* stop the step: a worker failed */
    pw_status err;            /* first failure (mu) */
    char err_msg[PW_ENGINE_ERRMSG];
    int failed;               /* sticky: the engine may only be destroyed */
    int stragglers;           /* a worker did not leave the failed step in time (mu) */
    int orphan_refs;          /* (mu) owners left after destroy met stragglers: the
                               * stragglers plus destroy itself; the last frees */
};

static inline pw_echunk *pw_eng_chunk(pw_engine *e, int lrep, int chunk)
{
    return &e->chunks[(size_t)lrep * (size_t)e->C + (size_t)chunk];
}
static inline pw_mbstate *pw_eng_mb(pw_engine *e, int lrep, int chunk, int mb)
{
    return &e->mb[((size_t)lrep * (size_t)e->C + (size_t)chunk) * (size_t)e->M + (size_t)mb];
}
static inline pw_mail *pw_eng_mail(pw_engine *e, int lrep, int dir, int chunk, int mb)
{
    return &e->mail[(((size_t)lrep * 2 + (size_t)dir) * (size_t)e->C + (size_t)chunk) * (size_t)e->M +
                    (size_t)mb];
}
static inline pw_pool *pw_eng_act_pool(pw_engine *e, int lrep, int link)
{
    return &e->pools[(size_t)lrep * 2 * (size_t)(e->C - 1) + (size_t)link];
}
static inline pw_pool *pw_eng_grad_pool(pw_engine *e, int lrep, int link)
{
    return &e->pools[(size_t)lrep * 2 * (size_t)(e->C - 1) + (size_t)(e->C - 1 + link)];
}
static inline pw_bucket *pw_eng_bucket(pw_engine *e, int lrep, int chunk, int b)
{
    return &e->buckets[((size_t)lrep * (size_t)e->C + (size_t)chunk) * (size_t)e->NB + (size_t)b];
}
static inline int pw_eng_rank_of(const pw_engine *e, int chunk) { return pw_sched_rank_of(e->s, chunk); }
/* 1 when `rank` runs in this process. */
static inline int pw_eng_is_local(const pw_engine *e, int rank) { return !e->t || e->t->rank == rank; }
/* The worker of (lrep, rank); NULL when that rank is in another process. */
static inline pw_worker *pw_eng_worker(pw_engine *e, int lrep, int rank)
{
    if (e->t) return e->t->rank == rank ? &e->workers[0] : NULL;
    return &e->workers[(size_t)lrep * (size_t)e->S + (size_t)rank];
}

/* "rank 1", "replica 1 rank 1" or "MPI rank 3 = replica 1 rank 1": who a
 * message is about. */
void pw_eng_name(const pw_engine *e, int replica, int rank, char *buf, size_t n);

/* engine.c: frees everything; the workers must have left their loops. */
void pw_eng_free(pw_engine *e);

/* engine-worker.c */
void *pw_eng_worker_main(void *arg);
void pw_eng_wake_cb(evutil_socket_t fd, short what, void *arg);
void pw_eng_quit_cb(evutil_socket_t fd, short what, void *arg);
void pw_eng_watchdog_cb(evutil_socket_t fd, short what, void *arg);
void pw_eng_drive(pw_worker *w);
/* pw_action_kind_name for the progress board's action codes. */
const char *pw_eng_action_name(int kind);
/* Records the first failure of the step and stops every worker. */
void pw_eng_fail(pw_engine *e, pw_status st, const char *msg);
void pw_eng_buf_put(pw_msgbuf *b);
pw_msgbuf *pw_eng_pool_get(pw_pool *p, int refs);
/* The event it pushed, or NULL (no room on the track). */
pw_trace_event *pw_eng_trace(pw_worker *w, const char *name, int cat, int chunk, int mb, int peer,
                             int64_t bytes, int64_t t0, int64_t t1);

/* engine-comm.c: buckets and the communication thread. */
pw_status pw_eng_comm_start(pw_engine *e, pw_worker *w);
void pw_eng_comm_stop(pw_worker *w);
void pw_eng_comm_free(pw_worker *w);
/* keep_norm: the previous step's norm is still travelling (overlap). */
void pw_eng_comm_begin_step(pw_worker *w, int keep_norm);
/* Queues bucket b of chunk c of the worker's replica (no-op once queued). */
void pw_eng_bucket_start(pw_worker *w, int chunk, int b);
/* OPTIM's wait: EXEC_OK-like 0 when every bucket of the worker's chunks is
 * done (and, with clipping, the norm is known and applied); 1 when parked;
 * -1 when failed (the engine is failing). */
int pw_eng_comm_before_optim(pw_worker *w);
/* Post-validation: a step left (failed or aborted) while optimizer steps
 * awaited their verdict undoes them. */
void pw_eng_optim_abandon(pw_worker *w);
/* Overlap with post-validation: the previous step's verdict, before the
 * rank's first backward (or OPTIM) of this step: 0 settled (committed, or
 * redone with the clip and this step marked discarded), 1 parked on the
 * norm, -1 failed. */
int pw_eng_comm_verdict(pw_worker *w);
/* The same without parking (a run being left): 1 when the norm is not
 * there (the caller undoes). */
int pw_eng_comm_verdict_or(pw_worker *w, int may_park);

/* engine-comm.c: messages to and from other processes. */
int pw_eng_remote_send(pw_worker *w, const char *kind, int src_chunk, int dir, int dst_chunk, int mb,
                       pw_msgbuf *buf, size_t bytes);
/* 1: arrived (st fields set by the caller), 0: parked, -1 failed. */
int pw_eng_remote_recv(pw_worker *w, const char *kind, int dir, int chunk, int mb, pw_msgbuf **buf);
/* Tests the pending sends; 0 when all are done, -1 on a failure. */
int pw_eng_progress_sends(pw_worker *w);
void pw_eng_poll_cb(evutil_socket_t fd, short what, void *arg);
/* The tag of message (dir, receiving chunk, mb). */
static inline int pw_eng_tag(const pw_engine *e, int dir, int chunk, int mb)
{
    return (dir * e->C + chunk) * e->M + mb;
}

#endif
