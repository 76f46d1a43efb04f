/* pipewright — safetensors checkpoint files (read and write).
 *
 * The format is Hugging Face's safetensors, byte-compatible with the Python
 * `safetensors` package and PyTorch:
 *
 *     u64 (little-endian) N | N bytes of JSON header, space-padded | data
 *
 *     {"__metadata__": {"step": "100"},
 *      "fc1.weight": {"dtype": "F32", "shape": [128, 784], "data_offsets": [0, 401408]},
 *      ...}
 *
 * Offsets are relative to the start of the data buffer; tensors are row-major
 * (PyTorch layouts: a linear weight is [out, in]) and tile the buffer exactly,
 * with no gaps, overlaps or trailing bytes.
 *
 * Writing a checkpoint:
 *
 *     pw_st_tensor t[2] = {
 *         {"fc1.weight", PW_F32, {2, {128, 784}}, w1, 128 * 784 * sizeof(float)},
 *         {"fc1.bias",   PW_F32, {1, {128}},      b1, 128 * sizeof(float)},
 *     };
 *     pw_st_meta m[1] = {{"step", "100"}};
 *     if (pw_safetensors_write("ckpt.safetensors", t, 2, m, 1) != PW_OK)
 *         fprintf(stderr, "%s\n", pw_last_error());
 *
 * Reading it back:
 *
 *     pw_safetensors *st = NULL;
 *     pw_st_tensor w;
 *     pw_status rc = pw_safetensors_open("ckpt.safetensors", &st);
 *     if (rc == PW_OK) rc = pw_safetensors_get(st, "fc1.weight", &w);
 *     if (rc == PW_OK) memcpy(my_w, w.data, w.nbytes);
 *     else fprintf(stderr, "%s\n", pw_last_error());
 *     pw_safetensors_close(st);   // w.data and w.name die here
 *
 * Supported dtypes: F32, I32, U8 (pw_dtype PW_F32, PW_I32, PW_U8).
 * Every failure leaves a message in pw_last_error() that starts with the file
 * path and says what is wrong ("ckpt.safetensors: tensor 'fc1.bias':
 * data_offsets [0, 12] hold 12 bytes but F32 [4] needs 16").
 *
 * Ownership and threads: pw_safetensors_write reads the caller's tensors and
 * writes atomically (a temp file renamed into place), sharing nothing between
 * calls. A reader owns the file's bytes: the data pointers, names and
 * metadata strings it hands out stay valid until pw_safetensors_close. A
 * reader is read-only after open, so several threads may read one at once;
 * close it once they are done.
 */
#ifndef PW_RUNTIME_SAFETENSORS_H
#define PW_RUNTIME_SAFETENSORS_H

#include <stddef.h>

#include "runtime/status.h"
#include "runtime/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest JSON header accepted on read (same limit as the reference
 * implementation); a larger length field means a corrupt or foreign file. */
#define PW_SAFETENSORS_MAX_HEADER 100000000u

/* One tensor. For writing, the caller owns every pointer; `data` holds
 * `nbytes` == numel(shape) × pw_dtype_size(dtype) bytes (may be NULL when
 * nbytes is 0). For reading, `name` and `data` point into the open file and
 * stay valid until pw_safetensors_close(); `data` is aligned for `dtype`. */
typedef struct pw_st_tensor {
    const char *name;
    pw_dtype dtype;
    pw_shape shape;      /* ndim 0 for a scalar */
    const void *data;
    size_t nbytes;
} pw_st_tensor;

/* One "__metadata__" entry: string key, string value (the format allows
 * nothing else). */
typedef struct pw_st_meta {
    const char *key;
    const char *value;
} pw_st_meta;

