"""Overload at the chain's entry, against a real PVA server on loopback: while no stage can take a
frame the source waits for room and the PVA library squashes the updates behind it (missed, at
no Python cost), and a frame still without room after ``room_wait_s`` is dropped before it is
decoded. Every frame the server posted is accounted for as received, missed or dropped."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from p4p.server import Server, StaticProvider
from p4p.server.thread import SharedPV

from ptychopv.io.epics_env import free_port, pva_client_conf
from ptychopv.io.ntndarray import to_value
from ptychopv.plugins.source import NTNDArraySource

from .test_chain import wait_until

CHANNEL = "OVL:Pva1:Image"


@pytest.fixture
def detector():
    port, bcast = free_port(), free_port()
    pv = SharedPV(initial=to_value(np.zeros((1, 1), np.uint16), 0, timestamp=0.0))
    provider = StaticProvider("overload-test")
    provider.add(CHANNEL, pv)
    server = Server(providers=[provider], useenv=False, conf={
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO", "EPICS_PVAS_SERVER_PORT": str(port),
        "EPICS_PVAS_BROADCAST_PORT": str(bcast)})
    yield pv, port
    server.stop()


def source(port, gate, room_wait_s):
    got = []
    src = NTNDArraySource(CHANNEL, pva_client_conf(port), queue_size=4, gate=gate, room_wait_s=room_wait_s,
                          downstream=[got.append])
    wait_until(lambda: src.connected, 10, "the source to connect")
    return src, got


def post(pv, n):
    frame = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    for uid in range(1, n + 1):
        pv.post(to_value(frame, uid))


def test_frames_without_room_are_squashed_in_the_library_not_received_and_dropped(detector):
    pv, port = detector
    room = threading.Event()
    src, got = source(port, room.is_set, room_wait_s=30.0)
    try:
        post(pv, 200)                    # the first update waits for room; the queue squashes the rest
        # open the room once the server holds the last frame (another client reads it), so the
        # source's queue has taken the burst while it waited
        from p4p.client.thread import Context

        with Context("pva", conf=pva_client_conf(port), useenv=False, unwrap=False) as other:
            wait_until(lambda: other.get(CHANNEL, timeout=5)["uniqueId"] == 200, 10, "the server to hold frame 200")
        room.set()
        wait_until(lambda: got and got[-1].unique_id == 200, 15, "the last frame")
        uids = [f.unique_id for f in got]
        assert uids == sorted(uids) and uids[0] == 1
        assert src.dropped_at_entry == 0                   # room came within room_wait_s
        assert src.missed > 0                              # squashed, never handed to Python
        assert len(got) + src.missed == 200                # every frame accounted for
        assert len(got) < 200 // 2
    finally:
        src.close()


def test_a_frame_still_without_room_is_dropped_before_decoding_and_counted(detector):
    pv, port = detector
    drops = []
    src = NTNDArraySource(CHANNEL, pva_client_conf(port), queue_size=4, gate=lambda: False, room_wait_s=0.01,
                          on_drop=lambda: drops.append(1))
    try:
        wait_until(lambda: src.connected, 10, "the source to connect")
        post(pv, 50)
        wait_until(lambda: src._last_uid == 50, 15, "the last uniqueId seen")
        assert src.dropped_at_entry == len(drops) > 0
        assert src.dropped_at_entry + src.missed == 50     # none decoded, every one accounted for
        assert src.received == 0 and src.errors == 0
    finally:
        src.close()


def test_closing_while_an_update_waits_for_room_returns_promptly(detector):
    pv, port = detector
    src, got = source(port, lambda: False, room_wait_s=60.0)
    post(pv, 3)
    wait_until(lambda: src._wq_thread.is_alive(), 5, "the update thread")
    closer = threading.Thread(target=src.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive() and got == []
