"""What a model says about its tensors: specs, ``NodeArg``, ``ModelMetadata``, dtype names."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ONNX_TO_NUMPY",
    "Dim",
    "ModelMetadata",
    "NodeArg",
    "TensorSpec",
    "dtype_name",
    "format_shape",
]

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
        """The number of dims, or None when unknown."""
        return None if self.shape is None else len(self.shape)

    @property
    def optional(self) -> bool:
        """An ONNX ``optional(...)`` input: a feed may leave it out."""
        return self.type.startswith("optional")


class _AlsoOrts(type):
    """``isinstance(x, ezrt.NodeArg)`` holds for ONNX Runtime's own ``NodeArg`` too: the
    ONNX Runtime backend returns ORT's objects, the RKNN backend ezrt's."""

    def __instancecheck__(cls, instance: Any) -> bool:
        if type.__instancecheck__(cls, instance):
            return True
        onnxruntime = sys.modules.get("onnxruntime")  # never imported just for this
        twin = getattr(onnxruntime, cls.__name__, None) if onnxruntime is not None else None
        return isinstance(twin, type) and isinstance(instance, twin)


class NodeArg(metaclass=_AlsoOrts):
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
class ModelMetadata(metaclass=_AlsoOrts):
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
    """A shape as error messages write it: ``[1, 3, ?, ?]``."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def dtype_name(dtype: np.dtype) -> str:
    """A dtype as error messages name it."""
    return "object" if dtype == np.dtype(object) else str(dtype)