/* Writes `n` tensors and `n_meta` metadata entries to `path`, atomically:
 * the bytes go to "<path>.tmp.<pid>", are fsync'ed, and the temp file is
 * renamed over `path`. On any failure the temp file is removed and an existing
 * `path` is left untouched.
 *
 * The output is canonical: the same tensors and metadata, in any order, give
 * byte-identical files. Tensors are laid out by element size (largest first,
 * so every tensor is aligned for its dtype, as the reference writer does) and
 * then by name (byte-wise); header entries follow the data order, with
 * "__metadata__" first and its keys sorted. The header is padded with spaces
 * to a multiple of 8 bytes.
 *
 * Returns PW_OK, or
 *   PW_ERR_INVALID_ARG  a NULL/empty/duplicate/reserved ("__metadata__") name,
 *                       a name or metadata string that is not valid UTF-8,
 *                       a duplicate metadata key, a bad dtype or shape, or
 *                       nbytes != numel × dtype size;
 *   PW_ERR_IO           the temp file cannot be created, written, synced or
 *                       renamed (errno text in the message);
 *   PW_ERR_NOMEM        allocation failed. */
pw_status pw_safetensors_write(const char *path, const pw_st_tensor *t, int n,
                               const pw_st_meta *meta, int n_meta);

/* An open file: read fully into memory and validated. Opaque. */
typedef struct pw_safetensors pw_safetensors;

/* Reads and validates `path`; on success *out owns the contents.
 * Returns PW_OK, or
 *   PW_ERR_IO           open/read failed, or `path` is not a regular file;
 *   PW_ERR_FORMAT       anything malformed: shorter than 8 bytes, header
 *                       length beyond the file or above
 *                       PW_SAFETENSORS_MAX_HEADER, invalid JSON (jansson's
 *                       text, line, column and byte position), a header that
 *                       is not an object, an entry that is not an object, a
 *                       missing/invalid dtype, shape or data_offsets, a
 *                       negative dimension, more than PW_MAX_DIMS dimensions,
 *                       offsets out of range, overlapping, leaving gaps or
 *                       trailing bytes, a byte count that differs from
 *                       numel × dtype size, a non-string metadata value;
 *   PW_ERR_UNSUPPORTED  a valid safetensors dtype that pipewright does not
 *                       handle (F16, BF16, F64, I64, ...); the message names
 *                       the tensor and the dtype;
 *   PW_ERR_NOMEM        allocation failed.
 * On failure *out is NULL. Never crashes on any input. */
pw_status pw_safetensors_open(const char *path, pw_safetensors **out);

/* Number of tensors. */
int pw_safetensors_count(const pw_safetensors *st);

/* Looks a tensor up by exact name. PW_ERR_FORMAT
 * ("ckpt.safetensors: no tensor 'fc1.weight'") when absent. */
pw_status pw_safetensors_get(const pw_safetensors *st, const char *name,
                             pw_st_tensor *out);

/* Like pw_safetensors_get, and also checks the dtype and, when `shape` is not
 * NULL, the shape: PW_ERR_SHAPE ("ckpt.safetensors: tensor 'fc1.weight' is
 * F32 [10, 784], expected F32 [20, 784]") on a mismatch. The call a
 * checkpoint loader wants. */
pw_status pw_safetensors_get_as(const pw_safetensors *st, const char *name,
                                pw_dtype dtype, const pw_shape *shape,
                                pw_st_tensor *out);

/* The i-th tensor, 0 <= i < count, in name order (byte-wise).
 * PW_ERR_INVALID_ARG when i is out of range. */
pw_status pw_safetensors_at(const pw_safetensors *st, int i, pw_st_tensor *out);

/* Value of a "__metadata__" key, or NULL if absent. Valid until close. */
const char *pw_safetensors_meta(const pw_safetensors *st, const char *key);

/* Metadata entries, in key order; PW_ERR_INVALID_ARG when i is out of range. */
int pw_safetensors_meta_count(const pw_safetensors *st);
pw_status pw_safetensors_meta_at(const pw_safetensors *st, int i, pw_st_meta *out);

/* Path the file was opened from. */
const char *pw_safetensors_path(const pw_safetensors *st);

/* Frees everything the handle owns; accepts NULL. */
void pw_safetensors_close(pw_safetensors *st);

/* "F32", "I32", "U8". */
const char *pw_safetensors_dtype_name(pw_dtype t);

#ifdef __cplusplus
}
#endif
#endif
