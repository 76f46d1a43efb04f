/* Tests for checkpoint files (runtime/safetensors) and data sets
 * (stages/data: IDX, synthetic, llm.c token shards, sampler). */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include "graph/graph.h"
#include "runtime/safetensors.h"
#include "runtime/status.h"
#include "runtime/tmpfile.h"
#include "stages/train/data.h"

/* ---------------------------------------------------------------- fixtures */

static char tmpdir[64];

static void make_tmpdir(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/pw_test_io.XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir), "mkdtemp: %s", strerror(errno));
}

static void remove_tree(const char *dir)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
}

static void drop_tmpdir(void) { remove_tree(tmpdir); }

/* One timeout for every suite: Criterion 2.4's runner leaks (and LSan fails
 * the run) when tests with different timeouts run in parallel. */
TestSuite(safetensors, .init = make_tmpdir, .fini = drop_tmpdir, .timeout = 60);
TestSuite(idx, .init = make_tmpdir, .fini = drop_tmpdir, .timeout = 60);
TestSuite(dataset, .init = make_tmpdir, .fini = drop_tmpdir, .timeout = 60);
TestSuite(tmpfile, .init = make_tmpdir, .fini = drop_tmpdir, .timeout = 60);
TestSuite(sampler, .timeout = 60);

static const char *tpath(const char *name)
{
    static char buf[8][256];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 256, "%s/%s", tmpdir, name);
    return p;
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)n + 1);
    cr_assert_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void spit(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    cr_assert_eq(fwrite(p, 1, n, f), n);
    fclose(f);
}

/* A safetensors file with `json` as header (padded to 8) and `data`. */
static void spit_st(const char *path, const char *json, const void *data, size_t n)
{
    size_t jl = strlen(json), pad = (jl + 7) / 8 * 8;
    unsigned char *b = calloc(1, 8 + pad + n + 1);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)pad >> (8 * i));
    memcpy(b + 8, json, jl);
    memset(b + 8 + jl, ' ', pad - jl);
    if (n) memcpy(b + 8 + pad, data, n);
    spit(path, b, 8 + pad + n);
    free(b);
}

static int dir_entries(const char *dir)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "ls -A '%s' | wc -l", dir);
    FILE *p = popen(cmd, "r");
    int n = -1;
    if (p) {
        if (fscanf(p, "%d", &n) != 1) n = -1;
        pclose(p);
    }
    return n;
}

/* Three tensors of all supported dtypes, including a scalar. */
static float w[2][3] = {{1, 2, 3}, {4, 5, 6}};
static int32_t ids[4] = {-1, 0, 7, 1 << 30};
static uint8_t mask[5] = {1, 0, 255, 3, 9};
static float scal = 3.5f;

static int sample_tensors(pw_st_tensor *t)
{
    t[0] = (pw_st_tensor){"fc1.weight", PW_F32, {2, {2, 3}}, w, sizeof w};
    t[1] = (pw_st_tensor){"mask", PW_U8, {1, {5}}, mask, sizeof mask};
    t[2] = (pw_st_tensor){"ids", PW_I32, {2, {2, 2}}, ids, sizeof ids};
    t[3] = (pw_st_tensor){"scale", PW_F32, {0, {0}}, &scal, sizeof scal};
    t[4] = (pw_st_tensor){"empty", PW_F32, {2, {0, 4}}, NULL, 0};
    return 5;
}

static const pw_st_meta sample_meta[] = {
    {"step", "100"}, {"format", "pipewright-v1"}, {"plan", "{\"stages\": [0, 3, 7]}"},
    {"unicode", "caf\xc3\xa9"},
};

/* ---------------------------------------------------------------- safetensors */

Test(safetensors, round_trip)
{
    pw_st_tensor t[8];
    int n = sample_tensors(t);
    const char *p = tpath("a.safetensors");
    cr_assert_eq(pw_safetensors_write(p, t, n, sample_meta, 4), PW_OK, "%s", pw_last_error());

    pw_safetensors *st = NULL;
    cr_assert_eq(pw_safetensors_open(p, &st), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_count(st), n);
    for (int i = 0; i < n; i++) {
        pw_st_tensor r;
        cr_assert_eq(pw_safetensors_get(st, t[i].name, &r), PW_OK, "%s", pw_last_error());
        cr_assert_str_eq(r.name, t[i].name);
        cr_assert_eq(r.dtype, t[i].dtype, "%s", t[i].name);
        cr_assert(pw_shape_equal(&r.shape, &t[i].shape), "%s", t[i].name);
        cr_assert_eq(r.nbytes, t[i].nbytes);
        if (r.nbytes) cr_assert_eq(memcmp(r.data, t[i].data, r.nbytes), 0, "%s", t[i].name);
        cr_assert_eq((uintptr_t)r.data % pw_dtype_size(r.dtype), 0, "aligned");
    }
    pw_st_tensor r;
    cr_assert_eq(pw_safetensors_get(st, "scale", &r), PW_OK);
    cr_assert_eq(r.shape.ndim, 0);
    cr_assert_eq(*(const float *)r.data, 3.5f);

    /* at() is in name order */
    const char *prev = "";
    for (int i = 0; i < n; i++) {
        cr_assert_eq(pw_safetensors_at(st, i, &r), PW_OK);
        cr_assert_gt(strcmp(r.name, prev), 0);
        prev = r.name;
    }
    cr_assert_eq(pw_safetensors_at(st, n, &r), PW_ERR_INVALID_ARG);

    cr_assert_str_eq(pw_safetensors_meta(st, "step"), "100");
    cr_assert_str_eq(pw_safetensors_meta(st, "plan"), "{\"stages\": [0, 3, 7]}");
    cr_assert_str_eq(pw_safetensors_meta(st, "unicode"), "caf\xc3\xa9");
    cr_assert_null(pw_safetensors_meta(st, "nope"));
    cr_assert_eq(pw_safetensors_meta_count(st), 4);
    pw_st_meta m;
    cr_assert_eq(pw_safetensors_meta_at(st, 0, &m), PW_OK);
    cr_assert_str_eq(m.key, "format");

    cr_assert_eq(pw_safetensors_get(st, "fc2.weight", &r), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "no tensor 'fc2.weight'"), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), p), "names the file: %s", pw_last_error());

    pw_shape good = {2, {2, 3}}, bad = {2, {3, 2}};
    cr_assert_eq(pw_safetensors_get_as(st, "fc1.weight", PW_F32, &good, &r), PW_OK);
    cr_assert_eq(pw_safetensors_get_as(st, "fc1.weight", PW_F32, NULL, &r), PW_OK);
    cr_assert_eq(pw_safetensors_get_as(st, "fc1.weight", PW_F32, &bad, &r), PW_ERR_SHAPE);
    cr_assert(strstr(pw_last_error(), "is F32 [2, 3], expected F32 [3, 2]"), "%s",
              pw_last_error());
    cr_assert_eq(pw_safetensors_get_as(st, "ids", PW_F32, NULL, &r), PW_ERR_SHAPE);
    pw_safetensors_close(st);
    pw_safetensors_close(NULL);
}

Test(safetensors, no_tensors_no_metadata)
{
    const char *p = tpath("empty.safetensors");
    cr_assert_eq(pw_safetensors_write(p, NULL, 0, NULL, 0), PW_OK, "%s", pw_last_error());
    size_t len;
    unsigned char *b = slurp(p, &len);
    cr_assert_eq(len, 16);
    cr_assert_eq(memcmp(b + 8, "{}      ", 8), 0);
    free(b);
    pw_safetensors *st;
    cr_assert_eq(pw_safetensors_open(p, &st), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_count(st), 0);
    cr_assert_eq(pw_safetensors_meta_count(st), 0);
    pw_safetensors_close(st);
}

Test(safetensors, byte_identical_for_same_input_in_any_order)
{
    pw_st_tensor t[8], rev[8];
    int n = sample_tensors(t);
    for (int i = 0; i < n; i++) rev[i] = t[n - 1 - i];
    pw_st_meta mrev[4];
    for (int i = 0; i < 4; i++) mrev[i] = sample_meta[3 - i];
    cr_assert_eq(pw_safetensors_write(tpath("1.st"), t, n, sample_meta, 4), PW_OK);
    cr_assert_eq(pw_safetensors_write(tpath("2.st"), t, n, sample_meta, 4), PW_OK);
    cr_assert_eq(pw_safetensors_write(tpath("3.st"), rev, n, mrev, 4), PW_OK);
    size_t l1, l2, l3;
    unsigned char *a = slurp(tpath("1.st"), &l1), *b = slurp(tpath("2.st"), &l2),
                  *c = slurp(tpath("3.st"), &l3);
    cr_assert_eq(l1, l2);
    cr_assert_eq(l1, l3);
    cr_assert_eq(memcmp(a, b, l1), 0);
    cr_assert_eq(memcmp(a, c, l1), 0);
    free(a);
    free(b);
    free(c);
    /* no temp files left behind */
    cr_assert_eq(dir_entries(tmpdir), 3);
}

/* The layout Python's safetensors expects, checked independently of our
 * reader: header length a multiple of 8, JSON padded with spaces, offsets
 * contiguous from 0 to the end of the file, each tensor aligned. */
