"""ezrt's exceptions.

Every exception ezrt raises on purpose derives from :class:`EzrtError`, which is a
``RuntimeError`` because upstream raises ``RuntimeError`` for everything and existing
``except RuntimeError`` clauses must keep working. Errors about bad arguments also derive
from ``ValueError`` or ``TypeError``, so idiomatic Python handlers work too.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Mapping, Type

__all__ = [
    "BackendUnavailableError",
    "BatchInferenceError",
    "DeadlineExceededError",
    "EzrtError",
    "EzrtRuntimeWarning",
    "EzrtWarning",
    "InferenceError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "PacingDropError",
    "PipelineFullError",
    "ReentrancyError",
    "SessionClosedError",
    "SubmitTimeoutError",
    "warn",
]


class EzrtError(RuntimeError):
    """Base class of every error ezrt raises deliberately."""


class EzrtWarning(UserWarning):
    """Base category of every warning ezrt issues: ``warnings.filterwarnings("ignore",
    category=ezrt.EzrtWarning)`` silences ezrt's warnings and no one else's."""


def warn(message: str, category: Type[Warning] = EzrtWarning) -> None:
    """Issue a warning that points at the caller's own line: the first frame outside the
    ezrt package, however deep inside ezrt it is raised (no stack levels to count)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame = sys._getframe(1)  # the caller of warn() is stacklevel 2 of warnings.warn
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)


class EzrtRuntimeWarning(EzrtWarning, RuntimeWarning):
    """A warning about the running environment (e.g. a requested provider is unavailable and
    ezrt fell back to another); also a ``RuntimeWarning``."""


class InvalidArgumentError(EzrtError, ValueError):
    """An argument or provider option has the right type but a value ezrt cannot use."""


class InvalidTypeError(EzrtError, TypeError):
    """An argument or provider option has a type ezrt does not accept."""


class SubmitTimeoutError(EzrtError, TimeoutError):
    """The pipeline stayed full for ``submit_timeout_ms``; the task was not accepted."""


class PipelineFullError(SubmitTimeoutError):
    """A non-blocking submit found the pipeline full; the task was not accepted."""


class DeadlineExceededError(EzrtError, TimeoutError):
    """A task's deadline passed before a worker started it; it never ran."""


class SessionClosedError(EzrtError):
    """The session is closed (or closing), or the task was cancelled by ``close(cancel=True)``."""


class PacingDropError(EzrtError):
    """The task arrived sooner than pacing allows (``enable_pacing``) and was dropped unrun."""


class ReentrancyError(EzrtError):
    """A call from a callback would have to wait for the callback thread itself."""


class BackendUnavailableError(EzrtError):
    """The runtime a backend needs (a library, a device, a provider) is not usable here."""


class InferenceError(EzrtError):
    """A task failed inside the backend. ``__cause__`` holds the backend's own exception."""


class BatchInferenceError(InferenceError):
    """One or more samples of a batch-dispatched ``run`` failed.

    ``errors`` maps each failed sample index to its error message; every failure is listed,
    not only the first.
    """

    def __init__(self, errors: Mapping[int, str], batch_size: int) -> None:
        self.errors = dict(sorted(errors.items()))
        self.batch_size = batch_size
        details = "; ".join(f"sample {i}: {msg}" for i, msg in self.errors.items())
        super().__init__(
            f"{len(self.errors)} of {batch_size} samples failed in batch mode: {details}"
        )
