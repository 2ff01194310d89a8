"""Streams of feeds through a session: ``imap`` (threads; its asyncio twin ``aimap`` is in
``aio.py``), and the ``run_pipeline`` window.

Both keep at most ``window`` tasks in flight (bounded memory whatever the input's length),
submit the next feed as soon as one result is taken, and yield results in input order
(``ordered``) or as they complete. Leaving the loop early cancels what is still queued.
They know nothing of sessions beyond a function that turns a feed into a future.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from typing import (
    Any,
    Callable,
    Deque,
    Iterable,
    Iterator,
    List,
    Optional,
    Set,
)

from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["PipelineWindow", "check_window", "imap"]

Future = concurrent.futures.Future


def check_window(max_in_flight: Any, default: int) -> int:
    if max_in_flight is None:
        return default
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int):
        raise InvalidTypeError(f"max_in_flight must be an integer (got {max_in_flight!r})")
    if max_in_flight < 1:
        raise InvalidArgumentError(f"max_in_flight must be >= 1 (got {max_in_flight})")
    return max_in_flight


def _outcome(future: Future[Any], return_exceptions: bool) -> Any:
    if return_exceptions:
        error = future.exception()
        if error is not None:
            return error
    return future.result()


def imap(
    submit: Callable[[Any], Future[Any]],
    feeds: Iterable[Any],
    window: int,
    ordered: bool,
    return_exceptions: bool,
) -> Iterator[Any]:
    if ordered:
        queue: Deque[Future[Any]] = deque()
        try:
            for feed in feeds:
                queue.append(submit(feed))
                if len(queue) >= window:
                    yield _outcome(queue.popleft(), return_exceptions)
            while queue:
                yield _outcome(queue.popleft(), return_exceptions)
        finally:
            for future in queue:
                future.cancel()
        return
    running: Set[Future[Any]] = set()
    try:
        for feed in feeds:
            running.add(submit(feed))
            while len(running) >= window:
                done, running = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    yield _outcome(future, return_exceptions)
        for future in concurrent.futures.as_completed(running):
            running.discard(future)
            yield _outcome(future, return_exceptions)
    finally:
        for future in running:
            future.cancel()


class PipelineWindow:
    """``run_pipeline``'s window: the last ``depth`` frames' pending outcomes, in order.

    ``lock`` serialises a call's check-submit-append so that frames keep their order
    (the caller submits while holding it, and waits for the oldest after releasing it).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: Deque[Any] = deque()
        self._depth: Optional[int] = None

    def resize(self, depth: int, reset: bool) -> None:
        """A new ``depth`` or ``reset`` starts a new window (``lock`` held)."""
        if reset or depth != self._depth:
            self._pending.clear()
            self._depth = depth

    def push(self, outcome: Any) -> Optional[Any]:
        """Add the newest frame's outcome; the oldest once the window is full (``lock``
        held), else None."""
        self._pending.append(outcome)
        if self._depth is not None and len(self._pending) > self._depth:
            return self._pending.popleft()
        return None

    def drain(self) -> List[Any]:
        """Every pending outcome, oldest first; the window is left empty."""
        with self.lock:
            pending = list(self._pending)
            self._pending.clear()
        return pending
