/* pipewright — the pipeline plan and its printed table. See plan.h. */
#include "stages/plan/plan.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/simulate.h"
#include "stages/program/program.h"

pw_plan_config pw_plan_defaults(void)
{
    pw_plan_config c;
    memset(&c, 0, sizeof c);
    c.replicas = 1;
    c.schedule = PW_SCHEDULE_1F1B;
    c.method = PW_PARTITION_AUTO;
    c.balance = PW_BALANCE_FLOPS;
    c.optim = PW_OPTIM_SGD;
    c.gpus = PW_PLACE_GPUS_AUTO;
    return c;
}

void pw_plan_destroy(pw_plan *p)
{
    if (!p) return;
    pw_partition_free(&p->part);
    pw_placement_destroy(p->place);
    free(p->gpu_budgets);
    free(p->gpu_names);
    free(p->inflight);
    free(p);
}

/* Stage budgets from the GPUs' memory (see plan.h): replica 0's stage s is
 * rank s; a GPU's memory is split evenly among every rank placed on it.
 * Leaves p->gpu_budgets NULL when the placement is not on GPUs or no GPU's
 * memory is known. */
static pw_status gpu_budgets(const pw_plan_config *c, pw_plan *p)
{
    const pw_placement *pl = p->place;
    if (!pl || !pl->on_gpus || c->devices || c->memory_budget > 0) return PW_OK;
    int known = 0;
    for (int g = 0; g < pl->n_gpus; g++) known |= c->gpu_memory > 0 || pl->gpus[g].memory > 0;
    if (!known) return PW_OK;
    const int S = p->n_stages;
    p->gpu_budgets = calloc((size_t)S, sizeof *p->gpu_budgets);
    p->gpu_names = calloc((size_t)S, sizeof *p->gpu_names);
    if (!p->gpu_budgets || !p->gpu_names) return pw_error(PW_ERR_NOMEM, "plan: out of memory");
    for (int s = 0; s < S; s++) {
        const int g = pl->ranks[s].gpu;
        const pw_gpu *gpu = &pl->gpus[g];
        int sharing = 0;
        for (int r = 0; r < pl->n_ranks; r++) sharing += pl->ranks[r].gpu == g;
        const int64_t mem = c->gpu_memory > 0 ? c->gpu_memory : gpu->memory;
        p->gpu_budgets[s].speed = 1.0;
        p->gpu_budgets[s].memory = mem > 0 ? mem / (sharing > 0 ? sharing : 1) : 0;
        if (sharing > 1)
            snprintf(p->gpu_names[s], sizeof p->gpu_names[s], "its share of %s (1/%d)", gpu->name, sharing);
        else
            snprintf(p->gpu_names[s], sizeof p->gpu_names[s], "%s", gpu->name);
        p->gpu_budgets[s].name = p->gpu_names[s];
    }
    p->devices = p->gpu_budgets;
    return PW_OK;
}

/* The schedule the plan is for, lowered and validated. */
static pw_status make_schedule(const pw_plan_config *c, int S, pw_schedule **sched,
                               pw_schedule_report **rep, char *name, size_t n)
{
    *sched = NULL;
    *rep = NULL;
    if (c->custom) {
        const pw_schedule *s = c->custom;
        if (s->chunks_per_rank != 1)
            return pw_error(PW_ERR_UNSUPPORTED, "plan: the schedule has %d chunks per rank; the "
                            "planner plans one stage per rank", s->chunks_per_rank);
        if (s->n_ranks != S || s->n_micro != c->micro_batches)
            return pw_error(PW_ERR_INVALID_ARG, "plan: the schedule has %d ranks and %d "
                            "micro-batches, the plan %d stages and %d micro-batches", s->n_ranks,
                            s->n_micro, S, c->micro_batches);
        PW_CHECK(pw_schedule_validate(s, rep));
        if (s->kind == PW_SCHEDULE_CUSTOM) snprintf(name, n, "custom");
        else snprintf(name, n, "custom (%s)", pw_schedule_kind_name(s->kind));
        return PW_OK;
    }
    if (c->schedule == PW_SCHEDULE_INTERLEAVED || c->schedule == PW_SCHEDULE_ZB_V ||
        c->schedule == PW_SCHEDULE_DUALPIPE_V)
        return pw_error(PW_ERR_UNSUPPORTED, "plan: %s runs several chunks per rank; the planner "
                        "plans one stage per rank (gpipe, 1f1b, zb-h1, zb-h2)",
                        pw_schedule_kind_name(c->schedule));
    pw_schedule_config sc = {.kind = c->schedule, .n_stages = S, .n_micro = c->micro_batches,
                             .split_w = c->split_w};
    PW_CHECK(pw_schedule_generate(&sc, sched));
    pw_status st = pw_schedule_lower(*sched);
    if (st == PW_OK) st = pw_schedule_validate(*sched, rep);
    if (st != PW_OK) {
        pw_schedule_destroy(*sched);
        *sched = NULL;
        return st;
    }
    int split = (*sched)->split_w && c->schedule != PW_SCHEDULE_ZB_H1 && c->schedule != PW_SCHEDULE_ZB_H2;
    snprintf(name, n, "%s%s", pw_schedule_kind_name(c->schedule), split ? " (split W)" : "");
    return PW_OK;
}

