"""A scrape of a server's metrics endpoint, parsed into samples a test can compare (PROTOCOL §7).

Samples are keyed by their full name as scraped (``ranger_messages_received_total``) and their
labels. Workers push their counters to the shared files about once a second, so a test never
asserts one scrape: it waits, with a deadline, until the figures it expects are all there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from testbed.waiting import wait_until

__all__ = ["FIGURES_TIMEOUT", "Key", "Scrape", "key", "wait_for_figures"]

# Several flush periods of the workers (about 1 s each), with room for a loaded machine.
FIGURES_TIMEOUT = 10.0

# A sample: its name as scraped, and its labels.
Key = tuple[str, frozenset[tuple[str, str]]]


def key(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape."""

    text: str
    samples: Mapping[Key, float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[Key, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[key(sample.name, **sample.labels)] = float(sample.value)
        return cls(text, samples)

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; an absent series counts as 0 (nothing counted yet)."""
        return self.samples.get(key(name, **labels), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return key(name, **labels) in self.samples

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample called ``name``, by labels."""
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def labels(self) -> Iterator[tuple[str, str, str]]:
        """``(sample name, label name, label value)`` of every label in the scrape."""
        for (name, labels), _ in self.samples.items():
            for label, value in labels:
                yield name, label, value


def _show(wanted: Key) -> str:
    name, labels = wanted
    inner = ",".join(f'{label}="{value}"' for label, value in sorted(labels))
    return f"{name}{{{inner}}}" if inner else name


def wait_for_figures(
    scrape: Callable[[], Scrape],
    expected: Mapping[Key, float],
    *,
    timeout: float = FIGURES_TIMEOUT,
) -> Scrape:
    """Scrape until every expected sample has exactly its value; fail with the last differences."""
    wrong: dict[Key, float] = {}

    def settled() -> Scrape | None:
        current = scrape()
        wrong.clear()
        wrong.update(
            (wanted, current.samples.get(wanted, 0.0))
            for wanted, value in expected.items()
            if current.samples.get(wanted, 0.0) != value
        )
        return None if wrong else current

    def differences() -> str:
        return "the expected figures: " + "; ".join(
            f"{_show(wanted)} is {seen}, expected {expected[wanted]}"
            for wanted, seen in wrong.items()
        )

    return wait_until(settled, timeout=timeout, what=differences, interval=0.1)
