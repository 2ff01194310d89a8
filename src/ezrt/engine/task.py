"""A task, and the one way it completes.

Whoever claims a task's outcome (see ``core.py`` for the claims) completes it through
:func:`finish`: the outcome is counted in the claiming thread's ledger, the inputs are
dropped, and the task is settled, directly or through the delivery stage. Nothing else
completes a task.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, Callable, Optional, Protocol, Tuple

from ..errors import DeadlineExceededError, PacingDropError, SessionClosedError

__all__ = [
    "OUTCOMES",
    "Completion",
    "Finished",
    "Tally",
    "Task",
    "call_completion",
    "finish",
    "outcome_of",
    "report",
]

logger = logging.getLogger("ezrt")

#: A task's completion: called exactly once with ``(result, None)`` or ``(None, error)``.
Completion = Callable[[Any, Optional[BaseException]], None]

OUTCOMES = ("completed", "failed", "dropped", "cancelled", "expired")


class Task:
    """One accepted unit of work. Who completes it is decided by the claims described in
    ``core.py``, never by this object's fields."""

    __slots__ = (
        "delivered",
        "expires_at",
        "finished_at",
        "on_done",
        "on_start",
        "payload",
        "route",
        "seq",
        "started",
        "submitted_at",
    )

    def __init__(
        self,
        payload: Any,
        on_done: Completion,
        delivered: bool,
        on_start: Optional[Callable[[], bool]] = None,
        expires_at: Optional[float] = None,
    ) -> None:
        self.payload = payload
        self.on_done = on_done
        #: True: completes on the delivery (callback) thread, in order; False: where it ends.
        self.delivered = delivered
        #: Called by the worker before running; False means the task was withdrawn (a
        #: cancelled future): it is skipped and its completion is not called.
        self.on_start = on_start
        #: time.monotonic() by which the task must have started, else it fails unrun.
        self.expires_at = expires_at
        self.route = 0
        self.seq = -1  # delivery order, for delivered tasks
        self.started = False  # left the queue (a hint for pruning the deadline heap only)
        self.submitted_at = 0.0  # time.monotonic() at admission (before: when its wait began)
        self.finished_at = 0.0  # time.monotonic() when the backend returned


#: A delivered task's outcome on its way to the delivery thread.
Finished = Tuple[Task, Any, Optional[BaseException]]


class Tally(Protocol):
    """What :func:`finish` needs of a ledger (see ``ledger.py``)."""

    def note(self, task: Task, error: Optional[BaseException]) -> None: ...


def outcome_of(error: Optional[BaseException]) -> str:
    """The statistics bucket of an outcome."""
    if error is None:
        return "completed"
    if isinstance(error, PacingDropError):
        return "dropped"
    if isinstance(error, SessionClosedError):
        return "cancelled"
    if isinstance(error, DeadlineExceededError):
        return "expired"
    return "failed"


def finish(
    task: Task, result: Any, error: Optional[BaseException], ledger: Tally
) -> Optional[Finished]:
    """Complete a task whose outcome the calling thread has claimed.

    Counts the outcome in ``ledger`` (the calling thread's own, or a locked shared one) and
    drops the inputs (nothing needs them any more; do not keep them alive). A direct task's
    completion runs now, on this thread. A delivered task's outcome is returned: the caller
    hands it to the delivery stage, at once or (a worker) just before it next waits.
    """
    ledger.note(task, error)
    task.payload = None
    if task.delivered:
        return (task, result, error)
    call_completion(task, result, error)
    return None


def call_completion(task: Task, result: Any, error: Optional[BaseException]) -> None:
    """Run a task's completion; its exception is reported, never raised into an engine thread."""
    try:
        task.on_done(result, error)
    except BaseException as exc:
        report("ezrt: a completion handler raised; the task is still complete", exc)


def report(message: str, error: BaseException) -> None:
    """Say that user code raised on an engine thread, and go on.

    Through the ``ezrt`` logger when the application has configured logging; otherwise on
    stderr, as Python itself reports an exception in a thread (ezrt's logger has only a
    ``NullHandler`` of its own, so an unconfigured application would otherwise never
    hear of it).
    """
    if _logging_configured():
        logger.error(message, exc_info=(type(error), error, error.__traceback__))
        return
    try:
        print(message, file=sys.stderr)
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    except Exception:  # stderr closed or gone (interpreter exit): nothing left to tell
        pass


def _logging_configured() -> bool:
    """True when a record of the ``ezrt`` logger would reach a real handler."""
    current: Optional[logging.Logger] = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False
