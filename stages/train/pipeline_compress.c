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
 * holds the use's node next (stages/train/rebalance.c). */
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
    if (pl->T > 1) {
        *why = "tensor parallelism splits each gradient into its ranks' parts";
        return PW_OK;
    }
    const pw_graph *g = pl->g;
    int all_uses = 0;
    for (int p = 0; p < g->n_params; p++) all_uses += uses_from(g, p, 0);
    pl_zstate *z = calloc((size_t)pl->NRL * (size_t)(all_uses > 0 ? all_uses : 1), sizeof *z);
    if (!z) return pw_error(PW_ERR_NOMEM, "compression state: out of memory");
    int n = 0;
    for (int k = 0; k < pl->NRL; k++)
        for (int c = 0; c < pl->C; c++) {
            if (!stage_here(pl, c)) continue;
            gstage *gs = stage_at(pl, k, c);
            for (int j = 0; j < gs->n_pieces; j++) {
                pw_compressor *zc = pw_engine_compressor(pl->engine, k, c, gs->n_pieces - 1 - j);
                pw_program *p = gs->piece[j];
                /* The bucket's spans: each parameter's uses in order
                 * (pipeline_stage.c, gs_grad_bucket). */
                for (int i = 0, span = 0; zc && i < pw_program_n_params(p); i++) {
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
                        if (n >= pl->NRL * all_uses) {
                            free(z);
                            return pw_error(PW_ERR_INTERNAL, "compression state: more spans than the graph's uses");
                        }
                        z[n++] = (pl_zstate){.replica = pl->t ? pl->t->replica : k, .gp = pp.graph_param,
                                             .use = first + u, .n_uses = total, .z = zc, .span = span,
                                             .floats = len};
                    }
                }
            }
        }
    *out = z;
    *n_out = n;
    return PW_OK;
}
