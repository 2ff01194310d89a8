"""The tensors RKNPU2 zero copy binds: native attrs, as :class:`~ezrt.backends.rknn.values.IoSpec`.

A 4-D tensor is bound in the runtime's native layout (``RKNN_QUERY_NATIVE_*_ATTR``): NHWC
where the runtime offers it and ``zero_copy_layout`` is not "native", else what the runtime
prefers (often NC1HWC2, which ezrt packs itself, ``pass_through`` 1). Each spec carries the
:class:`~ezrt.backends.rknn.layout.NativeLayout` that maps the caller's logical tensor to
the native bytes, the bytes to allocate, and the facts ``memory_info()`` reports.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from ...errors import EzrtError
from ...io import NodeArg
from ...options import SessionConfig
from . import abi
from .layout import NativeLayout, dense_strides, span_bytes
from .model import ModelInfo, try_attr
from .values import IoSpec

__all__ = ["copy_attr", "describe_inputs", "describe_outputs", "native_arg"]

#: Element types RKNN's NATIVE_NHWC queries support (upstream asks only for these).
_NHWC_TYPES = (0, 1, 2, 3)
_MAPPINGS = {abi.FMT_NHWC: "nhwc", abi.FMT_NC1HWC2: "nc1hwc2", abi.FMT_NCHW: "nchw"}


def copy_attr(attr: Any) -> Any:
    """A copy of a tensor attr (the runtime may write the one it is given)."""
    return abi.TensorAttr.from_buffer_copy(attr)


def describe_inputs(
    rt: abi.Runtime, ctx: int, model: ModelInfo, config: SessionConfig
) -> List[IoSpec]:
    """The inputs as zero copy binds them (the caller holds ``ctx``'s slot)."""
    native_mode = config.zero_copy_layout == "native"
    logical_nhwc = config.layout in ("nhwc", "any")
    specs = []
    for i, attr in enumerate(model.input_attrs):
        native = _native_input(rt, ctx, i, attr, native_mode)
        specs.append(_io_spec("input", i, model.inputs[i].name, attr, native, logical_nhwc))
    return specs


def describe_outputs(
    rt: abi.Runtime, ctx: int, model: ModelInfo, config: SessionConfig
) -> List[IoSpec]:
    """The outputs as zero copy binds them (the caller holds ``ctx``'s slot)."""
    native_mode = config.zero_copy_layout == "native"
    specs = []
    for i, attr in enumerate(model.output_attrs):
        native = copy_attr(attr)
        if attr.n_dims == 4:
            found = try_attr(rt, ctx, abi.QUERY_NATIVE_OUTPUT_ATTR, i)
            native = found if found is not None else native
            if not native_mode and attr.type in _NHWC_TYPES:
                nhwc = try_attr(rt, ctx, abi.QUERY_NATIVE_NHWC_OUTPUT_ATTR, i)
                if nhwc is not None and nhwc.n_dims == 4:
                    native = nhwc
        specs.append(_io_spec("output", i, model.outputs[i].name, attr, native, False))
    return specs


def _native_input(rt: abi.Runtime, ctx: int, index: int, attr: Any, native_mode: bool) -> Any:
    native = copy_attr(attr)
    if attr.n_dims != 4:
        return native
    found = try_attr(rt, ctx, abi.QUERY_NATIVE_INPUT_ATTR, index)
    if found is not None:
        native = found
        if not native_mode and attr.type in _NHWC_TYPES:
            nhwc = try_attr(rt, ctx, abi.QUERY_NATIVE_NHWC_INPUT_ATTR, index)
            if nhwc is not None and nhwc.n_dims == 4:
                native = nhwc
            if native.fmt == abi.FMT_NC1HWC2 and native.pass_through == 0:
                native = _nhwc_like(attr, native)
    if native.fmt == abi.FMT_NC1HWC2:
        native.pass_through = 1  # the buffer holds NC1HWC2 bytes: ezrt packs them
    return native


def _nhwc_like(attr: Any, native: Any) -> Any:
    """Upstream's NHWC attr for an NC1HWC2-native input: the logical NHWC dims with the
    native row stride (the runtime converts NHWC to NC1HWC2 itself, pass_through 0)."""
    made = copy_attr(attr)
    n, h, w, c = attr.shape
    made.fmt = abi.FMT_NHWC
    made.w_stride = native.w_stride
    made.h_stride = native.h_stride
    made.pass_through = 0
    itemsize = abi.TENSOR_TYPES[attr.type][0].itemsize  # type: ignore[union-attr]
    made.size_with_stride = n * (native.h_stride or h) * (native.w_stride or w) * c * itemsize
    return made


def _io_spec(
    kind: str, index: int, name: str, attr: Any, native: Any, logical_nhwc: bool
) -> IoSpec:
    dtype = abi.TENSOR_TYPES.get(native.type, (None, ""))[0]
    if dtype is None:
        raise EzrtError(
            f"zero-copy {kind} '{name}' has RKNN tensor type {native.type}, which numpy cannot hold"
        )
    layout = _native_layout(attr, native, np.dtype(dtype), logical_nhwc)
    alloc = max(
        int(native.size_with_stride),
        int(native.size),
        span_bytes(layout.dims, layout.strides, layout.itemsize),
        1,
    )
    return IoSpec(name, kind, index, layout, alloc, native, _facts(native, layout, alloc))


def _native_layout(attr: Any, native: Any, dtype: np.dtype, logical_nhwc: bool) -> NativeLayout:
    """How the caller's logical tensor maps onto the native one. An NHWC attr is shown
    NCHW unless the layout keeps NHWC; a layout ezrt cannot map shows the native tensor."""
    dims: Tuple[int, ...] = attr.shape
    order = "NCHW"
    if len(dims) == 4 and attr.fmt == abi.FMT_NHWC:
        n, h, w, c = dims
        if logical_nhwc:
            order = "NHWC"
        else:
            dims = (n, c, h, w)
    mapping = _MAPPINGS.get(native.fmt, "identity")
    if len(dims) != 4 or (mapping == "nchw" and order == "NCHW"):
        mapping = "identity"
    native_dims = native.shape
    if mapping == "identity" and native_dims != dims:
        dims = native_dims
    return NativeLayout(
        abi.FMT_NAMES.get(native.fmt, "UNDEFINED"),
        native_dims,
        _native_strides(native),
        dtype,
        tuple(dims),
        mapping,
        order,
    )


def _native_strides(attr: Any) -> Tuple[int, ...]:
    """Element strides of a native RKNPU2 attr (w_stride/h_stride pad rows)."""
    dims = attr.shape
    if attr.fmt == abi.FMT_NHWC and len(dims) == 4:
        _, h, w, c = dims
        wp, hp = attr.w_stride or w, attr.h_stride or h
        return (hp * wp * c, wp * c, c, 1)
    if attr.fmt == abi.FMT_NC1HWC2 and len(dims) == 5:
        _, c1, h, w, c2 = dims
        wp, hp = attr.w_stride or w, attr.h_stride or h
        return (c1 * hp * wp * c2, hp * wp * c2, wp * c2, c2, 1)
    if attr.fmt == abi.FMT_NCHW and len(dims) == 4:
        _, c, h, w = dims
        wp, hp = attr.w_stride or w, attr.h_stride or h
        return (c * hp * wp, hp * wp, wp, 1)
    return dense_strides(dims)


def _facts(native: Any, layout: NativeLayout, alloc: int) -> Dict[str, Any]:
    """What ``memory_info()`` reports of the tensor."""
    return {
        "attr_size": int(native.n_elems) * layout.itemsize,
        "size_with_stride": int(native.size_with_stride),
        "w_stride": int(native.w_stride),
        "h_stride": int(native.h_stride),
        "fmt": int(native.fmt),
        "pass_through": bool(native.pass_through),
        "aligned_size": alloc,
        "core_id": -1,
        "layout": layout.name,
        "strides": list(layout.strides),
    }


def native_arg(spec: IoSpec) -> NodeArg:
    """A zero-copy tensor as ``get_native_inputs`` / ``get_native_outputs`` report it."""
    return NodeArg(
        spec.name,
        list(spec.layout.dims),
        abi.TENSOR_TYPES.get(int(spec.attr.type), (None, "tensor(unknown)"))[1],
        spec.layout.name,
        list(spec.layout.strides),
    )
