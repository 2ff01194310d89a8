"""How an engine completion reaches the caller: a waiting ``run``, a Future, a callback.

The engine calls a task's completion exactly once with ``(result, None)`` or
``(None, error)``. These adapters turn that into what each call style promises.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import BatchInferenceError, EzrtError
from .io import OutputSelection

__all__ = [
    "Callback",
    "Outcome",
    "callback_completion",
    "describe_error",
    "future_completion",
    "gather_in_order",
    "gather_samples",
]

#: A ``run_async`` callback: ``callback(results, user_data, err)``.
Callback = Callable[[Optional[List[Any]], Any, str], None]


def describe_error(error: BaseException) -> str:
    """The ``err`` text a callback receives: ezrt's message, or the type and message."""
    if isinstance(error, EzrtError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class Outcome:
    """A one-shot slot that a worker fills and one thread waits on (cheapest Python wait)."""

    __slots__ = ("_done", "error", "result")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def __call__(self, result: Any, error: Optional[BaseException]) -> None:
        self.result = result
        self.error = error
        self._done.release()

    def wait(self) -> Tuple[Any, Optional[BaseException]]:
        """Block until filled (interruptible with Ctrl-C; the task itself still completes)."""
        self._done.acquire()
        self._done.release()
        return self.result, self.error

    def value(self) -> Any:
        """The result, or raise the error."""
        result, error = self.wait()
        if error is not None:
            raise error
        return result


def callback_completion(
    callback: Callback, user_data: Any, selection: OutputSelection
) -> Callable[[Any, Optional[BaseException]], None]:
    """The completion of a ``run_async`` task: calls ``callback(results, user_data, err)``."""
    arrange = None if selection.picks is None else selection.arrange

    def deliver(result: Any, error: Optional[BaseException]) -> None:
        if error is None:
            callback(result if arrange is None else arrange(result), user_data, "")
        else:
            callback(None, user_data, describe_error(error))

    return deliver


def future_completion(
    future: concurrent.futures.Future[Any], selection: OutputSelection
) -> Callable[[Any, Optional[BaseException]], None]:
    """The completion of a ``submit``/``arun`` task: resolves ``future``."""

    def settle(result: Any, error: Optional[BaseException]) -> None:
        try:
            if error is None:
                future.set_result(selection.arrange(result))
            else:
                future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by its owner meanwhile: nobody wants the outcome

    return settle


def gather_samples(outcomes: Sequence[Outcome], batch_size: int) -> List[Any]:
    """Wait for every sample of a dispatched batch; their results in order, or one
    :class:`BatchInferenceError` listing every sample that failed."""
    results: List[Any] = []
    errors: Dict[int, str] = {}
    for index, outcome in enumerate(outcomes):
        result, error = outcome.wait()
        if error is None:
            results.append(result)
        else:
            errors[index] = describe_error(error)
    if errors:
        raise BatchInferenceError(errors, batch_size)
    return results


def gather_in_order(outcomes: Sequence[Outcome], return_exceptions: bool) -> List[Any]:
    """Wait for every outcome; their results in order. A failure raises its error once all
    are collected, or stands in the list as the exception object (``return_exceptions``)."""
    results: List[Any] = []
    first_error: Optional[BaseException] = None
    for outcome in outcomes:
        result, error = outcome.wait()
        if error is None:
            results.append(result)
        else:
            results.append(error)
            first_error = first_error or error
    if first_error is not None and not return_exceptions:
        raise first_error
    return results
