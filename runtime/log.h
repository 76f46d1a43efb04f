/* pipewright — logging with levels, subsystems and a callback.
 *
 * Warnings always print. INFO and TRACE messages print when the environment
 * asks for them, read once and cached:
 *
 *     PW_DEBUG=WARN|INFO|TRACE           (default WARN)
 *     PW_DEBUG_SUBSYS=GRAPH,SCHED,COMM   (default ALL; "^COMM" excludes)
 *
 *     PW_INFO(PW_SUB_GRAPH, "parsed %d nodes", g->n_nodes);
 *     PW_WARN("binding refused: %s", why);
 *
 * pw_log_set() redirects every message to a callback (tests use this to
 * capture warnings); by default messages go to stderr as
 * "pipewright WARN [SCHED] ...".
 *
 * Ownership and threads: logging may be called from any thread. The level
 * and subsystems are read from the environment once (the first call) and
 * cached. The sink is called under the library's lock, so calls to it never
 * overlap; it must not log itself. Its `user` pointer is borrowed: it must
 * stay valid until the sink is replaced.
 */
#ifndef PW_RUNTIME_LOG_H
#define PW_RUNTIME_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_log_level {
    PW_LOG_NONE = 0,
    PW_LOG_WARN = 1,
    PW_LOG_INFO = 2,
    PW_LOG_TRACE = 3,
} pw_log_level;

typedef enum pw_subsys {
    PW_SUB_INIT = 1u << 0,
    PW_SUB_GRAPH = 1u << 1,
    PW_SUB_STAGE = 1u << 2,
    PW_SUB_SCHED = 1u << 3,
    PW_SUB_COMM = 1u << 4,
    PW_SUB_MEM = 1u << 5,
    PW_SUB_DATA = 1u << 6,
    PW_SUB_TRAIN = 1u << 7,
    PW_SUB_TOPO = 1u << 8,
    PW_SUB_TRACE = 1u << 9,
    PW_SUB_ALL = 0xffffffffu,
} pw_subsys;

typedef void (*pw_log_fn)(pw_log_level level, unsigned subsys, const char *msg,
                          void *user);

/* Install a sink for all messages (NULL restores stderr). Thread-safe. */
void pw_log_set(pw_log_fn fn, void *user);

/* Whether a message of this level and subsystem would be emitted. */
int pw_log_enabled(pw_log_level level, unsigned subsys);

/* Re-read PW_DEBUG / PW_DEBUG_SUBSYS (tests; normally read once). */
void pw_log_reload_env(void);

void pw_log(pw_log_level level, unsigned subsys, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define PW_WARN(...) pw_log(PW_LOG_WARN, PW_SUB_ALL, __VA_ARGS__)
#define PW_INFO(sub, ...)                                                     \
    do {                                                                      \
        if (pw_log_enabled(PW_LOG_INFO, (sub))) pw_log(PW_LOG_INFO, (sub), __VA_ARGS__); \
    } while (0)
#define PW_TRACE(sub, ...)                                                    \
    do {                                                                      \
        if (pw_log_enabled(PW_LOG_TRACE, (sub))) pw_log(PW_LOG_TRACE, (sub), __VA_ARGS__); \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
