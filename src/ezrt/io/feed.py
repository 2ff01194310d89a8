"""Input feeds: what the caller passed, turned into what a backend's workers run.

Two parsers share one layout and one fast path:

* :class:`FeedParser` (strict) turns any accepted feed (one array, a list, a dict; arrays,
  lists, scalars, array-likes) into a tuple of C-contiguous arrays in the model's own
  layout, or raises an error that names the input, what was expected and what was given.
  The RKNN backend runs on it, and so does batch dispatch everywhere.
* :class:`OrtFeed` (ONNX Runtime) keeps ORT's own behaviour: a dict goes to ORT as the
  caller gave it. It checks only what it knows ORT would refuse (a missing required
  input, an array of the wrong dtype or shape), and asks ORT itself for the error text;
  sequences, maps, optional and string inputs, ``OrtValue``s, fed initializers and
  anything else it does not recognise reach ORT unchanged.

Both run on the caller's thread before admission, so a feed refused here never takes a
queue slot. With ``copy=True`` (every call that returns before its task has run) the
result owns all its memory, so the caller may reuse its buffers at once (DESIGN invariant
4): arrays are copied, and so is every value that is not a fresh array made here.
``OrtValue``s are the explicit zero-copy API and are shared, never copied.
"""

from __future__ import annotations

import copy as copying
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError
from .outputs import ALL_OUTPUTS, OutputNames, OutputSelection
from .specs import Dim, NodeArg, TensorSpec, dtype_name, format_shape

__all__ = ["FeedParser", "InputPlan", "OrtFeed"]

#: Python values with no memory of their own: numpy always makes a fresh array of them.
_NATIVE = (list, tuple, int, float, bool, complex)


class InputPlan(NamedTuple):
    """The fast path's check of one input: an ndarray of exactly this dtype and shape."""

    name: str
    dtype: np.dtype
    rank: int
    exact: Optional[Tuple[int, ...]]  # the whole shape when every dim is fixed
    fixed: Tuple[Tuple[int, int], ...]  # (axis, size) of the fixed dims


class _Layout:
    """The shapes the caller feeds, and the fast path's plans; shared by both parsers."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[str], layout: str) -> None:
        self.inputs = tuple(inputs)
        self.outputs = OutputNames(outputs)
        self.layout = layout
        self.input_names = [spec.name for spec in self.inputs]
        # With layout "nhwc" the caller feeds 4-D inputs as NHWC; the model wants NCHW.
        self._nhwc = tuple(layout == "nhwc" and spec.rank == 4 for spec in self.inputs)
        self.user_shapes: Tuple[Optional[Tuple[Dim, ...]], ...] = tuple(
            (s.shape[0], s.shape[2], s.shape[3], s.shape[1]) if nhwc and s.shape else s.shape
            for s, nhwc in zip(self.inputs, self._nhwc)
        )
        self._plans = self._fast_plans()

    def _fast_plans(self) -> Optional[Tuple[InputPlan, ...]]:
        """Plans for feeds of ndarrays with the right dtype in the model's own layout; None
        when some input never qualifies (it then always takes the general path)."""
        plans = []
        for spec, shape, nhwc in zip(self.inputs, self.user_shapes, self._nhwc):
            if nhwc or spec.dtype is None or shape is None:
                return None
            fixed = tuple(
                (axis, d) for axis, d in enumerate(shape) if isinstance(d, int) and d >= 0
            )
            exact = tuple(d for _, d in fixed) if len(fixed) == len(shape) else None
            plans.append(InputPlan(spec.name, np.dtype(spec.dtype), len(shape), exact, fixed))
        return tuple(plans)

    def input_args(self) -> List[NodeArg]:
        """The inputs as ``NodeArg``s, with the shapes the caller feeds."""
        return [
            NodeArg(spec.name, shape, spec.type, spec.layout, spec.strides)
            for spec, shape in zip(self.inputs, self.user_shapes)
        ]

    def match_fast(self, input_feed: Any) -> Optional[List[np.ndarray]]:
        """The feed's arrays in model order when it is the common case: a dict (or a list
        or tuple in input order, or for a one-input model a bare ndarray) of ndarrays of
        exactly the model's dtypes and fixed dims. None means "take the general path"."""
        plans = self._plans
        if plans is None:
            return None
        kind = type(input_feed)
        values: Sequence[Any]
        if kind is dict:
            if len(input_feed) != len(plans):
                return None
            values = [input_feed.get(plan.name) for plan in plans]
        elif kind is list or kind is tuple:  # ezrt's positional form
            if len(input_feed) != len(plans):
                return None
            values = input_feed
        elif kind is np.ndarray and len(plans) == 1:
            values = (input_feed,)
        else:
            return None
        arrays = []
        for (_, dtype, rank, exact, fixed), value in zip(plans, values):
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
            arrays.append(value)
        return arrays

    def in_model_order(self, input_feed: Any) -> List[Any]:
        """ezrt's positional forms (one array for a one-input model, a list or tuple in
        model input order) as a list of values; a dict is the caller's business."""
        expected = len(self.inputs)
        if isinstance(input_feed, np.ndarray):
            if expected != 1:
                raise InvalidArgumentError(
                    f"Model expects {expected} inputs, but a single array was given "
                    f"(inputs: {', '.join(self.input_names)})"
                )
            return [input_feed]
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

    def to_array(self, index: int, value: Any) -> Tuple[np.ndarray, bool]:
        """Convert one value with the model's dtype: (array, made here). Arrays keep their
        dtype and must match; an array made here from a value owns its memory."""
        spec = self.inputs[index]
        if value is None:
            raise InvalidTypeError(f"Input '{spec.name}' is None; expected an array")
        if isinstance(value, (np.ndarray, np.generic)):
            array, fresh = _from_numpy(spec, np.asarray(value))
            return array, fresh or isinstance(value, np.generic)
        # Plain Python values (lists, numbers) have no dtype of their own: take the model's
        # where numpy converts without changing kind (float64 -> float32, never 1.5 -> 1).
        # Other array-likes (``__array__``, buffers) may share their memory: not fresh.
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise InvalidTypeError(
                f"Input '{spec.name}' could not be converted to a numpy array: {exc}"
            ) from None
        converted, fresh = _from_python(spec, array, type(value).__name__)
        return converted, fresh or isinstance(value, _NATIVE)

    def check_shape(self, index: int, array: np.ndarray, *, batch: bool) -> None:
        """Rank and fixed dims against the shape the caller feeds (axis 0 free in a batch)."""
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

    def to_model_layout(self, index: int, array: np.ndarray, copy: bool) -> np.ndarray:
        """C-contiguous in the model's layout; a private copy when ``copy``."""
        if self._nhwc[index]:
            # One copy that transposes and owns its memory (ascontiguousarray may return a
            # view when the transposed array happens to be contiguous).
            return np.array(array.transpose(0, 3, 1, 2), order="C", copy=True)
        if copy:
            return np.array(array, order="C", copy=True)
        return np.ascontiguousarray(array)


