/* pipewright — the schedule IR: generators, lowering, validator, CSV form.
 *
 * A schedule says, for each pipeline rank, the ordered list of actions that
 * rank runs in one training step. This module is pure data and algorithms (no
 * threads, no I/O beyond FILE*); the engine executes what it produces.
 *
 *     pw_schedule_config cfg = { .kind = PW_SCHEDULE_1F1B,
 *                                .n_stages = 4, .n_micro = 8 };
 *     pw_schedule *s = NULL;
 *     pw_schedule_report *rep = NULL;
 *     if (pw_schedule_generate(&cfg, &s) != PW_OK ||   // compute actions only
 *         pw_schedule_lower(s) != PW_OK ||             // + SEND/RECV
 *         pw_schedule_validate(s, &rep) != PW_OK) {    // replayed: finishes
 *         fprintf(stderr, "%s\n", pw_last_error());
 *         pw_schedule_destroy(s);
 *         return 1;
 *     }
 *     // rep->peak_inflight[r]: activation stash slots rank r needs (here
 *     // min(4 - r, 8)); rep->makespan: unit-cost length of the step.
 *     pw_schedule_write_csv(s, stdout);   // "0F0,0SF0,0F1,..." one row a rank
 *     pw_schedule_report_destroy(rep);
 *     pw_schedule_destroy(s);
 *
 * Model. The layers are cut into n_chunks = n_ranks × chunks_per_rank "stage
 * chunks", numbered 0 .. n_chunks−1 in layer order. The placement says which
 * rank runs each chunk: by default chunk c runs on rank c mod n_ranks (the
 * looping placement: GPipe and 1F1B, with one chunk per rank, have chunk ==
 * rank; interleaved 1F1B gives rank r the chunks r, r + n_ranks, ...); ZB-V
 * and DualPipeV use the V placement (chunk c on rank c for c < n_ranks, on
 * rank 2·n_ranks − 1 − c after that), held in pw_schedule.chunk_rank. Every rank
 * holds chunks_per_rank chunks. A step pushes n_micro micro-batches through
 * every chunk: forward F in chunk order, then backward B in reverse chunk
 * order, optionally split into B (gradient of the chunk's input) and W
 * (gradient of its weights).
 *
 * Communication. SEND/RECV actions carry the chunk of the rank that runs
 * them: SEND_F{c, m} sends chunk c's forward output of micro-batch m to the
 * rank of chunk c+1, which runs RECV_F{c+1, m} before F{c+1, m}; SEND_B{c, m}
 * sends chunk c's input gradient to the rank of chunk c−1, which runs
 * RECV_B{c−1, m} before B{c−1, m}. Sends never block (they are buffered);
 * receives block until their message has been sent. A message is identified
 * by (direction, chunk, micro-batch), so transports match by that key, never
 * by arrival order. Neighbouring chunks on the same rank hand over locally,
 * with no communication action.
 *
 * Every call returning pw_status records a message readable with
 * pw_last_error() on failure. Schedule errors read
 * "rank R, position P (ACTION): what is wrong" (positions count from 0 and
 * equal the cell index in the rank's CSV row); CSV errors read
 * "file:line:col: error: ...". See docs/schedules.md.
 *
 * Ownership and threads: generators and parsers return a new schedule (and
 * validate a new report) owned by the caller, freed with pw_schedule_destroy
 * (pw_schedule_report_destroy). A schedule is only written by the call that
 * makes it and by pw_schedule_lower; after that any number of threads may
 * read it at once (the engine's workers do, and the checkers). A checker is
 * used by one thread (the engine calls it from the rank's worker) and
 * borrows its schedule. Strings returned by the *_name functions are
 * static.
 */
#ifndef PW_SCHEDULER_SCHEDULE_H
#define PW_SCHEDULER_SCHEDULE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ IR */

