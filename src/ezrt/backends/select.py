"""Choosing and opening a backend: one function, called once per session.

The model's first bytes and the ``providers`` argument decide the family, before any
runtime loads (as ORT's ``check_and_normalize_provider_args`` checks its arguments before
any work):

* an RKNN model (``RKNN``/``CYPTRKNN``; ``RKNX`` for RKNPU3), or a provider list naming an
  RKNN provider, opens the RKNN backend with upstream 0.11's rules for ``providers`` and
  ``provider_options``;
* anything else is ONNX Runtime's: ``sess_options``, ``providers``, ``provider_options``
  and ORT's keyword arguments go to ONNX Runtime unchanged, and ezrt's options are told
  from them by the rule in :mod:`ezrt.compat`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Tuple, Union

from ..compat import environment_options, read_ort_arguments
from ..errors import InvalidArgumentError, InvalidTypeError
from ..options import parse_provider_options, split_provider_options
from .base import Backend

__all__ = ["RKNN_PROVIDERS", "open_backend", "rknn_family"]

#: Provider names that select the RKNN backend (upstream 0.11's names and alias).
RKNN_PROVIDERS = ("RKNPU2ExecutionProvider", "RKNNExecutionProvider", "RKNPU3ExecutionProvider")
_RKNN_MAGICS = (b"RKNN", b"CYPTRKNN")


def rknn_family(head: bytes) -> Optional[str]:
    """``"RKNPU2"`` when the bytes start like an RKNN model, else None."""
    return "RKNPU2" if head.startswith(_RKNN_MAGICS) else None


def open_backend(
    path_or_bytes: Any,
    sess_options: Any,
    providers: Any,
    provider_options: Any,
    kwargs: Mapping[str, Any],
    *,
    defaults: Optional[Mapping[str, Any]] = None,
    share_with: Optional[Backend] = None,
) -> Backend:
    """Open the model on the backend its bytes and ``providers`` call for.

    ``defaults`` are ezrt options for a call that gives none (``patch_onnxruntime``'s);
    without them ``EZRT_PROVIDER_OPTIONS`` applies. ``share_with`` is the backend of the
    ``use_weight_from`` session.
    """
    model, head = _load(path_or_bytes)
    wants_rknn = _names_rknn(providers)
    if rknn_family(head) is not None or wants_rknn:
        if provider_options is None:
            provider_options = defaults if defaults is not None else environment_options()
        return _open_rknn(model, provider_options, share_with)
    arguments, ezrt_options = read_ort_arguments(sess_options, providers, provider_options, kwargs)
    if ezrt_options is None:
        ezrt_options = defaults if defaults is not None else environment_options()
    config, _ = parse_provider_options(ezrt_options)
    from .onnxruntime import OrtBackend

    if share_with is not None and not isinstance(share_with, OrtBackend):
        raise InvalidArgumentError(
            "use_weight_from must be a session on the same backend as this one"
        )
    if share_with is not None and config.wants_custom_ops:
        raise InvalidArgumentError("use_weight_from cannot be combined with custom-op loading")
    return OrtBackend(model, arguments, config, share_with=share_with)


def _load(path_or_bytes: Any) -> Tuple[Union[str, bytes], bytes]:
    """The model as a runtime takes it (path or bytes) and its first bytes ("" when the
    file cannot be read here: ONNX Runtime then says why, in its own words)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        if not data:
            raise InvalidArgumentError("the model bytes are empty")
        return data, data[:16]
    try:
        path = os.fspath(path_or_bytes)
    except TypeError:  # ONNX Runtime's words (ezrt takes bytearray and memoryview too)
        raise InvalidTypeError(f"Unable to load from type '{type(path_or_bytes)}'") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        with open(path, "rb") as handle:
            return path, handle.read(16)
    except OSError:
        return path, b""


def _names_rknn(providers: Any) -> Optional[str]:
    """The first RKNN provider name in ``providers`` (a name, a list, (name, options))."""
    if isinstance(providers, str):
        return providers if providers in RKNN_PROVIDERS else None
    if not isinstance(providers, (list, tuple)):
        return None
    for entry in providers:
        name = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
        if isinstance(name, str) and name in RKNN_PROVIDERS:
            return name
    return None


def _open_rknn(model: Union[str, bytes], provider_options: Any, share_with: Any) -> Backend:
    from .rknn.backend import RknnBackend

    option_dicts = split_provider_options(provider_options)
    config, _ = parse_provider_options(option_dicts[0] if option_dicts else None)
    if share_with is not None:
        if not isinstance(share_with, RknnBackend):
            raise InvalidArgumentError(
                "use_weight_from must be a session on the same backend as this one"
            )
        if config.wants_custom_ops:
            raise InvalidArgumentError("use_weight_from cannot be combined with custom-op loading")
    if isinstance(model, str):
        path = model
        try:
            with open(path, "rb") as handle:
                model = handle.read()
        except OSError as exc:
            raise InvalidArgumentError(
                f"Failed to open model file: {path} ({exc.strerror})"
            ) from exc
    return RknnBackend(model, config, share_with=share_with)
