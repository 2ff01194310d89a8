"""How one ``providers=`` / ``provider_options=`` pair is read for an RKNN model (0.11 rules).

Upstream 0.11 (UPSTREAM_0_11.md §1.4, §2.3): ``providers`` is absent (the model's magic
decides), a provider name, or a sequence of exactly one spec, which is a name or a
``(name, options)`` pair. Names: ``RKNPU2ExecutionProvider`` (alias
``RKNNExecutionProvider``) and ``RKNPU3ExecutionProvider``. Options come inline or through
``provider_options`` (a dict, or a sequence whose first item is a dict), not both. Which keys
are accepted depends on the provider (explicit RKNPU2, explicit RKNPU3, or auto: both sets
validated, the one not matching the model ignored). Every error here fires before the model
file is touched, with upstream's key phrase in ezrt's exception class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ...errors import InvalidArgumentError, InvalidTypeError
from ...options import SUPPORTED_KEYS, SessionConfig, parse_provider_options
from .options import ENGINE_KEYS, RKNPU3_KEYS, Rknpu3Config, parse_rknpu3_options

__all__ = [
    "CANONICAL_NAMES",
    "RKNN_PROVIDER_NAMES",
    "RknnRequest",
    "family_of",
    "parse_request",
    "requests_rknn",
]

RKNPU2_PROVIDER = "RKNPU2ExecutionProvider"
RKNN_ALIAS = "RKNNExecutionProvider"
RKNPU3_PROVIDER = "RKNPU3ExecutionProvider"
#: The provider names upstream 0.11 accepts.
RKNN_PROVIDER_NAMES: Tuple[str, ...] = (RKNPU2_PROVIDER, RKNN_ALIAS, RKNPU3_PROVIDER)
_FAMILY = {RKNPU2_PROVIDER: "RKNPU2", RKNN_ALIAS: "RKNPU2", RKNPU3_PROVIDER: "RKNPU3"}
#: Family -> the name get_providers() reports (canonical, even when the alias was asked for).
CANONICAL_NAMES = {"RKNPU2": RKNPU2_PROVIDER, "RKNPU3": RKNPU3_PROVIDER}


@dataclass(frozen=True)
class RknnRequest:
    """A parsed request: the family asked for (None: the model decides), the options as the
    caller gave them, and both families' validated configs."""

    family: Optional[str]
    given: Dict[str, Any] = field(default_factory=dict)
    rknpu2: SessionConfig = field(default_factory=SessionConfig)
    rknpu3: Rknpu3Config = field(default_factory=Rknpu3Config)
    #: The RKNPU3 session's engine settings (ezrt's workers), from ENGINE_KEYS.
    rknpu3_engine: SessionConfig = field(default_factory=SessionConfig)


def family_of(name: str) -> Optional[str]:
    """The family ("RKNPU2" or "RKNPU3") of an RKNN provider name, else None."""
    return _FAMILY.get(name)


def _entries(providers: Any) -> List[Any]:
    if providers is None:
        return []
    if isinstance(providers, str):
        return [providers]
    if isinstance(providers, (bytes, bytearray)) or not isinstance(providers, Sequence):
        raise InvalidTypeError(
            f"providers must be a string or sequence (got {type(providers).__name__})"
        )
    return list(providers)


def _names(providers: Any) -> List[str]:
    """Every provider name in any accepted form (no errors: for routing only)."""
    try:
        entries = _entries(providers)
    except InvalidTypeError:
        return []
    names = []
    for entry in entries:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[0], str):
            names.append(entry[0])
    return names


def requests_rknn(providers: Any) -> bool:
    """True when ``providers`` names an RKNN provider (then the RKNN rules apply)."""
    return any(name in _FAMILY for name in _names(providers))


def _spec(providers: Any) -> Tuple[Optional[str], Optional[Mapping[str, Any]]]:
    entries = _entries(providers)
    if not entries:
        return None, None
    if len(entries) > 1:
        raise InvalidArgumentError(
            "exactly one RKNN execution provider is supported per session "
            f"(got {len(entries)}: {', '.join(repr(e) for e in entries)})"
        )
    entry = entries[0]
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, Sequence) and not isinstance(entry, (bytes, bytearray)):
        if len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], Mapping):
            return entry[0], entry[1]
        raise InvalidTypeError(
            f"provider tuple must be (provider_name, options_dict) (got {entry!r})"
        )
    raise InvalidTypeError(
        "provider entry must be a name or (name, options) tuple "
        f"(got {type(entry).__name__}: {entry!r})"
    )


def _options(provider_options: Any) -> Optional[Mapping[str, Any]]:
    if provider_options is None or (isinstance(provider_options, str) and not provider_options):
        return None
    if isinstance(provider_options, Mapping):
        return provider_options
    if isinstance(provider_options, Sequence) and not isinstance(
        provider_options, (str, bytes, bytearray)
    ):
        if not provider_options:
            return None
        if isinstance(provider_options[0], Mapping):
            return provider_options[0]
    raise InvalidTypeError(
        "provider_options must be a dict or a sequence whose first item is a dict "
        f"(got {type(provider_options).__name__})"
    )


def parse_request(providers: Any, provider_options: Any) -> RknnRequest:
    """Read ``providers`` and ``provider_options`` with upstream 0.11's rules and phrases."""
    name, inline = _spec(providers)
    family = None
    if name is not None:
        family = _FAMILY.get(name)
        if family is None:
            raise InvalidArgumentError(
                f"Unsupported execution provider: {name} (RKNN models run on "
                f"{', '.join(RKNN_PROVIDER_NAMES)})"
            )
    separate = _options(provider_options)
    if inline and separate:
        raise InvalidArgumentError(
            "provider options were supplied both inline and via provider_options"
        )
    given = inline or separate or {}
    for key in given:
        if not isinstance(key, str):
            raise InvalidTypeError(
                f"provider_options keys must be strings (got {type(key).__name__}: {key!r})"
            )
    rknpu2_keys = set(SUPPORTED_KEYS)
    rknpu3_keys = set(RKNPU3_KEYS) | set(ENGINE_KEYS)
    for key in given:
        if family == "RKNPU3":
            if key not in rknpu3_keys:
                raise InvalidArgumentError(f"Unknown RKNPU3 provider_options key: {key}")
        elif key not in rknpu2_keys and (family == "RKNPU2" or key not in rknpu3_keys):
            raise InvalidArgumentError(f"Unknown provider_options key: {key}")
    rknpu2 = SessionConfig()
    if family != "RKNPU3":
        rknpu2, _ = parse_provider_options({k: v for k, v in given.items() if k in rknpu2_keys})
    engine = parse_provider_options({k: v for k, v in given.items() if k in ENGINE_KEYS})[0]
    rknpu3 = Rknpu3Config()
    if family != "RKNPU2":
        rknpu3 = parse_rknpu3_options(given)
    return RknnRequest(family, dict(given), rknpu2, rknpu3, engine)
