"""Start ptychopv processes (sim, IOC) as children and wait until they say they are ready.

Used by the tests, the benchmarks and ``ptychopv demo``. Output is drained by a thread into a
log (and optionally echoed), so a chatty child never blocks on a full pipe.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time


class ProcessFailed(RuntimeError):
    pass


class Child:
    """A child process whose output lines are kept and searchable."""

    def __init__(self, args: list[str], env: dict, *, name: str = "child", echo: bool = False, cwd=None):
        self.name = name
        self.args = args
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self._echo = echo
        self._reader = threading.Thread(target=self._read, name=f"{name}-out", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if self._echo:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        """Block until a line containing ``text`` appears; raise if the child exits first."""
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if text in line:
                return line
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessFailed(f"{self.name}: no {text!r} within {timeout:.0f} s; output:\n{self.output()}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                raise ProcessFailed(f"{self.name} exited with {self.proc.returncode} before {text!r}; "
                                    f"output:\n{self.output()}")
            if text in line:
                return line

    def output(self, last: int = 200) -> str:
        """The child's ``last`` lines of output."""
        return "\n".join(self.lines[-last:])

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (clean shutdown: settings saved, files closed), then SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ptychopv_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "ptychopv", *args]


def child_env(extra: dict | None = None) -> dict:
    from .io.epics_env import loopback_env

    env = loopback_env()
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_ioc(config_path, *, name: str = "ioc", echo: bool = False, timeout: float = 90.0) -> Child:
    child = Child(ptychopv_args("ioc", "--config", str(config_path)), child_env(), name=name, echo=echo)
    return _ready(child, "ptychopv ioc: ready", timeout)


def start_sim(config_path, *extra: str, name: str = "sim", echo: bool = False, timeout: float = 90.0) -> Child:
    child = Child(ptychopv_args("sim", "--config", str(config_path), *extra), child_env(), name=name, echo=echo)
    return _ready(child, "ptychopv sim:", timeout)


def _ready(child: Child, text: str, timeout: float) -> Child:
    """``child`` once it says ``text``; stopped if it does not in time, or the wait is interrupted
    (Ctrl-C, a SIGTERM the demo turns into one): the caller never got it, so nothing else would."""
    try:
        child.wait_for(text, timeout)
    except BaseException:
        child.stop()
        raise
    return child


if os.name != "posix":  # pragma: no cover
    raise ImportError("ptychopv.procs needs POSIX signals")
