/* pipewright — a tensor-parallel group's threads in one process (tp_team.h). */
#include "stages/train/tp_team.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct helper {
    pw_tp_team *t;
    int k;
    pthread_t th;
    int started;
} helper;

struct pw_tp_team {
    int T;
    atomic_int *abort;
    int broken;                /* a run failed: refuse the rest */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    int64_t seq;               /* bumped per run (and to quit) */
    int quit;
    int pending;               /* helpers still in the run */
    pw_tp_rank_fn fn;
    void *arg;
    helper *h;                 /* [T]; [0] unused */
    pw_status *st;             /* [T] */
    char (*msg)[256];          /* [T]: a failed rank's message (pw_last_error is per thread) */
};

static void run_rank(pw_tp_team *t, int k)
{
    pw_status st = t->fn(t->arg, k);
    t->st[k] = st;
    if (st != PW_OK) {
        snprintf(t->msg[k], sizeof t->msg[k], "%s", pw_last_error());
        if (t->abort) atomic_store(t->abort, 1); /* the others' collectives return */
    }
}

static void *helper_main(void *arg)
{
    helper *h = arg;
    pw_tp_team *t = h->t;
    int64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&t->mu);
        while (t->seq == seen) pthread_cond_wait(&t->go, &t->mu);
        seen = t->seq;
        const int quit = t->quit;
        pthread_mutex_unlock(&t->mu);
        if (quit) return NULL;
        run_rank(t, h->k);
        pthread_mutex_lock(&t->mu);
        if (--t->pending == 0) pthread_cond_signal(&t->done);
        pthread_mutex_unlock(&t->mu);
    }
}

pw_status pw_tp_team_create(int T, atomic_int *abort, pw_tp_team **out)
{
    *out = NULL;
    if (T < 1) return pw_error(PW_ERR_INVALID_ARG, "tensor-parallel team of %d ranks", T);
    pw_tp_team *t = calloc(1, sizeof *t);
    if (!t) return pw_error(PW_ERR_NOMEM, "tensor-parallel team: out of memory");
    t->T = T;
    t->abort = abort;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->go, NULL);
    pthread_cond_init(&t->done, NULL);
    t->h = calloc((size_t)T, sizeof *t->h);
    t->st = calloc((size_t)T, sizeof *t->st);
    t->msg = calloc((size_t)T, sizeof *t->msg);
    if (!t->h || !t->st || !t->msg) {
        pw_tp_team_destroy(t);
        return pw_error(PW_ERR_NOMEM, "tensor-parallel team: out of memory");
    }
    for (int k = 1; k < T; k++) {
        t->h[k] = (helper){.t = t, .k = k};
        if (pthread_create(&t->h[k].th, NULL, helper_main, &t->h[k]) != 0) {
            pw_tp_team_destroy(t);
            return pw_error(PW_ERR_NOMEM, "tensor-parallel team: cannot start rank %d's thread", k);
        }
        t->h[k].started = 1;
    }
    *out = t;
    return PW_OK;
}

void pw_tp_team_destroy(pw_tp_team *t)
{
    if (!t) return;
    pthread_mutex_lock(&t->mu);
    t->quit = 1;
    t->seq++;
    pthread_cond_broadcast(&t->go);
    pthread_mutex_unlock(&t->mu);
    for (int k = 1; t->h && k < t->T; k++)
        if (t->h[k].started) pthread_join(t->h[k].th, NULL);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->go);
    pthread_cond_destroy(&t->done);
    free(t->h);
    free(t->st);
    free(t->msg);
    free(t);
}

pw_status pw_tp_team_run(pw_tp_team *t, pw_tp_rank_fn fn, void *arg)
{
    if (t->broken)
        return pw_error(PW_ERR_INVALID_ARG, "a tensor-parallel rank failed earlier; its group may only be destroyed");
    if (t->T == 1) return fn(arg, 0);
    pthread_mutex_lock(&t->mu);
    t->fn = fn;
    t->arg = arg;
    t->pending = t->T - 1;
    t->seq++;
    pthread_cond_broadcast(&t->go);
    pthread_mutex_unlock(&t->mu);
    run_rank(t, 0);
    pthread_mutex_lock(&t->mu);
    while (t->pending > 0) pthread_cond_wait(&t->done, &t->mu);
    pthread_mutex_unlock(&t->mu);
    /* The cause: the first rank that failed other than by the abort a
     * failure raised in the others. */
    int bad = -1;
    for (int k = 0; k < t->T; k++)
        if (t->st[k] != PW_OK && (bad < 0 || (t->st[bad] == PW_ERR_TIMEOUT && t->st[k] != PW_ERR_TIMEOUT))) bad = k;
    if (bad < 0) return PW_OK;
    t->broken = 1;
    return pw_error(t->st[bad], "tensor-parallel rank %d of %d: %s", bad, t->T, t->msg[bad]);
}
