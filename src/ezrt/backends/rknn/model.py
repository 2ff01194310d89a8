"""What an RKNPU2 model is, read from its first context: tensors, versions, dynamic shapes.

:func:`read_model` queries the runtime once per session (in/out counts, tensor attrs, SDK
version, custom string, dynamic input ranges) and returns a :class:`ModelInfo`, which turns
the attrs into what the caller sees (ezrt's :class:`~ezrt.io.TensorSpec`, in the layout the
``layout`` option asks for) and what the copy path tells ``rknn_inputs_set`` (each input's
format, and whether ezrt transposes it in software). The ``query`` helpers here are the
other modules' way to call ``rknn_query``.
"""

from __future__ import annotations

import ctypes
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import EzrtWarning, InvalidArgumentError, warn
from ...io import TensorSpec, format_shape
from ...options import SessionConfig
from . import abi

__all__ = ["INPUT_DTYPES", "ModelInfo", "query", "query_attr", "read_model", "try_attr"]

#: What an input may be given as: the runtime converts it to the model's own type.
INPUT_DTYPES = tuple(abi.NUMPY_TO_TENSOR_TYPE)
#: The layouts in which the caller feeds a 4-D NHWC input as NCHW.
NCHW_LAYOUTS = ("nchw", "nchw_software")

Shape = Tuple[int, ...]


def query(rt: abi.Runtime, ctx: int, command: int, info: ctypes.Structure) -> int:
    """``rknn_query`` into ``info``; the status code."""
    return int(rt.rknn_query(ctx, command, ctypes.byref(info), ctypes.sizeof(info)))


def query_attr(rt: abi.Runtime, ctx: int, command: int, index: int, kind: str) -> abi.TensorAttr:
    """The attr of tensor ``index``; a failure raises, naming ``kind``."""
    attr = abi.TensorAttr()
    attr.index = index
    abi.check("rknn_query", query(rt, ctx, command, attr), f" for {kind} index {index}")
    return attr


def try_attr(rt: abi.Runtime, ctx: int, command: int, index: int) -> Optional[Any]:
    """The attr of tensor ``index``, or None when the runtime has no answer."""
    attr = abi.TensorAttr()
    attr.index = index
    return attr if query(rt, ctx, command, attr) >= 0 else None


def read_model(rt: abi.Runtime, ctx: int, config: SessionConfig) -> ModelInfo:
    """Everything the session needs to know of the model on ``ctx`` (called by the
    backend's ``__init__``: the outdated-SDK warning points at its caller)."""
    counts = abi.InputOutputNum()
    abi.check("rknn_query", query(rt, ctx, abi.QUERY_IN_OUT_NUM, counts))
    input_attrs = [
        query_attr(rt, ctx, abi.QUERY_INPUT_ATTR, i, "input attr") for i in range(counts.n_input)
    ]
    output_attrs = [
        query_attr(rt, ctx, abi.QUERY_OUTPUT_ATTR, i, "output attr") for i in range(counts.n_output)
    ]
    sdk_version = _sdk_version(rt, ctx)
    custom = abi.CustomString()
    custom_string = ""
    if query(rt, ctx, abi.QUERY_CUSTOM_STRING, custom) >= 0:
        # Invalid UTF-8 is replaced, not raised on access (upstream W26).
        custom_string = custom.string.decode("utf-8", "replace")
    return ModelInfo(
        input_attrs,
        output_attrs,
        _dynamic_ranges(rt, ctx, len(input_attrs)),
        config,
        sdk_version=sdk_version,
        custom_string=custom_string,
    )


def _sdk_version(rt: abi.Runtime, ctx: int) -> str:
    """The runtime's API version ("" when it does not say); an old one warns."""
    version = abi.SdkVersion()
    if query(rt, ctx, abi.QUERY_SDK_VERSION, version) < 0:
        return ""
    text: str = version.api_version.decode("utf-8", "replace")
    parsed = abi.parse_version(text)
    if parsed and parsed < abi.RECOMMENDED_VERSION:
        warn(
            f"RKNN API version {text} is likely outdated; behavior may be "
            "unstable. Recommended minimum version is 2.4.1.",
            EzrtWarning,
        )
    return text


def _dynamic_ranges(rt: abi.Runtime, ctx: int, count: int) -> List[List[Shape]]:
    """Per input, the shapes a dynamic model allows ([] for a static input)."""
    ranges: List[List[Shape]] = []
    for i in range(count):
        found = abi.InputRange()
        found.index = i
        shapes: List[Shape] = []
        if query(rt, ctx, abi.QUERY_INPUT_DYNAMIC_RANGE, found) >= 0:
            for k in range(min(found.shape_number, abi.MAX_DYNAMIC_SHAPES)):
                shapes.append(tuple(int(d) for d in found.dyn_range[k][: found.n_dims]))
        ranges.append(shapes)
    return ranges


