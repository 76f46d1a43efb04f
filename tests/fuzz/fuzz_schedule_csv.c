/* libFuzzer harness: the schedule CSV reader (scheduler/schedule_csv.c) and
 * what runs on its output: the validator's replay, the printer and the CSV
 * writer. Every input must give PW_OK or an error, within the memory the
 * input's actions justify. Seeds: tests/fuzz/corpus/schedule_csv/. */
#include "scheduler/schedule.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *null;
    if (!null) {
        fuzz_quiet();
        null = fopen("/dev/null", "w");
    }
    pw_schedule *s = NULL;
    if (pw_schedule_parse_csv((const char *)data, size, "fuzz.csv", &s) != PW_OK) return 0;
    pw_schedule_report *rep = NULL;
    if (pw_schedule_validate(s, &rep) == PW_OK) {
        pw_schedule_print(s, null);
        pw_schedule_write_csv(s, null);
    }
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    return 0;
}
