"""asyncio: admission for callers whose task found the pipeline full, and ``aimap``.

Imported on the first asyncio call, so that ``import ezrt`` does not import asyncio.

The event loop must never block, so a blocked admission is handed to one thread per session
(``ezrt-admission``), started on first need, which admits waiting tasks in FIFO order and
reports back to each task's own loop. One thread, not an executor pool: fewer threads
contending for the GIL with the event loop, and first come, first admitted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from collections import deque
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Deque,
    Iterable,
    Optional,
    Tuple,
    Union,
)

__all__ = ["AsyncAdmission", "aimap"]

# enqueue(prepared, timeout) -> concurrent future: the session's blocking admission.
Enqueue = Callable[[Any, float], "concurrent.futures.Future[Any]"]
_Item = Tuple[Any, float, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class AsyncAdmission:
    def __init__(self, enqueue: Enqueue, name: str = "ezrt-admission") -> None:
        self._enqueue = enqueue
        self._name = name
        self._queue: queue.SimpleQueue[Optional[_Item]] = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # guards _thread (start once, stop once)
        # Admissions asked for and finished: each written by one thread only (the loop's,
        # the admission thread's), from C-level counters, so reading both needs no lock.
        self._asked = itertools.count(1)
        self._finished = itertools.count(1)
        self._last_asked = 0
        self._last_finished = 0

    @property
    def busy(self) -> bool:
        """Admissions are waiting: a new call must queue behind them (first come, first
        admitted), not take room that frees meanwhile."""
        return self._last_asked != self._last_finished

    def admit(self, prepared: Any, timeout: float) -> asyncio.Future[Any]:
        """An asyncio future of the task's concurrent future, resolved once admitted.

        ``timeout`` (seconds) counts from now, however many are waiting ahead.
        """
        loop = asyncio.get_running_loop()
        admitted: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
        self._last_asked = next(self._asked)
        self._queue.put((prepared, time.monotonic() + timeout, loop, admitted))
        return admitted

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            prepared, until, loop, admitted = item
            try:
                if admitted.cancelled():  # its coroutine went away while waiting: skip it
                    continue
                try:
                    future = self._enqueue(prepared, max(0.0, until - time.monotonic()))
                except BaseException as error:
                    _report(loop, _fail, admitted, error, None)
                    continue
                _report(loop, _succeed, admitted, future, future)
            finally:
                self._last_finished = next(self._finished)

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the thread after the admissions already asked for (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                if timeout is not None and timeout >= threading.TIMEOUT_MAX:
                    timeout = None
                thread.join(timeout)


def _report(
    loop: asyncio.AbstractEventLoop,
    settle: Callable[..., None],
    admitted: asyncio.Future[Any],
    outcome: Any,
    future: Optional[concurrent.futures.Future[Any]],
) -> None:
    try:
        loop.call_soon_threadsafe(settle, admitted, outcome)
    except RuntimeError:  # the loop is closed: nobody will await it; withdraw the task
        if future is not None:
            future.cancel()


def _succeed(admitted: asyncio.Future[Any], future: concurrent.futures.Future[Any]) -> None:
    if admitted.cancelled():
        future.cancel()  # cancelled while being admitted: withdraw the task if still queued
    else:
        admitted.set_result(future)


def _fail(admitted: asyncio.Future[Any], error: BaseException) -> None:
    if not admitted.cancelled():
        admitted.set_exception(error)


# ---------------------------------------------------------------------- streams


async def _aiterate(feeds: Union[Iterable[Any], AsyncIterable[Any]]) -> AsyncIterator[Any]:
    if isinstance(feeds, AsyncIterable):
        async for feed in feeds:
            yield feed
    else:
        for feed in feeds:
            yield feed


async def _aoutcome(future: asyncio.Future[Any], return_exceptions: bool) -> Any:
    if return_exceptions:
        try:
            return await future
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return error
    return await future


async def aimap(
    asubmit: Callable[[Any], Awaitable[asyncio.Future[Any]]],
    feeds: Union[Iterable[Any], AsyncIterable[Any]],
    window: int,
    ordered: bool,
    return_exceptions: bool,
) -> AsyncIterator[Any]:
    pending: Deque[asyncio.Future[Any]] = deque()
    try:
        async for feed in _aiterate(feeds):
            pending.append(await asubmit(feed))
            while len(pending) >= window:
                if ordered:
                    yield await _aoutcome(pending.popleft(), return_exceptions)
                else:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        pending.remove(future)
                        yield await _aoutcome(future, return_exceptions)
        if ordered:
            while pending:
                yield await _aoutcome(pending.popleft(), return_exceptions)
        else:
            for next_done in asyncio.as_completed(list(pending)):
                result = await _aoutcome(next_done, return_exceptions)
                yield result
            pending.clear()
    finally:
        for future in pending:
            future.cancel()