def _from_numpy(spec: TensorSpec, array: np.ndarray) -> Tuple[np.ndarray, bool]:
    expected = spec.dtype
    if expected is None and spec.accepts is not None:
        return _accepted(spec, array)
    if expected is not None and array.dtype != expected:
        native = array.dtype.newbyteorder("=")
        if native == expected:  # same type, other byte order: a representation detail
            return array.astype(expected), True
        if expected == np.dtype(object) and array.dtype.kind in "US":
            return array.astype(object), True
        raise InvalidTypeError(
            f"Input '{spec.name}' dtype mismatch: expected {dtype_name(expected)}, "
            f"got {dtype_name(array.dtype)} (convert with .astype(np.{expected}))"
        )
    return array, False


def _from_python(spec: TensorSpec, array: np.ndarray, given: str) -> Tuple[np.ndarray, bool]:
    expected = spec.dtype
    if expected is None and spec.accepts is not None:
        if array.dtype == np.float64:  # Python floats: the backend's usual float type
            return _accepted(spec, array.astype(np.float32))[0], True
        return _accepted(spec, array)
    if array.dtype == np.dtype(object) and expected != np.dtype(object):
        raise InvalidTypeError(
            f"Input '{spec.name}' could not be converted to a numeric array "
            f"(got {given} of mixed or non-numeric values)"
        )
    if expected is not None and array.dtype != expected:
        if expected == np.dtype(object):
            return array.astype(object), True
        if not np.can_cast(array.dtype, expected, casting="same_kind"):
            raise InvalidTypeError(
                f"Input '{spec.name}' dtype mismatch: expected {dtype_name(expected)}, "
                f"got {given} of {dtype_name(array.dtype)}"
            )
        return array.astype(expected), True
    return array, False


def _accepted(spec: TensorSpec, array: np.ndarray) -> Tuple[np.ndarray, bool]:
    accepts = spec.accepts or ()
    if array.dtype in accepts:
        return array, False
    if array.dtype.newbyteorder("=") in accepts:
        return array.astype(array.dtype.newbyteorder("=")), True
    raise InvalidTypeError(
        f"Input '{spec.name}' dtype {dtype_name(array.dtype)} is not supported by this "
        f"backend (supported: {', '.join(dtype_name(d) for d in accepts)})"
    )


