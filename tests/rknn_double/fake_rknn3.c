/*
 * A test double of Rockchip's RKNPU3 runtime librknn3_api.so, written from the declarations
 * described in shared/reference/UPSTREAM_0_11.md §4.3. The tests compile it with the system C
 * compiler.
 *
 * Its "model" is a byte string that starts with "RKNX" and contains "FAKE-RKNX\n", then one
 * directive per line:
 *   input NAME TYPE LAYOUT N d0 .. dN-1     LAYOUT nc1hwc2 (dims are N C H W; the native
 *                                           tensor is [N, C1, H, W, C2], C2 = 16 bytes /
 *                                           element size, rows padded to w_align), nchw or
 *                                           undefined (dense, dims as given)
 *   output NAME TYPE LAYOUT A B N d0 .. dN-1   y = A * x + B over input 0's logical elements
 *   mix OUTPUT INPUT COEF                   output OUTPUT also adds COEF * input INPUT
 *   cores N                                 RKNPU3_QUERY_CORE_NUMBER (default 3)
 *   w_align N                               row padding of nc1hwc2 tensors
 *   latency_us N                            rknn3_run sleeps N us
 *   core_unused                             rknn3_model_init returns -100 (a warning)
 *   fail_load CODE                          loading the model returns CODE
 *   opaque_strides                          attrs report n_stride = n_dims + 1
 *   mem_unmapped                            rknn3_create_mem / rknn3_create_mem_from_fd report
 *                                           virt_addr NULL (memory without a CPU mapping)
 * TYPE is the RKNPU3 tensor type enum (0 float32, 1 float16, 2 int8, ...).
 * The weight file (or buffer) must start with "FAKE-WEIGHT", else loading returns -3.
 *
 * Rules it checks (violations: fake_rknn3_violations): the memory rules of fake_mem.h; every
 * Tensor given to rknn3_run carries the model's own attr (type, layout, dims, strides,
 * aligned_size) and memory of that context holding aligned_size bytes; no call overlaps a
 * running rknn3_run on the same context, or uses a context that is not alive; rknn3_model_init gets a non-zero core mask (runtime
 * 1.0.4 refuses AUTO = 0). Counters: fake_rknn3_counter("contexts"|"live"|"runs"|
 * "mems_live"|"mem_creates"|"mem_imports"|"mem_destroys"|"model_inits"|"core_mask"|
 * "priority"|"run_timeout"|"device_id_set"), fake_rknn3_reset().
 */
#include "fake_mem.h"
#include <math.h>
#include <pthread.h>
#include <time.h>

#if defined(__arm__) || (defined(__riscv) && __riscv_xlen == 32)
typedef uint32_t Context;
#else
typedef uint64_t Context;
#endif

typedef struct { uint32_t n_input, n_output; } InputOutputNum;
typedef struct { float scale; int32_t zero_point; } QuantInfo;
typedef struct {
    uint32_t index;
    char name[256];
    uint32_t n_dims;
    uint32_t shape[16];
    uint64_t aligned_size;
    uint32_t n_stride;
    uint64_t stride[17];
    uint32_t n_elems;
    int dtype, layout, qnt_type;
    QuantInfo qnt_info;
    int32_t core_id;
} TensorAttr;
typedef struct {
    void *virt_addr;
    uint64_t phys_addr;
    int32_t fd;
    uint64_t buffer_id, offset, size, flags;
    int32_t core_id;
    void *priv_data;
    int mem_type;
} TensorMem;
typedef struct {
    int32_t priority;
    uint32_t run_timeout, run_core_mask;
    uint8_t user_mem_weight, user_mem_internal, user_sram;
    uint8_t reserved[128];
} Config;
typedef struct { TensorMem *mem; TensorAttr *attr; } Tensor;
typedef struct { char *device_id; uint8_t reserved[128]; } InitExtend;
typedef struct { char api_version[256], drv_version[256]; } SdkVersion;

_Static_assert(sizeof(TensorAttr) == 512, "TensorAttr");
_Static_assert(sizeof(Config) == 144, "Config");
#if UINTPTR_MAX == 0xffffffffffffffffu
_Static_assert(sizeof(TensorMem) == 80, "TensorMem");
_Static_assert(sizeof(Tensor) == 16, "Tensor");
_Static_assert(sizeof(InitExtend) == 136, "InitExtend");
#endif

