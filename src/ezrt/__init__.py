"""ezrt: an ONNX Runtime-shaped inference session that keeps every core busy.

``from ezrt import InferenceSession`` is a drop-in for ``onnxruntime.InferenceSession``
that adds ``run_async`` (callbacks, in order), ``run_pipeline``, batch dispatch over
cores and bounded back-pressure, on ONNX Runtime (CPU, CUDA) or a Rockchip NPU.
Importing ezrt loads neither onnxruntime nor librknnrt; they load when a session opens.
"""

from __future__ import annotations

from ._version import __version__

# --- RKNN at upstream 0.11 (issue 13): its option names and helpers, and one OrtValue /
# IOBinding surface for both backends (onnxruntime's own objects on ONNX Runtime). Importing
# these loads neither onnxruntime nor an NPU runtime.
from .backends.rknn.options import (
    Rknpu2ProviderOptions,
    Rknpu3ProviderOptions,
    make_rknpu2_provider_options,
    make_rknpu3_provider_options,
)
from .engine.metrics import LatencyHistogram, SessionStats
from .errors import (
    BackendUnavailableError,
    BatchInferenceError,
    DeadlineExceededError,
    EzrtError,
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

# --- end of the RKNN 0.11 block

__all__ = [
    "BackendUnavailableError",
    "BatchInferenceError",
    "DeadlineExceededError",
    "EzrtError",
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
]