Test(safetensors, python_compatible_layout)
{
    pw_st_tensor t[8];
    int n = sample_tensors(t);
    const char *p = tpath("py.safetensors");
    cr_assert_eq(pw_safetensors_write(p, t, n, sample_meta, 4), PW_OK);
    size_t len;
    unsigned char *b = slurp(p, &len);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | b[i];
    cr_assert_eq(hl % 8, 0);
    cr_assert_leq(8 + hl, len);
    cr_assert_eq(b[8], '{');
    json_error_t e;
    json_t *root = json_loadb((const char *)b + 8, hl, 0, &e);
    cr_assert_not_null(root, "%s", e.text);
    /* the JSON ends at the last '}', then only spaces */
    size_t end = 8 + hl;
    while (end > 8 && b[end - 1] == ' ') end--;
    cr_assert_eq(b[end - 1], '}');
    cr_assert_lt(8 + hl - end, 8);

    json_t *m = json_object_get(root, "__metadata__");
    cr_assert(json_is_object(m));
    cr_assert_str_eq(json_string_value(json_object_get(m, "step")), "100");

    /* header order == data order, offsets contiguous, F32/I32 before U8 */
    uint64_t off = 0;
    int idx = 0, seen_u8 = 0;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (idx++ == 0) {
            cr_assert_str_eq(key, "__metadata__", "metadata first");
            continue;
        }
        const char *dt = json_string_value(json_object_get(v, "dtype"));
        json_t *o = json_object_get(v, "data_offsets");
        uint64_t b0 = (uint64_t)json_integer_value(json_array_get(o, 0));
        uint64_t b1 = (uint64_t)json_integer_value(json_array_get(o, 1));
        cr_assert_eq(b0, off, "%s starts at %llu, expected %llu", key,
                     (unsigned long long)b0, (unsigned long long)off);
        if (strcmp(dt, "U8") == 0) seen_u8 = 1;
        else cr_assert(!seen_u8 && b0 % 4 == 0, "%s aligned", key);
        off = b1;
    }
    cr_assert_eq(8 + hl + off, len);
    /* fc1.weight bytes are little-endian f32 row-major */
    json_t *fw = json_object_get(root, "fc1.weight");
    uint64_t fb = (uint64_t)json_integer_value(json_array_get(json_object_get(fw, "data_offsets"), 0));
    cr_assert_eq(memcmp(b + 8 + hl + fb, w, sizeof w), 0);
    json_decref(root);
    free(b);
}

/* A bonus check where Python is around: an independent pure-Python reader
 * (struct + json), and the real `safetensors` package if installed. */
Test(safetensors, python_reader)
{
    if (system("python3 -c 'import json, struct' >/dev/null 2>&1") != 0)
        cr_skip_test("python3 not available");
    pw_st_tensor t[8];
    int n = sample_tensors(t);
    const char *p = tpath("py2.safetensors");
    cr_assert_eq(pw_safetensors_write(p, t, n, sample_meta, 4), PW_OK);
    const char *script =
        "import json, struct, sys\n"
        "b = open(sys.argv[1], 'rb').read()\n"
        "n = struct.unpack('<Q', b[:8])[0]\n"
        "h = json.loads(b[8:8 + n])\n"
        "assert h['__metadata__']['step'] == '100'\n"
        "w = h['fc1.weight']\n"
        "assert w['dtype'] == 'F32' and w['shape'] == [2, 3]\n"
        "s, e = w['data_offsets']\n"
        "v = struct.unpack('<6f', b[8 + n + s:8 + n + e])\n"
        "assert v == (1, 2, 3, 4, 5, 6), v\n"
        "i = h['ids']; s, e = i['data_offsets']\n"
        "assert struct.unpack('<4i', b[8 + n + s:8 + n + e]) == (-1, 0, 7, 1 << 30)\n"
        "assert h['scale']['shape'] == []\n"
        "try:\n"
        "    from safetensors.numpy import load_file\n"
        "except Exception:\n"
        "    sys.exit(0)\n"
        "t = load_file(sys.argv[1])\n"
        "assert t['fc1.weight'].tolist() == [[1, 2, 3], [4, 5, 6]]\n"
        "assert t['mask'].tolist() == [1, 0, 255, 3, 9]\n";
    spit(tpath("check.py"), script, strlen(script));
    char cmd[512];
    snprintf(cmd, sizeof cmd, "python3 '%s' '%s'", tpath("check.py"), p);
    cr_assert_eq(system(cmd), 0, "python reader disagreed");
}

/* Files written by hand the way other tools write them. */
Test(safetensors, reads_foreign_layouts)
{
    /* unpadded header, U8 first so the F32 tensor is misaligned, metadata
     * last, unknown extra fields ignored */
    unsigned char data[1 + 8];
    data[0] = 7;
    float f[2] = {1.5f, -2.0f};
    memcpy(data + 1, f, 8);
    const char *json = "{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9],\"x\":1},"
                       "\"__metadata__\":{\"k\":\"v\"}}";
    size_t jl = strlen(json);
    unsigned char *b = malloc(8 + jl + sizeof data);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)jl >> (8 * i));
    memcpy(b + 8, json, jl);
    memcpy(b + 8 + jl, data, sizeof data);
    spit(tpath("f.st"), b, 8 + jl + sizeof data);
    free(b);
    pw_safetensors *st;
    cr_assert_eq(pw_safetensors_open(tpath("f.st"), &st), PW_OK, "%s", pw_last_error());
    pw_st_tensor r;
    cr_assert_eq(pw_safetensors_get(st, "a", &r), PW_OK);
    cr_assert_eq((uintptr_t)r.data % 4, 0, "misaligned tensor gets an aligned copy");
    cr_assert_eq(((const float *)r.data)[0], 1.5f);
    cr_assert_eq(((const float *)r.data)[1], -2.0f);
    cr_assert_str_eq(pw_safetensors_meta(st, "k"), "v");
    pw_safetensors_close(st);

    /* "__metadata__": null is allowed by the reference reader */
    spit_st(tpath("g.st"), "{\"__metadata__\":null}", NULL, 0);
    cr_assert_eq(pw_safetensors_open(tpath("g.st"), &st), PW_OK, "%s", pw_last_error());
    pw_safetensors_close(st);
}

typedef struct corrupt_case {
    const char *json;   /* NULL: raw bytes below */
    size_t data_len;
    const char *raw;
    size_t raw_len;
    pw_status st;
    const char *msg;
} corrupt_case;

#define T1 "\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"

static const corrupt_case corrupt[] = {
    {NULL, 0, "", 0, PW_ERR_FORMAT, "file is 0 bytes, too short"},
    {NULL, 0, "\x10\0\0\0", 4, PW_ERR_FORMAT, "too short for a safetensors header"},
    {NULL, 0, "\x10\0\0\0\0\0\0\0{}", 10, PW_ERR_FORMAT, "header length 16 exceeds the 2 bytes"},
    {NULL, 0, "\xff\xff\xff\xff\xff\xff\xff\xff{}", 10, PW_ERR_FORMAT, "is absurd"},
    {NULL, 0, "\0\0\0\x10\0\0\0\0{}", 10, PW_ERR_FORMAT, "is absurd"},
    {"{\"t\":", 0, NULL, 0, PW_ERR_FORMAT, "header is not valid JSON"},
    {"{\"t\" 1}", 0, NULL, 0, PW_ERR_FORMAT, "column"},
    {"[1, 2]", 0, NULL, 0, PW_ERR_FORMAT, "header is not a JSON object"},
    {"{\"t\":5}", 0, NULL, 0, PW_ERR_FORMAT, "tensor 't': entry is not a JSON object"},
    {"{" T1 "," T1 "}", 8, NULL, 0, PW_ERR_FORMAT, "duplicate object key"},
    {"{\"t\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, NULL, 0, PW_ERR_FORMAT,
     "tensor 't': missing \"dtype\""},
    {"{\"t\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,8]}}", 8, NULL, 0, PW_ERR_FORMAT,
     "\"dtype\" is not a string"},
    {"{\"t\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "tensor 't': unknown dtype \"F33\""},
    {"{\"t\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]}}", 8, NULL, 0,
     PW_ERR_UNSUPPORTED, "tensor 't' has dtype BF16, which pipewright does not support"},
    {"{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, NULL, 0, PW_ERR_FORMAT,
     "missing \"shape\""},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "\"shape\" is not an array"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "shape dimension 0 is not an integer"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "negative dimension -2"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,2],\"data_offsets\":[0,8]}}", 8, NULL, 0,
     PW_ERR_UNSUPPORTED, "has 7 dimensions"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
     "\"data_offsets\":[0,8]}}", 8, NULL, 0, PW_ERR_FORMAT, "overflows"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,8]}}", 8,
     NULL, 0, PW_ERR_FORMAT, "header is not valid JSON"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, NULL, 0, PW_ERR_FORMAT,
     "missing \"data_offsets\""},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "\"data_offsets\" must be [begin, end]"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-1,7]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "\"data_offsets\" must be [begin, end]"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "end before they begin"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "run past the end of the data buffer (8 bytes)"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "hold 8 bytes but F32 [3] needs 12"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"u\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "overlaps tensor"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "gap in the data buffer: bytes [0, 4]"},
    {"{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, NULL, 0,
     PW_ERR_FORMAT, "4 trailing bytes after the last tensor"},
    {"{\"__metadata__\":[1]}", 0, NULL, 0, PW_ERR_FORMAT, "\"__metadata__\" is not a JSON object"},
    {"{\"__metadata__\":{\"k\":1}}", 0, NULL, 0, PW_ERR_FORMAT,
     "metadata value for 'k' is not a string"},
    {NULL, 0, "\x08\0\0\0\0\0\0\0{}\0\0\0\0\0\0", 16, PW_ERR_FORMAT,
     "header is not valid JSON"},
};

