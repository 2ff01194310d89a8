"""Inputs and outputs: model tensor specs, the input-feed parser, output selection.

The parser turns whatever the caller passed (one array, a list, a dict; arrays, lists or
scalars) into a tuple of C-contiguous arrays in the model's own layout, or raises an error
that names the input, what was expected and what was given. It runs on the caller's thread
before admission, so a bad feed never takes a queue slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["FeedParser", "ModelMetadata", "NodeArg", "OutputSelection", "TensorSpec"]

Dim = Union[int, str, None]

#: ONNX type strings (as ORT reports them) and their numpy dtypes.
ONNX_TO_NUMPY: Dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the backend reports it, in the model's own layout.

    ``shape`` entries are ints (fixed), strings (named symbolic dims) or None (unknown);
    ``shape`` itself is None when even the rank is unknown. ``dtype`` is None when numpy has
    no equivalent (the backend then checks the type itself).
    """

    name: str
    shape: Optional[Tuple[Dim, ...]]
    type: str
    dtype: Optional[np.dtype] = None
    #: When ``dtype`` is None: the dtypes the backend converts itself (None = anything).
    accepts: Optional[Tuple[np.dtype, ...]] = None
    #: RKNN: the tensor's layout name ("NCHW", "NHWC", "NC1HWC2", ...); "" when not known.
    layout: str = ""
    #: RKNN: element strides of a native tensor; () for a dense one.
    strides: Tuple[int, ...] = ()

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)


class NodeArg:
    """Name, shape and type of a model input or output, as ``onnxruntime.NodeArg``.

    ``shape`` is a list whose entries are ints, symbolic dimension names (str) or None.
    Shapes of inputs are the ones the caller must feed (with ``layout="nhwc"``, NHWC).
    """

    __slots__ = ("_layout", "_name", "_shape", "_strides", "_type")

    def __init__(
        self,
        name: str,
        shape: Optional[Sequence[Dim]],
        type: str,
        layout: str = "",
        strides: Sequence[int] = (),
    ) -> None:
        self._name = name
        self._shape = None if shape is None else list(shape)
        self._type = type
        self._layout = layout
        self._strides = list(strides)

    @property
    def name(self) -> str:
        """The tensor's name."""
        return self._name

    @property
    def shape(self) -> Optional[List[Dim]]:
        """Dims (int, symbolic name or None), or None when even the rank is unknown."""
        return None if self._shape is None else list(self._shape)

    @property
    def type(self) -> str:
        """The ONNX type string, e.g. ``tensor(float)``."""
        return self._type

    @property
    def layout(self) -> str:
        """RKNN (upstream 0.11): the layout of ``shape`` ("NCHW", "NHWC", "NC1HWC2",
        "UNDEFINED", ...); "" where the backend does not say."""
        return self._layout

    @property
    def strides(self) -> List[int]:
        """RKNN (upstream 0.11): element strides of a native tensor; [] for a dense one."""
        return list(self._strides)

    def __repr__(self) -> str:
        return f"NodeArg(name={self._name!r}, type={self._type!r}, shape={self._shape!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeArg):
            return NotImplemented
        return (self._name, self._shape, self._type) == (other._name, other._shape, other._type)

    def __hash__(self) -> int:
        return hash((self._name, self._type))


@dataclass(frozen=True)
class ModelMetadata:
    """Model metadata with the fields of ``onnxruntime.ModelMetadata``.

    ``custom_metadata_map`` holds the model's free-form key/value pairs (on RKNN models,
    ``rknn_custom_string`` when the model carries one).
    """

    producer_name: str = ""
    graph_name: str = ""
    domain: str = ""
    description: str = ""
    graph_description: str = ""
    version: int = 0
    custom_metadata_map: Dict[str, str] = field(default_factory=dict)


def format_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dtype_name(dtype: np.dtype) -> str:
    return "object" if dtype == np.dtype(object) else str(dtype)


@dataclass(frozen=True)
class OutputSelection:
    """Which outputs to fetch and how to arrange them.

    ``fetch`` are distinct names to ask the backend for (None = all, model order);
    ``picks`` maps each requested position to an index into the fetched list (None when the
    request is exactly ``fetch``). A name asked for twice yields two independent arrays.
    """

    fetch: Optional[Tuple[str, ...]]
    picks: Optional[Tuple[int, ...]] = None

    def arrange(self, fetched: List[Any]) -> List[Any]:
        if self.picks is None:
            return fetched
        seen = set()
        arranged = []
        for index in self.picks:
            value = fetched[index]
            if index in seen and isinstance(value, np.ndarray):
                value = value.copy()
            seen.add(index)
            arranged.append(value)
        return arranged


