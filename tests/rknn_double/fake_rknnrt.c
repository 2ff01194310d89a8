/*
 * A test double of Rockchip's librknnrt.so, written from the ABI facts in
 * shared/reference/RKNN_ABI.md. The tests compile it with the system C compiler.
 *
 * What it checks (so a wrong ctypes layout fails a test): struct sizes passed to
 * rknn_query, input/output counts, indices, byte sizes and formats of rknn_input,
 * is_prealloc buffer sizes, context handles.
 *
 * Its "model" is any byte string that starts with "RKNN" and contains a text block
 * that starts with "FAKE-RKNN\n", one directive per line:
 *   chip rk3588|rk3576|rk3566      core-mask rules of that chip
 *   latency_us N                   rknn_run sleeps N us, holding the NPU core(s) it runs on
 *   custom_string TEXT             returned by RKNN_QUERY_CUSTOM_STRING
 *   sdk_version TEXT               api_version of RKNN_QUERY_SDK_VERSION
 *   input NAME TYPE FMT N d0 .. dN-1
 *   output NAME TYPE QNT ZP SCALE A B N d0 .. dN-1     y = A * x + B over input 0's elements
 *   range INPUT N d0 .. dN-1       an allowed shape of a dynamic input (makes the model dynamic)
 *   fail_init CODE                 rknn_init returns CODE
 *   fail_run_value V               rknn_run fails (-1) when input 0's first element equals V
 *   w_align N                      native (zero-copy) rows are padded to a multiple of N elements
 *   mix OUTPUT INPUT COEF          output OUTPUT also adds COEF * input INPUT (e.g. an Add model)
 *   no_mem_fd                      rknn_create_mem reports fd -1 (memory no other context can
 *                                  import; some runtimes allocate that way)
 *   max_contexts N                 rknn_dup_context fails (RKNN_ERR_MALLOC_FAIL) once N contexts
 *                                  share the model (the NPU ran out of memory for another)
 * TYPE/FMT/QNT are the integer enum values of the ABI.
 *
 * Zero copy (rknn_create_mem*, rknn_create_mem_from_fd, rknn_set_io_mem, rknn_mem_sync,
 * rknn_destroy_mem) follows fake_mem.h: non-coherent CPU/NPU views and a violation log.
 * Native attrs: 4-D inputs (NHWC [N,H,W,C]) are NHWC when C is 1, 3 or 4, else NC1HWC2
 * [N,C1,H,W,C2] (C2 = 16 bytes / element size, at most 16); 4-D outputs ([N,C,H,W]) are
 * NC1HWC2, or NHWC through the NATIVE_NHWC queries; rows padded to w_align. The attr given
 * to rknn_set_io_mem must be one of them (NC1HWC2 inputs with pass_through = 1, NHWC inputs
 * of an NC1HWC2-native tensor with pass_through = 0) and the memory must hold
 * size_with_stride bytes. A context whose I/O memory was set is a zero-copy context: the copy
 * calls (rknn_inputs_set, rknn_outputs_get) on it are violations, as is any call on a context
 * while another thread is inside rknn_run on it, or on a context that is not alive (destroyed,
 * or never made: handles are never reused).
 *
 * Counters for leak checks: fake_rknn_counter("contexts"|"dups"|"inits"|"destroys"|
 * "live"|"outputs_alloc"|"outputs_free"|"runs"|"mask_calls"|"shape_calls"|"mems_live"|
 * "mem_creates"|"mem_imports"|"mem_destroys"|"syncs_to"|"syncs_from"|"set_io"|"zc_runs"),
 * fake_rknn_violations(buf, size) (count, and the log), fake_rknn_reset().
 */
#include "fake_mem.h"
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef __arm__
typedef uint32_t rknn_context;
#else
typedef uint64_t rknn_context;
#endif

typedef struct { uint32_t n_input, n_output; } rknn_input_output_num;

typedef struct {
    uint32_t index, n_dims, dims[16];
    char name[256];
    uint32_t n_elems, size;
    int fmt, type, qnt_type;
    int8_t fl;
    int32_t zp;
    float scale;
    uint32_t w_stride, size_with_stride;
    uint8_t pass_through;
    uint32_t h_stride;
} rknn_tensor_attr;

typedef struct {
    uint32_t index, shape_number;
    int fmt;
    char name[256];
    uint32_t dyn_range[512][16];
    uint32_t n_dims;
} rknn_input_range;

typedef struct { char api_version[256], drv_version[256]; } rknn_sdk_version;
typedef struct { char string[1024]; } rknn_custom_string;

typedef struct {
    uint32_t index;
    void *buf;
    uint32_t size;
    uint8_t pass_through;
    int type, fmt;
} rknn_input;

typedef struct {
    uint8_t want_float, is_prealloc;
    uint32_t index;
    void *buf;
    uint32_t size;
} rknn_output;

typedef struct {
    rknn_context ctx;
    int32_t real_model_offset;
    uint32_t real_model_size;
    int32_t model_buffer_fd;
    uint32_t model_buffer_flags;
    uint8_t reserved[112];
} rknn_init_extend;

typedef struct {
    void *virt_addr;
    uint64_t phys_addr;
    int32_t fd, offset;
    uint32_t size, flags;
    void *priv_data;
} rknn_tensor_mem;

/* The version marker a string scan of the library finds (kept by the linker: used). */
const char fake_rknn_version_marker[] = "librknnrt version: 0.0.0 (fake@2026-11-24T00:00:00)";

/* The header's sizes on each ABI (RKNN_ABI.md §3.2; 32-bit ARM: 4-byte pointers and context,
 * 8-byte-aligned 64-bit integers, which gcc -m32 -malign-double reproduces on x86). */
