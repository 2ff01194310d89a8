"""``ezrt.OrtValue``, ``ezrt.IOBinding``, ``ezrt.SessionIOBinding``: one surface, two backends.

On ONNX Runtime these *are* onnxruntime's: every constructor and factory called with ONNX
Runtime's arguments is forwarded unchanged and returns onnxruntime's own object, and any
other class attribute is onnxruntime's. With upstream 0.11's RKNN arguments
(``device_type="rknpu2"``/``"rknpu3"``, ``session=``, ``name=``, ``io_kind=``, or
``ortvalue_from_dmabuf``) they build RKNN values and bindings with upstream's rules.
``isinstance(v, ezrt.OrtValue)`` holds for both kinds.

Importing this module imports neither onnxruntime nor any NPU runtime: each is loaded on
first use.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence, Tuple

import numpy as np

__all__ = ["IOBinding", "OrtValue", "SessionIOBinding"]

_RKNN_DEVICES = ("rknpu2", "rknpu3")


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def _loaded_ort_class(name: str) -> Optional[type]:
    """onnxruntime's class ``name`` if onnxruntime is already imported (an object of that
    class cannot exist otherwise, so an isinstance check never imports it)."""
    module = sys.modules.get("onnxruntime")
    found = getattr(module, name, None) if module is not None else None
    return found if isinstance(found, type) else None


def _rknn_types(*names: str) -> Tuple[type, ...]:
    """ezrt's own RKNN classes, if their module was imported."""
    found = []
    for module_name, class_name in (
        ("ezrt.backends.rknn.values", "RknnOrtValue"),
        ("ezrt.backends.rknn.values", "CpuOrtValue"),
        ("ezrt.backends.rknn.binding", "RknnIOBinding"),
    ):
        if class_name not in names:
            continue
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


class _Forwarding(type):
    """A class whose instances are onnxruntime's (or ezrt's RKNN) objects.

    ``isinstance`` accepts either; class attributes ezrt does not define are onnxruntime's.
    """

    _ort_names: Tuple[str, ...] = ()
    _ezrt_names: Tuple[str, ...] = ()

    def __instancecheck__(cls, obj: Any) -> bool:
        kinds = _rknn_types(*cls._ezrt_names) + tuple(
            found for found in map(_loaded_ort_class, cls._ort_names) if found is not None
        )
        return isinstance(obj, kinds) if kinds else False

    def __subclasscheck__(cls, sub: type) -> bool:
        if sub is cls:
            return True
        kinds = _rknn_types(*cls._ezrt_names) + tuple(
            found for found in map(_loaded_ort_class, cls._ort_names) if found is not None
        )
        return issubclass(sub, kinds) if kinds else False

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(getattr(_ort(), cls._ort_names[0]), name)


def _rknn_session(session: Any, what: str) -> Tuple[Any, Any]:
    """(backend, its zero-copy model) of an ezrt RKNN session."""
    from .errors import InvalidTypeError

    backend = getattr(session, "_backend", None)
    if backend is None or not hasattr(backend, "bound_payload"):
        raise InvalidTypeError(
            f"{what}: session must be an ezrt.InferenceSession on an RKNN model "
            f"(got {type(session).__name__})"
        )
    return backend, backend.zero_copy


def _check_device(device_type: Any, zc: Any) -> None:
    from .errors import InvalidArgumentError

    if device_type != zc.family:
        raise InvalidArgumentError(
            f"device_type must be 'cpu' or '{zc.family}' for this session (got {device_type!r})"
        )


def _cpu_value(array: np.ndarray) -> Any:
    from .backends.rknn.values import CpuOrtValue

    return CpuOrtValue(array)