void pw_plan_partition_config(const pw_plan_config *c, int S, const int *inflight, pw_partition_config *pc)
{
    memset(pc, 0, sizeof *pc);
    pc->n_stages = S;
    pc->method = c->method;
    pc->balance = c->balance;
    pc->micro_batch_size = c->micro_batch_size;
    pc->micro_batches = c->micro_batches;
    pc->node_times = c->profile ? c->profile->times : NULL;
    pc->flops_per_s = c->flops_per_s;
    pc->inflight = inflight;
    pc->devices = c->devices;
    pc->memory_budget = c->memory_budget;
    pc->link_bandwidth = c->link_bandwidth;
    pc->link_latency = c->link_latency;
    pc->optim_state_floats = pw_optim_state_floats(c->optim);
    pc->optim_flops = c->optim == PW_OPTIM_ADAMW ? PW_OPTIM_FLOPS_ADAMW : PW_OPTIM_FLOPS_SGD;
    pc->recompute = c->recompute;
    int K = 1;
    pw_grad_groups(c->grad_groups, c->replicas, c->micro_batches, &K);
    while ((1 << pc->grad_sum_copies) < K) pc->grad_sum_copies++;
}

/* Peak in-flight per stage of a schedule for S stages (stage == rank). */
static pw_status peaks_for(const pw_plan_config *c, int S, int **out, char *name, size_t n)
{
    pw_schedule *s = NULL;
    pw_schedule_report *rep = NULL;
    *out = NULL;
    PW_CHECK(make_schedule(c, S, &s, &rep, name, n));
    int *p = malloc(sizeof(int) * (size_t)S);
    if (!p) {
        pw_schedule_report_destroy(rep);
        pw_schedule_destroy(s);
        return pw_error(PW_ERR_NOMEM, "plan: out of memory");
    }
    for (int k = 0; k < S; k++) p[k] = rep->peak_inflight_chunk[k] > 0 ? rep->peak_inflight_chunk[k] : 1;
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    *out = p;
    return PW_OK;
}

/* Whether some split into s2 stages fits: 1, 0, or -1 on another error. */
static int fits_with(const pw_plan_config *c, int s2)
{
    int *inf = NULL;
    char nm[64];
    if (peaks_for(c, s2, &inf, nm, sizeof nm) != PW_OK) return -1;
    pw_partition_config pc;
    pw_plan_partition_config(c, s2, inf, &pc);
    pc.method = PW_PARTITION_BALANCED;
    if (c->method == PW_PARTITION_FLOPS) pc.balance = PW_BALANCE_FLOPS;
    pw_partition pt;
    pw_status st = pw_partition_plan(c->graph, &pc, &pt);
    free(inf);
    pw_partition_free(&pt);
    return st == PW_OK ? 1 : st == PW_ERR_NOMEM ? 0 : -1;
}

/* When no split fits on uniform devices: the fewest stages that would, by
 * bisection up to 4S + 8 (taking more stages never to need more memory on
 * the fullest one), or 0. */
static int stages_that_fit(const pw_plan_config *c, int S)
{
    if (c->devices || c->custom) return 0;
    int hi = c->graph->n_nodes < 4 * S + 8 ? c->graph->n_nodes : 4 * S + 8;
    if (hi <= S || fits_with(c, hi) != 1) return 0;
    int lo = S; /* does not fit */
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        int r = fits_with(c, mid);
        if (r < 0) return 0;
        if (r) hi = mid;
        else lo = mid;
    }
    return hi;
}

