"""A ptychopv session from Python: capture a scan, reconstruct it, train on it, report.

The same steps as ``examples/macro.sh``, with pyepics for the IOC (Channel Access) and p4p for
the detector's ``Acquire`` (PV Access, as ``ptychopv sim`` serves it)::

    python examples/pyepics_session.py --prefix PTYCHO: --detector PTYSIM: \
        --ca-addr 127.0.0.1:5064 --pva-name-servers 127.0.0.1:5095

Without ``--ca-addr`` / ``--pva-name-servers`` the EPICS environment variables apply. The last
line printed is a JSON summary (scan file, statuses, SSIM, model versions). Exit status 0 when
the scan was reconstructed, trained on and the new model went live.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default=os.environ.get("P", "PTYCHO:"), help="ptychopv IOC prefix (env P)")
    ap.add_argument("--detector", default=os.environ.get("DET", "PTYSIM:"),
                    help="detector prefix (env DET; default ptychopv sim's)")
    ap.add_argument("--ca-addr", help="EPICS_CA_ADDR_LIST for the IOC, e.g. 127.0.0.1:5064")
    ap.add_argument("--pva-name-servers", help="EPICS_PVA_NAME_SERVERS for the detector")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each step")
    return ap.parse_args(argv)


def configure_env(args: argparse.Namespace) -> None:
    """pyepics reads the CA environment once, at import: set it before importing epics."""
    if args.ca_addr:
        os.environ["EPICS_CA_ADDR_LIST"] = args.ca_addr
        os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
    if args.pva_name_servers:
        os.environ["EPICS_PVA_NAME_SERVERS"] = args.pva_name_servers
        os.environ["EPICS_PVA_AUTO_ADDR_LIST"] = "NO"     # as for CA: no broadcast search beside them


def wait_for(read, done, timeout: float, what: str):
    """Poll ``read()`` until ``done(value)``; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not done(value := read()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s (last value {value!r})")
        time.sleep(0.2)
    return value


def session(prefix: str, detector: str, timeout: float = 600.0) -> dict:
    import epics
    from p4p.client.thread import Context

    def get(name, **kw):
        value = epics.caget(prefix + name, timeout=10, **kw)
        if value is None:
            raise TimeoutError(f"caget {prefix + name}: no connection")
        return value

    def put(name, value, wait=True):
        # wait=True is caput -c: returns when the record's put-callback completes
        if epics.caput(prefix + name, value, wait=wait, timeout=timeout) != 1:
            raise TimeoutError(f"caput {prefix + name} {value}: no completion within {timeout:.0f} s")

    out: dict = {"prefix": prefix, "version_before": int(get("ModelVersion_RBV"))}
    with Context("pva") as det:
        nframes = int(det.get(detector + "NumFrames_RBV", timeout=10))
        missed_before = int(get("Infer:MissedFrames_RBV", use_monitor=False))
        put("Scan:Capture", 1)
        try:
            det.put(detector + "Acquire", 1, timeout=10)

            def recorded_and_lost():   # a frame lost on the way (a uniqueId gap) is never recorded
                return (int(get("Scan:FramesCaptured_RBV", use_monitor=False)),
                        int(get("Infer:MissedFrames_RBV", use_monitor=False)) - missed_before)

            captured, lost = wait_for(recorded_and_lost, lambda v: sum(v) >= nframes, timeout,
                                      "every frame recorded or counted lost")
        finally:
            # completes when the file is closed; also when the scan was not captured in time (as
            # macro.sh): left on, the IOC went on recording every later frame into this scan
            put("Scan:Capture", 0)
    out["scan_file"] = get("Scan:FileName_RBV", as_string=True)
    out["frames_lost"] = lost
    print(f"session: captured {captured} of {nframes} frames to {out['scan_file']}"
          + (f" ({lost} lost on the way: Infer:MissedFrames_RBV)" if lost else ""), flush=True)

    put("Recon:Start", 1)
    out["recon_status"] = get("Recon:Status_RBV", as_string=True, use_monitor=False)
    out["recon_message"] = get("Recon:Message_RBV", as_string=True, use_monitor=False)
    out["ssim"] = float(get("SSIM_RBV", use_monitor=False))
    print(f"session: recon {out['recon_status']}: {out['recon_message']} SSIM {out['ssim']:.3f}", flush=True)
    if out["recon_status"] != "Done":
        return out

    put("Train:Start", 1)
    out["train_status"] = get("Train:Status_RBV", as_string=True, use_monitor=False)
    out["train_message"] = get("Train:Message_RBV", as_string=True, use_monitor=False)
    print(f"session: train {out['train_status']}: {out['train_message']}", flush=True)
    if out["train_status"] != "Done":
        return out
    # the registry has the new version; the chain swaps it in on its own
    out["version_after"] = int(wait_for(lambda: get("ModelVersion_RBV", use_monitor=False),
                                        lambda v: v > out["version_before"], timeout, "a new live model"))
    print(f"session: ModelVersion_RBV {out['version_after']}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_env(args)
    try:
        out = session(args.prefix, args.detector, args.timeout)
    except TimeoutError as exc:
        print(f"session: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0 if out.get("version_after", 0) > out["version_before"] else 1


if __name__ == "__main__":
    sys.exit(main())
