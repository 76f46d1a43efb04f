/* pipewright — re-partitioning a running pipeline between steps, its
 * measurements and the slowdown test hook (stages/train/rebalance.h). */
#include "stages/train/rebalance.h"

#include <errno.h>
#include <pthread.h>
#include <time.h>

#include "stages/train/pipeline-internal.h"

/* ---- PW_TEST_SLOW ---- */

#define MAX_SLOW 16

static struct {
    pthread_once_t once;
    int n;
    int rank[MAX_SLOW];
    double factor[MAX_SLOW];
    long long from[MAX_SLOW];
    long long every[MAX_SLOW];   /* 0: every step from `from` on */
    unsigned char world[MAX_SLOW]; /* rank is a world rank (wRANK) */
} slow = {PTHREAD_ONCE_INIT, 0, {0}, {0}, {0}, {0}, {0}};

static void slow_read(void)
{
    const char *spec = getenv("PW_TEST_SLOW");
    while (spec && *spec && slow.n < MAX_SLOW) {
        int r, k = 0;
        double f;
        long long from = 1, every = 0;
        const int world = *spec == 'w';
        if (sscanf(spec + world, "%d:%lf%n", &r, &f, &k) < 2 || r < 0 || !(f >= 1.0) || f > 1e3) {
            PW_WARN("PW_TEST_SLOW: '%s' is not [w]RANK:FACTOR[@STEP][/EVERY] (FACTOR in [1, 1000]); ignored", spec);
            break;
        }
        spec += world + k;
        if (*spec == '@' && sscanf(spec + 1, "%lld%n", &from, &k) == 1) spec += 1 + k;
        if (*spec == '/' && sscanf(spec + 1, "%lld%n", &every, &k) == 1 && every > 0) spec += 1 + k;
        slow.world[slow.n] = (unsigned char)world;
        slow.every[slow.n] = every;
        slow.rank[slow.n] = r;
        slow.factor[slow.n] = f;
        slow.from[slow.n] = from;
        slow.n++;
        if (*spec == ',') spec++;
        else break;
    }
}

static double slow_factor(int world, int rank, int64_t step)
{
    pthread_once(&slow.once, slow_read);
    double f = 1.0;
    for (int i = 0; i < slow.n; i++)
        if (slow.world[i] == world && slow.rank[i] == rank && step >= slow.from[i] &&
            (slow.every[i] == 0 || (step - slow.from[i]) % slow.every[i] == 0))
            f = slow.factor[i];
    return f;
}

double pw_test_slow_factor(int rank, int64_t step) { return slow_factor(0, rank, step); }
double pw_test_slow_factor_world(int world_rank, int64_t step) { return slow_factor(1, world_rank, step); }