typedef enum pw_action_kind {
    PW_ACT_F = 0,      /* forward of (chunk, mb)                        CSV 0F3 */
    PW_ACT_B,          /* backward: input grad; the whole backward when
                        * W is not split                                 CSV 0B3 */
    PW_ACT_W,          /* backward for weights (split_w schedules only)  CSV 0W3 */
    PW_ACT_SEND_F,     /* F output of (chunk, mb) to chunk+1's rank      CSV 0SF3 */
    PW_ACT_RECV_F,     /* F input of (chunk, mb) from chunk-1's rank     CSV 1RF3 */
    PW_ACT_SEND_B,     /* B input-grad of (chunk, mb) to chunk-1's rank  CSV 1SB3 */
    PW_ACT_RECV_B,     /* output grad of (chunk, mb) from chunk+1's rank CSV 0RB3 */
    PW_ACT_ALLREDUCE,  /* start all-reducing gradient bucket `mb` of
                        * `chunk` across replicas (non-blocking)        CSV AR0 */
    PW_ACT_OPTIM,      /* wait for the rank's all-reduces, apply the
                        * optimizer to every chunk of the rank; last,
                        * once per rank (chunk = mb = -1)                CSV OPT */
    PW_ACT_COUNT
} pw_action_kind;

typedef struct pw_action {
    pw_action_kind kind;
    int32_t chunk;     /* global stage-chunk index; -1 for OPTIM */
    int32_t mb;        /* micro-batch; bucket index for ALLREDUCE; -1 for OPTIM */
} pw_action;

typedef enum pw_schedule_kind {
    PW_SCHEDULE_CUSTOM = 0,  /* hand-written or loaded from CSV */
    PW_SCHEDULE_GPIPE,       /* all F (mb 0..M-1), then all B (mb 0..M-1) */
    PW_SCHEDULE_1F1B,        /* PipeDream-Flush: warm-up F, steady 1F1B, cool-down B */
    PW_SCHEDULE_INTERLEAVED, /* Megatron's interleaved 1F1B: v chunks per rank,
                              * looping placement; n_micro % n_stages == 0 */
    PW_SCHEDULE_ZB_H1,       /* Zero Bubble ZB-H1: 1F1B memory, W fills the
                              * cool-down (always splits W) */
    PW_SCHEDULE_ZB_H2,       /* Zero Bubble ZB-H2: 2p-1 warm-up forwards, W
                              * moved to the tail (always splits W) */
    PW_SCHEDULE_ZB_V,        /* Zero Bubble ZB-V: 2 chunks per rank in a V,
                              * 1F1B memory (always splits W) */
    PW_SCHEDULE_ZB_AUTO,     /* Zero Bubble ZB-1p / ZB-2p: a greedy order over
                              * the stages' F, B, W and message times under an
                              * activation-memory limit (always splits W) */
    PW_SCHEDULE_DUALPIPE_V,  /* DeepSeek's DualPipeV: 2 chunks per rank in a V,
                              * ZB-V's placement, overlapped F&B pairs written
                              * as F then B; n_micro >= 2 n_stages (always
                              * splits W) */
    PW_SCHEDULE_KIND_COUNT
} pw_schedule_kind;

typedef struct pw_rank_program {
    int n_actions;
    pw_action *actions;      /* [n_actions], run in this order */
} pw_rank_program;

/* A schedule: plain data to read, made only by the library
 * (pw_schedule_generate, pw_schedule_parse_csv, pw_schedule_load_csv),
 * which keeps more beside these fields; a pw_schedule declared or copied by
 * the caller is not one, so pass the functions here only the pointers they
 * made. Read-only after creation except through pw_schedule_lower; owned by
 * the caller, freed with pw_schedule_destroy. */
typedef struct pw_schedule {
    pw_schedule_kind kind;
    int n_ranks;             /* pipeline ranks (one replica) */
    int chunks_per_rank;     /* v: 1 for GPipe/1F1B */
    int n_chunks;            /* n_ranks * chunks_per_rank (the "stages") */
    int n_micro;             /* micro-batches per step */
    int split_w;             /* 1: B is input-grad only and every (chunk, mb)
                              * also has a W; 0: no W anywhere */
    int n_buckets;           /* all-reduce buckets per chunk (0: none) */
    int lowered;             /* 1 once pw_schedule_lower has run (the CSV
                              * parser runs it); generators leave 0 */
    pw_rank_program *ranks;  /* [n_ranks] */
    /* Placement: the rank that runs each chunk. NULL: the looping placement,
     * chunk c on rank c mod n_ranks. Otherwise [n_chunks] (ZB-V: chunk c on
     * rank c for c < n_ranks, else 2·n_ranks − 1 − c); every rank holds
     * exactly chunks_per_rank chunks. Read it with pw_schedule_rank_of().
     * A table equal to the looping placement is stored as NULL. */
    const int *chunk_rank;
} pw_schedule;