_Static_assert(sizeof(rknn_tensor_attr) == 376, "rknn_tensor_attr");
_Static_assert(sizeof(rknn_input_range) == 33040, "rknn_input_range");
_Static_assert(sizeof(rknn_tensor_mem) == 40, "rknn_tensor_mem");
#if UINTPTR_MAX == 0xffffffffffffffffu
_Static_assert(sizeof(rknn_input) == 32, "rknn_input");
_Static_assert(sizeof(rknn_output) == 24, "rknn_output");
_Static_assert(sizeof(rknn_init_extend) == 136, "rknn_init_extend");
#else
_Static_assert(sizeof(rknn_input) == 24, "rknn_input (32-bit)");
_Static_assert(sizeof(rknn_output) == 16, "rknn_output (32-bit)");
#ifdef __arm__
_Static_assert(sizeof(rknn_init_extend) == 132, "rknn_init_extend (32-bit ARM)");
#endif
#endif

#define MAX_IO 8
#define MAX_RANGES 8
#define MAX_MIX 8

typedef struct {
    char chip[16];
    long latency_us;
    char custom_string[1024];
    char sdk_version[256];
    int n_in, n_out;
    rknn_tensor_attr in[MAX_IO], out[MAX_IO];
    float a[MAX_IO], b[MAX_IO];
    int n_mix, mix_out[MAX_MIX], mix_in[MAX_MIX];
    float mix_coef[MAX_MIX];
    int n_ranges[MAX_IO];
    uint32_t ranges[MAX_IO][MAX_RANGES][16];
    int fail_init;
    int has_fail_value;
    float fail_value;
    uint32_t w_align;
    int no_mem_fd;
    int max_contexts;
} model_t;

typedef struct ctx_s {
    rknn_context handle;
    model_t *model; /* shared by dups and weight-sharing slaves: refcounted below */
    int *model_refs;
    int core_mask;
    int inputs_ready;
    float *x[MAX_IO]; /* each input as float, in the model's own (attr) element order */
    uint32_t x_elems[MAX_IO];
    rknn_tensor_attr cur_in[MAX_IO];
    int zero_copy; /* rknn_set_io_mem was called on it */
    fm_mem *in_mem[MAX_IO], *out_mem[MAX_IO];
    rknn_tensor_attr in_attr[MAX_IO], out_attr[MAX_IO];
    int busy; /* a thread is inside rknn_run */
    struct ctx_s *next;
} ctx_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t core_lock[3] = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                                       PTHREAD_MUTEX_INITIALIZER};
static ctx_t *contexts;
static rknn_context next_handle = 0x1000;
static long counters[32];
static const char *counter_names[] = {
    "contexts",   "dups",        "inits",       "destroys",     "live",      "outputs_alloc",
    "outputs_free", "runs",      "mask_calls",  "shape_calls",  "mems_live", "mem_creates",
    "mem_imports", "mem_destroys", "syncs_to",  "syncs_from",   "set_io",    "zc_runs",
    NULL};
enum { C_CONTEXTS, C_DUPS, C_INITS, C_DESTROYS, C_LIVE, C_OUT_ALLOC, C_OUT_FREE, C_RUNS,
       C_MASK, C_SHAPE, C_MEMS_LIVE, C_MEM_CREATES, C_MEM_IMPORTS, C_MEM_DESTROYS, C_SYNC_TO,
       C_SYNC_FROM, C_SET_IO, C_ZC_RUNS };

long fake_rknn_counter(const char *name) {
    for (int i = 0; counter_names[i]; i++)
        if (strcmp(counter_names[i], name) == 0) {
            pthread_mutex_lock(&lock);
            long value = counters[i];
            pthread_mutex_unlock(&lock);
            return value;
        }
    return -999;
}

long fake_rknn_violations(char *out, long size) {
    pthread_mutex_lock(&lock);
    long n = fm_violations(out, size);
    pthread_mutex_unlock(&lock);
    return n;
}

void fake_rknn_reset(void) {
    pthread_mutex_lock(&lock);
    long live = counters[C_LIVE], mems = counters[C_MEMS_LIVE];
    memset(counters, 0, sizeof(counters));
    counters[C_LIVE] = live; /* what is alive stays counted */
    counters[C_MEMS_LIVE] = mems;
    fm_reset();
    pthread_mutex_unlock(&lock);
}

static int elem_size(int type) {
    switch (type) {
    case 0: case 6: case 7: return 4;
    case 1: case 4: case 5: return 2;
    case 2: case 3: case 9: return 1;
    case 8: return 8;
    default: return 0;
    }
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    float value;
    if (exp == 0) value = ldexpf((float)mant, -24);
    else if (exp == 31) value = mant ? NAN : INFINITY;
    else value = ldexpf((float)(mant | 0x400), (int)exp - 25);
    return sign ? -value : value;
}

