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
from ..options import parse_provider_options
from .base import Backend

__all__ = ["open_backend", "rknn_family"]


def rknn_family(head: bytes) -> Optional[str]:
    """``"RKNPU2"`` (``RKNN``, ``CYPTRKNN``) or ``"RKNPU3"`` (``RKNX``) for an RKNN model's
    first bytes, else None."""
    from . import rknn

    return rknn.model_family(head)


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
    from . import rknn

    if rknn.requests_rknn(providers):
        rknn.parse_request(providers, provider_options)  # 0.11: these errors precede the file
        model, head = _load(path_or_bytes, required=True)
    else:
        model, head = _load(path_or_bytes)
    if rknn.requests_rknn(providers) or rknn.model_family(head) is not None:
        if kwargs:  # upstream ignores them silently: a misspelt option would vanish
            raise InvalidTypeError(
                "InferenceSession() got an unexpected keyword argument "
                f"{sorted(kwargs)[0]!r} (an RKNN session takes use_weight_from only)"
            )
        if provider_options is None:
            provider_options = defaults if defaults is not None else environment_options()
        opened: Backend = rknn.open_backend(
            model, head, providers, provider_options, share_with=share_with
        )
        return opened
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


def _load(path_or_bytes: Any, *, required: bool = False) -> Tuple[Union[str, bytes], bytes]:
    """The model as a runtime takes it (path or bytes) and its first bytes. A file that
    cannot be read here has no head (b"") unless ``required``: ONNX Runtime then says why,
    in its own words."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        if not data and required:
            raise InvalidArgumentError("model data must not be empty")
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
    except OSError as exc:
        if required:
            message = f"Unable to open RKNN model: {path} ({exc.strerror})"
            raise InvalidArgumentError(message) from exc
        return path, b""
