/* pipewright — data sets: IDX files (MNIST / Fashion-MNIST), a synthetic
 * learnable task, byte-level text, llm.c token shards, and a deterministic
 * sampler.
 *
 *     pw_dataset *train = NULL;
 *     if (pw_dataset_from_spec("fashion-mnist", 1, &train) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());
 *         return 1;
 *     }
 *     // train->n == 60000, sample_shape [28, 28], n_classes 10
 *
 *     pw_sampler s;
 *     pw_sampler_init(&s, train->n, 1, seed);          // shuffled
 *     for (int epoch = 0; epoch < epochs; epoch++) {
 *         pw_sampler_epoch(&s, epoch);
 *         for (int64_t b = 0; b < pw_sampler_batches(&s, batch); b++)
 *             pw_dataset_gather(train, pw_sampler_batch(&s, b, batch), batch, x, y);
 *     }
 *     pw_sampler_free(&s);
 *     pw_dataset_destroy(train);
 *
 * Dense data sets (IDX, synthetic) store samples as f32 rows,
 * (n, numel(sample_shape)), row-major, and one i32 class index in
 * [0, n_classes) per sample. Token data sets (text:, tokens:) are views of a
 * token stream (bytes, or llm.c shards' ids): sample i is a window of T + 1
 * tokens, its input the first T (i32 tokens [T]) and its labels the last T
 * (the next token at every position, [T]). pw_dataset_gather serves both.
 *
 * Parts. A process of a multi-process run loads only the side its stages
 * read (pw_pipeline_data_parts): the first stage the inputs, the last the
 * labels, a middle stage neither (only the sample count, which the sampler
 * needs). pw_dataset_from_spec_parts asks for the sides; the others are
 * `missing` and gather refuses them.
 *
 * Ownership and threads: every loader returns a new data set owned by the
 * caller (pw_dataset_destroy frees it and its arrays); a data set built by
 * hand is the caller's to free. A data set is read-only once loaded, so any
 * number of threads may read and gather from one at once (the engine's
 * workers do). A pw_sampler is the caller's struct (pw_sampler_free), used
 * by one thread.
 */
#ifndef PW_STAGES_DATA_H
#define PW_STAGES_DATA_H

#include <stdint.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest class count a label file may imply (a label above this is taken as
 * corruption, not as a 2-billion-way classifier). */
#define PW_DATA_MAX_CLASSES 65536

/* The sides of a data set (bit flags). */
enum {
    PW_DATA_INPUTS = 1u << 0,   /* the samples: x, or the windows' first T tokens */
    PW_DATA_LABELS = 1u << 1,   /* the targets: y, or the windows' last T tokens */
    PW_DATA_ALL = PW_DATA_INPUTS | PW_DATA_LABELS,
};

typedef struct pw_dataset {
    int64_t n;              /* samples */
    pw_shape sample_shape;  /* per sample, e.g. [28, 28]; [T] for text */
    int64_t sample_numel;   /* numel(sample_shape) */
    pw_dtype x_dtype;       /* PW_F32 (dense, the zero value) or PW_I32 (tokens) */
    float *x;               /* dense: (n, sample_numel); NULL for tokens */
    int32_t *y;             /* dense: (n, label_numel) in [0, n_classes); NULL for tokens */
    pw_shape label_shape;   /* per sample: [] (one class) or [T] (one per position) */
    int64_t label_numel;    /* numel(label_shape); 0 reads as 1 (a zeroed struct) */
    int n_classes;          /* max label + 1 (for IDX), or the configured count */
    int n_tokens;           /* tokens: ids are in [0, n_tokens) (256 for bytes); else 0 */
    char *name;             /* "fashion-mnist/train", "synthetic/test", images path */
    /* Token streams: sample i is text[i·stride .. i·stride + T] (T + 1 bytes,
     * T = sample_numel). */
    unsigned char *text;
    int64_t text_len, stride;
    /* Sides not loaded in this process (PW_DATA_* bits; 0, as in a zeroed
     * struct: everything). A missing side's array is NULL and what only it
     * tells is unknown: inputs missing, sample_shape may be [] and
     * sample_numel 0 (IDX); labels missing, n_classes may be 0 (IDX). */
    unsigned missing;
    int64_t loaded_bytes;   /* bytes of samples and labels read or generated */
    /* Token shards (tokens:): the stream is `tokens`, text_len ids of
     * token_width bytes (2 or 4, host order), cut into windows as `text` is;
     * NULL when the process loaded no side (missing == PW_DATA_ALL). `text`
     * stays NULL. `shards` says which file each token came from (errors). */
    void *tokens;
    int token_width;
    struct pw_token_shards *shards;
} pw_dataset;

