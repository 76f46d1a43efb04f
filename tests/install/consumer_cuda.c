/* A program built on an installed pipewright's CUDA component
 * (scripts/check-install.sh, when libpipewright_cuda is installed): registers
 * the CUDA backend, as a trainer does at start-up, finds it by its device
 * string and counts the GPUs. With no GPU (CI) the count fails with "no CUDA
 * device", which is fine here: what is checked is that the program compiles,
 * links and runs against libpipewright_cuda and libpipewright.
 *
 * Prints "consumer_cuda: backend cuda, N device(s)" or "..., no device
 * (...)"; exits 1 when registering or finding the backend fails. */
#include <pipewright/pipewright.h>
#include <pipewright/stages/ops/backend.h>
#include <pipewright/stages/ops/cuda/backend_cuda.h>
#include <pipewright/stages/ops/cuda/device.h>
#include <stdio.h>

int main(void)
{
#ifndef PW_HAVE_CUDA
#error "pipewright-cuda's flags define PW_HAVE_CUDA"
#endif
    const pw_backend_i *be = NULL;
    int index = 0, n = 0;
    if (pw_backend_register(pw_backend_cuda()) != PW_OK ||
        pw_backend_find("cuda:0", &be, &index) != PW_OK) {
        fprintf(stderr, "consumer_cuda: %s\n", pw_last_error());
        return 1;
    }
    if (pw_cuda_device_count(&n) == PW_OK)
        printf("consumer_cuda: backend %s, %d device(s)\n", be->name, n);
    else
        printf("consumer_cuda: backend %s, no device (%s)\n", be->name, pw_last_error());
    return 0;
}
