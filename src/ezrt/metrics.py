"""Prometheus export of sessions' statistics (``pip install "ezrt[prometheus]"``).

    from prometheus_client import start_http_server
    from ezrt.metrics import register_session
    register_session(detector, session="detector")   # labels its series session="detector"
    register_session(classifier, session="classifier")
    start_http_server(9100)

Every session registered in one registry shares one collector, so each metric name is one
family (``# HELP`` and ``# TYPE`` once) with a series per session, told apart by its labels.
Metric names follow Prometheus conventions: counters end in ``_total``, durations are
histograms in seconds (18 buckets, 1 us to 100 s in half-decades, and ``+Inf``), and
``ezrt_session_info`` carries the ezrt version, backend and provider of each session.
Values are read from ``session.stats()`` at scrape time. Sessions are held by weak
reference: a session that is garbage-collected drops out of the exposition.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from ._version import __version__
from .engine.metrics import BOUNDS, LatencyHistogram
from .errors import BackendUnavailableError, EzrtError, InvalidArgumentError

__all__ = [
    "BUCKET_BOUNDS",
    "SessionCollector",
    "export_buckets",
    "register_session",
    "unregister_session",
]

_COUNTERS = (
    ("submitted", "ezrt_tasks_submitted", "Tasks accepted by the session."),
    ("completed", "ezrt_tasks_completed", "Tasks that ran and succeeded."),
    ("failed", "ezrt_tasks_failed", "Tasks that ran and failed."),
    ("dropped", "ezrt_tasks_dropped", "Tasks dropped by pacing."),
    ("cancelled", "ezrt_tasks_cancelled", "Tasks cancelled before they ran."),
    ("expired", "ezrt_tasks_expired", "Tasks whose deadline passed before they ran."),
    ("timed_out", "ezrt_submit_timeouts", "Submissions refused at submit_timeout_ms."),
)
_HISTOGRAMS = (
    ("queue_wait", "ezrt_task_queue_wait_seconds", "From submission to a worker starting it."),
    ("compute", "ezrt_task_compute_seconds", "The backend's run of one task."),
    ("delivery", "ezrt_task_delivery_seconds", "From result to run_async callback returning."),
)
_STAGES = ("queued", "running", "undelivered")
_INFO = ("ezrt_session", "The ezrt version, backend and execution provider of a session.")
_IN_STAGE = ("ezrt_tasks_in_stage", "Tasks now queued, running or awaiting their callback.")
_BUSY = ("ezrt_worker_busy_seconds", "Time each worker spent running tasks.")
#: Label names the exporter sets itself, so a session's labels cannot use them.
_RESERVED = ("stage", "worker", "le", "version", "backend", "provider")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

#: Indices into the engine's fine bounds (8 per decade) kept for export: every 4th, i.e.
#: half-decades from 1 us to 100 s. The fine histogram's counts add up exactly into these.
_KEPT = tuple(range(0, len(BOUNDS), 4))
#: The exported histogram bucket bounds in seconds (``le``), without ``+Inf``.
BUCKET_BOUNDS: Tuple[float, ...] = tuple(BOUNDS[k] for k in _KEPT)
#: Their ``le`` labels, to three significant digits ("3.16e-05", "0.1", "100.0").
_LE = tuple(repr(float(f"{bound:.3g}")) for bound in BUCKET_BOUNDS)


def _client() -> Any:
    try:
        import prometheus_client.core as core
    except ImportError:
        raise BackendUnavailableError(
            'the Prometheus exporter needs prometheus_client: pip install "ezrt[prometheus]"'
        ) from None
    return core


def export_buckets(histogram: LatencyHistogram) -> List[Tuple[str, float]]:
    """The cumulative ``(le, count)`` pairs of ``histogram`` on :data:`BUCKET_BOUNDS`."""
    buckets: List[Tuple[str, float]] = []
    cumulative, start = 0, 0
    for index, le in zip(_KEPT, _LE):
        cumulative += sum(histogram.counts[start : index + 1])
        start = index + 1
        buckets.append((le, cumulative))
    buckets.append(("+Inf", histogram.count))
    return buckets


def _backend_name(provider: str) -> str:
    return "rknn" if provider.startswith("RKNN") else "onnxruntime"


class _Entry:
    """One registered session: a weak reference and its label values."""

    __slots__ = ("labels", "ref")

    def __init__(self, session: Any, labels: Dict[str, str]) -> None:
        self.ref = weakref.ref(session)
        self.labels = labels


class SessionCollector:
    """A prometheus_client collector for one or more sessions.

    ``SessionCollector(session, {"session": "detector"})`` collects one session;
    :meth:`add` adds more, each with the same label names and different values. Each metric
    name is one family with a series per session. Prefer :func:`register_session`, which
    keeps one collector per registry.
    """

    def __init__(self, session: Any = None, labels: Optional[Mapping[str, str]] = None) -> None:
        self._core = _client()
        self._lock = threading.Lock()  # guards _entries
        self._entries: List[_Entry] = []
        if session is not None:
            self.add(session, **dict(labels or {}))

    def add(self, session: Any, /, **labels: str) -> None:
        """Collect ``session`` too, with ``labels`` on its series (default
        ``session="default"``). Raises ``InvalidArgumentError`` for a label name the
        exporter uses itself, label names other than the other sessions', or label values
        that another session already has."""
        labels = dict(labels or {"session": "default"})
        _check_labels(labels)
        with self._lock:
            self._entries = [e for e in self._entries if e.ref() is not None]
            for entry in self._entries:
                if entry.ref() is session:
                    raise InvalidArgumentError(
                        f"this session is already collected as {entry.labels}"
                    )
                if sorted(entry.labels) != sorted(labels):
                    raise InvalidArgumentError(
                        f"every session in one registry needs the same label names: "
                        f"expected {sorted(entry.labels)}, got {sorted(labels)}"
                    )
                if entry.labels == labels:
                    raise InvalidArgumentError(
                        f"another session is already collected with labels {labels}; "
                        'give each session its own, e.g. session="detector"'
                    )
            self._entries.append(_Entry(session, labels))

    def remove(self, session: Any) -> bool:
        """Stop collecting ``session``; True if it was collected."""
        with self._lock:
            kept = [e for e in self._entries if e.ref() is not None and e.ref() is not session]
            removed = len(kept) != len([e for e in self._entries if e.ref() is not None])
            self._entries = kept
        return removed

    def __len__(self) -> int:
        """How many live sessions this collector reads."""
        with self._lock:
            return sum(1 for e in self._entries if e.ref() is not None)

    def _families(self, names: List[str]) -> Dict[str, Any]:
        core = self._core
        families: Dict[str, Any] = {
            _INFO[0]: core.InfoMetricFamily(
                *_INFO, labels=[*names, "version", "backend", "provider"]
            )
        }
        for _, metric, text in _COUNTERS:
            families[metric] = core.CounterMetricFamily(metric, text, labels=names)
        families[_IN_STAGE[0]] = core.GaugeMetricFamily(*_IN_STAGE, labels=[*names, "stage"])
        for _, metric, text in _HISTOGRAMS:
            families[metric] = core.HistogramMetricFamily(metric, text, labels=names)
        families[_BUSY[0]] = core.CounterMetricFamily(*_BUSY, labels=[*names, "worker"])
        return families

    def describe(self) -> Iterator[Any]:
        """Every family this collector exposes, without samples (lets a registry refuse a
        second collector of the same names)."""
        return iter(list(self._families(self._label_names()).values()))

    def _label_names(self) -> List[str]:
        with self._lock:
            live = [e for e in self._entries if e.ref() is not None]
        return sorted(live[0].labels) if live else ["session"]

    def collect(self) -> Iterator[Any]:
        """One family per metric name, one series (per stage/worker) per session."""
        with self._lock:
            entries = list(self._entries)
        names = self._label_names()
        families = self._families(names)
        for entry in entries:
            session = entry.ref()
            if session is None:
                continue
            try:
                stats = session.stats()
                provider = session.get_providers()[0]
            except EzrtError:  # a session that cannot report is left out of this scrape
                continue
            values = [entry.labels[name] for name in names]
            families[_INFO[0]].add_metric(
                values,
                {
                    **dict(zip(names, values)),
                    "version": __version__,
                    "backend": _backend_name(provider),
                    "provider": provider,
                },
            )
            for key, metric, _ in _COUNTERS:
                families[metric].add_metric(values, getattr(stats, key))
            for stage in _STAGES:
                families[_IN_STAGE[0]].add_metric([*values, stage], getattr(stats, stage))
            for key, metric, _ in _HISTOGRAMS:
                histogram: LatencyHistogram = getattr(stats, key)
                families[metric].add_metric(
                    values, export_buckets(histogram), sum_value=histogram.total
                )
            for worker, seconds in stats.worker_busy_seconds.items():
                families[_BUSY[0]].add_metric([*values, worker], seconds)
        return iter(list(families.values()))


def _check_labels(labels: Mapping[str, str]) -> None:
    for name, value in labels.items():
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise InvalidArgumentError(
                f"label name {name!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
            )
        if name in _RESERVED:
            raise InvalidArgumentError(
                f"label name {name!r} is set by the exporter itself; choose another "
                f"(reserved: {', '.join(_RESERVED)})"
            )
        if not isinstance(value, str):
            raise InvalidArgumentError(
                f"label {name} must be a string (got {type(value).__name__} {value!r})"
            )


# One collector per registry, so that every session registered there shares its families.
_collectors: weakref.WeakKeyDictionary[Any, SessionCollector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()  # guards _collectors and each registration


def register_session(session: Any, registry: Any = None, /, **labels: str) -> SessionCollector:
    """Expose ``session`` in ``registry`` (prometheus_client's default registry if None).

    ``labels`` go on every series of this session (default ``session="default"``); all the
    sessions of one registry need the same label names and different values. Returns the
    registry's ezrt collector (shared by its sessions).
    """
    core = _client()
    registry = registry if registry is not None else core.REGISTRY
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = SessionCollector()
            collector.add(session, **labels)
            registry.register(collector)
            _collectors[registry] = collector
        else:
            collector.add(session, **labels)
    return collector


def unregister_session(session: Any, registry: Any = None) -> bool:
    """Stop exposing ``session`` in ``registry``; True if it was registered there. The
    registry's collector is unregistered with its last session."""
    core = _client()
    registry = registry if registry is not None else core.REGISTRY
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None or not collector.remove(session):
            return False
        if not len(collector):
            registry.unregister(collector)
            del _collectors[registry]
    return True
