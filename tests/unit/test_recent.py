"""The window of recently fanned-out messages that recognises the broker's redeliveries."""

from __future__ import annotations

from ranger_py.recent import RecentMessages


def test_a_message_is_recognised_while_it_is_in_the_window() -> None:
    recent = RecentMessages(3)
    digest = RecentMessages.digest("public.a.b", b'{"n":1}')
    assert digest not in recent
    recent.add(digest)
    assert digest in recent
    assert digest in recent  # recognising does not use it up: a second cut is covered too


def test_the_oldest_ages_out_past_the_size() -> None:
    recent = RecentMessages(2)
    one, two, three = (RecentMessages.digest("k", b"%d" % n) for n in (1, 2, 3))
    for digest in (one, two, three):
        recent.add(digest)
    assert len(recent) == 2
    assert one not in recent
    assert two in recent and three in recent


def test_a_repeated_message_stays_until_its_last_copy_ages_out() -> None:
    recent = RecentMessages(2)
    same = RecentMessages.digest("k", b"x")
    other = RecentMessages.digest("k", b"y")
    recent.add(same)
    recent.add(same)
    recent.add(other)  # the first copy ages out, the second is still in the window
    assert same in recent
    recent.add(other)
    assert same not in recent


def test_the_digest_tells_routing_keys_and_bodies_apart() -> None:
    digests = {
        RecentMessages.digest("public.a.b", b"1"),
        RecentMessages.digest("public.a.c", b"1"),
        RecentMessages.digest("public.a.b", b"2"),
    }
    assert len(digests) == 3
