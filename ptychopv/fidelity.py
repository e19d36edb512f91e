"""How faithful is the live image? Simulated scans of a sample family, pushed through the live
chain's own code, scored against the truth beside calibration images.

- :data:`DEMO`: the shipped model's :class:`~ptychopv.science.physics.Beamline` (8.8 keV, 2 m,
  75 um pixels, 64x64 frames, a 0.5 um focused beam with 4 rad of defocus at its edge).
- :func:`family_scan`: a Fermat scan of a :mod:`ptychopv.science.samples` family at an overlap and dose.
- :func:`live_image`: the frames through the chain's plugins, exactly as the IOC runs them
  (:class:`~ptychopv.plugins.infer.InferPlugin`: preprocess, batches, the engine;
  :class:`~ptychopv.plugins.stitch.StitchPlugin`: the stitcher), without EPICS.
- :func:`calibration_images`: what an image must beat for a score to mean anything: an
  all-zero image, the truth blurred by half a beam, and the truth high-passed (its contrast
  above the beam size removed).
- :func:`score`: NRMSE and SSIM (offset removed; offset and ramp removed as a secondary figure)
  over the scanned, well-covered area (:func:`ptychopv.science.metrics.stitched_scores`).

Numpy and the plugins only: no EPICS, no PyTorch (the engine is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .science import metrics
from .science.physics import Beamline
from .science.samples import fermat_scan
from .science.stitching import StitchedImage


DEMO = Beamline()


@dataclass
class FamilyScan:
    """A simulated scan of one sample and its truth."""

    family: str
    overlap: float
    dose: float
    frames: np.ndarray          # (N, n, n) photon counts
    positions_m: np.ndarray     # (N, 2) (x, y)
    obj: np.ndarray             # complex truth
    probe: np.ndarray
    beamline: Beamline = field(default_factory=Beamline)

    @property
    def truth_phase(self) -> np.ndarray:
        return np.angle(self.obj)

    @property
    def pixel_size_m(self) -> float:
        return self.beamline.pixel_size_m


def family_scan(family: str, *, overlap: float = 0.6, dose: float = 1e6, seed: int = 0,
                extent_m: float = 3e-6, beamline: Beamline = DEMO, size_px: int = 256,
                max_phase: float = 1.0) -> FamilyScan:
    """A Fermat-spiral scan of ``extent_m`` at ``overlap`` (``1 - step/beam``) over a fresh sample of
    ``family`` (seeded), ``dose`` photons per frame, centred on the sample."""
    obj, probe, sim = fermat_scan(family, beamline, overlap=overlap, dose=dose, seed=seed, extent_m=extent_m,
                                  size_px=size_px, max_phase=max_phase)
    return FamilyScan(family, overlap, dose, sim.frames, sim.positions_m, obj, probe, beamline)


def live_image(frames: np.ndarray, positions_m: np.ndarray, engine, *, pixel_size_m: float, window=None,
               scale: float = 1.0, batch_size: int = 16, window_power: float | None = None,
               sharpen: dict | None = None, restorer=None, restore_entry: dict | None = None) -> StitchedImage:
    """The live chain's image of a scan: ``frames`` through the infer and stitch plugins the IOC
    runs (preprocessing with ``scale`` as ``ScaleFactor``, batches of ``batch_size``, ``engine``,
    the stitcher weighted by ``window`` to ``window_power``, ``Stitch:WindowPower``, default the
    IOC's; ``sharpen``: a model card's ``sharpen`` curves, applied as ``Stitch:Sharpen`` On does;
    ``restorer`` with its card entry ``restore_entry``: the model's restorer, applied as
    ``Stitch:Restore`` On does), blocking callbacks so nothing is dropped."""
    return live_images(frames, positions_m, engine, pixel_size_m=pixel_size_m, window=window, scale=scale,
                       batch_size=batch_size, window_power=window_power, sharpen=sharpen, restorer=restorer,
                       restore_entry=restore_entry)[0]


def live_images(frames: np.ndarray, positions_m: np.ndarray, engine, *, pixel_size_m: float, window=None,
                scale: float = 1.0, batch_size: int = 16, refine_probe=None, probe_reconstructed: bool = False,
                probe_reference=None, probe_model=None, refine: dict | None = None,
                window_power: float | None = None, refine_finish=None,
                sharpen: dict | None = None, restorer=None,
                restore_entry: dict | None = None) -> tuple[StitchedImage, StitchedImage | None]:
    """The stitched image (:func:`live_image`) and, with ``refine_probe`` (complex), the refine
    stage's image of the same run: the IOC's refine plugin behind the stitch plugin, with
    ``refine`` as its settings (``revisits``, ``lag``, ``passes``, ``alpha``; ``probe_reconstructed``:
    the probe is a solver's, aligned to ``probe_reference``, the beamline's probe, when given, as the
    IOC does after a reconstruction; ``probe_model``: the beamline model of the probe, which a mend
    searches first, as the IOC gives the model card's; see :meth:`~ptychopv.science.refine.Refiner.set_probe`), including the
    background passes it makes once the stream pauses. ``refine_finish``: called with the
    :class:`~ptychopv.science.refine.Refiner` once every frame is in, in place of its
    :meth:`~ptychopv.science.refine.Refiner.finish` (a benchmark that scores the image sweep by sweep)."""
    from .plugins.frame import Frame
    from .plugins.infer import InferPlugin
    from .plugins.refine import RefinePlugin
    from .plugins.stitch import StitchPlugin
    from .science.preprocess import PreprocessOptions

    infer = InferPlugin("Infer", engine=engine, preprocess=PreprocessOptions(scale=float(scale)),
                        batch_size=batch_size, batch_timeout_s=0.05, queue_size=4 * batch_size,
                        blocking_callbacks=True)
    stitch = StitchPlugin("Stitch", pixel_size_m=pixel_size_m, window=window, queue_size=64,
                          blocking_callbacks=True)
    if window_power is not None:
        stitch.window_power = window_power
    stitch.set_sharpen_curves(sharpen)
    stitch.set_restorer(restorer, restore_entry)
    infer.downstream = [stitch]
    plugins = [infer, stitch]
    ref = None
    if refine_probe is not None:
        ref = RefinePlugin("Refine", seed=stitch.stitcher, queue_size=64, blocking_callbacks=True)
        ref.set_probe(refine_probe, reconstructed=probe_reconstructed, reference=probe_reference,
                      beamline=probe_model)
        for k, v in (refine or {}).items():
            setattr(ref, k, v)
        stitch.downstream = [ref]
        plugins.append(ref)
    for pl in plugins:
        pl.start()
    try:
        for i, (f, p) in enumerate(zip(frames, positions_m)):
            infer.put(Frame(np.asarray(f), unique_id=i + 1, position=(float(p[0]), float(p[1]))))
        for pl in plugins:
            pl.flush()
        if any(pl.error_count for pl in plugins):
            raise RuntimeError("the chain failed: " + "; ".join(pl.last_message for pl in plugins if pl.error_count))
        refined = None
        if ref is not None:
            # the plugin's thread sweeps in the background while it runs; stopped here, the sweeps
            # below are all there are (a benchmark's count of them is then exact)
            if not ref.stop(timeout=10):
                raise RuntimeError("the refine plugin's thread did not stop")
            if refine_finish is not None:
                refine_finish(ref.refiner)
            else:
                ref.refiner.finish()        # what the plugin does in the background once frames pause
            refined = ref.image()
        return stitch.image(), refined
    finally:
        for pl in plugins:
            pl.stop(timeout=10)


def _on_grid(img: np.ndarray, stitched: StitchedImage, pixel_size_m: float) -> np.ndarray:
    return metrics.truth_on_grid(img, pixel_size_m, stitched.origin_m, stitched.pixel_size_m, stitched.phase.shape)


def calibration_images(scan: FamilyScan, like: StitchedImage) -> dict[str, StitchedImage]:
    """Reference images on ``like``'s grid (and with its weights): ``zero``, ``blurred`` (the truth
    through a Gaussian of sigma = beam/2) and ``highpass`` (the truth minus that blur)."""
    truth = scan.truth_phase
    sigma = scan.beamline.beam_px / 2
    blurred = ndimage.gaussian_filter(truth, sigma)
    out = {"zero": np.zeros_like(like.phase), "blurred": _on_grid(blurred, like, scan.pixel_size_m),
           "highpass": _on_grid(truth - blurred, like, scan.pixel_size_m)}
    return {k: like._replace(phase=np.nan_to_num(v).astype(np.float32)) for k, v in out.items()}


def score(image: StitchedImage, scan: FamilyScan, *, fraction: float = 0.1) -> dict:
    """:func:`ptychopv.science.metrics.stitched_scores` of ``image`` over the scanned area of ``scan``."""
    s = metrics.stitched_scores(image, scan.truth_phase, scan.pixel_size_m, fraction=fraction,
                                positions_m=scan.positions_m)
    return {k: round(float(v), 4) for k, v in s.items()}


def chain_stitching(engine, **kw):
    """``stitched_of(frames, positions_m, pixel_size_m, window)``: a scan through the chain's own
    plugins with ``engine`` (:func:`live_image`, ``kw`` its options such as ``window_power`` or
    ``sharpen``), as :func:`ptychopv.science.sharpen.calibrate` and
    :func:`ptychopv.science.restore.training_images` take it."""
    def stitched_of(frames, positions_m, pixel_size_m, window):
        return live_image(frames, positions_m, engine, pixel_size_m=pixel_size_m, window=window, **kw)

    return stitched_of


def _restorer_rounds(job: tuple, progress=None) -> list[dict]:
    """One process's share of :func:`restorer_training_images`: ``job`` is (registry root,
    version, curves, beamline, families, first round, rounds, engine options)."""
    from .inference import ModelRegistry, select_engine
    from .science import restore

    root, version, curves, beamline, families, first, count, options = job
    engine = select_engine(ModelRegistry(root, create=False).get(version).source(), "onnxruntime",
                           options={"onnxruntime": options})
    try:
        return restore.training_images(chain_stitching(engine, sharpen=curves), beamline, families=families,
                                       scans_per_case=count, first_round=first, progress=progress)
    finally:
        engine.close()


def restorer_training_images(registry_root, version: int, *, curves, beamline: Beamline, families=None,
                             rounds: int, workers: int = 1, progress=None) -> list[dict]:
    """The training images of a model's restorer (:func:`ptychopv.science.restore.training_images`,
    ``rounds`` rounds, its default data seed): each scan stitched through the chain's plugins with model
    ``version`` of the registry at ``registry_root`` (ONNX Runtime) and sharpened by ``curves``
    (a card's ``sharpen`` entry, or None). ``workers`` > 1 splits the rounds between that many
    processes, each with its own one-thread session: the same images as one process makes, to
    float rounding. Inference on the CPU (ONNX Runtime's CPU provider), as on the build machine
    where the shipped restorer was trained, whatever GPU the host has. ValueError for an
    evaluation family, before any process starts."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from .science import samples

    samples.training_families(families, "train")
    if workers <= 1:
        return _restorer_rounds((registry_root, version, curves, beamline, families, 0, rounds,
                                 {"providers": "cpu"}), progress)
    cuts = [rounds * i // workers for i in range(workers + 1)]
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    options = {"providers": "cpu", "threads": 1, "spin": False}
    jobs = [(str(registry_root), version, curves, beamline, families, a, b - a, options) for a, b in spans]
    out: list[dict] = []
    # spawn: a fresh interpreter per worker, not a fork of one that holds ONNX Runtime's threads
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for (a, b), part in zip(spans, pool.map(_restorer_rounds, jobs)):
            out += part
            if progress:
                progress(f"rounds {a + 1}-{b} of {rounds}: {len(out)} images")
    return out


def calibrate_sharpen(engine, *, beamline: Beamline = DEMO, window_power: float | None = None, **kw) -> dict:
    """A model card's ``sharpen`` entry (:func:`ptychopv.science.sharpen.calibrate`, ``kw`` its
    options), each scan stitched by :func:`live_image` with ``engine``: the chain's own plugins."""
    from .science import sharpen

    return sharpen.calibrate(chain_stitching(engine, window_power=window_power), beamline,
                             window_power=window_power, **kw)


def stitched(patches: np.ndarray, scan: FamilyScan, window=None) -> StitchedImage:
    """Patches (one per frame, e.g. a reconstruction's crops) stitched the live chain's way."""
    from .science.stitching import Stitcher

    st = Stitcher(scan.pixel_size_m, window=window)
    st.add(patches, scan.positions_m)
    return st.image()
