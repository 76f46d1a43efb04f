/* custom_trainer — a model pipewright knows nothing about, trained by the
 * pipeline engine.
 *
 * The model is an MLP of --layers dense layers (ReLU between them, softmax
 * cross-entropy at the end) whose forward and backward this file computes
 * in plain C. The layers are cut into chunks; each chunk implements the
 * stage interface (pw_stage_i, <pipewright/scheduler/stage.h>): forward,
 * backward for its input, backward for its weights, an SGD step, its
 * message ports, and one gradient bucket per layer for the replicas. The
 * runner (<pipewright/scheduler/runner.h>) turns a schedule name, a
 * micro-batch count and the stage table into a running engine.
 *
 *     custom_trainer --schedule zb-v --stages 2 --micro-batches 4 --replicas 2 --trace run.json
 *     pipe-trace run.json
 *
 * After training it trains again on one stage (GPipe, the same batch,
 * micro-batches and replicas) and checks that every parameter and every
 * step's loss are the same bits: exit status 0 when they are, 1 when not
 * (with the first differing elements), 2 on bad usage or a failed run.
 * docs/api.md walks through this file.
 */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A custom model needs only the scheduler (the stage interface, the
 * engine and the runner) and the runtime (status, random numbers);
 * <pipewright/pipewright.h> would bring everything. */
#include <pipewright/runtime/rng.h>
#include <pipewright/scheduler/runner.h>

/* ---------------------------------------------------------------- the data */

/* A synthetic classification task: class c has a prototype vector; a sample
 * is its class's prototype plus noise. Step t, replica k, micro-batch m,
 * row i reads sample ((t − 1)·B + k·B/R + m·B/(R·M) + i) mod n. */
typedef struct dataset {
    int n, dim, classes;
    float *x;                  /* (n, dim) */
    int32_t *y;                /* (n) */
} dataset;

static int dataset_make(dataset *d, int n, int dim, int classes, uint64_t seed)
{
    d->n = n;
    d->dim = dim;
    d->classes = classes;
    d->x = malloc((size_t)n * (size_t)dim * sizeof *d->x);
    d->y = malloc((size_t)n * sizeof *d->y);
    if (!d->x || !d->y) return -1;
    const uint64_t proto = pw_rng_key(seed, "proto"), label = pw_rng_key(seed, "label"),
                   noise = pw_rng_key(seed, "noise");
    for (int i = 0; i < n; i++) {
        d->y[i] = (int32_t)(pw_rng_u64(label, (uint64_t)i) % (uint64_t)classes);
        for (int j = 0; j < dim; j++)
            d->x[(size_t)i * dim + j] = pw_rng_normal(proto, (uint64_t)d->y[i] * dim + j) +
                                        pw_rng_normal(noise, (uint64_t)i * dim + j);
    }
    return 0;
}

/* ---------------------------------------------------------------- the model */

typedef struct model {
    int layers, dim, width, classes;
    int64_t batch;             /* B: samples per step, all replicas */
    int micro_batches;         /* M */
    int64_t rows;              /* B / (R·M): samples per micro-batch */
    float lr;
    uint64_t seed;
    const dataset *data;
    struct chunk **chunks;     /* [R × C], replica-major: kept to read them after the run */
    int n_chunks;
} model;

static int fan_in(const model *m, int l) { return l == 0 ? m->dim : m->width; }
static int fan_out(const model *m, int l) { return l == m->layers - 1 ? m->classes : m->width; }

#define MAX_SLOTS 64            /* activation slots a chunk can hold */

/* One chunk: layers [first, last] of one replica. Its memory is one block
 * planned up front: parameters, gradients, then per slot the stash of every
 * layer (its output a and the gradient dz of its pre-activation), the
 * chunk's input x (first chunk) and labels y (last chunk). */
typedef struct chunk {
    const model *m;
    int first, last;           /* layers */
    int replica, replicas;
    int slots;
    int is_first, is_last;     /* holds the model's first / last layer */
    float *block;              /* the one allocation */
    float **w, **b;            /* [layer - first]: (out, in), (out) */
    float **gw, **gb;          /* their gradients, accumulated over the step */
    float **a, **dz;           /* [slot × n_layers + (layer - first)]: (rows, out) */
    float *x[MAX_SLOTS];       /* (rows, dim), first chunk only */
    int32_t *y[MAX_SLOTS];     /* (rows), last chunk only */
    void *port[MAX_SLOTS][PW_PORT_COUNT]; /* the engine's message buffers, bound per slot */
    double *mb_loss;           /* [M]: loss sum of each micro-batch of the step */
    int64_t next_step;         /* the step of the next forward */
} chunk;

