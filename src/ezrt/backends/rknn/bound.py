"""RKNPU2 zero copy of one session: NPU memory it allocates or imports, and bound runs.

Memory is allocated (``rknn_create_mem``) or a caller's dma-buf imported on the session's
*home* context; a bound run (``rknn_set_io_mem`` + ``rknn_run``) runs on the worker's own
zero-copy context, importing each buffer there on first use. A context whose I/O memory
was set never runs ``rknn_inputs_set``, so a bound buffer can never be overwritten by
another task's input. Every memory the session made or imported is freed (or its imports
dropped) when the session closes, before its contexts are destroyed.

Close against a value being made on another thread follows :mod:`.memory`: close refuses
new zero copy (``Contexts.close``), then closes the session's
:class:`~ezrt.backends.rknn.memory.Registry` and frees what it held, then destroys the
contexts. Memory is made by :func:`~ezrt.backends.rknn.memory.new_memory` while holding the
home slot until it is recorded, so it is either freed by close or refused and freed at
once, while the home context still exists. An import of another session's buffer into one
of this session's contexts is recorded the same way, or dropped at once.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Dict, List, Optional, Tuple

from ...errors import EzrtError, InvalidArgumentError, SessionClosedError
from ...options import SessionConfig
from . import abi
from .contexts import Contexts
from .layout import NativeLayout
from .memory import ContextSlot, Memory, Registry, describe_mem, new_memory
from .model import ModelInfo
from .native import copy_attr, describe_inputs, describe_outputs
from .values import IoSpec, RknnOrtValue
from .zerocopy import BoundRun, hold_dmabuf

__all__ = ["RknnZeroCopy"]

logger = logging.getLogger("ezrt")


class _Ops:
    """librknnrt's memory calls, as :class:`~ezrt.backends.rknn.memory.Memory` uses them."""

    family = "rknpu2"

    def __init__(self, rt: abi.Runtime) -> None:
        self.rt = rt

    def destroy_mem(self, ctx: int, handle: Any) -> None:
        code = self.rt.optional("rknn_destroy_mem")(ctx, handle)
        if code < 0:  # nothing the caller could do: the memory is gone either way
            logger.warning("ezrt: rknn_destroy_mem failed: %s", abi.status_text(code))

    def mem_sync(self, ctx: int, handle: Any, mode: int) -> None:
        direction = {abi.SYNC_TO_DEVICE: "TO_DEVICE", abi.SYNC_FROM_DEVICE: "FROM_DEVICE"}
        code = self.rt.optional("rknn_mem_sync")(ctx, handle, mode)
        abi.check(f"rknn_mem_sync({direction.get(mode, mode)})", code)

    def import_fd(self, ctx: int, fd: int, virt_addr: int, size: int, offset: int) -> Any:
        handle = self.rt.optional("rknn_create_mem_from_fd")(ctx, fd, virt_addr, size, offset)
        if not handle:
            raise EzrtError(
                f"rknn_create_mem_from_fd failed (fd {fd}, {size} bytes at offset {offset})"
            )
        return handle

    def describe(self, handle: Any) -> Dict[str, int]:
        return describe_mem(handle)


class _View:
    """The zero-copy view of one RKNPU2 session: its tensors and its memory calls (the
    :class:`~ezrt.backends.rknn.zerocopy.ZeroCopyModel` of the session)."""

    family = "rknpu2"

    def __init__(self, zero_copy: RknnZeroCopy, inputs: List[IoSpec], outputs: List[IoSpec]):
        self._zero_copy = zero_copy
        self.inputs = inputs
        self.outputs = outputs

    def allocate(self, spec: IoSpec, mem_flags: int) -> Memory:
        return self._zero_copy.allocate(spec.alloc_bytes, mem_flags)

    def import_dmabuf(
        self, spec: IoSpec, fd: int, size: int, offset: int, virt_addr: Optional[int]
    ) -> Memory:
        return self._zero_copy.import_dmabuf(fd, size, offset, virt_addr)

    def hatch_layout(self, spec: IoSpec, shape: Tuple[int, ...]) -> Optional[NativeLayout]:
        return None

    def check_bindable(self, spec: IoSpec, value: RknnOrtValue) -> None:
        if value.backend is self._zero_copy.owner:
            return
        mine, theirs = spec.layout, value.layout
        wrong = [
            f"{what} expected {a}, got {b}"
            for what, a, b in (
                ("fmt", mine.name, theirs.name),
                ("dims", list(mine.dims), list(theirs.dims)),
                ("strides", list(mine.strides), list(theirs.strides)),
                ("type", mine.dtype, theirs.dtype),
                ("pass_through", spec.info["pass_through"], value.spec.info["pass_through"]),
            )
            if a != b
        ]
        if wrong:
            raise InvalidArgumentError(
                f"OrtValue for {spec.io_kind} '{spec.name}' native zero-copy layout mismatch: "
                + "; ".join(wrong)
                + ". The OrtValue buffer was written using a different RKNN native layout "
                "(another session or zero_copy_layout); create it for this session."
            )
        if value.memory.size < spec.layout.nbytes:
            raise InvalidArgumentError(
                f"OrtValue buffer is too small for bound tensor: required {spec.layout.nbytes} "
                f"bytes, got {value.memory.size} bytes"
            )


