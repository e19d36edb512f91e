"""Serve a simulated (or replayed) ptychography scan as areaDetector NTNDArrays over PVA.

Loopback only: the server listens on 127.0.0.1 at ``sim.pva_server_port``. Clients find it
with ``EPICS_PVA_NAME_SERVERS=127.0.0.1:PORT``.
"""

from __future__ import annotations

HELP = "simulated detector serving NTNDArrays over PV Access"


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config (the 'sim' section is used); default: embedded defaults")
    p.add_argument("--port", type=int, help="override sim.pva_server_port")
    p.add_argument("--broadcast-port", type=int, help="override sim.pva_broadcast_port")
    p.add_argument("--rate", type=float, help="override sim.frame_rate_hz")
    p.add_argument("--codec", help="override sim.codec")
    p.add_argument("--truth", help="override sim.truth_file (ground truth + scan, HDF5)")
    p.add_argument("--acquire", action="store_true", help="start acquiring at once (sim.auto_start)")
    p.add_argument("--replay", help="replay this scan file (HDF5 scan layout or .npz[.bz2]) instead of simulating")
    p.add_argument("--fftshift", action="store_true", help="with --replay: centre zero frequency")


def _options(args):
    from pathlib import Path

    from ..config import ConfigError, ReplayOptions, load_config, resolve

    cfg = load_config(args.config)
    sim = cfg.sim
    # the config's paths are relative to its folder; the command line's to the working folder
    # (`--replay examples/scans/scan_00001.h5` with `--config examples/...` looked in
    # examples/examples/)
    if sim.replay is not None:
        sim.replay.file = resolve(cfg, sim.replay.file)
    sim.truth_file = resolve(cfg, sim.truth_file)
    updates = {"pva_server_port": args.port, "pva_broadcast_port": args.broadcast_port,
               "frame_rate_hz": args.rate, "codec": args.codec,
               "truth_file": None if args.truth is None else Path(args.truth).absolute()}
    try:
        for k, v in updates.items():
            if v is not None:
                setattr(sim, k, v)
        if args.acquire:
            sim.auto_start = True
        if args.replay:
            sim.replay = ReplayOptions(file=Path(args.replay).absolute(), fftshift=args.fftshift)
    except ValueError as exc:
        raise ConfigError(f"command line: {exc}") from None
    return sim


def run(args) -> int:
    import signal
    import threading

    from ..io.epics_env import apply_loopback, pva_server_conf

    opts = _options(args)
    apply_loopback()
    from .. import simulation
    from ..simserver import DetectorSimulator

    src = simulation.build(opts)
    if opts.truth_file:
        simulation.write_truth_file(opts.truth_file, src)
    conf = pva_server_conf(opts.pva_server_port, opts.pva_broadcast_port)
    sim = DetectorSimulator(opts, src, conf)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"ptychopv sim: {len(src.frames)} frames {src.frames.shape[1:]} {src.frames.dtype} on "
          f"{sim.image_name} at 127.0.0.1:{opts.pva_server_port}, {opts.frame_rate_hz:g} Hz, codec {opts.codec}",
          flush=True)
    if opts.auto_start:
        sim.acquire(True)
    done.wait()
    sim.close()
    return 0