#define MAX_IO 8
#define MAX_MIX 8

typedef struct {
    int n_in, n_out;
    TensorAttr in[MAX_IO], out[MAX_IO];
    uint32_t logical_c[2][MAX_IO]; /* real channel count of nc1hwc2 tensors */
    float a[MAX_IO], b[MAX_IO];
    int n_mix, mix_out[MAX_MIX], mix_in[MAX_MIX];
    float mix_coef[MAX_MIX];
    uint32_t cores, w_align;
    long latency_us;
    int core_unused, fail_load, opaque, mem_unmapped;
} model_t;

typedef struct ctx_s {
    Context handle;
    model_t *model;
    int initialised, busy;
    float *x[MAX_IO];
    struct ctx_s *next;
} ctx_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static ctx_t *contexts;
static Context next_handle = 0x3000;
static long counters[16];
static const char *counter_names[] = {"contexts",     "live",        "runs",       "mems_live",
                                      "mem_creates",  "mem_imports", "mem_destroys",
                                      "model_inits",  "core_mask",   "priority",   "run_timeout",
                                      "device_id_set", NULL};
enum { C_CONTEXTS, C_LIVE, C_RUNS, C_MEMS_LIVE, C_MEM_CREATES, C_MEM_IMPORTS, C_MEM_DESTROYS,
       C_MODEL_INITS, C_CORE_MASK, C_PRIORITY, C_RUN_TIMEOUT, C_DEVICE_ID };

long fake_rknn3_counter(const char *name) {
    for (int i = 0; counter_names[i]; i++)
        if (strcmp(counter_names[i], name) == 0) {
            pthread_mutex_lock(&lock);
            long value = counters[i];
            pthread_mutex_unlock(&lock);
            return value;
        }
    return -999;
}

long fake_rknn3_violations(char *out, long size) {
    pthread_mutex_lock(&lock);
    long n = fm_violations(out, size);
    pthread_mutex_unlock(&lock);
    return n;
}

void fake_rknn3_reset(void) {
    pthread_mutex_lock(&lock);
    long live = counters[C_LIVE], mems = counters[C_MEMS_LIVE];
    memset(counters, 0, sizeof(counters));
    counters[C_LIVE] = live;
    counters[C_MEMS_LIVE] = mems;
    fm_reset();
    pthread_mutex_unlock(&lock);
}

