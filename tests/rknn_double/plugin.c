/* A minimal RKNN custom-op plugin for the tests: exports get_rknn_custom_op. */
#include <stdint.h>
#include <string.h>

typedef struct {
    uint32_t version;
    int target;
    char op_type[256];
    char cl_kernel_name[256];
    char *cl_kernel_source;
    uint64_t cl_source_size;
    char cl_build_options[256];
    void *init, *prepare, *compute, *compute_native, *destroy;
} rknn_custom_op;

_Static_assert(sizeof(rknn_custom_op) == 832, "rknn_custom_op");

static int compute(void *ctx, void *inputs, uint32_t n_in, void *outputs, uint32_t n_out) {
    (void)ctx; (void)inputs; (void)n_in; (void)outputs; (void)n_out;
    return 0;
}

static rknn_custom_op op;

rknn_custom_op *get_rknn_custom_op(void) {
    op.version = 1;
    op.target = 1; /* CPU */
    strcpy(op.op_type, PLUGIN_OP_TYPE);
    op.compute = (void *)compute;
    return &op;
}