/* Frees a data set and its arrays; accepts NULL. */
void pw_dataset_destroy(pw_dataset *d);

/* ---------------------------------------------------------------- IDX files
 *
 * IDX is the MNIST format: magic bytes 00 00 TYPE NDIMS, NDIMS big-endian u32
 * dimensions, then the elements in big-endian row-major order. Files ending
 * in anything may be gzip-compressed; they are decompressed transparently.
 *
 * Loads an images file (TYPE 0x08 u8, scaled by 1/255 to [0, 1]; or 0x0D f32,
 * kept as is; NDIMS >= 1, the first dimension the sample count) and a labels
 * file (TYPE 0x08 u8 or 0x0C i32, NDIMS 1) into one data set.
 * n_classes = max label + 1 (a test split may therefore report fewer classes
 * than its training split if a class is absent; use the training split's).
 * Returns PW_OK, or
 *   PW_ERR_IO           a file cannot be opened or read (errno text);
 *   PW_ERR_FORMAT       bad magic, bad NDIMS, truncated data ("truncated:
 *                       expected 7840000 bytes of data, got 12345"), trailing
 *                       bytes, corrupt gzip, sample counts that disagree
 *                       ("labels.gz: 9999 labels but images file has 10000
 *                       images"), a label out of range; every message starts
 *                       with the offending file;
 *   PW_ERR_UNSUPPORTED  a valid IDX type not accepted here (i8, i16, f64, or
 *                       f32 labels) or more than PW_MAX_DIMS sample dims;
 *   PW_ERR_NOMEM        allocation failed.
 * On failure *out is NULL. */
pw_status pw_dataset_load_idx(const char *images, const char *labels, pw_dataset **out);
/* The same, loading only `parts` (PW_DATA_* bits): without PW_DATA_INPUTS the
 * images file is not opened (the count comes from the labels file); without
 * PW_DATA_LABELS the labels file is not opened, except that with neither its
 * header alone is read for the count. The sample counts are checked against
 * each other only when both files are read. */
pw_status pw_dataset_load_idx_parts(const char *images, const char *labels, unsigned parts,
                                    pw_dataset **out);

/* Writes an IDX file: dtype PW_U8 (0x08), PW_F32 (0x0D) or PW_I32 (0x0C);
 * `shape` is the full shape including the count, ndim 1..PW_MAX_DIMS, every
 * dimension < 2^32; `data` holds numel(shape) elements in host order.
 * gzip-compressed when `path` ends in ".gz" (bytes are reproducible: no time
 * stamp). Atomic like pw_safetensors_write: "<path>.tmp.<pid>", fsync,
 * rename; an existing file survives any failure.
 * Returns PW_OK, PW_ERR_INVALID_ARG (bad dtype or shape), PW_ERR_IO,
 * PW_ERR_NOMEM. */
pw_status pw_idx_write(const char *path, pw_dtype dtype, const pw_shape *shape,
                       const void *data);

/* ---------------------------------------------------------------- synthetic
 *
 * A learnable classification task: class c has a prototype vector p_c with
 * N(0, 1) elements drawn from pw_rng_key(seed, "synthetic/proto"); sample i
 * has a label drawn uniformly from the split's label stream and
 * x_i = p_{y_i} + noise · N(0, 1). Train and test splits share prototypes and
 * draw labels and noise from different streams ("synthetic/train/label",
 * "synthetic/test/noise", ...). Pure function of the config. */
