"""One order-book subscriber's frames, checked against PROTOCOL §6: pure, no sockets, no clock.

The load generator's book clients feed every book frame here, in arrival order, saying whether it
came before the ``subscribed`` reply (the replay) or after it (live). The verdict needs two facts
only the publisher knows: the last sequence it published and the one it skipped on purpose, if
any (the ``orderbook`` scenario's second phase).

What a subscriber must see:

* its replay: nothing, or the snapshot then increments whose sequences follow on, never a gap;
* live: increments that follow on. A gap is allowed only where the publisher skipped a number,
  and only to a client that held the book by then; after it, or when the replay was empty,
  increments may come that the client cannot apply (it drops them) until a snapshot arrives live,
  which it applies. A live snapshot at any other time is a fault: the client holds the book.
* at the end: the book, in sequence, up to the last increment published.

>>> late = BookCheck()
>>> late.frame("snap", 10, live=False); late.frame("inc", 11, live=False); late.reply()
>>> late.frame("inc", 12, live=True)
>>> late.issues(final_seq=12)
[]
>>> joined_before = BookCheck()
>>> joined_before.frame("snap", 10, live=False); joined_before.reply()
>>> for seq in (11, 13, 14): joined_before.frame("inc", seq, live=True)
>>> joined_before.frame("snap", 14, live=True); joined_before.frame("inc", 15, live=True)
>>> joined_before.issues(final_seq=15, skipped=12), joined_before.live_gaps, joined_before.resyncs
([], [(11, 13)], 1)
>>> joined_before.issues(final_seq=15)
['increment 13 after 11']
>>> joined_during = BookCheck()
>>> joined_during.reply(); joined_during.frame("inc", 14, live=True)
>>> joined_during.frame("snap", 14, live=True); joined_during.frame("inc", 15, live=True)
>>> joined_during.issues(final_seq=15, skipped=12), joined_during.empty_replay
([], True)
>>> joined_during.issues(final_seq=15)
['subscribed reply before the snapshot']
>>> replayed_gap = BookCheck()
>>> replayed_gap.frame("snap", 10, live=False); replayed_gap.frame("inc", 12, live=False)
>>> replayed_gap.reply()
>>> replayed_gap.issues(final_seq=12, skipped=11), replayed_gap.replay_gaps
(['replayed increment 12 after 10'], 1)
>>> stuck = BookCheck()
>>> stuck.frame("snap", 10, live=False); stuck.reply()
>>> stuck.frame("inc", 11, live=True); stuck.frame("inc", 13, live=True)
>>> stuck.issues(final_seq=13, skipped=12)
['no snapshot after the gap (at 11)']
"""

from __future__ import annotations

__all__ = ["BookCheck"]

_MAX_VIOLATIONS = 5  # per client: the first ones say what went wrong


class BookCheck:
    """The frames of one subscriber of one ``<m>.<x>-inc`` stream."""

    def __init__(self) -> None:
        self.snapshot_seq: int | None = None  # the first snapshot's
        self.last_seq: int | None = None  # of the book the client holds; None: it holds none
        self.replied = False
        self.empty_replay = False  # the subscribed reply came with no snapshot before it
        self.broken = False  # saw a gap live: waiting for a snapshot
        self.increments = 0
        self.replayed_increments = 0
        self.unusable = 0  # live increments with no book to apply them to
        self.replay_gaps = 0
        self.live_gaps: list[tuple[int, int]] = []  # (last applied, the one after the gap)
        self.resyncs = 0  # snapshots received live
        self.violations: list[str] = []

    def _violation(self, text: str) -> None:
        if len(self.violations) < _MAX_VIOLATIONS:
            self.violations.append(text)

    def reply(self) -> None:
        """The ``subscribed`` reply that lists the stream: the replay is over."""
        if not self.replied:
            self.replied = True
            self.empty_replay = self.snapshot_seq is None

    def frame(self, kind: str, sequence: int, *, live: bool) -> None:
        """A ``snap`` or ``inc`` frame of the book, as it arrived."""
        if kind == "snap":
            self._snapshot(sequence, live)
        else:
            self._increment(sequence, live)

    def _snapshot(self, sequence: int, live: bool) -> None:
        if not live and self.snapshot_seq is not None:
            self._violation(f"second snapshot (seq {sequence}) in the replay")
        elif live and self.last_seq is not None and not self.broken:
            self._violation(f"snapshot {sequence} sent live while in sequence at {self.last_seq}")
        if live and (self.last_seq is None or self.broken):
            self.resyncs += 1
        if self.snapshot_seq is None:
            self.snapshot_seq = sequence
        self.last_seq = sequence
        self.broken = False

    def _increment(self, sequence: int, live: bool) -> None:
        self.increments += 1
        if not live:
            self.replayed_increments += 1
            if self.last_seq is None:
                self._violation(f"replayed increment {sequence} before any snapshot")
            elif sequence != self.last_seq + 1:
                self.replay_gaps += 1
                self._violation(f"replayed increment {sequence} after {self.last_seq}")
            self.last_seq = sequence
            return
        if self.last_seq is None or self.broken:
            self.unusable += 1  # the client drops it (PROTOCOL §6, step 3)
        elif sequence != self.last_seq + 1:
            self.live_gaps.append((self.last_seq, sequence))
            self.broken = True
        else:
            self.last_seq = sequence

    def issues(self, final_seq: int, skipped: int | None = None) -> list[str]:
        """What is wrong, first things first; [] for a subscriber that is right.

        ``skipped``: the one sequence number the publisher left out on purpose, if any.
        """
        issues = list(self.violations)
        if self.empty_replay and skipped is None:
            issues.append("subscribed reply before the snapshot")
        for last, sequence in self.live_gaps:
            if skipped is None or (last, sequence) != (skipped - 1, skipped + 1):
                issues.append(f"increment {sequence} after {last}")
        if self.snapshot_seq is None:
            issues.append("no snapshot")
        elif self.broken:
            issues.append(f"no snapshot after the gap (at {self.last_seq})")
        elif self.last_seq != final_seq:
            issues.append(f"stopped at {self.last_seq}, last published {final_seq}")
        if not self.replied:
            issues.append("no subscribed reply")
        return issues
