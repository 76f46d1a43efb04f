/* libFuzzer harness: the safetensors reader (runtime/safetensors.c). Opens
 * the input as a file and, when it validates, reads every tensor back (by
 * index, by name, and checked against its own dtype and shape) and every metadata entry, touching each byte
 * the reader promises is there. Seeds: tests/fuzz/corpus/safetensors/. */
#include "runtime/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

static volatile unsigned char sink;

static void touch(const void *p, size_t n)
{
    const unsigned char *b = p;
    unsigned char x = 0;
    for (size_t i = 0; i < n; i++) x ^= b[i];
    sink = x;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;
    if (!once++) fuzz_quiet();
    fuzz_file f = fuzz_file_open(data, size, "fuzz.safetensors");
    pw_safetensors *st = NULL;
    if (pw_safetensors_open(f.path, &st) == PW_OK) {
        for (int i = 0; i < pw_safetensors_count(st); i++) {
            pw_st_tensor t, t32;
            if (pw_safetensors_at(st, i, &t) != PW_OK) continue;
            touch(t.data, t.nbytes);
            touch(t.name, strlen(t.name));
            if (pw_safetensors_get(st, t.name, &t32) != PW_OK) abort(); /* listed, so found */
            if (pw_safetensors_get_as(st, t.name, t.dtype, &t.shape, &t32) != PW_OK) abort();
            touch(t32.data, t32.nbytes);
        }
        for (int i = 0; i < pw_safetensors_meta_count(st); i++) {
            pw_st_meta m;
            if (pw_safetensors_meta_at(st, i, &m) != PW_OK) continue;
            touch(m.value, strlen(m.value));
            if (!pw_safetensors_meta(st, m.key)) abort();
        }
    }
    pw_safetensors_close(st);
    fuzz_file_close(&f);
    return 0;
}