_ALL_OUTPUTS = OutputSelection(None)


# (name, dtype, rank, exact shape or None, fixed (axis, size) pairs): see FeedParser.
_FastPlan = Tuple[str, np.dtype, int, Optional[Tuple[int, ...]], Tuple[Tuple[int, int], ...]]


class FeedParser:
    """Validates input feeds against the model's inputs for one session."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        layout: str,
        check: Optional[Any] = None,
    ):
        #: Backend validation run on every parsed feed (e.g. allowed dynamic shapes).
        self._check = check
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.layout = layout
        self.input_names = [spec.name for spec in self.inputs]
        self.output_names = [spec.name for spec in self.outputs]
        self._output_index = {name: i for i, name in enumerate(self.output_names)}
        # With layout "nhwc" the caller feeds 4-D inputs as NHWC; the model wants NCHW.
        self._nhwc = tuple(layout == "nhwc" and spec.rank == 4 for spec in self.inputs)
        self.user_shapes: Tuple[Optional[Tuple[Dim, ...]], ...] = tuple(
            (s.shape[0], s.shape[2], s.shape[3], s.shape[1]) if nhwc and s.shape else s.shape
            for s, nhwc in zip(self.inputs, self._nhwc)
        )
        # The fast path: per input, (name, dtype, rank, exact shape or None, fixed (axis,
        # size) pairs), for feeds of ndarrays with the right dtype in the model's own
        # layout; None when some input never qualifies. Anything else takes the general
        # path, which also produces every error message.
        plans: Optional[List[_FastPlan]] = []
        for spec, shape, nhwc in zip(self.inputs, self.user_shapes, self._nhwc):
            if plans is None or nhwc or spec.dtype is None or shape is None:
                plans = None
                continue
            fixed = tuple(
                (axis, d) for axis, d in enumerate(shape) if isinstance(d, int) and d >= 0
            )
            exact = tuple(d for _, d in fixed) if len(fixed) == len(shape) else None
            plans.append((spec.name, np.dtype(spec.dtype), len(shape), exact, fixed))
        self._fast: Optional[Tuple[_FastPlan, ...]] = None if plans is None else tuple(plans)

    # ------------------------------------------------------------------ introspection

    def input_args(self) -> List[NodeArg]:
        return [
            NodeArg(spec.name, shape, spec.type, spec.layout, spec.strides)
            for spec, shape in zip(self.inputs, self.user_shapes)
        ]

    def output_args(self) -> List[NodeArg]:
        return [
            NodeArg(spec.name, spec.shape, spec.type, spec.layout, spec.strides)
            for spec in self.outputs
        ]

    # ------------------------------------------------------------------ outputs

    def select_outputs(self, output_names: Any) -> OutputSelection:
        """Resolve ``output_names``: None or empty means all outputs (as onnxruntime)."""
        if output_names is None:
            return _ALL_OUTPUTS
        if isinstance(output_names, (str, bytes)) or not isinstance(output_names, Sequence):
            raise InvalidTypeError(
                "output_names must be a sequence or None "
                f"(got {type(output_names).__name__}: {output_names!r}; "
                "for one output write [name])"
            )
        if len(output_names) == 0:
            return _ALL_OUTPUTS
        fetch: List[str] = []
        picks: List[int] = []
        for name in output_names:
            if not isinstance(name, str):
                raise InvalidTypeError(
                    f"output_names must contain strings (got {type(name).__name__}: {name!r})"
                )
            if name not in self._output_index:
                raise InvalidArgumentError(
                    f"Unknown output name: {name} (model outputs: {', '.join(self.output_names)})"
                )
            if name not in fetch:
                fetch.append(name)
            picks.append(fetch.index(name))
        exact = len(fetch) == len(picks)
        return OutputSelection(tuple(fetch), None if exact else tuple(picks))

    # ------------------------------------------------------------------ inputs

    def _as_list(self, input_feed: Any) -> List[Any]:
        """The feed's values in model input order (container checks only)."""
        expected = len(self.inputs)
        if isinstance(input_feed, np.ndarray):
            if expected != 1:
                raise InvalidArgumentError(
                    f"Model expects {expected} inputs, but a single array was given "
                    f"(inputs: {', '.join(self.input_names)})"
                )
            return [input_feed]
        if isinstance(input_feed, Mapping):
            missing = [name for name in self.input_names if name not in input_feed]
            unknown = [repr(key) for key in input_feed if key not in self.input_names]
            if len(input_feed) != expected:
                detail = f"; unknown names: {', '.join(unknown)}" if unknown else ""
                raise InvalidArgumentError(
                    f"Input dict size mismatch: expected {expected}, got {len(input_feed)} "
                    f"(model inputs: {', '.join(self.input_names)}{detail})"
                )
            if missing:
                raise InvalidArgumentError(
                    f"Missing input: {missing[0]} (given: {', '.join(unknown)})"
                )
            return [input_feed[name] for name in self.input_names]
        if isinstance(input_feed, (list, tuple)):
            if len(input_feed) != expected:
                raise InvalidArgumentError(
                    f"Input list size mismatch: expected {expected}, got {len(input_feed)} "
                    f"(model inputs, in order: {', '.join(self.input_names)})"
                )
            return list(input_feed)
        raise InvalidTypeError(
            "input_feed must be a numpy array, list/tuple, or dict "
            f"(got {type(input_feed).__name__})"
        )

    def _to_array(self, index: int, value: Any) -> np.ndarray:
        """Convert one value, with the model's dtype (arrays keep theirs and must match)."""
        spec = self.inputs[index]
        expected = spec.dtype
        if value is None:
            raise InvalidTypeError(f"Input '{spec.name}' is None; expected an array")
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            if expected is None and spec.accepts is not None:
                return self._accepted(spec, array)
            if expected is not None and array.dtype != expected:
                native = array.dtype.newbyteorder("=")
                if native == expected:  # same type, other byte order: a representation detail
                    return array.astype(expected)
                if expected == np.dtype(object) and array.dtype.kind in "US":
                    return array.astype(object)
                raise InvalidTypeError(
                    f"Input '{spec.name}' dtype mismatch: expected {_dtype_name(expected)}, "
                    f"got {_dtype_name(array.dtype)} (convert with .astype(np.{expected}))"
                )
            return array
        # Plain Python values (lists, numbers) have no dtype of their own: take the model's
        # where numpy converts without changing kind (float64 -> float32, never 1.5 -> 1).
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise InvalidTypeError(
                f"Input '{spec.name}' could not be converted to a numpy array: {exc}"
            ) from None
        if expected is None and spec.accepts is not None:
            if array.dtype == np.float64:  # Python floats: the backend's usual float type
                array = array.astype(np.float32)
            return self._accepted(spec, array)
        if array.dtype == np.dtype(object) and expected != np.dtype(object):
            raise InvalidTypeError(
                f"Input '{spec.name}' could not be converted to a numeric array "
                f"(got {type(value).__name__} of mixed or non-numeric values)"
            )
        if expected is not None and array.dtype != expected:
            if expected == np.dtype(object):
                return array.astype(object)
            if not np.can_cast(array.dtype, expected, casting="same_kind"):
                raise InvalidTypeError(
                    f"Input '{spec.name}' dtype mismatch: expected {_dtype_name(expected)}, "
                    f"got {type(value).__name__} of {_dtype_name(array.dtype)}"
                )
            array = array.astype(expected)
        return array

    @staticmethod
    def _accepted(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
        accepts = spec.accepts or ()
        if array.dtype in accepts:
            return array
        if array.dtype.newbyteorder("=") in accepts:
            return array.astype(array.dtype.newbyteorder("="))
        raise InvalidTypeError(
            f"Input '{spec.name}' dtype {_dtype_name(array.dtype)} is not supported by this "
            f"backend (supported: {', '.join(_dtype_name(d) for d in accepts)})"
        )

    def _check_shape(self, index: int, array: np.ndarray, *, batch: bool) -> None:
        spec = self.inputs[index]
        shape = self.user_shapes[index]
        if shape is None:
            return
        if array.ndim != len(shape):
            raise InvalidArgumentError(
                f"Input rank mismatch: expected {len(shape)}, got {array.ndim} "
                f"(input '{spec.name}': expected shape {format_shape(shape)}, "
                f"got {format_shape(array.shape)})"
            )
        for axis, (want, got) in enumerate(zip(shape, array.shape)):
            if batch and axis == 0:
                continue
            if isinstance(want, int) and want >= 0 and want != got:
                prefix = "Batch input" if batch else "Input"
                expected = (array.shape[0], *shape[1:]) if batch else shape
                raise InvalidArgumentError(
                    f"{prefix} '{spec.name}' shape mismatch: expected {format_shape(expected)}, "
                    f"got {format_shape(array.shape)} (axis {axis})"
                )

    def _to_model_layout(self, index: int, array: np.ndarray, copy: bool) -> np.ndarray:
        if self._nhwc[index]:
            # One copy that transposes and owns its memory (ascontiguousarray may return a
            # view when the transposed array happens to be contiguous).
            return np.array(array.transpose(0, 3, 1, 2), order="C", copy=True)
        if copy:
            return np.array(array, order="C", copy=True)
        return np.ascontiguousarray(array)

    def _parse_fast(self, input_feed: Any, copy: bool) -> Optional[Tuple[np.ndarray, ...]]:
        """The common case in few bytecodes; None means "take the general path"."""
        plans = self._fast
        if plans is None:
            return None
        get: Callable[[str], Any]
        if type(input_feed) is dict:
            if len(input_feed) != len(plans):
                return None
            get = input_feed.get
        elif type(input_feed) is np.ndarray and len(plans) == 1:
            get = {plans[0][0]: input_feed}.get
        else:
            return None
        arrays = []
        for name, dtype, rank, exact, fixed in plans:
            value = get(name)
            if type(value) is not np.ndarray or value.dtype != dtype:
                return None
            if exact is not None:
                if value.shape != exact:
                    return None
            elif value.ndim == rank:
                shape = value.shape
                for axis, size in fixed:
                    if shape[axis] != size:
                        return None
            else:
                return None
            if copy:
                arrays.append(value.copy())  # C order, owned
            elif value.flags.c_contiguous:
                arrays.append(value)
            else:
                arrays.append(np.ascontiguousarray(value))
        return tuple(arrays)

    def parse(self, input_feed: Any, *, copy: bool) -> Tuple[np.ndarray, ...]:
        """Validated arrays in the model's layout. ``copy``: the result owns its memory."""
        fast = self._parse_fast(input_feed, copy)
        if fast is not None:
            if self._check is not None:
                self._check(fast)
            return fast
        values = self._as_list(input_feed)
        arrays = []
        for index, value in enumerate(values):
            array = self._to_array(index, value)
            self._check_shape(index, array, batch=False)
            # A conversion above already made a private array; copying again is waste.
            owned = copy and (array is value or array.base is not None)
            arrays.append(self._to_model_layout(index, array, owned))
        if self._check is not None:
            self._check(arrays)
        return tuple(arrays)

    def parse_batch(self, input_feed: Any) -> Tuple[List[Tuple[np.ndarray, ...]], int]:
        """Split a batch along axis 0 into samples of leading size 1 (views, no copy)."""
        values = self._as_list(input_feed)
        arrays = []
        batch_size: Optional[int] = None
        for index, value in enumerate(values):
            spec = self.inputs[index]
            array = self._to_array(index, value)
            if array.ndim < 1:
                raise InvalidArgumentError(
                    f"Batch input must have ndim >= 1 (input '{spec.name}' is a scalar)"
                )
            self._check_shape(index, array, batch=True)
            lead = spec.shape[0] if spec.shape else None
            if isinstance(lead, int) and lead not in (0, 1):
                raise InvalidArgumentError(
                    "Batch mode requires model input batch dimension == 1 "
                    f"(input '{spec.name}' has {lead})"
                )
            if batch_size is None:
                batch_size = array.shape[0]
            elif array.shape[0] != batch_size:
                raise InvalidArgumentError(
                    f"Batch size mismatch across inputs: '{self.input_names[0]}' has "
                    f"{batch_size}, '{spec.name}' has {array.shape[0]}"
                )
            arrays.append(self._to_model_layout(index, array, copy=False))
        if not batch_size:
            raise InvalidArgumentError("Batch size must be greater than 0")
        samples = [tuple(a[b : b + 1] for a in arrays) for b in range(batch_size)]
        return samples, batch_size


def concat_batch(outputs: List[List[Any]]) -> List[Any]:
    """Join per-sample outputs along axis 0 (rank-0 outputs are stacked into shape (B,))."""
    joined = []
    for per_sample in zip(*outputs):
        first = per_sample[0]
        if isinstance(first, np.ndarray) and first.ndim == 0:
            joined.append(np.stack(per_sample))
        else:
            joined.append(np.concatenate(per_sample, axis=0))
    return joined
