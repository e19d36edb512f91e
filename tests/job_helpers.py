"""Job functions for tests of the job stage and executors (importable by spawned workers)."""

import os
import signal
import time

from ptychopv.hpc.jobs import run_job


def quick_job(x: int, job_dir: str) -> dict:
    return run_job("quick", job_dir, lambda rep: {"x": x * 2})


def killed_job(job_dir: str) -> dict:
    """Report progress, then die as a worker killed by the OOM killer or an operator would."""
    def body(rep):
        rep.update(iteration=8, total=60, progress=8 / 60, message="iteration 8/60")
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    return run_job("killed", job_dir, body)


def abortable_job(job_dir: str) -> dict:
    """Iterate until the abort file appears (as reconstruction and training do)."""
    from ptychopv.hpc.reconstruct import Aborted

    def body(rep):
        for i in range(600):
            if rep.aborted():
                raise Aborted(f"aborted after {i} iterations")
            rep.update(iteration=i, total=600, progress=i / 600, message=f"iteration {i}")
            time.sleep(0.05)
        return {}
    return run_job("abortable", job_dir, body)


def sleeping_job(seconds: float, job_dir: str) -> dict:
    """Ignore the abort file: a job stuck in native code."""
    time.sleep(seconds)
    return {"status": "done"}


def marking_job(path: str, job_dir: str) -> dict:
    """Write ``path`` when its body runs (a job with a side effect, as labelling appends pairs)."""
    def body(rep):
        with open(path, "w") as f:
            f.write("ran")
        return {"ran": True}
    return run_job("marking", job_dir, body)


def stuck_job(seconds: float, job_dir: str) -> dict:
    """Report that it runs, then never look at the abort file: a job stuck in native code."""
    def body(rep):
        rep.update(message="stuck")
        time.sleep(seconds)
        return {}
    return run_job("stuck", job_dir, body)


def late_marking_job(seconds: float, path: str) -> int:
    """Sleep, then write ``path``: a job whose side effect comes at its end (a training run
    publishing a version). Returns its own pid."""
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("ran")
    return os.getpid()