pw_status pw_plan_make(const pw_plan_config *c, pw_plan **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "plan: out is NULL");
    *out = NULL;
    if (!c || !c->graph) return pw_error(PW_ERR_INVALID_ARG, "plan: no graph");
    const pw_graph *g = c->graph;
    const int S = c->stages, M = c->micro_batches;
    if (S < 1 || M < 1 || c->micro_batch_size < 1 || c->replicas < 0)
        return pw_error(PW_ERR_INVALID_ARG, "plan: %d stages, %d micro-batches of %lld samples, "
                        "%d replicas (stages, micro-batches and samples must be >= 1)", S, M,
                        (long long)c->micro_batch_size, c->replicas);
    if (c->balance == PW_BALANCE_TIME && !c->profile)
        return pw_error(PW_ERR_INVALID_ARG, "plan: balance 'time' needs a profile (measure one "
                        "with pw_profile_load_or_measure, --profile FILE)");
    if (c->profile && c->balance == PW_BALANCE_TIME && c->method != PW_PARTITION_FLOPS)
        /* The optimizer is not checked here: files are (pw_profile_load_or_measure,
         * the CLI's path); a profile in memory for another optimizer is
         * used, and the header says so. */
        PW_CHECK(pw_profile_check(c->profile, "the profile", g, c->micro_batch_size,
                                  c->profile->device, c->profile->optim));

    pw_status st = PW_OK;
    pw_schedule *sched = NULL;
    pw_schedule_report *rep = NULL;
    pw_sim_result *res = NULL;
    pw_sim_chunk_cost *cost = NULL;
    pw_plan *p = calloc(1, sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "plan: out of memory");
    p->graph = g;
    p->n_stages = S;
    p->n_replicas = c->replicas > 0 ? c->replicas : 1;
    p->micro_batches = M;
    p->micro_batch_size = c->micro_batch_size;
    p->balance = c->method == PW_PARTITION_FLOPS ? PW_BALANCE_FLOPS : c->balance;
    p->link_bandwidth = c->link_bandwidth;
    p->link_latency = c->link_latency;
    p->optim_state_floats = pw_optim_state_floats(c->optim);
    p->optim = c->optim;
    p->recompute = c->recompute;
    p->memory_budget = c->memory_budget;
    p->gpu_memory = c->gpu_memory;
    p->devices = c->devices;
    p->theory_bubble = -1.0;
    snprintf(p->topology, sizeof p->topology, "%s", c->topology_name ? c->topology_name : "");
    if (p->balance == PW_BALANCE_TIME)
        snprintf(p->source, sizeof p->source, "measured on %s, median of %d%s%s%s%s%s", c->profile->device,
                 c->profile->iterations,
                 c->profile->optim != c->optim ? "; its optimizer times are for " : "",
                 c->profile->optim != c->optim ? pw_optim_name(c->profile->optim) : "",
                 c->profile->optim != c->optim ? ", this plan uses " : "",
                 c->profile->optim != c->optim ? pw_optim_name(c->optim) : "",
                 c->profile->optim != c->optim ? " (measure one for it)" : "");
    else
        snprintf(p->source, sizeof p->source, "analytic, FLOPs at %.3g GFLOP/s per unit of speed",
                 (c->flops_per_s > 0 ? c->flops_per_s : 1e10) / 1e9);

    PW_CHECK_GOTO(make_schedule(c, S, &sched, &rep, p->schedule, sizeof p->schedule), st, fail);
    /* Placement first: on GPUs it gives the stages their budgets. */
    if (c->n_gpu_list > 0 && !c->topology) {
        st = pw_error(PW_ERR_INVALID_ARG, "plan: GPUs given without a topology to find their cores in");
        goto fail;
    }
    if (c->topology) {
        pw_place_config plc = {.n_stages = S, .n_replicas = p->n_replicas, .cores_per_rank = c->cores_per_rank,
                               .gpus = c->gpus, .gpu_list = c->gpu_list, .n_gpu_list = c->n_gpu_list};
        PW_CHECK_GOTO(pw_place_stages(c->topology, &plc, &p->place), st, fail);
        PW_CHECK_GOTO(gpu_budgets(c, p), st, fail);
    }
    if (c->gpu_memory > 0 && (!p->place || !p->place->on_gpus)) {
        st = pw_error(PW_ERR_INVALID_ARG, "plan: a GPU memory size is given but the stages are not placed "
                      "on GPUs (give a topology with GPUs, or this machine's)");
        goto fail;
    }
    pw_plan_config cg = *c; /* the partition's view: the GPUs' budgets as devices */
    if (p->gpu_budgets) cg.devices = p->gpu_budgets;
    c = &cg;
    p->inflight = malloc(sizeof(int) * (size_t)S);
    cost = calloc((size_t)S, sizeof *cost);
    if (!p->inflight || !cost) {
        st = pw_error(PW_ERR_NOMEM, "plan: out of memory");
        goto fail;
    }
    for (int s = 0; s < S; s++)
        p->inflight[s] = rep->peak_inflight_chunk[s] > 0 ? rep->peak_inflight_chunk[s] : 1;

    pw_partition_config pc;
    pw_plan_partition_config(c, S, p->inflight, &pc);
    st = pw_partition_plan(g, &pc, &p->part);
    if (st == PW_ERR_NOMEM) {
        char msg[2048];
        snprintf(msg, sizeof msg, "%s", pw_last_error());
        int more = pc.method == PW_PARTITION_CUTS || (pc.method == PW_PARTITION_AUTO &&
                   g->n_cuts + 1 == S) ? 0 : stages_that_fit(c, S);
        if (more)
            st = pw_error(st, "%s; %d stages would fit", msg, more);
        else
            st = pw_error(st, "%s", msg);
        goto fail;
    }
    if (st != PW_OK) goto fail;

    /* One simulated step of the actual schedule with the predicted costs. */
    for (int s = 0; s < S; s++) {
        const pw_stage_cost *o = &p->part.stage[s];
        cost[s].f = o->f;
        cost[s].b = o->b;
        cost[s].w = o->w;
        cost[s].optim = o->optim; /* the simulator's OPTIM, once per step */
        cost[s].msg_bytes = o->send_act_bytes;
        cost[s].act_bytes = o->mem.stash;
    }
    if (!sched) { /* a custom schedule: simulate the caller's */
        pw_sim_config sc = {.chunks = cost, .link_latency = c->link_latency,
                            .link_bandwidth = c->link_bandwidth};
        st = pw_simulate(c->custom, &sc, &res);
    } else {
        pw_sim_config sc = {.chunks = cost, .link_latency = c->link_latency,
                            .link_bandwidth = c->link_bandwidth};
        st = pw_simulate(sched, &sc, &res);
        pw_schedule_config kc = {.kind = c->schedule, .n_stages = S, .n_micro = M,
                                 .split_w = c->split_w};
        p->theory_bubble = pw_schedule_config_bubble(&kc);
    }
    if (st != PW_OK) goto fail;
    p->step_time = p->part.step_time = res->step_time;
    p->bubble = p->part.bubble = res->bubble;

    pw_sim_result_destroy(res);
    free(cost);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(sched);
    *out = p;
    return PW_OK;
