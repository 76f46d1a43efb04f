/* pipewright — checkpoint save/load over safetensors. */
#include "stages/train/checkpoint.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/safetensors.h"

/* The rank graph program p runs when it splits parameter i (tensor
 * parallelism), else NULL. */
static const pw_graph *split_by(const pw_program *p, int i)
{
    const pw_graph *rg = pw_program_get_config(p)->graph;
    return rg->tp_size > 1 && i < rg->n_params && rg->params[i].tp_full ? rg : NULL;
}

/* For each graph parameter, the program and local index that holds it
 * (owner / local may be NULL). */
static pw_status locate_params(const pw_graph *g, pw_program *const *programs, int n_programs,
                               pw_program_param *where, pw_program **owner, int *local)
{
    char *found = calloc((size_t)g->n_params + 1, 1);
    if (!found) return pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
    for (int s = 0; s < n_programs; s++) {
        for (int i = 0; i < pw_program_n_params(programs[s]); i++) {
            pw_program_param pp;
            pw_program_param_at(programs[s], i, &pp);
            if (found[pp.graph_param]) continue;
            found[pp.graph_param] = 1;
            where[pp.graph_param] = pp;
            if (owner) owner[pp.graph_param] = programs[s];
            if (local) local[pp.graph_param] = i;
        }
    }
    for (int i = 0; i < g->n_params; i++) {
        if (!found[i]) {
            free(found);
            return pw_error(PW_ERR_INVALID_ARG, "checkpoint: parameter '%s' is held by no stage",
                            g->params[i].name);
        }
    }
    free(found);
    return PW_OK;
}

pw_status pw_checkpoint_save(const char *path, const pw_graph *g, pw_program *const *programs,
                             int n_programs, const pw_checkpoint_info *info)
{
    pw_status st = PW_OK;
    pw_program_param *where = calloc((size_t)g->n_params + 1, sizeof *where);
    pw_st_tensor *t = calloc((size_t)g->n_params + 1, sizeof *t);
    pw_program **owner = calloc((size_t)g->n_params + 1, sizeof *owner);
    int *local = calloc((size_t)g->n_params + 1, sizeof *local);
    float **host = calloc((size_t)g->n_params + 1, sizeof *host); /* device programs' copies */
    if (!where || !t || !owner || !local || !host) {
        st = pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        goto out;
    }
    PW_CHECK_GOTO(locate_params(g, programs, n_programs, where, owner, local), st, out);
    for (int i = 0; i < g->n_params; i++) {
        t[i].name = g->params[i].name;
        t[i].dtype = PW_F32;
        t[i].shape = g->params[i].shape;
        t[i].data = where[i].data;
        t[i].nbytes = (size_t)where[i].numel * sizeof(float);
        if (split_by(owner[i], i)) {
            /* Tensor parallelism: every rank's part put in its place. The
             * file holds the full tensor, as at T = 1. */
            const int64_t full = pw_shape_numel(&g->params[i].shape);
            if (!(host[i] = malloc((size_t)full * sizeof(float) + 1))) {
                st = pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
                goto out;
            }
            for (int s = 0; s < n_programs; s++) {
                const pw_graph *rg = split_by(programs[s], i);
                for (int k = 0; rg && k < pw_program_n_params(programs[s]); k++) {
                    pw_program_param pp;
                    pw_program_param_at(programs[s], k, &pp);
                    if (pp.graph_param == i) pw_graph_tp_slice(rg, i, host[i], pp.data, 0);
                }
            }
            t[i].data = host[i];
            t[i].nbytes = (size_t)full * sizeof(float);
            continue;
        }
        if (!pw_program_on_device(owner[i])) continue;
        if (!(host[i] = malloc(t[i].nbytes + 1))) {
            st = pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
            goto out;
        }
        PW_CHECK_GOTO(pw_program_param_read(owner[i], local[i], PW_PARAM_DATA, 0, host[i]), st, out);
        t[i].data = host[i];
    }
    char step[32], epoch[32], seed[32], nparams[32];
    snprintf(step, sizeof step, "%" PRId64, info ? info->step : 0);
    snprintf(epoch, sizeof epoch, "%" PRId64, info ? info->epoch : 0);
    snprintf(seed, sizeof seed, "%" PRIu64, info ? info->seed : 0);
    snprintf(nparams, sizeof nparams, "%d", g->n_params);
    pw_st_meta meta[] = {
        {"format", PW_CHECKPOINT_FORMAT}, {"graph", g->name},  {"step", step},
        {"epoch", epoch},                 {"seed", seed},      {"n_params", nparams},
        {"run", info && info->extra ? info->extra : ""},
    };
    st = pw_safetensors_write(path, t, g->n_params, meta, (int)(sizeof meta / sizeof meta[0]));
out:
    for (int i = 0; host && i < g->n_params; i++) free(host[i]);
    free(host);
    free(owner);
    free(local);
    free(where);
    free(t);
    return st;
}

