/* pipewright — the error-feedback state of --compress (runtime/compress.h)
 * as a checkpoint sees it: per replica and parameter, whatever the cuts.
 *
 * The engine keeps one compressor per gradient bucket of each replica's
 * chunks; a bucket is one piece of a chunk, its spans the piece's
 * parameters' gradients in order. Top-k's residual and PowerSGD's residual
 * and Q are per span, so a parameter's part of the state is the same
 * floats on any stage count, schedule or bucketing: the checkpoint keeps
 * one tensor per (replica, parameter) (stages/train/state.c, "compress"
 * files; docs/checkpoints.md). */
#include "stages/train/pipeline-internal.h"

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
    const size_t cap = (size_t)pl->NRL * (size_t)(g->n_params > 0 ? g->n_params : 1);
    pl_zstate *z = calloc(cap, sizeof *z);
    unsigned char *seen = calloc(cap, 1);
    if (!z || !seen) {
        free(z);
        free(seen);
        return pw_error(PW_ERR_NOMEM, "compression state: out of memory");
    }
    int n = 0;
    for (int k = 0; k < pl->NRL && !*why; k++)
        for (int c = 0; c < pl->C && !*why; c++) {
            if (!stage_here(pl, c)) continue;
            gstage *gs = stage_at(pl, k, c);
            for (int j = 0; j < gs->n_pieces && !*why; j++) {
                pw_compressor *zc = pw_engine_compressor(pl->engine, k, c, gs->n_pieces - 1 - j);
                pw_program *p = gs->piece[j];
                for (int i = 0; zc && i < pw_program_n_params(p); i++) {
                    pw_program_param pp;
                    pw_program_param_at(p, i, &pp);
                    float *uses[2];
                    const size_t at = (size_t)k * (size_t)g->n_params + (size_t)pp.graph_param;
                    if (pw_program_param_uses(p, i, uses, 2) != 1 || seen[at]) {
                        /* A tied parameter has several spans (one per use, or per chunk). */
                        *why = "a parameter is tied (several gradient spans)";
                        break;
                    }
                    seen[at] = 1;
                    int64_t off;
                    const int64_t len = pw_compressor_span_state(zc, i, &off);
                    if (len <= 0) continue;
                    z[n++] = (pl_zstate){.replica = pl->t ? pl->t->replica : k, .gp = pp.graph_param, .z = zc,
                                         .span = i, .floats = len};
                }
            }
        }
    free(seen);
    if (*why) {
        free(z);
        return PW_OK;
    }
    *out = z;
    *n_out = n;
    return PW_OK;
}