Test(safetensors, corrupt_files_table)
{
    const char *p = tpath("bad.st");
    unsigned char data[64] = {0};
    for (size_t i = 0; i < sizeof corrupt / sizeof *corrupt; i++) {
        const corrupt_case *c = &corrupt[i];
        if (c->json) spit_st(p, c->json, data, c->data_len);
        else spit(p, c->raw, c->raw_len);
        pw_safetensors *st = (pw_safetensors *)0x1;
        pw_status rc = pw_safetensors_open(p, &st);
        cr_expect_eq(rc, c->st, "case %zu: got %s (%s)", i, pw_status_str(rc), pw_last_error());
        cr_expect_null(st, "case %zu: *out reset on failure", i);
        if (c->msg)
            cr_expect(strstr(pw_last_error(), c->msg), "case %zu: expected \"%s\" in \"%s\"", i,
                      c->msg, pw_last_error());
        cr_expect(strncmp(pw_last_error(), p, strlen(p)) == 0, "case %zu: names the file: %s",
                  i, pw_last_error());
        if (rc == PW_OK) pw_safetensors_close(st);
    }
}

Test(safetensors, missing_file_and_directory)
{
    pw_safetensors *st;
    cr_assert_eq(pw_safetensors_open(tpath("nope.st"), &st), PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "No such file"), "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_open(tmpdir, &st), PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "not a regular file"), "%s", pw_last_error());
}

/* Every proper prefix of a valid file is invalid and must be refused with a
 * message, never a crash (ASan builds run this too). */
Test(safetensors, truncation_at_every_byte)
{
    pw_st_tensor t[8];
    int n = sample_tensors(t);
    const char *p = tpath("full.st"), *q = tpath("cut.st");
    cr_assert_eq(pw_safetensors_write(p, t, n, sample_meta, 4), PW_OK);
    size_t len;
    unsigned char *b = slurp(p, &len);
    for (size_t cut = 0; cut < len; cut++) {
        spit(q, b, cut);
        pw_safetensors *st = NULL;
        pw_status rc = pw_safetensors_open(q, &st);
        cr_assert_eq(rc, PW_ERR_FORMAT, "cut at %zu of %zu: %s", cut, len, pw_last_error());
        cr_assert_null(st);
        cr_assert_neq(pw_last_error()[0], '\0');
    }
    free(b);
}

/* Random byte flips: any outcome but a crash or a leak. */
Test(safetensors, byte_flips_never_crash)
{
    pw_st_tensor t[8];
    int n = sample_tensors(t);
    const char *p = tpath("full.st"), *q = tpath("flip.st");
    cr_assert_eq(pw_safetensors_write(p, t, n, sample_meta, 4), PW_OK);
    size_t len;
    unsigned char *b = slurp(p, &len);
    uint64_t x = 88172645463325252ull;
    for (int trial = 0; trial < 2000; trial++) {
        unsigned char *c = malloc(len);
        memcpy(c, b, len);
        for (int k = 0; k < 1 + trial % 3; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            c[x % len] ^= (unsigned char)(1u << (x >> 32) % 8);
        }
        spit(q, c, len);
        pw_safetensors *st = NULL;
        if (pw_safetensors_open(q, &st) == PW_OK) {
            for (int i = 0; i < pw_safetensors_count(st); i++) {
                pw_st_tensor r;
                cr_assert_eq(pw_safetensors_at(st, i, &r), PW_OK);
                volatile unsigned char sink = 0;
                for (size_t j = 0; j < r.nbytes; j++) sink ^= ((const unsigned char *)r.data)[j];
                (void)sink;
            }
            pw_safetensors_close(st);
        } else {
            cr_assert_neq(pw_last_error()[0], '\0');
        }
        free(c);
    }
    free(b);
}

Test(safetensors, write_rejects_bad_input)
{
    const char *p = tpath("x.st");
    float v[2] = {0};
    pw_st_tensor t[2] = {{"a", PW_F32, {1, {2}}, v, 8}, {"a", PW_F32, {1, {2}}, v, 8}};
    cr_assert_eq(pw_safetensors_write(p, t, 2, NULL, 0), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "duplicate tensor name 'a'"), "%s", pw_last_error());
    t[0].nbytes = 4;
    cr_assert_eq(pw_safetensors_write(p, t, 1, NULL, 0), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "nbytes is 4 but F32 [2] needs 8"), "%s", pw_last_error());
    t[0].nbytes = 8;
    t[0].name = "__metadata__";
    cr_assert_eq(pw_safetensors_write(p, t, 1, NULL, 0), PW_ERR_INVALID_ARG);
    t[0].name = "";
    cr_assert_eq(pw_safetensors_write(p, t, 1, NULL, 0), PW_ERR_INVALID_ARG);
    t[0].name = "bad\xff";
    cr_assert_eq(pw_safetensors_write(p, t, 1, NULL, 0), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "UTF-8"), "%s", pw_last_error());
    t[0].name = "a";
    t[0].shape.d[0] = -2;
    cr_assert_eq(pw_safetensors_write(p, t, 1, NULL, 0), PW_ERR_INVALID_ARG);
    t[0].shape.d[0] = 2;
    pw_st_meta m[2] = {{"k", "1"}, {"k", "2"}};
    cr_assert_eq(pw_safetensors_write(p, t, 1, m, 2), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "duplicate metadata key 'k'"), "%s", pw_last_error());
    cr_assert_eq(dir_entries(tmpdir), 0, "nothing written");
}

Test(safetensors, write_into_missing_directory_fails_cleanly)
{
    pw_st_tensor t[8];
    int n = sample_tensors(t);
    char p[300];
    snprintf(p, sizeof p, "%s/no/such/dir/x.st", tmpdir);
    cr_assert_eq(pw_safetensors_write(p, t, n, NULL, 0), PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "No such file or directory"), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), p), "%s", pw_last_error());
}

static void expect_intact(const char *p, const unsigned char *orig, size_t olen)
{
    size_t len;
    unsigned char *b = slurp(p, &len);
    cr_assert_eq(len, olen, "existing file changed size");
    cr_assert_eq(memcmp(b, orig, len), 0, "existing file changed");
    free(b);
}

/* A write that fails part-way (the disk "fills up": RLIMIT_FSIZE) leaves the
 * old checkpoint byte-for-byte and no temp file. Criterion runs each test in
 * its own process, so the rlimit stays here. */
Test(safetensors, failed_write_leaves_existing_file_intact)
{
    pw_st_tensor t[8];
    int n = sample_tensors(t);
    const char *p = tpath("ckpt.st");
    cr_assert_eq(pw_safetensors_write(p, t, 2, NULL, 0), PW_OK);
    size_t olen;
    unsigned char *orig = slurp(p, &olen);

    static float big[4096];
    pw_st_tensor bt = {"big", PW_F32, {1, {4096}}, big, sizeof big};
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit saved, rl;
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &saved), 0);
    rl = saved;
    rl.rlim_cur = 4096; /* soft limit only, so it can be lifted again */
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
    pw_status rc = pw_safetensors_write(p, &bt, 1, NULL, 0);
    /* lift it before anything else writes: Criterion's own reporting too */
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &saved), 0);
    cr_assert_eq(rc, PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "too large"), "%s", pw_last_error());
    expect_intact(p, orig, olen);
    cr_assert_eq(dir_entries(tmpdir), 1, "temp file removed");

    /* the temp name is taken by a directory: cannot even create it */
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", p, (long)getpid());
    cr_assert_eq(mkdir(tmp, 0700), 0);
    cr_assert_eq(pw_safetensors_write(p, t, n, NULL, 0), PW_ERR_IO);
    expect_intact(p, orig, olen);
    rmdir(tmp);

    /* the target is a directory: rename fails, temp removed */
    const char *d = tpath("adir");
    cr_assert_eq(mkdir(d, 0700), 0);
    cr_assert_eq(pw_safetensors_write(d, t, n, NULL, 0), PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "rename"), "%s", pw_last_error());
    cr_assert_eq(dir_entries(tmpdir), 2, "only ckpt.st and adir");
    free(orig);
}

/* ---------------------------------------------------------------- IDX */

static const char *const suffixes[] = {"", ".gz"};

Test(idx, round_trip_u8_and_f32_plain_and_gz)
{
    enum { N = 7, H = 3, W = 5 };
    uint8_t img[N][H][W];
    float fimg[N][H][W];
    uint8_t lab[N];
    int32_t lab32[N];
    for (int i = 0; i < N; i++) {
        lab[i] = (uint8_t)(i % 4);
        lab32[i] = (i * 3) % 5;
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                img[i][y][x] = (uint8_t)(i * 31 + y * 7 + x);
                fimg[i][y][x] = (float)(i - y) * 0.25f + (float)x * 1e-3f;
            }
    }
    pw_shape is = {3, {N, H, W}}, ls = {1, {N}};
    for (int s = 0; s < 2; s++) {
        char ip[64], fp[64], lp[64], l32[64];
        snprintf(ip, sizeof ip, "img-u8%s", suffixes[s]);
        snprintf(fp, sizeof fp, "img-f32%s", suffixes[s]);
        snprintf(lp, sizeof lp, "lab-u8%s", suffixes[s]);
        snprintf(l32, sizeof l32, "lab-i32%s", suffixes[s]);
        cr_assert_eq(pw_idx_write(tpath(ip), PW_U8, &is, img), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_idx_write(tpath(fp), PW_F32, &is, fimg), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_idx_write(tpath(lp), PW_U8, &ls, lab), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_idx_write(tpath(l32), PW_I32, &ls, lab32), PW_OK, "%s", pw_last_error());

        size_t len;
        unsigned char *raw = slurp(tpath(ip), &len);
        if (s == 1) cr_assert(raw[0] == 0x1f && raw[1] == 0x8b, "gzip magic");
        else cr_assert(raw[2] == 0x08 && raw[3] == 3 && raw[7] == N && len == 16 + N * H * W);
        free(raw);

        pw_dataset *d = NULL;
        cr_assert_eq(pw_dataset_load_idx(tpath(ip), tpath(lp), &d), PW_OK, "%s", pw_last_error());
        cr_assert_eq(d->n, N);
        pw_shape ss = {2, {H, W}};
        cr_assert(pw_shape_equal(&d->sample_shape, &ss));
        cr_assert_eq(d->sample_numel, H * W);
        cr_assert_eq(d->n_classes, 4);
        for (int i = 0; i < N; i++) {
            cr_assert_eq(d->y[i], lab[i]);
            for (int j = 0; j < H * W; j++)
                cr_assert_eq(d->x[i * H * W + j], (float)(&img[i][0][0])[j] / 255.0f);
        }
        pw_dataset_destroy(d);

        cr_assert_eq(pw_dataset_load_idx(tpath(fp), tpath(l32), &d), PW_OK, "%s", pw_last_error());
        cr_assert_eq(d->n_classes, 5);
        cr_assert_eq(memcmp(d->x, fimg, sizeof fimg), 0, "f32 bit-exact");
        cr_assert_eq(memcmp(d->y, lab32, sizeof lab32), 0);
        pw_dataset_destroy(d);
    }
    /* .gz output is reproducible */
    cr_assert_eq(pw_idx_write(tpath("again.gz"), PW_U8, &is, img), PW_OK);
    size_t l1, l2;
    unsigned char *a = slurp(tpath("img-u8.gz"), &l1), *b = slurp(tpath("again.gz"), &l2);
    cr_assert(l1 == l2 && memcmp(a, b, l1) == 0);
    free(a);
    free(b);
}