/* A counter in the metadata: absent is 0 (plain safetensors from
 * elsewhere); present, it is decimal digits only, at most `max`. */
static pw_status meta_count(const pw_safetensors *f, const char *path, const char *key,
                            uint64_t max, uint64_t *out)
{
    const char *v = pw_safetensors_meta(f, key);
    *out = 0;
    if (!v) return PW_OK;
    uint64_t x = 0;
    int ok = *v != '\0';
    for (const char *c = v; ok && *c; c++)
        ok = *c >= '0' && *c <= '9' && !__builtin_mul_overflow(x, 10, &x) &&
             !__builtin_add_overflow(x, (uint64_t)(*c - '0'), &x);
    if (!ok || x > max)
        return pw_error(PW_ERR_FORMAT, "%s: metadata \"%s\" is '%.40s', not a whole number in 0..%llu",
                        path, key, v, (unsigned long long)max);
    *out = x;
    return PW_OK;
}

pw_status pw_checkpoint_load(const char *path, const pw_graph *g, pw_program *const *programs,
                             int n_programs, pw_checkpoint_info *info)
{
    pw_safetensors *f = NULL;
    pw_status st = pw_safetensors_open(path, &f);
    if (st != PW_OK) return st;
    pw_program_param *where = calloc((size_t)g->n_params + 1, sizeof *where);
    if (!where) {
        st = pw_error(PW_ERR_NOMEM, "checkpoint: out of memory");
        goto out;
    }
    const char *fmt = pw_safetensors_meta(f, "format");
    if (!fmt || strcmp(fmt, PW_CHECKPOINT_FORMAT) != 0) {
        /* Plain safetensors from elsewhere are fine when the names match. */
        if (fmt) {
            st = pw_error(PW_ERR_FORMAT, "%s: checkpoint format '%s' is not '%s'", path, fmt,
                          PW_CHECKPOINT_FORMAT);
            goto out;
        }
    }
    PW_CHECK_GOTO(locate_params(g, programs, n_programs, where, NULL, NULL), st, out);
    /* Validate everything before copying anything. */
    for (int i = 0; i < pw_safetensors_count(f); i++) {
        pw_st_tensor t;
        PW_CHECK_GOTO(pw_safetensors_at(f, i, &t), st, out);
        if (pw_graph_find_param(g, t.name) < 0) {
            const char *gname = pw_safetensors_meta(f, "graph");
            st = pw_error(PW_ERR_FORMAT, "%s: tensor '%s' is not a parameter of graph '%s'%s%s%s",
                          path, t.name, g->name, gname ? " (the file was saved from graph '" : "",
                          gname ? gname : "", gname ? "')" : "");
            goto out;
        }
    }
    for (int i = 0; i < g->n_params; i++) {
        pw_st_tensor t;
        PW_CHECK_GOTO(pw_safetensors_get_as(f, g->params[i].name, PW_F32, &g->params[i].shape, &t),
                      st, out);
    }
    uint64_t step, epoch, seed;
    PW_CHECK_GOTO(meta_count(f, path, "step", INT64_MAX, &step), st, out);
    PW_CHECK_GOTO(meta_count(f, path, "epoch", INT64_MAX, &epoch), st, out);
    PW_CHECK_GOTO(meta_count(f, path, "seed", UINT64_MAX, &seed), st, out);
    for (int i = 0; i < g->n_params; i++) {
        pw_st_tensor t;
        PW_CHECK_GOTO(pw_safetensors_get(f, g->params[i].name, &t), st, out);
        /* Copy into every program holding it (a tied parameter split across
         * stages has one copy per stage). */
        for (int s = 0; s < n_programs; s++) {
            for (int k = 0; k < pw_program_n_params(programs[s]); k++) {
                pw_program_param pp;
                pw_program_param_at(programs[s], k, &pp);
                if (pp.graph_param != i) continue;
                const pw_graph *rg = split_by(programs[s], i);
                if (rg) /* this rank's part of the full tensor (CPU programs only) */
                    pw_graph_tp_slice(rg, i, (float *)t.data, pp.data, 1);
                else if (pw_program_on_device(programs[s])) /* t.data: the file's, aligned floats */
                    PW_CHECK_GOTO(pw_program_param_write(programs[s], k, PW_PARAM_DATA, t.data), st, out);
                else
                    memcpy(pp.data, t.data, t.nbytes);
            }
        }
    }
    if (info) {
        info->step = (int64_t)step;
        info->epoch = (int64_t)epoch;
        info->seed = seed;
        info->extra = NULL;
    }
out:
    free(where);
    pw_safetensors_close(f);
    return st;
}