class FeedParser(_Layout):
    """The strict parser: every feed becomes a tuple of arrays in the model's layout."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[str],
        layout: str,
        check: Optional[Callable[[Sequence[np.ndarray]], None]] = None,
    ) -> None:
        super().__init__(inputs, outputs, layout)
        #: Backend validation run on every parsed feed (e.g. allowed dynamic shapes).
        self._check = check

    def _values(self, input_feed: Any) -> List[Any]:
        """The feed's values in model input order (container checks only)."""
        if not isinstance(input_feed, Mapping):
            return self.in_model_order(input_feed)
        expected = len(self.inputs)
        names = self.input_names
        missing = [name for name in names if name not in input_feed]
        unknown = [repr(key) for key in input_feed if key not in names]
        if len(input_feed) != expected:
            detail = f"; unknown names: {', '.join(unknown)}" if unknown else ""
            raise InvalidArgumentError(
                f"Input dict size mismatch: expected {expected}, got {len(input_feed)} "
                f"(model inputs: {', '.join(names)}{detail})"
            )
        if missing:
            raise InvalidArgumentError(f"Missing input: {missing[0]} (given: {', '.join(unknown)})")
        return [input_feed[name] for name in names]

    def select(self, output_names: Any, inputs: Any) -> OutputSelection:
        """Which outputs a call asks for (validated against the model's)."""
        return self.outputs.select(output_names)

    def parse(self, input_feed: Any, *, copy: bool) -> Tuple[np.ndarray, ...]:
        """Validated arrays in the model's layout. ``copy``: the result owns its memory."""
        arrays = self.match_fast(input_feed)
        if arrays is not None:
            if copy:
                arrays = [array.copy() for array in arrays]  # C order, owned
            else:
                arrays = [np.ascontiguousarray(array) for array in arrays]
        else:
            arrays = []
            for index, value in enumerate(self._values(input_feed)):
                array, fresh = self.to_array(index, value)
                self.check_shape(index, array, batch=False)
                # An array made here is private already; copying it again is waste.
                arrays.append(self.to_model_layout(index, array, copy and not fresh))
        if self._check is not None:
            self._check(arrays)
        return tuple(arrays)

    def parse_batch(self, input_feed: Any) -> Tuple[List[Tuple[np.ndarray, ...]], int]:
        """Split a batch along axis 0 into samples of leading size 1 (views, no copy)."""
        arrays = []
        batch_size: Optional[int] = None
        for index, value in enumerate(self._values(input_feed)):
            spec = self.inputs[index]
            array, _ = self.to_array(index, value)
            if array.ndim < 1:
                raise InvalidArgumentError(
                    f"Batch input must have ndim >= 1 (input '{spec.name}' is a scalar)"
                )
            self.check_shape(index, array, batch=True)
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
            arrays.append(self.to_model_layout(index, array, copy=False))
        if not batch_size:
            raise InvalidArgumentError("Batch size must be greater than 0")
        samples = [tuple(a[b : b + 1] for a in arrays) for b in range(batch_size)]
        return samples, batch_size


#: Asks ONNX Runtime itself about a call ezrt's checks refused: ``probe(feed, output_names)``
#: raises ORT's own error, or returns when ORT accepts the call after all.
Probe = Callable[[Dict[str, Any], Any], None]


