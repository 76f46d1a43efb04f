/* pipewright — element types and shapes shared by every module.
 *
 * Shapes in a graph are per sample: an input written `f32[1, 28, 28]` has
 * ndim 3; the batch dimension is added at run time. Row-major throughout.
 *
 * Ownership and threads: pure functions of their arguments (no state),
 * callable from any thread; pw_shape_str writes into the caller's buffer and
 * returns it; pw_dtype_name's strings are static.
 */
#ifndef PW_RUNTIME_TENSOR_H
#define PW_RUNTIME_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PW_MAX_DIMS 6

typedef enum pw_dtype {
    PW_F32 = 0,
    PW_I32,
    PW_U8,
    PW_DTYPE_COUNT
} pw_dtype;

typedef struct pw_shape {
    int ndim;                  /* 0 for a scalar */
    int64_t d[PW_MAX_DIMS];
} pw_shape;

/* "f32", "i32", "u8"; the safetensors names are "F32", "I32", "U8". */
const char *pw_dtype_name(pw_dtype t);
size_t pw_dtype_size(pw_dtype t);

/* Product of the dimensions (1 for a scalar); -1 when a dimension is
 * negative, ndim is outside 0..PW_MAX_DIMS or the product overflows int64_t
 * (never undefined behaviour). Shapes from a parsed graph are checked when
 * read, so -1 only reaches code that builds shapes from raw input: readers
 * of user files call pw_shape_numel_checked and say what is wrong. */
int64_t pw_shape_numel(const pw_shape *s);
/* 1 with *out set to the product, or 0 (*out untouched) in the cases above. */
int pw_shape_numel_checked(const pw_shape *s, int64_t *out);
int pw_shape_equal(const pw_shape *a, const pw_shape *b);
/* Writes "[2, 3, 4]" (or "[]") into buf; returns buf. */
char *pw_shape_str(const pw_shape *s, char *buf, size_t n);
pw_shape pw_shape_make(int ndim, const int64_t *d);

#ifdef __cplusplus
}
#endif
#endif