static int elem_size(int type) {
    switch (type) {
    case 0: case 6: case 7: return 4;
    case 1: case 4: case 5: return 2;
    case 2: case 3: case 10: return 1;
    case 8: case 9: return 8;
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

static uint16_t float_to_half(float f) {
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
    case 9: return (float)((const uint64_t *)buf)[i];
    case 10: return ((const uint8_t *)buf)[i] ? 1.0f : 0.0f;
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
    case 9: ((uint64_t *)buf)[k] = (uint64_t)value; break;
    case 10: ((uint8_t *)buf)[k] = value != 0.0f; break;
    }
}

static uint64_t align64(uint64_t v) { return (v + 63) / 64 * 64; }

/* Fill an attr from a directive: logical dims `d` (NCHW for nc1hwc2) in `layout_word`. */
static int make_attr(model_t *m, TensorAttr *a, uint32_t *logical_c, int index, const char *name,
                     int type, const char *layout_word, int n, const uint32_t *d) {
    memset(a, 0, sizeof(*a));
    a->index = (uint32_t)index;
    snprintf(a->name, sizeof(a->name), "%s", name);
    a->dtype = type;
    int es = elem_size(type);
    if (es == 0 || n < 1 || n > 16) return -1;
    if (strcmp(layout_word, "nc1hwc2") == 0) {
        if (n != 4) return -1;
        uint32_t N = d[0], C = d[1], H = d[2], W = d[3], c2 = (uint32_t)(16 / es);
        uint32_t c1 = (C + c2 - 1) / c2, wp = m->w_align > 1 ? (W + m->w_align - 1) / m->w_align * m->w_align : W;
        uint32_t dims[5] = {N, c1, H, W, c2};
        a->n_dims = 5;
        memcpy(a->shape, dims, sizeof(dims));
        a->layout = 3;
        uint64_t s[5] = {(uint64_t)c1 * H * wp * c2, (uint64_t)H * wp * c2, (uint64_t)wp * c2, c2, 1};
        a->n_stride = 5;
        memcpy(a->stride, s, sizeof(s));
        a->n_elems = N * c1 * H * W * c2;
        a->aligned_size = align64((uint64_t)N * s[0] * es);
        *logical_c = C;
    } else {
        a->n_dims = (uint32_t)n;
        memcpy(a->shape, d, sizeof(uint32_t) * n);
        a->layout = strcmp(layout_word, "nchw") == 0 ? 1 : 0;
        uint64_t step = 1;
        a->n_stride = (uint32_t)n;
        for (int i = n - 1; i >= 0; i--) {
            a->stride[i] = step;
            step *= d[i];
        }
        a->n_elems = (uint32_t)step;
        a->aligned_size = align64(step * es);
        *logical_c = n == 4 ? d[1] : 0;
    }
    if (m->opaque) a->n_stride = a->n_dims + 1;
    a->core_id = 0;
    return 0;
}

static int parse_model(const char *data, uint64_t size, model_t *m) {
    if (size < 8 || memcmp(data, "RKNX", 4) != 0) return -3;
    const char *start = memmem(data, size, "FAKE-RKNX\n", 10);
    if (!start) return -3;
    char *text = strndup(start, size - (start - data));
    memset(m, 0, sizeof(*m));
    m->cores = 3;
    m->w_align = 1;
    /* first pass: options that change attrs */
    if (strstr(text, "\nopaque_strides")) m->opaque = 1;
    char *wa = strstr(text, "\nw_align ");
    if (wa) m->w_align = (uint32_t)atoi(wa + 9);
    char *save = NULL;
    int rc = 0;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char word[32] = {0}, name[256] = {0}, layout[32] = {0};
        int consumed = 0, n = 0, type = 0;
        if (sscanf(line, "%31s %n", word, &consumed) != 1) continue;
        char *rest = line + consumed;
        if (strcmp(word, "cores") == 0) m->cores = (uint32_t)atoi(rest);
        else if (strcmp(word, "latency_us") == 0) m->latency_us = atol(rest);
        else if (strcmp(word, "core_unused") == 0) m->core_unused = 1;
        else if (strcmp(word, "fail_load") == 0) m->fail_load = atoi(rest);
        else if (strcmp(word, "mem_unmapped") == 0) m->mem_unmapped = 1;
        else if (strcmp(word, "mix") == 0 && m->n_mix < MAX_MIX) {
            int k = m->n_mix++;
            sscanf(rest, "%d %d %f", &m->mix_out[k], &m->mix_in[k], &m->mix_coef[k]);
        } else if (strcmp(word, "input") == 0 && m->n_in < MAX_IO) {
            uint32_t d[16] = {0};
            if (sscanf(rest, "%255s %d %31s %d %n", name, &type, layout, &n, &consumed) < 4) rc = -3;
            rest += consumed;
            for (int i = 0; i < n && i < 16; i++) d[i] = (uint32_t)strtoul(rest, &rest, 10);
            if (rc == 0 && make_attr(m, &m->in[m->n_in], &m->logical_c[0][m->n_in], m->n_in, name,
                                     type, layout, n, d) != 0)
                rc = -3;
            m->n_in++;
        } else if (strcmp(word, "output") == 0 && m->n_out < MAX_IO) {
            uint32_t d[16] = {0};
            float a, b;
            if (sscanf(rest, "%255s %d %31s %f %f %d %n", name, &type, layout, &a, &b, &n,
                       &consumed) < 6)
                rc = -3;
            rest += consumed;
            for (int i = 0; i < n && i < 16; i++) d[i] = (uint32_t)strtoul(rest, &rest, 10);
            m->a[m->n_out] = a;
            m->b[m->n_out] = b;
            if (rc == 0 && make_attr(m, &m->out[m->n_out], &m->logical_c[1][m->n_out], m->n_out,
                                     name, type, layout, n, d) != 0)
                rc = -3;
            m->n_out++;
        }
    }
    free(text);
    if (rc == 0 && (m->n_in == 0 || m->n_out == 0)) rc = -3;
    return rc;
}

static ctx_t *find(Context handle) {
    for (ctx_t *c = contexts; c; c = c->next)
        if (c->handle == handle) return c;
    return NULL;
}

static ctx_t *enter(Context handle, const char *api) {
    ctx_t *c = find(handle);
    if (!c)
        fm_violation("%s: context %#llx is not alive (destroyed, or never made)", api,
                     (unsigned long long)handle);
    else if (c->busy)
        fm_violation("%s: context used while another thread is in rknn3_run", api);
    return c;
}

