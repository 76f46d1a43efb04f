/* pipewright tests — what a Criterion test program needs to run under
 * ThreadSanitizer (docs/engine.md, "Sanitizers"). Include it once, from the
 * test file, in programs whose threads TSan must check (test_engine,
 * test_replicas, test_collectives, test_backend); it defines functions, so
 * it is for one translation unit per program. Nothing in a build without
 * TSan.
 */
#ifndef PW_TESTS_TSAN_CRITERION_H
#define PW_TESTS_TSAN_CRITERION_H

#if defined(__SANITIZE_THREAD__)
#define PW_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PW_TEST_TSAN 1
#endif
#endif

#ifdef PW_TEST_TSAN
/* A race must fail the test: stop at the first report (Criterion would
 * otherwise count the test as passed after TSan printed its warning). */
const char *__tsan_default_options(void);
const char *__tsan_default_options(void) { return "halt_on_error=1"; }

/* Criterion 2.4 cannot start under TSan (Criterion issue #274: "Could not
 * initialize inheritable arena"): its arena is mapped at a random base
 * 0x200000000000 + rand_r() * 16 MiB, and TSan reserves almost all of that
 * range for shadow memory, so all ten tries land on reserved pages. This
 * definition, which the executable exports in place of libc's for
 * libcriterion, steers the tries into TSan's application range
 * 0x550000000000-0x568000000000 (above PIE binaries' usual base). A test
 * program that includes this header must not call rand_r itself. */
int rand_r(unsigned *seed);
int rand_r(unsigned *seed)
{
    *seed = *seed * 1103515245u + 12345u;
    return 0x358000 + (int)((*seed >> 8) % 0x8000);
}
#endif

#endif
