/* libFuzzer harness: the text data reader (stages/train/data.c,
 * pw_dataset_load_text). Byte 0 picks the split (bit 0) and the context:
 * bits 1-6 give 1..64, or with bit 7 set the next 8 bytes give any int64
 * (negative and huge contexts included); the rest is the file. A data set
 * that loads is gathered from (first and last window) and its entropy
 * computed, as the trainer does. Seeds: tests/fuzz/corpus/text/. */
#include "stages/train/data.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;
    if (!once++) fuzz_quiet();
    unsigned b = (unsigned)fuzz_take(&data, &size, 1);
    int train = b & 1;
    int64_t T = (int64_t)((b >> 1) & 63) + 1;
    if (b & 0x80) T = (int64_t)fuzz_take(&data, &size, 8);
    fuzz_file f = fuzz_file_open(data, size, "text.txt");
    pw_dataset *d = NULL;
    if (pw_dataset_load_text(f.path, T, train, &d) == PW_OK) {
        if (d->n < 1 || d->sample_numel != T) abort();
        int64_t idx[2] = {0, d->n - 1};
        int32_t *x = malloc(2 * sizeof(int32_t) * (size_t)T), *y = malloc(2 * sizeof(int32_t) * (size_t)T);
        if (!x || !y || pw_dataset_gather(d, idx, 2, x, y) != PW_OK) abort();
        for (int64_t i = 0; i < 2 * T; i++)
            if (x[i] < 0 || x[i] > 255 || y[i] < 0 || y[i] > 255) abort();
        (void)pw_dataset_unigram_entropy(d);
        free(x);
        free(y);
    }
    pw_dataset_destroy(d);
    fuzz_file_close(&f);
    return 0;
}