int rknn3_init(Context *ctx_out, InitExtend *ext) {
    if (!ctx_out) return -2;
    if (ext && ext->device_id && strcmp(ext->device_id, "missing") == 0) return -10;
    pthread_mutex_lock(&lock);
    ctx_t *c = calloc(1, sizeof(*c));
    c->handle = next_handle += 0x10;
    c->next = contexts;
    contexts = c;
    counters[C_CONTEXTS]++;
    counters[C_LIVE]++;
    if (ext && ext->device_id) counters[C_DEVICE_ID]++;
    *ctx_out = c->handle;
    pthread_mutex_unlock(&lock);
    return 0;
}

static int load(Context context, const char *model, uint64_t model_size, const char *weight,
                uint64_t weight_size) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(context, "rknn3_load_model");
    int rc = 0;
    if (!c) rc = -4;
    else if (c->model) rc = -2;
    model_t *m = NULL;
    if (rc == 0) {
        m = malloc(sizeof(*m));
        rc = parse_model(model, model_size, m);
        if (rc == 0 && m->fail_load) rc = m->fail_load;
        if (rc == 0 && (!weight || weight_size < 11 || memcmp(weight, "FAKE-WEIGHT", 11) != 0))
            rc = -3;
    }
    if (rc == 0) c->model = m;
    else free(m);
    pthread_mutex_unlock(&lock);
    return rc;
}

static char *slurp(const char *path, uint64_t *size) {
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc(n > 0 ? (size_t)n : 1);
    *size = fread(data, 1, (size_t)(n > 0 ? n : 0), f);
    fclose(f);
    return data;
}

int rknn3_load_model_from_path(Context ctx, const char *model_path, const char *weight_path) {
    uint64_t ms = 0, ws = 0;
    char *model = slurp(model_path, &ms), *weight = slurp(weight_path, &ws);
    int rc = model ? load(ctx, model, ms, weight, ws) : -3;
    free(model);
    free(weight);
    return rc;
}

int rknn3_load_model_from_data(Context ctx, const void *model, uint64_t model_size,
                               const void *weight, uint64_t weight_size) {
    if (!model || !model_size) return -2;
    return load(ctx, model, model_size, weight, weight_size);
}

