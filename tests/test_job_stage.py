"""The job stage state machine and the healing process pool: every run ends Idle -> ... -> a final
state with the reason, whatever fails; a killed worker does not jam the next run."""

import asyncio
import concurrent.futures as cf
import time

import pytest

from ptychopv.hpc.executors import LocalExecutor, still_running
from ptychopv.hpc.workflow import Busy, JobStage, Workflow

from . import job_helpers


class Recorder:
    def __init__(self):
        self.states = []

    def __call__(self, state, message, progress):
        self.states.append((state, message))


def run(coro):
    return asyncio.run(coro)


def test_a_body_that_raises_ends_failed_and_frees_the_stage():
    rec = Recorder()
    st = JobStage("Recon", rec)

    async def body(stage):
        raise RuntimeError("boom")

    res = run(st.run("reconstruction", body))
    assert res["status"] == "failed" and st.state == "Failed" and not st.busy
    assert "RuntimeError: boom" in st.message
    assert [s for s, _ in rec.states][:1] == ["Queued"]


def test_an_executor_that_cannot_submit_ends_failed():
    class Broken:
        def submit(self, *a, **k):
            raise RuntimeError("cannot schedule new futures after shutdown")

    st = JobStage("Train")

    async def body(stage):
        return await stage.job(Broken(), job_helpers.quick_job, 1, job_dir="/tmp/ptychopv-test-jobdir", kind="train")

    res = run(st.run("training", body))
    assert st.state == "Failed" and "could not be submitted" in res["message"] and not st.busy


def test_a_second_run_while_one_runs_is_refused():
    st = JobStage("Recon")

    async def main():
        gate = asyncio.Event()

        async def slow(stage):
            await gate.wait()
            return {"status": "done", "message": "ok"}

        task = asyncio.create_task(st.run("reconstruction", slow))
        await asyncio.sleep(0.01)
        with pytest.raises(Busy, match="refused"):
            await st.run("reconstruction", slow)
        gate.set()
        return await task

    assert run(main())["status"] == "done" and st.state == "Done"


class ScriptedJob:
    """A job that reports the given progress records, one per poll, then its result."""

    def __init__(self, steps):
        self.steps = list(steps)

    def done(self):
        return not self.steps

    def progress(self):
        return self.steps.pop(0) if self.steps else {"status": "done"}

    def result(self):
        return {"status": "done", "message": "ok"}

    def abort(self):
        return False


def test_a_run_of_several_jobs_stays_running_between_them(monkeypatch):
    """A reconstruction is a reconstruct job and then a label job (training: train, then the
    validation): Status_RBV went Running -> Queued -> Running within one run, which a plan
    waiting for 'Running' or an operator reads as a new run. Queued is only the run's start."""
    import ptychopv.hpc.jobs as jobs

    rec = Recorder()
    st = JobStage("Recon", rec)
    script = iter([[{"status": "queued", "message": "waiting"}, {"status": "running", "message": "it 1"}],
                   [{"status": "queued", "message": "waiting"}, {"status": "running", "message": "pairs"}]])
    monkeypatch.setattr(jobs, "submit", lambda *a, **k: ScriptedJob(next(script)))
    monkeypatch.setattr("ptychopv.hpc.workflow.POLL_S", 0.0)

    async def body(stage):
        for kind in ("reconstruct", "label"):
            res = await stage.job(None, None, job_dir="/tmp/ptychopv-test-jobdir", kind=kind)
            assert res["status"] == "done"
        return {"status": "done", "message": "ok"}

    assert run(st.run("reconstruction", body))["status"] == "done"
    states = [s for s, _ in rec.states]
    assert states[0] == "Queued" and states[-1] == "Done"
    assert "Queued" not in states[states.index("Running"):], rec.states
    assert ("Running", "label: waiting") in rec.states                   # the message still says it


@pytest.mark.slow
def test_a_killed_worker_fails_its_job_and_the_next_job_runs(tmp_path):
    ex = LocalExecutor(1)
    st = JobStage("Recon")
    try:
        async def killed(stage):
            return await stage.job(ex, job_helpers.killed_job, job_dir=tmp_path / "a", kind="reconstruct")

        res = run(st.run("reconstruction", killed))
        assert res["status"] == "failed" and st.state == "Failed" and not st.busy
        assert "BrokenProcessPool" in res["message"] or "terminated abruptly" in res["message"]

        async def quick(stage):
            return await stage.job(ex, job_helpers.quick_job, 21, job_dir=tmp_path / "b", kind="reconstruct")

        res = run(st.run("reconstruction", quick))
        assert res["status"] == "done" and res["result"] == {"x": 42} and st.state == "Done"
        assert ex.rebuilds == 1
    finally:
        ex.shutdown(wait=False)