fail:
    pw_sim_result_destroy(res);
    free(cost);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(sched);
    pw_plan_destroy(p);
    return st;
}

/* ------------------------------------------------------------ printing */

typedef struct tunit {
    const char *name;
    double scale;
} tunit;

static tunit time_unit(double t)
{
    if (t >= 1.0) return (tunit){"s", 1.0};
    if (t >= 1e-3) return (tunit){"ms", 1e3};
    return (tunit){"us", 1e6};
}

static const char *bytes_or_dash(int64_t b, char *buf, size_t n)
{
    if (b <= 0) return "-";
    return pw_format_bytes((double)b, buf, n);
}

static const char *node_name(const pw_graph *g, int i) { return g->values[g->nodes[i].output].name; }

/* The GPUs the ranks use: model, memory, and which stages share each. */
static void print_gpus(FILE *f, const pw_plan *p)
{
    const pw_placement *pl = p->place;
    fprintf(f, "GPUs:\n");
    for (int g = 0; g < pl->n_gpus; g++) {
        const pw_gpu *gpu = &pl->gpus[g];
        char line[512], a[32];
        int n = 0, off = 0;
        for (int r = 0; r < pl->n_ranks && off < 200; r++) {
            if (pl->ranks[r].gpu != g) continue;
            off += snprintf(line + off, sizeof line - (size_t)off, n ? ", %d" : "%d", pl->ranks[r].stage);
            if (pl->ranks[r].replica > 0 && off < 200)
                off += snprintf(line + off, sizeof line - (size_t)off, " (replica %d)", pl->ranks[r].replica);
            n++;
        }
        if (!n) continue;
        /* The GPU's memory as the plan takes it (gpu_memory overrides). */
        const int64_t mem = p->gpu_memory > 0 ? p->gpu_memory : gpu->memory;
        fprintf(f, "  %-7s %-13s %-24s memory %-10s stage%s %s", gpu->name, gpu->pci[0] ? gpu->pci : "-",
                gpu->model[0] ? gpu->model : "(model unknown)",
                mem > 0 ? pw_format_bytes((double)mem, a, sizeof a) : "unknown", n > 1 ? "s" : "", line);
        /* As gpu_budgets computes replica 0's (other replicas mirror them). */
        if (p->gpu_budgets && mem > 0)
            fprintf(f, ", budget %s%s", pw_format_bytes((double)(mem / n), a, sizeof a), n > 1 ? " each" : "");
        if (!gpu->located) fprintf(f, " (not in the topology: any core)");
        fprintf(f, "\n");
    }
}

pw_status pw_plan_print(FILE *f, const pw_plan *p)
{
    if (!f || !p) return pw_error(PW_ERR_INVALID_ARG, "plan: nothing to print");
    const pw_graph *g = p->graph;
    const pw_partition *pt = &p->part;
    const int S = p->n_stages;
    char a[32], b[32];

    fprintf(f, "plan for graph %s (%s): %d stage%s, %s, %d micro-batch%s of %lld sample%s, "
               "partition %s, balance %s\n", g->name, g->file, S, S > 1 ? "s" : "", p->schedule,
            p->micro_batches, p->micro_batches > 1 ? "es" : "", (long long)p->micro_batch_size,
            p->micro_batch_size > 1 ? "s" : "", pw_partition_method_name(pt->method),
            pw_balance_name(p->balance));
    fprintf(f, "  op times: %s\n", p->source);
    if (p->link_bandwidth > 0)
        fprintf(f, "  links: %.3g GB/s, %.3g us per message\n", p->link_bandwidth / 1e9,
                1e6 * p->link_latency);
    else if (p->link_latency > 0)
        fprintf(f, "  links: unlimited bandwidth, %.3g us per message\n", 1e6 * p->link_latency);
    else
        fprintf(f, "  links: free (in-process hand-off)\n");
    fprintf(f, "  memory: optimizer %s, state %d float%s per parameter, recomputation %s, budget %s\n",
            pw_optim_name(p->optim), p->optim_state_floats, p->optim_state_floats == 1 ? "" : "s", p->recompute ? "on" : "off",
            p->gpu_budgets ? "each GPU's memory, shared by the stages on it"
            : p->devices ? "per device" : p->memory_budget > 0 ? pw_format_bytes((double)p->memory_budget, a, sizeof a) : "none");

    tunit u = time_unit(pt->bottleneck);
    char hf[16], hb[16], hw[16], ho[16], hc[16], ht[16];
    snprintf(hf, sizeof hf, "F %s", u.name);
    snprintf(hb, sizeof hb, "B %s", u.name);
    snprintf(hw, sizeof hw, "W %s", u.name);
    snprintf(ho, sizeof ho, "O %s", u.name);
    snprintf(hc, sizeof hc, "send %s", u.name);
    snprintf(ht, sizeof ht, "time %s", u.name);
    fprintf(f, "\n%5s  %-9s %-24s %9s %9s %9s %9s %9s %9s %5s  %-27s %-10s %-10s  %s\n", "stage",
            "nodes", "ops", hf, hb, hw, ho, hc, ht, "slots", "memory / budget", "send act",
            "send grad", "device");
    for (int s = 0; s < S; s++) {
        const pw_stage_cost *o = &pt->stage[s];
        int b0 = pt->begin[s], e0 = pt->begin[s + 1];
        char nodes[24], ops[64], mem[48], dev[160] = "";
        snprintf(nodes, sizeof nodes, e0 - b0 > 1 ? "%d-%d" : "%d", b0, e0 - 1);
        if (e0 - b0 > 1)
            snprintf(ops, sizeof ops, "%.9s .. %.9s (%d)", node_name(g, b0), node_name(g, e0 - 1), e0 - b0);
        else
            snprintf(ops, sizeof ops, "%.20s", node_name(g, b0));
        if (o->mem.budget > 0)
            snprintf(mem, sizeof mem, "%s / %s %.0f%%", pw_format_bytes((double)o->mem.total, a, sizeof a),
                     pw_format_bytes((double)o->mem.budget, b, sizeof b),
                     100.0 * (double)o->mem.total / (double)o->mem.budget);
        else
            snprintf(mem, sizeof mem, "%s", pw_format_bytes((double)o->mem.total, a, sizeof a));
        size_t off = 0;
        if (p->devices && !p->gpu_budgets) { /* the GPU is in the placement */
            const pw_device_spec *d = &p->devices[s];
            double speed = d->speed > 0 ? d->speed : 1.0;
            if (d->name) off = (size_t)snprintf(dev, sizeof dev, "%s x%.3g", d->name, speed);
            else off = (size_t)snprintf(dev, sizeof dev, "device %d x%.3g", s, speed);
        }
        if (p->place && off < sizeof dev) {
            /* Replica 0's rank for this stage; other replicas follow the rule. */
            if (off) off += (size_t)snprintf(dev + off, sizeof dev - off, ", ");
            if (off < sizeof dev) pw_placement_describe(p->place, s, dev + off, sizeof dev - off);
        }
        if (!dev[0]) snprintf(dev, sizeof dev, "-");
        fprintf(f, "%5d  %-9s %-24s %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %5d  %-27s %-10s %-10s  %s\n", s,
                nodes, ops, u.scale * o->f, u.scale * o->b, u.scale * o->w, u.scale * o->optim,
                u.scale * o->comm, u.scale * o->time, o->mem.slots, mem, bytes_or_dash(o->send_act_bytes, a, sizeof a),
                bytes_or_dash(o->send_grad_bytes, b, sizeof b), dev);
    }

    fprintf(f, "(F, B, W, send and time per micro-batch; O, the optimizer update, once per step: "
               "time = F + B + W + send + O / %d)\n", p->micro_batches);
    fprintf(f, "\nstage ops:\n");
    for (int s = 0; s < S; s++) {
        int col = fprintf(f, "  %d:", s);
        for (int i = pt->begin[s]; i < pt->begin[s + 1]; i++) {
            char item[96];
            int len = snprintf(item, sizeof item, " %s %s%s", pw_op_name(g->nodes[i].op),
                               node_name(g, i), i + 1 < pt->begin[s + 1] ? "," : "");
            if (col + len > 100) col = fprintf(f, "\n     ");
            col += fprintf(f, "%s", item);
        }
        fprintf(f, "\n");
    }

    fprintf(f, "\nbottleneck: stage %d, %.3f %s per micro-batch", pt->bottleneck_stage,
            u.scale * pt->bottleneck, u.name);
    if (pt->method == PW_PARTITION_CUTS) fprintf(f, "\n%s", pt->note);
    else fprintf(f, " (the best split under this model)");
    tunit su = time_unit(p->step_time);
    fprintf(f, "\npredicted step: %.3f %s, bubble %.1f%%", su.scale * p->step_time, su.name,
            100.0 * p->bubble);
    if (p->theory_bubble >= 0)
        fprintf(f, " (%s with equal stages and free links: %.1f%%)", p->schedule,
                100.0 * p->theory_bubble);
    fprintf(f, "\n");
    if (p->place) {
        fprintf(f, "placement%s%s: %d rank%s (%d stage%s x %d replica%s) on %s", p->topology[0] ? " on " : "",
                p->topology, p->place->n_ranks, p->place->n_ranks > 1 ? "s" : "", S, S > 1 ? "s" : "",
                p->n_replicas, p->n_replicas > 1 ? "s" : "",
                p->place->on_gpus ? "GPUs" : p->place->cores_are_pus ? "PUs" : "cores");
        if (p->place->note[0]) fprintf(f, "; %s", p->place->note);
        fprintf(f, "\n");
        for (int r = S; r < p->place->n_ranks; r++) {
            char d[160];
            pw_placement_describe(p->place, r, d, sizeof d);
            fprintf(f, "  replica %d stage %d: %s\n", p->place->ranks[r].replica,
                    p->place->ranks[r].stage, d);
        }
        if (p->place->on_gpus) print_gpus(f, p);
    }
    if (ferror(f)) return pw_error(PW_ERR_IO, "plan: write error");
    return PW_OK;
}

