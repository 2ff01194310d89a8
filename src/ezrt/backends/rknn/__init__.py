"""The Rockchip NPU backends: RKNPU2 (``librknnrt``) and RKNPU3 (``librknn3_api``), via ctypes.

This module is the seam the session calls. Importing it loads no runtime library (and no
ctypes declarations): :func:`open_backend` loads what the model needs, when a session opens.

* :data:`RKNN_PROVIDER_NAMES`: the provider names upstream 0.11 accepts.
* :func:`model_family`: which NPU family a model's first bytes belong to.
* :func:`requests_rknn`: whether a ``providers=`` argument names an RKNN provider.
* :func:`open_backend`: read ``providers`` / ``provider_options`` with 0.11's rules, check them
  against the model, find and load the runtime, and return the opened backend. The backend
  carries ``.config`` (the :class:`ezrt.options.SessionConfig` its engine is built from) and
  implements the protocol of :mod:`ezrt.backends.base`, plus ``providers()``,
  ``provider_options()``, ``native_inputs()``, ``native_outputs()``, ``io_binding(session)``
  and ``bound_payload(binding, run_options)`` (a payload for the engine: its workers'
  ``run`` recognise it).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ...errors import InvalidArgumentError
from .providers import RKNN_PROVIDER_NAMES, parse_request, requests_rknn

__all__ = [
    "RKNN_PROVIDER_NAMES",
    "model_family",
    "open_backend",
    "parse_request",
    "requests_rknn",
]

_MAGICS = ((b"CYPTRKNN", "RKNPU2"), (b"RKNN", "RKNPU2"), (b"RKNX", "RKNPU3"))


def model_family(head: bytes) -> Optional[str]:
    """``"RKNPU2"`` for ``RKNN`` (and encrypted ``CYPTRKNN``) models, ``"RKNPU3"`` for
    ``RKNX``, None for anything else."""
    for magic, family in _MAGICS:
        if head.startswith(magic):
            return family
    return None


def _describe_model(model: Union[str, bytes]) -> str:
    return model if isinstance(model, str) else f"<{len(model)} bytes>"


def _family_of_file(model: Union[str, bytes], head: bytes, requested: Optional[str]) -> str:
    family = model_family(head)
    if family is not None:
        return family
    if len(head) < 4:
        if isinstance(model, str):
            raise InvalidArgumentError(f"RKNN model is too small: {model}")
        raise InvalidArgumentError("RKNN model is too small to contain a valid header")
    magic = " ".join(f"{byte:02x}" for byte in head[:4])
    asked = f" (requested {requested}; " if requested else " ("
    raise InvalidArgumentError(
        f"Unknown RKNN model magic: {magic}{asked}{_describe_model(model)} is neither an RKNPU2 "
        "'RKNN' nor an RKNPU3 'RKNX' model)"
    )


def open_backend(
    model: Union[str, bytes],
    head: bytes,
    providers: Any,
    provider_options: Any,
    *,
    share_with: Any = None,
) -> Any:
    """Open an RKNN model (a path or its bytes; ``head`` = its first bytes) as upstream 0.11
    would: ``providers`` in 0.11's forms, ``provider_options`` checked for that provider,
    ``share_with`` the backend of a ``use_weight_from`` master (or None).

    Raises ezrt's errors (RuntimeError subclasses) with upstream's key phrases; a missing
    runtime library is :class:`ezrt.BackendUnavailableError` naming every candidate tried.
    """
    request = parse_request(providers, provider_options)
    family = _family_of_file(model, head, request.family)
    if request.family is not None and request.family != family:
        raise InvalidArgumentError(
            f"Provider/model mismatch: requested {request.family} but the model header is "
            f"{family} ({_describe_model(model)})"
        )
    if family == "RKNPU3":
        if share_with is not None:
            raise InvalidArgumentError("use_weight_from is supported by RKNPU2 only")
        from .rknpu3.backend import Rknpu3Backend

        return Rknpu3Backend(
            model,
            request.rknpu3,
            request.rknpu3_engine,
            given_options=request.given,
        )
    from .backend import RknnBackend

    if share_with is not None and not isinstance(share_with, RknnBackend):
        raise InvalidArgumentError("use_weight_from must refer to an RKNPU2 session")
    if share_with is not None and request.rknpu2.wants_custom_ops:
        raise InvalidArgumentError("use_weight_from cannot be combined with custom ops")
    if isinstance(model, str):
        try:
            with open(model, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise InvalidArgumentError(
                f"Unable to open RKNN model: {model} ({exc.strerror})"
            ) from exc
    else:
        data = model
    return RknnBackend(data, request.rknpu2, share_with=share_with, given_options=request.given)


def default_weight_path(model_path: Union[str, os.PathLike[str]]) -> str:
    """Where an RKNPU3 model's weights are looked for (upstream's rule)."""
    from .container import companion_weight_path

    return companion_weight_path(os.fspath(model_path))
