"""benchmarks/chain.py's own measures that need no stream (the benchmark itself runs minutes of
EPICS traffic: not in CI): how busy the machine was while frames were offered."""

import os
import time

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def chain():
    return load_benchmark("chain")


def test_busy_share_is_the_part_of_every_cores_time_not_idle(chain):
    assert chain.busy_share((100, 1000), (150, 2000)) == pytest.approx(0.95)
    assert chain.busy_share((100, 1000), (1100, 2000)) == 0.0
    assert chain.busy_share(None, (1, 2)) is None
    assert chain.busy_share((1, 2), (1, 2)) is None          # no time passed: no figure, not 1.0


def test_a_core_kept_busy_shows_in_the_machine_share(chain):
    a = chain.machine_jiffies()
    assert a is not None and 0 <= a[0] <= a[1]
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:        # this test's own core, busy
        pass
    share = chain.busy_share(a, chain.machine_jiffies())
    cores = os.cpu_count() or 1               # /proc/stat sums every online core
    assert share is not None and share > 0.6 / cores, share


def test_loading_a_benchmark_leaves_this_runs_epics_settings_alone():
    # chain.py applies the loopback settings at import: its EPICS_CA_ADDR_LIST ("127.0.0.1") once
    # replaced the test run's list of CA ports, and caproto's searches in later tests went nowhere
    before = dict(os.environ)
    assert ":" in before["EPICS_CA_ADDR_LIST"]          # conftest's 127.0.0.1:<port> list
    load_benchmark("chain")
    assert dict(os.environ) == before
