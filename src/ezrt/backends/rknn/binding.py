"""``SessionIOBinding`` for RKNN sessions (upstream 0.11's API, its bugs fixed).

A binding belongs to one session (it holds it, so the session outlives it) and records which
value is bound to each input and output. ``run_with_iobinding`` turns it into a
:class:`~ezrt.backends.rknn.zerocopy.BoundRun` snapshot that the session hands to its engine
like any task: it runs on whichever worker takes it, on that worker's own zero-copy context,
so bound runs are safe beside ``run_async`` and use every NPU core.

Outputs left unbound are allocated on the NPU at the first run and stay bound; unlike
upstream, ``get_outputs()`` and ``copy_outputs_to_cpu()`` return them (explicitly bound
outputs first, in the order they were bound, then the others in model order).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ...errors import InvalidArgumentError, InvalidTypeError, SessionClosedError
from .values import CpuOrtValue, IoSpec, RknnOrtValue
from .zerocopy import BoundRun, new_value, parse_dtype, parse_mem_flags, parse_shape, spec_of

__all__ = ["RknnIOBinding", "bound_payload"]


class RknnIOBinding:
    """Bound inputs and outputs of one RKNN session (``session.io_binding()``)."""

    def __init__(self, session: Any, backend: Any) -> None:
        self._session = session  # a binding keeps its session alive (no dangling pointer)
        self._backend = backend
        self._inputs: Dict[int, RknnOrtValue] = {}
        self._outputs: Dict[int, RknnOrtValue] = {}
        self._output_order: List[int] = []  # explicitly bound, in order of first binding
        self._cpu_outputs: set[int] = set()

    # ------------------------------------------------------------------ helpers

    @property
    def _zc(self) -> Any:
        if self._backend.closed:
            raise SessionClosedError("IOBinding rejected: its session is closed")
        return self._backend.zero_copy

    def _device_ok(self, device_type: Any) -> None:
        family = self._zc.family
        if device_type not in ("cpu", family):
            raise InvalidArgumentError(
                f"device_type must be 'cpu' or '{family}' for this session (got {device_type!r})"
            )

    # ------------------------------------------------------------------ inputs

    def bind_cpu_input(self, name: str, arr_on_cpu: Any) -> None:
        """Copy ``arr_on_cpu`` (exactly the input's shape and element type; RKNPU3 also
        takes NCHW for an NC1HWC2 input) into new NPU memory and bind it."""
        if not isinstance(arr_on_cpu, np.ndarray):
            raise InvalidTypeError(
                f"bind_cpu_input needs a numpy array (got {type(arr_on_cpu).__name__})"
            )
        zc = self._zc
        value = new_value(
            zc, self._backend, name, "input", dtype=arr_on_cpu.dtype, shape=arr_on_cpu.shape
        )
        try:
            value.update_inplace(np.ascontiguousarray(arr_on_cpu))
        except BaseException:
            value.memory.free()
            raise
        self._inputs[value.spec.index] = value

    def bind_input(self, *args: Any, **kwargs: Any) -> None:
        """Raw device pointers cannot be bound: RKNN memory is a dma-buf imported per context."""
        raise InvalidArgumentError(
            "bind_input with raw buffer_ptr is not supported; use an OrtValue or "
            "OrtValue.ortvalue_from_dmabuf"
        )

    def bind_ortvalue_input(self, name: str, ortvalue: Any) -> None:
        """Bind a value: an NPU value of this session (or, RKNPU2, of another session with the
        same native layout), or a CPU value (copied into new NPU memory)."""
        zc = self._zc
        if not isinstance(ortvalue, RknnOrtValue):
            if hasattr(ortvalue, "numpy") and _device_of(ortvalue) == "cpu":
                self.bind_cpu_input(name, ortvalue.numpy())
                return
            raise InvalidTypeError(
                f"bind_ortvalue_input requires an RKNN OrtValue (got {type(ortvalue).__name__})"
            )
        if ortvalue.device != zc.family:
            raise InvalidTypeError(
                f"bind_ortvalue_input requires an {zc.family.upper()} OrtValue "
                f"(got a {ortvalue.device} value)"
            )
        spec = spec_of(zc, name, "input")
        self._check_value(spec, ortvalue)
        self._inputs[spec.index] = ortvalue

    def _check_value(self, spec: IoSpec, value: RknnOrtValue) -> None:
        value.memory.check_alive(f"binding {spec.io_kind} '{spec.name}'")
        if tuple(value.shape()) != spec.shape and value.layout is value.spec.layout:
            raise InvalidArgumentError(
                f"OrtValue for {spec.io_kind} '{spec.name}' shape mismatch: expected "
                f"{list(spec.shape)}, got {value.shape()}"
            )
        if value.layout.dtype != spec.dtype:
            from .values import type_name

            raise InvalidTypeError(
                f"OrtValue for {spec.io_kind} '{spec.name}' element type mismatch: expected "
                f"{type_name(spec.dtype)}, got {type_name(value.layout.dtype)}"
            )
        self._zc.check_bindable(spec, value)

    # ------------------------------------------------------------------ outputs

    def bind_ortvalue_output(self, name: str, ortvalue: Any) -> None:
        """Bind an NPU value as the destination of an output."""
        zc = self._zc
        if not isinstance(ortvalue, RknnOrtValue):
            if _device_of(ortvalue) == "cpu":
                raise InvalidArgumentError(
                    "preallocated CPU output binding is not supported; use "
                    "bind_output(name, 'cpu') and copy_outputs_to_cpu()"
                )
            raise InvalidTypeError(
                f"bind_ortvalue_output requires an RKNN OrtValue (got {type(ortvalue).__name__})"
            )
        if ortvalue.device != zc.family:
            raise InvalidTypeError(
                f"bind_ortvalue_output requires an {zc.family.upper()} OrtValue "
                f"(got a {ortvalue.device} value)"
            )
        spec = spec_of(zc, name, "output")
        self._check_value(spec, ortvalue)
        self._bind_output(spec.index, ortvalue, cpu=False)

    def bind_output(
        self,
        name: str,
        device_type: str = "cpu",
        device_id: int = 0,
        element_type: Any = None,
        shape: Any = None,
        buffer_ptr: Optional[int] = None,
        *,
        layout: str = "native",
        mem_flags: Any = "cacheable",
    ) -> None:
        """Bind an output to new NPU memory. ``device_type="cpu"``: ``get_outputs()`` gives
        CPU copies of it; the session's family (``"rknpu2"``/``"rknpu3"``): the NPU value."""
        del layout  # accepted for upstream's signature; the session's layout decides
        if buffer_ptr is not None:
            raise InvalidArgumentError("bind_output with raw buffer_ptr is not implemented")
        self._device_ok(device_type)
        zc = self._zc
        spec = spec_of(zc, name, "output")
        value = new_value(
            zc,
            self._backend,
            name,
            "output",
            dtype=None if element_type is None else parse_dtype(element_type),
            shape=None if shape is None else parse_shape(shape),
            mem_flags=parse_mem_flags(mem_flags),
            device_id=device_id,
        )
        self._bind_output(spec.index, value, cpu=device_type == "cpu")

    def _bind_output(self, index: int, value: RknnOrtValue, *, cpu: bool) -> None:
        self._outputs[index] = value
        if index not in self._output_order:
            self._output_order.append(index)
        if cpu:
            self._cpu_outputs.add(index)
        else:
            self._cpu_outputs.discard(index)

    def get_outputs(self) -> List[Any]:
        """The output values: explicitly bound ones in binding order, then auto-bound ones
        in model order. Outputs bound with ``device_type="cpu"`` come as CPU copies taken now."""
        order = self._output_order + sorted(i for i in self._outputs if i not in self._output_order)
        values: List[Any] = []
        for index in order:
            value = self._outputs[index]
            values.append(CpuOrtValue(value.numpy()) if index in self._cpu_outputs else value)
        return values

    def copy_outputs_to_cpu(self) -> List[np.ndarray]:
        """``[value.numpy() for value in get_outputs()]``."""
        return [value.numpy() for value in self.get_outputs()]

    # ------------------------------------------------------------------ housekeeping

    def clear_binding_inputs(self) -> None:
        """Forget every bound input."""
        self._inputs.clear()

    def clear_binding_outputs(self) -> None:
        """Forget every bound output (auto-bound ones too)."""
        self._outputs.clear()
        self._output_order.clear()
        self._cpu_outputs.clear()

    def synchronize_inputs(self) -> None:
        """Flush every bound input to the NPU."""
        for value in self._inputs.values():
            value.sync_to_device()

    def synchronize_outputs(self) -> None:
        """Make every bound output's NPU writes visible to the CPU."""
        for value in self._outputs.values():
            value.sync_from_device()

    # ------------------------------------------------------------------ the run

    def snapshot(self) -> BoundRun:
        """Auto-bind missing outputs, check every input is bound, freeze the binding."""
        zc = self._zc
        for spec in zc.outputs:
            if spec.index not in self._outputs:
                self._outputs[spec.index] = new_value(zc, self._backend, spec.name, "output")
        missing = [s.name for s in zc.inputs if s.index not in self._inputs]
        if missing:
            which = "RKNPU3 model" if zc.family == "rknpu3" else "model"
            raise InvalidArgumentError(
                f"All {which} inputs must be bound before run_with_iobinding "
                f"(not bound: {', '.join(missing)})"
            )
        inputs: Tuple[Tuple[IoSpec, RknnOrtValue], ...] = tuple(
            (spec, self._inputs[spec.index]) for spec in zc.inputs
        )
        outputs = tuple((spec, self._outputs[spec.index]) for spec in zc.outputs)
        for spec, value in (*inputs, *outputs):
            value.memory.check_alive(f"run_with_iobinding ({spec.io_kind} '{spec.name}')")
        return BoundRun(inputs, outputs)


def bound_payload(binding: Any, backend: Any) -> BoundRun:
    """The engine payload of ``run_with_iobinding`` on ``backend`` (either RKNN family):
    the binding, checked to be that session's, frozen on the caller's thread."""
    if not isinstance(binding, RknnIOBinding) or binding._backend is not backend:
        raise InvalidArgumentError(
            "IoBinding belongs to a different session (make it with this session's io_binding())"
        )
    return binding.snapshot()


def _device_of(value: Any) -> str:
    getter = getattr(value, "device_name", None)
    if getter is None:
        return ""
    try:
        return str(getter()).lower()
    except Exception:
        return ""
