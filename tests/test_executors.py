"""Jobs on real executors: a spawn process pool and a Dask LocalCluster (separate processes,
loopback only). Progress and abort go through the job folder, as they would across hosts."""

from __future__ import annotations

import os
import signal
import sys
import time
import types
import uuid

import pytest

pytest.importorskip("ptychi", reason="pty-chi (ptychopv[hpc]) is not installed")

from ptychopv.hpc.executors import GlobusComputeExecutor, make_executor  # noqa: E402
from ptychopv.hpc.jobs import Job, label_job, read_progress, reconstruct_job, submit, train_job  # noqa: E402

from .recon_helpers import write_sim_scan  # noqa: E402

OPTS = {"engine": "epie", "beam_px": 7.0, "threads": 1}


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    return write_sim_scan(tmp_path_factory.mktemp("ex") / "scan_0002.h5", n=32, beam_px=6.0, extent_px=24.0,
                          object_px=80, truth=False)


@pytest.fixture(scope="module")
def local():
    ex = make_executor({"kind": "local", "workers": 1})
    yield ex
    ex.shutdown()


def wait_for(job: Job, cond, timeout=120.0) -> dict:
    """Poll the progress file until ``cond(progress)`` holds (or the job ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = job.progress()
        if cond(p) or job.done():
            return p
        time.sleep(0.02)
    raise AssertionError(f"job did not reach the condition in {timeout} s; last progress {job.progress()}")


def run_and_watch(ex, scan, tmp_path, iterations=40):
    out = tmp_path / "recon.h5"
    job = submit(ex, reconstruct_job, str(scan), str(out), {**OPTS, "iterations": iterations},
                 job_dir=tmp_path / "job")
    seen = set()
    while not job.done():
        p = job.progress()
        if p.get("status") == "running" and 0 < p.get("iteration", 0) < iterations:
            seen.add(p["iteration"])
        time.sleep(0.01)
    return job.result(), seen, out


def test_local_job_reports_progress_and_result(local, small_scan, tmp_path):
    assert local.describe() == {"name": "local", "workers": 1}
    result, seen, out = run_and_watch(local, small_scan, tmp_path)
    assert result["status"] == "done", result.get("message")
    assert result["iteration"] == result["total"] == 40 and result["progress"] == 1.0
    assert result["result"]["recon_path"] == str(out) and out.is_file()
    assert result["pid"] != os.getpid(), "the job must run in a worker process"
    assert len(seen) >= 2, f"the progress file should grow while the job runs; saw iterations {sorted(seen)}"
    assert read_progress(tmp_path / "job")["status"] == "done"


def test_abort_file_stops_a_running_job(local, small_scan, tmp_path):
    out = tmp_path / "recon.h5"
    job = submit(local, reconstruct_job, str(small_scan), str(out), {**OPTS, "iterations": 5000},
                 job_dir=tmp_path / "job")
    wait_for(job, lambda p: p.get("iteration", 0) >= 2)
    job.abort()
    result = job.result(timeout=120)
    assert result["status"] == "aborted" and "aborted after" in result["message"]
    assert 2 <= result["iteration"] < 5000 and not out.exists()


@pytest.mark.parametrize("case", ["raises", "missing", "corrupt"])
def test_failures_are_reported(local, small_scan, tmp_path, case):
    scan, opts, expect = str(small_scan), dict(OPTS, iterations=2), ""
    if case == "raises":
        opts["engine"], expect = "nonsense", "engine"
    elif case == "missing":
        scan, expect = str(tmp_path / "gone.h5"), "does not exist"
    else:
        (tmp_path / "bad.h5").write_bytes(small_scan.read_bytes()[:5000])
        scan, expect = str(tmp_path / "bad.h5"), "not a readable HDF5"
    result = submit(local, reconstruct_job, scan, None, opts, job_dir=tmp_path / "job").result(timeout=120)
    assert result["status"] == "failed" and expect in result["message"]
    assert read_progress(tmp_path / "job")["status"] == "failed"


def test_train_job_reports_epochs_and_publishes(local, tmp_path):
    from ptychopv.hpc.corpus import append_pairs

    from .nn_helpers import synthetic_pairs

    frames, phase, _ = synthetic_pairs(32, size=64)
    append_pairs(tmp_path / "corpus.h5", frames, phase, scan_id="s1")
    opts = {"epochs": 3, "width": 4, "depth": 2, "batch_size": 8, "device": "cpu", "threads": 1}
    result = submit(local, train_job, str(tmp_path / "corpus.h5"), str(tmp_path / "registry"), opts,
                    job_dir=tmp_path / "job").result(timeout=180)
    assert result["status"] == "done", result.get("message")
    assert result["iteration"] == result["total"] == 3 and result["result"]["version"] == 1
    assert (tmp_path / "registry" / "v0001" / "card.json").is_file()
    # a label job without the network's field of view fails with the reason
    bad = submit(local, label_job, "r.h5", str(tmp_path / "corpus.h5"), {}, job_dir=tmp_path / "job2").result(60)
    assert bad["status"] == "failed" and "fov" in bad["message"]


def test_a_dying_worker_is_a_failed_job(small_scan, tmp_path):
    with make_executor({"kind": "local", "workers": 1}) as ex:
        job = submit(ex, reconstruct_job, str(small_scan), None, {**OPTS, "iterations": 5000},
                     job_dir=tmp_path / "job")
        p = wait_for(job, lambda p: p.get("iteration", 0) >= 1)
        os.kill(p["pid"], signal.SIGKILL)  # the worker process this test's executor started
        result = job.result(timeout=60)
    assert result["status"] == "failed" and "executor failed" in result["message"]


def test_dask_local_cluster_runs_jobs(small_scan, tmp_path):
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, protocol="tcp") as cluster:
        with make_executor({"kind": "dask", "address": cluster.scheduler_address}) as ex:
            assert ex.describe() == {"name": "dask", "workers": 1, "address": cluster.scheduler_address}
            result, seen, out = run_and_watch(ex, small_scan, tmp_path)
            assert result["status"] == "done" and out.is_file(), result.get("message")
            assert result["pid"] != os.getpid() and len(seen) >= 2
            # the same arguments again run again (no result cache) and failures come back as records
            again = submit(ex, reconstruct_job, str(tmp_path / "gone.h5"), None, OPTS,
                           job_dir=tmp_path / "job2").result(timeout=120)
            assert again["status"] == "failed" and "does not exist" in again["message"]


def test_dask_unreachable_scheduler_is_a_clear_error():
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    from ptychopv.io.epics_env import free_port

    with pytest.raises(ConnectionError, match="no Dask scheduler answers"):
        make_executor({"kind": "dask", "address": f"tcp://127.0.0.1:{free_port()}", "timeout_s": 1})


def test_executor_options_are_validated():
    with pytest.raises(ValueError, match="kind"):
        make_executor({"kind": "slurm"})
    with pytest.raises(ValueError, match="address"):
        make_executor({"kind": "dask"})
    with pytest.raises(ValueError, match="workers"):
        make_executor({"kind": "local", "workers": 0})
    with pytest.raises(ValueError, match="endpoint_id"):
        make_executor({"kind": "globus-compute"})
    with pytest.raises(ValueError, match="must be a UUID"):
        make_executor({"kind": "globus-compute", "endpoint_id": "my-endpoint"})


def test_globus_compute_needs_the_sdk_and_builds_its_executor_lazily(monkeypatch):
    eid = str(uuid.uuid4())
    if "globus_compute_sdk" not in sys.modules:
        monkeypatch.setitem(sys.modules, "globus_compute_sdk", None)  # import fails as when not installed
        with pytest.raises(ImportError, match="pip install"):
            make_executor({"kind": "globus-compute", "endpoint_id": eid})
    built = []

    class FakeSdkExecutor:  # stands in for globus_compute_sdk.Executor, which needs the cloud service
        def __init__(self, endpoint_id):
            built.append(endpoint_id)

        def submit(self, fn, *args):
            return ("submitted", fn, args)

    monkeypatch.setitem(sys.modules, "globus_compute_sdk", types.SimpleNamespace(Executor=FakeSdkExecutor))
    ex = make_executor({"kind": "globus-compute", "endpoint_id": eid.upper()})
    assert isinstance(ex, GlobusComputeExecutor) and built == []
    assert ex.describe() == {"name": "globus-compute", "workers": 0, "endpoint_id": eid}
    assert ex.submit(reconstruct_job, "a.h5") == ("submitted", reconstruct_job, ("a.h5",))
    assert built == [eid]


ORPHAN = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
from tests import job_helpers
from ptychopv.hpc.executors import LocalExecutor
ex = LocalExecutor(1)
ex.submit(job_helpers.late_marking_job, 20, sys.argv[1])
deadline = time.monotonic() + 60
while not [p for p in ex._pool._processes.values() if p.is_alive()] and time.monotonic() < deadline:
    time.sleep(0.05)
print(*[p.pid for p in ex._pool._processes.values()], flush=True)
time.sleep(600)
"""


