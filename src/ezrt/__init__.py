"""ezrt: an ONNX Runtime-shaped inference session that keeps every core busy.

``from ezrt import InferenceSession`` is a drop-in for ``onnxruntime.InferenceSession``
that adds ``run_async`` (callbacks, in order), ``run_pipeline``, batch dispatch over
cores and bounded back-pressure, on ONNX Runtime (CPU, CUDA) or a Rockchip NPU.
Importing ezrt loads neither onnxruntime nor librknnrt; they load when a session opens.
"""

from __future__ import annotations

import logging
from typing import Any

from ._version import __version__
from .engine.metrics import LatencyHistogram, SessionStats
from .errors import (
    BackendUnavailableError,
    BatchInferenceError,
    DeadlineExceededError,
    EzrtError,
    EzrtWarning,
    InferenceError,
    InvalidArgumentError,
    InvalidTypeError,
    PacingDropError,
    PipelineFullError,
    ReentrancyError,
    SessionClosedError,
    SubmitTimeoutError,
)
from .io import ModelMetadata, NodeArg
from .options import ProviderOptions, RknnProviderOptions, make_provider_options
from .session import InferenceSession

__all__ = [
    "BackendUnavailableError",
    "BatchInferenceError",
    "DeadlineExceededError",
    "EzrtError",
    "EzrtWarning",
    "IOBinding",
    "InferenceError",
    "InferenceSession",
    "InvalidArgumentError",
    "InvalidTypeError",
    "LatencyHistogram",
    "ModelMetadata",
    "NodeArg",
    "OrtValue",
    "PacingDropError",
    "PipelineFullError",
    "ProviderOptions",
    "ReentrancyError",
    "RknnProviderOptions",
    "SessionClosedError",
    "SessionIOBinding",
    "SessionStats",
    "SubmitTimeoutError",
    "__version__",
    "make_provider_options",
]

logging.getLogger("ezrt").addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    """``OrtValue`` and ``IOBinding`` are ONNX Runtime's own; imported on first use."""
    if name == "OrtValue":
        from onnxruntime import OrtValue

        return OrtValue
    if name in ("IOBinding", "SessionIOBinding"):
        from onnxruntime import IOBinding

        return IOBinding
    raise AttributeError(f"module 'ezrt' has no attribute {name!r}")
