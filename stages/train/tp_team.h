/* pipewright — the threads of a tensor-parallel group in one process (not
 * installed): rank 0 is the caller, ranks 1 .. T−1 are helper threads the
 * team owns; pw_tp_team_run runs one function on every rank and returns
 * when all have finished (docs/parallelism.md, "Tensor parallelism").
 *
 *     pw_tp_team *team;
 *     PW_CHECK(pw_tp_team_create(T, &abort_flag, &team));
 *     PW_CHECK(pw_tp_team_run(team, rank_forward, &job));  // rank_forward(&job, k) on rank k's thread
 *     pw_tp_team_destroy(team);
 *
 * A rank that fails raises the abort flag, which the group's collectives
 * poll (runtime/collective.h), so the others return instead of waiting;
 * run then returns the first failure that is not such an abort, with that
 * rank's message, and every later run refuses (the group may only be
 * destroyed). One caller at a time. */
#ifndef PW_STAGES_TRAIN_TP_TEAM_H
#define PW_STAGES_TRAIN_TP_TEAM_H

#include "runtime/atomic.h"
#include "runtime/status.h"

typedef struct pw_tp_team pw_tp_team;
typedef pw_status (*pw_tp_rank_fn)(void *arg, int rank);

/* T >= 1 (T = 1: no threads; run calls fn(arg, 0)). `abort` (may be NULL):
 * the flag the ranks' collectives poll. */
pw_status pw_tp_team_create(int T, atomic_int *abort, pw_tp_team **out);
void pw_tp_team_destroy(pw_tp_team *t); /* accepts NULL; joins the helpers */
pw_status pw_tp_team_run(pw_tp_team *t, pw_tp_rank_fn fn, void *arg);

#endif