typedef struct pw_synthetic_config {
    int64_t n;              /* samples, > 0 */
    pw_shape sample_shape;  /* per sample, ndim >= 1 */
    int n_classes;          /* 2..PW_DATA_MAX_CLASSES */
    uint64_t seed;
    float noise;            /* >= 0; 1.0 is easy, 4.0 is hard for 784 dims */
    int test;               /* 0: training split, 1: test split */
    unsigned missing;       /* PW_DATA_* sides not to generate (0: both); the sides
                               generated hold the same values either way */
} pw_synthetic_config;

/* PW_OK, PW_ERR_INVALID_ARG (a field out of range, named in the message),
 * PW_ERR_NOMEM. */
pw_status pw_dataset_synthetic(const pw_synthetic_config *cfg, pw_dataset **out);

/* ---------------------------------------------------------------- text
 *
 * Byte-level language modelling over a file, or over every regular file of a
 * directory (not symbolic links) concatenated in byte order of their names.
 * Vocabulary 256 (tokens and labels are bytes). The held-out split is the
 * last 10% of the bytes (len / 10, rounded down), the training split the
 * rest. Each split is cut into contiguous windows of context + 1 bytes that
 * share their boundary byte: window i covers bytes [i·T, i·T + T], its
 * input is bytes [i·T, i·T + T) and its targets bytes [i·T + 1, i·T + T]; an
 * epoch therefore predicts every byte of the split (but the first) once.
 * n = (split length − 1) / T windows; a trailing partial window is dropped.
 * Returns PW_ERR_IO (missing file or directory, naming it), PW_ERR_INVALID_ARG
 * (context < 1, or a split too short for one window: "needs at least T + 1
 * bytes"), PW_ERR_NOMEM. */
pw_status pw_dataset_load_text(const char *path, int64_t context, int train, pw_dataset **out);

/* The default corpus: the files of the Debian package `fortunes` in
 * /usr/share/games/fortunes (their strfile indexes, *.dat, and symbolic
 * links skipped), ~2.3 MB of English text. */
#define PW_FORTUNES_DIR "/usr/share/games/fortunes"

/* ---------------------------------------------------------------- token shards
 *
 * Pre-tokenized corpora in llm.c's binary shard format
 * (dev/data/data_common.py, write_datafile), as its fineweb.py,
 * tinyshakespeare.py, ... write them:
 *
 *     bytes 0 .. 1023   header: 256 little-endian int32
 *                       [0] magic, [1] version, [2] token count N, the rest 0
 *     bytes 1024 ..     N tokens, little-endian
 *
 *     magic 20240520, version 1: GPT-2 tokens, uint16 (vocabulary 50257)
 *     magic 20240801, version 7: llama-3 tokens, uint32 (vocabulary 128256)
 *
 * and the file is exactly 1024 + N · width bytes. A pattern is one file or a
 * glob(7) pattern; the files it matches are read in byte order of their
 * names and concatenated into one stream (a window may span two shards;
 * llm.c starts every document with <|endoftext|>, so a shard boundary is a
 * document boundary). All shards of a data set have one format.
 *
 * Splits. With `heldout` set, its shards are the held-out split and
 * `train`'s the training split, whole (llm.c's *_train_* / *_val_* shards).
 * Without it the held-out split is the last floor(N / 10) tokens of the
 * stream and the training split the rest, as for text; a lone pattern that
 * matches both llm.c training and validation shards (names containing
 * "_train_" / "_val_", or ending "_train.bin" / "_val.bin") is refused, so
 * validation tokens are never trained on by accident. Windows as for text:
 * T + 1 tokens sharing their boundary token, n = (split length − 1) / T.
 *
 * Only what the split needs is read (pread at the offsets the header and the
 * file size give; nothing is allocated before both agree). n_tokens is the
 * largest input id of the windows + 1, n_classes the largest target id + 1;
 * an id >= 2^31 − 1 is refused here, an id outside a graph's vocabulary by pw_dataset_check_graph
 * (naming the file and position). With missing = PW_DATA_ALL (a middle
 * pipeline stage under mpirun) only the headers are read: n is known, no
 * token is.
 *
 * Returns PW_OK, or
 *   PW_ERR_IO           a file cannot be opened or read, a directory or
 *                       another file that is not regular, a glob that matches
 *                       nothing ("tokens 'data/x_*.bin': no file
 *                       matches");
 *   PW_ERR_FORMAT       "FILE: what: where": a header shorter than 1024
 *                       bytes, bad magic, a version that does not go with the
 *                       magic, a negative count, a count that does not match
 *                       the file size, shards of two formats, an id too large,
 *                       a file that changed size while being read;
 *   PW_ERR_INVALID_ARG  context < 1, a split shorter than T + 1 tokens, llm.c
 *                       training and validation shards in one pattern;
 *   PW_ERR_NOMEM        allocation failed.
 * On failure *out is NULL. The data set owns its ids and shard table
 * (pw_dataset_destroy); it is read-only after loading, so stages may gather
 * from it on several threads. */
