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
 * TYPE/FMT/QNT are the integer enum values of the ABI.
 *
 * Counters for leak checks: fake_rknn_counter("contexts"|"dups"|"inits"|"destroys"|
 * "live"|"outputs_alloc"|"outputs_free"|"runs"|"mask_calls"|"shape_calls"), fake_rknn_reset().
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint64_t rknn_context;

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

_Static_assert(sizeof(rknn_tensor_attr) == 376, "rknn_tensor_attr");
_Static_assert(sizeof(rknn_input_range) == 33040, "rknn_input_range");
_Static_assert(sizeof(rknn_input) == 32, "rknn_input");
_Static_assert(sizeof(rknn_output) == 24, "rknn_output");
_Static_assert(sizeof(rknn_init_extend) == 136, "rknn_init_extend");
_Static_assert(sizeof(rknn_tensor_mem) == 40, "rknn_tensor_mem");

#define MAX_IO 8
#define MAX_RANGES 8

typedef struct {
    char chip[16];
    long latency_us;
    char custom_string[1024];
    char sdk_version[256];
    int n_in, n_out;
    rknn_tensor_attr in[MAX_IO], out[MAX_IO];
    float a[MAX_IO], b[MAX_IO];
    int n_ranges[MAX_IO];
    uint32_t ranges[MAX_IO][MAX_RANGES][16];
    int fail_init;
    int has_fail_value;
    float fail_value;
} model_t;

typedef struct ctx_s {
    rknn_context handle;
    model_t *model; /* shared by dups and weight-sharing slaves: refcounted below */
    int *model_refs;
    int core_mask;
    int inputs_ready;
    float *x; /* input 0 as float, in the model's own (attr) element order */
    uint32_t x_elems;
    rknn_tensor_attr cur_in[MAX_IO];
    struct ctx_s *next;
} ctx_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t core_lock[3] = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
                                       PTHREAD_MUTEX_INITIALIZER};
static ctx_t *contexts;
static rknn_context next_handle = 0x1000;
static long counters[16];
static const char *counter_names[] = {"contexts", "dups", "inits", "destroys", "live",
                                      "outputs_alloc", "outputs_free", "runs", "mask_calls",
                                      "shape_calls", NULL};
enum { C_CONTEXTS, C_DUPS, C_INITS, C_DESTROYS, C_LIVE, C_OUT_ALLOC, C_OUT_FREE, C_RUNS,
       C_MASK, C_SHAPE };

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

void fake_rknn_reset(void) {
    pthread_mutex_lock(&lock);
    memset(counters, 0, sizeof(counters));
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
        else if (strcmp(word, "fail_run_value") == 0) {
            m->has_fail_value = 1;
            m->fail_value = (float)atof(rest);
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

static ctx_t *find(rknn_context handle) {
    for (ctx_t *c = contexts; c; c = c->next)
        if (c->handle == handle) return c;
    return NULL;
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
    ctx_t *src = find(*context_in);
    if (!src) {
        pthread_mutex_unlock(&lock);
        return -7;
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
        pthread_mutex_unlock(&lock);
        return -7;
    }
    ctx_t *c = *link;
    *link = c->next;
    if (--(*c->model_refs) == 0) {
        free(c->model);
        free(c->model_refs);
    }
    free(c->x);
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
    ctx_t *c = find(context);
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
    ctx_t *c = find(context);
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

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]) {
    pthread_mutex_lock(&lock);
    ctx_t *c = find(context);
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
        if (in->index != 0) continue;
        float *x = realloc(c->x, attr->n_elems * sizeof(float));
        c->x = x;
        c->x_elems = attr->n_elems;
        const uint32_t *d = attr->dims;
        if (attr->n_dims == 4 && in->fmt == 0 && attr->fmt == 1) {
            /* caller gave NCHW for an NHWC model input: the runtime transposes */
            uint32_t N = d[0], H = d[1], W = d[2], C = d[3];
            for (uint32_t n = 0; n < N; n++)
                for (uint32_t h = 0; h < H; h++)
                    for (uint32_t w = 0; w < W; w++)
                        for (uint32_t ch = 0; ch < C; ch++)
                            x[((n * H + h) * W + w) * C + ch] =
                                read_elem(in->buf, in->type, ((n * C + ch) * H + h) * W + w);
        } else {
            for (uint32_t k = 0; k < attr->n_elems; k++) x[k] = read_elem(in->buf, in->type, k);
        }
    }
    c->inputs_ready = 1;
    return 0;
}

int rknn_run(rknn_context context, void *extend) {
    (void)extend;
    pthread_mutex_lock(&lock);
    ctx_t *c = find(context);
    counters[C_RUNS]++;
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    if (!c->inputs_ready) return -8;
    const model_t *m = c->model;
    if (m->has_fail_value && c->x_elems && c->x[0] == m->fail_value) return -1;
    int mask = c->core_mask == 0 || c->core_mask == 0xffff ? 1 : c->core_mask;
    for (int core = 0; core < 3; core++) /* hold the NPU core(s) while "computing" */
        if (mask & (1 << core)) pthread_mutex_lock(&core_lock[core]);
    if (m->latency_us > 0) {
        struct timespec ts = {m->latency_us / 1000000, (m->latency_us % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
    for (int core = 2; core >= 0; core--)
        if (mask & (1 << core)) pthread_mutex_unlock(&core_lock[core]);
    return 0;
}

static void write_value(void *buf, int type, uint32_t k, float value) {
    switch (type) {
    case 0: ((float *)buf)[k] = value; break;
    case 2: ((int8_t *)buf)[k] = (int8_t)value; break;
    case 3: ((uint8_t *)buf)[k] = (uint8_t)value; break;
    case 6: ((int32_t *)buf)[k] = (int32_t)value; break;
    default: ((float *)buf)[k] = value; break;
    }
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[],
                     void *extend) {
    (void)extend;
    pthread_mutex_lock(&lock);
    ctx_t *c = find(context);
    pthread_mutex_unlock(&lock);
    if (!c) return -7;
    const model_t *m = c->model;
    if (!outputs || n_outputs != (uint32_t)m->n_out) return -9;
    for (uint32_t i = 0; i < n_outputs; i++) {
        rknn_output *out = &outputs[i];
        if (out->index >= n_outputs) return -9;
        rknn_tensor_attr attr = m->out[out->index];
        uint32_t n = attr.n_elems;
        if (is_dynamic(m) && out->index == 0) n = c->x_elems;
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
            float x = k < c->x_elems ? c->x[k] : 0.0f;
            float real = m->a[out->index] * x + m->b[out->index];
            if (attr.qnt_type == 2) { /* affine asymmetric: quantise, then maybe dequantise */
                float q = roundf(real / attr.scale + attr.zp);
                q = q < -128 ? -128 : q > 127 ? 127 : q;
                if (out->want_float) write_value(out->buf, 0, k, (q - attr.zp) * attr.scale);
                else write_value(out->buf, native_type, k, q);
            } else {
                write_value(out->buf, out->want_float ? 0 : native_type, k, real);
            }
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
