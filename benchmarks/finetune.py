"""What the continual-learning fine-tune could buy: levers measured offline on a finished demo.

`ptychopv demo --out DIR` leaves scan B1 and its pty-chi reconstruction, scan B2, both truths
and the registry (v1 = the shipped model). For each variant this script labels B1 from its
reconstruction exactly as the IOC's label job does, fine-tunes v1 on it with the demo's training
options (changed by the variant), and scores v1 and the new model on B1 (the training scan) and
on B2 (another area: the demo's figure) through the chain's own plugins, with the reconstructed
probe as the stitching window, as the demo does. It prints one JSON document.

A variant is ``name:key=value,key=value``. Keys are TrainOptions fields (``epochs``, ``lr_max``,
...) and ``resimulate=N``: N more pairs simulated from the reconstruction itself (the
reconstructed probe at positions between the measured ones, moved by up to half a scan step,
Poisson counts at the measured dose, labels cropped there), to test whether one scan's
reconstruction can stand in for more scans.

    python benchmarks/finetune.py demo-out            # the demo's settings, 4 seeds (~10 min on 2 cores)
    python benchmarks/finetune.py demo-out --variant "demo:" --variant "lr1e-3:lr_max=1e-3"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

# the demo's own settings over training seeds (the split, the order, the augmentation): how
# robust its figure is; the levers of the README's tables are one --variant each
DEFAULT_VARIANTS = ("demo:", "seed 1:seed=1", "seed 2:seed=2", "seed 3:seed=3")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"variant {text!r}: {item!r} is not key=value")
        try:                                   # numbers, true/false, null, lists as JSON
            opts[key.strip()] = json.loads(value)
        except ValueError:                     # a bare word: a string
            opts[key.strip()] = value.strip()
    return name.strip() or "demo", opts


def resimulated(rec, frames: np.ndarray, count: int, fov: int, preprocess, seed: int = 0):
    """``count`` (frame, label) pairs from the reconstruction: see the module's text."""
    from ptychopv.hpc.labels import crop_object, phase_labels
    from ptychopv.science import physics

    rng = np.random.default_rng(seed)
    n = rec.probe.shape[-1]
    step = physics.nearest_neighbour_distance(rec.positions_px)
    pos = rec.positions_px[rng.integers(len(rec.positions_px), size=count)] \
        + rng.uniform(-step / 2, step / 2, size=(count, 2))
    margin = max(n, fov) / 2 + 1
    pos = np.clip(pos, margin, np.array(rec.object.shape) - margin)
    dose = float(frames.reshape(len(frames), -1).sum(axis=1).mean())
    counts = np.concatenate([physics.poisson_counts(physics.diffraction(rec.object, rec.probe, pos[k:k + 256]),
                                                    dose, rng) for k in range(0, count, 256)])
    return np.asarray(preprocess(counts), np.float32), phase_labels(crop_object(rec.object, pos, (fov, fov)))


def run(demo: Path, name: str, opts: dict) -> dict:
    from ptychopv import fidelity
    from ptychopv.demo import FAMILY
    from ptychopv.fidelity import DEMO
    from ptychopv.hpc.corpus import append_pairs
    from ptychopv.hpc.labels import label_scan
    from ptychopv.hpc.reconstruct import read_reconstruction
    from ptychopv.hpc.training import train
    from ptychopv.inference import ModelRegistry, select_engine
    from ptychopv.io.scanfile import read_scan, read_truth
    from ptychopv.science.preprocess import PreprocessOptions, Preprocessor

    opts = dict(opts)
    n_resim = int(opts.pop("resimulate", 0))
    recon = min((demo / "scans").glob("*_recon.h5"))
    rec = read_reconstruction(recon)
    registry = ModelRegistry(demo / "registry", create=False)
    v1 = registry.get(1)
    if 2 not in registry.versions():
        raise SystemExit(f"{demo} has no retrained version (v2): did its demo finish?")
    demo_v2 = registry.get(2)
    card1 = v1.card
    size = int(card1["input_shape"][-1])
    work = Path(tempfile.mkdtemp(prefix="ptychopv-finetune-"))
    try:
        ModelRegistry(work / "registry").publish(v1.onnx_path, v1.publishable_card(), weights_path=v1.weights_path)
        t0 = time.perf_counter()
        pre = Preprocessor(PreprocessOptions(crop=(size, size), binning=1))
        lab = label_scan(recon, work / "corpus.h5", (size, size), net_pixel_m=DEMO.pixel_size_m, preprocess=pre)
        if n_resim:
            x, y = resimulated(rec, read_scan(rec.scan_file).frames, n_resim, size, pre)
            append_pairs(work / "corpus.h5", x, y, None, scan_id=rec.scan_id)
        t1 = time.perf_counter()
        train_opts = {**demo_v2.card["options"], "warm_start": 1, **opts}   # what the demo trained v2 with
        card = train(work / "corpus.h5", work / "registry", train_opts)
        t2 = time.perf_counter()
        reg = ModelRegistry(work / "registry", create=False)
        scores = {}
        for s in (1, 2):
            scan = read_scan(demo / "scans" / f"scan_{s:05d}.h5")
            truth = read_truth(demo / f"scan{s}_truth.h5")
            fs = fidelity.FamilyScan(FAMILY, 0.6, 1e6, scan.frames, scan.positions_m, truth.obj, truth.probe, DEMO)
            for v in (1, 2):
                eng = select_engine(reg.get(v).source(), "onnxruntime")
                try:
                    img = fidelity.live_image(scan.frames, scan.positions_m, eng, pixel_size_m=DEMO.pixel_size_m,
                                              window=rec.probe)
                finally:
                    eng.close()
                scores[f"scan{s}_v{v}"] = fidelity.score(img, fs)["nrmse"]
        gain = (scores["scan2_v1"] - scores["scan2_v2"]) / scores["scan2_v1"]
        return {"variant": name, "options": {**opts, "resimulate": n_resim}, "pairs": lab["pairs"] + n_resim,
                "label_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1), "best_epoch": card["best_epoch"],
                "nrmse": scores, "improvement_scan2": round(gain, 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", type=Path, help="a folder written by `ptychopv demo --out`")
    ap.add_argument("--variant", action="append", help="name:key=value,... (repeatable; default: a set of levers)")
    args = ap.parse_args(argv)
    if not (args.demo / "scans").is_dir() or not (args.demo / "registry" / "v0001").is_dir():
        ap.error(f"{args.demo} is not a finished `ptychopv demo --out` folder (scans/, registry/v0001)")
    rows = []
    for text in args.variant or DEFAULT_VARIANTS:
        name, opts = parse_variant(text)
        print(f"variant {name}: {opts}", file=sys.stderr, flush=True)
        rows.append(run(args.demo, name, opts))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "finetune", "machine": machine(), "demo": str(args.demo), "variants": rows},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