static int n_layers(const chunk *c) { return c->last - c->first + 1; }
static float *A(const chunk *c, int slot, int l) { return c->a[slot * n_layers(c) + l - c->first]; }
static float *DZ(const chunk *c, int slot, int l) { return c->dz[slot * n_layers(c) + l - c->first]; }

/* The input of layer l in `slot`: the previous layer's output, or what the
 * chunk received (ACT_IN), or the data. */
static const float *input_of(const chunk *c, int slot, int l)
{
    if (l > c->first) return A(c, slot, l - 1);
    return c->is_first ? c->x[slot] : c->port[slot][PW_PORT_ACT_IN];
}

/* out = W·in + b, row by row; ReLU unless it is the model's last layer. */
static void layer_forward(const chunk *c, int l, const float *in, float *out)
{
    const model *m = c->m;
    const int I = fan_in(m, l), O = fan_out(m, l);
    const float *w = c->w[l - c->first], *b = c->b[l - c->first];
    for (int64_t r = 0; r < m->rows; r++)
        for (int o = 0; o < O; o++) {
            float s = b[o];
            for (int i = 0; i < I; i++) s += w[(size_t)o * I + i] * in[r * I + i];
            out[r * O + o] = (l < m->layers - 1 && s < 0.0f) ? 0.0f : s;
        }
}

static pw_status chunk_forward(void *self, int mb, int slot)
{
    chunk *c = self;
    const model *m = c->m;
    /* The first chunk loads the micro-batch's samples, the last its labels. */
    const int64_t first = ((c->next_step - 1) * m->batch + c->replica * (m->batch / c->replicas) +
                           mb * m->rows) % m->data->n;
    for (int64_t r = 0; r < m->rows; r++) {
        const int64_t s = (first + r) % m->data->n;
        if (c->is_first) memcpy(c->x[slot] + r * m->dim, m->data->x + s * m->dim, (size_t)m->dim * sizeof(float));
        if (c->is_last) c->y[slot][r] = m->data->y[s];
    }
    for (int l = c->first; l <= c->last; l++) layer_forward(c, l, input_of(c, slot, l), A(c, slot, l));
    if (!c->is_last) {
        /* The next chunk's input: ACT_OUT is ours to fill and stays valid
         * until our last backward of this micro-batch. */
        memcpy(c->port[slot][PW_PORT_ACT_OUT], A(c, slot, c->last),
               (size_t)m->rows * fan_out(m, c->last) * sizeof(float));
        return PW_OK;
    }
    /* Softmax cross-entropy, summed over the micro-batch's rows in order. */
    const float *z = A(c, slot, c->last);
    double loss = 0.0;
    for (int64_t r = 0; r < m->rows; r++) {
        const float *zr = z + r * m->classes;
        float mx = zr[0];
        for (int k = 1; k < m->classes; k++) mx = zr[k] > mx ? zr[k] : mx;
        double sum = 0.0;
        for (int k = 0; k < m->classes; k++) sum += exp((double)(zr[k] - mx));
        loss += log(sum) - (double)(zr[c->y[slot][r]] - mx);
    }
    if (!isfinite(loss))
        return pw_error(PW_ERR_NUMERIC, "replica %d, layers %d-%d: loss of micro-batch %d is %g", c->replica,
                        c->first, c->last, mb, loss);
    c->mb_loss[mb] = loss;
    return PW_OK;
}

/* Gradients for the chunk's input: dz of every layer, last to first (kept
 * for chunk_backward_weight), and GRAD_IN for the previous chunk. */