def _input_fmt(attr: abi.TensorAttr, layout: str) -> int:
    """The format the copy path gives ``rknn_inputs_set``: a 4-D NHWC input is fed as the
    ``layout`` option says; other 4-D inputs as they are (NCHW or NHWC only)."""
    if attr.n_dims != 4:
        return abi.FMT_UNDEFINED
    if attr.fmt != abi.FMT_NHWC:
        return attr.fmt if attr.fmt in (abi.FMT_NCHW, abi.FMT_NHWC) else abi.FMT_UNDEFINED
    return abi.FMT_NCHW if layout == "nchw" else abi.FMT_NHWC


class ModelInfo:
    """One model's tensors as the runtime reports them and as the caller sees them."""

    def __init__(
        self,
        input_attrs: List[abi.TensorAttr],
        output_attrs: List[abi.TensorAttr],
        ranges: List[List[Shape]],
        config: SessionConfig,
        *,
        sdk_version: str,
        custom_string: str,
    ) -> None:
        self.input_attrs = input_attrs
        self.output_attrs = output_attrs
        #: Per input, the shapes a dynamic model allows (NHWC for 4-D NHWC attrs).
        self.ranges = ranges
        self.dynamic = any(ranges)
        self.sdk_version = sdk_version
        self.custom_string = custom_string
        self.layout = config.layout
        #: Outputs are fetched as float32 unless ``output_dtype`` is "native".
        self.want_float = config.output_dtype != "native"
        #: Per input, the format given to rknn_inputs_set and whether ezrt transposes it.
        self.input_fmts = [_input_fmt(attr, self.layout) for attr in input_attrs]
        self.transpose = [
            attr.n_dims == 4 and attr.fmt == abi.FMT_NHWC and self.layout == "nchw_software"
            for attr in input_attrs
        ]
        self.inputs = [self._input_spec(i) for i in range(len(input_attrs))]
        self.outputs = [self._output_spec(i) for i in range(len(output_attrs))]
        self.output_index = {spec.name: i for i, spec in enumerate(self.outputs)}

    def user_shape(self, attr: abi.TensorAttr, dims: Sequence[Optional[int]]) -> Tuple[Any, ...]:
        """The shape the caller feeds for this layout. Only NHWC attrs are permuted (W14)."""
        dims = tuple(dims)
        if attr.n_dims == 4 and attr.fmt == abi.FMT_NHWC and self.layout in NCHW_LAYOUTS:
            return (dims[0], dims[3], dims[1], dims[2])
        return dims

    def _input_spec(self, index: int) -> TensorSpec:
        attr, shapes = self.input_attrs[index], self.ranges[index]
        dims: List[Optional[int]] = list(attr.shape)
        if shapes:  # dynamic: a dim that differs between allowed shapes is symbolic
            dims = [d if len({s[a] for s in shapes}) == 1 else None for a, d in enumerate(dims)]
        if attr.n_dims == 4 and attr.fmt == abi.FMT_NHWC:
            # the layout of the shape reported, not the attr's (upstream N7)
            shown = "NCHW" if self.layout in NCHW_LAYOUTS else "NHWC"
        else:
            shown = abi.FMT_NAMES.get(attr.fmt, "UNDEFINED")
        return TensorSpec(
            attr.text_name or f"input_{index}",
            self.user_shape(attr, dims),
            abi.TENSOR_TYPES.get(attr.type, (None, "tensor(unknown)"))[1],
            accepts=INPUT_DTYPES,
            layout=shown,
        )

    def _output_spec(self, index: int) -> TensorSpec:
        attr = self.output_attrs[index]
        native_type = abi.TENSOR_TYPES.get(attr.type, (None, "tensor(unknown)"))[1]
        return TensorSpec(
            attr.text_name or f"output_{index}",
            attr.shape,
            "tensor(float)" if self.want_float else native_type,
            layout=abi.FMT_NAMES.get(attr.fmt, "UNDEFINED"),
        )

    def check_shapes(self, arrays: Sequence[np.ndarray]) -> None:
        """Dynamic models: the shapes must be one of the combinations the model allows."""
        if not self.dynamic:
            return
        for i, (array, attr, shapes) in enumerate(zip(arrays, self.input_attrs, self.ranges)):
            if not shapes:
                continue
            native = array.shape
            if len(native) == 4 and self.input_fmts[i] != abi.FMT_NHWC and attr.fmt == abi.FMT_NHWC:
                native = (native[0], native[2], native[3], native[1])
            if tuple(native) not in shapes:
                allowed = ", ".join(format_shape(self.user_shape(attr, s)) for s in shapes)
                raise InvalidArgumentError(
                    f"Input '{self.inputs[i].name}' shape {format_shape(array.shape)} is not one "
                    f"the model allows: {allowed}"
                )