static const uint8_t idx_img_hdr[] = {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2};

static void write_gz(const char *path, const void *p, size_t n)
{
    gzFile g = gzopen(path, "wb");
    cr_assert_not_null(g);
    cr_assert_eq(gzwrite(g, p, (unsigned)n), (int)n);
    gzclose(g);
}

Test(idx, corrupt_files)
{
    /* a valid 2-sample 2x2 images file and its labels */
    uint8_t img[16 + 8];
    memcpy(img, idx_img_hdr, 16);
    for (int i = 0; i < 8; i++) img[16 + i] = (uint8_t)i;
    uint8_t lab[8 + 2] = {0, 0, 8, 1, 0, 0, 0, 2, 1, 0};
    spit(tpath("img"), img, sizeof img);
    spit(tpath("lab"), lab, sizeof lab);
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_load_idx(tpath("img"), tpath("lab"), &d), PW_OK, "%s",
                 pw_last_error());
    cr_assert_eq(d->n_classes, 2);
    pw_dataset_destroy(d);

    struct {
        const char *file;    /* which one is damaged */
        const void *bytes;
        size_t n;
        int gz;
        pw_status st;
        const char *msg;
    } cases[] = {
        {"img", "\x12\x34\0\0", 4, 0, PW_ERR_FORMAT, "bad magic 0x12340000"},
        {"img", "\0\0\x07\x03", 4, 0, PW_ERR_FORMAT, "bad magic 0x00000703"},
        {"img", "\0\0\x08", 3, 0, PW_ERR_FORMAT, "truncated: 3 bytes, too short for an IDX header"},
        {"img", "", 0, 0, PW_ERR_FORMAT, "truncated: 0 bytes"},
        {"img", "\0\0\x08\x00", 4, 0, PW_ERR_FORMAT, "0 dimensions"},
        {"img", "\0\0\x08\x09", 4, 0, PW_ERR_UNSUPPORTED, "9 dimensions"},
        {"img", "\0\0\x0E\x01\0\0\0\x01\0\0\0\0\0\0\0\0", 16, 0, PW_ERR_UNSUPPORTED,
         "not f64 (0x0E)"},
        {"img", idx_img_hdr, 10, 0, PW_ERR_FORMAT, "ends after 6 of their 12 bytes"},
        {"img", img, sizeof img - 3, 0, PW_ERR_FORMAT, "truncated: expected 8 bytes of data, got 5"},
        {"img", img, sizeof img - 3, 1, PW_ERR_FORMAT, "truncated: expected 8 bytes of data, got 5"},
        {"lab", "\0\0\x08\x01\0\0\0\x03\0\1\1", 11, 0, PW_ERR_FORMAT,
         "3 labels but images file has 2 images"},
        {"lab", "\0\0\x08\x01\0\0\0\x02\0\1\1", 11, 0, PW_ERR_FORMAT,
         "1 unexpected bytes after the 2 bytes of data"},
        {"lab", "\0\0\x0C\x01\0\0\0\x02\0\0\0\1\xff\xff\xff\xff", 16, 0, PW_ERR_FORMAT,
         "label -1 at index 1 is out of range [0, 65536)"},
        {"lab", "\0\0\x0C\x01\0\0\0\x02\0\0\0\1\0\x10\0\0", 16, 0, PW_ERR_FORMAT,
         "label 1048576 at index 1 is out of range"},
        {"lab", img, sizeof img, 0, PW_ERR_FORMAT, "a labels file has 1 dimension, this one has 3"},
        {"lab", "\0\0\x0D\x01\0\0\0\x02\0\0\0\0\0\0\0\0", 16, 0, PW_ERR_UNSUPPORTED,
         "labels must be u8 (0x08) or i32 (0x0C), not f32"},
        {"img", "\0\0\x08\x01\0\0\0\x00", 8, 0, PW_ERR_FORMAT, "contains no samples"},
        {"img", "\0\0\x08\x03\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 16, 0,
         PW_ERR_FORMAT, "IDX header: dimensions 4294967295 x 4294967295 x 4294967295 overflow "
         "(one sample has more than 2^60 elements)"},
        {"img", "\0\0\x08\x03\xff\xff\xff\xff\0\x10\0\0\0\x10\0\0", 16, 0, PW_ERR_FORMAT,
         "dimensions 4294967295 x 1048576 x 1048576 overflow (the file has more than 2^60 elements)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *bad = tpath(cases[i].gz ? "bad.gz" : "bad");
        if (cases[i].gz) write_gz(bad, cases[i].bytes, cases[i].n);
        else spit(bad, cases[i].bytes, cases[i].n);
        int is_img = strcmp(cases[i].file, "img") == 0;
        d = (pw_dataset *)0x1;
        pw_status rc = pw_dataset_load_idx(is_img ? bad : tpath("img"), is_img ? tpath("lab") : bad,
                                           &d);
        cr_expect_eq(rc, cases[i].st, "case %zu: got %s: %s", i, pw_status_str(rc),
                     pw_last_error());
        cr_expect_null(d, "case %zu", i);
        const char *msg = cases[i].msg;
        cr_expect(strstr(pw_last_error(), msg), "case %zu: expected \"%s\" in \"%s\"", i, msg,
                  pw_last_error());
        cr_expect(strncmp(pw_last_error(), bad, strlen(bad)) == 0, "case %zu names %s: %s", i,
                  bad, pw_last_error());
    }

    /* a corrupt gzip stream */
    size_t gl;
    write_gz(tpath("good.gz"), img, sizeof img);
    unsigned char *g = slurp(tpath("good.gz"), &gl);
    for (size_t k = 12; k < gl - 8; k++) g[k] ^= 0x5a;
    spit(tpath("bad.gz"), g, gl);
    free(g);
    cr_expect_eq(pw_dataset_load_idx(tpath("bad.gz"), tpath("lab"), &d), PW_ERR_FORMAT, "%s",
                 pw_last_error());
    cr_expect(strstr(pw_last_error(), "bad.gz"), "%s", pw_last_error());

    cr_expect_eq(pw_dataset_load_idx(tpath("missing"), tpath("lab"), &d), PW_ERR_IO);
    cr_expect(strstr(pw_last_error(), "No such file"), "%s", pw_last_error());
}

/* Issue 13: no samples, and a per-sample shape whose product overflows
 * int64 (pw_shape_numel was undefined behaviour on it). */
Test(idx, per_sample_shape_overflow)
{
    const char *im = PW_SOURCE_DIR "/tests/fixtures/crashes/numel-overflow.images.idx";
    const char *lb = PW_SOURCE_DIR "/tests/fixtures/crashes/numel-overflow.labels.idx";
    pw_dataset *d = (pw_dataset *)0x1;
    cr_assert_eq(pw_dataset_load_idx(im, lb, &d), PW_ERR_FORMAT, "%s", pw_last_error());
    cr_assert_null(d);
    char want[512];
    snprintf(want, sizeof want, "%s: IDX header: dimensions 0 x 4294903558 x 4278714368 overflow "
             "(one sample has more than 2^60 elements)", im);
    cr_assert_str_eq(pw_last_error(), want);
    /* Only the labels' side (a last-stage process) reads the images file not
     * at all, and the empty labels file is then the error. */
    cr_assert_eq(pw_dataset_load_idx_parts(im, lb, PW_DATA_LABELS, &d), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "numel-overflow.labels.idx: truncated: 0 bytes"), "%s",
              pw_last_error());

    /* The checked product itself. */
    int64_t n = 7;
    pw_shape big = {2, {INT64_C(1) << 40, INT64_C(1) << 30}}, neg = {2, {3, -2}}, ok = {3, {2, 3, 4}};
    cr_assert_not(pw_shape_numel_checked(&big, &n));
    cr_assert_not(pw_shape_numel_checked(&neg, &n));
    cr_assert_eq(n, 7);
    cr_assert_eq(pw_shape_numel(&big), -1);
    cr_assert(pw_shape_numel_checked(&ok, &n));
    cr_assert_eq(n, 24);
    pw_shape scalar = {0, {0}};
    cr_assert_eq(pw_shape_numel(&scalar), 1);
}