static uint16_t float_to_half(float f) { /* round to nearest even; enough for test values */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int exp = (int)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift, rest = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = (uint32_t)(exp << 10) | (mant >> 13), rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

static float read_elem(const void *buf, int type, size_t i) {
    switch (type) {
    case 0: return ((const float *)buf)[i];
    case 1: return half_to_float(((const uint16_t *)buf)[i]);
    case 2: return ((const int8_t *)buf)[i];
    case 3: return ((const uint8_t *)buf)[i];
    case 4: return ((const int16_t *)buf)[i];
    case 5: return ((const uint16_t *)buf)[i];
    case 6: return (float)((const int32_t *)buf)[i];
    case 7: return (float)((const uint32_t *)buf)[i];
    case 8: return (float)((const int64_t *)buf)[i];
    case 9: return ((const uint8_t *)buf)[i] ? 1.0f : 0.0f;
    }
    return 0.0f;
}

static void write_value(void *buf, int type, size_t k, float value) {
    switch (type) {
    case 0: ((float *)buf)[k] = value; break;
    case 1: ((uint16_t *)buf)[k] = float_to_half(value); break;
    case 2: ((int8_t *)buf)[k] = (int8_t)value; break;
    case 3: ((uint8_t *)buf)[k] = (uint8_t)value; break;
    case 4: ((int16_t *)buf)[k] = (int16_t)value; break;
    case 5: ((uint16_t *)buf)[k] = (uint16_t)value; break;
    case 6: ((int32_t *)buf)[k] = (int32_t)value; break;
    case 7: ((uint32_t *)buf)[k] = (uint32_t)value; break;
    case 8: ((int64_t *)buf)[k] = (int64_t)value; break;
    case 9: ((uint8_t *)buf)[k] = value != 0.0f; break;
    default: ((float *)buf)[k] = value; break;
    }
}

static void fill_attr(rknn_tensor_attr *attr, int index, const char *name, int type, int fmt,
                      int n_dims, const uint32_t *dims) {
    memset(attr, 0, sizeof(*attr));
    attr->index = index;
    attr->n_dims = n_dims;
    uint32_t n = 1;
    for (int d = 0; d < n_dims; d++) {
        attr->dims[d] = dims[d];
        n *= dims[d];
    }
    snprintf(attr->name, sizeof(attr->name), "%s", name);
    attr->n_elems = n;
    attr->size = n * elem_size(type);
    attr->size_with_stride = attr->size;
    attr->fmt = fmt;
    attr->type = type;
}

static int parse_model(const char *data, uint32_t size, model_t *m) {
    if (size < 8 || memcmp(data, "RKNN", 4) != 0) return -6;
    const char *start = memmem(data, size, "FAKE-RKNN\n", 10);
    if (!start) return -6;
    size_t len = size - (start - data);
    char *text = strndup(start, len);
    memset(m, 0, sizeof(*m));
    strcpy(m->chip, "rk3588");
    strcpy(m->sdk_version, "2.4.1 (fake@2026-11-24)");
    m->w_align = 1;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char word[32] = {0}, name[256] = {0};
        int consumed = 0, n = 0;
        if (sscanf(line, "%31s %n", word, &consumed) != 1) continue;
        char *rest = line + consumed;
        if (strcmp(word, "chip") == 0) sscanf(rest, "%15s", m->chip);
        else if (strcmp(word, "latency_us") == 0) m->latency_us = atol(rest);
        else if (strcmp(word, "custom_string") == 0) snprintf(m->custom_string, 1024, "%s", rest);
        else if (strcmp(word, "sdk_version") == 0) snprintf(m->sdk_version, 256, "%s", rest);
        else if (strcmp(word, "fail_init") == 0) m->fail_init = atoi(rest);
        else if (strcmp(word, "w_align") == 0) m->w_align = (uint32_t)atoi(rest);
        else if (strcmp(word, "no_mem_fd") == 0) m->no_mem_fd = 1;
        else if (strcmp(word, "max_contexts") == 0) m->max_contexts = atoi(rest);
        else if (strcmp(word, "fail_run_value") == 0) {
            m->has_fail_value = 1;
            m->fail_value = (float)atof(rest);
        } else if (strcmp(word, "mix") == 0 && m->n_mix < MAX_MIX) {
            int k = m->n_mix;
            if (sscanf(rest, "%d %d %f", &m->mix_out[k], &m->mix_in[k], &m->mix_coef[k]) != 3)
                goto bad;
            m->n_mix++;
        } else if (strcmp(word, "input") == 0 && m->n_in < MAX_IO) {
            int type, fmt;
            uint32_t dims[16] = {0};
            if (sscanf(rest, "%255s %d %d %d %n", name, &type, &fmt, &n, &consumed) < 4) goto bad;
            rest += consumed;
            for (int d = 0; d < n && d < 16; d++) dims[d] = (uint32_t)strtoul(rest, &rest, 10);
            fill_attr(&m->in[m->n_in], m->n_in, name, type, fmt, n, dims);
            m->n_in++;
        } else if (strcmp(word, "output") == 0 && m->n_out < MAX_IO) {
            int type, qnt, zp;
            float scale, a, b;
            uint32_t dims[16] = {0};
            if (sscanf(rest, "%255s %d %d %d %f %f %f %d %n", name, &type, &qnt, &zp, &scale, &a,
                       &b, &n, &consumed) < 8)
                goto bad;
            rest += consumed;
            for (int d = 0; d < n && d < 16; d++) dims[d] = (uint32_t)strtoul(rest, &rest, 10);
            rknn_tensor_attr *attr = &m->out[m->n_out];
            fill_attr(attr, m->n_out, name, type, n == 4 ? 0 : 3, n, dims);
            attr->qnt_type = qnt;
            attr->zp = zp;
            attr->scale = scale;
            m->a[m->n_out] = a;
            m->b[m->n_out] = b;
            m->n_out++;
        } else if (strcmp(word, "range") == 0) {
            int input;
            if (sscanf(rest, "%d %d %n", &input, &n, &consumed) < 2 || input >= MAX_IO) goto bad;
            rest += consumed;
            int k = m->n_ranges[input]++;
            for (int d = 0; d < n && d < 16; d++)
                m->ranges[input][k][d] = (uint32_t)strtoul(rest, &rest, 10);
        }
    }
    free(text);
    return m->n_in > 0 && m->n_out > 0 ? 0 : -6;
bad:
    free(text);
    return -6;
}

/* ------------------------------------------------------------------ native attrs */

static uint32_t align_up(uint32_t v, uint32_t a) { return a <= 1 ? v : (v + a - 1) / a * a; }
static uint32_t c2_of(int type) {
    int es = elem_size(type);
    return es >= 16 ? 1 : (uint32_t)(16 / (es ? es : 1));
}