static pw_status chunk_backward_input(void *self, int mb, int slot)
{
    (void)mb;
    chunk *c = self;
    const model *m = c->m;
    float *dz = DZ(c, slot, c->last);
    const int O = fan_out(m, c->last);
    if (c->is_last) {
        /* d loss / d logits = (softmax − one-hot) / B: the loss is the mean
         * over the global batch. */
        const float *z = A(c, slot, c->last);
        for (int64_t r = 0; r < m->rows; r++) {
            const float *zr = z + r * O;
            float mx = zr[0];
            for (int k = 1; k < O; k++) mx = zr[k] > mx ? zr[k] : mx;
            double sum = 0.0;
            for (int k = 0; k < O; k++) sum += exp((double)(zr[k] - mx));
            for (int k = 0; k < O; k++) {
                float p = (float)(exp((double)(zr[k] - mx)) / sum);
                dz[r * O + k] = (p - (k == c->y[slot][r] ? 1.0f : 0.0f)) / (float)m->batch;
            }
        }
    } else {
        /* The next chunk's gradient of our output, through our ReLU. */
        const float *g = c->port[slot][PW_PORT_GRAD_OUT], *a = A(c, slot, c->last);
        for (int64_t j = 0; j < m->rows * O; j++) dz[j] = a[j] > 0.0f ? g[j] : 0.0f;
    }
    for (int l = c->last; l >= c->first; l--) {
        if (l == 0) break; /* the data needs no gradient */
        const int I = fan_in(m, l), Ol = fan_out(m, l);
        const float *w = c->w[l - c->first], *d = DZ(c, slot, l);
        /* g = dz · W: into the previous layer's dz (masked by its ReLU
         * below), or into GRAD_IN for the previous chunk. */
        float *g = l > c->first ? DZ(c, slot, l - 1) : c->port[slot][PW_PORT_GRAD_IN];
        for (int64_t r = 0; r < m->rows; r++)
            for (int i = 0; i < I; i++) {
                float s = 0.0f;
                for (int o = 0; o < Ol; o++) s += d[r * Ol + o] * w[(size_t)o * I + i];
                g[r * I + i] = s;
            }
        if (l > c->first) {
            const float *a = A(c, slot, l - 1);
            for (int64_t j = 0; j < m->rows * I; j++)
                if (!(a[j] > 0.0f)) g[j] = 0.0f;
        }
    }
    return PW_OK;
}

/* Weight gradients: gw += dzᵀ·in, gb += Σ dz, row by row, added in the
 * order the engine calls it (micro-batch order under every schedule). */
static pw_status chunk_backward_weight(void *self, int mb, int slot)
{
    (void)mb;
    chunk *c = self;
    const model *m = c->m;
    for (int l = c->first; l <= c->last; l++) {
        const int I = fan_in(m, l), O = fan_out(m, l);
        const float *in = input_of(c, slot, l), *d = DZ(c, slot, l);
        float *gw = c->gw[l - c->first], *gb = c->gb[l - c->first];
        for (int64_t r = 0; r < m->rows; r++)
            for (int o = 0; o < O; o++) {
                const float dv = d[r * O + o];
                gb[o] += dv;
                for (int i = 0; i < I; i++) gw[(size_t)o * I + i] += dv * in[r * I + i];
            }
    }
    return PW_OK;
}

/* Plain SGD, then zero the gradients for the next step. With replicas the
 * engine has summed every replica's gradients into ours before this. */
static pw_status chunk_optimizer_step(void *self, long step)
{
    chunk *c = self;
    const model *m = c->m;
    for (int l = c->first; l <= c->last; l++) {
        const size_t nw = (size_t)fan_out(m, l) * fan_in(m, l), nb = (size_t)fan_out(m, l);
        float *w = c->w[l - c->first], *b = c->b[l - c->first];
        float *gw = c->gw[l - c->first], *gb = c->gb[l - c->first];
        for (size_t j = 0; j < nw; j++) w[j] -= m->lr * gw[j];
        for (size_t j = 0; j < nb; j++) b[j] -= m->lr * gb[j];
        memset(gw, 0, nw * sizeof *gw);
        memset(gb, 0, nb * sizeof *gb);
    }
    c->next_step = step + 1;
    return PW_OK;
}

/* One message per micro-batch each way: our output to the next chunk
 * (ACT_OUT) and its gradient back (GRAD_OUT); our input (ACT_IN) and its
 * gradient (GRAD_IN) with the previous chunk. 0 = no such port. */
static size_t chunk_port_bytes(void *self, pw_port port)
{
    const chunk *c = self;
    const model *m = c->m;
    const size_t row = sizeof(float) * (size_t)m->rows;
    switch (port) {
    case PW_PORT_ACT_IN:
    case PW_PORT_GRAD_IN: return c->is_first ? 0 : row * (size_t)fan_in(m, c->first);
    case PW_PORT_ACT_OUT:
    case PW_PORT_GRAD_OUT: return c->is_last ? 0 : row * (size_t)fan_out(m, c->last);
    default: return 0;
    }
}

