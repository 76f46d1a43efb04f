/* pipewright — the error-feedback state of --compress (runtime/compress.h)
 * as a checkpoint and a move of the cuts see it: per replica, parameter
 * and use, whatever the cuts.
 *
 * The engine keeps one compressor per gradient bucket of each replica's
 * chunks; a bucket is one piece of a chunk, its spans the piece's
 * parameters' gradient use buffers in order (a tied parameter has one per
 * use: pw_program_param_uses). Top-k's residual and PowerSGD's residual
 * and Q are per span, so a use's part of the state is the same floats on
 * any stage count, schedule or bucketing: the checkpoint keeps one tensor
 * per (replica, parameter, use) (stages/train/state.c, "compress" files;
 * docs/checkpoints.md), and a move of the cuts carries it to the rank that
 * holds the use's node next (stages/train/rebalance.c).
 *
 * At T > 1 in one process a chunk has one piece, and its bucket's spans are
 * every tensor rank's parameters, rank by rank: each rank's part of a split
 * parameter and its own copy of a whole one. The checkpoint gathers a
 * residual (per element) into the full tensor and keeps PowerSGD's Q per
 * tensor rank (state.c); a move keeps T, so each rank's part moves as it
 * is. Under mpirun at T > 1 the state is not listed (why). */
#include "stages/train/pipeline-internal.h"

/* Uses of graph parameter gp by nodes [from, n_nodes): each node's slots
 * naming it (pw_program_param_uses counts them the same way). */
static int uses_from(const pw_graph *g, int gp, int from)
{
    int n = 0;
    for (int i = from; i < g->n_nodes; i++)
        for (int k = 0; k < g->nodes[i].n_params; k++) n += g->nodes[i].params[k] == gp;
    return n;
}

int pl_param_use_node(const pw_graph *g, int gp, int use)
{
    for (int i = g->n_nodes - 1; i >= 0; i--)
        for (int k = 0; k < g->nodes[i].n_params; k++)
            if (g->nodes[i].params[k] == gp && use-- == 0) return i;
    return -1;
}

void pl_zstate_name(const pw_graph *g, const pl_zstate *z, char *out, size_t n)
{
    if (z->n_uses > 1) snprintf(out, n, "%s.compress.replica%d.use%d", g->params[z->gp].name, z->replica, z->use);
    else snprintf(out, n, "%s.compress.replica%d", g->params[z->gp].name, z->replica);
}

pw_status pl_compress_states(pw_pipeline *pl, pl_zstate **out, int *n_out, const char **why)
{
    *out = NULL;
    *n_out = 0;
    *why = NULL;
    if (!pl->engine || pl->cfg.compress.kind == PW_COMPRESS_NONE || pl->NR < 2) return PW_OK;
    if (pl->T > 1 && pl->t) {
        *why = "under mpirun, tensor parallelism splits each gradient over its stage's processes";
        return PW_OK;
    }
    const pw_graph *g = pl->g;
    int all_uses = 0;
    for (int p = 0; p < g->n_params; p++) all_uses += uses_from(g, p, 0);
    const size_t most = (size_t)pl->NRL * (size_t)pl->TL * (size_t)(all_uses > 0 ? all_uses : 1);
    pl_zstate *z = calloc(most, sizeof *z);
    if (!z) return pw_error(PW_ERR_NOMEM, "compression state: out of memory");
    int n = 0;
    for (int k = 0; k < pl->NRL; k++)
        for (int c = 0; c < pl->C; c++) {
            if (!stage_here(pl, c)) continue;
            gstage *gs = stage_at(pl, k, c);
            /* At T > 1 one piece, its bucket's spans every rank's, rank by
             * rank (pipeline_stage.c, gs_grad_bucket). */
            const int ranks = gs->rank_prog ? pl->TL : 1;
            for (int j = 0, span = 0; j < gs->n_pieces * ranks; j++) {
                const int r = j % ranks, piece = j / ranks;
                if (r == 0) span = 0; /* a piece's bucket starts */
                pw_compressor *zc = pw_engine_compressor(pl->engine, k, c, gs->n_pieces - 1 - piece);
                pw_program *p = gs->rank_prog ? gs->rank_prog[r] : gs->piece[piece];
                const pw_graph *rg = gs->rank_prog ? pl->rank_g[pl->tp0 + r] : NULL;
                /* The bucket's spans: each parameter's uses in order
                 * (pipeline_stage.c, gs_grad_bucket). */
                for (int i = 0; zc && i < pw_program_n_params(p); i++) {
                    pw_program_param pp;
                    pw_program_param_at(p, i, &pp);
                    const int nu = pw_program_param_uses(p, i, NULL, 0);
                    /* The program's uses are the last-to-first ones of its
                     * nodes, after every use by a later chunk's (a chunk's
                     * uses are all in one piece: cut_pieces). */
                    const int first = uses_from(g, pp.graph_param, pl->part.begin[c + 1]);
                    const int total = uses_from(g, pp.graph_param, 0);
                    for (int u = 0; u < nu; u++, span++) {
                        int64_t off;
                        const int64_t len = pw_compressor_span_state(zc, span, &off);
                        if (len <= 0) continue;
                        if ((size_t)n >= most) {
                            free(z);
                            return pw_error(PW_ERR_INTERNAL, "compression state: more spans than the graph's uses");
                        }
                        z[n++] = (pl_zstate){.replica = pl->t ? pl->t->replica : k, .gp = pp.graph_param,
                                             .use = first + u, .n_uses = total, .z = zc, .span = span,
                                             .floats = len, .tp_rank = rg ? pl->tp0 + r : 0,
                                             .split = rg && rg->params[pp.graph_param].tp_full > 0,
                                             .numel = pp.numel};
                    }
                }
            }
        }
    *out = z;
    *n_out = n;
    return PW_OK;
}