/* Native attr of a 4-D tensor whose logical dims are N,C,H,W: NHWC or NC1HWC2. */
static void make_native(rknn_tensor_attr *a, const model_t *m, uint32_t N, uint32_t C,
                        uint32_t H, uint32_t W, int nhwc) {
    uint32_t ws = align_up(W, m->w_align), es = (uint32_t)elem_size(a->type);
    a->w_stride = ws;
    a->h_stride = 0;
    a->pass_through = 0;
    if (nhwc) {
        a->fmt = 1;
        a->n_dims = 4;
        uint32_t d[4] = {N, H, W, C};
        memcpy(a->dims, d, sizeof(d));
        a->size_with_stride = N * H * ws * C * es;
    } else {
        uint32_t c2 = c2_of(a->type), c1 = (C + c2 - 1) / c2;
        a->fmt = 2;
        a->n_dims = 5;
        uint32_t d[5] = {N, c1, H, W, c2};
        memcpy(a->dims, d, sizeof(d));
        a->size_with_stride = N * c1 * H * ws * c2 * es;
    }
}

static void native_input(const model_t *m, int i, int nhwc_query, rknn_tensor_attr *a) {
    *a = m->in[i];
    if (a->n_dims != 4) return;
    uint32_t N = a->dims[0], H = a->dims[1], W = a->dims[2], C = a->dims[3];
    make_native(a, m, N, C, H, W, nhwc_query || C == 1 || C == 3 || C == 4);
}

static void native_output(const model_t *m, int i, int nhwc_query, rknn_tensor_attr *a) {
    *a = m->out[i];
    if (a->n_dims != 4) return;
    uint32_t N = a->dims[0], C = a->dims[1], H = a->dims[2], W = a->dims[3];
    make_native(a, m, N, C, H, W, nhwc_query);
}

/* Element index of logical (n, c, h, w) in a buffer laid out as `fmt` with the attr's strides;
 * C is the logical channel count. */
static size_t elem_index(int fmt, const rknn_tensor_attr *a, uint32_t C, uint32_t H, uint32_t W,
                         uint32_t n, uint32_t c, uint32_t h, uint32_t w) {
    size_t Wp = a && a->w_stride ? a->w_stride : W, Hp = a && a->h_stride ? a->h_stride : H;
    if (fmt == 1) return ((n * Hp + h) * Wp + w) * C + c;
    if (fmt == 2) {
        size_t C1 = a->dims[1], C2 = a->dims[4];
        return (((n * C1 + c / C2) * Hp + h) * Wp + w) * C2 + c % C2;
    }
    return ((n * (size_t)C + c) * Hp + h) * Wp + w;
}

static int same_attr(const rknn_tensor_attr *given, const rknn_tensor_attr *want) {
    return given->n_dims == want->n_dims &&
           memcmp(given->dims, want->dims, sizeof(uint32_t) * want->n_dims) == 0 &&
           given->fmt == want->fmt && given->type == want->type &&
           given->w_stride == want->w_stride && given->h_stride == want->h_stride &&
           given->size_with_stride == want->size_with_stride;
}

/* ------------------------------------------------------------------ contexts */

static ctx_t *find(rknn_context handle) {
    for (ctx_t *c = contexts; c; c = c->next)
        if (c->handle == handle) return c;
    return NULL;
}

/* find() for a call on a live context that must not overlap a running rknn_run on it. */
static ctx_t *enter(rknn_context handle, const char *api) {
    ctx_t *c = find(handle);
    if (!c)
        fm_violation("%s: context %#llx is not alive (destroyed, or never made)", api,
                     (unsigned long long)handle);
    else if (c->busy)
        fm_violation("%s: context used while another thread is in rknn_run", api);
    return c;
}

static ctx_t *add_context(model_t *model, int *refs) {
    ctx_t *c = calloc(1, sizeof(ctx_t));
    c->model = model;
    c->model_refs = refs;
    (*refs)++;
    memcpy(c->cur_in, model->in, sizeof(c->cur_in));
    c->handle = next_handle += 0x10;
    c->next = contexts;
    contexts = c;
    counters[C_CONTEXTS]++;
    counters[C_LIVE]++;
    return c;
}

int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag,
              rknn_init_extend *extend) {
    if (!context || !model || size == 0) return -5;
    pthread_mutex_lock(&lock);
    ctx_t *master = NULL;
    if (flag & 0x20) { /* RKNN_FLAG_SHARE_WEIGHT_MEM: extend->ctx must be a live context */
        master = extend ? find(extend->ctx) : NULL;
        if (!master) {
            pthread_mutex_unlock(&lock);
            return -7;
        }
    }
    model_t *m = malloc(sizeof(model_t));
    int rc = parse_model((const char *)model, size, m);
    if (rc == 0 && m->fail_init) rc = m->fail_init;
    if (rc != 0) {
        free(m);
        pthread_mutex_unlock(&lock);
        return rc;
    }
    int *refs = calloc(1, sizeof(int));
    ctx_t *c = add_context(m, refs);
    counters[C_INITS]++;
    *context = c->handle;
    pthread_mutex_unlock(&lock);
    return 0;
}

int rknn_dup_context(rknn_context *context_in, rknn_context *context_out) {
    if (!context_in || !context_out) return -5;
    pthread_mutex_lock(&lock);
    ctx_t *src = enter(*context_in, "rknn_dup_context");
    if (!src) {
        pthread_mutex_unlock(&lock);
        return -7;
    }
    if (src->model->max_contexts && *src->model_refs >= src->model->max_contexts) {
        pthread_mutex_unlock(&lock);
        return -4;
    }
    ctx_t *c = add_context(src->model, src->model_refs);
    counters[C_DUPS]++;
    *context_out = c->handle; /* core mask is NOT inherited (as the real runtime) */
    pthread_mutex_unlock(&lock);
    return 0;
}

