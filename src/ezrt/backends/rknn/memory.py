"""NPU contexts and NPU memory: who may call the runtime on what, and when memory is freed.

Rules this module enforces, for both RKNPU2 (librknnrt) and RKNPU3 (librknn3_api):

* **One thread per context at a time.** Every context lives in a :class:`ContextSlot` with a
  re-entrant lock; whoever calls the runtime on a context holds its slot's lock.
* **Every memory handle is destroyed exactly once, with its own context, imports before the
  allocation they import, all before the context.** A :class:`Memory` is one buffer: the
  handle that allocated (or first imported) it on the session's *home* context, plus one
  import per other context that used it (``*_create_mem_from_fd`` of its dma-buf fd).
  :meth:`Memory.free` is idempotent; it runs when the value that owns the memory is
  garbage-collected, when its session closes, or both (the second call does nothing).
* **Freeing never blocks a running inference.** A handle whose context is busy is queued
  on the slot and destroyed by the lock holder as it releases (:meth:`ContextSlot.release`),
  and the allocation's own destroy waits until its last import is gone. A free that fails
  is logged and the others go on; it never leaves a slot locked.
* **Caches are synced in the right direction.** The memory remembers whether the CPU wrote
  it since the last sync (``cpu_dirty``) and whether the NPU wrote it since the CPU last
  looked (``device_fresh``); :meth:`Memory.cpu_view` and the run path sync accordingly.
* **Memory is made all or nothing, and never outlives its context.** :func:`new_memory`
  makes a handle, wraps it and records it in the session's :class:`Registry`; whatever
  step fails, what was made is let go (handle, dup'ed dma-buf fd, mapping).

Close against allocation (the race between a value being made on one thread and
``close()`` on another). Close does, in this order: refuse new work (RKNPU2:
``Contexts.closed``; RKNPU3: the registry's own flag), close the registry and free what it
held, destroy each context under its slot's lock, marking the slot ``closed``. An
allocation holds its context's slot from before its runtime call until it is recorded,
and checks ``slot.closed`` first. So:

* a slot the allocation holds cannot be destroyed meanwhile (destroying needs the lock);
* an allocation recorded before the registry closed is freed by close;
* one that finds the registry closed frees its memory itself, at once (it holds the slot,
  so the context is still alive) and raises :class:`~ezrt.errors.SessionClosedError`;
* one that reaches the slot after close destroyed it raises the same, having made nothing.

Lock order: a backend's own lock (RKNPU2 ``Contexts.lock``) before any slot lock, a slot
lock before ``Memory.lock`` and before the registry's lock. Nobody waits while holding a
lock the other side needs: close takes its locks one at a time and holds none while it
waits for a slot; a slot holder (an allocation, a run) waits only for ``Memory.lock`` or
the registry's lock, whose holders wait for nothing (the registry calls nothing under its
lock; a memory's lock is held around runtime calls on a slot its holder already has); and
:meth:`Memory.free` never blocks on a slot (it queues the destroy on a busy one), so a
garbage-collection finaliser may run it on any thread. The collector may even run inside a
memory's own critical section (close freeing memory whose value is garbage in a cycle):
``Memory.lock`` is re-entrant and the sections it guards tolerate that free.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import weakref
from collections import deque
from functools import partial
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple

from ...errors import EzrtError, SessionClosedError

__all__ = [
    "ContextSlot",
    "DeviceOps",
    "Memory",
    "Registry",
    "describe_mem",
    "let_go",
    "new_memory",
]

SYNC_TO_DEVICE, SYNC_FROM_DEVICE = 1, 2

logger = logging.getLogger("ezrt")


def describe_mem(handle: Any) -> Dict[str, int]:
    """``virt_addr``, ``fd``, ``offset``, ``size`` of a runtime memory handle (a pointer to
    RKNPU2's ``rknn_tensor_mem`` or RKNPU3's ``rknn3_tensor_mem``: both name them alike)."""
    mem = handle.contents
    return {
        "virt_addr": int(mem.virt_addr or 0),
        "fd": int(mem.fd),
        "offset": int(mem.offset),
        "size": int(mem.size),
    }


class DeviceOps(Protocol):
    """The runtime calls memory needs, per NPU family (RKNPU2 or RKNPU3)."""

    family: str

    def destroy_mem(self, ctx: int, handle: Any) -> None: ...

    def mem_sync(self, ctx: int, handle: Any, mode: int) -> None: ...

    def import_fd(self, ctx: int, fd: int, virt_addr: int, size: int, offset: int) -> Any: ...

    def describe(self, handle: Any) -> Dict[str, int]:
        """``virt_addr``, ``fd``, ``offset``, ``size`` of a handle."""
        ...


class ContextSlot:
    """One runtime context, the lock that serialises calls on it, and frees that wait for it.

    Use as ``with slot:`` around every runtime call on ``slot.ctx``. The lock is re-entrant,
    so a garbage-collection finaliser that frees memory on the thread that holds it
    proceeds at once (sequentially, between that thread's own calls).
    """

    __slots__ = ("closed", "ctx", "label", "lock", "owner", "pending")

    def __init__(self, ctx: int, owner: Any, label: str) -> None:
        self.ctx = ctx
        self.owner = owner  # the backend whose context this is
        self.label = label
        self.lock = threading.RLock()
        self.pending: Deque[Callable[[], None]] = deque()
        self.closed = False

    def __enter__(self) -> ContextSlot:
        self.lock.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Run the queued frees, then let go; re-take the lock if more arrived meanwhile."""
        while True:
            try:
                self._drain()
            finally:
                self.lock.release()
            if not self.pending or not self.lock.acquire(blocking=False):
                return

    def run_pending(self) -> None:
        """Run the queued frees now (the caller holds the lock)."""
        self._drain()

    def _drain(self) -> None:
        while self.pending:
            try:
                job = self.pending.popleft()
            except IndexError:
                return
            _run_job(job)

    def check_live(self) -> None:
        """Refuse a context that close destroyed (the caller holds the lock)."""
        if self.closed:
            raise SessionClosedError(f"the session is closed: its {self.label} was destroyed")

    def call_when_free(self, job: Callable[[], None]) -> None:
        """Run ``job`` under this slot's lock now if nobody holds it, else when it is let go."""
        if self.lock.acquire(blocking=False):
            try:
                _run_job(job)
            finally:
                self.release()
            return
        self.pending.append(job)
        if self.lock.acquire(blocking=False):  # the holder may have left before the append
            self.release()


def _run_job(job: Callable[[], None]) -> None:
    """Run one queued free. Nobody could act on its failure (it runs in a finaliser, in
    close, or in whichever thread let the slot go): log it, and go on with the others."""
    try:
        job()
    except Exception:
        logger.error("ezrt: freeing NPU memory failed", exc_info=True)


class Memory:
    """One NPU buffer: its home handle, its imports into other contexts, its cache state."""

    def __init__(
        self,
        ops: DeviceOps,
        home: ContextSlot,
        handle: Any,
        *,
        size: int,
        owned_fd: Optional[int] = None,
        mapping: Optional[mmap.mmap] = None,
        dmabuf: bool = False,
        where: Optional[Tuple[int, int, int]] = None,
    ) -> None:
        self.ops = ops
        self.home = home
        # Guards handles, dead and the cache flags. Re-entrant: the collector may run inside
        # a critical section and finalise this memory's value, whose free() then re-enters
        # on the same thread (see free() and drop_imports() for why that is safe).
        self.lock = threading.RLock()
        self.handles: Dict[ContextSlot, Any] = {home: handle}
        facts = ops.describe(handle)
        self.size = size
        #: (fd, virt_addr, offset) to import the buffer elsewhere: the caller's for a dma-buf,
        #: else what the runtime reports for its allocation.
        self.fd, self.virt_addr, self.offset = where or (
            facts["fd"],
            facts["virt_addr"],
            facts["offset"],
        )
        self.address = self.virt_addr + self.offset  # where the CPU sees the first byte
        self.dmabuf = dmabuf
        self._owned_fd = owned_fd
        self._mapping = mapping
        self._mapping_export: Optional[ctypes.Array[ctypes.c_char]] = None
        if mapping is not None:  # an mmap we made: its address, kept until free()
            self._mapping_export = (ctypes.c_char * len(mapping)).from_buffer(mapping)
        self.dead = False
        self.cpu_dirty = False
        self.device_fresh = False

    # ------------------------------------------------------------------ use

    def check_alive(self, what: str) -> None:
        if self.dead:
            raise SessionClosedError(
                f"{what}: this OrtValue's NPU memory was released because the session that "
                "allocated it was closed"
            )

    def handle_for(self, slot: ContextSlot) -> Any:
        """This buffer's handle on ``slot``'s context (imported on first use). The caller
        holds ``slot``'s lock."""
        with self.lock:
            self.check_alive("binding")
            handle = self.handles.get(slot)
            if handle is not None:
                return handle
            if self.fd < 0:
                raise EzrtError(
                    "OrtValue was allocated without dma-buf backing and cannot be imported "
                    f"into another RKNN context ({slot.label})"
                )
            handle = self.ops.import_fd(slot.ctx, self.fd, self.virt_addr, self.size, self.offset)
            self.handles[slot] = handle
            return handle

    def sync_for_run(self, slot: ContextSlot, handle: Any, *, is_input: bool) -> None:
        """Before a run on ``slot``: inputs are always flushed (the caller may have written
        through ``data_ptr``); outputs only when the CPU wrote them (dirty lines evicted
        later would overwrite the NPU's results)."""
        with self.lock:
            if is_input or self.cpu_dirty:
                self.ops.mem_sync(slot.ctx, handle, SYNC_TO_DEVICE)
                self.cpu_dirty = False

    def written_by_device(self) -> None:
        with self.lock:
            self.device_fresh = True
            self.cpu_dirty = False

    def _sync_home(self, mode: int) -> None:
        """A CPU-side sync through the home handle (cache maintenance is per buffer, so any
        handle will do). The caller holds the home slot's lock, then ``self.lock``: slot
        before memory, the order every path takes, so none can wait on another in a cycle."""
        self.ops.mem_sync(self.home.ctx, self.handles[self.home], mode)

    def cpu_view(self, *, read: bool, write: bool) -> memoryview:
        """The CPU's view of the buffer. ``read``: made current first (FROM_DEVICE after an
        NPU write); ``write``: the caller writes it, so it is flushed before the NPU reads."""
        with self.home, self.lock:
            self.check_alive("OrtValue")
            if read and self.device_fresh:
                self._sync_home(SYNC_FROM_DEVICE)
            self.device_fresh = False
            if write:
                self.cpu_dirty = True
            return memoryview((ctypes.c_char * self.size).from_address(self.address)).cast("B")

    def sync_to_device(self) -> None:
        with self.home, self.lock:
            self.check_alive("sync_to_device")
            self._sync_home(SYNC_TO_DEVICE)
            self.cpu_dirty = False

    def sync_from_device(self) -> None:
        with self.home, self.lock:
            self.check_alive("sync_from_device")
            if self.cpu_dirty:  # flush first: FROM_DEVICE would drop the CPU's writes
                self._sync_home(SYNC_TO_DEVICE)
                self.cpu_dirty = False
            self._sync_home(SYNC_FROM_DEVICE)
            self.device_fresh = False

    @property
    def import_count(self) -> int:
        return len(self.handles)

    # ------------------------------------------------------------------ free

    def drop_imports(self, owner: Any) -> None:
        """Destroy this buffer's imports into ``owner``'s contexts (that backend is closing
        while the buffer's own session lives on)."""
        with self.lock:
            mine = [
                (s, h) for s, h in self.handles.items() if s.owner is owner and s is not self.home
            ]
            if self.dead:  # freed (every handle) while that list was made: nothing is ours
                return
            for slot, _ in mine:  # no allocation from the check on: the collector cannot run
                del self.handles[slot]
        for slot, handle in mine:
            slot.call_when_free(partial(self.ops.destroy_mem, slot.ctx, handle))

    def free(self) -> None:
        """Destroy every handle (imports first, then home), unmap and close. Idempotent."""
        with self.lock:
            if self.dead:
                return
            self.dead = True  # before anything that allocates: a re-entrant call returns
            imports = [(s, h) for s, h in self.handles.items() if s is not self.home]
            home_handle = self.handles.get(self.home)
            self.handles = {}
        remaining = [len(imports)]
        counter_lock = threading.Lock()

        def release_home() -> None:
            def destroy_home() -> None:
                try:
                    if home_handle is not None:
                        self.ops.destroy_mem(self.home.ctx, home_handle)
                finally:
                    self._unmap()

            self.home.call_when_free(destroy_home)

        def destroy_import(slot: ContextSlot, handle: Any) -> None:
            try:
                self.ops.destroy_mem(slot.ctx, handle)
            finally:
                with counter_lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    release_home()

        if not imports:
            release_home()
        for slot, handle in imports:
            slot.call_when_free(partial(destroy_import, slot, handle))

    def _unmap(self) -> None:
        self._mapping_export = None
        mapping, fd = self._mapping, self._owned_fd
        self._mapping = self._owned_fd = None
        let_go(fd, mapping)


def let_go(fd: Optional[int], mapping: Optional[mmap.mmap]) -> None:
    """Unmap ``mapping`` and close ``fd`` (a dma-buf ezrt holds); the descriptor is closed
    even if unmapping fails (and that error then raised)."""
    try:
        if mapping is not None:
            mapping.close()
    finally:
        if fd is not None:
            os.close(fd)


class Registry:
    """The memories a session frees when it closes: recording one and closing (which hands
    over the memories recorded so far) are atomic with respect to each other."""

    def __init__(self) -> None:
        # Guards _closed and _memories. A leaf: nothing is called or waited for under it (a
        # finaliser the collector runs here frees memory, which never touches a registry).
        self._lock = threading.Lock()
        self._closed = False
        self._memories: weakref.WeakSet[Memory] = weakref.WeakSet()

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, memory: Memory) -> None:
        """Record ``memory`` (again is fine); SessionClosedError once closed."""
        with self._lock:
            if self._closed:
                raise SessionClosedError("zero-copy I/O rejected: the session is closed")
            self._memories.add(memory)

    def close(self) -> Optional[List[Memory]]:
        """Record nothing more; the memories recorded so far, or None if already closed."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            memories = list(self._memories)
            self._memories = weakref.WeakSet()
        return memories


def new_memory(
    slot: ContextSlot,
    ops: DeviceOps,
    create: Callable[[int], Any],
    build: Callable[[Any], Memory],
    *,
    release: Optional[Callable[[], None]] = None,
    register: Optional[Callable[[Memory], None]] = None,
) -> Memory:
    """A runtime memory on ``slot``'s context, made all or nothing.

    ``create(ctx)`` makes the handle (or raises), ``build(handle)`` wraps it in a
    :class:`Memory` (which then owns what ``release`` lets go of, e.g. a dma-buf hold; until
    it returns, nothing is owned), ``register(memory)`` records it for the session's close.
    Whatever step raises, what was made is let go before the error propagates: the handle
    destroyed, ``release()`` called, the built memory freed. Everything from ``create`` to
    ``register`` runs under the slot's lock, so the context cannot be destroyed meanwhile;
    a slot that close already destroyed is refused (SessionClosedError) before ``create``.
    """
    memory: Optional[Memory] = None
    try:
        with slot:
            slot.check_live()
            handle = create(slot.ctx)
            try:
                memory = build(handle)
            except BaseException:
                ops.destroy_mem(slot.ctx, handle)
                raise
            if register is not None:
                try:
                    register(memory)
                except BaseException:
                    memory.free()  # at once: this thread holds the slot (its lock re-enters)
                    raise
            return memory
    except BaseException:
        if memory is None and release is not None:
            release()
        raise
