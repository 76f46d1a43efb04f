/* pipewright — compute backends of the stage program: one table of op
 * functions per backend (STYLE 2), chosen at run time by a device string.
 *
 *     const pw_backend_i *be;
 *     int dev;
 *     PW_CHECK(pw_backend_find("cuda:0", &be, &dev)); // "cpu" is always there
 *     void *ctx = NULL, *base[PW_MEM_COUNT];
 *     if (be->open) PW_CHECK(be->open(dev, PW_MATH_FP32, "stage 1", bytes, &ctx, base));
 *     PW_CHECK(be->linear_fwd(ctx, x, w, b, y, n, in, out));
 *     PW_CHECK(be->sync(ctx));                          // (optional slot)
 *     if (be->close) be->close(ctx);
 *
 * The stage program (stages/program/program.c) calls every op through this table.
 * Each slot takes the backend's context first and returns a pw_status; the
 * arguments are those of stages/ops/cpu/ops.h (same layouts, same `accumulate`
 * rule). The CPU entries (backend_cpu.c) are thin wrappers around pw_cpu_*,
 * so a CPU program computes exactly the bits it computed before the table
 * existed. The CUDA entries (stages/ops/cuda/backend_cuda.c, built only with the
 * CUDA toolkit) enqueue the stages/ops/cuda ops on the context's stream; their
 * pointers are device pointers, and nothing waits until `sync`.
 *
 * Registry. pw_stages does not link CUDA: the CPU backend is built in, and
 * the CUDA backend is added at run time by a program that links pw_cuda:
 *
 *     #ifdef PW_HAVE_CUDA
 *     pw_backend_register(pw_backend_cuda());   // stages/ops/cuda/backend_cuda.h
 *     #endif
 *
 * (pipeline-run and the CUDA tests do). Without it, "cuda" is refused with
 * "built without CUDA" (docs/cuda.md, "Choosing the backend").
 *
 * Ownership and threads: backend tables are static and read-only. The
 * registry is not locked: register every backend from one thread before any
 * program is created; pw_backend_find may then be called from any thread.
 * A context (open's) is used by one thread at a time, the program's, which
 * calls activate first; notify's fn runs on another thread; span_memory's
 * operations run on any thread; host_register and message_alloc are
 * process-wide.
 */
#ifndef PW_STAGES_BACKEND_H
#define PW_STAGES_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/collective.h"
#include "runtime/status.h"
#include "stages/ops/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The program's memory categories: one block each (pw_cuda_stage_create's). */
typedef enum pw_mem_cat {
    PW_MEM_PARAMS = 0,
    PW_MEM_GRADS,
    PW_MEM_OPTIM,        /* optimizer state */
    PW_MEM_ACTIVATIONS,  /* shared region (workspace) and the slots */
    PW_MEM_COUNT
} pw_mem_cat;

/* How a device backend may do its matrix products (GEMMs; everything else
 * is fp32 whatever the mode). Storage — parameters, gradients, optimizer
 * state, activations — is fp32 in every mode, so the weights the optimizer
 * updates are fp32 "master weights". The CPU ignores it. */
typedef enum pw_math {
    PW_MATH_FP32 = 0, /* plain fp32 (the default) */
    PW_MATH_TF32,     /* operands rounded to TF32 in the tensor cores, fp32 accumulation */
    PW_MATH_BF16      /* operands rounded to bf16 in the tensor cores, fp32 accumulation */
} pw_math;

/* "fp32", "tf32", "bf16". */
const char *pw_math_name(pw_math m);
/* The mode named s (the names above); PW_ERR_INVALID_ARG otherwise. */
pw_status pw_math_parse(const char *s, pw_math *out);

/* One device of a backend, as a plan sees it (the device_info slot). */
typedef struct pw_device_info {
    char name[256];            /* the model: "NVIDIA H100 80GB HBM3" */
    int64_t total_memory;      /* bytes */
    int64_t free_memory;       /* bytes free at the time of the query */
} pw_device_info;