int rknn_destroy(rknn_context context) {
    pthread_mutex_lock(&lock);
    ctx_t **link = &contexts;
    while (*link && (*link)->handle != context) link = &(*link)->next;
    if (!*link) {
        fm_violation("rknn_destroy: context %#llx is not alive (destroyed twice, or never made)",
                     (unsigned long long)context);
        pthread_mutex_unlock(&lock);
        return -7;
    }
    ctx_t *c = *link;
    if (c->busy) fm_violation("rknn_destroy: context destroyed while a thread is in rknn_run");
    fm_reclaim(context, &counters[C_MEMS_LIVE], "rknn_destroy");
    *link = c->next;
    if (--(*c->model_refs) == 0) {
        free(c->model);
        free(c->model_refs);
    }
    for (int i = 0; i < MAX_IO; i++) free(c->x[i]);
    free(c);
    counters[C_DESTROYS]++;
    counters[C_LIVE]--;
    pthread_mutex_unlock(&lock);
    return 0;
}

static int is_dynamic(const model_t *m) {
    for (int i = 0; i < m->n_in; i++)
        if (m->n_ranges[i] > 0) return 1;
    return 0;
}

int rknn_query(rknn_context context, int cmd, void *info, uint32_t size) {
    pthread_mutex_lock(&lock);
    ctx_t *c = find(context);
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    if (!info) return -5;
    const model_t *m = c->model;
    switch (cmd) {
    case 0: /* IN_OUT_NUM */
        if (size < sizeof(rknn_input_output_num)) return -5;
        ((rknn_input_output_num *)info)->n_input = m->n_in;
        ((rknn_input_output_num *)info)->n_output = m->n_out;
        return 0;
    case 1: case 2: case 14: case 15: { /* (CURRENT_)INPUT/OUTPUT_ATTR */
        if (size < sizeof(rknn_tensor_attr)) return -5;
        rknn_tensor_attr *attr = info;
        int input = cmd == 1 || cmd == 14;
        uint32_t index = attr->index;
        if (index >= (uint32_t)(input ? m->n_in : m->n_out)) return -5;
        if (cmd == 1) *attr = m->in[index];
        else if (cmd == 14) *attr = c->cur_in[index];
        else {
            *attr = m->out[index];
            if (cmd == 15 && is_dynamic(m) && index == 0) {
                /* output 0 of a dynamic model follows input 0's current shape */
                attr->n_dims = c->cur_in[0].n_dims;
                memcpy(attr->dims, c->cur_in[0].dims, sizeof(attr->dims));
                attr->n_elems = c->cur_in[0].n_elems;
                attr->size = attr->n_elems * elem_size(attr->type);
            }
        }
        return 0;
    }
    case 8: case 9: case 10: case 11: { /* NATIVE_(NHWC_)INPUT/OUTPUT_ATTR */
        if (size < sizeof(rknn_tensor_attr)) return -5;
        rknn_tensor_attr *attr = info;
        int input = cmd == 8 || cmd == 10, nhwc = cmd >= 10;
        uint32_t index = attr->index;
        if (index >= (uint32_t)(input ? m->n_in : m->n_out)) return -5;
        if (is_dynamic(m)) return -5; /* keep it simple: static models only */
        if (input) native_input(m, (int)index, nhwc, attr);
        else native_output(m, (int)index, nhwc, attr);
        return 0;
    }
    case 5: /* SDK_VERSION */
        if (size < sizeof(rknn_sdk_version)) return -5;
        snprintf(((rknn_sdk_version *)info)->api_version, 256, "%s", m->sdk_version);
        snprintf(((rknn_sdk_version *)info)->drv_version, 256, "0.9.8");
        return 0;
    case 7: /* CUSTOM_STRING */
        if (size < sizeof(rknn_custom_string)) return -5;
        snprintf(((rknn_custom_string *)info)->string, 1024, "%s", m->custom_string);
        return 0;
    case 13: { /* INPUT_DYNAMIC_RANGE */
        if (size < sizeof(rknn_input_range)) return -5;
        rknn_input_range *range = info;
        uint32_t index = range->index;
        if (index >= (uint32_t)m->n_in) return -5;
        if (!is_dynamic(m)) return -1; /* static model */
        range->shape_number = m->n_ranges[index];
        range->fmt = m->in[index].fmt;
        range->n_dims = m->in[index].n_dims;
        snprintf(range->name, 256, "%s", m->in[index].name);
        memcpy(range->dyn_range, m->ranges[index], sizeof(m->ranges[index]));
        return 0;
    }
    default:
        return -5;
    }
}

int rknn_set_core_mask(rknn_context context, int mask) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_set_core_mask");
    counters[C_MASK]++;
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    const char *chip = c->model->chip;
    if (strcmp(chip, "rk3566") == 0) return -13; /* single-core NPU: not supported */
    int ok = mask == 0 || mask == 1 || mask == 2 || mask == 3 || mask == 0xffff;
    if (strcmp(chip, "rk3588") == 0) ok = ok || mask == 4 || mask == 7;
    if (!ok) return -5;
    c->core_mask = mask;
    return 0;
}

