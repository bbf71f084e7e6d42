"""Latency histograms: recorded per load-generator process, merged, turned into percentiles.

Each load generator keeps every latency of a step (microseconds, publish → client) and sends
back a sparse histogram on fixed bins, so any number of client processes merge exactly the same
way. Bins are 2 µs wide up to 2 ms, then 0.5 % wide up to 10 minutes: a percentile is reported as
the upper edge of its bin, at most 2 µs or 0.5 % above the true value (never below it).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "EDGES_US",
    "PERCENTILES",
    "Histogram",
    "histogram",
    "merge",
    "percentiles_ms",
]

_LINEAR_LIMIT_US = 2000
_LINEAR_STEP_US = 2
_RATIO = 1.005
_TOP_US = 600_000_000

EDGES_US: npt.NDArray[np.float64] = np.concatenate(
    (
        np.arange(0, _LINEAR_LIMIT_US, _LINEAR_STEP_US, dtype=np.float64),
        np.geomspace(
            _LINEAR_LIMIT_US,
            _TOP_US,
            int(np.ceil(np.log(_TOP_US / _LINEAR_LIMIT_US) / np.log(_RATIO))) + 1,
        ),
    )
)
_BINS = len(EDGES_US) - 1

PERCENTILES = (50.0, 90.0, 99.0)

# Sparse form for the wire: [[bin index, count], ...].
Histogram = list[list[int]]


def histogram(latencies_us: array[int]) -> Histogram:
    """The sparse histogram of one process's latencies (negative ones count as 0 µs)."""
    if not latencies_us:
        return []
    values = np.frombuffer(latencies_us, dtype=np.int64).clip(0, _TOP_US - 1)
    index = np.searchsorted(EDGES_US, values, side="right") - 1
    counts = np.bincount(index, minlength=_BINS)
    nonzero = np.flatnonzero(counts)
    return [[int(i), int(counts[i])] for i in nonzero]


def merge(parts: Iterable[Histogram]) -> npt.NDArray[np.int64]:
    counts = np.zeros(_BINS, dtype=np.int64)
    for part in parts:
        for index, count in part:
            counts[index] += count
    return counts


def percentiles_ms(
    counts: npt.NDArray[np.int64], qs: Sequence[float] = PERCENTILES
) -> list[float | None]:
    """Each percentile in ms (upper edge of its bin); None when nothing was recorded."""
    total = int(counts.sum())
    if total == 0:
        return [None for _ in qs]
    cumulative = np.cumsum(counts)
    result: list[float | None] = []
    for q in qs:
        rank = max(1, int(np.ceil(q / 100.0 * total)))
        index = int(np.searchsorted(cumulative, rank))
        result.append(round(float(EDGES_US[index + 1]) / 1000.0, 3))
    return result
