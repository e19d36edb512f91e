"""The IOC's per-frame publisher (ioc.images.StreamPublisher): the infer stage hands Infer:Phase
batches to it and goes on; it posts them in order, holds the stage back when it falls behind
(bounded latency, nothing lost that was processed), survives a failing post, and never leaves a
caller waiting once closed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ptychopv.ioc.images import StreamPublisher


def test_every_batch_is_posted_in_order():
    posted = []
    pub = StreamPublisher(posted.append, depth=4)
    for i in range(200):
        assert pub.put([i])
    pub.close()
    assert posted == [[i] for i in range(200)] and pub.posted_batches == 200 and pub.errors == 0


def test_a_full_queue_holds_the_producer_back():
    release, started = threading.Event(), threading.Event()
    posted = []

    def slow(batch):
        started.set()
        release.wait(10)
        posted.append(batch)

    pub = StreamPublisher(slow, depth=2)
    try:
        assert pub.put(0) and started.wait(5)       # the thread holds batch 0 in post
        assert pub.put(1) and pub.put(2)            # two wait in the queue: it is full
        third = threading.Thread(target=pub.put, args=(3,))
        third.start()
        third.join(0.5)
        assert third.is_alive(), "put returned while the queue was full"
        assert pub.pending() == 2
        release.set()
        third.join(5)
        assert not third.is_alive()
    finally:
        release.set()
        pub.close()
    assert posted == [0, 1, 2, 3]


def test_a_failing_post_is_counted_and_the_stream_goes_on():
    reports, posted = [], []

    def post(batch):
        if batch == "bad":
            raise ValueError("cannot wrap this")
        posted.append(batch)

    pub = StreamPublisher(post, depth=2, report=reports.append)
    for b in ("a", "bad", "b"):
        pub.put(b)
    pub.close()
    assert posted == ["a", "b"] and pub.errors == 1 and pub.posted_batches == 2
    assert reports == ["publishing: ValueError: cannot wrap this"]


def test_after_close_nothing_waits_even_when_the_poster_is_stuck():
    stuck = threading.Event()
    pub = StreamPublisher(lambda batch: stuck.wait(30), depth=1)
    try:
        pub.put(0)
        pub.put(1)                                   # the queue is full, the poster is stuck
        pub.close(timeout=0.2)
        done = []
        t = threading.Thread(target=lambda: done.append(pub.put(2)))
        t.start()
        t.join(5)
        assert done == [False]
    finally:
        stuck.set()


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        StreamPublisher(print, depth=0)


def test_the_publisher_thread_carries_its_name_for_the_os():
    seen = threading.Event()
    pub = StreamPublisher(lambda batch: seen.set(), depth=2, name="chain-phase")
    try:
        assert pub.put([0]) and seen.wait(5)        # posting runs after the thread named itself
        assert Path(f"/proc/self/task/{pub._thread.native_id}/comm").read_text().strip() == "chain-phase"
    finally:
        pub.close()