Test(idx, truncation_at_every_byte)
{
    uint8_t img[4][6];
    for (int i = 0; i < 24; i++) (&img[0][0])[i] = (uint8_t)i;
    uint8_t lab[4] = {0, 1, 2, 3};
    pw_shape is = {3, {4, 2, 3}}, ls = {1, {4}};
    for (int s = 0; s < 2; s++) {
        char ip[32], lp[32], cp[32];
        snprintf(ip, sizeof ip, "i%s", suffixes[s]);
        snprintf(lp, sizeof lp, "l%s", suffixes[s]);
        snprintf(cp, sizeof cp, "cut%s", suffixes[s]);
        cr_assert_eq(pw_idx_write(tpath(ip), PW_U8, &is, img), PW_OK);
        cr_assert_eq(pw_idx_write(tpath(lp), PW_U8, &ls, lab), PW_OK);
        size_t len;
        unsigned char *b = slurp(tpath(ip), &len);
        for (size_t cut = 0; cut < len; cut++) {
            spit(tpath(cp), b, cut);
            pw_dataset *d = NULL;
            pw_status rc = pw_dataset_load_idx(tpath(cp), tpath(lp), &d);
            cr_assert_neq(rc, PW_OK, "%s cut at %zu of %zu loaded", ip, cut, len);
            cr_assert_null(d);
        }
        free(b);
    }
}

Test(idx, writer_rejects_bad_input)
{
    uint8_t v[4] = {0};
    pw_shape s0 = {0, {0}}, big = {1, {(int64_t)1 << 33}}, ok = {1, {4}};
    cr_assert_eq(pw_idx_write(tpath("a"), PW_U8, &s0, v), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_idx_write(tpath("a"), PW_U8, &big, v), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_idx_write(tpath("a"), PW_DTYPE_COUNT, &ok, v), PW_ERR_INVALID_ARG);
    char p[300];
    snprintf(p, sizeof p, "%s/nodir/a.gz", tmpdir);
    cr_assert_eq(pw_idx_write(p, PW_U8, &ok, v), PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "No such file"), "%s", pw_last_error());
    cr_assert_eq(dir_entries(tmpdir), 0);
}

Test(idx, fashion_mnist_from_debian_package)
{
    struct stat sb;
    if (stat("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", &sb) != 0)
        cr_skip_test("dataset-fashion-mnist not installed");
    pw_dataset *tr = NULL, *te = NULL;
    cr_assert_eq(pw_dataset_from_spec("fashion-mnist", 1, &tr), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_dataset_from_spec(NULL, 0, &te), PW_OK, "%s", pw_last_error());
    pw_shape s = {2, {28, 28}};
    cr_assert_eq(tr->n, 60000);
    cr_assert_eq(te->n, 10000);
    cr_assert(pw_shape_equal(&tr->sample_shape, &s));
    cr_assert(pw_shape_equal(&te->sample_shape, &s));
    cr_assert_eq(tr->n_classes, 10);
    cr_assert_eq(te->n_classes, 10);
    cr_assert_str_eq(tr->name, "fashion-mnist/train");
    cr_assert_str_eq(te->name, "fashion-mnist/test");
    float lo = 1, hi = 0;
    long counts[10] = {0};
    for (int64_t i = 0; i < tr->n * 784; i++) {
        lo = tr->x[i] < lo ? tr->x[i] : lo;
        hi = tr->x[i] > hi ? tr->x[i] : hi;
    }
    for (int64_t i = 0; i < tr->n; i++) counts[tr->y[i]]++;
    cr_assert_eq(lo, 0.0f);
    cr_assert_eq(hi, 1.0f);
    for (int c = 0; c < 10; c++) cr_assert_eq(counts[c], 6000, "class %d balanced", c);
    pw_dataset_destroy(tr);
    pw_dataset_destroy(te);
}

/* ---------------------------------------------------------------- specs */

/* Contexts from a graph or a flag: any int64 gets an error, not overflow. */
Test(dataset, text_context_extremes)
{
    spit(tpath("t.txt"), "hello, world\n", 13);
    pw_dataset *d = (pw_dataset *)0x1;
    cr_assert_eq(pw_dataset_load_text(tpath("t.txt"), INT64_MAX, 1, &d), PW_ERR_INVALID_ARG);
    cr_assert_null(d);
    cr_assert(strstr(pw_last_error(), "t.txt: the training split has 12 bytes but a window of "
                     "context 9223372036854775807 needs at least 9223372036854775808"), "%s",
              pw_last_error());
    cr_assert_eq(pw_dataset_load_text(tpath("t.txt"), INT64_MIN, 0, &d), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "context must be >= 1 (got -9223372036854775808)"), "%s",
              pw_last_error());
    cr_assert_eq(pw_dataset_load_text(tpath("t.txt"), 11, 1, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, 1);
    pw_dataset_destroy(d);
}

Test(dataset, specs)
{
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_from_spec("synthetic", 1, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, 8192);
    cr_assert_eq(d->sample_numel, 784);
    cr_assert_eq(d->n_classes, 10);
    cr_assert_str_eq(d->name, "synthetic/train");
    pw_dataset_destroy(d);

    cr_assert_eq(pw_dataset_from_spec("synthetic:100:1x28x28:3:7", 0, &d), PW_OK, "%s",
                 pw_last_error());
    pw_shape s = {3, {1, 28, 28}};
    cr_assert_eq(d->n, 25);
    cr_assert(pw_shape_equal(&d->sample_shape, &s));
    cr_assert_eq(d->n_classes, 3);
    cr_assert_str_eq(d->name, "synthetic/test");
    pw_dataset_destroy(d);

    cr_assert_eq(pw_dataset_from_spec("synthetic::16", 1, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, 8192);
    cr_assert_eq(d->sample_numel, 16);
    pw_dataset_destroy(d);

    const char *bad[] = {"synthetic:0", "synthetic:-5", "synthetic:10:0", "synthetic:10:2x",
                         "synthetic:10:4:1", "synthetic:1:2:3:4:5", "synthetic:x", "mnist",
                         "idx:a", "idx:a,b,c", "idx:,b", "synthetic:10:1x1x1x1x1x1x1"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        d = (pw_dataset *)0x1;
        cr_expect_eq(pw_dataset_from_spec(bad[i], 1, &d), PW_ERR_INVALID_ARG, "'%s'", bad[i]);
        cr_expect_null(d);
        cr_expect(strstr(pw_last_error(), bad[i]), "'%s' quoted in: %s", bad[i],
                  pw_last_error());
    }

    /* idx: specs */
    uint8_t img[3][2] = {{1, 2}, {3, 4}, {5, 6}}, lab[3] = {0, 2, 1};
    pw_shape is = {2, {3, 2}}, ls = {1, {3}};
    cr_assert_eq(pw_idx_write(tpath("i.gz"), PW_U8, &is, img), PW_OK);
    cr_assert_eq(pw_idx_write(tpath("l.gz"), PW_U8, &ls, lab), PW_OK);
    char spec[600];
    snprintf(spec, sizeof spec, "idx:%s,%s", tpath("i.gz"), tpath("l.gz"));
    cr_assert_eq(pw_dataset_spec_has_test(spec), 0);
    cr_assert_eq(pw_dataset_from_spec(spec, 1, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, 3);
    cr_assert_eq(d->n_classes, 3);
    pw_dataset_destroy(d);
    cr_assert_eq(pw_dataset_from_spec(spec, 0, &d), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "no test pair"), "%s", pw_last_error());
    snprintf(spec, sizeof spec, "idx:%s,%s,%s,%s", tpath("i.gz"), tpath("l.gz"), tpath("i.gz"),
             tpath("l.gz"));
    cr_assert_eq(pw_dataset_spec_has_test(spec), 1);
    cr_assert_eq(pw_dataset_from_spec(spec, 0, &d), PW_OK, "%s", pw_last_error());
    pw_dataset_destroy(d);
    cr_assert_eq(pw_dataset_spec_has_test("synthetic"), 1);
    cr_assert_eq(pw_dataset_spec_has_test("fashion-mnist"), 1);

    /* fashion-mnist:DIR with plain (uncompressed) files */
    const char *dir = tpath("fm");
    mkdir(dir, 0700);
    char p1[400], p2[400];
    snprintf(p1, sizeof p1, "%s/t10k-images-idx3-ubyte", dir);
    snprintf(p2, sizeof p2, "%s/t10k-labels-idx1-ubyte", dir);
    cr_assert_eq(pw_idx_write(p1, PW_U8, &is, img), PW_OK);
    cr_assert_eq(pw_idx_write(p2, PW_U8, &ls, lab), PW_OK);
    snprintf(spec, sizeof spec, "fashion-mnist:%s", dir);
    cr_assert_eq(pw_dataset_from_spec(spec, 0, &d), PW_OK, "%s", pw_last_error());
    cr_assert_str_eq(d->name, "fashion-mnist/test");
    pw_dataset_destroy(d);
    cr_assert_eq(pw_dataset_from_spec(spec, 1, &d), PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "train-images-idx3-ubyte"), "%s", pw_last_error());
}

/* ---------------------------------------------------------------- synthetic */

