"""Every use metrics.py makes of prometheus_client beyond its documented API, in one place.

The fan-out histogram is fed whole buckets at once, through the histogram's private value
objects, and the metrics endpoint merges the value files it chose itself, through a static method
the documentation does not name. ``tests/unit/test_adapters.py`` checks each reliance and names the
version when an upgrade breaks it.

Only metrics.py imports this module, so the same rule holds: not before PROMETHEUS_MULTIPROC_DIR
is set, since prometheus_client picks where values live when it is first imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import Histogram, multiprocess
from prometheus_client.core import Metric

__all__ = ["add_observations", "merge_files"]


def add_observations(histogram: Histogram, bucket_counts: Sequence[int], total: float) -> None:
    """Add many observations to ``histogram`` at once, as ``observe`` would one by one.

    ``bucket_counts[i]`` observations fell in bucket ``i`` alone (the last is +Inf), and their
    values add up to ``total``. ``observe`` costs about 5 µs a call in multiprocess mode.

    Relies on (prometheus-client 0.26.0): Histogram's private ``_buckets``, one value per upper
    bound plus +Inf, each counting only the observations of its own bucket (the exposition adds
    them up), and its private ``_sum``; both values have the ``inc(amount)`` that ``observe`` calls.
    """
    for bucket, count in zip(histogram._buckets, bucket_counts, strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(total)


def merge_files(files: Iterable[str]) -> Iterable[Metric]:
    """The metrics in the multiprocess value ``files``, summed over processes as scrapes show them.

    Relies on (prometheus-client 0.26.0): ``multiprocess.MultiProcessCollector.merge(files,
    accumulate=True)``, a static method the documentation leaves out (it names only the collector
    over a whole directory), returning metrics whose histogram buckets are cumulative.
    """
    merge = multiprocess.MultiProcessCollector.merge
    merged: Iterable[Metric] = merge(list(files), accumulate=True)  # type: ignore[no-untyped-call]
    return merged
