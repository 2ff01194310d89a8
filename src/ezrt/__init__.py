"""ezrt: ONNX Runtime's ``InferenceSession`` plus scheduling that keeps every core busy.

``from ezrt import InferenceSession`` is a drop-in for ``onnxruntime.InferenceSession``
that adds ``run_async`` (callbacks, in order), ``run_pipeline``, batch dispatch over
cores and bounded back-pressure, on ONNX Runtime (CPU, CUDA) or a Rockchip NPU.

``import ezrt as onnxruntime`` works too: every public name of onnxruntime that ezrt
does not define (``SessionOptions``, ``RunOptions``, ``GraphOptimizationLevel``,
``get_available_providers``, ...) is onnxruntime's own object, looked up on first use.
Importing ezrt loads neither onnxruntime nor librknnrt; they load when first needed.
"""

from __future__ import annotations

import logging
from typing import Any

from ._version import __version__
from .backends.rknn.options import (
    Rknpu2ProviderOptions,
    Rknpu3ProviderOptions,
    make_rknpu2_provider_options,
    make_rknpu3_provider_options,
)
from .compat import OrtPatch, patch_onnxruntime, reexported
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
from .ortvalue import IOBinding, OrtValue, SessionIOBinding
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
    "OrtPatch",
    "OrtValue",
    "PacingDropError",
    "PipelineFullError",
    "ProviderOptions",
    "ReentrancyError",
    "RknnProviderOptions",
    "Rknpu2ProviderOptions",
    "Rknpu3ProviderOptions",
    "SessionClosedError",
    "SessionIOBinding",
    "SessionStats",
    "SubmitTimeoutError",
    "__version__",
    "make_provider_options",
    "make_rknpu2_provider_options",
    "make_rknpu3_provider_options",
    "patch_onnxruntime",
]

logging.getLogger("ezrt").addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    """onnxruntime's public names (``SessionOptions``, ``RunOptions``,
    ``GraphOptimizationLevel``, ``get_available_providers``, ...), looked up on first use."""
    try:
        return reexported(name)
    except AttributeError:
        raise AttributeError(f"module 'ezrt' has no attribute {name!r}") from None
