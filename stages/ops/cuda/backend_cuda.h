/* pipewright — the stage program's CUDA backend (stages/ops/backend.h over the
 * stages/ops/cuda ops and device layer).
 *
 *     #ifdef PW_HAVE_CUDA
 *     #include "stages/ops/cuda/backend_cuda.h"
 *     PW_CHECK(pw_backend_register(pw_backend_cuda()));  // once, at start-up
 *     #endif
 *     pw_program_config pc = { ..., .device = "cuda:0" };
 *
 * Only programs that link pw_cuda (pipeline-run, the CUDA tests) can call
 * it; pw_stages itself never depends on CUDA (docs/cuda.md, "Choosing the
 * backend").
 *
 * A context is one pw_cuda_stage (one cudaMalloc per memory category, three
 * streams) and one pw_cuda_ops on its compute stream: every op, copy and
 * fill of the program is enqueued there, in program order.
 */
#ifndef PW_STAGES_CUDA_BACKEND_CUDA_H
#define PW_STAGES_CUDA_BACKEND_CUDA_H

#include "stages/ops/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

const pw_backend_i *pw_backend_cuda(void);

#ifdef __cplusplus
}
#endif
#endif