#define PW_TOKENS_HEADER_BYTES 1024
#define PW_TOKENS_MAGIC_GPT2 20240520   /* version 1, uint16 ids */
#define PW_TOKENS_MAGIC_LLAMA3 20240801 /* version 7, uint32 ids */

typedef struct pw_tokens_config {
    const char *train;      /* file or glob: the training stream (all of it when
                               `heldout` is set, else its first 90%) */
    const char *heldout;    /* (optional) file or glob: the held-out split */
    int64_t context;        /* T >= 1: window length (the graph's input i32 [T]) */
    int test;               /* 0: training split, 1: held-out split */
    unsigned missing;       /* PW_DATA_* sides not wanted (0: both). Inputs and
                               labels are one stream, read whole unless both
                               are missing */
} pw_tokens_config;

pw_status pw_dataset_load_tokens(const pw_tokens_config *cfg, pw_dataset **out);

/* Entropy in nats of the split's label distribution: for text and tokens,
 * of the target tokens of its windows. It is the loss of the best model that
 * ignores its input (the unigram baseline a language model must beat). */
double pw_dataset_unigram_entropy(const pw_dataset *d);

/* Checks that a data set fits a graph: the input's dtype and size (f32 for
 * dense data, i32 [T] for tokens), the label's size (one class, or one per
 * position), the loss's class count against the labels, and every embedding
 * that reads the input against the token range; a missing side's checks are
 * left to the process that loads it. PW_ERR_SHAPE with a message naming the
 * graph file, the value and the data set; for token shards it also names the
 * first id out of range, its shard and its position there ("fw_000001.bin:
 * token 50300 at position 1234 (byte 3492) is outside ..."). */
pw_status pw_dataset_check_graph(const pw_graph *g, const pw_dataset *d);

/* ---------------------------------------------------------------- specs
 *
 * The CLI's --data strings. `train` picks the split (1 train, 0 test).
 *
 *   "fashion-mnist" (also "" or NULL)
 *       /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz,
 *       from the Debian package dataset-fashion-mnist.
 *   "fashion-mnist:DIR"
 *       the same four file names in DIR (.gz or uncompressed).
 *   "idx:TRAIN_IMAGES,TRAIN_LABELS[,TEST_IMAGES,TEST_LABELS]"
 *       any IDX pair(s); the test split needs the second pair.
 *   "synthetic[:N[:DIM[:CLASSES[:SEED]]]]"
 *       pw_dataset_synthetic with N training samples (default 8192; the test
 *       split has max(N / 4, 1)), DIM a size or a shape "1x28x28" (default
 *       784), CLASSES (default 10), SEED (default 1234), noise 1.0.
 *   "text:FILE", "text:DIR", "text:fortunes"
 *       pw_dataset_load_text; "fortunes" is the default corpus
 *       (PW_FORTUNES_DIR; "... install the Debian package fortunes" when
 *       missing). The window length comes from the graph, so these need
 *       pw_dataset_from_spec_for_graph (pw_dataset_from_spec refuses them).
 *   "tokens:TRAIN[,HELDOUT]"
 *       pw_dataset_load_tokens; TRAIN and HELDOUT are each a file or a glob
 *       ("tokens:fw/fineweb_train_*.bin,fw/fineweb_val_*.bin"). The window
 *       length comes from the graph, as for text.
 *
 * Returns PW_OK, PW_ERR_INVALID_ARG for a malformed spec or an "idx:" spec
 * without a test pair when train == 0, PW_ERR_IO when the Fashion-MNIST files
 * are missing ("... install the Debian package dataset-fashion-mnist"), or any
 * error of the loaders above. */
