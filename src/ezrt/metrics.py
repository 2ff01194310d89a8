"""Prometheus export of a session's statistics (``pip install "ezrt[prometheus]"``).

    from prometheus_client import start_http_server
    from ezrt.metrics import register_session
    register_session(session, session="detector")   # labels each series session="detector"
    start_http_server(9100)

Metric names follow Prometheus conventions: counters end in ``_total``, durations are
histograms in seconds. Values are read from ``session.stats()`` at scrape time.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

from .engine.metrics import BOUNDS, LatencyHistogram
from .errors import BackendUnavailableError

__all__ = ["SessionCollector", "register_session"]

_COUNTERS = (
    ("submitted", "ezrt_tasks_submitted_total", "Tasks accepted by the session."),
    ("completed", "ezrt_tasks_completed_total", "Tasks that ran and succeeded."),
    ("failed", "ezrt_tasks_failed_total", "Tasks that ran and failed."),
    ("dropped", "ezrt_tasks_dropped_total", "Tasks dropped by pacing."),
    ("cancelled", "ezrt_tasks_cancelled_total", "Tasks cancelled before they ran."),
    ("expired", "ezrt_tasks_expired_total", "Tasks whose deadline passed before they ran."),
    ("timed_out", "ezrt_submit_timeouts_total", "Submissions refused at submit_timeout_ms."),
)
_HISTOGRAMS = (
    ("queue_wait", "ezrt_task_queue_wait_seconds", "From submission to a worker starting it."),
    ("compute", "ezrt_task_compute_seconds", "The backend's run of one task."),
    ("delivery", "ezrt_task_delivery_seconds", "From result to run_async callback returning."),
)


def _client() -> Any:
    try:
        import prometheus_client.core as core
    except ImportError:
        raise BackendUnavailableError(
            'the Prometheus exporter needs prometheus_client: pip install "ezrt[prometheus]"'
        ) from None
    return core


class SessionCollector:
    """A prometheus_client collector for one session."""

    def __init__(self, session: Any, labels: Optional[Mapping[str, str]] = None) -> None:
        self._core = _client()
        self._session = session
        self._labels = dict(labels or {"session": "default"})

    def describe(self) -> Iterator[Any]:
        return iter(())  # values are only known at scrape time

    def collect(self) -> Iterator[Any]:
        core = self._core
        stats = self._session.stats()
        names = list(self._labels)
        values = list(self._labels.values())
        for key, metric, text in _COUNTERS:
            family = core.CounterMetricFamily(metric, text, labels=names)
            family.add_metric(values, getattr(stats, key))
            yield family
        depth = core.GaugeMetricFamily(
            "ezrt_tasks_in_stage",
            "Tasks now queued, running or awaiting their callback.",
            labels=[*names, "stage"],
        )
        for stage in ("queued", "running", "undelivered"):
            depth.add_metric([*values, stage], getattr(stats, stage))
        yield depth
        for key, metric, text in _HISTOGRAMS:
            histogram: LatencyHistogram = getattr(stats, key)
            family = core.HistogramMetricFamily(metric, text, labels=names)
            cumulative, buckets = 0, []
            for bound, count in zip(BOUNDS, histogram.counts):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", histogram.count))
            family.add_metric(values, buckets, sum_value=histogram.total)
            yield family
        busy = core.CounterMetricFamily(
            "ezrt_worker_busy_seconds_total",
            "Time each worker spent running tasks.",
            labels=[*names, "worker"],
        )
        for worker, seconds in stats.worker_busy_seconds.items():
            busy.add_metric([*values, worker], seconds)
        yield busy


def register_session(session: Any, registry: Any = None, /, **labels: str) -> SessionCollector:
    """Expose ``session`` in ``registry`` (prometheus_client's default registry if None).

    ``labels`` go on every series (default ``session="default"``); any name is allowed.
    """
    core = _client()
    collector = SessionCollector(session, labels or None)
    (registry if registry is not None else core.REGISTRY).register(collector)
    return collector