/* ------------------------------------------------------ flag helpers */

pw_status pw_parse_bytes(const char *s, int64_t *out)
{
    if (!s || !*s) return pw_error(PW_ERR_INVALID_ARG, "'%s' is not a size (e.g. 512M, 2GiB)", s ? s : "");
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !isfinite(v) || v < 0)
        return pw_error(PW_ERR_INVALID_ARG, "'%s' is not a size (e.g. 512M, 2GiB)", s);
    double mul = 1.0;
    const char *u = end;
    while (*u == ' ') u++;
    switch (toupper((unsigned char)*u)) {
    case 'K': mul = 1024.0; u++; break;
    case 'M': mul = 1048576.0; u++; break;
    case 'G': mul = 1073741824.0; u++; break;
    case 'T': mul = 1099511627776.0; u++; break;
    default: break;
    }
    if (mul > 1.0 && *u == 'i') u++;
    if (*u == 'B' || (*u == 'b' && mul > 1.0)) u++;
    if (*u || v * mul > 9.2e18)
        return pw_error(PW_ERR_INVALID_ARG, "'%s' is not a size (e.g. 512M, 2GiB)", s);
    *out = (int64_t)llround(v * mul);
    return PW_OK;
}

/* Splits a comma list; returns the count, -1 on a list too long. */
static int split_list(const char *s, char items[][64], int cap)
{
    int n = 0;
    const char *p = s;
    for (;;) {
        size_t len = strcspn(p, ",");
        if (n >= cap || len >= 64) return -1;
        memcpy(items[n], p, len);
        items[n][len] = '\0';
        n++;
        if (!p[len]) break;
        p += len + 1;
    }
    return n;
}