class OrtValue(metaclass=_Forwarding):
    """A tensor for ``run_with_iobinding``: onnxruntime's ``OrtValue``, or an RKNN value.

    ``OrtValue(...)`` and the factories with ONNX Runtime's arguments return
    ``onnxruntime.OrtValue`` objects; the RKNN forms are documented on each factory.
    """

    _ort_names = ("OrtValue",)
    _ezrt_names = ("RknnOrtValue", "CpuOrtValue")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _ort().OrtValue(*args, **kwargs)

    @staticmethod
    def ortvalue_from_numpy(
        numpy_obj: Any,
        device_type: str = "cpu",
        device_id: int = 0,
        *args: Any,
        name: Optional[str] = None,
        session: Any = None,
        io_kind: Optional[str] = None,
        layout: Any = None,
        sync: Any = None,
        **kwargs: Any,
    ) -> Any:
        """ONNX Runtime's factory, or upstream 0.11's RKNN one.

        RKNN: ``device_type="rknpu2"``/``"rknpu3"`` with ``session`` (an RKNN
        ``InferenceSession``), ``name`` (an input or output) and ``io_kind``
        (``"input"``/``"output"``): NPU memory laid out for that tensor, holding
        ``numpy_obj`` cast to its element type. ``device_type="cpu"`` with any RKNN
        argument: a CPU value wrapping the array. ``layout``/``sync`` are accepted and
        ignored, as upstream.
        """
        rknn = device_type in _RKNN_DEVICES or any(
            v is not None for v in (name, session, io_kind, layout, sync)
        )
        if not rknn:
            try:
                ort = _ort()
            except ImportError:
                if device_type == "cpu" and not args and not kwargs:
                    return _cpu_value(np.asarray(numpy_obj))
                raise
            return ort.OrtValue.ortvalue_from_numpy(
                numpy_obj, device_type, device_id, *args, **kwargs
            )
        from .backends.rknn import zerocopy
        from .errors import InvalidArgumentError, InvalidTypeError

        if device_type == "cpu":
            if not isinstance(numpy_obj, np.ndarray):
                raise InvalidTypeError(
                    f"Input must be a numpy array (got {type(numpy_obj).__name__})"
                )
            if device_id != 0:
                raise InvalidArgumentError(f"RKNN supports device_id 0 only (got {device_id!r})")
            return _cpu_value(numpy_obj)
        if device_type not in _RKNN_DEVICES:
            raise InvalidArgumentError(
                f"device_type must be 'cpu', 'rknpu2', or 'rknpu3' (got {device_type!r})"
            )
        if session is None or name is None or io_kind is None:
            raise InvalidArgumentError("session, name, and io_kind are required for RKNN OrtValue")
        backend, zc = _rknn_session(session, "ortvalue_from_numpy")
        _check_device(device_type, zc)
        return zerocopy.value_from_numpy(zc, backend, numpy_obj, name, io_kind, device_id)

    @staticmethod
    def ortvalue_from_shape_and_type(
        shape: Any,
        element_type: Any = None,
        device_type: str = "cpu",
        device_id: int = 0,
        *args: Any,
        name: Optional[str] = None,
        session: Any = None,
        io_kind: Optional[str] = None,
        layout: Any = None,
        mem_flags: Any = None,
        **kwargs: Any,
    ) -> Any:
        """ONNX Runtime's factory, or upstream 0.11's RKNN one.

        RKNN: ``device_type="rknpu2"``/``"rknpu3"`` with ``session``, ``name``, ``io_kind``:
        new NPU memory for that tensor (``shape`` and ``element_type`` must be the tensor's;
        RKNPU3 inputs also take a 4-D NCHW shape for an NC1HWC2 tensor). ``mem_flags``:
        ``"cacheable"`` (default), ``"non_cacheable"``, ``"try_sram"`` or an int. A
        ``"cpu"`` value with RKNN arguments is a zero-filled CPU tensor.
        """
        rknn = device_type in _RKNN_DEVICES or any(
            v is not None for v in (name, session, io_kind, layout, mem_flags)
        )
        if not rknn:
            return _ort().OrtValue.ortvalue_from_shape_and_type(
                shape, element_type, device_type, device_id, *args, **kwargs
            )
        from .backends.rknn import zerocopy
        from .errors import InvalidArgumentError

        dims = zerocopy.parse_shape(shape)
        dtype = zerocopy.parse_dtype(element_type)
        if device_type == "cpu":
            return _cpu_value(np.zeros(dims, dtype=dtype))
        if device_type not in _RKNN_DEVICES:
            raise InvalidArgumentError(
                f"device_type must be 'cpu', 'rknpu2', or 'rknpu3' (got {device_type!r})"
            )
        if session is None or name is None or io_kind is None:
            raise InvalidArgumentError(
                f"standalone {device_type.upper()} OrtValue requires session, name, and io_kind "
                "(ezrt allocates NPU memory through a session's context)"
            )
        backend, zc = _rknn_session(session, "ortvalue_from_shape_and_type")
        if device_type != zc.family:
            raise InvalidArgumentError(
                "OrtValue device_type does not match session provider; expected "
                f"'{zc.family}' (got {device_type!r})"
            )
        return zerocopy.new_value(
            zc,
            backend,
            name,
            io_kind,
            dtype=dtype,
            shape=dims,
            mem_flags=zerocopy.parse_mem_flags(mem_flags),
            device_id=device_id,
        )

    @staticmethod
    def ortvalue_from_dmabuf(
        fd: int,
        shape: Sequence[int],
        element_type: Any,
        *,
        size: int,
        offset: int = 0,
        virt_addr: Optional[int] = None,
        session: Any = None,
        name: Optional[str] = None,
        io_kind: Optional[str] = None,
        layout: Any = "native",
    ) -> Any:
        """RKNN only: a value over the caller's dma-buf ``fd`` (``size`` bytes from
        ``offset``), e.g. a camera or video-decoder frame, already in the session's native
        layout for that tensor (``session.get_native_inputs()`` gives dims and strides). The
        fd is dup'ed (and mapped unless ``virt_addr`` is given): the caller keeps its own."""
        from .backends.rknn import zerocopy
        from .errors import InvalidArgumentError

        del layout
        if session is None or name is None or io_kind is None:
            raise InvalidArgumentError(
                "session, name, and io_kind are required for dma-buf OrtValue"
            )
        backend, zc = _rknn_session(session, "ortvalue_from_dmabuf")
        return zerocopy.value_from_dmabuf(
            zc,
            backend,
            fd,
            shape,
            element_type,
            size=size,
            offset=offset,
            virt_addr=virt_addr,
            name=name,
            io_kind=io_kind,
        )