#ifndef FAKE_RKNN_OLD_RUNTIME /* rknn_set_input_shapes arrived in 1.5.2 */
int rknn_set_input_shapes(rknn_context context, uint32_t n_inputs, rknn_tensor_attr attr[]) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_set_input_shapes");
    counters[C_SHAPE]++;
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    const model_t *m = c->model;
    if (!is_dynamic(m)) return -1;
    if (n_inputs != (uint32_t)m->n_in || !attr) return -5;
    for (uint32_t i = 0; i < n_inputs; i++) {
        if (attr[i].fmt != 1 && attr[i].fmt != 3) return -5; /* NHWC or UNDEFINED only */
        int allowed = 0;
        for (int k = 0; k < m->n_ranges[i] && !allowed; k++) {
            allowed = attr[i].n_dims == m->in[i].n_dims;
            for (uint32_t d = 0; d < attr[i].n_dims && allowed; d++)
                allowed = attr[i].dims[d] == m->ranges[i][k][d];
        }
        if (!allowed) return -5;
    }
    for (uint32_t i = 0; i < n_inputs; i++) {
        uint32_t n = 1;
        for (uint32_t d = 0; d < attr[i].n_dims; d++) n *= attr[i].dims[d];
        c->cur_in[i].n_dims = attr[i].n_dims;
        memcpy(c->cur_in[i].dims, attr[i].dims, sizeof(attr[i].dims));
        c->cur_in[i].n_elems = n;
        c->cur_in[i].size = n * elem_size(c->cur_in[i].type);
    }
    return 0;
}

#endif

/* Decode input i (laid out as fmt/strides of `layout`, elements of `type`) into c->x[i], in
 * the model attr's own element order (NHWC for 4-D inputs). */
static void decode_input(ctx_t *c, int i, const void *buf, int type, int fmt,
                         const rknn_tensor_attr *layout) {
    const rknn_tensor_attr *attr = &c->cur_in[i];
    float *x = realloc(c->x[i], (attr->n_elems ? attr->n_elems : 1) * sizeof(float));
    c->x[i] = x;
    c->x_elems[i] = attr->n_elems;
    const uint32_t *d = attr->dims;
    if (attr->n_dims == 4 && attr->fmt == 1 && fmt != 3) {
        uint32_t N = d[0], H = d[1], W = d[2], C = d[3];
        for (uint32_t n = 0; n < N; n++)
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t w = 0; w < W; w++)
                    for (uint32_t ch = 0; ch < C; ch++)
                        x[((n * H + h) * W + w) * C + ch] =
                            read_elem(buf, type, elem_index(fmt, layout, C, H, W, n, ch, h, w));
    } else {
        for (uint32_t k = 0; k < attr->n_elems; k++) x[k] = read_elem(buf, type, k);
    }
}

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_inputs_set");
    if (c && c->zero_copy)
        fm_violation("rknn_inputs_set on a context whose I/O memory was set (zero copy)");
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    if (!inputs || n_inputs != (uint32_t)c->model->n_in) return -8;
    for (uint32_t i = 0; i < n_inputs; i++) {
        const rknn_input *in = &inputs[i];
        if (in->index >= n_inputs || !in->buf || in->pass_through > 1) return -8;
        const rknn_tensor_attr *attr = &c->cur_in[in->index];
        int es = elem_size(in->type);
        if (es == 0 || in->size != attr->n_elems * (uint32_t)es) return -8; /* size must match */
        if (attr->n_dims == 4 && in->fmt != 0 && in->fmt != 1) return -8;
        if (attr->n_dims != 4 && in->fmt != 3) return -8; /* UNDEFINED for non-4-D */
        decode_input(c, (int)in->index, in->buf, in->type, in->fmt, NULL);
    }
    c->inputs_ready = 1;
    return 0;
}

static float output_value(const ctx_t *c, int o, uint32_t k) {
    const model_t *m = c->model;
    float x = k < c->x_elems[0] ? c->x[0][k] : 0.0f;
    float y = m->a[o] * x + m->b[o];
    for (int j = 0; j < m->n_mix; j++)
        if (m->mix_out[j] == o) {
            int in = m->mix_in[j];
            y += m->mix_coef[j] * (k < c->x_elems[in] ? c->x[in][k] : 0.0f);
        }
    return y;
}

static float quantised(const rknn_tensor_attr *attr, float real, int want_float) {
    if (attr->qnt_type != 2) return real;
    float q = roundf(real / attr->scale + attr->zp); /* affine asymmetric */
    q = q < -128 ? -128 : q > 127 ? 127 : q;
    return want_float ? (q - attr->zp) * attr->scale : q;
}

/* Zero-copy run: inputs from the NPU's view of their bound memory, outputs into it. */
static int run_zero_copy(ctx_t *c) {
    const model_t *m = c->model;
    for (int i = 0; i < m->n_in; i++) {
        if (!c->in_mem[i]) return -8;
        fm_mem *mem = fm_use(c->handle, c->in_mem[i]->handle, "rknn_run (input)");
        if (!mem) return -5;
        const rknn_tensor_attr *a = &c->in_attr[i];
        uint32_t need = a->size_with_stride ? a->size_with_stride : a->size;
        const unsigned char *data = fm_device_read(mem, 0, need, a->name);
        decode_input(c, i, data, a->type, a->n_dims >= 4 ? a->fmt : 3, a);
    }
    for (int o = 0; o < m->n_out; o++) {
        if (!c->out_mem[o]) return -9;
        fm_mem *mem = fm_use(c->handle, c->out_mem[o]->handle, "rknn_run (output)");
        if (!mem) return -5;
        const rknn_tensor_attr *a = &c->out_attr[o], *logical = &m->out[o];
        uint32_t need = a->size_with_stride ? a->size_with_stride : a->size;
        unsigned char *data = fm_device_write(mem, 0, need, a->name);
        memset(data, 0, need);
        if (logical->n_dims == 4) {
            uint32_t N = logical->dims[0], C = logical->dims[1], H = logical->dims[2],
                     W = logical->dims[3];
            for (uint32_t n = 0; n < N; n++)
                for (uint32_t ch = 0; ch < C; ch++)
                    for (uint32_t h = 0; h < H; h++)
                        for (uint32_t w = 0; w < W; w++) {
                            uint32_t k = ((n * C + ch) * H + h) * W + w;
                            float y = quantised(logical, output_value(c, o, k), 0);
                            write_value(data, a->type, elem_index(a->fmt, a, C, H, W, n, ch, h, w),
                                        y);
                        }
        } else {
            for (uint32_t k = 0; k < logical->n_elems; k++)
                write_value(data, a->type, k, quantised(logical, output_value(c, o, k), 0));
        }
    }
    counters[C_ZC_RUNS]++;
    return 0;
}

