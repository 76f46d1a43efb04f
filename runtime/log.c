/* pipewright — logging: levels and subsystems from the environment, cached. */
#include "runtime/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t sink_lock = PTHREAD_MUTEX_INITIALIZER;
static int cur_level = PW_LOG_WARN;
static unsigned cur_mask = PW_SUB_ALL;
static pw_log_fn sink_fn;
static void *sink_user;

static const struct { const char *name; unsigned bit; } subsys_names[] = {
    {"INIT", PW_SUB_INIT},   {"GRAPH", PW_SUB_GRAPH}, {"STAGE", PW_SUB_STAGE},
    {"SCHED", PW_SUB_SCHED}, {"COMM", PW_SUB_COMM},   {"MEM", PW_SUB_MEM},
    {"DATA", PW_SUB_DATA},   {"TRAIN", PW_SUB_TRAIN}, {"TOPO", PW_SUB_TOPO},
    {"TRACE", PW_SUB_TRACE}, {"ALL", PW_SUB_ALL},
};

static unsigned subsys_bit(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof subsys_names / sizeof subsys_names[0]; i++)
        if (strlen(subsys_names[i].name) == len &&
            strncasecmp(subsys_names[i].name, name, len) == 0)
            return subsys_names[i].bit;
    return 0;
}

static void read_env(void)
{
    const char *lv = getenv("PW_DEBUG");
    cur_level = PW_LOG_WARN;
    if (lv) {
        if (!strcasecmp(lv, "NONE")) cur_level = PW_LOG_NONE;
        else if (!strcasecmp(lv, "INFO")) cur_level = PW_LOG_INFO;
        else if (!strcasecmp(lv, "TRACE")) cur_level = PW_LOG_TRACE;
        else if (!strcasecmp(lv, "WARN")) cur_level = PW_LOG_WARN;
        else fprintf(stderr, "pipewright WARN: PW_DEBUG='%s' not understood "
                     "(want NONE, WARN, INFO or TRACE); using WARN\n", lv);
    }
    /* "GRAPH,SCHED" selects; a leading '^' ("^COMM") selects all but those. */
    const char *ss = getenv("PW_DEBUG_SUBSYS");
    cur_mask = PW_SUB_ALL;
    if (ss && *ss) {
        int invert = ss[0] == '^';
        unsigned mask = 0;
        const char *p = ss + invert;
        while (*p) {
            size_t n = strcspn(p, ",");
            unsigned bit = subsys_bit(p, n);
            if (!bit && n)
                fprintf(stderr, "pipewright WARN: PW_DEBUG_SUBSYS: unknown subsystem '%.*s'\n",
                        (int)n, p);
            mask |= bit;
            p += n;
            if (*p == ',') p++;
        }
        cur_mask = invert ? ~mask : mask;
    }
}

void pw_log_reload_env(void)
{
    pthread_once(&env_once, read_env);
    read_env();
}

int pw_log_enabled(pw_log_level level, unsigned subsys)
{
    pthread_once(&env_once, read_env);
    if (level == PW_LOG_WARN) return cur_level >= PW_LOG_WARN;
    return cur_level >= (int)level && (cur_mask & subsys) != 0;
}

void pw_log_set(pw_log_fn fn, void *user)
{
    pthread_mutex_lock(&sink_lock);
    sink_fn = fn;
    sink_user = user;
    pthread_mutex_unlock(&sink_lock);
}

static const char *subsys_label(unsigned subsys)
{
    if (subsys == PW_SUB_ALL) return "";
    for (size_t i = 0; i < sizeof subsys_names / sizeof subsys_names[0]; i++)
        if (subsys_names[i].bit == subsys) return subsys_names[i].name;
    return "";
}

void pw_log(pw_log_level level, unsigned subsys, const char *fmt, ...)
{
    if (!pw_log_enabled(level, subsys)) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&sink_lock);
    if (sink_fn) {
        sink_fn(level, subsys, msg, sink_user);
    } else {
        static const char *const lvl[] = {"", "WARN", "INFO", "TRACE"};
        const char *sub = subsys_label(subsys);
        fprintf(stderr, "pipewright %s%s%s%s %s\n", lvl[level], *sub ? " [" : "", sub,
                *sub ? "]" : "", msg);
    }
    pthread_mutex_unlock(&sink_lock);
}
