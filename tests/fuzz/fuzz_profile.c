/* libFuzzer harness: the op-time profile reader (stages/plan/profile.c,
 * pw_profile_load), the JSON file `pipeline-run --profile` reads and writes.
 * A profile that loads is saved again and reloaded: the round trip must
 * succeed. Seeds: tests/fuzz/corpus/profile/. */
#include "stages/plan/profile.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char back[64];
    if (!back[0]) {
        fuzz_quiet();
        snprintf(back, sizeof back, "/tmp/pw-fuzz-profile.%d.json", (int)getpid());
    }
    fuzz_file f = fuzz_file_open(data, size, "profile.json");
    pw_profile *p = NULL, *q = NULL;
    if (pw_profile_load(f.path, &p) == PW_OK) {
        if (pw_profile_save(p, back) != PW_OK || pw_profile_load(back, &q) != PW_OK) abort();
        if (q->n_nodes != p->n_nodes) abort();
        unlink(back);
    }
    pw_profile_destroy(p);
    pw_profile_destroy(q);
    fuzz_file_close(&f);
    return 0;
}