class RknnZeroCopy:
    """Zero copy of one session: its view (described on first use), the memory it made or
    imported, and bound runs. ``owner`` is the backend that values and slots name."""

    def __init__(
        self,
        owner: Any,
        rt: abi.Runtime,
        contexts: Contexts,
        model: ModelInfo,
        config: SessionConfig,
    ) -> None:
        self.owner = owner
        self._rt = rt
        self._ops = _Ops(rt)
        self._contexts = contexts
        self._model = model
        self._config = config
        self._view: Optional[_View] = None  # made under the contexts' lock
        #: What close frees: memory made here, and other sessions' memory imported here.
        self._registry = Registry()

    def view(self) -> _View:
        """The session's tensors as zero copy sees them (queried on first use)."""
        view = self._view
        if view is None:
            with self._contexts.while_open():
                if self._view is None:
                    self._view = self._describe()
                view = self._view
        return view

    def _describe(self) -> _View:
        model = self._model
        if model.dynamic:
            raise EzrtError(
                "zero-copy I/O needs a model with static shapes; this one has dynamic inputs "
                "(use run / run_async)"
            )
        first = self._contexts.slots[0]
        with first:
            inputs = describe_inputs(self._rt, first.ctx, model, self._config)
            outputs = describe_outputs(self._rt, first.ctx, model, self._config)
        return _View(self, inputs, outputs)

    # ------------------------------------------------------------------ memory

    def allocate(self, size: int, mem_flags: int) -> Memory:
        """New NPU memory on the home context (``rknn_create_mem``; ``rknn_create_mem2`` when
        flags are asked for)."""
        home = self._contexts.home()
        if mem_flags:
            api, create_mem = "rknn_create_mem2", self._rt.optional("rknn_create_mem2")
        else:
            api, create_mem = "rknn_create_mem", self._rt.optional("rknn_create_mem")

        def create(ctx: int) -> Any:
            handle = create_mem(ctx, size, mem_flags) if mem_flags else create_mem(ctx, size)
            if not handle:
                raise EzrtError(f"{api} failed: could not allocate {size} bytes of NPU memory")
            return handle

        def build(handle: Any) -> Memory:
            return Memory(self._ops, home, handle, size=size)

        return new_memory(home, self._ops, create, build, register=self._registry.add)

    def import_dmabuf(self, fd: int, size: int, offset: int, virt_addr: Optional[int]) -> Memory:
        """The caller's dma-buf, imported into the home context (the fd is dup'ed and, without
        ``virt_addr``, mapped: the value owns both; if the import fails, both are let go)."""
        home = self._contexts.home()
        held = hold_dmabuf(fd, size, offset, virt_addr)

        def create(ctx: int) -> Any:
            return self._ops.import_fd(ctx, held.fd, held.address, size, offset)

        def build(handle: Any) -> Memory:
            return Memory(
                self._ops,
                home,
                handle,
                size=size,
                owned_fd=held.fd,
                mapping=held.mapping,
                dmabuf=True,
                where=(held.fd, held.address, offset),  # the caller's, not the runtime's echo
            )

        return new_memory(
            home, self._ops, create, build, release=held.release, register=self._registry.add
        )

    def free_memories(self) -> None:
        """Session close (after ``Contexts.close``, before the contexts are destroyed): free
        the memory it made, drop its imports of other sessions'; record nothing more."""
        for memory in self._registry.close() or ():
            if memory.home.owner is self.owner:
                memory.free()
            else:
                memory.drop_imports(self.owner)

    # ------------------------------------------------------------------ running

    def execute(self, run: BoundRun, index: int) -> None:
        """One bound inference on worker ``index``'s zero-copy context (or, when a buffer
        has no dma-buf fd to import elsewhere, on the home context that allocated it)."""
        values = [value for _, value in (*run.inputs, *run.outputs)]
        if any(v.memory.fd < 0 and v.memory.home.owner is self.owner for v in values):
            slot = self._contexts.home()
        else:
            slot = self._contexts.bound(index)
        set_io = self._rt.optional("rknn_set_io_mem")
        with slot:
            slot.check_live()  # a bound context is reused without the contexts' lock
            for kind, pairs in (("input", run.inputs), ("output", run.outputs)):
                for spec, value in pairs:
                    self._set_io_mem(set_io, slot, kind, spec, value.memory)
            abi.check("rknn_run", self._rt.rknn_run(slot.ctx, None))
            for _, value in run.outputs:
                value.memory.written_by_device()

    def _set_io_mem(
        self, set_io: Any, slot: ContextSlot, kind: str, spec: IoSpec, memory: Memory
    ) -> None:
        """Bind ``memory`` to ``spec`` on ``slot`` (whose lock the caller holds)."""
        handle = memory.handle_for(slot)
        if memory.home.owner is not self.owner:  # another session's: drop it at close
            try:
                self._registry.add(memory)
            except SessionClosedError:  # closing now: drop it at once (this slot is held)
                memory.drop_imports(self.owner)
                raise
        if memory.size < spec.layout.nbytes:
            raise EzrtError(
                f"Bound {kind} OrtValue is too small for {kind}: {spec.name} "
                f"({memory.size} bytes, needs {spec.layout.nbytes})"
            )
        memory.sync_for_run(slot, handle, is_input=kind == "input")
        attr = copy_attr(spec.attr)
        abi.check(
            "rknn_set_io_mem",
            set_io(slot.ctx, handle, ctypes.byref(attr)),
            f" for {kind} index {spec.index}",
        )