pw_status pw_dataset_from_spec(const char *spec, int train, pw_dataset **out);
/* The same for the graph the data will feed: text specs take their context T
 * from the graph's input, which must be i32 [T] (PW_ERR_SHAPE otherwise);
 * other specs ignore g. */
pw_status pw_dataset_from_spec_for_graph(const char *spec, int train, const pw_graph *g,
                                         pw_dataset **out);

/* The same, loading only `parts` (PW_DATA_* bits) where the format allows:
 * IDX files (fashion-mnist, idx:) open only the file of each side asked for
 * (pw_dataset_load_idx_parts), synthetic data generates only those sides
 * (the same values as a full load), text data is loaded whole (inputs and
 * labels are the same bytes, shifted by one), token shards whole unless no
 * side is asked for (then their headers alone give the count). `g` as for
 * pw_dataset_from_spec_for_graph (may be NULL but for text specs). The
 * sides not loaded are in (*out)->missing. */
pw_status pw_dataset_from_spec_parts(const char *spec, int train, const pw_graph *g, unsigned parts,
                                     pw_dataset **out);

/* Whether the spec names a test split (all but a two-file "idx:" spec). */
int pw_dataset_spec_has_test(const char *spec);

/* Copies samples idx[0..count) into x_out (count, sample_numel) of x_dtype
 * (float for dense data, int32_t tokens for text) and their labels into
 * y_out (count, label_numel); either may be NULL (a pipeline stage that
 * holds only the loss reads only labels). PW_ERR_INVALID_ARG (nothing
 * copied) when an index is outside [0, n), or when a side asked for is
 * missing (not loaded in this process). */
pw_status pw_dataset_gather(const pw_dataset *d, const int64_t *idx, int64_t count,
                            void *x_out, int32_t *y_out);

/* ---------------------------------------------------------------- sampler
 *
 * The order in which an epoch visits samples. Without shuffle it is 0..n-1
 * every epoch. With shuffle it is a Fisher–Yates permutation of 0..n-1 drawn
 * from the stream pw_rng_u64(pw_rng_key(seed, "shuffle"), epoch), computed
 * from the identity each time: epoch e's order depends only on (n, seed, e),
 * so every stage, replica and process that asks gets the same order, and a
 * resumed run can jump straight to its epoch.
 *
 * Batches are consecutive slices of the order; when the batch size does not
 * divide n, the last n % batch samples of the epoch are dropped (a different
 * set each shuffled epoch), so every step sees a full batch. */
typedef struct pw_sampler {
    int64_t n;
    int shuffle;
    uint64_t seed;
    int epoch;              /* the epoch `order` holds, -1 before the first */
    int64_t *order;         /* (n) */
} pw_sampler;

/* PW_OK, PW_ERR_INVALID_ARG (n <= 0), PW_ERR_NOMEM. */
pw_status pw_sampler_init(pw_sampler *s, int64_t n, int shuffle, uint64_t seed);
/* Fills s->order for `epoch` (>= 0). */
void pw_sampler_epoch(pw_sampler *s, int epoch);
/* Full batches per epoch: n / batch (0 when batch <= 0 or batch > n). */
int64_t pw_sampler_batches(const pw_sampler *s, int64_t batch);
/* The b-th batch of the current epoch: &order[b * batch] (batch indices);
 * NULL unless 0 <= b < pw_sampler_batches(s, batch). */
const int64_t *pw_sampler_batch(const pw_sampler *s, int64_t b, int64_t batch);
/* Frees the order; accepts a zeroed or already-freed sampler. */
void pw_sampler_free(pw_sampler *s);

#ifdef __cplusplus
}
#endif
#endif