/* The rank that runs `chunk`; -1 when chunk is out of range. */
int pw_schedule_rank_of(const pw_schedule *s, int chunk);

/* ------------------------------------------------------------ generators */

/* Times of one micro-batch on each stage (zb-auto): seconds (>= 0, finite;
 * rounded to whole nanoseconds), e.g. a partition's predicted stage costs or
 * the measured times of the stages' programs. */
typedef struct pw_schedule_costs {
    const double *f, *b, *w; /* [n_stages]: forward, backward for the input,
                              * backward for the weights */
    double comm;             /* one message between neighbouring stages */
} pw_schedule_costs;

typedef struct pw_schedule_config {
    pw_schedule_kind kind;   /* any kind but PW_SCHEDULE_CUSTOM */
    int n_stages;            /* pipeline ranks (p), >= 1 */
    int n_micro;             /* micro-batches per step (m), >= 1; interleaved:
                              * a multiple of n_stages; dualpipev: >= 2 n_stages */
    int split_w;             /* 0 or 1: emit W right after each B (GPipe,
                              * 1F1B, interleaved). The zero-bubble kinds
                              * always split W and place it themselves; for
                              * them this field is ignored */
    int n_buckets;           /* >= 0: ALLREDUCE actions per chunk, emitted
                              * right after the chunk's last backward (data
                              * parallelism); 0 for a single replica */
    int chunks_per_rank;     /* v. Interleaved: >= 2 (0 means 2). ZB-V and
                              * DualPipeV: 2 (0 means 2). Other kinds: 1 (0
                              * means 1) */
    /* zb-auto only (the other kinds ignore both). */
    int memory_limit;        /* activation slots per rank: micro-batches between
                              * their F and their W, >= 1; 0 means 2·n_stages
                              * (ZB-2p); n_stages is ZB-1p (1F1B's first rank).
                              * pw_schedule_memory_limit_parse reads "2p" */
    const pw_schedule_costs *costs; /* NULL: F = B = W = 1 s, free messages */
} pw_schedule_config;

/* Builds the compute-only schedule (F, B, W, ALLREDUCE, then one OPTIM per
 * rank) for `cfg`. PW_OK: *out is a new schedule with lowered == 0.
 * PW_ERR_INVALID_ARG: a config field is out of range (kind, counts, v, an
 * interleaved n_micro that is not a multiple of n_stages, or a rank would
 * exceed INT_MAX actions, a dualpipev n_micro below 2 n_stages); *out is
 * NULL. PW_ERR_NOMEM: *out is NULL.
 * The generators, their memory and their bubbles: docs/schedules.md. */
pw_status pw_schedule_generate(const pw_schedule_config *cfg, pw_schedule **out);

/* Accepts NULL. */
void pw_schedule_destroy(pw_schedule *s);

/* Reads a zb-auto memory limit: "Np" (N whole: N·n_stages slots, the paper's
 * ZB-1p and ZB-2p are "1p" and "2p") or a plain count of slots ("12").
 * PW_OK: *out >= 1. PW_ERR_INVALID_ARG: "memory limit 'x': expected a count
 * of micro-batches (e.g. 12) or a multiple of the stages (1p, 2p)". */
pw_status pw_schedule_memory_limit_parse(const char *text, int n_stages, int *out);

/* Inserts the communication, in place: RECV_F immediately before each F whose
 * input comes from another rank, SEND_F immediately after each F whose output
 * goes to another rank, and RECV_B / SEND_B likewise around each B.
 * Idempotent: a schedule that already holds any SEND/RECV is taken as lowered
 * by its author and left unchanged (the validator checks it is complete).
 * PW_OK: s->lowered == 1. PW_ERR_SCHEDULE: an action names a kind, chunk or
 * micro-batch that does not exist or a chunk of another rank (s unchanged).
 * PW_ERR_NOMEM: s unchanged. */
pw_status pw_schedule_lower(pw_schedule *s);

/* 1 when a and b hold the same shape, flags and actions (kind included). */
int pw_schedule_equal(const pw_schedule *a, const pw_schedule *b);

/* -------------------------------------------------------------- validator */

