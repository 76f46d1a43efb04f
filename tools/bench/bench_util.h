/* pipewright — the small helpers every benchmark under tools/bench/ uses:
 * "--name value" flags and medians. Header-only (each bench is one program).
 */
#ifndef PW_TOOLS_BENCH_UTIL_H
#define PW_TOOLS_BENCH_UTIL_H

#include <stdlib.h>
#include <string.h>

/* The value after `name` on the command line as an integer, else def. */
static inline long arg_int(int argc, char **argv, const char *name, long def)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return strtol(argv[i + 1], NULL, 10);
    return def;
}

/* The value after `name` on the command line, else def. */
static inline const char *arg_str(int argc, char **argv, const char *name, const char *def)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    return def;
}

/* qsort comparator for doubles, ascending. */
static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts v and returns its median (the mean of the middle two for even n). */
static inline double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif
