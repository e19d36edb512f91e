"""benchmarks/chain.py's own measures that need no stream (the benchmark itself runs minutes of
EPICS traffic: not in CI): how busy the machine was while frames were offered."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chain():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("chain_bench", ROOT / "benchmarks" / "chain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
