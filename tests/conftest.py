"""Test fixtures: every EPICS server runs as a child process on loopback with its own ports.

The loopback settings are applied here, at import, before any EPICS client library loads.
pyepics reads its address list once per process, so the CA ports of this run's IOCs are
allocated up front and listed in EPICS_CA_ADDR_LIST.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

# Under pytest-xdist each worker shares the machine's CPUs with the others: torch (and anything
# else OpenMP) in a worker and in its children gets its share of threads, not every CPU. With
# two workers on 2 cores, two two-thread torch processes side by side trained at 0.42-0.58x the
# rate of two one-thread ones (benchmarks/threads.py; results-threads-cpu.json: 6.3 against 14.9
# steps/s in all; OpenMP threads spin waiting for each other's preempted threads). Set before
# torch is imported anywhere in this process; children inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _SHARE = str(max(1, _CPUS // _WORKERS))
    for _key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_key, _SHARE)

from ptychopv.io.epics_env import apply_loopback, free_port, pva_client_conf

apply_loopback()
CA_PORTS = [free_port() for _ in range(4)]
os.environ["EPICS_CA_ADDR_LIST"] = " ".join(f"127.0.0.1:{p}" for p in CA_PORTS)
os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
os.environ["EPICS_CA_REPEATER_PORT"] = str(free_port())
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class IocHandle:
    prefix: str
    config: Path
    ca_port: int
    pva_port: int
    image_port: int
    broadcast_port: int
    child: object = None

    def pva_conf(self) -> dict:
        return pva_client_conf(self.pva_port, self.image_port)

    def pv(self, name: str) -> str:
        return self.prefix + name

    def fresh_caget(self, name: str, timeout: float = 10.0):
        """One CA read by a client that searches anew (caproto's sync client). After an IOC
        restart pyepics's channels to the stopped IOC search again only at a backed-off period
        (beacons would cut it short through a CA repeater, which the test run does not start), so
        a read through them can time out though the new IOC serves the PV."""
        from caproto.sync.client import read

        data = read(self.pv(name), timeout=timeout).data
        return data[0] if len(data) == 1 else data


def write_ioc_config(folder: Path, prefix: str, ca_port: int, extra: str = "") -> IocHandle:
    folder.mkdir(parents=True, exist_ok=True)
    h = IocHandle(prefix, folder / "ioc.yaml", ca_port, free_port(), free_port(), free_port())
    h.config.write_text(textwrap.dedent(f"""\
        prefix: "{prefix}"
        epics:
          ca_server_port: {ca_port}
          ca_repeater_port: {os.environ['EPICS_CA_REPEATER_PORT']}
          pva_server_port: {h.pva_port}
          pva_broadcast_port: {h.broadcast_port}
          image_pva_port: {h.image_port}
        autosave:
          directory: autosave
          period_s: 0.5
        """) + textwrap.dedent(extra))
    return h


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package; its modules import
    their siblings, so it goes on ``sys.path``), for tests of a benchmark's own pieces."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    # a benchmark run as a script applies the loopback settings at import, which would replace
    # this test run's own (EPICS_CA_ADDR_LIST with its CA ports, read anew by caproto's every
    # search): the environment is put back as it was
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return mod


def run_benchmark(name: str, *args: str, timeout: float = 300) -> "subprocess.CompletedProcess":
    """``python benchmarks/<name>.py ARGS`` as a user runs it, from the repository root."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "benchmarks" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=root, check=False)


def sim_section(prefix: str, port: int, broadcast_port: int, *, rate_hz: float, size_px: int,
                extent_m: float, overlap: float = 0.6, probe: dict | None = None, scan: dict | None = None,
                **keys) -> str:
    """The ``sim:`` section of a test config, at column 0 (append it to a dedented config): 64x64
    frames, a 0.5 um beam, the simulator's own PVA ports; ``keys`` adds or replaces top-level sim
    keys (dose, truth_file, codec...), ``probe`` and ``scan`` add to those mappings."""
    import yaml

    sim = {"prefix": prefix, "pva_server_port": port, "pva_broadcast_port": broadcast_port,
           "frame_rate_hz": rate_hz, **keys,
           "geometry": {"detector_size": 64}, "sample": {"size_px": size_px},
           "probe": {"beam_m": 5.0e-7, **(probe or {})},
           "scan": {"extent_m": extent_m, "overlap": overlap, **(scan or {})}}
    return yaml.safe_dump({"sim": sim}, sort_keys=False, default_flow_style=None)


def hpc_loop_extra(sim_prefix: str, sim_port: int, *, seed_demo_model: bool, rate_hz: float = 400,
                   **sim_keys) -> str:
    """Config for an IOC + simulator that run the HPC loop quickly: 64x64 frames, one thread each;
    ``sim_keys`` adds top-level sim keys (lose_frames...)."""
    return textwrap.dedent(f"""
        source: {{channel: "{sim_prefix}Pva1:Image", name_servers: ["127.0.0.1:{sim_port}"]}}
        chain: {{engine: onnxruntime, seed_demo_model: {str(seed_demo_model).lower()}, scan_folder: scans,
                registry: registry}}
        workflow: {{jobs_folder: jobs, corpus: corpus.h5}}
        hpc: {{kind: local, workers: 1}}
        recon: {{beam_m: 5.0e-7, threads: 1}}
        train: {{batch_size: 16, threads: 1, seed: 1}}
        """) + sim_section(sim_prefix, sim_port, free_port(), rate_hz=rate_hz, size_px=512, extent_m=3.0e-6,
                           overlap=0.65, truth_file="truth.h5", dose=1.0e6, **sim_keys)


@pytest.fixture(scope="session")
def ioc(tmp_path_factory):
    """One IOC for the session, with default settings."""
    from ptychopv.procs import start_ioc

    # no detector serves this IOC: its source would report "not found" on Infer:Message_RBV 5 s
    # after start, racing the tests that read the messages stages write there
    h = write_ioc_config(tmp_path_factory.mktemp("ioc"), f"T{os.getpid()}:", CA_PORTS[0],
                         "source: {connect_timeout_s: 3600}\n")
    h.child = start_ioc(h.config)
    yield h
    h.child.stop()


@pytest.fixture
def pva_ctx(ioc):
    from p4p.client.thread import Context

    ctx = Context("pva", conf=ioc.pva_conf(), useenv=False, unwrap=False)
    yield ctx
    ctx.close()


def read_until(proc, text: str, timeout: float = 90.0) -> str:
    """Read a child process's stdout (a raw ``Popen``, text mode) up to the first line holding
    ``text``, and return that line; fails if the child ends or the deadline passes first."""
    import time

    deadline = time.monotonic() + timeout
    line = ""
    while text not in line:
        assert time.monotonic() < deadline, f"no {text!r} within {timeout:g} s"
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"the child ended before {text!r}"
    return line
