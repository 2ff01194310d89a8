"""Every librknnrt context of one RKNPU2 session, from ``rknn_init`` to ``rknn_destroy``.

Copy-path contexts, one per worker, are made up front: the first by ``rknn_init``, the
others by ``rknn_dup_context`` (weights shared) or a fresh ``rknn_init`` when dup is off
(option, custom ops, or weight sharing, where each init borrows the lender's weights with
``RKNN_FLAG_SHARE_WEIGHT_MEM``). Zero copy's contexts are made the same way on first use:
a *home* context that allocates and imports memory, and one per worker for bound runs.
Every context gets its core mask (``schedule``: ``1 << core``; otherwise the ``tp_mode``
mask) and the session's custom ops, and sits in a
:class:`~ezrt.backends.rknn.memory.ContextSlot`.

Locks: :attr:`Contexts.lock` guards ``closed`` and the zero-copy contexts; whatever is made
under :meth:`Contexts.while_open` is made before ``close`` and so destroyed by it. It is
taken before any slot's lock (making a context borrows the first context's, or the
lender's), never while holding one. The memory made on these contexts is freed before they
are destroyed by the rules of :mod:`.memory` (a destroyed slot is marked ``closed``).
``_share_lock`` guards the weight-sharing count: a session whose weights others borrow
destroys its contexts only once it is closed and the last borrower has destroyed its own.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ...errors import InvalidArgumentError, SessionClosedError
from ...options import SessionConfig
from . import abi
from .memory import ContextSlot
from .plugins import Plugin, register_custom_ops

__all__ = ["Contexts", "check_schedule"]

logger = logging.getLogger("ezrt")


def check_schedule(config: SessionConfig) -> None:
    """Refuse a ``schedule`` core no core mask can name (before any runtime loads)."""
    for core in config.schedule or ():
        if core > 15:
            raise InvalidArgumentError(
                f"schedule core {core} is not an NPU core (masks have 16 bits; RK3588 has "
                "cores 0-2, RK3576 0-1, RK3566 0)"
            )


class Contexts:
    """The contexts of one session: made, core-masked, given custom ops, destroyed once.

    ``owner`` is the backend the slots name as theirs; ``lender``, the contexts of the
    session whose weights this one borrows (``use_weight_from``), or None.
    """

    def __init__(
        self,
        rt: abi.Runtime,
        model: bytes,
        config: SessionConfig,
        owner: Any,
        *,
        lender: Optional[Contexts] = None,
        plugins: Sequence[Plugin] = (),
    ) -> None:
        self._rt = rt
        self._model = model
        self._config = config
        self._owner = owner
        self._lender = lender
        self._plugins = list(plugins)  # kept loaded while the contexts live
        self._dup = not (
            config.disable_dup_context or config.wants_custom_ops or lender is not None
        )
        #: The copy path's contexts, one per worker (the first one is made first).
        self.slots: List[ContextSlot] = []
        self.lock = threading.Lock()  # guards closed, _home, _bound
        self.closed = False
        self._home: Optional[ContextSlot] = None
        self._bound: Dict[int, ContextSlot] = {}
        self._share_lock = threading.Lock()  # guards _dependents, _released
        self._dependents = 0
        self._released = False

    # ------------------------------------------------------------------ the copy path

    def open_first(self) -> ContextSlot:
        """The first context (``rknn_init``): the model is read from it."""
        slot = ContextSlot(self._new_context(), self._owner, "context 0")
        self.slots.append(slot)
        return slot

    def open_workers(self, count: int) -> None:
        """Contexts up to ``count`` workers, then every one's core mask and custom ops. On
        failure the caller destroys what was made (:meth:`destroy_all`)."""
        for index in range(len(self.slots), count):
            ctx = self._dup_context() if self._dup else self._new_context()
            self.slots.append(ContextSlot(ctx, self._owner, f"context {index}"))
        for index, slot in enumerate(self.slots):
            self._set_core_mask(index, slot.ctx)
        if self._plugins:
            register_custom_ops(self._rt, self._plugins, [slot.ctx for slot in self.slots])

    def borrow(self) -> None:
        """Count this session among its lender's borrowers (once it is fully made)."""
        if self._lender is not None:
            with self._lender._share_lock:
                self._lender._dependents += 1

    # ------------------------------------------------------------------ zero copy

    def check_open(self) -> None:
        if self.closed:
            raise SessionClosedError("zero-copy I/O rejected: the session is closed")

    @contextmanager
    def while_open(self) -> Iterator[None]:
        """Hold :attr:`lock`, refusing a closed session: what is made inside is destroyed
        by close."""
        with self.lock:
            self.check_open()
            yield

    def home(self) -> ContextSlot:
        """The context that allocates and first imports zero-copy memory (never runs)."""
        with self.while_open():
            if self._home is None:
                self._home = self._new_slot("zero-copy home context", None)
            return self._home

    def bound(self, index: int) -> ContextSlot:
        """Worker ``index``'s context for bound runs."""
        slot = self._bound.get(index)
        if slot is None:
            with self.while_open():
                slot = self._bound.get(index)
                if slot is None:
                    slot = self._new_slot(f"zero-copy context of worker {index}", index)
                    self._bound[index] = slot
        return slot

    def _new_slot(self, label: str, core_index: Optional[int]) -> ContextSlot:
        """A zero-copy context, made like a worker's (dup or init, core mask, custom ops)."""
        ctx = self._dup_context() if self._dup else self._new_context()
        try:
            if core_index is not None:
                self._set_core_mask(core_index, ctx)
            if self._plugins:
                register_custom_ops(self._rt, self._plugins, [ctx])
        except BaseException:
            self._rt.rknn_destroy(ctx)
            raise
        return ContextSlot(ctx, self._owner, label)

    # ------------------------------------------------------------------ making one

    def _new_context(self) -> int:
        ctx = abi.Context(0)
        data = ctypes.create_string_buffer(self._model, len(self._model))
        if self._lender is not None:
            lender = self._lender.slots[0]
            extend = abi.InitExtend()
            extend.ctx = lender.ctx
            with lender:  # the lender's context lends its weights: nobody else drives it now
                code = self._rt.rknn_init(
                    ctypes.byref(ctx),
                    data,
                    len(self._model),
                    abi.FLAG_SHARE_WEIGHT_MEM,
                    ctypes.byref(extend),
                )
        else:
            code = self._rt.rknn_init(ctypes.byref(ctx), data, len(self._model), 0, None)
        abi.check("rknn_init", code)
        return int(ctx.value)

    def _dup_context(self) -> int:
        first = self.slots[0]
        source = abi.Context(first.ctx)
        copy = abi.Context(0)
        with first:  # the first context may be running: one thread at a time on it
            code = self._rt.rknn_dup_context(ctypes.byref(source), ctypes.byref(copy))
        abi.check("rknn_dup_context", code)
        return int(copy.value)

    def _set_core_mask(self, index: int, ctx: int) -> None:
        routes = self._config.routes
        core = routes[index % len(routes)]
        mask = self._config.tp_mask if core is None else 1 << core
        code = self._rt.rknn_set_core_mask(ctx, mask)
        if code == abi.ERR_TARGET_PLATFORM_UNMATCH and mask in (abi.CORE_AUTO, abi.CORE_0):
            return  # single-core NPUs refuse any mask; AUTO and core 0 mean the same there
        if code < 0:
            raise abi.RknnError(
                "rknn_set_core_mask",
                code,
                f" for thread {index} (mask {mask:#x})",
                "Maybe you specified a configuration that is not supported by the current "
                "platform (RK3588: cores 0-2, RK3576: 0-1, RK3566: 0 only).",
            )

    # ------------------------------------------------------------------ lifetime

    def close(self) -> bool:
        """Refuse zero-copy contexts from now on; True the first time."""
        with self.lock:
            first = not self.closed
            self.closed = True
        return first

    def release(self) -> None:
        """Destroy every context, unless borrowers still use the weights (then the last
        borrower to go does it)."""
        with self._share_lock:
            ready = self._dependents == 0
        if ready:
            self._release()

    def _release(self) -> None:
        with self._share_lock:
            if self._released:
                return
            self._released = True
        self.destroy_all()
        lender, self._lender = self._lender, None
        if lender is None:
            return
        with lender._share_lock:
            lender._dependents -= 1
            ready = lender.closed and lender._dependents == 0
        if ready:
            lender._release()

    def destroy_all(self) -> None:
        """``rknn_destroy`` every context: zero copy's first, the copy path's last; each
        after the frees queued for it."""
        slots = [*self._bound.values(), *([self._home] if self._home else []), *self.slots]
        for slot in slots:
            with slot:
                slot.run_pending()  # frees queued for this context go before it
                slot.closed = True
                code = self._rt.rknn_destroy(slot.ctx)
            if code < 0:
                logger.warning("ezrt: rknn_destroy failed: %s", abi.status_text(code))
        self.slots = []
        self._bound = {}
        self._home = None
