"""Reconstruct a recorded scan with pty-chi and write the result beside it (``*_recon.h5``).

The scan is a file in the HDF5 scan layout (or a numpy scan, positions in object pixels).
Geometry comes from the file's attributes unless overridden; the initial probe is made from
``--beam-m``/``--beam-px`` or read from ``--probe FILE.npy``. Prints a JSON summary at the end.
"""

from __future__ import annotations

import json
import sys

from ..hpc.options import ALGORITHMS
from ._config import add_config_argument, import_config_extensions

HELP = f"reconstruct a scan file with pty-chi ({', '.join(a.label for a in ALGORITHMS.values())})"


def add_arguments(p) -> None:
    p.add_argument("scan", help="scan file (.h5 in the scan layout, or .npz/.npz.bz2)")
    # no argparse choices: a site's algorithm (--config's extensions) is known only once imported
    p.add_argument("--engine", default="epie", help=f"algorithm: {', '.join(ALGORITHMS)} or one of --config's "
                   "extensions (default epie)")
    add_config_argument(p, "reconstruction algorithms")
    p.add_argument("--iterations", type=int, default=50, help="default 50")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("-o", "--out", help="output file (default: SCAN_recon.h5 beside the scan)")
    p.add_argument("--batch-size", type=int, help="positions per update (default: the engine's)")
    p.add_argument("--probe", help="initial probe, an (n, n) complex .npy file")
    p.add_argument("--probe-kind", choices=["focused", "donut"], help="kind of probe to make (default focused)")
    p.add_argument("--beam-m", type=float, help="beam size (m) of the probe to make")
    p.add_argument("--beam-px", type=float, help="beam size in object pixels of the probe to make")
    p.add_argument("--pixel-size-m", type=float, help="object pixel size (m), overriding the geometry")
    p.add_argument("--energy-ev", type=float, help="photon energy (eV), overriding the file")
    p.add_argument("--distance-m", type=float, help="detector distance (m), overriding the file")
    p.add_argument("--detector-pixel-m", type=float, help="detector pixel size (m), overriding the file")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def options_from(args) -> dict:
    opts = {"engine": args.engine, "iterations": args.iterations, "device": args.device,
            "batch_size": args.batch_size, "probe": args.probe, "probe_kind": args.probe_kind,
            "beam_m": args.beam_m, "beam_px": args.beam_px, "pixel_size_m": args.pixel_size_m,
            "energy_ev": args.energy_ev, "detector_distance_m": args.distance_m,
            "detector_pixel_size_m": args.detector_pixel_m, "seed": args.seed, "threads": args.threads}
    return {k: v for k, v in opts.items() if v is not None}


def run(args) -> int:
    from tqdm import tqdm

    from ..hpc.reconstruct import Aborted, ReconOptions, ReconstructionError, reconstruct_file

    import_config_extensions(args)
    try:
        options = ReconOptions.model_validate(options_from(args))
    except ValueError as exc:
        print(f"ptychopv reconstruct: {exc}", file=sys.stderr)
        return 2
    bar = tqdm(total=options.iterations, unit="it", disable=args.quiet, file=sys.stderr,
               desc=options.engine)

    def progress(i, total, loss):
        bar.set_postfix(loss=f"{loss:.4g}")
        bar.update(1)

    try:
        rec, out = reconstruct_file(args.scan, args.out, options, progress=progress)
    except (ValueError, FileNotFoundError, Aborted, ReconstructionError) as exc:
        bar.close()
        print(f"ptychopv reconstruct: {exc}", file=sys.stderr)
        return 1
    bar.close()
    print(json.dumps({"recon_path": str(out), "engine": rec.engine, "iterations": rec.iterations,
                      "duration_s": round(rec.duration_s, 3), "pixel_size_m": rec.pixel_size_m,
                      "object_shape": list(rec.object.shape), "positions": len(rec.positions_px),
                      "final_loss": float(rec.loss[-1]), "scan_id": rec.scan_id}, indent=2))
    return 0
