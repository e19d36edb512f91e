"""What sub-pixel consistency buys the live image: the same scans through the shipped model, stitched
(a) as before this work (the simulator put the probe at the rounded position, the stitcher splatted
bilinearly) and (b) as now (the probe moved by the fraction, the Fourier shift theorem in the
stitcher), and the same with perfect patches (the object itself). Prints JSON.

    python benchmarks/subpixel.py                     # about 1 minute on 2 cores
    python benchmarks/subpixel.py --window-power 1    # the patches weighted by the intensity itself
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

from ptychopv import fidelity
from ptychopv.hpc.labels import crop_object, phase_labels
from ptychopv.inference import ModelRegistry, select_engine
from ptychopv.inference.registry import shipped_registry
from ptychopv.science import physics, samples
from ptychopv.science.stitching import WINDOW_POWER, Stitcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window-power", type=float, default=WINDOW_POWER,
                    help=f"the beam's intensity to this power weights each patch (Stitch:WindowPower, default {WINDOW_POWER})")
    a = ap.parse_args()
    b = fidelity.DEMO
    eng = select_engine(ModelRegistry(shipped_registry(), create=False).latest().source(), "onnxruntime")
    rows = []
    for fam in samples.EVAL_FAMILIES:
        sc = fidelity.family_scan(fam, overlap=0.6, dose=1e6, seed=2024, extent_m=4e-6)
        centres = physics.positions_to_pixels(sc.positions_m, b.pixel_size_m, sc.obj.shape)
        n = b.frame_px
        rounded = physics.poisson_counts(physics.diffraction(sc.obj, sc.probe, np.rint(centres - n / 2) + n / 2),
                                         1e6, np.random.default_rng(2025))
        truth_patches = phase_labels(crop_object(sc.obj, centres, n))
        row = {"family": fam, "frames": len(sc.frames)}
        for name, patches, mode in (
                ("nn_rounded_bilinear", eng.infer(rounded)["phase"], "bilinear"),
                ("nn_subpixel_fourier", eng.infer(sc.frames)["phase"], "fourier"),
                ("perfect_rounded_bilinear", phase_labels(physics.extract_patches(sc.obj, centres, n)), "bilinear"),
                ("perfect_subpixel_fourier", truth_patches, "fourier")):
            st = Stitcher(b.pixel_size_m, window=b.probe(), subpixel=mode, window_power=a.window_power)
            st.add(patches, sc.positions_m)
            row[name] = fidelity.score(st.image(), sc)["nrmse"]
        rows.append(row)
    eng.close()
    print(json.dumps({"benchmark": "subpixel", "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                      "notes": "NRMSE (offset removed) over the scanned area; perfect_* use the object's own "
                               "phase as the patches (bilinear crops at the exact positions for the Fourier case)",
                      "window_power": a.window_power, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
