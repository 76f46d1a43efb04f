/* pipewright — dtype and shape helpers. */
#include "runtime/tensor.h"

#include <stdio.h>
#include <string.h>

const char *pw_dtype_name(pw_dtype t)
{
    switch (t) {
    case PW_F32: return "f32";
    case PW_I32: return "i32";
    case PW_U8: return "u8";
    default: return "?";
    }
}

size_t pw_dtype_size(pw_dtype t)
{
    switch (t) {
    case PW_F32: return 4;
    case PW_I32: return 4;
    case PW_U8: return 1;
    default: return 0;
    }
}

int pw_shape_numel_checked(const pw_shape *s, int64_t *out)
{
    int64_t n = 1;
    if (s->ndim < 0 || s->ndim > PW_MAX_DIMS) return 0;
    for (int i = 0; i < s->ndim; i++)
        if (s->d[i] < 0 || __builtin_mul_overflow(n, s->d[i], &n)) return 0;
    *out = n;
    return 1;
}

int64_t pw_shape_numel(const pw_shape *s)
{
    int64_t n;
    return pw_shape_numel_checked(s, &n) ? n : -1;
}

int pw_shape_equal(const pw_shape *a, const pw_shape *b)
{
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->d[i] != b->d[i]) return 0;
    return 1;
}

char *pw_shape_str(const pw_shape *s, char *buf, size_t n)
{
    size_t off = 0;
    if (n == 0) return buf;
    buf[0] = '\0';
    off += (size_t)snprintf(buf + off, n - off, "[");
    for (int i = 0; i < s->ndim && off < n; i++)
        off += (size_t)snprintf(buf + off, n - off, "%s%lld", i ? ", " : "", (long long)s->d[i]);
    if (off < n) snprintf(buf + off, n - off, "]");
    return buf;
}

pw_shape pw_shape_make(int ndim, const int64_t *d)
{
    pw_shape s;
    memset(&s, 0, sizeof s);
    s.ndim = ndim;
    for (int i = 0; i < ndim && i < PW_MAX_DIMS; i++) s.d[i] = d[i];
    return s;
}