static pw_status chunk_bind(void *self, int slot, pw_port port, void *buf)
{
    chunk *c = self;
    c->port[slot][port] = buf;
    return PW_OK;
}

/* Bucket b is one layer, the chunk's last first (the backward finishes it
 * first): {weight gradient, bias gradient}. Buckets past the chunk's
 * layers are empty. The replicas' sum of each element is the same tree
 * whatever the buckets (runtime/collective.h); a bucket per layer lets
 * each layer's all-reduce start as soon as its backward is done. */
static int chunk_grad_bucket(void *self, int bucket, int n_buckets, pw_span *spans, int max_spans)
{
    (void)n_buckets;
    chunk *c = self;
    const int l = c->last - bucket;
    if (l < c->first || max_spans < 2) return l < c->first ? 0 : 2;
    spans[0] = (pw_span){c->gw[l - c->first], (int64_t)fan_out(c->m, l) * fan_in(c->m, l)};
    spans[1] = (pw_span){c->gb[l - c->first], fan_out(c->m, l)};
    return 2;
}

static const pw_stage_i chunk_i = {
    .name = "custom-mlp",
    .forward = chunk_forward,
    .backward_input = chunk_backward_input,
    .backward_weight = chunk_backward_weight,
    .optimizer_step = chunk_optimizer_step,
    .port_bytes = chunk_port_bytes,
    .bind = chunk_bind,
    .grad_bucket = chunk_grad_bucket,
};

/* ---------------------------------------------------------------- the stage table */

static void chunk_free(chunk *c)
{
    if (!c) return;
    free(c->block);
    free(c->w);
    free(c->mb_loss);
    free(c);
}

/* Builds chunk spec->chunk of replica spec->replica: its layers are an
 * even share of the model's, its slots what the schedule needs. */
static pw_status make_chunk(void *user, const pw_chunk_spec *spec, pw_engine_chunk *out)
{
    model *m = user;
    const int C = spec->n_chunks;
    if (C > m->layers)
        return pw_error(PW_ERR_INVALID_ARG, "%d chunks but only %d layers (--layers)", C, m->layers);
    if (spec->slots > MAX_SLOTS) return pw_error(PW_ERR_INVALID_ARG, "%d slots, at most %d", spec->slots, MAX_SLOTS);
    const int most = (m->layers + C - 1) / C; /* layers of the largest chunk */
    if (spec->replicas > 1 && spec->n_buckets < most)
        return pw_error(PW_ERR_INVALID_ARG, "the replicas sum one layer per gradient bucket: the schedule has %d "
                        "buckets per chunk, a chunk holds up to %d layers", spec->n_buckets, most);
    if (!m->chunks) {
        m->n_chunks = C;
        m->chunks = calloc((size_t)spec->replicas * (size_t)C, sizeof *m->chunks);
        if (!m->chunks) return pw_error(PW_ERR_NOMEM, "out of memory");
    }
    chunk *c = calloc(1, sizeof *c);
    if (!c) return pw_error(PW_ERR_NOMEM, "out of memory");
    c->m = m;
    c->first = (int)((int64_t)spec->chunk * m->layers / C);
    c->last = (int)((int64_t)(spec->chunk + 1) * m->layers / C) - 1;
    c->replica = spec->replica;
    c->replicas = spec->replicas;
    c->slots = spec->slots;
    c->is_first = spec->chunk == 0;
    c->is_last = spec->chunk == C - 1;
    c->next_step = 1;
    const int L = n_layers(c), S = spec->slots;
    /* Plan: count the floats, then allocate once and point into the block. */
    size_t params = 0, stash = 0;
    for (int l = c->first; l <= c->last; l++) {
        params += (size_t)fan_out(m, l) * fan_in(m, l) + (size_t)fan_out(m, l);
        stash += 2 * (size_t)m->rows * fan_out(m, l);
    }
    if (c->is_first) stash += (size_t)m->rows * m->dim;
    if (c->is_last) stash += (size_t)m->rows; /* labels, int32 in float-sized cells */
    c->block = calloc(2 * params + (size_t)S * stash, sizeof(float));
    c->w = calloc((size_t)4 * L + (size_t)2 * S * L, sizeof(float *));
    c->mb_loss = calloc((size_t)m->micro_batches, sizeof *c->mb_loss);
    if (!c->block || !c->w || !c->mb_loss) {
        const int first = c->first, last = c->last;
        chunk_free(c);
        return pw_error(PW_ERR_NOMEM, "out of memory for layers %d-%d", first, last);
    }
    c->b = c->w + L;
    c->gw = c->b + L;
    c->gb = c->gw + L;
    c->a = c->gb + L;
    c->dz = c->a + (size_t)S * L;
    float *at = c->block;
    for (int l = c->first; l <= c->last; l++) {
        const size_t nw = (size_t)fan_out(m, l) * fan_in(m, l);
        c->w[l - c->first] = at, at += nw;
        c->b[l - c->first] = at, at += fan_out(m, l);
    }
    for (int l = c->first; l <= c->last; l++) {
        const size_t nw = (size_t)fan_out(m, l) * fan_in(m, l);
        c->gw[l - c->first] = at, at += nw;
        c->gb[l - c->first] = at, at += fan_out(m, l);
    }
    for (int s = 0; s < S; s++) {
        for (int l = c->first; l <= c->last; l++) {
            c->a[s * L + l - c->first] = at, at += (size_t)m->rows * fan_out(m, l);
            c->dz[s * L + l - c->first] = at, at += (size_t)m->rows * fan_out(m, l);
        }
        if (c->is_first) c->x[s] = at, at += (size_t)m->rows * m->dim;
        if (c->is_last) c->y[s] = (int32_t *)at, at += m->rows;
    }
    /* Initial weights depend on the seed and the layer only, never on the
     * chunk: U(−√(6/in), √(6/in)) (He's, for ReLU), biases 0. */
    for (int l = c->first; l <= c->last; l++) {
        char name[32];
        snprintf(name, sizeof name, "layer%d.weight", l);
        const uint64_t key = pw_rng_key(m->seed, name);
        const float scale = (float)sqrt(6.0 / (double)fan_in(m, l));
        for (size_t j = 0; j < (size_t)fan_out(m, l) * fan_in(m, l); j++)
            c->w[l - c->first][j] = (2.0f * pw_rng_uniform(key, j) - 1.0f) * scale;
    }
    m->chunks[spec->replica * C + spec->chunk] = c;
    *out = (pw_engine_chunk){&chunk_i, c};
    return PW_OK;
}

/* ---------------------------------------------------------------- a run */

typedef struct layout {
    const char *schedule;
    int stages, micro_batches, replicas;
    int64_t steps;
    const char *trace;         /* NULL: none */
    int pin, quiet;
} layout;

typedef struct result {
    float *params;             /* every replica's parameters, layer order: [R][n_params] */
    int64_t n_params;
    double *loss;              /* [steps] mean loss of each step */
} result;

static void model_free_chunks(model *m, int replicas)
{
    for (int i = 0; m->chunks && i < replicas * m->n_chunks; i++) chunk_free(m->chunks[i]);
    free(m->chunks);
    m->chunks = NULL;
}