int rknn_run(rknn_context context, void *extend) {
    (void)extend;
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_run");
    counters[C_RUNS]++;
    if (c) c->busy = 1;
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    const model_t *m = c->model;
    int rc = 0;
    if (!c->zero_copy && !c->inputs_ready) rc = -8;
    if (rc == 0 && !c->zero_copy && m->has_fail_value && c->x_elems[0] &&
        c->x[0][0] == m->fail_value)
        rc = -1;
    if (rc == 0) {
        int mask = c->core_mask == 0 || c->core_mask == 0xffff ? 1 : c->core_mask;
        for (int core = 0; core < 3; core++) /* hold the NPU core(s) while "computing" */
            if (mask & (1 << core)) pthread_mutex_lock(&core_lock[core]);
        if (m->latency_us > 0) {
            struct timespec ts = {m->latency_us / 1000000, (m->latency_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
        for (int core = 2; core >= 0; core--)
            if (mask & (1 << core)) pthread_mutex_unlock(&core_lock[core]);
    }
    pthread_mutex_lock(&lock);
    if (rc == 0 && c->zero_copy) {
        rc = run_zero_copy(c);
        if (rc == 0 && m->has_fail_value && c->x_elems[0] && c->x[0][0] == m->fail_value) rc = -1;
    }
    c->busy = 0;
    pthread_mutex_unlock(&lock);
    return rc;
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[],
                     void *extend) {
    (void)extend;
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_outputs_get");
    if (c && c->zero_copy)
        fm_violation("rknn_outputs_get on a context whose I/O memory was set (zero copy)");
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    const model_t *m = c->model;
    if (!outputs || n_outputs != (uint32_t)m->n_out) return -9;
    for (uint32_t i = 0; i < n_outputs; i++) {
        rknn_output *out = &outputs[i];
        if (out->index >= n_outputs) return -9;
        rknn_tensor_attr attr = m->out[out->index];
        uint32_t n = attr.n_elems;
        if (is_dynamic(m) && out->index == 0) n = c->x_elems[0];
        int native_type = attr.type;
        uint32_t expected = n * (out->want_float ? 4 : (uint32_t)elem_size(native_type));
        if (out->is_prealloc) {
            if (!out->buf || out->size != expected) return -9;
        } else {
            out->buf = malloc(expected);
            out->size = expected;
            pthread_mutex_lock(&lock);
            counters[C_OUT_ALLOC]++;
            pthread_mutex_unlock(&lock);
        }
        for (uint32_t k = 0; k < n; k++) {
            float y = output_value(c, (int)out->index, k);
            if (attr.qnt_type == 2)
                write_value(out->buf, out->want_float ? 0 : native_type, k,
                            quantised(&attr, y, out->want_float));
            else
                write_value(out->buf, out->want_float ? 0 : native_type, k, y);
        }
    }
    return 0;
}

int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[]) {
    pthread_mutex_lock(&lock);
    ctx_t *c = find(context);
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    if (!outputs) return -9;
    for (uint32_t i = 0; i < n_outputs; i++)
        if (!outputs[i].is_prealloc && outputs[i].buf) {
            free(outputs[i].buf);
            outputs[i].buf = NULL;
            pthread_mutex_lock(&lock);
            counters[C_OUT_FREE]++;
            pthread_mutex_unlock(&lock);
        }
    return 0;
}

#ifndef FAKE_RKNN_OLD_RUNTIME
/* Present since runtime 1.6.0; build with -DFAKE_RKNN_OLD_RUNTIME to emulate 1.4.0. */
int rknn_register_custom_ops(rknn_context context, void *ops, uint32_t n) {
    pthread_mutex_lock(&lock);
    ctx_t *c = find(context);
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    return ops && n > 0 ? 0 : -5;
}
#endif

/* ------------------------------------------------------------------ zero-copy memory */

static rknn_tensor_mem *new_handle(fm_mem *rec, uint32_t flags) {
    rknn_tensor_mem *mem = rec->handle;
    mem->virt_addr = rec->creator ? rec->cpu : rec->cpu - rec->offset;
    mem->phys_addr = 0x40000000ull + (uint64_t)(uintptr_t)rec->cpu % 0x10000000ull;
    mem->fd = rec->creator ? rec->fd : -1;
    mem->offset = (int32_t)rec->offset;
    mem->size = (uint32_t)rec->size;
    mem->flags = flags;
    mem->priv_data = rec;
    return mem;
}

static rknn_tensor_mem *create(rknn_context context, uint64_t size, const char *api) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, api);
    rknn_tensor_mem *mem = NULL;
    if (c && size > 0 && size <= 0xffffffffu) {
        mem = calloc(1, sizeof(*mem));
        fm_mem *rec = fm_create(context, mem, (size_t)size);
        if (rec) {
            new_handle(rec, 1 /* RKNN_TENSOR_MEMORY_FLAGS_ALLOC_INSIDE */);
            if (c->model->no_mem_fd) mem->fd = -1;
            counters[C_MEM_CREATES]++;
            counters[C_MEMS_LIVE]++;
        } else {
            free(mem);
            mem = NULL;
        }
    }
    pthread_mutex_unlock(&lock);
    return mem;
}

