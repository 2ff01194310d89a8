"""The ONNX Runtime surface ezrt forwards instead of re-implementing.

On the ONNX Runtime backend an ezrt session *is* an ``onnxruntime.InferenceSession`` plus
scheduling. This room holds what that takes, so that the session itself stays the ORT API:

* how one constructor call is read (:func:`read_ort_arguments`): ORT's arguments go to ORT
  untouched; ezrt's options are told from them by one rule;
* ORT's exceptions (:func:`ort_error`): an error ORT raises reaches the caller as an
  instance of ORT's own class *and* of ezrt's hierarchy, with ORT's text;
* the session methods ezrt adds nothing to (:class:`ForwardedMethods`), forwarded to the
  ORT session that holds the weights;
* default ezrt options for sessions built by a library: the ``EZRT_PROVIDER_OPTIONS``
  environment variable (:func:`ezrt.patch_onnxruntime`, in ``patch.py``, sets them in code).

The rule for ``provider_options`` (README, "How ezrt reads the constructor"):

* a dict holds ezrt's options (``make_provider_options``);
* a list, when ``providers`` is given, is ONNX Runtime's: one options dict per provider,
  passed to ORT as is; an ezrt key in it is an error (it would be ignored);
* a list without ``providers`` is upstream's form: its first dict holds ezrt's options
  (ONNX Runtime ignores ``provider_options`` when ``providers`` is not given).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type

from .errors import (
    BackendUnavailableError,
    EzrtError,
    InferenceError,
    InvalidArgumentError,
    InvalidTypeError,
)
from .options import SUPPORTED_KEYS, make_provider_options

__all__ = [
    "ENV_OPTIONS",
    "ORT_KWARGS",
    "ForwardedMethods",
    "OrtArguments",
    "ort",
    "ort_error",
    "ort_session_class",
    "read_ort_arguments",
]

#: JSON object of ``make_provider_options`` keywords: defaults for sessions without ezrt options.
ENV_OPTIONS = "EZRT_PROVIDER_OPTIONS"

#: The keyword arguments ONNX Runtime's constructor reads (it ignores any other).
ORT_KWARGS = ("disabled_optimizers", "enable_fallback", "read_config_from_model")

#: ezrt keys that no ONNX Runtime execution provider has: found in ORT's per-provider
#: option dicts they would be ignored, so they are an error there.
_EZRT_ONLY_KEYS = frozenset(SUPPORTED_KEYS) - {"layout", "output_dtype"}

_ort_lock = threading.Lock()
_ort_session_class: Optional[type] = None


def ort() -> Any:
    """The onnxruntime module (imported on first use, never at ``import ezrt``)."""
    import onnxruntime

    return onnxruntime


def ort_session_class() -> Any:
    """ONNX Runtime's own ``InferenceSession`` class, whatever ``onnxruntime.InferenceSession``
    has been rebound to since (``onnxruntime.InferenceSession = ezrt.InferenceSession`` and
    :func:`patch_onnxruntime` must not make ezrt build itself)."""
    global _ort_session_class
    if _ort_session_class is None:
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        _ort_session_class = InferenceSession
    return _ort_session_class


# ---------------------------------------------------------------------- errors

#: ORT's exception class name -> the ezrt class its twin also derives from.
_EZRT_BASE: Dict[str, Type[EzrtError]] = {
    "InvalidArgument": InvalidArgumentError,
    "NoSuchFile": InvalidArgumentError,
    "NoModel": InvalidArgumentError,
    "InvalidProtobuf": InvalidArgumentError,
    "InvalidGraph": InvalidArgumentError,
    "ModelLoaded": InvalidArgumentError,
    "NotFound": InvalidArgumentError,
    "EPFail": BackendUnavailableError,
    "Fail": InferenceError,
    "EngineError": InferenceError,
    "RuntimeException": InferenceError,
    "NotImplemented": InferenceError,
    "ModelLoadCanceled": InferenceError,
    "ModelRequiresCompilation": InferenceError,
}
_twins: Dict[type, type] = {}
_twins_lock = threading.Lock()


def _twin(ort_class: type) -> type:
    """An exception class deriving from both ORT's ``ort_class`` and ezrt's hierarchy."""
    with _twins_lock:
        twin = _twins.get(ort_class)
        if twin is None:
            base = _EZRT_BASE.get(ort_class.__name__, EzrtError)
            twin = type(
                ort_class.__name__,
                (base, ort_class),
                {
                    "__module__": __name__,
                    "__doc__": f"ONNX Runtime's {ort_class.__name__}, also an ezrt "
                    f"{base.__name__} (so ``except RuntimeError`` catches it too).",
                },
            )
            _twins[ort_class] = twin
        return twin


def ort_error(error: BaseException) -> BaseException:
    """The error to raise for one that ONNX Runtime raised.

    ORT's own exception classes (``Fail``, ``InvalidArgument``, ``NoSuchFile``, ...) become
    an instance of a twin class deriving from that class and from ezrt's (so existing
    ``except`` clauses of both kinds work), with ORT's message unchanged. Python's own
    exceptions raised by ORT (``TypeError``, ``ValueError``, ``RuntimeError``) are returned
    as they are: they are ORT's behaviour already.
    """
    cls = type(error)
    if cls.__module__.endswith("onnxruntime_pybind11_state") and not isinstance(error, EzrtError):
        twin: BaseException = _twin(cls)(*error.args)
        twin.__cause__ = error
        twin.__traceback__ = error.__traceback__
        return twin
    return error


# ---------------------------------------------------------------------- constructor arguments


class OrtArguments(NamedTuple):
    """What ONNX Runtime's constructor receives, exactly as the caller gave it."""

    sess_options: Any
    providers: Any
    provider_options: Any
    kwargs: Dict[str, Any]


