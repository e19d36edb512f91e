"""Measure a model's sharpening curves and write them on its card (``card["sharpen"]``).

    python scripts/calibrate_sharpen.py                       # the shipped generic model, every version
    python scripts/calibrate_sharpen.py --registry REG --version 3

The network's stitched image is softer than the truth where patches overlap
(:mod:`ptychopv.science.sharpen`). This script measures, for each overlap in ``--overlaps``, the
radial gain that best maps the stitched image to the truth, on ``--scans`` scans of each
*training* family (never an evaluation family) simulated for the beamline on the model's card,
through the chain's own plugins (:func:`ptychopv.fidelity.calibrate_sharpen`). The IOC's stitch
stage applies the curve of the overlap nearest the scan's (``Stitch:Sharpen``). A model the loop
fine-tunes from a version with a curve gets its own from the training job, measured the same way.

About 8 s per version on 2 CPU cores (3 overlaps x 10 scans of 4 um: 2 of each of the five
default families; 23 s for generic v1-v3 on 2026-12-04). The families default to those the card's
curves were measured on, else to ``samples.FIT_FAMILIES``; the other settings are this script's
options, whose defaults made the shipped curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path, help="model registry (default: the shipped generic one)")
    ap.add_argument("--version", type=int, nargs="*", help="versions (default: all)")
    ap.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    ap.add_argument("--families", nargs="+", help="training families (default: those the card's curves were "
                    "measured on; for a card without curves, samples.FIT_FAMILIES)")
    ap.add_argument("--scans", type=int, default=2, help="scans of each family at each overlap")
    ap.add_argument("--extent", type=float, default=4e-6, help="scan diameter (m)")
    ap.add_argument("--dry-run", action="store_true", help="print the entry, do not write it")
    a = ap.parse_args(argv)
    if a.scans < 1:
        ap.error("--scans must be >= 1")
    if any(not (0.0 <= o < 1.0) for o in a.overlaps):
        ap.error("--overlaps must be in [0, 1)")
    from ptychopv import fidelity
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.inference.registry import shipped_registry
    from ptychopv.science import samples

    reg = ModelRegistry(a.registry or shipped_registry("generic"), create=False)
    versions = a.version or reg.versions()
    if not versions:
        print(f"{reg.root} holds no model", file=sys.stderr)
        return 1
    for v in versions:
        mv = reg.get(v)
        beam = fidelity.Beamline.from_card(mv.card)
        if beam is None:
            print(f"v{v}: no beamline on its card: cannot simulate its scans", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        engine = select_engine(mv.source(), "onnxruntime")
        try:
            families = a.families or samples.recorded_families(mv.card.get("sharpen"), "calibrated_on")
            entry = fidelity.calibrate_sharpen(engine, beamline=beam, overlaps=a.overlaps, families=families,
                                               scans_per_family=a.scans, extent_m=a.extent)
        except ValueError as exc:
            print(f"v{v}: {exc}", file=sys.stderr)
            return 1
        finally:
            engine.close()
        entry["calibrated_on"]["seconds"] = round(time.perf_counter() - t0, 1)
        if a.dry_run:
            print(json.dumps({"version": v, "sharpen": entry}))
        else:
            reg.annotate(v, "sharpen", entry)
            print(f"v{v}: sharpen curves at overlaps {', '.join(entry['by_overlap'])} written "
                  f"({entry['calibrated_on']['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