typedef struct pw_schedule_report {
    int n_ranks, n_chunks;
    /* Activation stash: (chunk, micro-batch) pairs whose F has run and whose
     * last backward (B, or W when split) has not; its peak is the number of
     * activation slots a rank (or one chunk) needs. GPipe: M on every rank;
     * 1F1B: min(S-r, M); the other kinds: pw_schedule_config_peak(). */
    int *peak_inflight;         /* [n_ranks] */
    int *peak_inflight_chunk;   /* [n_chunks] */
    /* peak_inflight[r] / chunks_per_rank: the same peak in units of one
     * micro-batch's activations of one whole stage (a rank's share of the
     * layers, 1/n_ranks of the model), taking each chunk as an equal share
     * of its rank's layers. This is the unit of the published figures:
     * 1F1B and ZB-H1 hold p on the first rank, ZB-H2 2p-1, ZB-V p,
     * interleaved p + (p-1)/v (p = n_ranks, v = chunks_per_rank). */
    double *peak_stages;        /* [n_ranks] */
    /* Split W only: micro-batches whose B has run and whose W has not (their
     * input activations and output grads are still held for W). */
    int *peak_w_pending;        /* [n_ranks]; all 0 when not split */
    int64_t n_actions;          /* actions replayed (all of them) */
    int64_t n_messages;         /* SEND/RECV pairs matched */
    /* Unit-cost replay: every F/B/W takes one step, communication none, each
     * action starts as soon as its rank and its input allow. */
    int64_t makespan;           /* steps from the first F to the last action */
    double bubble;              /* idle fraction: 1 - busy / (n_ranks*makespan) */
} pw_schedule_report;

/* Replays the schedule symbolically as n_ranks concurrent programs with
 * blocking receives and buffered sends, and proves that it finishes and is
 * well formed:
 *   - every action names a valid kind, a chunk of its own rank and an mb in
 *     range; SEND/RECV name a neighbour on another rank;
 *   - each (chunk, mb) has exactly one F and one B, and one W iff split_w;
 *     F needs the input (F of chunk-1: locally, or through RECV_F), B needs
 *     its F and the output grad (B of chunk+1, locally or through RECV_B),
 *     W needs its B; a SEND follows the compute it sends;
 *   - every send is received exactly once, every receive is sent;
 *   - each (chunk, bucket) is all-reduced once, after the chunk's last
 *     backward; OPTIM runs once per rank, last, after all of them;
 *   - no deadlock: if at some point no rank can move, the message names the
 *     cycle of waits ("deadlock: rank 1 at position 4 (RECV_F mb 2 from rank
 *     0) waits; rank 0 at position 7 (RECV_B mb 1 from rank 1) waits").
 * The schedule must be lowered when it spans more than one rank (otherwise
 * the first F that needs a message reports the missing receive).
 * Runs in O(total actions + n_chunks * n_micro) time and memory, where a
 * shape with n_chunks * (n_micro + n_buckets) more than 65536 beyond the
 * total actions (which cannot validate: some F or ALLREDUCE is missing) is
 * reported from the actions alone ("rank R, at the end: chunk C mb M never
 * runs F (the rank has K F actions for ...)"), so memory follows the actions.
 * PW_OK: *out (when out != NULL) is a new report. PW_ERR_SCHEDULE: the first
 * problem found, "rank R, position P (ACTION): what is wrong"; *out is NULL.
 * PW_ERR_INVALID_ARG (s NULL or its shape fields inconsistent),
 * PW_ERR_UNSUPPORTED (4 G actions or more), PW_ERR_NOMEM. */
pw_status pw_schedule_validate(const pw_schedule *s, pw_schedule_report **out);

/* Accepts NULL. */
void pw_schedule_report_destroy(pw_schedule_report *rep);

/* Run-time invariant check for one rank (STYLE.md §14): the engine, behind
 * PW_DEBUG_CHECK=1, feeds each action of `rank` as it completes; the
 * validator runs the same checks. It holds "every F before its B before its
 * W", the local conditions of each action listed above, and "in-flight <=
 * bound". One checker per rank; not thread-safe (each worker owns its own). */
typedef struct pw_schedule_checker pw_schedule_checker;

/* inflight_bound: largest allowed activation in-flight count on the rank
 * (the validator's peak_inflight[rank]); 0: unchecked. The schedule must
 * outlive the checker. PW_ERR_INVALID_ARG: rank out of range. */
pw_status pw_schedule_checker_create(const pw_schedule *s, int rank, int inflight_bound,
                                     pw_schedule_checker **out);
/* PW_OK, or PW_ERR_SCHEDULE naming the rank, the action's position (actions
 * fed so far) and the broken rule. After an error the checker's state is
 * unspecified until pw_schedule_checker_finish. */