Test(dataset, synthetic_is_deterministic_and_learnable)
{
    pw_synthetic_config c = {.n = 600, .sample_shape = {2, {4, 8}}, .n_classes = 4,
                             .seed = 42, .noise = 0.5f};
    pw_dataset *a, *b, *t, *o;
    cr_assert_eq(pw_dataset_synthetic(&c, &a), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_dataset_synthetic(&c, &b), PW_OK);
    cr_assert_eq(memcmp(a->x, b->x, sizeof(float) * 600 * 32), 0);
    cr_assert_eq(memcmp(a->y, b->y, sizeof(int32_t) * 600), 0);
    c.test = 1;
    cr_assert_eq(pw_dataset_synthetic(&c, &t), PW_OK);
    cr_assert_neq(memcmp(a->x, t->x, sizeof(float) * 600 * 32), 0, "test split differs");
    c.test = 0;
    c.seed = 43;
    cr_assert_eq(pw_dataset_synthetic(&c, &o), PW_OK);
    cr_assert_neq(memcmp(a->x, o->x, sizeof(float) * 600 * 32), 0, "seed matters");
    pw_dataset_destroy(o);

    /* every class appears; nearest class mean (from train) classifies the
     * test split well: the task is learnable and the splits share classes */
    double mean[4][32] = {{0}};
    int cnt[4] = {0};
    for (int i = 0; i < 600; i++) {
        cr_assert(a->y[i] >= 0 && a->y[i] < 4);
        cnt[a->y[i]]++;
        for (int j = 0; j < 32; j++) mean[a->y[i]][j] += a->x[i * 32 + j];
    }
    for (int k = 0; k < 4; k++) {
        cr_assert_gt(cnt[k], 100);
        for (int j = 0; j < 32; j++) mean[k][j] /= cnt[k];
    }
    int correct = 0;
    for (int i = 0; i < 600; i++) {
        int best = 0;
        double bd = 1e30;
        for (int k = 0; k < 4; k++) {
            double dd = 0;
            for (int j = 0; j < 32; j++) {
                double e = t->x[i * 32 + j] - mean[k][j];
                dd += e * e;
            }
            if (dd < bd) bd = dd, best = k;
        }
        correct += best == t->y[i];
    }
    cr_assert_gt(correct, 570, "nearest-mean accuracy %d/600", correct);

    pw_synthetic_config bad = c;
    bad.n_classes = 1;
    cr_assert_eq(pw_dataset_synthetic(&bad, &o), PW_ERR_INVALID_ARG);
    bad = c;
    bad.noise = -1;
    cr_assert_eq(pw_dataset_synthetic(&bad, &o), PW_ERR_INVALID_ARG);
    bad = c;
    bad.sample_shape.ndim = 0;
    cr_assert_eq(pw_dataset_synthetic(&bad, &o), PW_ERR_INVALID_ARG);
    cr_assert_null(o);

    pw_dataset_destroy(a);
    pw_dataset_destroy(b);
    pw_dataset_destroy(t);
    pw_dataset_destroy(NULL);
}

Test(dataset, gather)
{
    pw_synthetic_config c = {.n = 10, .sample_shape = {1, {3}}, .n_classes = 3, .seed = 1,
                             .noise = 1};
    pw_dataset *d;
    cr_assert_eq(pw_dataset_synthetic(&c, &d), PW_OK);
    int64_t idx[3] = {9, 0, 9};
    float x[9];
    int32_t y[3];
    cr_assert_eq(pw_dataset_gather(d, idx, 3, x, y), PW_OK);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(y[i], d->y[idx[i]]);
        cr_assert_eq(memcmp(x + 3 * i, d->x + 3 * idx[i], 12), 0);
    }
    cr_assert_eq(pw_dataset_gather(d, idx, 3, x, NULL), PW_OK);
    idx[1] = 10;
    cr_assert_eq(pw_dataset_gather(d, idx, 3, x, y), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "sample index 10 (batch position 1) out of range [0, 10)"),
              "%s", pw_last_error());
    pw_dataset_destroy(d);
}

/* ---------------------------------------------------------------- token shards */

/* A shard as llm.c's write_datafile writes one, built here from the format
 * (not by the reader's code): 256 little-endian int32 (magic, version, count,
 * zeros), then the ids little-endian, 2 or 4 bytes each. `count` is what the
 * header says (TRUE_N: n). */
#define TRUE_N INT64_MIN
static void write_shard(const char *path, int32_t magic, int32_t version, int width, const uint32_t *ids,
                        int64_t n, int64_t count)
{
    size_t bytes = 1024 + (size_t)n * (size_t)width;
    unsigned char *b = calloc(1, bytes);
    const uint32_t head[3] = {(uint32_t)magic, (uint32_t)version, (uint32_t)(count == TRUE_N ? n : count)};
    for (int k = 0; k < 3; k++)
        for (int j = 0; j < 4; j++) b[4 * k + j] = (unsigned char)(head[k] >> (8 * j));
    for (int64_t i = 0; i < n; i++)
        for (int j = 0; j < width; j++) b[1024 + i * width + j] = (unsigned char)(ids[i] >> (8 * j));
    spit(path, b, bytes);
    free(b);
}

static void gpt2_shard(const char *name, const uint32_t *ids, int64_t n)
{
    write_shard(tpath(name), PW_TOKENS_MAGIC_GPT2, 1, 2, ids, n, TRUE_N);
}

/* The stream the tests cut: ids that differ at every position. */
static uint32_t stream_id(int64_t i) { return (uint32_t)((i * 7919 + 13) % 50257); }

/* Checks every window of d against stream ids [from, ...). */
static void expect_windows(const pw_dataset *d, int64_t from, int64_t T)
{
    int32_t *x = malloc(sizeof(int32_t) * (size_t)T), *y = malloc(sizeof(int32_t) * (size_t)T);
    for (int64_t i = 0; i < d->n; i++) {
        cr_assert_eq(pw_dataset_gather(d, &i, 1, x, y), PW_OK, "%s", pw_last_error());
        for (int64_t t = 0; t < T; t++) {
            cr_assert_eq((uint32_t)x[t], stream_id(from + i * T + t), "window %lld, input %lld", (long long)i,
                         (long long)t);
            cr_assert_eq((uint32_t)y[t], stream_id(from + i * T + t + 1), "window %lld, label %lld", (long long)i,
                         (long long)t);
        }
    }
    free(x);
    free(y);
}

Test(dataset, tokens_glob_of_shards_is_one_stream_split_like_text)
{
    /* Three GPT-2 shards of 300, 0 and 700 ids, named so that byte order is
     * not the order of creation; an empty shard is valid. */
    uint32_t ids[1000];
    for (int i = 0; i < 1000; i++) ids[i] = stream_id(i);
    gpt2_shard("c_000002.bin", ids + 300, 700);
    gpt2_shard("c_000000.bin", ids, 300);
    gpt2_shard("c_000001.bin", ids, 0);
    char pattern[300];
    snprintf(pattern, sizeof pattern, "%s/c_*.bin", tmpdir);
    const int64_t T = 16;
    pw_tokens_config tc = {.train = pattern, .context = T};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_OK, "%s", pw_last_error());
    /* Training split: the first 1000 - 100 ids, (900 - 1) / 16 windows. */
    cr_assert_eq(d->n, 56);
    cr_assert_eq(d->sample_numel, T);
    cr_assert_eq(d->label_numel, T);
    cr_assert_eq(d->x_dtype, PW_I32);
    cr_assert_eq(d->token_width, 2);
    cr_assert_eq(d->missing, 0u);
    cr_assert_eq(d->text_len, 56 * 16 + 1);
    expect_windows(d, 0, T); /* window 18 spans shards 0 and 2 */
    uint32_t top_in = 0, top_label = 0;
    for (int i = 0; i < 56 * 16; i++) top_in = ids[i] > top_in ? ids[i] : top_in;
    for (int i = 1; i <= 56 * 16; i++) top_label = ids[i] > top_label ? ids[i] : top_label;
    cr_assert_eq(d->n_tokens, (int)top_in + 1);
    cr_assert_eq(d->n_classes, (int)top_label + 1);
    cr_assert(strstr(d->name, "c_*.bin/train"), "%s", d->name);
    cr_assert_gt(pw_dataset_unigram_entropy(d), 0.0);
    pw_dataset_destroy(d);

    /* Held-out split: the last floor(1000 / 10) ids. */
    tc.test = 1;
    cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, (100 - 1) / 16);
    expect_windows(d, 900, T);
    pw_dataset_destroy(d);

    /* No side wanted (a middle stage under mpirun): headers only. */
    tc.missing = PW_DATA_ALL;
    cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, (100 - 1) / 16);
    cr_assert_null(d->tokens);
    cr_assert_eq(d->loaded_bytes, 0);
    int64_t i0 = 0;
    int32_t x[16];
    cr_assert_eq(pw_dataset_gather(d, &i0, 1, x, NULL), PW_ERR_INVALID_ARG);
    pw_dataset_destroy(d);
}

