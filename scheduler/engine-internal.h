/* pipewright — the engine's private state, shared by engine.c (planning,
 * memory, lifecycle, run_step) and engine-worker.c (the per-rank event loop
 * and the actions). Not installed. See docs/engine.md for the design.
 *
 * Ownership, by thread:
 *   - pw_echunk and pw_mbstate of chunk c: only the worker of c's rank, while
 *     a step runs; the caller of run_step between steps (after the engine
 *     mutex hand-off).
 *   - mailbox entries addressed to a rank, and that rank's `wait_*` key: under
 *     the rank's mbox_mu (senders on other threads write them).
 *   - message buffers: their pool (pool mutex) while free; `refs` (atomic)
 *     while handed out.
 *   - run state (epoch, n_stopped, error): the engine mutex; `abort` is an
 *     atomic flag the workers poll before every action.
 */
#ifndef PW_SCHEDULER_ENGINE_INTERNAL_H
#define PW_SCHEDULER_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <event2/event.h>

#include "runtime/arena.h"
#include "runtime/topology.h"
#include "scheduler/engine.h"
#include "scheduler/schedule-internal.h"

#define PW_ENGINE_ERRMSG 2048

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
 * micro-batch; the drop that reaches 0 returns it to its pool. */
typedef struct pw_msgbuf {
    void *data;           /* pool bytes, 64-byte aligned */
    atomic_int refs;
    int index;            /* in its pool */
    struct pw_pool *pool;
} pw_msgbuf;

/* A fixed pool of equal buffers for one link and direction. */
typedef struct pw_pool {
    pthread_mutex_t mu;
    size_t bytes;         /* per buffer; 0: the link has no port, no buffers */
    int n;                /* buffers */
    int top;              /* free buffers: free_idx[0 .. top-1] */
    int *free_idx;        /* [n] */
    pw_msgbuf *bufs;      /* [n] */
    int link;             /* chunk c of the link c -> c+1 */
    int grad;             /* 0: activations (c -> c+1), 1: gradients (c+1 -> c) */
} pw_pool;

/* Mailbox entry, addressed by (direction, receiving chunk, mb). */
typedef struct pw_mail {
    pw_msgbuf *buf;       /* NULL when the link carries no bytes */
    uint8_t arrived;
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
    const pw_stage_i *vt;
    void *self;
    int rank;
    int n_slots;          /* report->peak_inflight_chunk[c] */
    int n_free;           /* free slots: free_slots[0 .. n_free-1] */
    int *free_slots;      /* [n_slots] */
    int in_use, peak;     /* slots in use now / high-water mark */
    size_t bytes[PW_PORT_COUNT];
} pw_echunk;

typedef struct pw_worker {
    _Alignas(64) struct pw_engine *e;
    int rank;
    pthread_t thread;
    int started;
    struct event_base *base;
    struct event *wake;       /* step start, message arrival, abort */
    struct event *quit;       /* destroy: break the loop */
    struct event *watchdog;   /* persistent timer */
    pw_schedule_checker *checker;

    /* Guarded by mbox_mu: the receive this rank is parked on (dir -1: none),
     * and the mailbox entries addressed to the rank's chunks. */
    pthread_mutex_t mbox_mu;
    int wait_dir, wait_chunk, wait_mb;

    /* Worker thread only (read by others after the step, through the engine
     * mutex). */
    int64_t epoch;            /* step generation seen last */
    int running;              /* 1 while this step's actions are in progress */
    int pc;                   /* next action */
    int64_t step_t0;          /* ns */
    int64_t wait_t0;          /* ns when parked on actions[pc]; 0: not parked */
    int in_use, peak;         /* slots in use over the rank's chunks */
    int n_slots;
    int64_t busy_ns, wait_ns, total_ns, actions;

    int64_t stopped_epoch;    /* (engine mutex) last epoch this worker finished or left */
    int orphan;               /* (engine mutex) destroy left it running inside a callback */
} pw_worker;

struct pw_engine {
    const pw_schedule *s;
    const pw_schedule_report *rep;
    int R, C, M, V, split_w;
    int64_t watchdog_ns;
    struct timeval watchdog_tv;
    pw_trace *trace;
    int check;

    pw_worker *workers;       /* [R] */
    pw_echunk *chunks;        /* [C] */
    pw_mbstate *mb;           /* [C][M] */
    pw_mail *mail;            /* [2][C][M] */
    pw_pool *pools;           /* [2][C-1]: activations of link c at [c], gradients at [C-1+c] */
    pw_arena book;            /* everything above */
    pw_arena msgs;            /* the message buffers */
    int64_t msg_bytes;

    hwloc_topology_t topo;    /* pin only */
    pw_cpu_placement *place;

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

static inline pw_mbstate *pw_eng_mb(pw_engine *e, int chunk, int mb)
{
    return &e->mb[(size_t)chunk * (size_t)e->M + (size_t)mb];
}
static inline pw_mail *pw_eng_mail(pw_engine *e, int dir, int chunk, int mb)
{
    return &e->mail[((size_t)dir * (size_t)e->C + (size_t)chunk) * (size_t)e->M + (size_t)mb];
}
static inline pw_pool *pw_eng_act_pool(pw_engine *e, int link) { return &e->pools[link]; }
static inline pw_pool *pw_eng_grad_pool(pw_engine *e, int link) { return &e->pools[e->C - 1 + link]; }

/* engine.c: frees everything; the workers must have left their loops. */
void pw_eng_free(pw_engine *e);

/* engine-worker.c */
void *pw_eng_worker_main(void *arg);
void pw_eng_wake_cb(evutil_socket_t fd, short what, void *arg);
void pw_eng_quit_cb(evutil_socket_t fd, short what, void *arg);
void pw_eng_watchdog_cb(evutil_socket_t fd, short what, void *arg);

#endif