def _binding_for(session: Any, ort_name: str, args: Tuple[Any, ...], kwargs: Any) -> Any:
    from .session import InferenceSession

    if isinstance(session, InferenceSession):
        return session.io_binding()
    return getattr(_ort(), ort_name)(session, *args, **kwargs)


class IOBinding(metaclass=_Forwarding):
    """``session.io_binding()``'s result: onnxruntime's ``IOBinding`` or the RKNN binding.

    ``IOBinding(session)`` with an ezrt session is ``session.io_binding()``; with an
    onnxruntime session it is ``onnxruntime.IOBinding(session)``.
    """

    _ort_names = ("IOBinding", "SessionIOBinding")
    _ezrt_names = ("RknnIOBinding",)

    def __new__(cls, session: Any, *args: Any, **kwargs: Any) -> Any:
        return _binding_for(session, "IOBinding", args, kwargs)


class SessionIOBinding(metaclass=_Forwarding):
    """Upstream's name for the binding class (``IOBinding`` is its alias there)."""

    _ort_names = ("SessionIOBinding", "IOBinding")
    _ezrt_names = ("RknnIOBinding",)

    def __new__(cls, session: Any, *args: Any, **kwargs: Any) -> Any:
        return _binding_for(session, "SessionIOBinding", args, kwargs)