/* Trains a fresh model under `lo`; fills *res. 0, or 2 with a message. */
static int run(model *m, const layout *lo, result *res)
{
    const int R = lo->replicas;
    m->rows = m->batch / ((int64_t)R * lo->micro_batches);
    m->micro_batches = lo->micro_batches;
    /* The schedule's chunks, to size the buckets: the most layers a chunk holds. */
    pw_schedule_kind kind;
    int v = 1;
    if (pw_schedule_kind_parse(lo->schedule, &kind) == PW_OK)
        v = kind == PW_SCHEDULE_INTERLEAVED || kind == PW_SCHEDULE_ZB_V ? 2 : 1;
    const int C = lo->stages * v;

    pw_runner_config rc = pw_runner_defaults();
    rc.schedule = lo->schedule;
    rc.micro_batches = lo->micro_batches;
    rc.table = (pw_stage_table){.stages = lo->stages, .replicas = R, .make = make_chunk, .user = m};
    rc.buckets = (m->layers + C - 1) / C;
    rc.pin = lo->pin;
    rc.model = "custom-mlp";
    rc.micro_batch_size = m->rows;
    /* Every action of a step is a handful of events: enough for all steps. */
    if (lo->trace) rc.trace_events = 64 + lo->steps * (16 * (int64_t)lo->micro_batches * v + 8 * rc.buckets * v + 16);
    pw_runner *r;
    if (pw_runner_create(&rc, &r) != PW_OK) {
        fprintf(stderr, "custom_trainer: %s\n", pw_last_error());
        model_free_chunks(m, R);
        return 2;
    }
    res->loss = calloc((size_t)lo->steps, sizeof *res->loss);
    for (int64_t t = 0; t < lo->steps; t++) {
        if (pw_runner_step(r) != PW_OK) {
            fprintf(stderr, "custom_trainer: step %lld: %s\n", (long long)t + 1, pw_last_error());
            pw_runner_destroy(r);
            model_free_chunks(m, R);
            return 2;
        }
        /* Between steps the chunks are ours to read: the loss is each
         * replica's last chunk's, summed in micro-batch order. */
        double loss = 0.0;
        for (int k = 0; k < R; k++)
            for (int mb = 0; mb < lo->micro_batches; mb++) loss += m->chunks[k * m->n_chunks + m->n_chunks - 1]->mb_loss[mb];
        res->loss[t] = loss / (double)m->batch;
        if (!lo->quiet && (t < 3 || (t + 1) % 10 == 0 || t + 1 == lo->steps))
            printf("  step %4lld  loss %.6f\n", (long long)t + 1, res->loss[t]);
    }
    if (lo->trace) {
        if (pw_runner_write_trace(r, lo->trace) != PW_OK) {
            fprintf(stderr, "custom_trainer: %s\n", pw_last_error());
            pw_runner_destroy(r);
            model_free_chunks(m, R);
            return 2;
        }
        printf("custom_trainer: wrote %s (read it with: pipe-trace %s)\n", lo->trace, lo->trace);
    }
    pw_runner_destroy(r); /* the chunks are ours (no unmake): read them, then free them */

    res->n_params = 0;
    for (int l = 0; l < m->layers; l++) res->n_params += (int64_t)fan_out(m, l) * (fan_in(m, l) + 1);
    res->params = malloc((size_t)R * (size_t)res->n_params * sizeof *res->params);
    for (int k = 0; k < R; k++) {
        float *at = res->params + (size_t)k * res->n_params;
        for (int ch = 0; ch < m->n_chunks; ch++) {
            const chunk *c = m->chunks[k * m->n_chunks + ch];
            for (int l = c->first; l <= c->last; l++) {
                const size_t nw = (size_t)fan_out(m, l) * fan_in(m, l);
                memcpy(at, c->w[l - c->first], nw * sizeof *at), at += nw;
                memcpy(at, c->b[l - c->first], (size_t)fan_out(m, l) * sizeof *at), at += fan_out(m, l);
            }
        }
    }
    model_free_chunks(m, R);
    return 0;
}

/* Index of the first differing float (−1: none); counts them and the
 * largest difference. */
static int64_t compare(const float *got, const float *ref, int64_t n, int64_t *ndiff, double *maxerr)
{
    int64_t first = -1;
    *ndiff = 0;
    *maxerr = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(&got[i], &ref[i], sizeof *got) == 0) continue;
        if (first < 0) first = i;
        ++*ndiff;
        if (fabs((double)got[i] - ref[i]) > *maxerr) *maxerr = fabs((double)got[i] - ref[i]);
    }
    return first;
}

/* The check: 0 when the run under `lo` and the one-stage run agree bit for
 * bit (every replica's parameters, and every step's loss), else 1 after
 * printing the first differences. */