class OrtFeed(_Layout):
    """ONNX Runtime's feed: a dict of input name -> value, as ORT's ``run`` takes it."""

    def __init__(
        self, inputs: Sequence[TensorSpec], outputs: Sequence[str], layout: str, probe: Probe
    ) -> None:
        super().__init__(inputs, outputs, layout)
        self._probe = probe
        self._required = [spec.name for spec in self.inputs if not spec.optional]
        self._output_set = frozenset(outputs)

    def select(self, output_names: Any, inputs: Any) -> OutputSelection:
        """The outputs to fetch, as ORT takes them (duplicates included: ORT returns each).
        Names ezrt does not know are ORT's to judge, with the call's feed."""
        if output_names is None:
            return ALL_OUTPUTS
        if isinstance(output_names, (list, tuple)):
            if not output_names:
                return ALL_OUTPUTS
            known = self._output_set
            if all(type(name) is str and name in known for name in output_names):
                return OutputSelection(tuple(output_names))
        self._probe(inputs, output_names)  # raises ORT's error, unless ORT takes the names
        return OutputSelection(output_names)

    def parse(self, input_feed: Any, *, copy: bool) -> Dict[str, Any]:
        """The feed for ORT's ``run``. ``copy``: the result shares no memory with the
        caller's values (``OrtValue``s excepted)."""
        if type(input_feed) is dict:
            fast = self._parse_dict_fast(input_feed, copy)
            if fast is not None:
                return fast
        else:
            arrays = self.match_fast(input_feed)
            if arrays is not None:
                return {
                    name: array.copy() if copy else array
                    for name, array in zip(self.input_names, arrays)
                }
        return self._parse_general(input_feed, copy)

    def _parse_dict_fast(self, input_feed: Dict[str, Any], copy: bool) -> Optional[Dict[str, Any]]:
        """The commonest feed, a dict of exactly the model's arrays, in one pass (the
        caller's own dict when nothing needs copying); None: take the general path."""
        plans = self._plans
        if plans is None or len(input_feed) != len(plans):
            return None
        copies = {}
        for name, dtype, rank, exact, fixed in plans:
            value = input_feed.get(name)
            if type(value) is not np.ndarray or value.dtype != dtype:
                return None
            shape = value.shape
            if exact is not None:
                if shape != exact:
                    return None
            elif len(shape) == rank:
                for axis, size in fixed:
                    if shape[axis] != size:
                        return None
            else:
                return None
            if copy:
                copies[name] = value.copy()
        return copies if copy else input_feed  # the caller's dict: exactly what ORT would get

    def _parse_general(self, input_feed: Any, copy: bool) -> Dict[str, Any]:
        """Every other feed: ezrt's forms, values ORT reads itself, ezrt's conversions."""
        if isinstance(input_feed, Mapping):
            feed = dict(input_feed)
            self._check_required(feed)
        else:  # ezrt's positional forms
            feed = dict(zip(self.input_names, self.in_model_order(input_feed)))
        index_of = {name: i for i, name in enumerate(self.input_names)}
        refused = False
        for name, value in feed.items():
            index = index_of.get(name)
            if index is None or self.inputs[index].dtype is None:
                feed[name] = _owned(value) if copy else value  # ORT's business entirely
                continue
            converted, refused_here = self._convert(index, value, copy)
            feed[name] = converted
            refused = refused or refused_here
        if refused:
            self._probe(feed, None)  # raises ORT's own error; returns only if ORT took it
        return feed

    def _check_required(self, feed: Dict[str, Any]) -> None:
        """ORT's own check of its Python ``run`` (the workers call ORT's binding directly)."""
        missing = [name for name in self._required if name not in feed]
        if missing:
            raise InvalidArgumentError(
                f"Required inputs ({missing}) are missing from input feed ({list(feed)})."
            )

    def _convert(self, index: int, value: Any, copy: bool) -> Tuple[Any, bool]:
        """One value of a tensor input with a known dtype: (value for ORT, refused)."""
        spec = self.inputs[index]
        if self._nhwc[index] or isinstance(value, np.generic) or not _ort_takes(value):
            # ezrt's extensions: the NHWC layout, and scalars and array-likes that ORT
            # cannot read, checked and converted as the strict parser does.
            array, fresh = self.to_array(index, value)
            self.check_shape(index, array, batch=False)
            return self.to_model_layout(index, array, copy and not fresh), False
        if isinstance(value, np.ndarray):
            shape = self.user_shapes[index]
            if shape is not None and not _fits(value.shape, shape):
                return value, True
            dtype = value.dtype
            if dtype != spec.dtype and dtype.kind not in "OUSV":
                if dtype.newbyteorder("=") != spec.dtype:
                    return value, True
                # ORT would read the bytes as native ones and compute garbage: convert.
                return value.astype(spec.dtype), False
        return (_owned(value) if copy else value), False


def _fits(shape: Tuple[int, ...], want: Tuple[Dim, ...]) -> bool:
    """Rank and fixed dims as ORT checks them."""
    if len(shape) != len(want):
        return False
    return all(not isinstance(w, int) or w < 0 or w == got for got, w in zip(shape, want))


def _ort_takes(value: Any) -> bool:
    """Values ORT's ``run`` reads itself: arrays, nested lists, strings, maps, ``None`` (an
    omitted optional input) and ORT's own ``OrtValue``s; anything else it refuses."""
    if value is None or isinstance(value, (np.ndarray, list, tuple, str, bytes, dict)):
        return True
    return type(value).__name__ == "OrtValue"


def _owned(value: Any) -> Any:
    """A copy sharing no memory with ``value``; ``OrtValue``s are shared on purpose."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return value
    if type(value).__name__ == "OrtValue":
        return value
    return copying.deepcopy(value)