@pytest.mark.slow
def test_abort_ends_aborted_and_nothing_to_abort_says_so(tmp_path):
    ex = LocalExecutor(1)
    st = JobStage("Recon")
    assert st.abort() is False
    try:
        async def main():
            async def body(stage):
                return await stage.job(ex, job_helpers.abortable_job, job_dir=tmp_path / "c", kind="reconstruct")

            task = asyncio.create_task(st.run("reconstruction", body))
            deadline = time.monotonic() + 60
            while st.state != "Running" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert st.state == "Running"        # the abort under test is of a running job
            assert st.abort() is True
            return await task

        res = run(main())
        assert res["status"] == "aborted" and st.state == "Aborted" and not st.busy
        assert "while queued" not in res["message"]
    finally:
        ex.shutdown(wait=False)


@pytest.mark.slow
def test_abort_of_a_job_queued_behind_another_ends_at_once_and_it_never_runs(tmp_path):
    """Recon and Train share one executor. A job queued behind a running one could not be
    cancelled (a process pool hands it to a worker's queue at once), so its stage said "abort
    requested" until the job before it ended. It now ends Aborted at once, and the job, when a
    worker takes it, finds the abort file and runs nothing."""
    from ptychopv.hpc.jobs import read_progress

    ex = LocalExecutor(1)
    running, queued = JobStage("Train"), JobStage("Recon")
    marker = tmp_path / "ran"
    try:
        async def main():
            async def long(stage):
                return await stage.job(ex, job_helpers.abortable_job, job_dir=tmp_path / "a", kind="train")

            async def behind(stage):
                return await stage.job(ex, job_helpers.marking_job, str(marker), job_dir=tmp_path / "b",
                                       kind="reconstruct")

            first = asyncio.create_task(running.run("training", long))
            deadline = time.monotonic() + 60
            while running.state != "Running" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            second = asyncio.create_task(queued.run("reconstruction", behind))
            # the pool moves a submitted job to its workers' call queue at once, and from then on
            # its future cannot be cancelled: that is the case under test, so wait for it
            deadline = time.monotonic() + 30
            while not (queued.current is not None and queued.current.future.running()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert queued.current is not None and queued.current.future.running() and not queued.current.future.cancel()
            assert queued.state == "Queued" and running.state == "Running"
            t0 = time.monotonic()
            assert queued.abort() is True
            res = await asyncio.wait_for(second, 10)
            took = time.monotonic() - t0
            assert running.state == "Running"          # the job before it still runs
            running.abort()
            return res, took, await first

        res, took, first = run(main())
        assert res["status"] == "aborted" and "while queued" in res["message"]   # and within wait_for's 10 s: the job ahead never ends unaborted
        assert queued.state == "Aborted" and not queued.busy and first["status"] == "aborted"
        deadline = time.monotonic() + 30   # the worker reaches the queued job and ends it unrun
        while (read_progress(tmp_path / "b") or {}).get("status") != "aborted" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_progress(tmp_path / "b")["message"] == "aborted before it started"
        assert not marker.exists()
    finally:
        ex.shutdown(wait=False)


@pytest.mark.slow
def test_a_job_that_ignores_the_abort_is_given_up_and_its_worker_killed(tmp_path):
    """A job stuck in native code (a solver or GPU hang) never reads the abort file: Abort said
    "abort requested" and the stage stayed Running until the IOC restarted. After the grace the
    run now ends Aborted, the local worker is killed, and the healed pool runs the next job."""
    import os

    from ptychopv.hpc.jobs import read_progress

    ex = LocalExecutor(1)
    st = JobStage("Recon", abort_grace_s=1.0)
    try:
        async def main():
            async def body(stage):
                return await stage.job(ex, job_helpers.stuck_job, 120, job_dir=tmp_path / "s", kind="reconstruct")

            task = asyncio.create_task(st.run("reconstruction", body))
            deadline = time.monotonic() + 60
            while st.state != "Running" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            assert st.abort() is True
            res = await asyncio.wait_for(task, 30)
            return res, time.monotonic() - t0

        res, took = run(main())
        assert res["status"] == "aborted" and st.state == "Aborted" and not st.busy   # in wait_for's 30 s, not the job's 120
        assert "did not stop within 1 s; its worker was killed" in res["message"]
        pid = read_progress(tmp_path / "s")["pid"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker {pid} still alive")

        async def quick(stage):
            return await stage.job(ex, job_helpers.quick_job, 4, job_dir=tmp_path / "q", kind="reconstruct")

        assert run(st.run("reconstruction", quick))["result"] == {"x": 8}
    finally:
        ex.shutdown(wait=False)


@pytest.mark.slow
def test_a_job_past_its_timeout_is_stopped_and_the_run_fails(tmp_path):
    ex = LocalExecutor(1)
    st = JobStage("Train", timeout_s=1.0, abort_grace_s=20.0)
    try:
        async def body(stage):
            return await stage.job(ex, job_helpers.abortable_job, job_dir=tmp_path / "t", kind="train")

        res = run(st.run("training", body))
        assert res["status"] == "failed" and st.state == "Failed" and not st.busy
        assert res["message"].startswith("timed out after 1 s: aborted after")
        assert "timed out after 1 s" in st.message
    finally:
        ex.shutdown(wait=False)


def test_job_limits_are_checked_in_the_config():
    from pydantic import ValidationError

    from ptychopv.config import WorkflowOptions

    assert WorkflowOptions().job_timeout_s == 0 and WorkflowOptions().abort_grace_s == 30
    with pytest.raises(ValidationError, match="abort_grace_s"):
        WorkflowOptions(abort_grace_s=0)
    with pytest.raises(ValidationError, match="job_timeout_s"):
        WorkflowOptions(job_timeout_s=-1)


@pytest.mark.slow
def test_shutdown_without_waiting_kills_a_stuck_worker_in_seconds(tmp_path):
    ex = LocalExecutor(1, kill_after_s=1.0)
    ex.submit(job_helpers.sleeping_job, 120, str(tmp_path))
    deadline = time.monotonic() + 30
    procs = []
    while time.monotonic() < deadline and not procs:
        procs = [p for p in ex._pool._processes.values() if p.is_alive()]
        time.sleep(0.05)
    t0 = time.monotonic()
    ex.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - t0 < 5
    # exited, by each one's sentinel: is_alive() can say True for a worker the pool's manager
    # thread reaped a moment before (still_running's docstring)
    assert procs and still_running(procs, 0) == []


def test_still_running_sees_an_exit_that_another_waiter_reaped():
    """The pool's manager thread reaps its workers itself; a waitpid that loses that race gets
    ECHILD and ``is_alive()`` reads it as alive. ``still_running`` goes by the process's sentinel,
    so a worker reaped elsewhere counts as exited, and one still running counts as running."""
    import multiprocessing as mp
    import os

    ctx = mp.get_context("spawn")
    short = ctx.Process(target=time.sleep, args=(0.1,))
    long = ctx.Process(target=time.sleep, args=(60,))
    short.start()
    long.start()
    try:
        os.waitpid(short.pid, 0)            # reaped behind the Process object's back
        assert still_running([short, long], 2.0) == [long]
        assert still_running([short], 0) == []
    finally:
        long.kill()
        long.join(10)
    assert still_running([long], 10) == []


def test_a_labelling_failure_still_validates_the_live_model(tmp_path):
    """Workflow.reconstruct with scripted jobs: the label job fails (a corpus of another frame
    size); the validation runs anyway and the run ends done, saying the labels were not paired.
    An aborted label job still ends the run."""
    from ptychopv.hpc.workflow import Workflow

    scan = tmp_path / "scan_00001.h5"
    scan.write_bytes(b"x")
    ran = []

    class Stage:
        def __init__(self, label_status):
            self.label_status = label_status

        def set(self, **kw):
            pass

        async def job(self, executor, fn, *args, job_dir, kind, **kw):
            ran.append(kind)
            if kind == "reconstruct":
                return {"status": "done", "result": {"recon_path": str(tmp_path / "r.h5")}}
            if kind == "label":
                return {"status": self.label_status, "message": "frames are 128 px, the corpus holds 64 px"}
            return {"status": "done", "result": {"ssim": 0.42}}

    wf = Workflow(None, tmp_path / "jobs", tmp_path / "corpus.h5", tmp_path / "registry")
    res = run(wf.reconstruct(Stage("failed"), scan, {}, label={"fov": (64, 64)}, validate={"version": 1}))
    assert ran == ["reconstruct", "label", "validate"] and res["status"] == "done"
    assert res["result"]["ssim"] == 0.42 and res["result"]["labelling"].startswith("frames are 128 px")
    assert "labels not paired: frames are 128 px" in res["message"]
    ran.clear()
    res = run(wf.reconstruct(Stage("aborted"), scan, {}, label={"fov": (64, 64)}, validate={"version": 1}))
    assert ran == ["reconstruct", "label"] and res["status"] == "aborted"


class NeverStarts:
    """An executor that takes jobs and never runs them: a Dask scheduler without workers, a batch
    queue that never schedules. Its futures stay pending (cancellable)."""

    def __init__(self):
        import concurrent.futures as cf

        self.futures = []
        self._cf = cf

    def submit(self, *a, **k):
        f = self._cf.Future()
        self.futures.append(f)
        return f


def test_a_job_no_worker_starts_is_withdrawn_after_the_queue_timeout(tmp_path):
    """Helper 20 #6: a job that never starts stayed Queued for good (job_timeout_s counts from
    Running). With workflow.job_queue_timeout_s the run ends Failed, saying why, and frees the stage."""
    ex, rec = NeverStarts(), Recorder()
    st = JobStage("Recon", rec, queue_timeout_s=0.5)

    async def body(stage):
        return await stage.job(ex, job_helpers.quick_job, 1, job_dir=tmp_path / "q", kind="reconstruct")

    res = run(st.run("reconstruction", body))
    assert res["status"] == "failed" and st.state == "Failed" and not st.busy
    assert res["message"] == "no worker started it within 0.5 s: the reconstruct job was withdrawn"
    assert "no worker started it within 0.5 s" in st.message
    assert ex.futures[0].cancelled()                        # withdrawn from the executor, not left there
    assert "Running" not in [s for s, _ in rec.states]


def test_the_queue_timeout_does_not_stop_a_job_once_it_runs(tmp_path):
    """The queue timeout counts until a worker writes the job's first record, never after."""
    from ptychopv.hpc.jobs import PROGRESS, write_json_atomic

    ex = NeverStarts()
    st = JobStage("Train", queue_timeout_s=0.5)
    job_dir = tmp_path / "r"

    async def body(stage):
        task = asyncio.ensure_future(stage.job(ex, job_helpers.quick_job, 1, job_dir=job_dir, kind="train"))
        while not ex.futures:
            await asyncio.sleep(0.01)
        write_json_atomic(job_dir / PROGRESS, {"kind": "train", "status": "running", "message": "epoch 1"})
        while st.state != "Running":                       # the stage read the record
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:                  # three queue timeouts pass while it runs
            assert not task.done()
            await asyncio.sleep(0.05)
        ex.futures[0].set_result({"kind": "train", "status": "done", "message": "done", "result": {"x": 2}})
        return await task

    res = run(st.run("training", body))
    assert res["status"] == "done" and st.state == "Done", res


def test_the_queue_timeout_is_checked_in_the_config():
    from pydantic import ValidationError

    from ptychopv.config import WorkflowOptions

    assert WorkflowOptions().job_queue_timeout_s == 0
    with pytest.raises(ValidationError, match="job_queue_timeout_s"):
        WorkflowOptions(job_queue_timeout_s=-1)


def test_a_start_written_while_the_controller_runs_the_stage_waits_for_it():
    """Helper 22: a user's Recon:Start while the controller's run held the stage was refused in a
    message the next progress line replaced, and its put-callback completed as if done. It now
    waits for the run in progress and then runs, as a Start queued by the record does."""
    from ptychopv.ioc.hpcstage import HpcStage

    class Ioc:
        def __init__(self):
            self.messages = []

        def message(self, stage, text, **kw):
            self.messages.append((stage, text))

    hs = object.__new__(HpcStage)                    # only what recon_start uses
    hs.ioc, hs.recon = Ioc(), JobStage("Recon")
    ran = []

    async def reconstruct(scan):
        ran.append((scan, hs.recon.busy))

    hs.reconstruct, hs._scan_file = reconstruct, lambda: "scan_00002.h5"

    async def main():
        gate = asyncio.Event()

        async def controllers_run(stage):
            await gate.wait()
            return {"status": "done", "message": "ok"}

        held = asyncio.ensure_future(hs.recon.run("reconstruction", controllers_run))
        await asyncio.sleep(0)
        assert hs.recon.busy
        user = asyncio.ensure_future(hs.recon_start(1))
        for _ in range(10):
            await asyncio.sleep(0.05)
        assert not ran and not user.done()            # waiting, not dropped
        assert any("queued behind the run in progress" in text for _, text in hs.ioc.messages)
        gate.set()
        await held
        await asyncio.wait_for(user, 5)
        assert ran == [("scan_00002.h5", False)]      # ran once the controller's run had ended

    run(main())


@pytest.mark.parametrize("pinned", [0, 2])
def test_the_controller_does_not_retrain_while_model_select_pins_a_version(pinned, tmp_path):
    """Helper 22: with Model:Select pinning v2, each scan validated v2, retrained, published a
    version that never ran ('trained: push the new model') and retrained again on the next scan.
    Pinned, the controller says why it does not retrain and goes back to Idle; at 0 it retrains."""
    from types import SimpleNamespace

    from ptychopv.hpc import autocontrol as ac
    from ptychopv.ioc.hpcstage import HpcStage

    messages, trained = [], []
    hs = object.__new__(HpcStage)
    hs.ioc = SimpleNamespace(get=lambda name: {"Model:Select": pinned}[name],
                             message=lambda stage, text, **kw: messages.append((stage, text, kw.get("severity", 0))))
    hs.auto = ac.Controller(enabled=True, tolerance=0.1)
    hs.recon, hs.train_stage = JobStage("Recon"), JobStage("Train")
    hs.chain = SimpleNamespace(reference_ssim_for=lambda version: 0.9, infer=SimpleNamespace(version=2))
    hs._auto_state = lambda: None

    async def reconstruct(scan, on_reconstructed=None):
        on_reconstructed()
        return {"ssim": 0.5, "version": 2}            # far below its reference: a retrain is due

    async def train():
        trained.append(True)
        return {"version": 3}

    hs.reconstruct, hs.train = reconstruct, train
    run(hs._auto_cycle(tmp_path / "scan_00004.h5"))
    assert hs.auto.state is ac.State.IDLE
    if pinned:
        assert not trained
        assert any("Model:Select pins v2: not retrained" in text and sev == 1 for _, text, sev in messages), messages
    else:
        assert trained == [True]


def test_reconstructing_the_scan_being_recorded_fails_saying_so(tmp_path):
    """Helper 22: Recon:Start on the scan still being captured failed with HDF5's 'unable to lock
    file'. The run fails at once saying the scan is still being recorded."""
    from types import SimpleNamespace

    from ptychopv.ioc.hpcstage import HpcStage

    scan = tmp_path / "scan_00007.h5"
    rec = Recorder()
    hs = object.__new__(HpcStage)
    hs.ioc = SimpleNamespace(set=lambda *a, **k: None, message=lambda *a, **k: None)
    hs.chain = SimpleNamespace(recorder=SimpleNamespace(capture=True, current_file=str(scan)))
    hs.recon = JobStage("Recon", rec)
    assert run(hs.reconstruct(scan)) is None
    assert hs.recon.state == "Failed" and "scan_00007.h5 is still being recorded" in hs.recon.message
    assert not hs.recon.busy


def test_an_abort_during_the_validation_ends_the_run_aborted(tmp_path):
    """Helper 22: Recon:Abort during the validate step ended the run Done, NO_ALARM ('validation
    failed: aborted before the validate job'). It ends Aborted, the reconstruction said kept."""
    from ptychopv.hpc.workflow import Workflow

    scan = tmp_path / "scan_00003.h5"
    scan.write_bytes(b"")

    class Canned(JobStage):
        async def job(self, executor, fn, *args, job_dir, kind, on_progress=None):
            if kind == "reconstruct":
                return {"status": "done", "result": {"recon_path": str(tmp_path / "scan_00003_recon.h5")}}
            return {"status": "aborted", "message": f"aborted before the {kind} job"}

    wf = Workflow(None, tmp_path / "jobs", tmp_path / "corpus.h5", tmp_path / "registry")
    st = Canned("Recon")

    async def body(stage):
        return await wf.reconstruct(stage, scan, {}, label=None, validate={"version": 1})

    res = run(st.run("reconstruction", body))
    assert res["status"] == "aborted" and st.state == "Aborted", res
    assert "validation aborted (aborted before the validate job); scan_00003_recon.h5 kept" in st.message


class LabelNeverStarts:
    """Reconstruct and validate finish at once; the label job is never started by any worker."""

    def __init__(self):
        self.submitted = []

    def submit(self, fn, *args):
        self.submitted.append(fn.__name__)
        f = cf.Future()
        if fn.__name__ == "reconstruct_job":
            f.set_result({"status": "done", "message": "done", "result": {"recon_path": "/nonexistent/r.h5"}})
        elif fn.__name__ == "validate_job":
            f.set_result({"status": "done", "message": "done", "result": {"ssim": 0.5}})
        return f


def test_a_label_job_past_its_queue_timeout_does_not_abort_the_validation(tmp_path, monkeypatch):
    """A job's own time limit stops that job, not the run: a label job no worker started made
    the validation after it 'aborted before the validate job', and the run Aborted."""
    monkeypatch.setattr("ptychopv.hpc.workflow.POLL_S", 0.02)
    scan = tmp_path / "scan_00001.h5"
    scan.write_bytes(b"x")
    ex = LabelNeverStarts()
    wf = Workflow(ex, tmp_path / "jobs", tmp_path / "corpus.h5", tmp_path / "registry")
    st = JobStage("Recon", queue_timeout_s=0.3)

    async def body(stage):
        return await wf.reconstruct(stage, scan, {}, label={"fov": (64, 64)}, validate={"version": 1})

    res = asyncio.run(st.run("reconstruction", body))
    # the label job's timeout is the label job's: the live model is still validated, the run Done
    assert ex.submitted == ["reconstruct_job", "label_job", "validate_job"], (ex.submitted, res)
    assert res["status"] == "done" and st.state == "Done", res
    assert res["result"]["ssim"] == 0.5 and "no worker started it" in res["result"]["labelling"]


def test_a_transient_error_reading_the_progress_record_does_not_end_the_run(tmp_path, monkeypatch):
    """On a shared filesystem (Dask, Globus Compute) reading a file another host is replacing can
    fail for a moment (NFS: ESTALE). read_progress took only a missing or half-written file: any
    other OSError came out of JobStage.job, the run ended Failed, and the job ran on unaborted
    (a training then published a version after its run had 'failed')."""
    import errno
    import pathlib
    import time

    from ptychopv.hpc.jobs import PROGRESS, write_json_atomic

    monkeypatch.setattr("ptychopv.hpc.workflow.POLL_S", 0.02)
    real = pathlib.Path.read_text
    faults = [OSError(errno.ESTALE, "Stale file handle")]

    def flaky(self, *a, **k):
        if self.name == PROGRESS and faults and self.exists():
            raise faults.pop()
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", flaky)
    futures = []

    class Pending:
        def submit(self, *a):
            futures.append(cf.Future())
            return futures[-1]

    st = JobStage("Train")
    job_dir = tmp_path / "t"

    async def body(stage):
        task = asyncio.ensure_future(stage.job(Pending(), None, job_dir=job_dir, kind="train"))
        while not futures:
            await asyncio.sleep(0.01)
        write_json_atomic(job_dir / PROGRESS, {"kind": "train", "status": "running", "message": "epoch 1"})
        t0 = time.monotonic()
        while faults and not task.done() and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        futures[0].set_result({"kind": "train", "status": "done", "message": "done", "result": {"version": 2}})
        return await task

    res = asyncio.run(st.run("training", body))
    assert not faults                                     # the fault was met
    assert res["status"] == "done" and st.state == "Done", res
    assert not (job_dir / "abort").exists()


def _hpcstage_for_runs(values, severities):
    """An HpcStage with only what reconstruct() and train() use; records in ``values``."""
    from types import SimpleNamespace

    from ptychopv.ioc.hpcstage import HpcStage

    def set_(name, value, severity=0, alarm_status=0):
        values[name], severities[name] = value, severity

    hs = object.__new__(HpcStage)
    hs.ioc = SimpleNamespace(get=lambda name: values.get(name, 0), set=set_, message=lambda *a, **k: None)
    hs.cfg = SimpleNamespace(recon=SimpleNamespace(model_dump=lambda **k: {}),
                             train=SimpleNamespace(model_dump=lambda **k: {}),
                             chain=SimpleNamespace(passthrough_size=64, binning=1, crop=None),
                             workflow=SimpleNamespace(validate_engine="auto"))
    hs.chain = SimpleNamespace(recorder=SimpleNamespace(capture=False, current_file=""),
                               infer=SimpleNamespace(input_size=64, version=1),
                               stitch=SimpleNamespace(stitcher=SimpleNamespace(pixel_size_m=1e-8)))
    hs.recon, hs.train_stage, hs.last_recon = JobStage("Recon"), JobStage("Train"), None
    return hs


def test_a_reconstruction_that_measured_no_ssim_does_not_show_the_last_scans(tmp_path):
    """Scan 1 was validated (SSIM 0.8); scan 2's run ended Done but its validation failed (the
    engine missing on the worker). SSIM_RBV still read 0.8, published as scan 2's: the macro
    printed 'recon Done ... SSIM 0.8' and the demo scored it. A run that measured none says so."""
    from types import SimpleNamespace

    values, sev = {"Recon:Iterations": 10}, {}
    hs = _hpcstage_for_runs(values, sev)
    outcomes = [{"recon_path": "r1.h5", "scan": "scan_00001.h5", "ssim": 0.8, "version": 1},
                {"recon_path": "r2.h5", "scan": "scan_00002.h5", "validation": "no engine 'tensorrt' on this host"}]

    async def reconstruct(stage, scan, opts, *, label, validate=None, on_recon=None):
        return {"status": "done", "message": "ok", "result": outcomes.pop(0)}

    hs.workflow = SimpleNamespace(reconstruct=reconstruct)
    assert run(hs.reconstruct(tmp_path / "scan_00001.h5"))["ssim"] == 0.8
    assert values["SSIM_RBV"] == 0.8 and sev["SSIM_RBV"] == 0
    summary = run(hs.reconstruct(tmp_path / "scan_00002.h5"))
    assert hs.recon.state == "Done" and "ssim" not in summary
    assert values["SSIM_RBV"] != 0.8 and sev["SSIM_RBV"] >= 1, (values["SSIM_RBV"], sev["SSIM_RBV"])


def test_a_training_run_does_not_show_the_previous_runs_epochs_and_losses():
    """Run 1 trained 3 epochs; run 2 failed before its first epoch (no pairs, a job that could not
    be submitted). Train:Epoch_RBV, Train:Loss_RBV and the loss histories still showed run 1's
    (epoch 3 of a run that never trained), during run 2 and after it failed."""
    from types import SimpleNamespace

    import numpy as np

    values, sev = {"Train:Epochs": 3}, {}
    hs = _hpcstage_for_runs(values, sev)
    seen_while_queued = []

    async def train(stage, opts, on_progress=None):
        if not seen_while_queued:
            for it in (1, 2, 3):
                on_progress({"iteration": it, "loss": 1.0 / it, "val_loss": 2.0 / it})
            seen_while_queued.append(None)
            return {"status": "done", "result": {"version": 2, "val_loss": 0.5}}
        seen_while_queued.append((values["Train:Epoch_RBV"], len(values["Train:LossHistory_RBV"])))
        return {"status": "failed", "message": "the train job could not be submitted: BrokenProcessPool"}

    hs.workflow = SimpleNamespace(train=train)
    assert run(hs.train())["version"] == 2
    assert values["Train:Epoch_RBV"] == 3 and len(values["Train:LossHistory_RBV"]) == 3
    assert run(hs.train()) is None and hs.train_stage.state == "Failed"
    assert seen_while_queued[1] == (0, 0)                        # run 2 started with nothing of run 1
    assert values["Train:Epoch_RBV"] == 0 and values["Train:Loss_RBV"] == 0.0
    assert len(np.asarray(values["Train:LossHistory_RBV"])) == 0 == len(np.asarray(values["Train:ValLossHistory_RBV"]))