static int check_runs(const layout *lo, const result *got, const result *ref)
{
    int rc = 0;
    const int64_t n = got->n_params;
    int64_t ndiff, first;
    double maxerr;
    /* 1. The parameters against the one-stage run's, replica by replica. */
    for (int k = 0; k < lo->replicas && rc == 0; k++) {
        first = compare(got->params + k * n, ref->params + k * n, n, &ndiff, &maxerr);
        if (first >= 0) {
            printf("MISMATCH: replica %d: %lld of %lld parameters differ from the 1-stage run's (max error "
                   "%g); the first:\n", k, (long long)ndiff, (long long)n, maxerr);
            for (int64_t i = first, shown = 0; i < n && shown < 5; i++)
                if (memcmp(&got->params[k * n + i], &ref->params[k * n + i], sizeof(float)) != 0) {
                    printf("  [%lld] %.9g vs %.9g\n", (long long)i, got->params[k * n + i],
                           ref->params[k * n + i]);
                    shown++;
                }
            rc = 1;
        }
    }
    /* 2. Every replica holds replica 0's parameters. */
    for (int k = 1; k < lo->replicas && rc == 0; k++)
        if (compare(got->params + k * n, got->params, n, &ndiff, &maxerr) >= 0) {
            printf("MISMATCH: replica %d's parameters differ from replica 0's in %lld places\n", k,
                   (long long)ndiff);
            rc = 1;
        }
    /* 3. Every step's loss. */
    for (int64_t t = 0; t < lo->steps && rc == 0; t++)
        if (memcmp(&got->loss[t], &ref->loss[t], sizeof(double)) != 0) {
            printf("MISMATCH: the loss of step %lld is %.17g, the 1-stage run's %.17g\n", (long long)t + 1,
                   got->loss[t], ref->loss[t]);
            rc = 1;
        }
    if (rc == 0)
        printf("checked: the %lld parameters of %s on %d stage%s (%d replica%s) after %lld steps equal the "
               "1-stage run's bit for bit%s; so do the %lld step losses (last %.6f, first %.6f)\n",
               (long long)n, lo->schedule, lo->stages, lo->stages > 1 ? "s" : "", lo->replicas,
               lo->replicas > 1 ? "s" : "", (long long)lo->steps,
               lo->replicas > 1 ? ", in every replica" : "", (long long)lo->steps, got->loss[lo->steps - 1],
               got->loss[0]);
    return rc;
}

/* ---------------------------------------------------------------- main */

static const char usage[] =
"usage: custom_trainer [OPTIONS]\n"
"\n"
"Trains an MLP whose forward and backward are plain C in this file through\n"
"pipewright's pipeline engine, then trains it again on one stage and checks\n"
"that both runs end with the same parameter bits.\n"
"\n"
"  --schedule NAME       gpipe, 1f1b (default), interleaved, zb-h1, zb-h2, zb-v,\n"
"                        or a schedule CSV file\n"
"  --stages S            pipeline stages (default 2)\n"
"  --micro-batches M     micro-batches per step (default 4)\n"
"  --replicas R          data-parallel replicas in this process (default 1)\n"
"  --steps N             optimizer steps (default 30)\n"
"  --batch B             samples per step, all replicas (default 32; a multiple\n"
"                        of R x M)\n"
"  --layers L            dense layers (default 8; at least the chunk count)\n"
"  --width H             hidden width (default 32)\n"
"  --lr X                SGD learning rate (default 0.05)\n"
"  --trace FILE          write a Chrome trace of the run (pipe-trace FILE)\n"
"  --no-check            skip the one-stage run and the comparison\n"
"  --no-pin              do not bind the engine's workers to cores\n"
"  --quiet               print only the check\n"
"  -h, --help            this help\n"
"\n"
"Exit status: 0 the check passed (or was skipped), 1 the runs differ,\n"
"2 bad usage or a failed run.\n";