def read_ort_arguments(
    sess_options: Any, providers: Any, provider_options: Any, kwargs: Mapping[str, Any]
) -> Tuple[OrtArguments, Optional[Mapping[str, Any]]]:
    """Split one constructor call into ORT's arguments and ezrt's options (None: the call
    gave none, so defaults apply: :func:`patch_onnxruntime`'s, else the environment's).

    ``kwargs`` are the call's keyword arguments other than ezrt's own: those ONNX Runtime
    reads go to it; any other is a ``TypeError`` (ORT would ignore a misspelt one).
    """
    unknown = sorted(set(kwargs) - set(ORT_KWARGS))
    if unknown:
        raise InvalidTypeError(
            f"InferenceSession() got an unexpected keyword argument {unknown[0]!r} "
            f"(ezrt takes use_weight_from; ONNX Runtime reads {', '.join(ORT_KWARGS)})"
        )
    ezrt_options: Optional[Mapping[str, Any]] = None
    ort_provider_options = provider_options
    if isinstance(provider_options, Mapping):
        ezrt_options, ort_provider_options = provider_options, None
    elif _is_list(provider_options):
        if providers is None:  # upstream's form; ORT ignores options without providers
            first = provider_options[0] if provider_options else None
            if first is not None and not isinstance(first, Mapping):
                raise InvalidTypeError(
                    "provider_options must be a dict or a sequence whose first element is "
                    f"a dict (element 0 is {type(first).__name__})"
                )
            ezrt_options, ort_provider_options = first, None
        else:
            _refuse_ezrt_keys(provider_options)
    arguments = OrtArguments(sess_options, providers, ort_provider_options, dict(kwargs))
    return arguments, ezrt_options


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _refuse_ezrt_keys(per_provider: Sequence[Any]) -> None:
    for options in per_provider:
        if not isinstance(options, Mapping):
            continue  # ORT's own check says what is wrong
        misplaced = sorted(key for key in options if key in _EZRT_ONLY_KEYS)
        if misplaced:
            raise InvalidArgumentError(
                f"provider_options: {misplaced[0]!r} is an ezrt option, but this list is "
                "ONNX Runtime's per-provider options (parallel to providers), where it would "
                "be ignored. Give ezrt's options as a dict: "
                f"provider_options={{{misplaced[0]!r}: ...}} (see make_provider_options)"
            )


def environment_options() -> Optional[Dict[str, Any]]:
    """ezrt options from ``EZRT_PROVIDER_OPTIONS`` (None when unset or empty)."""
    text = os.environ.get(ENV_OPTIONS, "").strip()
    if not text:
        return None
    try:
        keywords = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"{ENV_OPTIONS} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(keywords, dict):
        raise InvalidArgumentError(
            f"{ENV_OPTIONS} must be a JSON object of make_provider_options keywords, "
            f"e.g. '{{\"schedule\": [0, 1]}}' (got {text!r})"
        )
    try:
        return dict(make_provider_options(**keywords))
    except TypeError as exc:
        raise InvalidArgumentError(f"{ENV_OPTIONS}: {exc} (value {text!r})") from None
    except EzrtError as exc:
        raise type(exc)(f"{ENV_OPTIONS}: {exc}") from None


# ---------------------------------------------------------------------- forwarded methods


def _forward(name: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._ort_session(name), name)(*args, **kwargs)
        except Exception as error:
            converted = ort_error(error)
            if converted is error:
                raise
            raise converted from error

    method.__name__ = name
    method.__qualname__ = f"InferenceSession.{name}"
    method.__doc__ = (
        f"ONNX Runtime's ``InferenceSession.{name}``, on the session that holds the weights "
        "(ONNX Runtime backend only)."
    )
    return method


#: ``onnxruntime.InferenceSession`` methods ezrt adds nothing to: forwarded as they are.
FORWARDED = (
    "create_ortvalue_from_shape_and_type",
    "disable_fallback",
    "enable_fallback",
    "end_profiling",
    "get_input_epdevices",
    "get_input_memory_infos",
    "get_output_memory_infos",
    "get_overridable_initializers",
    "get_profiling_start_time_ns",
    "get_provider_graph_assignment_info",
    "get_session_options",
    "get_tuning_results",
    "release_captured_graph",
    "run_with_ort_values",
    "run_with_ortvaluevector",
    "set_ep_dynamic_options",
    "set_tuning_results",
)


class ForwardedMethods:
    """Mixin: ORT's session methods that ezrt forwards unchanged.

    The class using it provides ``_ort_session(what)``: the ORT session, or an error when
    the backend has none. A method a newer onnxruntime adds is forwarded too (see
    ``__getattr__`` in the session), and the test of public names reports it.
    """

    def _ort_session(self, what: str) -> Any:
        raise NotImplementedError


for _name in FORWARDED:
    setattr(ForwardedMethods, _name, _forward(_name))
del _name


def reexported(name: str) -> Any:
    """ONNX Runtime's public ``name``, for ``import ezrt as onnxruntime`` (AttributeError
    when onnxruntime has no such public name)."""
    if name.startswith("_"):
        raise AttributeError(name)
    module = ort()
    if name not in _public_names(module):
        raise AttributeError(name)
    return getattr(module, name)


def _public_names(module: Any) -> List[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    return list(names) + [n for n in dir(module) if not n.startswith("_")]


def loaded_ort() -> Any:
    """onnxruntime if something already imported it, else None (never imports it)."""
    return sys.modules.get("onnxruntime")
