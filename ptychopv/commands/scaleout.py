"""Start the scale-out consumers of a config (section ``scaleout``) and wait; Ctrl-C stops them.

Each consumer is a ``pvapy-hpc-consumer`` process running ptychopv's processor
(``ptychopv.pvapy_processor.PtychoProcessor``): it takes every N-th detector frame through
pvaPy's distributor, preprocesses and infers it with the newest model of the registry, and
publishes the phase on its channel; the IOC (same config) gathers the N channels into
``Stitch:Image``. With ``scaleout.input_channel`` unset, a ``pvapy-mirror-server`` re-serves
``source.channel`` with the distributor first (``--no-mirror`` when it runs elsewhere).

On several hosts, one config for all: on each consumer host
``ptychopv scaleout --config C --consumers K --no-mirror --interface <that host's address>``
(the consumer's ``host`` in the config), and the mirror where ``scaleout.mirror.host`` says
(``ptychopv scaleout --config C --consumers none``). The registry path must be one every
consumer host sees (a shared filesystem), or give ``--registry``.
"""

from __future__ import annotations

HELP = "start the scale-out consumers (pvaPy hpc consumers running ptychopv's inference)"


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML config with a scaleout section (the IOC's)")
    p.add_argument("--consumers", default="all",
                   help="which consumers to start here: all (default), none, or 1-based ids like 1,3")
    p.add_argument("--no-mirror", action="store_true",
                   help="do not start the mirror server here (it starts only with --consumers all or none, "
                        "where one is needed: a list of ids is a consumer host's, never the mirror's)")
    p.add_argument("--interface", default="127.0.0.1",
                   help="address the PVA servers started here listen on (default 127.0.0.1: loopback)")
    p.add_argument("--registry", help="model registry folder as this host sees it (default: chain.registry)")
    p.add_argument("--scale", type=float, default=1.0, help="intensity multiplier before inference (ScaleFactor)")
    p.add_argument("--report-period", type=float, default=0.0, help="pvaPy statistics report period (s); 0: none")
    p.add_argument("--echo", action="store_true", help="echo the children's output")


def _ids(text: str, n: int) -> list[int]:
    if text == "all":
        return list(range(n))
    if text == "none":
        return []
    from ..config import ConfigError

    try:
        ids = [int(t) - 1 for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--consumers: {text!r} is not 'all', 'none' or consumer numbers like 1,2") from None
    bad = [i + 1 for i in ids if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--consumers: no consumer {bad[0]} (the config lists {n})")
    twice = sorted({i + 1 for i in ids if ids.count(i) > 1})
    if twice:       # a second copy would take its server's port and die, or serve its share twice
        raise ConfigError(f"--consumers: consumer {twice[0]} named twice")
    return ids


def run(args) -> int:
    import os
    import signal
    import socket
    import threading
    import time
    from pathlib import Path

    from .. import scaleout
    from ..config import ConfigError, load_config
    from ..io.epics_env import loopback_env
    from ..procs import Child
    from ..science.preprocess import check_scale

    try:        # each consumer's processor refuses it at its start: refused here, before any starts
        check_scale(args.scale)
    except ValueError as exc:
        raise ConfigError(f"--scale: {exc}") from None
    cfg = load_config(args.config)
    s = cfg.scaleout
    if not s.consumers:
        raise ConfigError(f"{args.config}: scaleout.consumers is empty: nothing to start")
    if args.registry:
        cfg.chain.registry = Path(args.registry).resolve()
    ids = _ids(args.consumers, len(s.consumers))
    base = loopback_env() if args.interface == "127.0.0.1" else dict(os.environ)
    children: list[Child] = []
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())

    def listening(port: int, child: Child, what: str, deadline: float) -> None:
        host = "127.0.0.1" if args.interface in ("127.0.0.1", "0.0.0.0") else args.interface
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {child.proc.returncode}:\n{child.output()}")
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or done.is_set():
                    raise RuntimeError(f"{what}: no PVA server on port {port}:\n{child.output()}") from None
                time.sleep(0.1)

    try:
        if scaleout.uses_mirror(cfg) and not args.no_mirror and args.consumers in ("all", "none"):
            cmd, env = scaleout.mirror_command(cfg, base, interface=args.interface)
            m = Child(cmd, env, name="mirror", echo=args.echo)
            children.append(m)
            listening(s.mirror.server_port, m, "pvapy-mirror-server", time.monotonic() + 60)
            print(f"ptychopv scaleout: mirror {s.mirror.channel} of {cfg.source.channel} on "
                  f"{args.interface}:{s.mirror.server_port}", flush=True)
        for i in ids:
            cmd, env = scaleout.consumer_command(cfg, i, base, interface=args.interface, scale=args.scale,
                                                 report_period_s=args.report_period)
            children.append(Child(cmd, env, name=f"consumer{i + 1}", echo=args.echo))
        for i, child in zip(ids, children[len(children) - len(ids):]):
            c = s.consumers[i]
            listening(c.server_port, child, f"consumer {i + 1}", time.monotonic() + 120)
        print(f"ptychopv scaleout: ready: consumer(s) {', '.join(str(i + 1) for i in ids) or 'none'} of "
              f"{len(s.consumers)} reading {scaleout.input_channel(cfg)}", flush=True)
        while not done.wait(0.5):
            for child in children:
                if child.proc.poll() is not None:
                    print(f"ptychopv scaleout: {child.name} exited with {child.proc.returncode}:\n"
                          f"{child.output()}", flush=True)
                    return 1
        return 0
    except RuntimeError as exc:
        print(f"ptychopv scaleout: {exc}", flush=True)
        return 1
    finally:
        for child in reversed(children):
            child.stop(timeout=10)