pw_status pw_schedule_checker_step(pw_schedule_checker *c, const pw_action *a);
/* End of a training step: checks that every (chunk, mb) of the rank has had
 * its F, B (and W), every needed SEND, every all-reduce and the OPTIM; then
 * resets for the next step (also after an error). PW_OK or PW_ERR_SCHEDULE. */
pw_status pw_schedule_checker_finish(pw_schedule_checker *c);
void pw_schedule_checker_destroy(pw_schedule_checker *c); /* accepts NULL */

/* -------------------------------------------------------------- CSV form */

/* One line per rank (rank 0 first), one action per comma-separated cell:
 *   <chunk>F<mb>  <chunk>B<mb>  <chunk>W<mb>                 compute
 *   <chunk>SF<mb> <chunk>RF<mb> <chunk>SB<mb> <chunk>RB<mb>  communication
 *   AR<bucket> (one chunk per rank) or <chunk>AR<bucket>      all-reduce
 *   OPT                                                       optimizer
 * Spaces around cells, empty cells, blank lines and '#' comment lines are
 * ignored; letters may be lower case. An optional header comment, before the
 * first row, fixes the shape instead of inferring it from the cells:
 *   # pipewright schedule v1: kind=1f1b ranks=4 chunks_per_rank=1
 *     micro_batches=8 split_w=0 buckets=0          (one line; any subset)
 * and, for a placement other than looping, placement=v (the V placement of
 * ZB-V; kind=zb-v or dualpipev implies it) or placement=R0,R1,... (the rank of each chunk,
 * in chunk order). Rows holding only compute actions are lowered by the parser
 * (pw_schedule_lower); rows that hold any SEND/RECV are kept as written.
 * PW_OK: *out is a new schedule. PW_ERR_PARSE: "file:line:col: error: ..."
 * (filename NULL reads "<string>") for a malformed cell, a chunk not on its
 * row's rank, an index beyond the header's counts, a bad header, or a shape
 * that the cells cannot fill (chunks x (micro-batches + buckets) more than
 * 65536 beyond the number of cells: every chunk runs an F per micro-batch
 * and an ALLREDUCE per bucket), so memory follows the cells, not the largest
 * index; *out is NULL. The result is not validated: call
 * pw_schedule_validate. */
pw_status pw_schedule_parse_csv(const char *text, size_t len, const char *filename,
                                pw_schedule **out);
/* Reads `path` and parses it. PW_ERR_IO when it cannot be read. */
pw_status pw_schedule_load_csv(const char *path, pw_schedule **out);

/* Writes the header comment (placement= only when not looping) and one row
 * per rank. A lowered schedule reads
 * back equal (pw_schedule_equal) and re-writes to the same bytes; a
 * compute-only one reads back lowered. PW_ERR_IO on a write error. */
pw_status pw_schedule_write_csv(const pw_schedule *s, FILE *f);
pw_status pw_schedule_save_csv(const pw_schedule *s, const char *path);

/* ----------------------------------------------------- names and theory */

/* "F", "B", "W", "SEND_F", ..., "OPTIM"; "?" when out of range. */
const char *pw_action_kind_name(pw_action_kind k);
/* "custom", "gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v",
 * "zb-auto", "dualpipev"; "?" when out of range. */
const char *pw_schedule_kind_name(pw_schedule_kind k);
/* Inverse of pw_schedule_kind_name (case-insensitive; also accepted:
 * "pipedream-flush" for 1f1b, "interleaved-1f1b" for interleaved, and the
 * zero-bubble names with '_' or without the dash: "zb_h1", "zbh1", "zbv";
 * "dualpipe-v" and "dualpipe_v" for dualpipev).
 * PW_ERR_INVALID_ARG names the choices. */
pw_status pw_schedule_kind_parse(const char *name, pw_schedule_kind *out);
/* The action's CSV cell ("0F3", "1RB2", "AR0", "OPT") into buf, NUL
 * terminated; `one_chunk_per_rank` writes AR<b> without its chunk. Returns the
 * length it needs (as snprintf). */
int pw_action_format(const pw_action *a, int one_chunk_per_rank, char *buf, size_t n);