typedef struct pw_backend_i {
    const char *name;        /* "cpu", "cuda" */
    int device_memory;       /* 1: the program's buffers are not host-addressable */

    /* ---- lifetime and memory ---- */
    /* (optional) One zeroed block per category of bytes[c] (base[c] NULL for
     * 0 bytes), and the context the other slots take, on device `device`.
     * NULL: the program keeps its memory in one host arena (pw_arena; what
     * pw_program_bind_memory binds to a NUMA node) and the context is NULL.
     * `who` names the program in messages; `math` is its GEMMs' mode. On
     * failure nothing is left. */
    pw_status (*open)(int device, pw_math math, const char *who, const size_t bytes[PW_MEM_COUNT],
                      void **ctx, void *base[PW_MEM_COUNT]);
    void (*close)(void *ctx); /* (optional) frees what open made; accepts NULL */
    /* (optional) Devices of this backend on this machine (0 when there are
     * none); NULL: one. A pipeline given the bare name ("cuda") spreads its
     * ranks over them (rank r on device r mod count). */
    int (*device_count)(void);
    /* (optional) Makes the context usable on the calling thread (the CUDA
     * device is current per thread); called at the start of each program
     * call. */
    pw_status (*activate)(void *ctx);
    /* (optional) Returns once everything enqueued so far has finished, with
     * the first error of that work. NULL: every slot finishes before it
     * returns (the CPU). */
    pw_status (*sync)(void *ctx);
    /* (optional) Calls fn(arg) once everything enqueued so far (downloads
     * included: their host side is then written) has finished, from any
     * thread (CUDA: a host function on the stream, on a runtime thread).
     * fn must not call the backend. Never blocks. NULL: the program has no asynchronous mode
     * (pw_program_set_async). */
    pw_status (*notify)(void *ctx, void (*fn)(void *arg), void *arg);
    /* Copies in enqueue order: host → backend memory, backend → host, and
     * within the backend's memory. The host side of upload/download must
     * stay valid until the next sync. */
    pw_status (*upload)(void *ctx, void *dst, const void *src, size_t bytes);
    /* (optional) Page-locks [base, base + bytes) of host memory for the
     * whole process, so that upload/download through it run asynchronously
     * (CUDA: from pageable memory a download waits for the device). base
     * and bytes must be page-aligned, and no page may be registered twice.
     * A failure leaves the memory pageable (slower, still correct): the
     * caller warns and goes on. host_unregister undoes it before the memory
     * is freed. NULL: the backend copies host memory as it is (the CPU). */
    pw_status (*host_register)(void *base, size_t bytes);
    void (*host_unregister)(void *base);
    /* (optional) `bytes` of zeroed backend memory on `device` for the
     * messages between programs that all compute there (a pipeline's
     * stages on one GPU): their uploads and downloads then copy within the
     * device instead of through the host. message_free releases it. NULL:
     * messages live in host memory. */
    pw_status (*message_alloc)(int device, size_t bytes, void **base);
    void (*message_free)(void *base);
    /* (optional) The element operations of the replicas' in-process
     * all-reduce on this backend's gradient memory (runtime/collective.h;
     * from any thread, e.g. the engine's communication threads), with the
     * host loop's bits. NULL: replicas > 1 are refused on a device backend
     * (the ring would read device memory on the host). */
    const pw_span_mem *span_memory;
    pw_status (*download)(void *ctx, void *dst, const void *src, size_t bytes);
    pw_status (*copy)(void *ctx, void *dst, const void *src, size_t bytes);
    pw_status (*zero)(void *ctx, void *dst, size_t bytes);

    /* (optional) Recording. The program brackets the ops of one training
     * call — the forward, input backward or weight backward of one slot,
     * uploads and downloads outside — with record_begin(ctx, key) and
     * record_end(ctx, key, status of the calls between). The calls between
     * two brackets of one key are the same ops on the same pointers and
     * sizes every time; only dropout_fwd's key and first_sample change. The
     * backend may record them the first time and replay the record later
     * (CUDA: a graph, one launch instead of hundreds): then the op slots
     * between the brackets only note their arguments, and record_end
     * launches the record — or fails with PW_ERR_INTERNAL if the calls
     * differ from the recorded ones. A failed status given to record_end
     * discards the recording. NULL: every call runs as made. */
    pw_status (*record_begin)(void *ctx, int key);
    pw_status (*record_end)(void *ctx, int key, pw_status calls);

    /* ---- ops (stages/ops/cpu/ops.h for shapes and semantics) ---- */
    pw_status (*linear_fwd)(void *ctx, const float *x, const float *w, const float *b, float *y,
                            int64_t n, int64_t in, int64_t out);
    pw_status (*linear_bwd_input)(void *ctx, const float *dy, const float *w, float *dx, int64_t n,
                                  int64_t in, int64_t out, int accumulate);
    pw_status (*linear_bwd_weight)(void *ctx, const float *dy, const float *x, float *dw,
                                   float *db, int64_t n, int64_t in, int64_t out);
    pw_status (*relu_fwd)(void *ctx, const float *x, float *y, int64_t n);
    pw_status (*relu_bwd_input)(void *ctx, const float *y, const float *dy, float *dx, int64_t n,
                                int accumulate);
    pw_status (*gelu_fwd)(void *ctx, const float *x, float *y, int64_t n);
    pw_status (*gelu_bwd_input)(void *ctx, const float *x, const float *dy, float *dx, int64_t n,
                                int accumulate);
    pw_status (*layernorm_fwd)(void *ctx, const float *x, const float *w, const float *b, float *y,
                               float *mean, float *rstd, int64_t n, int64_t d, float eps);
    pw_status (*layernorm_bwd_input)(void *ctx, const float *x, const float *w, const float *mean,
                                     const float *rstd, const float *dy, float *dx, int64_t n,
                                     int64_t d, int accumulate);
    pw_status (*layernorm_bwd_weight)(void *ctx, const float *x, const float *mean,
                                      const float *rstd, const float *dy, float *dw, float *db,
                                      int64_t n, int64_t d);
    pw_status (*add_fwd)(void *ctx, const float *a, const float *b, float *y, int64_t n);
    pw_status (*copy_grad)(void *ctx, const float *dy, float *dx, int64_t n, int accumulate);
    /* Softmax cross-entropy over n rows of C. With `stats` (2 doubles of
     * backend memory; NULL: probabilities only) it also ADDS the rows'
     * summed loss to stats[0] and the count of rows whose first largest
     * logit is the label to stats[1] (the CPU: pw_cpu_softmax_xent_fwd's
     * return value, summed as that op sums). `scratch` is n doubles of
     * backend memory for a backend that reduces per row (the CPU ignores
     * it; NULL when stats is NULL). */
    pw_status (*xent_fwd)(void *ctx, const float *logits, const int32_t *labels, float *probs,
                          double *stats, double *scratch, int64_t n, int64_t C);
    pw_status (*xent_bwd)(void *ctx, const float *probs, const int32_t *labels, float *dlogits,
                          int64_t n, int64_t C, float scale, int accumulate);
    /* y[0..m) = (float)(stats[0] / div): the loss value of a micro-batch. */
    pw_status (*loss_fill)(void *ctx, const double *stats, float *y, int64_t m, double div);
    pw_status (*embedding_fwd)(void *ctx, const int32_t *tokens, const float *w, float *y,
                               int64_t n, int64_t vocab, int64_t d);
    pw_status (*embedding_bwd_weight)(void *ctx, const int32_t *tokens, const float *dy, float *dw,
                                      int64_t n, int64_t vocab, int64_t d);
    pw_status (*pos_embedding_fwd)(void *ctx, const float *x, const float *w, float *y,
                                   int64_t batch, int64_t T, int64_t d);
    pw_status (*pos_embedding_bwd_weight)(void *ctx, const float *dy, float *dw, int64_t batch,
                                          int64_t T, int64_t d);
    pw_status (*attention_fwd)(void *ctx, const float *qkv, float *out, float *att, int64_t batch,
                               int64_t T, int64_t D, int64_t H);
    /* `scratch` holds attention_scratch(T, H) floats. */
    pw_status (*attention_bwd_input)(void *ctx, const float *qkv, const float *att,
                                     const float *dout, float *dqkv, float *scratch, int64_t batch,
                                     int64_t T, int64_t D, int64_t H, int accumulate);
    int64_t (*attention_scratch)(int64_t T, int64_t H); /* floats: H·T·T (CPU and CUDA) */
    pw_status (*dropout_fwd)(void *ctx, const float *x, float *y, uint8_t *mask, int64_t batch,
                             int64_t numel, float p, uint64_t key, int64_t first_sample);
    pw_status (*dropout_bwd_input)(void *ctx, const uint8_t *mask, const float *dy, float *dx,
                                   int64_t n, float p, int accumulate);

    /* ---- the optimizer and reductions over the gradients ---- */
    /* pw_optim_update on backend memory. */
    pw_status (*optim_update)(void *ctx, const pw_optim_config *c, int64_t step, float *p,
                              const float *g, float *state, int64_t n, int decay);
    /* (optional) optim_update, and g[0 .. n) = 0 in the same sweep (one pass
     * over the gradient fewer). With it the program does not zero the
     * gradients after a step: its other gradient memory is zero already.
     * NULL: optim_update, then the program zeroes the gradients. */
    pw_status (*optim_update_zero)(void *ctx, const pw_optim_config *c, int64_t step, float *p,
                                   float *g, float *state, int64_t n, int decay);
    /* *bad = the index of the first of `count` arrays (g[i], n[i] floats)
     * holding an infinity or a NaN, or -1 when all are finite. Waits for
     * the work before it (the host needs the answer). */
    pw_status (*find_nonfinite)(void *ctx, float *const *g, const int64_t *n, int count, int *bad);

    /* ---- placement ---- */
    /* (optional) PCI bus id of device `device` ("0000:11:00.0", buf of at
     * least 16 bytes): the pipeline binds the worker of a rank on that
     * device to the cores near it (runtime/topology.h, pw_cpu_place_gpus).
     * NULL: the backend's devices have no PCI locality (the CPU). */
    pw_status (*device_pci)(int device, char *buf, size_t n);
    /* (optional) Name and memory of device `device` (0 .. device_count-1):
     * what a plan on this machine's devices places by (stages/plan/plan.h,
     * pw_plan_local_devices). PW_ERR_INVALID_ARG for a device out of range.
     * NULL: the backend has no devices to describe (the CPU). */
    pw_status (*device_info)(int device, pw_device_info *out);
} pw_backend_i;

/* The CPU backend (always present). */
extern const pw_backend_i pw_backend_cpu_i;

/* Adds a backend to the registry (by name; registering a name again
 * replaces it). Call before creating programs, from one thread. At most 8. */
pw_status pw_backend_register(const pw_backend_i *be);

/* Parses a device string — "cpu", "<name>" or "<name>:N" (N ≥ 0) — and
 * finds its backend. *index is N, or -1 for the bare name (a program takes
 * device 0; a pipeline spreads its ranks over the devices, see
 * device_count). PW_ERR_INVALID_ARG for a malformed string;
 * PW_ERR_UNSUPPORTED "built without CUDA" for "cuda" when no CUDA backend
 * is registered. Only checks the name: whether device N exists is the
 * backend's open's answer. */
pw_status pw_backend_find(const char *device, const pw_backend_i **be, int *index);

#ifdef __cplusplus
}
#endif
#endif
