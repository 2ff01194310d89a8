"""Latency histograms and the session statistics snapshot.

Histograms have fixed log-spaced buckets (8 per decade, 1 us to 100 s), so recording is a
bisect and an increment by the one thread that owns the histogram, and they map directly onto
Prometheus histograms. Percentiles are estimates, interpolated inside a bucket (within
about 15 % of the true value); the bench measures exact per-task latencies itself.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["BOUNDS", "Histogram", "LatencyHistogram", "SessionStats"]

#: Bucket upper bounds in seconds: 1 us * 10**(k/8), k = 0..64.
BOUNDS: Tuple[float, ...] = tuple(1e-6 * 10 ** (k / 8) for k in range(65))


class Histogram:
    """Mutable; written by one thread (each engine thread keeps its own), read by any."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)  # the last bucket: above 100 s
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> LatencyHistogram:
        return LatencyHistogram(tuple(self.counts), self.total)


@dataclass(frozen=True)
class LatencyHistogram:
    """A frozen histogram: ``counts[i]`` tasks took at most ``BOUNDS[i]`` seconds (and more
    than ``BOUNDS[i-1]``); the last count is above the last bound."""

    counts: Tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        """How many durations were recorded."""
        return sum(self.counts)

    @property
    def mean(self) -> float:
        """Their exact mean in seconds (0.0 when empty)."""
        count = self.count
        return self.total / count if count else 0.0

    def percentile(self, q: float) -> float:
        """Estimated q-th percentile (0..100) in seconds; 0.0 when empty."""
        count = self.count
        if not count:
            return 0.0
        rank = max(1.0, q / 100.0 * count)
        seen = 0
        for index, bucket in enumerate(self.counts):
            if seen + bucket >= rank and bucket:
                low = BOUNDS[index - 1] if index > 0 else 0.0
                high = BOUNDS[index] if index < len(BOUNDS) else BOUNDS[-1]
                return low + (high - low) * (rank - seen) / bucket
            seen += bucket
        return BOUNDS[-1]

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Both sets of durations in one histogram."""
        return LatencyHistogram(
            tuple(a + b for a, b in zip(self.counts, other.counts)), self.total + other.total
        )

    def since(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """What was recorded after ``earlier`` (both from the same session)."""
        return LatencyHistogram(
            tuple(a - b for a, b in zip(self.counts, earlier.counts)), self.total - earlier.total
        )


@dataclass(frozen=True)
class SessionStats:
    """A consistent snapshot of one session's counters, depths and latencies.

    Counts are since the session opened. ``queue_wait``: submission to a worker starting the
    task; ``compute``: the backend's run; ``delivery``: a ``run_async`` result's wait for
    the callback thread plus the callback itself (futures and ``run`` complete on the
    worker and are not in it). ``worker_busy_seconds`` is keyed by worker thread name.
    """

    submitted: int
    completed: int
    failed: int
    dropped: int
    cancelled: int
    expired: int
    timed_out: int
    queued: int
    running: int
    undelivered: int
    uptime_seconds: float
    queue_wait: LatencyHistogram
    compute: LatencyHistogram
    delivery: LatencyHistogram
    worker_busy_seconds: Dict[str, float] = field(default_factory=dict)
    #: With dynamic batching: how many runs took each number of tasks ({} without it).
    batch_sizes: Dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        """Plain numbers (histograms as mean and estimated p50/p99 in seconds)."""
        out: Dict[str, object] = {
            key: getattr(self, key)
            for key in (
                "submitted",
                "completed",
                "failed",
                "dropped",
                "cancelled",
                "expired",
                "timed_out",
                "queued",
                "running",
                "undelivered",
                "uptime_seconds",
            )
        }
        for name in ("queue_wait", "compute", "delivery"):
            histogram: LatencyHistogram = getattr(self, name)
            out[name] = {
                "count": histogram.count,
                "mean": histogram.mean,
                "p50": histogram.percentile(50),
                "p99": histogram.percentile(99),
            }
        out["worker_busy_seconds"] = dict(self.worker_busy_seconds)
        out["batch_sizes"] = dict(self.batch_sizes)
        return out


def empty_histograms() -> List[Histogram]:
    return [Histogram(), Histogram(), Histogram()]