/* Ideal bubble fraction: (p-1)/(m+p-1) for GPipe and 1F1B (p stages, m
 * micro-batches, every stage equally fast). It is exact for the unsplit
 * schedules; with split W it counts B+W as one backward and is an upper
 * bound, since sending the gradient before W lets the upstream stage start
 * sooner (pw_schedule_report.bubble has the replayed figure). The
 * zero-bubble kinds give pw_schedule_config_bubble() of their generated
 * schedule. -1.0 for custom and interleaved (it needs v: use
 * pw_schedule_config_bubble) or counts < 1. */
double pw_schedule_theoretical_bubble(pw_schedule_kind kind, int n_stages, int n_micro);
/* The first-order model of a kind's step for a bubble estimate from
 * measured per-stage times (pipe-trace): FILL_DRAIN (GPipe: every forward,
 * then every backward, so forwards and backwards each pay the slowest
 * stage's fill), ONE_F_ONE_B (1F1B: the slowest stage's F + B sets the
 * steady state), or NONE (no such model: interleaved, zero-bubble, custom). */
typedef enum pw_schedule_model {
    PW_SCHEDULE_MODEL_NONE = 0,
    PW_SCHEDULE_MODEL_FILL_DRAIN,
    PW_SCHEDULE_MODEL_ONE_F_ONE_B,
} pw_schedule_model;
pw_schedule_model pw_schedule_kind_model(pw_schedule_kind kind);
/* The theoretical bubble of a schedule named as in a trace's metadata (a
 * kind's name or spelling accepted by pw_schedule_kind_parse), -1 when the
 * name is no kind or the kind has no formula (see above). */
double pw_schedule_named_bubble(const char *name, int n_stages, int n_micro);
/* Theoretical peak in-flight activations on `stage`: n_micro for GPipe,
 * min(n_stages - stage, n_micro) for 1F1B, pw_schedule_config_peak() for the
 * zero-bubble kinds; -1 for custom, interleaved or bad args. */
int pw_schedule_theoretical_peak(pw_schedule_kind kind, int n_stages, int n_micro, int stage);

/* Closed forms for the schedule pw_schedule_generate builds from `cfg`, under
 * the validator's unit costs (every F, B and W of a chunk takes one step,
 * communication is free). With p = n_stages, m = n_micro, v = chunks per
 * rank, the step lasts T unit steps and the bubble is 1 - busy / (p T):
 *   gpipe, 1f1b        T = 2(m+p-1)           bubble (p-1)/(m+p-1)
 *     with split W     T = 3m + 2(p-1)        bubble 2(p-1)/(3m+2(p-1))
 *   interleaved        T = 2(vm+p-1)          bubble (p-1)/(vm+p-1)
 *     with split W     T = 3vm + 2(p-1)       bubble 2(p-1)/(3vm+2(p-1))
 *   zb-h1, zb-h2       T = 3m + p-1 + max(0, p-m)
 *   zb-v               T = max(6m + p-1, 4m + 4p-2)
 *   dualpipev          T = 6m + p-1                   (m >= 2p)
 *   zb-auto            no closed form: the generated order (cfg's limit,
 *                      unit costs) replayed, O(actions) per call
 * (the tests replay every p <= 8, m <= 16 against these). -1.0 when cfg is
 * out of range. */
double pw_schedule_config_bubble(const pw_schedule_config *cfg);
/* Peak in-flight (chunk, micro-batch) activations on `rank` of the generated
 * schedule (pw_schedule_report.peak_inflight):
 *   gpipe m; 1f1b min(p-r, m); interleaved min(2(p-r-1) + (v-1)p + 1, vm)
 *   (Megatron's warm-up plus one); zb-h1 min(p, m); zb-h2 min(2p-1, m);
 *   zb-v min(2p, 2m, m+1+r) (two half-stage chunks: 2p slots are p stages);
 *   dualpipev 2p+1 on every rank (DeepSeek's PP+1 half-stage chunks, PP = 2p:
 *   p + 1/2 stages);
 *   zb-auto: the generated order's replayed peak, at most min(limit, m).
 * -1 when cfg or rank is out of range. */
int pw_schedule_config_peak(const pw_schedule_config *cfg, int rank);

/* ASCII timeline, one line per rank, compute actions placed at their
 * unit-cost replay step ('.' = idle). A schedule that does not validate is
 * printed as plain action lists under the validator's message. PW_OK, or
 * PW_ERR_IO / PW_ERR_NOMEM. */
pw_status pw_schedule_print(const pw_schedule *s, FILE *f);

#ifdef __cplusplus
}
#endif
#endif