pw_status pw_plan_parse_devices(const char *speeds, const char *memory, int n_stages,
                                pw_device_spec **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "devices: out is NULL");
    *out = NULL;
    if (n_stages < 1 || n_stages > 4096)
        return pw_error(PW_ERR_INVALID_ARG, "devices: %d stages", n_stages);
    pw_device_spec *d = calloc((size_t)n_stages, sizeof *d);
    char (*items)[64] = malloc(sizeof(char[64]) * 4096);
    if (!d || !items) {
        free(d);
        free(items);
        return pw_error(PW_ERR_NOMEM, "devices: out of memory");
    }
    pw_status st = PW_OK;
    for (int s = 0; s < n_stages; s++) d[s].speed = 1.0;
    for (int which = 0; which < 2 && st == PW_OK; which++) {
        const char *list = which == 0 ? speeds : memory;
        const char *what = which == 0 ? "device speeds" : "device memory";
        if (!list) continue;
        int n = split_list(list, items, 4096);
        if (n != 1 && n != n_stages) {
            st = pw_error(PW_ERR_INVALID_ARG, "%s: %d values for %d stages (give one per stage, "
                          "or one for all)", what, n < 0 ? 4097 : n, n_stages);
            break;
        }
        for (int s = 0; s < n_stages && st == PW_OK; s++) {
            const char *item = items[n == 1 ? 0 : s];
            if (which == 0) {
                char *end;
                errno = 0;
                double v = strtod(item, &end);
                if (errno || end == item || *end || !isfinite(v) || v <= 0)
                    st = pw_error(PW_ERR_INVALID_ARG, "%s: '%s' is not a speed > 0", what, item);
                else
                    d[s].speed = v;
            } else {
                int64_t b;
                if (pw_parse_bytes(item, &b) != PW_OK || b <= 0)
                    st = pw_error(PW_ERR_INVALID_ARG, "%s: '%s' is not a size > 0 (e.g. 16G)", what, item);
                else
                    d[s].memory = b;
            }
        }
    }
    free(items);
    if (st != PW_OK) {
        free(d);
        return st;
    }
    *out = d;
    return PW_OK;
}