def test_a_worker_ends_with_the_process_that_started_it(tmp_path):
    """An IOC killed outright (SIGKILL, the OOM killer) left its job worker running, reparented, to
    the end of its job: a training run went on to publish a version the next IOC then loaded."""
    import subprocess
    from pathlib import Path

    def running(pid):       # a worker that ended but nobody reaped yet is a zombie: not running
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    marker = tmp_path / "ran"
    root = str(Path(__file__).resolve().parents[1])
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN, str(marker), root], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers and all(running(p) for p in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
    deadline = time.monotonic() + 15
    while any(running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p for p in workers if running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert alive == [] and not marker.exists()


def test_a_worker_ends_with_its_killed_parent_while_nobody_has_reaped_it(tmp_path):
    """Helper 22: the worker of a SIGKILLed IOC ran on while the IOC was an unreaped zombie (its
    parent had not waited for it), since getppid() still named it. The worker now also sees the
    parent's zombie state."""
    import subprocess
    from pathlib import Path

    from ptychopv.hpc.executors import _ended

    def running(pid):
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    assert not _ended(os.getpid())
    marker = tmp_path / "ran"
    root = str(Path(__file__).resolve().parents[1])
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN, str(marker), root], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in parent.stdout.readline().split()]
    try:
        assert workers and all(running(p) for p in workers)
        parent.send_signal(signal.SIGKILL)            # and not waited for: a zombie, still the parent
        deadline = time.monotonic() + 15
        while any(running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ended(parent.pid)                      # a zombie (this test has not reaped it)
        alive = [p for p in workers if running(p)]
    finally:
        for p in workers:
            if running(p):
                os.kill(p, signal.SIGKILL)
        parent.wait(30)
    assert alive == [] and not marker.exists()