Test(dataset, tokens_heldout_shards_and_llama3_ids)
{
    /* llm.c's naming: the *_val_* shard is the held-out split, whole. */
    uint32_t ids[600];
    for (int i = 0; i < 600; i++) ids[i] = 100000 + (uint32_t)i * 37; /* above uint16 */
    write_shard(tpath("l3_train_000001.bin"), PW_TOKENS_MAGIC_LLAMA3, 7, 4, ids, 500, TRUE_N);
    write_shard(tpath("l3_val_000000.bin"), PW_TOKENS_MAGIC_LLAMA3, 7, 4, ids + 500, 100, TRUE_N);
    char tr[300], va[300], both[300];
    snprintf(tr, sizeof tr, "%s/l3_train_*.bin", tmpdir);
    snprintf(va, sizeof va, "%s/l3_val_*.bin", tmpdir);
    snprintf(both, sizeof both, "%s/l3_*.bin", tmpdir);
    pw_tokens_config tc = {.train = tr, .heldout = va, .context = 8};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, (500 - 1) / 8);
    cr_assert_eq(d->token_width, 4);
    int64_t last = d->n - 1;
    int32_t x[8], y[8];
    cr_assert_eq(pw_dataset_gather(d, &last, 1, x, y), PW_OK);
    cr_assert_eq(x[0], (int32_t)ids[last * 8]);
    cr_assert_eq(y[7], (int32_t)ids[last * 8 + 8]);
    pw_dataset_destroy(d);
    tc.test = 1;
    cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, (100 - 1) / 8);
    int64_t first = 0;
    cr_assert_eq(pw_dataset_gather(d, &first, 1, x, y), PW_OK);
    cr_assert_eq(x[0], (int32_t)ids[500]);
    cr_assert(strstr(d->name, "l3_val_*.bin/test"), "%s", d->name);
    pw_dataset_destroy(d);

    /* One pattern over both: refused, so validation ids are never trained on. */
    pw_tokens_config mix = {.train = both, .context = 8};
    d = (pw_dataset *)0x1;
    cr_assert_eq(pw_dataset_load_tokens(&mix, &d), PW_ERR_INVALID_ARG);
    cr_assert_null(d);
    cr_assert(strstr(pw_last_error(), "l3_train_000001.bin") && strstr(pw_last_error(), "l3_val_000000.bin") &&
              strstr(pw_last_error(), "tokens:TRAIN,HELDOUT"), "%s", pw_last_error());

    /* The --data spec, with the graph's context. */
    const char *gt = "input t : i32[8]\nlabel n : i32[8]\n"
                     "e = embedding(t, vocab=128256, dim=4) as wte\n"
                     "l = linear(e, out=128256, bias=false, weight=wte.weight)\n"
                     "loss = softmax_cross_entropy(l, n)\n";
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(gt, strlen(gt), "l3.graph", &g), PW_OK, "%s", pw_last_error());
    char spec[700];
    snprintf(spec, sizeof spec, "tokens:%s,%s", tr, va);
    cr_assert_eq(pw_dataset_spec_has_test(spec), 1);
    cr_assert_eq(pw_dataset_from_spec_for_graph(spec, 0, g, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n, (100 - 1) / 8);
    cr_assert_eq(pw_dataset_check_graph(g, d), PW_OK, "%s", pw_last_error());
    pw_dataset_destroy(d);
    cr_assert_eq(pw_dataset_from_spec(spec, 1, &d), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "pw_dataset_from_spec_for_graph"), "%s", pw_last_error());
    const char *bad[] = {"tokens:", "tokens:,x", "tokens:a,", "tokens:a,b,c"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        cr_expect_neq(pw_dataset_from_spec_for_graph(bad[i], 1, g, &d), PW_OK, "'%s'", bad[i]);
        cr_expect_null(d);
    }
    pw_graph_destroy(g);
}

Test(dataset, tokens_outside_the_vocabulary_are_named_by_shard_and_position)
{
    const char *gt = "input t : i32[4]\nlabel n : i32[4]\n"
                     "e = embedding(t, vocab=300, dim=4) as wte\n"
                     "l = linear(e, out=300, bias=false, weight=wte.weight)\n"
                     "loss = softmax_cross_entropy(l, n)\n";
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(gt, strlen(gt), "v300.graph", &g), PW_OK, "%s", pw_last_error());
    uint32_t ids[200];
    for (int i = 0; i < 200; i++) ids[i] = (uint32_t)(i * 13) % 300;
    gpt2_shard("v_000000.bin", ids, 100);
    ids[100 + 42] = 50256; /* <|endoftext|> of GPT-2, outside vocabulary 300 */
    gpt2_shard("v_000001.bin", ids + 100, 100);
    char pattern[300];
    snprintf(pattern, sizeof pattern, "%s/v_*.bin", tmpdir);
    pw_tokens_config tc = {.train = pattern, .context = 4};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(d->n_tokens, 50257);
    cr_assert_eq(pw_dataset_check_graph(g, d), PW_ERR_SHAPE);
    char want[400];
    snprintf(want, sizeof want, "%s/v_000001.bin: token 50256 at position 42 (byte %d) is outside the "
             "vocabulary of v300.graph:3:5 (embedding vocab=300", tmpdir, 1024 + 2 * 42);
    cr_assert(strstr(pw_last_error(), want), "expected '%s' in: %s", want, pw_last_error());
    pw_dataset_destroy(d);
    /* The first of several, whatever its size. */
    ids[100 + 7] = 300;
    gpt2_shard("v_000001.bin", ids + 100, 100);
    cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_dataset_check_graph(g, d), PW_ERR_SHAPE);
    cr_assert(strstr(pw_last_error(), "v_000001.bin: token 300 at position 7 (byte 1038)"), "%s", pw_last_error());
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(dataset, tokens_bad_input_is_an_error_naming_file_and_place)
{
    uint32_t ids[64];
    for (int i = 0; i < 64; i++) ids[i] = (uint32_t)i;
    unsigned char junk[2000];
    memset(junk, 'x', sizeof junk);
    struct {
        const char *name;
        int kind;            /* 0 GPT-2 shard, 1 llama-3 shard, 2 `raw` bytes of junk,
                                3 a GPT-2 shard cut to `raw` bytes */
        int32_t magic, version;
        int64_t n, count;    /* ids written, what the header says */
        size_t raw;
        uint32_t bad_id;     /* (optional) id 10 */
        pw_status st;
        const char *msg;
    } cases[] = {
        {"empty.bin", 2, 0, 0, 0, 0, 0, 0, PW_ERR_FORMAT, "empty.bin: truncated header: the file has 0 bytes"},
        {"short.bin", 3, PW_TOKENS_MAGIC_GPT2, 1, 64, TRUE_N, 1000, 0, PW_ERR_FORMAT,
         "short.bin: truncated header: the file has 1000 bytes, the header alone 1024"},
        {"junk.bin", 2, 0, 0, 0, 0, 2000, 0, PW_ERR_FORMAT, "junk.bin: bad magic: 2021161080 at byte 0"},
        {"version.bin", 0, PW_TOKENS_MAGIC_GPT2, 7, 64, TRUE_N, 0, 0, PW_ERR_FORMAT,
         "version.bin: unsupported version: 7 at byte 4 (magic 20240520 is version 1)"},
        {"l3version.bin", 1, PW_TOKENS_MAGIC_LLAMA3, 1, 64, TRUE_N, 0, 0, PW_ERR_FORMAT,
         "l3version.bin: unsupported version: 1 at byte 4 (magic 20240801 is version 7)"},
        {"negative.bin", 0, PW_TOKENS_MAGIC_GPT2, 1, 64, -3, 0, 0, PW_ERR_FORMAT,
         "negative.bin: negative token count: -3 at byte 8"},
        {"truncated.bin", 0, PW_TOKENS_MAGIC_GPT2, 1, 64, 65, 0, 0, PW_ERR_FORMAT,
         "truncated.bin: token count does not match the file size: 65 tokens at byte 8 make 1154 bytes with "
         "the header, the file has 1152 (truncated)"},
        {"trailing.bin", 0, PW_TOKENS_MAGIC_GPT2, 1, 64, 60, 0, 0, PW_ERR_FORMAT, "(trailing bytes)"},
        {"huge.bin", 0, PW_TOKENS_MAGIC_GPT2, 1, 64, INT32_MAX, 0, 0, PW_ERR_FORMAT,
         "huge.bin: token count does not match the file size: 2147483647 tokens"},
        {"bigid.bin", 1, PW_TOKENS_MAGIC_LLAMA3, 7, 64, TRUE_N, 0, 0xFFFFFFFFu, PW_ERR_FORMAT,
         "bigid.bin: token id too large: 4294967295 at position 10 (byte 1064)"},
        {"tiny.bin", 0, PW_TOKENS_MAGIC_GPT2, 1, 5, TRUE_N, 0, 0, PW_ERR_INVALID_ARG,
         "the training split has 5 tokens but a window of context 8 needs at least 9"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *path = tpath(cases[i].name);
        if (cases[i].kind == 2) {
            spit(path, junk, cases[i].raw);
        } else if (cases[i].kind == 3) {
            size_t len;
            write_shard(path, cases[i].magic, cases[i].version, 2, ids, cases[i].n, cases[i].count);
            unsigned char *b = slurp(path, &len);
            spit(path, b, cases[i].raw);
            free(b);
        } else {
            uint32_t v[64];
            memcpy(v, ids, sizeof v);
            if (cases[i].bad_id) v[10] = cases[i].bad_id;
            write_shard(path, cases[i].magic, cases[i].version, cases[i].kind ? 4 : 2, v, cases[i].n,
                        cases[i].count);
        }
        pw_tokens_config tc = {.train = path, .context = 8};
        pw_dataset *d = (pw_dataset *)0x1;
        pw_status st = pw_dataset_load_tokens(&tc, &d);
        cr_expect_eq(st, cases[i].st, "%s: status %d, %s", cases[i].name, st, pw_last_error());
        cr_expect_null(d, "%s", cases[i].name);
        cr_expect(strstr(pw_last_error(), cases[i].msg), "%s: expected '%s' in: %s", cases[i].name,
                  cases[i].msg, pw_last_error());
        if (d && d != (pw_dataset *)0x1) pw_dataset_destroy(d);
    }

    /* Names that do not resolve, shards of two formats. */
    char p[600];
    pw_dataset *d = NULL;
    struct { const char *pattern; pw_status st; const char *msg; } names[] = {
        {"nomatch_*.bin", PW_ERR_IO, "no file matches"},
        {"nodir/x_*.bin", PW_ERR_IO, "no file matches ("},
        {"missing.bin", PW_ERR_IO, "missing.bin: No such file or directory"},
        {"", PW_ERR_IO, "is a directory"},
        {"mixed_*.bin", PW_ERR_FORMAT, "mixed_b.bin: a llama-3 (uint32 ids) shard after"},
    };
    write_shard(tpath("mixed_a.bin"), PW_TOKENS_MAGIC_GPT2, 1, 2, ids, 64, TRUE_N);
    write_shard(tpath("mixed_b.bin"), PW_TOKENS_MAGIC_LLAMA3, 7, 4, ids, 64, TRUE_N);
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(p, sizeof p, "%s/%s", tmpdir, names[i].pattern);
        if (!names[i].pattern[0]) p[strlen(p) - 1] = '\0'; /* the directory itself */
        pw_tokens_config tc = {.train = p, .context = 8};
        cr_expect_eq(pw_dataset_load_tokens(&tc, &d), names[i].st, "%s: %s", p, pw_last_error());
        cr_expect_null(d);
        cr_expect(strstr(pw_last_error(), names[i].msg), "%s: expected '%s' in: %s", p, names[i].msg,
                  pw_last_error());
    }
    pw_tokens_config tc = {.train = tpath("mixed_a.bin"), .context = 0};
    cr_expect_eq(pw_dataset_load_tokens(&tc, &d), PW_ERR_INVALID_ARG);
    cr_expect(strstr(pw_last_error(), "context must be >= 1 (got 0)"), "%s", pw_last_error());
    tc.context = INT64_MAX;
    cr_expect_eq(pw_dataset_load_tokens(&tc, &d), PW_ERR_INVALID_ARG);
    cr_expect(strstr(pw_last_error(), "needs at least 9223372036854775808"), "%s", pw_last_error());
    cr_expect_eq(pw_dataset_load_tokens(NULL, &d), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_dataset_load_tokens(&tc, NULL), PW_ERR_INVALID_ARG);
}

