/* pipewright — a pw_pipeline's parameters to and from one checkpoint file
 * (gathered across processes). */
#include "stages/train/pipeline-internal.h"

/* Replica 0's programs; with tensor parallelism every rank's (the
 * checkpoint gathers each split parameter from its parts). */
static int programs_of_replica(pw_pipeline *pl, pw_program **out)
{
    int n = 0;
    for (int r = 0; r < pl->TL; r++) n += pl_replica_rank_programs(pl, 0, r, out + n);
    return n;
}

static int total_pieces(const pw_pipeline *pl)
{
    int n = 0;
    for (size_t i = 0; i < (size_t)pl->NRL * (size_t)pl->C; i++) n += pl->stages[i].n_pieces;
    return n * pl->TL;
}

/* A program over the whole graph with one row and one slot: the parameters
 * of every stage in one place (MPI save and load). */
static pw_status whole_program(const pw_pipeline *pl, pw_program **out)
{
    pw_program_config pc = {.graph = pl->g, .micro_batch = 1, .loss_batch = 1, .slots = 1,
                            .optim = pl->cfg.optim};
    return pw_program_create(&pc, out);
}

/* The stage whose programs hold parameter p first (the checkpoint's rule:
 * the first program in stage order). */
static int first_holder(const pw_pipeline *pl, int p)
{
    const pw_graph *g = pl->g;
    for (int s = 0; s < pl->C; s++)
        for (int i = pl->part.begin[s]; i < pl->part.begin[s + 1]; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++)
                if (g->nodes[i].params[q] == p) return s;
    return -1;
}

/* The pipeline rank that runs that chunk (MPI save: the process that sends
 * p; every copy of a tied parameter holds the same bytes). */
static int holder_rank(const pw_pipeline *pl, int p)
{
    int c = first_holder(pl, p);
    return c < 0 ? -1 : pw_schedule_rank_of(pl->sched, c);
}

/* This process's copy of graph parameter p (the first piece holding it, in
 * chunk order). */
static float *local_param(pw_pipeline *pl, int p, int64_t *numel)
{
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        gstage *gs = stage_at(pl, 0, ch);
        for (int j = 0; j < gs->n_pieces; j++)
            for (int i = 0; i < pw_program_n_params(gs->piece[j]); i++) {
                pw_program_param pp;
                pw_program_param_at(gs->piece[j], i, &pp);
                if (pp.graph_param == p) {
                    *numel = pp.numel;
                    return pp.data;
                }
            }
    }
    return NULL;
}

/* 1 when graph parameter p is split across the tensor-parallel ranks. */
static int split_param(const pw_pipeline *pl, int p)
{
    return pl->T > 1 && pl->rank_g[0]->params[p].tp_full;
}

/* MPI: replica 0's processes send each parameter they hold first to world
 * rank 0, which writes the file with the same content as one process would;
 * every process returns rank 0's verdict. With tensor parallelism each of
 * the holder stage's T processes sends its part of a split parameter (tp
 * rank 0 alone a whole one), and rank 0 puts the parts together
 * (pw_graph_tp_slice): the file is the one T = 1 writes, names and shapes. */