rknn_tensor_mem *rknn_create_mem(rknn_context context, uint32_t size) {
    return create(context, size, "rknn_create_mem");
}

#ifndef FAKE_RKNN_OLD_RUNTIME /* rknn_create_mem2 arrived in 2.0.0 */
rknn_tensor_mem *rknn_create_mem2(rknn_context context, uint64_t size, uint64_t alloc_flags) {
    if (alloc_flags & ~(uint64_t)0x7) return NULL;
    return create(context, size, "rknn_create_mem2");
}
#endif

rknn_tensor_mem *rknn_create_mem_from_fd(rknn_context context, int32_t fd, void *virt_addr,
                                         uint32_t size, int32_t offset) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_create_mem_from_fd");
    rknn_tensor_mem *mem = NULL;
    if (c) {
        mem = calloc(1, sizeof(*mem));
        fm_mem *rec = fm_import(context, mem, fd, virt_addr, size, offset);
        if (rec) {
            new_handle(rec, 2 /* RKNN_TENSOR_MEMORY_FLAGS_FROM_FD */);
            mem->fd = fd;
            mem->virt_addr = virt_addr ? virt_addr : rec->map;
            counters[C_MEM_IMPORTS]++;
            counters[C_MEMS_LIVE]++;
        } else {
            free(mem);
            mem = NULL;
        }
    }
    pthread_mutex_unlock(&lock);
    return mem;
}

int rknn_destroy_mem(rknn_context context, rknn_tensor_mem *mem) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_destroy_mem");
    int rc = -7;
    if (c) {
        for (int i = 0; i < MAX_IO; i++) { /* a destroyed memory is no longer bound */
            if (c->in_mem[i] && c->in_mem[i]->handle == mem) c->in_mem[i] = NULL;
            if (c->out_mem[i] && c->out_mem[i]->handle == mem) c->out_mem[i] = NULL;
        }
        rc = fm_destroy(context, mem, &counters[C_MEMS_LIVE]) == 0 ? 0 : -5;
        if (rc == 0) counters[C_MEM_DESTROYS]++;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int rknn_set_io_mem(rknn_context context, rknn_tensor_mem *mem, rknn_tensor_attr *attr) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_set_io_mem");
    int rc = 0;
    if (!c) rc = -7;
    fm_mem *rec = rc == 0 ? fm_use(context, mem, "rknn_set_io_mem") : NULL;
    if (rc == 0 && (!rec || !attr)) rc = -5;
    const model_t *m = rc == 0 ? c->model : NULL;
    int input = -1, output = -1;
    if (rc == 0) {
        for (int i = 0; i < m->n_in; i++)
            if (strcmp(m->in[i].name, attr->name) == 0) input = i;
        for (int i = 0; i < m->n_out; i++)
            if (strcmp(m->out[i].name, attr->name) == 0) output = i;
        int index = input >= 0 ? input : output;
        if (index < 0 || attr->index != (uint32_t)index) {
            fm_violation("rknn_set_io_mem: attr '%s' index %u is no tensor of the model",
                         attr->name, attr->index);
            rc = -5;
        }
    }
    if (rc == 0) {
        rknn_tensor_attr native, nhwc;
        if (input >= 0) {
            native_input(m, input, 0, &native);
            native_input(m, input, 1, &nhwc);
        } else {
            native_output(m, output, 0, &native);
            native_output(m, output, 1, &nhwc);
        }
        const rknn_tensor_attr *want = same_attr(attr, &native) ? &native
                                       : same_attr(attr, &nhwc) ? &nhwc
                                                                : NULL;
        if (!want) {
            fm_violation("rknn_set_io_mem: attr of '%s' (fmt %d, type %d, %u dims, w_stride %u, "
                         "size_with_stride %u) is not a native layout of the tensor",
                         attr->name, attr->fmt, attr->type, attr->n_dims, attr->w_stride,
                         attr->size_with_stride);
            rc = -5;
        } else if (input >= 0 && want->fmt == 2 && attr->pass_through != 1) {
            fm_violation("rknn_set_io_mem: NC1HWC2 input '%s' bound without pass_through",
                         attr->name);
            rc = -5;
        } else if (input >= 0 && want->fmt == 1 && native.fmt == 2 && attr->pass_through != 0) {
            fm_violation("rknn_set_io_mem: NHWC input '%s' of an NC1HWC2 tensor bound with "
                         "pass_through (the runtime must convert it)",
                         attr->name);
            rc = -5;
        } else {
            uint32_t need = want->size_with_stride ? want->size_with_stride : want->size;
            if (rec->size < need) {
                fm_violation("rknn_set_io_mem: memory of %zu bytes for '%s' needs %u", rec->size,
                             attr->name, need);
                rc = -5;
            }
        }
    }
    if (rc == 0) {
        if (input >= 0) {
            c->in_mem[input] = rec;
            c->in_attr[input] = *attr;
        } else {
            c->out_mem[output] = rec;
            c->out_attr[output] = *attr;
        }
        c->zero_copy = 1;
        counters[C_SET_IO]++;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

#ifndef FAKE_RKNN_OLD_RUNTIME /* rknn_mem_sync arrived in 1.6.0 */
int rknn_mem_sync(rknn_context context, rknn_tensor_mem *mem, int mode) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn_mem_sync");
    int rc = -7;
    if (c) {
        fm_mem *rec = fm_use(context, mem, "rknn_mem_sync");
        rc = rec ? fm_sync(rec, mode) : -5;
        if (rc < 0) rc = -5;
        else if (mode & 1) counters[C_SYNC_TO]++;
        if (rc == 0 && (mode & 2)) counters[C_SYNC_FROM]++;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}
#endif