int rknn3_model_init(Context ctx, Config *cfg) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(ctx, "rknn3_model_init");
    int rc = 0;
    if (!c || !c->model) rc = -4;
    else if (!cfg || cfg->run_core_mask == 0) rc = -2; /* runtime 1.0.4 refuses AUTO (0) */
    else {
        counters[C_MODEL_INITS]++;
        counters[C_CORE_MASK] = cfg->run_core_mask;
        counters[C_PRIORITY] = cfg->priority;
        counters[C_RUN_TIMEOUT] = cfg->run_timeout;
        c->initialised = 1;
        if (c->model->core_unused) rc = -100;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int rknn3_destroy(Context ctx) {
    pthread_mutex_lock(&lock);
    ctx_t **link = &contexts;
    while (*link && (*link)->handle != ctx) link = &(*link)->next;
    if (!*link) {
        fm_violation("rknn3_destroy: context %#llx is not alive (destroyed twice, or never made)",
                     (unsigned long long)ctx);
        pthread_mutex_unlock(&lock);
        return -4;
    }
    ctx_t *c = *link;
    if (c->busy) fm_violation("rknn3_destroy: context destroyed while a thread is in rknn3_run");
    fm_reclaim(ctx, &counters[C_MEMS_LIVE], "rknn3_destroy");
    *link = c->next;
    for (int i = 0; i < MAX_IO; i++) free(c->x[i]);
    free(c->model);
    free(c);
    counters[C_LIVE]--;
    pthread_mutex_unlock(&lock);
    return 0;
}

int rknn3_query(Context ctx, int cmd, void *info, uint64_t size) {
    pthread_mutex_lock(&lock);
    ctx_t *c = find(ctx);
    pthread_mutex_unlock(&lock);
    if (!c || !c->model) return -4;
    if (!info) return -2;
    const model_t *m = c->model;
    switch (cmd) {
    case 0:
        if (size < sizeof(InputOutputNum)) return -2;
        ((InputOutputNum *)info)->n_input = (uint32_t)m->n_in;
        ((InputOutputNum *)info)->n_output = (uint32_t)m->n_out;
        return 0;
    case 1: case 2: {
        if (size < sizeof(TensorAttr)) return -2;
        TensorAttr *attr = info;
        uint32_t index = attr->index;
        if (index >= (uint32_t)(cmd == 1 ? m->n_in : m->n_out)) return -2;
        *attr = cmd == 1 ? m->in[index] : m->out[index];
        return 0;
    }
    case 5:
        if (size < sizeof(SdkVersion)) return -2;
        snprintf(((SdkVersion *)info)->api_version, 256, "1.0.4 (fake rkcp)");
        snprintf(((SdkVersion *)info)->drv_version, 256, "0.1.0");
        return 0;
    case 13:
        if (size < sizeof(uint32_t)) return -2;
        *(uint32_t *)info = m->cores;
        return 0;
    default: /* CUSTOM_STRING and ORIGIN attrs: broken in RKCP 1.0.4, as the runtime */
        return -1;
    }
}

static int same_attr(const TensorAttr *given, const TensorAttr *want) {
    return given->n_dims == want->n_dims && given->dtype == want->dtype &&
           given->layout == want->layout && given->n_stride == want->n_stride &&
           given->aligned_size == want->aligned_size &&
           memcmp(given->shape, want->shape, sizeof(uint32_t) * want->n_dims) == 0 &&
           memcmp(given->stride, want->stride, sizeof(uint64_t) * (want->n_stride < 17 ? want->n_stride : 17)) == 0;
}

/* Index of logical element k (NCHW order for 4-D logical tensors) inside the native tensor. */
static size_t native_index(const TensorAttr *a, uint32_t logical_c, size_t k) {
    if (a->layout != 3) return k; /* dense */
    uint32_t N = a->shape[0], H = a->shape[2], W = a->shape[3], C2 = a->shape[4];
    (void)N;
    size_t w = k % W, h = (k / W) % H, c = (k / W / H) % logical_c, n = k / W / H / logical_c;
    return n * a->stride[0] + (c / C2) * a->stride[1] + h * a->stride[2] + w * a->stride[3] +
           (c % C2) * a->stride[4];
}

static size_t logical_count(const TensorAttr *a, uint32_t logical_c) {
    if (a->layout != 3) return a->n_elems;
    return (size_t)a->shape[0] * logical_c * a->shape[2] * a->shape[3];
}

static int check_tensor(ctx_t *c, const Tensor *t, const TensorAttr *want, const char *kind,
                        fm_mem **out) {
    if (!t || !t->attr || !t->mem) {
        fm_violation("rknn3_run: %s tensor without memory or attr", kind);
        return -2;
    }
    if (!same_attr(t->attr, want)) {
        fm_violation("rknn3_run: %s '%s' attr differs from the model's", kind, want->name);
        return kind[0] == 'i' ? -8 : -9;
    }
    fm_mem *m = fm_use(c->handle, t->mem, "rknn3_run");
    if (!m) return -2;
    if (m->size < want->aligned_size) {
        fm_violation("rknn3_run: %s '%s' memory of %zu bytes, needs %llu", kind, want->name,
                     m->size, (unsigned long long)want->aligned_size);
        return -2;
    }
    *out = m;
    return 0;
}

int rknn3_run(Context ctx, const Tensor *inputs, uint32_t n_in, Tensor *outputs, uint32_t n_out) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(ctx, "rknn3_run");
    counters[C_RUNS]++;
    int rc = 0;
    if (!c || !c->initialised) rc = -4;
    const model_t *m = rc == 0 ? c->model : NULL;
    if (rc == 0 && (n_in != (uint32_t)m->n_in || n_out != (uint32_t)m->n_out)) rc = -2;
    fm_mem *in_mem[MAX_IO] = {0}, *out_mem[MAX_IO] = {0};
    for (int i = 0; rc == 0 && i < m->n_in; i++)
        rc = check_tensor(c, &inputs[i], &m->in[i], "input", &in_mem[i]);
    for (int o = 0; rc == 0 && o < m->n_out; o++)
        rc = check_tensor(c, &outputs[o], &m->out[o], "output", &out_mem[o]);
    if (rc == 0) c->busy = 1;
    pthread_mutex_unlock(&lock);
    if (rc != 0) return rc;
    if (m->latency_us > 0) {
        struct timespec ts = {m->latency_us / 1000000, (m->latency_us % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&lock);
    for (int i = 0; i < m->n_in; i++) {
        const TensorAttr *a = &m->in[i];
        const unsigned char *data = fm_device_read(in_mem[i], 0, a->aligned_size, a->name);
        size_t count = logical_count(a, m->logical_c[0][i]);
        c->x[i] = realloc(c->x[i], (count ? count : 1) * sizeof(float));
        for (size_t k = 0; k < count; k++)
            c->x[i][k] = read_elem(data, a->dtype, native_index(a, m->logical_c[0][i], k));
    }
    size_t x0 = logical_count(&m->in[0], m->logical_c[0][0]);
    for (int o = 0; o < m->n_out; o++) {
        const TensorAttr *a = &m->out[o];
        unsigned char *data = fm_device_write(out_mem[o], 0, a->aligned_size, a->name);
        memset(data, 0, a->aligned_size);
        size_t count = logical_count(a, m->logical_c[1][o]);
        for (size_t k = 0; k < count; k++) {
            float y = m->a[o] * (k < x0 ? c->x[0][k] : 0.0f) + m->b[o];
            for (int j = 0; j < m->n_mix; j++)
                if (m->mix_out[j] == o) {
                    int in = m->mix_in[j];
                    size_t xn = logical_count(&m->in[in], m->logical_c[0][in]);
                    y += m->mix_coef[j] * (k < xn ? c->x[in][k] : 0.0f);
                }
            write_value(data, a->dtype, native_index(a, m->logical_c[1][o], k), y);
        }
    }
    c->busy = 0;
    pthread_mutex_unlock(&lock);
    return 0;
}

static TensorMem *new_handle(fm_mem *rec, int32_t core_id, uint64_t flags) {
    TensorMem *mem = rec->handle;
    mem->virt_addr = rec->creator ? rec->cpu : rec->cpu - rec->offset;
    mem->phys_addr = 0x80000000ull;
    mem->fd = rec->creator ? rec->fd : -1;
    mem->buffer_id = (uint64_t)(uintptr_t)rec;
    mem->offset = rec->offset;
    mem->size = rec->size;
    mem->flags = flags;
    mem->core_id = core_id;
    mem->priv_data = rec;
    return mem;
}

TensorMem *rknn3_create_mem(Context ctx, uint64_t size, int32_t core_id, int alloc_flags) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(ctx, "rknn3_create_mem");
    TensorMem *mem = NULL;
    if (c && size > 0 && (alloc_flags & ~3) == 0) {
        mem = calloc(1, sizeof(*mem));
        fm_mem *rec = fm_create(ctx, mem, (size_t)size);
        if (rec) {
            new_handle(rec, core_id, (uint64_t)alloc_flags);
            if (c->model && c->model->mem_unmapped) mem->virt_addr = NULL;
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

TensorMem *rknn3_create_mem_from_fd(Context ctx, int32_t fd, void *virt_addr, uint64_t size,
                                    uint64_t offset) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(ctx, "rknn3_create_mem_from_fd");
    TensorMem *mem = NULL;
    if (c) {
        mem = calloc(1, sizeof(*mem));
        fm_mem *rec = fm_import(ctx, mem, fd, virt_addr, (size_t)size, (long long)offset);
        if (rec) {
            new_handle(rec, -1, 0);
            mem->fd = fd;
            mem->virt_addr = virt_addr ? virt_addr : rec->map;
            if (c->model && c->model->mem_unmapped) mem->virt_addr = NULL;
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

int rknn3_destroy_mem(Context ctx, TensorMem *mem) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(ctx, "rknn3_destroy_mem");
    int rc = -4;
    if (c) {
        rc = fm_destroy(ctx, mem, &counters[C_MEMS_LIVE]) == 0 ? 0 : -2;
        if (rc == 0) counters[C_MEM_DESTROYS]++;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int rknn3_mem_sync(Context ctx, TensorMem *mem, int mode) {
    pthread_mutex_lock(&lock);
    ctx_t *c = enter(ctx, "rknn3_mem_sync");
    int rc = -4;
    if (c) {
        fm_mem *rec = fm_use(ctx, mem, "rknn3_mem_sync");
        rc = rec ? (fm_sync(rec, mode) == 0 ? 0 : -2) : -2;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}