static pw_status save_gathered(pw_pipeline *pl, const char *path, const pw_checkpoint_info *info)
{
    const pw_transport *t = pl->t;
    const pw_graph *g = pl->g;
    pw_status st = PW_OK;
    pw_program *whole = NULL;
    if (g->n_params >= t->max_tag)
        return pw_error(PW_ERR_UNSUPPORTED, "save: %d parameters need more message tags than MPI's %d",
                        g->n_params, t->max_tag);
    pw_transport_phase(t, PW_PHASE_SAVE, pl->step);
    pw_transport_test_point(t, "save", pl->step);
    if (t->replica == 0 && t->world_rank != 0) {
        for (int p = 0; p < g->n_params && st == PW_OK; p++) {
            if (holder_rank(pl, p) != t->rank || (pl->tp0 != 0 && !split_param(pl, p))) continue;
            int64_t n = 0;
            float *data = local_param(pl, p, &n);
            st = data ? t->vt->send(t->self, 0, p, data, (size_t)n * sizeof(float))
                      : pw_error(PW_ERR_INTERNAL, "save: stage %d lost parameter %s", t->rank, g->params[p].name);
        }
    } else if (t->world_rank == 0) {
        float *part = NULL;
        st = whole_program(pl, &whole);
        /* In graph order, the order the holders send in (blocking sends of
         * large messages wait for their matching receive). */
        for (int p = 0; st == PW_OK && p < g->n_params; p++) {
            pw_program_param pp = {0};
            for (int i = 0; i < pw_program_n_params(whole); i++) {
                pw_program_param_at(whole, i, &pp);
                if (pp.graph_param == p) break;
            }
            if (pp.graph_param != p || !pp.data) {
                st = pw_error(PW_ERR_INTERNAL, "save: parameter %s has no place", g->params[p].name);
                break;
            }
            int holder = holder_rank(pl, pp.graph_param);
            if (split_param(pl, p)) {
                /* T parts, from world ranks holder·T + k of replica 0 */
                for (int k = 0; k < pl->T && st == PW_OK; k++) {
                    const int64_t n = pw_shape_numel(&pl->rank_g[k]->params[p].shape);
                    float *q = realloc(part, (size_t)(n > 0 ? n : 1) * sizeof *part);
                    if (!q) {
                        st = pw_error(PW_ERR_NOMEM, "save: out of memory for a part of %s", g->params[p].name);
                        break;
                    }
                    part = q;
                    if (holder == 0 && k == 0) {
                        int64_t m = 0;
                        const float *data = local_param(pl, p, &m);
                        if (data) memcpy(part, data, (size_t)m * sizeof(float));
                    } else {
                        st = t->vt->recv(t->self, holder * pl->T + k, p, part, (size_t)n * sizeof(float));
                    }
                    if (st == PW_OK) pw_graph_tp_slice(pl->rank_g[k], p, pp.data, part, 0);
                }
            } else if (holder == 0) {
                int64_t n = 0;
                float *data = local_param(pl, pp.graph_param, &n);
                if (data) memcpy(pp.data, data, (size_t)n * sizeof(float));
            } else {
                st = t->vt->recv(t->self, pw_transport_world_of(t, 0, holder), pp.graph_param, pp.data,
                                 (size_t)pp.numel * sizeof(float));
            }
        }
        if (st == PW_OK) st = pw_checkpoint_save(path, g, &whole, 1, info);
        free(part);
    }
    char msg[512] = "";
    if (st != PW_OK) snprintf(msg, sizeof msg, "%s", pw_last_error());
    pw_program_destroy(whole);
    /* Everyone returns rank 0's verdict (and its message). */
    struct { int32_t st; char msg[252]; } mine = {(int32_t)st, ""}, *all = calloc((size_t)t->world_size, sizeof mine);
    snprintf(mine.msg, sizeof mine.msg, "%s", msg);
    if (!all) return pw_error(PW_ERR_NOMEM, "save: out of memory");
    pw_status gs = t->vt->allgather(t->self, &mine, sizeof mine, all);
    pw_status worst = PW_OK;
    const char *why = "";
    int who = -1;
    for (int w = 0; gs == PW_OK && w < t->world_size; w++)
        if (all[w].st != PW_OK && worst == PW_OK) {
            worst = (pw_status)all[w].st;
            why = all[w].msg;
            who = w;
        }
    if (gs != PW_OK) worst = gs;
    else if (worst != PW_OK) worst = pw_error(worst, "%s (MPI rank %d)", why, who);
    free(all);
    return worst;
}

pw_status pw_pipeline_save(pw_pipeline *pl, const char *path, const pw_checkpoint_info *info)
{
    PW_CHECK(pl_ps_settle(pl)); /* --sync ps with staleness: the servers' newest parameters */
    pw_checkpoint_info def = {.step = pl->step, .seed = pl->cfg.seed};
    if (!info) info = &def;
    if (pl->t) return save_gathered(pl, path, info);
    int n = total_pieces(pl);
    pw_program **p = malloc((size_t)n * sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "save: out of memory");
    int k = programs_of_replica(pl, p);
    pw_status st = pw_checkpoint_save(path, pl->g, p, k, info);
    free(p);
    return st;
}

pw_status pw_pipeline_load(pw_pipeline *pl, const char *path, pw_checkpoint_info *info)
{
    if (pl->t) {
        /* Every process reads the file into a whole-graph program and keeps
         * its own parameters: the same checks, no messages. */
        pw_program *whole = NULL;
        PW_CHECK(whole_program(pl, &whole));
        pw_status st = pw_checkpoint_load(path, pl->g, &whole, 1, info);
        for (int i = 0; st == PW_OK && i < pw_program_n_params(whole); i++) {
            pw_program_param pp;
            pw_program_param_at(whole, i, &pp);
            for (int ch = 0; ch < pl->C; ch++) {
                if (!stage_here(pl, ch)) continue;
                gstage *gs = stage_at(pl, 0, ch);
                for (int j = 0; j < gs->n_pieces; j++)
                    for (int q = 0; q < pw_program_n_params(gs->piece[j]); q++) {
                        pw_program_param mine;
                        pw_program_param_at(gs->piece[j], q, &mine);
                        if (mine.graph_param != pp.graph_param) continue;
                        if (pl->T > 1) /* this process's tensor-parallel part */
                            pw_graph_tp_slice(pl->rank_g[pl->tp0], pp.graph_param, pp.data, mine.data, 1);
                        else
                            memcpy(mine.data, pp.data, (size_t)pp.numel * sizeof(float));
                    }
            }
        }
        pw_program_destroy(whole);
        return st;
    }
    /* Every replica's programs: each loads the same weights. */
    int n = total_pieces(pl), k = 0;
    pw_program **p = malloc((size_t)n * sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "load: out of memory");
    for (size_t i = 0; i < (size_t)pl->NRL * (size_t)pl->C; i++) {
        for (int j = 0; j < pl->stages[i].n_pieces; j++) p[k++] = pl->stages[i].piece[j];
        for (int r = 1; pl->stages[i].rank_prog && r < pl->TL; r++) p[k++] = pl->stages[i].rank_prog[r];
    }
    pw_status st = pw_checkpoint_load(path, pl->g, p, k, info);
    free(p);
    return st;
}