static int bad(const char *what, const char *arg)
{
    fprintf(stderr, "custom_trainer: %s '%s'\n(custom_trainer --help lists the options)\n", what, arg);
    return 2;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

int main(int argc, char **argv)
{
    layout lo = {.schedule = "1f1b", .stages = 2, .micro_batches = 4, .replicas = 1, .steps = 30, .pin = 1};
    model m = {.layers = 8, .dim = 16, .width = 32, .classes = 4, .batch = 32, .lr = 0.05f, .seed = 1};
    int check = 1;
    enum { O_SCHED = 256, O_STAGES, O_MICRO, O_REPL, O_STEPS, O_BATCH, O_LAYERS, O_WIDTH, O_LR, O_TRACE,
           O_NOCHECK, O_NOPIN, O_QUIET };
    static const struct option opts[] = {
        {"schedule", required_argument, 0, O_SCHED}, {"stages", required_argument, 0, O_STAGES},
        {"micro-batches", required_argument, 0, O_MICRO}, {"replicas", required_argument, 0, O_REPL},
        {"steps", required_argument, 0, O_STEPS}, {"batch", required_argument, 0, O_BATCH},
        {"layers", required_argument, 0, O_LAYERS}, {"width", required_argument, 0, O_WIDTH},
        {"lr", required_argument, 0, O_LR}, {"trace", required_argument, 0, O_TRACE},
        {"no-check", no_argument, 0, O_NOCHECK}, {"no-pin", no_argument, 0, O_NOPIN},
        {"quiet", no_argument, 0, O_QUIET}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
    };
    int o;
    long v;
    while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (o) {
        case O_SCHED: lo.schedule = optarg; break;
        case O_STAGES: if (!parse_int(optarg, 1, 64, &v)) return bad("--stages: not 1-64:", optarg);
            lo.stages = (int)v; break;
        case O_MICRO: if (!parse_int(optarg, 1, 4096, &v)) return bad("--micro-batches: not 1-4096:", optarg);
            lo.micro_batches = (int)v; break;
        case O_REPL: if (!parse_int(optarg, 1, 64, &v)) return bad("--replicas: not 1-64:", optarg);
            lo.replicas = (int)v; break;
        case O_STEPS: if (!parse_int(optarg, 1, 1000000, &v)) return bad("--steps: not 1-1000000:", optarg);
            lo.steps = v; break;
        case O_BATCH: if (!parse_int(optarg, 1, 1 << 20, &v)) return bad("--batch: not 1-1048576:", optarg);
            m.batch = v; break;
        case O_LAYERS: if (!parse_int(optarg, 1, 256, &v)) return bad("--layers: not 1-256:", optarg);
            m.layers = (int)v; break;
        case O_WIDTH: if (!parse_int(optarg, 1, 4096, &v)) return bad("--width: not 1-4096:", optarg);
            m.width = (int)v; break;
        case O_LR: {
            char *end;
            m.lr = strtof(optarg, &end);
            if (end == optarg || *end || !(m.lr > 0)) return bad("--lr: not a positive number:", optarg);
            break;
        }
        case O_TRACE: lo.trace = optarg; break;
        case O_NOCHECK: check = 0; break;
        case O_NOPIN: lo.pin = 0; break;
        case O_QUIET: lo.quiet = 1; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs("(custom_trainer --help lists the options)\n", stderr); return 2;
        }
    }
    if (optind < argc) return bad("unexpected argument", argv[optind]);
    if (m.batch % ((int64_t)lo.replicas * lo.micro_batches) != 0) {
        fprintf(stderr, "custom_trainer: --batch %lld is not a multiple of replicas x micro-batches (%d)\n",
                (long long)m.batch, lo.replicas * lo.micro_batches);
        return 2;
    }
    dataset d;
    if (dataset_make(&d, 4096, m.dim, m.classes, 1234) != 0) {
        fprintf(stderr, "custom_trainer: out of memory\n");
        return 2;
    }
    m.data = &d;

    if (!lo.quiet)
        printf("custom_trainer: %d-layer MLP (%d -> %d -> %d), batch %lld = %d replica%s x %d micro-batches of "
               "%lld\ncustom_trainer: %s on %d stage%s, %lld steps\n", m.layers, m.dim, m.width, m.classes,
               (long long)m.batch, lo.replicas, lo.replicas > 1 ? "s" : "", lo.micro_batches,
               (long long)(m.batch / ((int64_t)lo.replicas * lo.micro_batches)), lo.schedule, lo.stages,
               lo.stages > 1 ? "s" : "", (long long)lo.steps);
    result got = {0}, ref = {0};
    int rc = run(&m, &lo, &got);
    if (rc == 0 && check) {
        layout one = lo;
        one.schedule = "gpipe";
        one.stages = 1;
        one.trace = NULL;
        one.quiet = 1;
        if (!lo.quiet)
            printf("custom_trainer: the reference: gpipe on 1 stage, the same batch, micro-batches and replicas\n");
        rc = run(&m, &one, &ref);
    }
    if (rc == 0 && check) {
        rc = check_runs(&lo, &got, &ref);
    } else if (rc == 0) {
        printf("custom_trainer: trained %lld steps: loss %.6f -> %.6f (not checked: --no-check)\n",
               (long long)lo.steps, got.loss[0], got.loss[lo.steps - 1]);
    }
    free(got.params);
    free(got.loss);
    free(ref.params);
    free(ref.loss);
    free(d.x);
    free(d.y);
    return rc;
}
