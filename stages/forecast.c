/* pipewright — forecasts: partition + cost model + simulator. */
#include "stages/forecast.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "graph/partition.h"

pw_forecast_config pw_forecast_defaults(void)
{
    pw_forecast_config c;
    memset(&c, 0, sizeof c);
    c.stages = 1;
    c.replicas = 1;
    c.micro_batches = 1;
    c.micro_batch_size = 1;
    c.schedule = PW_SCHEDULE_1F1B;
    c.flops_per_s = 50e9;
    c.link_latency_s = 5e-6;
    c.link_bandwidth = 10e9;
    c.allreduce_bandwidth = 10e9;
    c.optim_state_floats = 1;
    return c;
}

static int chunks_per_rank(const pw_forecast_config *c)
{
    if (c->schedule == PW_SCHEDULE_ZB_V) return 2;
    if (c->schedule == PW_SCHEDULE_INTERLEAVED) return c->chunks_per_rank > 0 ? c->chunks_per_rank : 2;
    return 1;
}

/* Whether value v (produced before node `end`) is still needed at or after it. */
static int crosses(const pw_graph *g, int v, int end)
{
    for (int i = end; i < g->n_nodes; i++)
        for (int k = 0; k < g->nodes[i].n_inputs; k++)
            if (g->nodes[i].inputs[k] == v) return 1;
    return 0;
}

pw_status pw_forecast_run(const pw_forecast_config *c, pw_forecast *out)
{
    memset(out, 0, sizeof *out);
    if (!c->graph || c->stages < 1 || c->replicas < 1 || c->micro_batches < 1 ||
        c->micro_batch_size < 1 || !(c->flops_per_s > 0))
        return pw_error(PW_ERR_INVALID_ARG, "forecast: graph, stages, replicas, micro-batches, "
                        "micro-batch size and compute rate must all be positive");
    const pw_graph *g = c->graph;
    const int v = chunks_per_rank(c), S = c->stages, C = S * v;
    const double mbs = (double)c->micro_batch_size;
    pw_status st;
    pw_partition part = {0};
    pw_schedule *s = NULL;
    pw_schedule_report *rep = NULL;
    pw_sim_result *res = NULL;
    pw_sim_chunk_cost *cost = NULL;
    int64_t *fixed = NULL; /* per rank: params + grads + optimizer state */

    PW_CHECK_GOTO(pw_partition_make(g, C, PW_PARTITION_FLOPS, &part), st, out);
    pw_schedule_config sc = {.kind = c->schedule, .n_stages = S, .n_micro = c->micro_batches,
                             .split_w = c->split_w, .chunks_per_rank = v,
                             .n_buckets = c->replicas > 1 ? 1 : 0};
    PW_CHECK_GOTO(pw_schedule_generate(&sc, &s), st, out);
    PW_CHECK_GOTO(pw_schedule_lower(s), st, out);
    PW_CHECK_GOTO(pw_schedule_validate(s, &rep), st, out);

    cost = calloc((size_t)C, sizeof *cost);
    fixed = calloc((size_t)S, sizeof *fixed);
    out->peak_memory = calloc((size_t)S, sizeof(int64_t));
    out->peak_inflight = calloc((size_t)S, sizeof(int));
    if (!cost || !fixed || !out->peak_memory || !out->peak_inflight) {
        st = pw_error(PW_ERR_NOMEM, "forecast: out of memory");
        goto out;
    }
    for (int ch = 0; ch < C; ch++) {
        int b = part.begin[ch], e = part.begin[ch + 1];
        double f = 0, bi = 0, bw = 0;
        int64_t params = 0, act = 0;
        for (int i = b; i < e; i++) {
            pw_op_cost oc;
            if (pw_graph_node_cost(g, i, &oc) != PW_OK) continue;
            f += oc.flops_fwd;
            bi += oc.flops_bwd_input;
            bw += oc.flops_bwd_weight;
            params += oc.param_bytes;
            act += oc.act_bytes;
        }
        int64_t msg = 0;
        for (int val = 0; val < g->n_values; val++) {
            int prod = g->values[val].producer;
            if (prod >= 0 && prod < e && crosses(g, val, e))
                msg += (int64_t)pw_dtype_size(g->values[val].dtype) *
                       pw_shape_numel(&g->values[val].shape);
        }
        cost[ch].f = f * mbs / c->flops_per_s;
        cost[ch].b = bi * mbs / c->flops_per_s;
        cost[ch].w = bw * mbs / c->flops_per_s;
        /* The optimizer: about 4 FLOPs per parameter element (4 bytes each). */
        cost[ch].optim = 4.0 * ((double)params / 4.0) / c->flops_per_s;
        cost[ch].allreduce = c->replicas > 1
            ? pw_sim_ring_allreduce(params, c->replicas, c->link_latency_s, c->allreduce_bandwidth)
            : 0.0;
        cost[ch].msg_bytes = ch + 1 < C ? (int64_t)(msg * mbs) : 0;
        cost[ch].act_bytes = (int64_t)((double)act * mbs);
        fixed[pw_schedule_rank_of(s, ch)] += params * (2 + c->optim_state_floats);
    }
    pw_sim_config sim = {.chunks = cost, .link_latency = c->link_latency_s,
                         .link_bandwidth = c->link_bandwidth, .trace = c->trace};
    PW_CHECK_GOTO(pw_simulate(s, &sim, &res), st, out);
    out->schedule = c->schedule;
    out->chunks_per_rank = v;
    out->n_ranks = S;
    out->step_time = res->step_time;
    out->bubble = res->bubble;
    out->steady_bubble = res->steady_bubble;
    out->samples_per_s = res->step_time > 0
        ? (double)c->replicas * c->micro_batches * mbs / res->step_time : 0.0;
    out->fits = 1;
    for (int r = 0; r < S; r++) {
        out->peak_memory[r] = fixed[r] + res->ranks[r].peak_act_bytes;
        out->peak_inflight[r] = rep->peak_inflight[r];
        if (c->memory_budget > 0 && out->peak_memory[r] > c->memory_budget) out->fits = 0;
    }
out:
    if (st != PW_OK) pw_forecast_free(out);
    pw_sim_result_destroy(res);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    pw_partition_free(&part);
    free(cost);
    free(fixed);
    return st;
}