/* After a compute callback that began at t0: sleep (factor − 1) × its time. */
static void slow_after(const gstage *gs, int64_t t0)
{
    const pw_pipeline *pl = gs->pl;
    double f = pw_test_slow_factor(pw_schedule_rank_of(pl->sched, gs->index), pl->step + 1);
    if (pl->t) f *= pw_test_slow_factor_world(pl->t->world_rank, pl->step + 1);
    if (f <= 1.0) return;
    const double extra = (f - 1.0) * (double)(pw_now_ns() - t0);
    struct timespec ts = {(time_t)(extra / 1e9), (long)fmod(extra, 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static pw_status slow_forward(void *self, int mb, int slot)
{
    const int64_t t0 = pw_now_ns();
    pw_status st = pl_gstage_i.forward(self, mb, slot);
    slow_after(self, t0);
    return st;
}

static pw_status slow_backward_input(void *self, int mb, int slot)
{
    const int64_t t0 = pw_now_ns();
    pw_status st = pl_gstage_i.backward_input(self, mb, slot);
    slow_after(self, t0);
    return st;
}

static pw_status slow_backward_weight(void *self, int mb, int slot)
{
    const int64_t t0 = pw_now_ns();
    pw_status st = pl_gstage_i.backward_weight(self, mb, slot);
    slow_after(self, t0);
    return st;
}

static pw_status slow_backward_bucket(void *self, int mb, int slot, int bucket, pw_bwd_part part)
{
    const int64_t t0 = pw_now_ns();
    pw_status st = pl_gstage_i.backward_bucket(self, mb, slot, bucket, part);
    slow_after(self, t0);
    return st;
}

static pw_status slow_optimizer_step(void *self, long step)
{
    const int64_t t0 = pw_now_ns();
    pw_status st = pl_gstage_i.optimizer_step(self, step);
    slow_after(self, t0);
    return st;
}

static pw_stage_i slow_i, slow_post_i;

static void slow_vt_init(void)
{
    slow_i = pl_gstage_i;
    slow_i.forward = slow_forward;
    slow_i.backward_input = slow_backward_input;
    slow_i.backward_weight = slow_backward_weight;
    slow_i.backward_bucket = slow_backward_bucket;
    slow_i.optimizer_step = slow_optimizer_step;
    slow_post_i = slow_i;
    slow_post_i.optimizer_step = pl_gstage_post_i.optimizer_step; /* the pipeline runs it (finish_step) */
}

/* The engine's vtable for the chunks of `pl`: the graph stage's, wrapped
 * to run slower under PW_TEST_SLOW. */
const pw_stage_i *pl_chunk_vt(const pw_pipeline *pl)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&slow.once, slow_read);
    if (slow.n == 0) return pl->post_optim ? &pl_gstage_post_i : &pl_gstage_i;
    pthread_once(&once, slow_vt_init);
    return pl->post_optim ? &slow_post_i : &slow_i;
}

/* ---- measurements ---- */

pw_status pw_pipeline_rank_busy(pw_pipeline *pl, double *busy)
{
    const int S = pl->S;
    for (int r = 0; r < S; r++) busy[r] = 0.0;
    if (!pl->t) {
        for (int k = 0; k < pl->NR; k++)
            for (int r = 0; r < S; r++) {
                pw_engine_rank_stats rs;
                pw_engine_rank_stats_get(pl->engine, k * S + r, &rs);
                if (rs.busy_s > busy[r]) busy[r] = rs.busy_s;
            }
        return PW_OK;
    }
    const pw_transport *t = pl->t;
    pw_engine_rank_stats rs;
    pw_engine_rank_stats_get(pl->engine, t->replica * S + t->rank, &rs);
    double *all = calloc((size_t)t->world_size, sizeof *all);
    if (!all) return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    pw_status st = pw_transport_allgather(t, &rs.busy_s, sizeof rs.busy_s, all);
    for (int k = 0; k < pl->NR && st == PW_OK; k++)
        for (int r = 0; r < S; r++) {
            double b = all[pw_transport_world_of(t, k, r)];
            if (b > busy[r]) busy[r] = b;
        }
    free(all);
    return st == PW_OK ? PW_OK : pw_error_prefix(st, "rebalance: gathering the stage times: ");
}

/* ---- the move ---- */

/* holds[r · n_params + p] = 1 when a chunk of pipeline rank r uses graph
 * parameter p under `pl`'s cuts. */
static unsigned char *rank_holdings(const pw_pipeline *pl)
{
    const pw_graph *g = pl->g;
    unsigned char *h = calloc((size_t)pl->S * (size_t)(g->n_params + 1), 1);
    if (!h) return NULL;
    for (int c = 0; c < pl->C; c++) {
        const int r = pw_schedule_rank_of(pl->sched, c);
        for (int i = pl->part.begin[c]; i < pl->part.begin[c + 1]; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++) h[(size_t)r * (size_t)g->n_params + (size_t)g->nodes[i].params[q]] = 1;
    }
    return h;
}

/* The graph whose parameter shapes local tensor rank r holds: the rank
 * graph at T > 1 (its parts), else the pipeline's. */
static const pw_graph *rank_graph(const pw_pipeline *pl, int r)
{
    return pl->T > 1 ? pl->rank_g[pl->tp0 + r] : pl->g;
}

/* The first program of local replica lrep holding graph parameter gp in
 * this process (at T > 1 local tensor rank r's: the same index), with the
 * parameter's index there; NULL when none. */
static pw_program *holder(pw_pipeline *pl, int lrep, int r, int gp, int *local)
{
    for (int c = 0; c < pl->C; c++) {
        if (!stage_here(pl, c)) continue;
        pw_program *p = pl_chunk_param(pl, lrep, c, gp, local);
        if (p) return pl->T > 1 ? stage_at(pl, lrep, c)->rank_prog[r] : p;
    }
    return NULL;
}

/* A parameter's values (local tensor rank r's part at T > 1), then each
 * optimizer state buffer: (1 + sf) × numel floats. */
static pw_status read_param(pw_pipeline *pl, int lrep, int r, int gp, int sf, float *buf)
{
    int i;
    pw_program *p = holder(pl, lrep, r, gp, &i);
    if (!p) return pw_error(PW_ERR_INTERNAL, "rebalance: parameter '%s' is not held here", pl->g->params[gp].name);
    const int64_t n = pw_shape_numel(&rank_graph(pl, r)->params[gp].shape);
    PW_CHECK(pw_program_param_read(p, i, PW_PARAM_DATA, 0, buf));
    for (int k = 0; k < sf; k++) PW_CHECK(pw_program_param_read(p, i, PW_PARAM_STATE, k, buf + (k + 1) * n));
    return PW_OK;
}

/* Every program of local replica lrep of `pl` (at T > 1 local tensor rank
 * r's) takes its parameters from the staged copies. */
static pw_status write_params(pw_pipeline *pl, int lrep, int r, int sf, float *const *staged)
{
    for (int c = 0; c < pl->C; c++) {
        if (!stage_here(pl, c)) continue;
        gstage *gs = stage_at(pl, lrep, c);
        pw_program **progs = pl->T > 1 ? &gs->rank_prog[r] : gs->piece;
        const int np = pl->T > 1 ? 1 : gs->n_pieces;
        for (int j = 0; j < np; j++)
            for (int i = 0; i < pw_program_n_params(progs[j]); i++) {
                pw_program_param pp;
                pw_program_param_at(progs[j], i, &pp);
                const float *src = staged[pp.graph_param];
                if (!src) return pw_error(PW_ERR_INTERNAL, "rebalance: no copy of '%s' arrived", pp.name);
                PW_CHECK(pw_program_param_write(progs[j], i, PW_PARAM_DATA, src));
                for (int k = 0; k < sf; k++)
                    PW_CHECK(pw_program_param_write_state(progs[j], i, k, src + (k + 1) * pp.numel));
            }
    }
    return PW_OK;
}

/* One replica's move (at T > 1 one local tensor rank's: its parts): who
 * held and who holds each parameter, and the staged copies (values, then
 * optimizer state) this process's new chunks need, by graph parameter
 * (NULL: not needed here). */
typedef struct move {
    int P, sf;
    int r;                      /* the local tensor rank (0 at T = 1) */
    const pw_graph *rg;         /* its parameter shapes (rank_graph) */
    unsigned char *had, *has;   /* rank_holdings of the old and the new pipeline */
    float **staged;             /* [P] */
    float *tmp;                 /* a sender's buffer: the largest parameter */
} move;

static void move_free(move *mv)
{
    for (int p = 0; mv->staged && p < mv->P; p++) free(mv->staged[p]);
    free(mv->staged);
    free(mv->tmp);
    free(mv->had);
    free(mv->has);
    memset(mv, 0, sizeof *mv);
}

static int64_t param_floats(const move *mv, int p)
{
    return pw_shape_numel(&mv->rg->params[p].shape) * (1 + mv->sf);
}

/* Allocates the copies and fills those whose parameter this process held
 * already (in one process: all of them). Local work only. */
static pw_status move_prepare(pw_pipeline *from, pw_pipeline *to, int lrep, int r, move *mv,
                              pw_repartition_info *info)
{
    const pw_graph *g = from->g;
    const pw_transport *t = from->t;
    const int me = t ? t->rank : -1;
    mv->P = g->n_params;
    mv->r = r;
    mv->rg = rank_graph(from, r);
    mv->sf = pw_optim_state_floats(from->cfg.optim.kind);
    mv->had = rank_holdings(from);
    mv->has = rank_holdings(to);
    mv->staged = calloc((size_t)mv->P + 1, sizeof *mv->staged);
    if (!mv->had || !mv->has || !mv->staged) return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    int64_t largest = 1;
    for (int p = 0; p < mv->P; p++) {
        const int64_t n = param_floats(mv, p);
        if (n > largest) largest = n;
        const int want = !t || mv->has[(size_t)me * (size_t)mv->P + (size_t)p];
        const int held = !t || mv->had[(size_t)me * (size_t)mv->P + (size_t)p];
        if (!want) continue;
        mv->staged[p] = malloc((size_t)n * sizeof(float));
        if (!mv->staged[p]) return pw_error(PW_ERR_NOMEM, "rebalance: out of memory for '%s'", g->params[p].name);
        if (!held) continue;
        PW_CHECK(read_param(from, lrep, r, p, mv->sf, mv->staged[p]));
        info->bytes_local += n * (int64_t)sizeof(float);
    }
    if (t && !(mv->tmp = malloc((size_t)largest * sizeof(float))))
        return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    return PW_OK;
}

/* Under a transport: the parameters that change process, parameter by
 * parameter, receiving rank by rank, each from the lowest rank that held
 * it: one blocking send meeting one blocking receive at a time. */
static pw_status move_exchange(pw_pipeline *from, int lrep, move *mv, pw_repartition_info *info)
{
    const pw_graph *g = from->g;
    const pw_transport *t = from->t;
    const int S = from->S, P = mv->P, me = t->rank;
    for (int p = 0; p < P; p++) {
        int src = -1;
        for (int r = 0; r < S && src < 0; r++)
            if (mv->had[(size_t)r * (size_t)P + (size_t)p]) src = r;
        const size_t bytes = (size_t)param_floats(mv, p) * sizeof(float);
        for (int r = 0; r < S && src >= 0; r++) {
            if (!mv->has[(size_t)r * (size_t)P + (size_t)p] || mv->had[(size_t)r * (size_t)P + (size_t)p]) continue;
            pw_status st = PW_OK;
            if (me == src) {
                st = read_param(from, lrep, mv->r, p, mv->sf, mv->tmp);
                if (st == PW_OK) st = t->vt->send(t->self, pw_transport_world_of(t, t->replica, r), p, mv->tmp, bytes);
                info->bytes_sent += (int64_t)bytes;
            } else if (me == r) {
                st = t->vt->recv(t->self, pw_transport_world_of(t, t->replica, src), p, mv->staged[p], bytes);
                info->bytes_received += (int64_t)bytes;
            }
            if (st != PW_OK)
                return pw_error_prefix(st, "rebalance: moving '%s' from stage %d to stage %d: ", g->params[p].name,
                                       src, r);
            pw_transport_progress(t);
        }
    }
    return PW_OK;
}

/* --compress (top-k, PowerSGD): the error-feedback state, one part per
 * (replica, parameter, use) (pipeline_compress.c), follows the use's node
 * to the chunk that holds it under the new cuts. The old entries of this
 * process and the new, and a sender's buffer. */
typedef struct zmove {
    pl_zstate *had, *has;
    int n_had, n_has;
    float *tmp;                 /* the largest part */
} zmove;

static void zmove_free(zmove *zm)
{
    free(zm->had);
    free(zm->has);
    free(zm->tmp);
    memset(zm, 0, sizeof *zm);
}

/* The entry of (replica, gp, use, tensor rank) in z[0 .. n); NULL: none here. */
static const pl_zstate *zfind(const pl_zstate *z, int n, int replica, int gp, int use, int tp_rank)
{
    for (int i = 0; i < n; i++)
        if (z[i].replica == replica && z[i].gp == gp && z[i].use == use && z[i].tp_rank == tp_rank) return &z[i];
    return NULL;
}

/* The pipeline rank whose chunk holds node `node` under `pl`'s cuts. */
static int node_rank(const pw_pipeline *pl, int node)
{
    int c = 0;
    while (c + 1 < pl->C && node >= pl->part.begin[c + 1]) c++;
    return pw_schedule_rank_of(pl->sched, c);
}

/* Lists both pipelines' parts and copies those that stay in this process
 * (in one process: all of them). At T > 1 in one process each tensor
 * rank's part stays that rank's (a move keeps T); under mpirun at T > 1
 * neither lists any (the state is not kept per parameter there: it starts
 * again from zero, as on --resume). Local work only. */
static pw_status zmove_prepare(pw_pipeline *from, pw_pipeline *to, zmove *zm, pw_repartition_info *info)
{
    const char *why_from = NULL, *why_to = NULL;
    PW_CHECK(pl_compress_states(from, &zm->had, &zm->n_had, &why_from));
    PW_CHECK(pl_compress_states(to, &zm->has, &zm->n_has, &why_to));
    if (why_from || why_to) {
        free(zm->had);
        free(zm->has);
        zm->had = zm->has = NULL;
        zm->n_had = zm->n_has = 0;
        return PW_OK;
    }
    int64_t largest = 1;
    for (int i = 0; i < zm->n_had; i++)
        if (zm->had[i].floats > largest) largest = zm->had[i].floats;
    for (int i = 0; i < zm->n_has; i++)
        if (zm->has[i].floats > largest) largest = zm->has[i].floats;
    if (!(zm->tmp = malloc((size_t)largest * sizeof(float))))
        return pw_error(PW_ERR_NOMEM, "rebalance: out of memory for the compression state");
    for (int i = 0; i < zm->n_has; i++) {
        const pl_zstate *n = &zm->has[i];
        const pl_zstate *o = zfind(zm->had, zm->n_had, n->replica, n->gp, n->use, n->tp_rank);
        if (!o) {
            if (!from->t) /* every replica's every chunk is here */
                return pw_error(PW_ERR_INTERNAL, "rebalance: no compression state of '%s' (replica %d, use %d)",
                                from->g->params[n->gp].name, n->replica, n->use);
            continue; /* it arrives (zmove_exchange) */
        }
        if (o->floats != n->floats)
            return pw_error(PW_ERR_INTERNAL, "rebalance: the compression state of '%s' has %lld floats, now %lld",
                            from->g->params[n->gp].name, (long long)o->floats, (long long)n->floats);
        pw_compressor_span_state_get(o->z, o->span, zm->tmp);
        pw_compressor_span_state_set(n->z, n->span, zm->tmp);
        info->bytes_local += n->floats * (int64_t)sizeof(float);
    }
    return PW_OK;
}

/* Under a transport: the parts whose use changes process, in one global
 * order (parameter, then use), each from the rank whose chunk held the
 * use's node to the rank whose chunk holds it now: one blocking send
 * meeting one blocking receive at a time, as the parameters travel. The
 * sender has a part exactly when the receiver wants one (its size is the
 * parameter's shape's and the mode's). */
static pw_status zmove_exchange(pw_pipeline *from, pw_pipeline *to, zmove *zm, pw_repartition_info *info)
{
    const pw_graph *g = from->g;
    const pw_transport *t = from->t;
    const int me = t->rank, k = t->replica;
    for (int gp = 0; gp < g->n_params; gp++)
        for (int u = 0;; u++) {
            const int node = pl_param_use_node(g, gp, u);
            if (node < 0) break;
            const int src = node_rank(from, node), dst = node_rank(to, node);
            if (src == dst || (me != src && me != dst)) continue;
            pw_status st = PW_OK;
            if (me == src) {
                const pl_zstate *o = zfind(zm->had, zm->n_had, k, gp, u, 0);
                if (!o) continue; /* no state for this span (a PowerSGD span sent uncompressed) */
                const size_t bytes = (size_t)o->floats * sizeof(float);
                pw_compressor_span_state_get(o->z, o->span, zm->tmp);
                st = t->vt->send(t->self, pw_transport_world_of(t, k, dst), gp, zm->tmp, bytes);
                info->bytes_sent += (int64_t)bytes;
            } else {
                const pl_zstate *n = zfind(zm->has, zm->n_has, k, gp, u, 0);
                if (!n) continue;
                const size_t bytes = (size_t)n->floats * sizeof(float);
                st = t->vt->recv(t->self, pw_transport_world_of(t, k, src), gp, zm->tmp, bytes);
                if (st == PW_OK) pw_compressor_span_state_set(n->z, n->span, zm->tmp);
                info->bytes_received += (int64_t)bytes;
            }
            if (st != PW_OK)
                return pw_error_prefix(st, "rebalance: moving the compression state of '%s' (use %d) from stage %d "
                                       "to stage %d: ", g->params[gp].name, u, src, dst);
            pw_transport_progress(t);
        }
    return PW_OK;
}

/* Test hook, read once: PW_TEST_REBALANCE_FAIL=[WORLD_RANK:]STEP makes the
 * build of a move after STEP steps fail (on that process under mpirun). */
static int injected_failure(const pw_pipeline *pl)
{
    const char *spec = getenv("PW_TEST_REBALANCE_FAIL");
    long long a, b;
    if (!spec) return 0;
    int n = sscanf(spec, "%lld:%lld", &a, &b);
    if (n == 2) return (!pl->t || pl->t->world_rank == a) && pl->step == b;
    return n == 1 && pl->step == a;
}

/* Whether every process's `st` is PW_OK; if not, the first failure's
 * message, named, in the returned status. *lost = 1 when the processes
 * could not even compare (the transport failed). */
static pw_status agree(const pw_transport *t, pw_status st, const char *what, int *lost)
{
    *lost = 0;
    if (!t) return st;
    typedef struct { int32_t st; char msg[500]; } part;
    part me = {(int32_t)st, ""};
    if (st != PW_OK) snprintf(me.msg, sizeof me.msg, "%s", pw_last_error());
    part *all = calloc((size_t)t->world_size, sizeof *all);
    if (!all) return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
    pw_status gs = pw_transport_allgather(t, &me, sizeof me, all);
    if (gs != PW_OK) {
        free(all);
        *lost = 1;
        return pw_error_prefix(gs, "rebalance: %s: ", what);
    }
    pw_status out = PW_OK;
    for (int w = 0; w < t->world_size && out == PW_OK; w++)
        if (all[w].st != PW_OK)
            out = pw_error((pw_status)all[w].st, "rebalance: %s on MPI rank %d: %s", what, w, all[w].msg);
    free(all);
    return out;
}

static pw_status check_cuts(const pw_pipeline *pl, const int *cuts, int n_cuts)
{
    if (!cuts || n_cuts != pl->C + 1)
        return pw_error(PW_ERR_INVALID_ARG, "rebalance: %d cut boundaries for %d chunks (want %d)", n_cuts, pl->C,
                        pl->C + 1);
    if (cuts[0] != 0 || cuts[pl->C] != pl->g->n_nodes)
        return pw_error(PW_ERR_INVALID_ARG, "rebalance: the cuts must run from 0 to %d (the node count)",
                        pl->g->n_nodes);
    for (int c = 0; c < pl->C; c++)
        if (cuts[c + 1] <= cuts[c])
            return pw_error(PW_ERR_INVALID_ARG, "rebalance: chunk %d is empty or reversed ([%d, %d))", c, cuts[c],
                            cuts[c + 1]);
    if (pl->t && pl->g->n_params >= pl->t->max_tag)
        return pw_error(PW_ERR_UNSUPPORTED, "rebalance: %d parameters need more message tags than MPI's %d",
                        pl->g->n_params, pl->t->max_tag);
    return PW_OK;
}

/* Under mpirun a process loaded only the sides of the data its chunks read
 * (pw_pipeline_data_parts): new chunks that read another side (a graph
 * that reads its input or labels beyond the first and last nodes) cannot
 * run here. */
static pw_status data_here(const pw_pipeline *pl)
{
    const pw_graph *g = pl->g;
    unsigned need = 0;
    for (int c = 0; c < pl->C; c++) {
        if (!stage_here(pl, c)) continue;
        if (pl_node_range_reads(g, pl->part.begin[c], pl->part.begin[c + 1], g->input)) need |= PW_DATA_INPUTS;
        if (pl_node_range_reads(g, pl->part.begin[c], pl->part.begin[c + 1], g->label)) need |= PW_DATA_LABELS;
    }
    const unsigned lacking = need & pl->cfg.train->missing;
    if (!lacking) return PW_OK;
    return pw_error(PW_ERR_UNSUPPORTED, "the new cuts give stage %d nodes that read the %s, which this process did "
                    "not load (under mpirun a process loads only the sides of the data its chunks read)",
                    pl->t->rank, lacking & PW_DATA_INPUTS ? "inputs" : "labels");
}

/* One event per worker of this process on the (adopted) trace: the move. */
static void trace_move(pw_pipeline *pl, int64_t step, int64_t t0, int64_t t1, int64_t bytes)
{
    if (!pl->trace) return;
    for (int k = 0; k < pl->NR; k++)
        for (int r = 0; r < pl->S; r++) {
            if (lrep_of(pl, k) < 0 || !rank_here(pl, r)) continue;
            /* The worker threads are idle between steps; the next step's
             * start orders this write before theirs. */
            pw_trace_event *e = pw_trace_push(pl->trace, k * pl->S + r);
            if (!e) continue;
            e->name = "rebalance";
            e->cat = PW_TRACE_REBALANCE;
            e->step = step;
            e->bytes = bytes;
            e->t0_ns = t0;
            e->t1_ns = t1;
        }
}

pw_status pw_pipeline_repartition(pw_pipeline **plp, const int *cuts, int n_cuts, pw_repartition_info *info)
{
    pw_pipeline *old = *plp;
    memset(info, 0, sizeof *info);
    info->kept = 1;
    if (old->ps)
        return pw_error(PW_ERR_UNSUPPORTED, "re-partition: a pipeline synchronised by parameter servers (--sync ps) "
                        "cannot move its cuts yet");
    PW_CHECK(check_cuts(old, cuts, n_cuts));
    /* Tensor parallelism: a cut inside a column → row pair moves to the
     * nearest boundary outside one, as the first partition's do; where
     * that is where the cuts already are, nothing moves. */
    int *snapped = NULL;
    if (old->T > 1) {
        int moved = 0, same = 1;
        if (!(snapped = malloc((size_t)n_cuts * sizeof *snapped))) return pw_error(PW_ERR_NOMEM, "rebalance: out of memory");
        memcpy(snapped, cuts, (size_t)n_cuts * sizeof *snapped);
        pw_status sst = pl_tp_snap_cuts(old, snapped, &moved);
        for (int c = 0; c < n_cuts && sst == PW_OK; c++) same &= snapped[c] == old->part.begin[c];
        if (sst == PW_OK && moved && same)
            sst = pw_error(PW_ERR_INVALID_ARG, "rebalance: the new cuts split a tensor-parallel pair; the nearest "
                           "that do not are the current ones");
        if (sst != PW_OK) {
            free(snapped);
            return sst;
        }
        cuts = snapped;
    }
    const int64_t t0 = pw_now_ns();
    const pw_transport *t = old->t;
    pw_transport_phase(t, PW_PHASE_REBALANCE, old->step);
    pw_transport_test_point(t, "rebalance", old->step);

    /* The same run with other cuts; a CSV schedule is read again. */
    pw_pipeline_config c = old->cfg;
    c.cuts = cuts;
    c.n_cuts = n_cuts;
    if (old->sc.kind == PW_SCHEDULE_CUSTOM) c.schedule_csv = old->schedule_name;
    pw_pipeline *np = NULL;
    pw_status st = pl_create(&c, old->trace, &np);
    free(snapped); /* np keeps its own copy */
    if (st == PW_OK && t) st = data_here(np);
    if (st == PW_OK && injected_failure(old))
        st = pw_error(PW_ERR_NOMEM, "PW_TEST_REBALANCE_FAIL: the new layout's build failed after step %lld",
                      (long long)old->step);
    int lost = 0;
    st = agree(t, st, "building the new layout", &lost);
    /* The state, replica by replica (one under a transport): local copies;
     * everyone ready; the exchange; written; everyone done. */
    for (int k = 0; k < old->NRL && st == PW_OK; k++)
        for (int r = 0; r < old->TL && st == PW_OK; r++) { /* at T > 1 each local tensor rank its parts */
            move mv = {0};
            st = agree(t, move_prepare(old, np, k, r, &mv, info), "preparing the move", &lost);
            if (st == PW_OK && t && (st = move_exchange(old, k, &mv, info)) != PW_OK) lost = 1;
            if (st == PW_OK) st = agree(t, write_params(np, k, r, mv.sf, mv.staged), "writing the moved state", &lost);
            move_free(&mv);
        }
    /* --compress with error feedback: its state, every local replica's at
     * once (the condition is every process's: the same configuration; at
     * T > 1 under a transport nothing is listed, zmove_prepare). */
    const pw_compress_kind zk = old->cfg.compress.kind;
    if (st == PW_OK && (zk == PW_COMPRESS_TOPK || zk == PW_COMPRESS_POWERSGD) && old->NR > 1) {
        zmove zm = {0};
        st = agree(t, zmove_prepare(old, np, &zm, info), "preparing the move of the compression state", &lost);
        if (st == PW_OK && t && (st = zmove_exchange(old, np, &zm, info)) != PW_OK) lost = 1;
        if (st == PW_OK) st = agree(t, PW_OK, "moving the compression state", &lost);
        zmove_free(&zm);
    }
    if (st != PW_OK) {
        if (np) np->trace = NULL; /* the old pipeline's still */
        pw_pipeline_destroy(np);
        info->kept = !lost;
        pw_transport_phase(t, PW_PHASE_STEP, old->step);
        return st;
    }
    np->step = old->step;
    np->grad_norm = old->grad_norm;
    np->last_bubble = old->last_bubble;
    old->trace = NULL; /* np's now */
    pw_pipeline_destroy(old);
    *plp = np;
    const int64_t t1 = pw_now_ns();
    info->seconds = (double)(t1 - t0) * 1e-9;
    trace_move(np, np->step, t0, t1, info->bytes_local + info->bytes_received);
    pw_transport_phase(t, PW_PHASE_STEP, np->step);
    return PW_OK;
}