Test(dataset, tokens_truncation_at_every_byte)
{
    uint32_t ids[40];
    for (int i = 0; i < 40; i++) ids[i] = (uint32_t)i * 1000;
    write_shard(tpath("whole.bin"), PW_TOKENS_MAGIC_GPT2, 1, 2, ids, 40, TRUE_N);
    size_t len;
    unsigned char *b = slurp(tpath("whole.bin"), &len);
    for (size_t n = 0; n < len; n++) {
        spit(tpath("cut.bin"), b, n);
        pw_tokens_config tc = {.train = tpath("cut.bin"), .context = 4};
        pw_dataset *d = (pw_dataset *)0x1;
        cr_assert_eq(pw_dataset_load_tokens(&tc, &d), PW_ERR_FORMAT, "%zu bytes: %s", n, pw_last_error());
        cr_assert_null(d);
        cr_assert(strstr(pw_last_error(), "cut.bin: "), "%s", pw_last_error());
    }
    free(b);
}

/* ---------------------------------------------------------------- sampler */

static int is_permutation(const int64_t *o, int64_t n)
{
    char *seen = calloc((size_t)n, 1);
    int ok = 1;
    for (int64_t i = 0; i < n && ok; i++) {
        if (o[i] < 0 || o[i] >= n || seen[o[i]]) ok = 0;
        else seen[o[i]] = 1;
    }
    free(seen);
    return ok;
}

Test(sampler, sequential_by_default)
{
    pw_sampler s;
    cr_assert_eq(pw_sampler_init(&s, 10, 0, 99), PW_OK);
    for (int e = 0; e < 3; e++) {
        pw_sampler_epoch(&s, e);
        for (int64_t i = 0; i < 10; i++) cr_assert_eq(s.order[i], i);
    }
    cr_assert_eq(pw_sampler_batches(&s, 3), 3, "remainder dropped");
    cr_assert_eq(pw_sampler_batches(&s, 10), 1);
    cr_assert_eq(pw_sampler_batches(&s, 11), 0);
    cr_assert_eq(pw_sampler_batches(&s, 0), 0);
    cr_assert_eq(pw_sampler_batch(&s, 2, 3)[0], 6);
    cr_assert_null(pw_sampler_batch(&s, 3, 3));
    pw_sampler_free(&s);
    pw_sampler_free(&s);
    cr_assert_eq(pw_sampler_init(&s, 0, 0, 0), PW_ERR_INVALID_ARG);
}

Test(sampler, shuffle_is_a_reproducible_permutation_per_epoch)
{
    enum { N = 1000 };
    pw_sampler a, b, c;
    cr_assert_eq(pw_sampler_init(&a, N, 1, 7), PW_OK);
    cr_assert_eq(pw_sampler_init(&b, N, 1, 7), PW_OK);
    cr_assert_eq(pw_sampler_init(&c, N, 1, 8), PW_OK);
    int64_t e0[N];
    pw_sampler_epoch(&a, 0);
    memcpy(e0, a.order, sizeof e0);
    cr_assert(is_permutation(a.order, N));
    int fixed = 0;
    for (int i = 0; i < N; i++) fixed += a.order[i] == i;
    cr_assert_lt(fixed, 10, "actually shuffled (%d fixed points)", fixed);

    /* any sampler can jump straight to an epoch */
    pw_sampler_epoch(&a, 1);
    cr_assert(is_permutation(a.order, N));
    cr_assert_neq(memcmp(a.order, e0, sizeof e0), 0, "epochs differ");
    pw_sampler_epoch(&b, 1);
    cr_assert_eq(memcmp(a.order, b.order, sizeof e0), 0, "same seed, same order");
    pw_sampler_epoch(&b, 0);
    cr_assert_eq(memcmp(b.order, e0, sizeof e0), 0, "epoch 0 again");
    pw_sampler_epoch(&c, 0);
    cr_assert_neq(memcmp(c.order, e0, sizeof e0), 0, "seed matters");
    cr_assert_eq(a.epoch, 1);

    /* the order is a pure function of (n, seed, epoch); pin one value so an
     * accidental change to the stream (which would change every run's data
     * order) fails here */
    pw_sampler s;
    cr_assert_eq(pw_sampler_init(&s, 5, 1, 0), PW_OK);
    pw_sampler_epoch(&s, 3);
    const int64_t pinned[5] = {2, 1, 4, 3, 0};
    cr_assert_eq(memcmp(pinned, s.order, sizeof pinned), 0, "got %lld %lld %lld %lld %lld",
                 (long long)s.order[0], (long long)s.order[1], (long long)s.order[2],
                 (long long)s.order[3], (long long)s.order[4]);
    pw_sampler_free(&s);
    pw_sampler_free(&a);
    pw_sampler_free(&b);
    pw_sampler_free(&c);
}

/* Shuffles are uniform enough: each position sees each value about equally. */
Test(sampler, shuffle_is_unbiased)
{
    enum { N = 4, E = 24000 };
    pw_sampler s;
    cr_assert_eq(pw_sampler_init(&s, N, 1, 5), PW_OK);
    int cnt[N][N] = {{0}};
    for (int e = 0; e < E; e++) {
        pw_sampler_epoch(&s, e);
        for (int i = 0; i < N; i++) cnt[i][s.order[i]]++;
    }
    for (int i = 0; i < N; i++)
        for (int v = 0; v < N; v++)
            cr_assert(cnt[i][v] > E / N - 400 && cnt[i][v] < E / N + 400,
                      "position %d value %d: %d", i, v, cnt[i][v]);
    pw_sampler_free(&s);
}

/* ------------------------------------------------------------ tmpfile */

/* A writer thread doing atomic writes in a loop, as the background
 * checkpoint writer does; `dead` set, it stops touching anything (the
 * process has _exited under it). */
static atomic_int writer_dead, writer_created;
static void *writer_loop(void *arg)
{
    (void)arg;
    for (int i = 0;; i++) {
        char path[128], tmp[160];
        snprintf(path, sizeof path, "%s/f%d", tmpdir, i % 4);
        pw_tmpfile_name(path, tmp, sizeof tmp);
        const int slot = pw_tmpfile_register(tmp);
        const int fd = pw_tmpfile_create(slot, tmp);
        if (fd < 0) {
            if (errno != ECANCELED) _exit(4); /* (in the forked child: no Criterion here) */
            pw_tmpfile_forget(slot);
            return NULL;
        }
        atomic_fetch_add(&writer_created, 1);
        if (write(fd, "x", 1) != 1) _exit(5);
        if (atomic_load(&writer_dead)) return NULL; /* killed mid-write: leaves what it had */
        close(fd);
        unlink(tmp);
        pw_tmpfile_forget(slot);
    }
}

static int files_in(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

/* A second signal's abort, with a writer thread creating temp files all
 * the while: nothing is left behind, whichever point of its write the
 * writer was at, and no file is created after it. (With a plain open(2)
 * in place of pw_tmpfile_create, the writer's next file, created after the
 * unlink, stayed.) */
Test(tmpfile, an_abort_leaves_no_temp_file_of_another_thread)
{
    for (int round = 0; round < 20; round++) {
        atomic_store(&writer_dead, 0);
        atomic_store(&writer_created, 0);
        pid_t pid = fork(); /* the abort is for good: one process per round */
        cr_assert_geq(pid, 0);
        if (pid == 0) {
            pthread_t th;
            if (pthread_create(&th, NULL, writer_loop, NULL)) _exit(3);
            while (atomic_load(&writer_created) < 1 + round * 7) sched_yield();
            pw_tmpfile_abort_all();
            atomic_store(&writer_dead, 1);
            pthread_join(th, NULL);
            _exit(files_in(tmpdir) == 0 ? 0 : 1);
        }
        int status;
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "round %d: a temp file was left behind", round);
    }
}

Test(tmpfile, no_create_after_an_abort)
{
    char path[128], tmp[160];
    snprintf(path, sizeof path, "%s/x", tmpdir);
    pw_tmpfile_name(path, tmp, sizeof tmp);
    int slot = pw_tmpfile_register(tmp);
    int fd = pw_tmpfile_create(slot, tmp);
    cr_assert_geq(fd, 0, "%s", strerror(errno));
    close(fd);
    cr_assert_eq(pw_tmpfile_abort_all(), 1);
    cr_assert_eq(access(tmp, F_OK), -1, "the registered temp file is still there");
    pw_tmpfile_forget(slot);
    slot = pw_tmpfile_register(tmp);
    cr_assert_eq(pw_tmpfile_create(slot, tmp), -1);
    cr_assert_eq(errno, ECANCELED);
    cr_assert_eq(access(tmp, F_OK), -1);
    pw_tmpfile_forget(slot);
}