void pw_forecast_free(pw_forecast *f)
{
    if (!f) return;
    free(f->peak_memory);
    free(f->peak_inflight);
    f->peak_memory = NULL;
    f->peak_inflight = NULL;
}

static int64_t max_mem(const pw_forecast *f)
{
    int64_t m = 0;
    for (int r = 0; r < f->n_ranks; r++)
        if (f->peak_memory[r] > m) m = f->peak_memory[r];
    return m;
}

pw_status pw_forecast_auto(const pw_forecast_config *cfg, pw_forecast *best, FILE *report)
{
    static const struct { pw_schedule_kind kind; int v; } cand[] = {
        {PW_SCHEDULE_GPIPE, 1},       {PW_SCHEDULE_1F1B, 1},        {PW_SCHEDULE_INTERLEAVED, 2},
        {PW_SCHEDULE_INTERLEAVED, 4}, {PW_SCHEDULE_ZB_H1, 1},       {PW_SCHEDULE_ZB_H2, 1},
        {PW_SCHEDULE_ZB_V, 2},
    };
    memset(best, 0, sizeof *best);
    int have = 0;
    int64_t least_need = 0;
    const char *least_name = NULL;
    for (size_t i = 0; i < sizeof cand / sizeof cand[0]; i++) {
        pw_forecast_config c = *cfg;
        c.schedule = cand[i].kind;
        c.chunks_per_rank = cand[i].v;
        c.trace = NULL;
        pw_forecast f;
        if (pw_forecast_run(&c, &f) != PW_OK) {
            if (report)
                fprintf(report, "  %-12s v=%d  not applicable: %s\n",
                        pw_schedule_kind_name(c.schedule), cand[i].v, pw_last_error());
            continue;
        }
        int64_t need = max_mem(&f);
        if (report)
            fprintf(report, "  %-12s v=%d  step %9.3f ms  bubble %5.1f%%  peak memory %8.1f MiB%s\n",
                    pw_schedule_kind_name(c.schedule), cand[i].v, f.step_time * 1e3,
                    100.0 * f.bubble, (double)need / (1 << 20),
                    f.fits ? "" : "  (over budget)");
        if (!least_name || need < least_need) {
            least_need = need;
            least_name = pw_schedule_kind_name(c.schedule);
        }
        if (f.fits && (!have || f.step_time < best->step_time)) {
            pw_forecast_free(best);
            *best = f;
            have = 1;
        } else {
            pw_forecast_free(&f);
        }
    }
    if (!have) {
        if (!least_name)
            return pw_error(PW_ERR_INVALID_ARG, "no schedule applies to %d stages and %d "
                            "micro-batches", cfg->stages, cfg->micro_batches);
        return pw_error(PW_ERR_NOMEM, "no schedule fits the memory budget of %.1f MiB per rank; "
                        "the smallest need is %.1f MiB (%s): use more stages, fewer "
                        "micro-batches in flight, or recomputation",
                        (double)cfg->memory_budget / (1 << 20), (double)least_need / (1 << 20),
                        least_name);
    }
    if (report)
        fprintf(report, "chose %s (v=%d): the fastest simulated step (%.3f ms) that fits the "
                "memory budget\n", pw_schedule_kind_name(best->schedule), best->chunks_per_rank,
                best->step_time * 1e3);
    return PW_OK;
}

pw_status pw_forecast_write_trace(const pw_forecast_config *c, const pw_forecast *f,
                                  const char *path)
{
    if (!c->trace) return pw_error(PW_ERR_INVALID_ARG, "forecast: no trace was recorded");
    char name[64];
    snprintf(name, sizeof name, "%s (simulated)", pw_schedule_kind_name(f->schedule));
    pw_schedule_config sc = {.kind = f->schedule, .n_stages = f->n_ranks,
                             .n_micro = c->micro_batches, .split_w = c->split_w,
                             .chunks_per_rank = f->chunks_per_rank};
    double theory = pw_schedule_config_bubble(&sc);
    pw_trace_meta m = {
        .schedule = name, .graph = c->graph->name, .n_ranks = f->n_ranks,
        .n_chunks = f->n_ranks * f->chunks_per_rank, .n_micro = c->micro_batches,
        .n_replicas = c->replicas, .micro_batch = c->micro_batch_size, .steps = 1,
        .theory_bubble = theory, .peak_inflight = f->peak_inflight,
    };
    return pw_trace_write(c->trace, path, &m);
}
