/* libFuzzer harness: the IDX reader (stages/train/data.c, pw_dataset_load_idx_parts).
 *
 * Input layout: byte 0 picks the parts to load (bits 0-1: inputs, labels;
 * 0 reads the labels header only), bytes 1-2 (little-endian) the length of
 * the images file, then the images file, then the labels file. Either may be
 * gzip-compressed. A data set that loads is gathered from, first and last
 * sample, as the trainer would. Seeds: tests/fuzz/corpus/idx/. */
#include "stages/train/data.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;
    if (!once++) fuzz_quiet();
    unsigned parts = (unsigned)fuzz_take(&data, &size, 1) & PW_DATA_ALL;
    size_t n_images = (size_t)fuzz_take(&data, &size, 2);
    if (n_images > size) n_images = size;
    fuzz_file im = fuzz_file_open(data, n_images, "images.idx");
    fuzz_file lb = fuzz_file_open(data + n_images, size - n_images, "labels.idx");
    pw_dataset *d = NULL;
    if (pw_dataset_load_idx_parts(im.path, lb.path, parts, &d) == PW_OK) {
        if (d->n < 1) abort(); /* the reader promises at least one sample */
        int64_t idx[2] = {0, d->n - 1};
        float *x = (parts & PW_DATA_INPUTS) ? malloc(2 * sizeof(float) * (size_t)d->sample_numel) : NULL;
        int32_t *y = (parts & PW_DATA_LABELS) ? malloc(2 * sizeof(int32_t) * (size_t)d->label_numel) : NULL;
        if (pw_dataset_gather(d, idx, 2, x, y) != PW_OK) abort();
        for (int i = 0; y && i < 2; i++)
            if (y[i] < 0 || y[i] >= d->n_classes) abort();
        free(x);
        free(y);
    }
    pw_dataset_destroy(d);
    fuzz_file_close(&im);
    fuzz_file_close(&lb);
    return 0;
}
