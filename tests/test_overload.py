"""Overload at the chain's entry, against a real PVA server on loopback: a frame no stage can take
is dropped before it is decoded and counted, the server's idle placeholder (uniqueId 0) is not
a frame and never counts, and every frame the server posted is accounted for as received,
missed or dropped."""

from __future__ import annotations

import os

import pytest

from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.plugins.source import NTNDArraySource

from .test_chain import wait_until
from .test_chain_bad_input import Detector


@pytest.fixture
def detector():
    det = Detector(f"OVL{os.getpid()}:", free_port())
    yield det
    det.close()


def post(det, n):
    for _ in range(n):
        det.good()


def test_a_frame_without_room_is_dropped_before_decoding_and_counted(detector):
    drops = []
    src = NTNDArraySource(detector.name, pva_client_conf(detector.port), queue_size=4, gate=lambda: False,
                          on_drop=lambda: drops.append(1))
    try:
        wait_until(lambda: src.connected, 10, "the source to connect")
        post(detector, 50)
        wait_until(lambda: src._last_uid == 50, 15, "the last uniqueId seen")
        assert src.dropped_at_entry == len(drops) > 0       # the placeholder (uniqueId 0) is not among them
        assert src.dropped_at_entry + src.missed == 50     # none decoded, every one accounted for
        assert src.received == 0 and src.errors == 0
    finally:
        src.close()


def test_frames_taken_and_dropped_add_up_to_what_the_server_posted(detector):
    calls = iter(range(10**6))
    got = []
    src = NTNDArraySource(detector.name, pva_client_conf(detector.port), queue_size=64,
                          gate=lambda: next(calls) % 2 == 0, downstream=[got.append])
    try:
        wait_until(lambda: src.connected, 10, "the source to connect")
        post(detector, 60)
        wait_until(lambda: src._last_uid == 60, 15, "the last uniqueId seen")
        assert got and src.dropped_at_entry > 0
        assert len(got) == src.received
        assert src.received + src.dropped_at_entry + src.missed == 60
        assert all(f.data.shape == (64, 64) for f in got)     # taken frames decoded whole
    finally:
        src.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread nice is Linux's")
def test_the_receiving_threads_run_niced_and_nothing_else_does(detector):
    """``source.nice``: pvxs's TCP reader of the source's own client context and p4p's callback
    worker run at the nice value given, so under overload inference keeps the CPU. The thread that
    made the source, and another client context's reader, keep theirs."""
    import threading

    from p4p.client.thread import Context

    from ptychopv.plugins.source import _threads_named

    def nice(tid):
        return os.getpriority(os.PRIO_PROCESS, tid)

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    other = Context("pva", conf=pva_client_conf(detector.port), useenv=False)
    others = _threads_named("PVXCTCP")
    callback_threads = set()
    src = NTNDArraySource(detector.name, pva_client_conf(detector.port), queue_size=64, nice=mine + 7,
                          on_frame=lambda f: callback_threads.add(threading.get_native_id()))
    try:
        if not src.nice_usable:
            pytest.skip("this process may not lower a thread's nice again (not root, RLIMIT_NICE < 20)")
        assert len(src.receive_threads) == 1 and src.receive_threads[0] not in others
        assert nice(src.receive_threads[0]) == mine + 7 and src.niced
        wait_until(lambda: src.connected, 10, "the source to connect")
        post(detector, 5)
        wait_until(lambda: src.received == 5, 15, "five frames")
        assert callback_threads and all(nice(t) == mine + 7 for t in callback_threads)
        assert nice(threading.get_native_id()) == mine
        assert all(nice(t) == mine for t in others)
        # a capture: every receiving thread back at the process's priority, then niced again
        src.set_niced(False)
        assert not src.niced and all(nice(t) == mine for t in [*src.receive_threads, *callback_threads])
        post(detector, 2)
        wait_until(lambda: src.received == 7, 15, "two more frames")
        assert all(nice(t) == mine for t in callback_threads)
        src.set_niced(True)
        assert all(nice(t) == mine + 7 for t in [*src.receive_threads, *callback_threads])
    finally:
        src.close()
        other.close()


def test_nice_zero_leaves_the_threads_as_they_are(detector):
    src = NTNDArraySource(detector.name, pva_client_conf(detector.port), nice=0)
    try:
        assert src.receive_threads
        assert os.getpriority(os.PRIO_PROCESS, src.receive_threads[0]) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        src.close()


def test_nice_is_not_applied_where_it_could_not_be_undone(detector, monkeypatch):
    """A capture needs the receiving threads at full priority; a process that may not lower a
    nice again (not root, RLIMIT_NICE < 20) never nices them."""
    from ptychopv.plugins import source as source_module

    monkeypatch.setattr(source_module, "can_restore_nice", lambda: False)
    src = NTNDArraySource(detector.name, pva_client_conf(detector.port), nice=10)
    try:
        assert not src.nice_usable and not src.niced
        assert os.getpriority(os.PRIO_PROCESS, src.receive_threads[0]) == os.getpriority(os.PRIO_PROCESS, 0)
        src.set_niced(True)
        assert not src.niced
    finally:
        src.close()


def test_can_restore_nice_follows_the_nice_limit(monkeypatch):
    import resource

    from ptychopv.plugins.source import can_restore_nice

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    for soft, ok in ((0, False), (19, False), (20, True), (25, True), (resource.RLIM_INFINITY, True)):
        monkeypatch.setattr(resource, "getrlimit", lambda which, soft=soft: (soft, soft))
        assert can_restore_nice() is ok, soft
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (0, 0))
    assert can_restore_nice() is True


def test_a_failure_past_decoding_is_counted_and_the_subscription_lives_on(detector):
    """p4p closes a subscription for good when its callback raises: a stage's hand-off that failed
    once (here the third frame) stopped every later frame, with the source still 'connected'."""
    got = []

    def take(frame):
        if frame.unique_id == 3:
            raise RuntimeError("a stage refused its hand-off")
        got.append(frame.unique_id)

    src = NTNDArraySource(detector.name, pva_client_conf(detector.port), queue_size=64, downstream=[take])
    try:
        wait_until(lambda: src.connected, 10, "the source to connect")
        for _ in range(10):       # one at a time: none squashed by the server
            detector.good()
            wait_until(lambda: src._last_uid == detector.uid, 15, f"uniqueId {detector.uid}")
        assert got == [1, 2, 4, 5, 6, 7, 8, 9, 10]
        assert src.errors == 1 and "a stage refused its hand-off" in src.last_message
    finally:
        src.close()
