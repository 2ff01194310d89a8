"""Switching ezrt on for code that builds its own ``onnxruntime.InferenceSession``s.

:func:`patch_onnxruntime` rebinds ``onnxruntime.InferenceSession`` to a subclass of
ezrt's session that carries default ezrt options; :class:`OrtPatch` undoes it. It sits
above the session (it subclasses it), so that ``compat`` below the session never imports
upward.
"""

from __future__ import annotations

from typing import Any

from .compat import ort
from .options import make_provider_options
from .session import InferenceSession

__all__ = ["OrtPatch", "patch_onnxruntime"]


class OrtPatch:
    """While active, ``onnxruntime.InferenceSession`` builds ezrt sessions.

    Returned by :func:`patch_onnxruntime`; ``undo()`` (or leaving the ``with`` block)
    restores ONNX Runtime's own class. Patches nest: each undo restores what it replaced.
    """

    def __init__(self, session_class: type, replaced: Any) -> None:
        self.session_class = session_class
        self._replaced = replaced
        self.active = True

    def undo(self) -> None:
        """Put back what ``onnxruntime.InferenceSession`` was before (idempotent)."""
        if self.active:
            ort().InferenceSession = self._replaced
            self.active = False

    def __enter__(self) -> OrtPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


def patch_onnxruntime(**provider_options: Any) -> OrtPatch:
    """Make ``onnxruntime.InferenceSession(...)`` build ezrt sessions with these options.

    For libraries that build their own sessions: call it before the library creates them
    (a library that did ``from onnxruntime import InferenceSession`` before the patch keeps
    ORT's class). ``provider_options`` are ``make_provider_options`` keywords; a call that
    passes its own ezrt options (a dict ``provider_options``) keeps them. ``undo()``
    restores ONNX Runtime's class; ``with ezrt.patch_onnxruntime(...):`` works too.
    The options apply where the call itself gives no ezrt options, before
    ``EZRT_PROVIDER_OPTIONS``; called without keywords, the sessions take their options from
    ``EZRT_PROVIDER_OPTIONS`` (when set) as ezrt's own do, so the options of a deployed
    application can change without editing it.
    """
    # Without keywords the patched sessions read EZRT_PROVIDER_OPTIONS, as ezrt's own do.
    options = dict(make_provider_options(**provider_options)) if provider_options else None

    class PatchedInferenceSession(InferenceSession):
        __doc__ = InferenceSession.__doc__
        default_options = options

    module = ort()
    patch = OrtPatch(PatchedInferenceSession, module.InferenceSession)
    module.InferenceSession = PatchedInferenceSession
    return patch
