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

import importlib
import logging
from typing import TYPE_CHECKING, Any, Dict

from ._version import __version__
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

if TYPE_CHECKING:
    from .backends.rknn.options import (
        Rknpu2ProviderOptions,
        Rknpu3ProviderOptions,
        make_rknpu2_provider_options,
        make_rknpu3_provider_options,
    )
    from .engine.metrics import LatencyHistogram, SessionStats
    from .io import ModelMetadata, NodeArg
    from .options import ProviderOptions, RknnProviderOptions, make_provider_options
    from .ortvalue import IOBinding, OrtValue, SessionIOBinding
    from .patch import OrtPatch, patch_onnxruntime
    from .session import InferenceSession

#: ezrt's names that load their module on first use: ``import ezrt`` stays light (no numpy,
#: no onnxruntime); ``from ezrt import InferenceSession`` loads what a session needs.
_LAZY: Dict[str, str] = {
    "InferenceSession": ".session",
    "ModelMetadata": ".io",
    "NodeArg": ".io",
    "ProviderOptions": ".options",
    "RknnProviderOptions": ".options",
    "make_provider_options": ".options",
    "Rknpu2ProviderOptions": ".backends.rknn.options",
    "Rknpu3ProviderOptions": ".backends.rknn.options",
    "make_rknpu2_provider_options": ".backends.rknn.options",
    "make_rknpu3_provider_options": ".backends.rknn.options",
    "LatencyHistogram": ".engine.metrics",
    "SessionStats": ".engine.metrics",
    "OrtPatch": ".patch",
    "patch_onnxruntime": ".patch",
    "IOBinding": ".ortvalue",
    "OrtValue": ".ortvalue",
    "SessionIOBinding": ".ortvalue",
}

#: ezrt's own submodules: ``from . import x`` asks the package for ``x`` before importing it,
#: which must not send the question on to onnxruntime (tests/test_hygiene.py keeps this list).
SUBMODULES = frozenset(
    {
        "_version",
        "aio",
        "backends",
        "bench",
        "boardcheck",
        "cli",
        "compat",
        "completion",
        "engine",
        "errors",
        "io",
        "metrics",
        "options",
        "ortvalue",
        "patch",
        "session",
        "streaming",
    }
)

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
    """ezrt's own names load their module on first use; every other public name of
    onnxruntime (``SessionOptions``, ``RunOptions``, ``GraphOptimizationLevel``,
    ``get_available_providers``, ...) is onnxruntime's own object, looked up on first use."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if name in SUBMODULES or name.startswith("_"):
        raise AttributeError(f"module 'ezrt' has no attribute {name!r}")
    from .compat import reexported

    try:
        return reexported(name)
    except AttributeError:
        raise AttributeError(f"module 'ezrt' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
