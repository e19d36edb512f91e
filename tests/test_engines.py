"""Inference engines: parity with PyTorch, batching, bad input, selection, no-torch edge use."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="building test models needs torch")

from ptychopv.inference.engines import AUTO_ORDER, ModelSource, available_engines, select_engine
from ptychopv.inference.engines.base import Engine
from ptychopv.inference.export import export_onnx, save_weights
from ptychopv.inference.networks import build_model
from ptychopv.inference.preprocessing import normalize

SPEC = {"transform": "log1p", "divisor": 7.0}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    model = build_model("ptychonn2", 64, width=8).eval()
    export_onnx(model, folder / "model.onnx")
    save_weights(model, folder / "weights.pt")
    return model, folder


@pytest.fixture
def source(model_files):
    _, folder = model_files
    return ModelSource.from_onnx(folder / "model.onnx", preprocessing=SPEC,
                                 weights_path=folder / "weights.pt")


def frames(b, seed=0):
    return np.random.default_rng(seed).poisson(20.0, (b, 64, 64)).astype(np.float32)


def reference(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(normalize(x, SPEC)[:, None]))[:, 0].numpy()


def runnable(name, source):
    reason = available_engines(source)[name]
    if reason:
        pytest.skip(f"{name} cannot run here: {reason}")


@pytest.mark.parametrize("name", list(AUTO_ORDER))
def test_each_engine_matches_pytorch(name, source, model_files):
    runnable(name, source)
    engine = select_engine(source, name, batch_sizes=(1, 4, 8))
    engine.warmup()
    # fp16 engines (TensorRT, PyTorch CUDA) agree to a few 1e-3 rad; fp32 ones to float tolerance
    tol = 5e-2 if engine.describe()["precision"] != "fp32" else 1e-4
    for b in (1, 3, 8, 11):  # 3 and 11: padded / split where an engine needs fixed batches
        x = frames(b, seed=b)
        out = engine.infer(x)
        assert out["phase"].shape == (b, 64, 64) and out["phase"].dtype == np.float32
        assert out["valid"].all()
        np.testing.assert_allclose(out["phase"], reference(model_files[0], x), atol=tol)
    info = engine.describe()
    assert info["engine"] == name and info["input_size"] == 64 and info["loaded"]
    engine.close()


def test_tensorrt_engine_caches_its_plan(source, tmp_path):
    runnable("tensorrt", source)
    first = select_engine(source, "tensorrt", options={"tensorrt": {"cache_dir": tmp_path}})
    assert first.plan_built and first.plan_path.parent == tmp_path
    second = select_engine(source, "tensorrt", options={"tensorrt": {"cache_dir": tmp_path}})
    assert not second.plan_built and second.plan_path == first.plan_path
    first.close()
    second.close()


def test_pytorch_cuda_engine_uses_graphs_per_batch_size(source):
    runnable("pytorch-cuda", source)
    engine = select_engine(source, "pytorch-cuda", batch_sizes=(2, 8))
    assert engine.describe()["graphs"] == [2, 8]
    assert engine.infer(frames(5))["phase"].shape == (5, 64, 64)


@pytest.mark.parametrize("name", ["onnxruntime", "pytorch-cpu"])
def test_nan_frames_are_masked_and_the_rest_inferred(name, source, model_files):
    engine = select_engine(source, name)
    x = frames(4)
    x[1, 5, 5] = np.nan
    x[3, 0, 0] = np.inf
    out = engine.infer(x)
    assert out["valid"].tolist() == [True, False, True, False]
    assert np.isnan(out["phase"][[1, 3]]).all()
    good = reference(model_files[0], x[[0, 2]])
    np.testing.assert_allclose(out["phase"][[0, 2]], good, atol=1e-4)


def test_nan_policy_raise_names_the_frames(source):
    engine = select_engine(source, "onnxruntime", on_nonfinite="raise")
    x = frames(5)
    x[2, 1, 1] = np.nan
    x[4, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"frame\(s\) \[2, 4\] of a batch of 5"):
        engine.infer(x)
    with pytest.raises(ValueError, match="on_nonfinite"):
        select_engine(source, "onnxruntime", on_nonfinite="ignore")


@pytest.mark.parametrize("name", ["onnxruntime", "pytorch-cpu"])
def test_bad_batches_are_clear_errors(name, source):
    engine = select_engine(source, name)
    with pytest.raises(ValueError, match="frames are 128x128 but the model expects 64x64"):
        engine.infer(np.zeros((2, 128, 128), np.float32))
    with pytest.raises(ValueError, match=r"for one frame pass frame\[None\]"):
        engine.infer(np.zeros((64, 64), np.float32))
    with pytest.raises(TypeError, match="real numbers"):
        engine.infer(np.zeros((1, 64, 64), np.complex64))
    ints = engine.infer(np.full((2, 64, 64), 20, np.uint16))  # detector integers are fine
    assert ints["phase"].shape == (2, 64, 64)
    empty = engine.infer(np.zeros((0, 64, 64), np.float32))
    assert empty["phase"].shape == (0, 64, 64) and empty["valid"].shape == (0,)


def test_truncated_onnx_file_is_a_clear_error(model_files, tmp_path):
    data = (model_files[1] / "model.onnx").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    src = ModelSource(input_size=64, onnx_path=bad)
    with pytest.raises(ValueError, match="truncated or not a valid ONNX model"):
        select_engine(src, "onnxruntime")
    with pytest.raises(ValueError, match="truncated or not a valid ONNX model"):
        select_engine(src, "auto")  # a corrupt model is not silently skipped
    with pytest.raises(ValueError, match="does not exist"):
        select_engine(ModelSource(input_size=64, onnx_path=tmp_path / "nope.onnx"), "onnxruntime")


def test_passthrough_engine_is_a_registered_engine_with_the_same_contract():
    engine = select_engine(ModelSource(input_size=16), "passthrough")
    x = np.random.default_rng(0).poisson(50, (3, 16, 16)).astype(np.float32)
    x[1, 2, 3] = np.nan
    out = engine.infer(x)
    assert out["valid"].tolist() == [True, False, True] and np.isnan(out["phase"][1]).all()
    expected = x[0] / x[0].max() * np.pi
    np.testing.assert_allclose(out["phase"][0], expected, rtol=1e-6)
    assert "passthrough" not in AUTO_ORDER       # never chosen for a real model


def test_card_that_disagrees_with_the_file_is_refused(model_files):
    src = ModelSource(input_size=128, onnx_path=model_files[1] / "model.onnx")
    with pytest.raises(ValueError, match="do not match the model card"):
        select_engine(src, "onnxruntime")


def test_auto_selection_reports_what_it_took_and_why(source):
    engine = select_engine(source, "auto")
    sel = engine.describe()["selection"]
    assert sel[-1] == {"engine": engine.name, "chosen": True}
    reasons = available_engines(source)
    skipped = [s["engine"] for s in sel[:-1]]
    assert skipped == [n for n in AUTO_ORDER if n != engine.name][: len(skipped)]
    assert all(s["reason"] for s in sel[:-1])
    if reasons["tensorrt"] is None:
        assert engine.name == "tensorrt"
    elif reasons["pytorch-cuda"] is None:
        assert engine.name == "pytorch-cuda"
    else:
        assert engine.name == "onnxruntime"
    with pytest.raises(ValueError, match="unknown engine 'openvino'"):
        select_engine(source, "openvino")


def test_engine_without_weights_or_onnx_says_why(model_files):
    no_weights = ModelSource(input_size=64, onnx_path=model_files[1] / "model.onnx")
    with pytest.raises(RuntimeError, match="pytorch-cpu: the model has no PyTorch weights"):
        select_engine(no_weights, "pytorch-cpu")
    with pytest.raises(RuntimeError, match="onnxruntime: the model has no ONNX file"):
        select_engine(ModelSource.from_module(model_files[0]), "onnxruntime")


def test_two_headed_model_returns_amplitude_and_phase(tmp_path):
    torch.manual_seed(0)
    model = build_model("ptychonn", 64, width=4).eval()
    export_onnx(model, tmp_path / "m.onnx")
    x = frames(3)
    outs = {n: select_engine(src, n).infer(x) for n, src in
            [("onnxruntime", ModelSource.from_onnx(tmp_path / "m.onnx")),
             ("pytorch-cpu", ModelSource.from_module(model))]}
    with torch.no_grad():
        amp, phase = model(torch.from_numpy(x[:, None]))
    for out in outs.values():
        np.testing.assert_allclose(out["amplitude"], amp[:, 0].numpy(), atol=1e-4)
        np.testing.assert_allclose(out["phase"], phase[:, 0].numpy(), atol=1e-4)


@pytest.mark.parametrize("sessions", [1, 2, 3])
def test_onnxruntime_splits_a_batch_over_its_sessions_in_order(sessions, source, model_files):
    """The CPU sessions each take a contiguous part of the batch: every frame's result comes
    back in its place (frames differ, so a swap would show), for batches smaller than, equal to
    and larger than the sessions, and for a two-headed model."""
    from ptychopv.inference.engines.onnxrt import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(source, providers="cpu", threads=3, sessions=sessions).load()
    assert engine.describe()["sessions"] == sessions
    for b in (1, 2, 3, 8, 11):
        x = frames(b, seed=10 + b)
        np.testing.assert_allclose(engine.infer(x)["phase"], reference(model_files[0], x), atol=1e-4)
    # the further sessions' threads carry their OS name, so top -H and /proc show inference's CPU
    pool = [t.native_id for t in engine._pool._threads] if engine._pool else []
    assert len(pool) == sessions - 1
    assert all(Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "ort-session" for tid in pool)
    engine.close()
    assert engine._pool is None and engine._others == []


def test_onnxruntime_sessions_default_to_two_on_two_cpus_and_never_exceed_the_threads(source, tmp_path):
    from ptychopv.inference.engines.onnxrt import OnnxRuntimeEngine

    assert OnnxRuntimeEngine(source, providers="cpu", threads=2).load().describe()["sessions"] == 2
    assert OnnxRuntimeEngine(source, providers="cpu", threads=1).load().describe()["sessions"] == 1
    assert OnnxRuntimeEngine(source, providers="cpu", threads=1, sessions=4).load().describe()["sessions"] == 1
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="sessions must be an integer >= 1"):
            OnnxRuntimeEngine(source, sessions=bad)
    torch.manual_seed(0)
    model = build_model("ptychonn", 64, width=4).eval()
    export_onnx(model, tmp_path / "m.onnx")
    two = OnnxRuntimeEngine(ModelSource.from_onnx(tmp_path / "m.onnx"), providers="cpu", threads=2, sessions=2)
    x = frames(5)
    out = two.infer(x)
    with torch.no_grad():
        amp, phase = model(torch.from_numpy(x[:, None]))
    np.testing.assert_allclose(out["amplitude"], amp[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["phase"], phase[:, 0].numpy(), atol=1e-4)
    two.close()


@pytest.mark.parametrize("sessions", [1, 2, 3])
def test_onnxruntime_submit_runs_whole_batches_side_by_side_on_their_own_sessions(sessions, source, model_files):
    """``submit``: each session infers whole batches on its own worker, so as many batches as
    sessions run at once (``pipeline_depth``). Every batch's result is its own, in its frames'
    order; a bad batch fails its own Future only; one session infers alone."""
    from ptychopv.inference.engines.onnxrt import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(source, providers="cpu", threads=3, sessions=sessions).load()
    assert engine.pipeline_depth == sessions
    batches = [frames(b, seed=40 + i) for i, b in enumerate((1, 3, 8, 5, 2, 8))]
    futures = [engine.submit(x) for x in batches]
    bad = engine.submit(np.full((2, 64, 64), np.nan, np.float32)[:, :8])     # wrong size: refused
    for x, f in zip(batches, futures):
        out = f.result(timeout=60)
        np.testing.assert_allclose(out["phase"], reference(model_files[0], x), atol=1e-4)
        assert out["valid"].all()
    with pytest.raises(ValueError, match="the model expects 64x64"):
        bad.result(timeout=60)
    if sessions > 1:
        # one worker per session, each named, each on a session of its own
        workers = list(engine._workers._threads)
        assert 1 <= len(workers) <= sessions
        assert all(Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip() == "ort-worker"
                   for t in workers)
    else:
        assert engine._workers is None       # nothing to run beside: inferred in the caller's thread
    # a worker uses its own session only: the batch is not split again across the others
    calls = []
    for s in (engine._session, *engine._others):
        run = s.run
        s.run = (lambda run: lambda *a, **k: (calls.append(1), run(*a, **k))[1])(run)
    engine.submit(frames(6)).result(timeout=60)
    assert len(calls) == 1
    engine.close()
    assert engine._workers is None


class _Recorder(Engine):
    """A fixed-batch engine that records the batch sizes it is given."""

    name = "recorder"
    fixed_batches = True

    def _load(self):
        self.seen = []

    def _run(self, x):
        self.seen.append(len(x))
        return {"phase": x[:, 0] * 2}


def test_fixed_batch_engines_pad_and_split():
    eng = _Recorder(ModelSource(input_size=64), batch_sizes=(1, 4, 8))
    x = frames(19)
    out = eng.infer(x)
    assert eng.seen == [8, 8, 4]  # 19 = 8 + 8 + 3 padded to 4
    np.testing.assert_array_equal(out["phase"], x * 2)
    eng.infer(frames(2))
    assert eng.seen[-1] == 4


def test_onnxruntime_engine_runs_without_torch(model_files):
    onnx = model_files[1] / "model.onnx"
    code = f"""
import sys
sys.modules["torch"] = None  # any 'import torch' now fails
import numpy as np
from ptychopv.inference import ModelSource, select_engine
eng = select_engine(ModelSource(input_size=64, onnx_path={str(onnx)!r}), "auto")
out = eng.infer(np.ones((3, 64, 64), np.float32))
assert out["phase"].shape == (3, 64, 64), out["phase"].shape
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print(eng.name, [s["engine"] for s in eng.selection])
"""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "onnxruntime" or "tensorrt" in done.stdout



def test_preprocessing_prepended_to_the_onnx_graph_matches_the_host(model_files, tmp_path):
    pytest.importorskip("onnx", reason="prepending preprocessing needs the onnx package")
    from ptychopv.inference.engines.onnxrt import open_session
    from ptychopv.inference.export import prepend_preprocessing

    for spec in (SPEC, {"transform": "linear", "divisor": 300.0}, None):
        pre = prepend_preprocessing(model_files[1] / "model.onnx", tmp_path / "pre.onnx", spec)
        x = frames(3)[:, None]
        x[0, 0, 0, 0] = -4.0  # negative counts (dark-subtracted) are clamped at 0, as on the host
        raw, valid = open_session(pre).run(None, {"input_raw": x})
        host = open_session(model_files[1] / "model.onnx").run(None, {"input": normalize(x, spec)})[0]
        np.testing.assert_allclose(raw, host, atol=1e-5)
        assert valid.tolist() == [1.0, 1.0, 1.0]


def test_prepended_graph_keeps_65535_finite_and_flags_nan_frames(model_files, tmp_path):
    """Counts of 65520 and more are inf in float16: the graph's first layers must see them in
    float32 (TensorRT: pinned FP32, probed at load). A bad frame is zeroed, not propagated."""
    pytest.importorskip("onnx", reason="prepending preprocessing needs the onnx package")
    from ptychopv.inference.engines.onnxrt import open_session
    from ptychopv.inference.export import PRE_PREFIX, prepend_preprocessing

    pre = prepend_preprocessing(model_files[1] / "model.onnx", tmp_path / "pre.onnx", SPEC)
    x = frames(4)[:, None]
    x[0, 0, :8, :8] = 65535.0
    x[2, 0, 3, 3] = np.nan
    x[3, 0, 0, 0] = -np.inf
    session = open_session(pre)
    phase, valid = session.run(None, {"input_raw": x})
    assert valid.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert np.isfinite(phase).all()  # the NaN and inf frames were zeroed before the network
    zeroed = x.copy()
    zeroed[2:] = 0
    host = open_session(model_files[1] / "model.onnx").run(None, {"input": normalize(zeroed, SPEC)})[0]
    np.testing.assert_allclose(phase, host, atol=1e-5)
    import onnx

    added = [n.name for n in onnx.load(str(pre)).graph.node if n.name.startswith(PRE_PREFIX)]
    assert len(added) >= 10  # every added node named under the prefix (TensorRT pins them)


class _DeviceNormalising(_Recorder):
    def _load(self):
        super()._load()
        self.device_preprocessing = True

    def _run(self, x):
        self.got = x.copy()
        return {"phase": x[:, 0].astype(np.float32)}


def test_device_preprocessing_engines_get_raw_frames_with_bad_ones_zeroed():
    eng = _DeviceNormalising(ModelSource(input_size=64, preprocessing=SPEC), batch_sizes=(4,))
    x = frames(3).astype(np.uint16)
    out = eng.infer(x)
    assert eng.got.dtype == np.uint16 and eng.got.shape == (4, 1, 64, 64)  # padded, not normalised
    np.testing.assert_array_equal(eng.got[:3, 0], x)
    y = frames(2)
    y[1, 0, 0] = np.nan
    out = eng.infer(y)
    assert out["valid"].tolist() == [True, False] and not eng.got[1].any()
    np.testing.assert_array_equal(eng.got[0, 0], y[0])
    assert eng.describe()["device_preprocessing"] is True


# ---------------------------------------------------------------- failed loads and warm-ups
class _Ledger:
    """What the fake engines below allocated and released."""

    def __init__(self):
        self.held: list[str] = []
        self.closed: list[str] = []


class _FakeGPU(Engine):
    """Allocates on load, then fails where it is told to (``fail``: load, value, warmup)."""

    name = "fake"
    fail = None
    ledger: _Ledger

    def _load(self):
        self.ledger.held.append(self.name)  # e.g. pinned buffers, device memory, a stream
        if self.fail == "load":
            raise RuntimeError("TensorRT build failed")
        if self.fail == "value":
            raise ValueError("engine I/O does not match the model card")

    def _run(self, x):
        if self.fail == "warmup":
            raise RuntimeError("CUDA out of memory at batch 64")
        return {"phase": x[:, 0].astype(np.float32)}

    def close(self):
        if self.name in self.ledger.held:
            self.ledger.held.remove(self.name)
        self.ledger.closed.append(self.name)
        super().close()


@pytest.fixture
def fake_engines(monkeypatch):
    """``select_engine`` over three fakes: ``first`` and ``second`` fail as a test sets them."""
    import ptychopv.inference.engines as engines

    ledger = _Ledger()
    classes = {n: type(f"Fake_{n}", (_FakeGPU,), {"name": n, "ledger": ledger})
               for n in ("first", "second", "third")}
    monkeypatch.setattr(engines, "AUTO_ORDER", tuple(classes))
    monkeypatch.setattr(engines, "engine_class", lambda name: classes[name])
    return classes, ledger


def test_failed_load_is_closed_and_the_next_engine_taken(fake_engines):
    classes, ledger = fake_engines
    classes["first"].fail = "load"
    engine = select_engine(ModelSource(input_size=64), "auto")
    assert engine.name == "second"
    assert set(ledger.closed) == {"first"} and ledger.held == ["second"]  # nothing of "first" left
    assert engine.selection[0] == {"engine": "first", "reason": "failed to load: TensorRT build failed"}


def test_failed_warmup_is_closed_and_falls_back(fake_engines):
    classes, ledger = fake_engines
    classes["first"].fail = "warmup"
    classes["second"].fail = "warmup"
    engine = select_engine(ModelSource(input_size=64), "auto", warmup=True, batch_sizes=(2,))
    assert engine.name == "third" and ledger.held == ["third"]
    assert ledger.closed == ["first", "second"]
    assert [s.get("reason", "") for s in engine.selection[:2]] == \
        ["failed to warm up: CUDA out of memory at batch 64"] * 2
    # An engine asked for by name: closed, and the error says why.
    with pytest.raises(RuntimeError, match="first: failed to warm up: CUDA out of memory"):
        select_engine(ModelSource(input_size=64), "first", warmup=True, batch_sizes=(2,))
    assert ledger.closed[-1] == "first" and ledger.held == ["third"]


def test_bad_model_is_raised_after_the_engine_is_closed(fake_engines):
    classes, ledger = fake_engines
    classes["first"].fail = "value"
    with pytest.raises(ValueError, match="does not match the model card"):
        select_engine(ModelSource(input_size=64), "auto")
    assert ledger.held == [] and set(ledger.closed) == {"first"}


def test_engine_load_closes_itself_when_it_fails(fake_engines):
    classes, ledger = fake_engines
    classes["first"].fail = "load"
    engine = classes["first"](ModelSource(input_size=64))
    with pytest.raises(RuntimeError, match="TensorRT build failed"):
        engine.load()  # called directly, not through select_engine
    assert ledger.held == [] and ledger.closed == ["first"]
    assert not engine.describe()["loaded"]


# ---------------------------------------------------------------- frames straight into buffers
def test_a_list_of_frames_is_checked_and_inferred_like_a_batch(source):
    engine = select_engine(source, "onnxruntime")
    x = frames(3)
    as_list = engine.infer(list(x))
    np.testing.assert_array_equal(as_list["phase"], engine.infer(x)["phase"])
    with pytest.raises(ValueError, match="frames are 32x32 but the model expects 64x64"):
        engine.infer([x[0], np.zeros((32, 32), np.float32)])
    with pytest.raises(ValueError, match=r"frame 1 of the list has shape \(1, 64, 64\)"):
        engine.infer([x[0], x[1:2]])
    with pytest.raises(TypeError, match="real numbers"):
        engine.infer([x[0].astype(np.complex64)])
    assert engine.infer([])["phase"].shape == (0, 64, 64)


def test_staging_converts_in_one_pass_and_zeroes_the_padding():
    from ptychopv.inference.engines.base import stage_frames, staging_dtype

    x = frames(3).astype(np.uint16)
    assert staging_dtype(x) == np.uint16 and staging_dtype(list(x.astype(np.uint8))) == np.uint16
    assert staging_dtype(x, integers=None) == np.float32  # TensorRT has no uint16 tensors
    assert staging_dtype([x[0], x[1].astype(np.float32)]) == np.float32
    dst = np.full((4, 64, 64), 7.0, np.float32)
    stage_frames(dst, list(x), 1, 2)
    np.testing.assert_array_equal(dst[:2], x[1:3])
    assert not dst[2:].any()
    stage_frames(dst, x, 0, 3)
    np.testing.assert_array_equal(dst[:3], x)


class _DeviceChecking(_Recorder):
    """Stages like a GPU engine and reports non-finite frames as its device would."""

    def _load(self):
        super()._load()
        self.device_preprocessing = self.device_checks = True

    def _run_frames(self, frames):
        from ptychopv.inference.engines.base import stage_frames

        self.seen.append(type(frames).__name__)
        x = np.empty((len(frames), 64, 64), np.float32)
        stage_frames(x, frames, 0, len(frames))
        valid = np.isfinite(x).all(axis=(1, 2))
        return {"phase": np.where(valid[:, None, None], x, 0) * 2, "valid": valid}


def test_device_checks_engines_get_the_frames_unstacked_and_report_bad_ones():
    eng = _DeviceChecking(ModelSource(input_size=64, preprocessing=SPEC), batch_sizes=(4,))
    x = frames(3)
    x[1, 2, 2] = np.inf
    out = eng.infer(list(x))
    assert eng.seen == ["list"]  # no np.stack on the host
    assert out["valid"].tolist() == [True, False, True]
    assert np.isnan(out["phase"][1]).all()
    np.testing.assert_array_equal(out["phase"][[0, 2]], x[[0, 2]] * 2)
    strict = _DeviceChecking(ModelSource(input_size=64), on_nonfinite="raise")
    with pytest.raises(ValueError, match=r"frame\(s\) \[1\] of a batch of 3"):
        strict.infer(x)


# ---------------------------------------------------------------- the PyTorch CUDA pipeline, on the CPU
def _cuda_pipeline_on_cpu(source, **kw):
    """The PyTorch CUDA engine's staging, device-side checks and forward pass, run on the CPU
    (``device="cpu"``: no streams, pinned memory or graphs)."""
    from ptychopv.inference.engines.pytorch import PyTorchCUDAEngine

    cls = type("CPUPipeline", (PyTorchCUDAEngine,), {"unavailable": classmethod(lambda c, s: None)})
    return cls(source, device="cpu", **kw).load()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pytorch_cuda_pipeline_stages_uint16_and_checks_frames_on_the_device(precision, source,
                                                                              model_files):
    engine = _cuda_pipeline_on_cpu(source, precision=precision, batch_sizes=(1, 2, 4))
    weights = next(engine._model.parameters()).dtype
    assert weights == (torch.float16 if precision == "fp16" else torch.float32)  # model.half()
    tol = 5e-2 if precision == "fp16" else 1e-4
    x = frames(11).astype(np.uint16)  # 4 + 4 + 3 (padded to 4): both staging slots reused
    x[3, 0, 0] = 65535  # int16 storage on the way, 0..65535 again on the device
    out = engine.infer(x)
    assert out["valid"].all() and np.isfinite(out["phase"]).all()
    np.testing.assert_allclose(out["phase"], reference(model_files[0], x), atol=tol)
    y = frames(5)
    y[2, 1, 1] = np.nan
    out = engine.infer(list(y))
    assert out["valid"].tolist() == [True, True, False, True, True]
    assert np.isnan(out["phase"][2]).all()
    good = [0, 1, 3, 4]
    np.testing.assert_allclose(out["phase"][good], reference(model_files[0], y[good]), atol=tol)
    engine.warmup(batch_sizes=(1,), repeats=1)  # float32 and uint16 zeros
    engine.close()
    assert engine._runners == {} and engine._slots == []


def test_pytorch_cuda_graphs_are_captured_thread_local(source, monkeypatch):
    """The capture mode a hot swap needs (the plugin thread keeps inferring meanwhile)."""
    import contextlib

    from ptychopv.inference.engines import pytorch

    engine = _cuda_pipeline_on_cpu(source, batch_sizes=(2,))
    captures = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

        def reset(self):
            captures.append("reset")

    @contextlib.contextmanager
    def graph(g, **kw):
        captures.append(kw)
        yield

    for name, value in {"Stream": Stream, "current_stream": Stream, "CUDAGraph": Graph,
                        "graph": graph, "stream": lambda s: contextlib.nullcontext()}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    engine.cuda_graphs = True
    runner = pytorch._Runner(engine, 2)
    assert captures == [{"capture_error_mode": "thread_local"}]
    assert len(runner.run()) == 2  # phase and valid
    runner.release()
    assert captures[-1] == "reset"


# ---------------------------------------------------------------- TensorRT, against fakes
# The fakes stand for TensorRT 10 and cuda-python as their documentation describes them; the
# fake "plan" runs the preprocessed ONNX graph with ONNX Runtime, optionally with its input
# rounded to float16 first (a plan whose first layers did not stay FP32).
class _FakeCudart:
    class cudaError_t:  # noqa: N801 - the names cuda-python uses
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    cudaStreamNonBlocking = 1
    cudaEventDefault = 0
    cudaEventDisableTiming = 2

    def __init__(self):
        self.live: dict[int, tuple] = {}
        self.stream_flags: list[int] = []
        self.fail_malloc_after: int | None = None  # device allocations before one fails
        self._next = 1

    def _new(self, kind, size=0):
        import ctypes

        buf = ctypes.create_string_buffer(max(size, 1))
        ptr = ctypes.addressof(buf) if size else 10**6 + self._next
        self._next += 1
        self.live[ptr] = (kind, buf)
        return ptr

    def _free(self, ptr):
        self.live.pop(ptr)
        return (0,)

    def cudaMallocHost(self, n):
        return 0, self._new("host", n)

    def cudaMalloc(self, n):
        if self.fail_malloc_after is not None:
            if self.fail_malloc_after == 0:
                return 2, None
            self.fail_malloc_after -= 1
        return 0, self._new("device", n)

    def cudaStreamCreateWithFlags(self, flags):
        self.stream_flags.append(flags)
        return 0, self._new("stream")

    def cudaEventCreateWithFlags(self, flags):
        return 0, self._new("event")

    cudaFreeHost = cudaFree = cudaStreamDestroy = cudaEventDestroy = _free

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        import ctypes

        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaEventElapsedTime(self, a, b):
        return 0, 0.25

    def cudaGetErrorString(self, err):
        return 0, b"fake CUDA error"

    def cudaGetDevice(self):
        return 0, 0

    def cudaGetDeviceProperties(self, dev):
        import types

        return 0, types.SimpleNamespace(name=b"Fake H200\0", major=9, minor=0)

    def cudaGetDeviceCount(self):
        return 0, 1

    def __getattr__(self, name):  # records, waits, syncs: nothing to do on the CPU
        if name.startswith("cuda"):
            return lambda *a: (0,)
        raise AttributeError(name)


class _FakeTRTEngine:
    def __init__(self, onnx_path, fp16_inputs):
        from ptychopv.inference.engines.onnxrt import open_session

        self.session = open_session(onnx_path)
        self.fp16_inputs = fp16_inputs
        self.io = [(i.name, "INPUT", i.shape) for i in self.session.get_inputs()] + \
                  [(o.name, "OUTPUT", o.shape) for o in self.session.get_outputs()]
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def _find(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_dtype(self, name):
        return np.float32

    def get_tensor_shape(self, name):
        return [d if isinstance(d, int) else -1 for d in self._find(name)[2]]

    def create_execution_context(self):
        return _FakeContext(self)


class _FakeContext:
    def __init__(self, engine):
        self.engine, self.shape, self.address = engine, None, {}

    def set_input_shape(self, name, shape):
        self.shape = shape

    def set_tensor_address(self, name, ptr):
        self.address[name] = ptr

    def _view(self, name, shape):
        import ctypes

        nbytes = int(np.prod(shape)) * 4
        raw = (ctypes.c_byte * nbytes).from_address(self.address[name])
        return np.frombuffer(raw, np.float32).reshape(shape)

    def execute_async_v3(self, stream):
        inp = self.engine.io[0][0]
        x = self._view(inp, self.shape).copy()
        if self.engine.fp16_inputs:
            with np.errstate(over="ignore"):
                x = x.astype(np.float16).astype(np.float32)  # 65535 -> inf
        got = self.engine.session.run(None, {inp: x})
        for (name, _, _), value in zip(self.engine.io[1:], got):
            self._view(name, value.shape)[...] = value
        return True


@pytest.fixture
def fake_trt(monkeypatch):
    """Fake ``tensorrt`` and ``cuda.bindings`` modules; ``build_plan`` writes the ONNX path."""
    import types

    from ptychopv.inference.engines import tensorrt as trt_engine

    cudart = _FakeCudart()
    runtime_state = {"fp16_inputs": False}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dtype: dtype

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return _FakeTRTEngine(plan.decode(), runtime_state["fp16_inputs"])

    trt.Runtime = Runtime
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.__version__ = "12.9.1"
    bindings.runtime = cudart
    cuda.bindings = bindings
    for name, mod in {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings,
                      "cuda.bindings.runtime": cudart, "cuda.bindings.utils": None}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    built = []

    def build_plan(onnx_path, input_size, profile, fp16=True, workspace_bytes=0, fp32_roots=()):
        built.append({"onnx": str(onnx_path), "profile": profile, "fp32_roots": tuple(fp32_roots)})
        return str(onnx_path).encode()

    monkeypatch.setattr(trt_engine, "build_plan", build_plan)
    return types.SimpleNamespace(cudart=cudart, trt=trt, built=built, runtime=runtime_state,
                                 bindings=bindings)


def test_tensorrt_engine_runs_the_preprocessed_graph_in_double_buffers(fake_trt, source,
                                                                        model_files, tmp_path):
    pytest.importorskip("onnx", reason="prepending preprocessing needs the onnx package")
    engine = select_engine(source, "tensorrt", batch_sizes=(1, 8, 16, 64),
                           options={"tensorrt": {"cache_dir": tmp_path, "gpu_timing": True}})
    assert engine.profile == (1, 64, 64)  # tuned for the live chain's batch of 64
    assert fake_trt.built[0]["profile"] == (1, 64, 64)
    assert fake_trt.built[0]["fp32_roots"] == ("input", "valid")
    assert fake_trt.cudart.stream_flags == [1, 1]  # cudaStreamNonBlocking, both streams
    assert engine.device_checks and engine.device_preprocessing
    x = frames(150).astype(np.uint16)  # 64 + 64 + 22: both slots, one reused
    x[7, :3, :3] = 65535
    out = engine.infer(x)
    assert out["valid"].all() and np.isfinite(out["phase"]).all()
    np.testing.assert_allclose(out["phase"], reference(model_files[0], x), atol=1e-4)
    y = list(frames(3))
    y[1] = y[1].copy()
    y[1][0, 0] = np.nan
    out = engine.infer(y)
    assert out["valid"].tolist() == [True, False, True] and np.isnan(out["phase"][1]).all()
    np.testing.assert_allclose(out["phase"][[0, 2]], reference(model_files[0], frames(3)[[0, 2]]),
                               atol=1e-4)
    assert engine.describe()["last_gpu_ms"] == 0.25
    # 2 slots x 3 tensors (input, phase, valid) x (pinned, device) + 2 slots x 2 events
    # + 2 streams + 2 timing events
    assert len(fake_trt.cudart.live) == 12 + 4 + 2 + 2
    engine.close()
    assert fake_trt.cudart.live == {}
    engine.close()  # twice is fine


def test_tensorrt_plan_that_overflows_in_fp16_fails_its_probe_and_is_freed(fake_trt, source,
                                                                           tmp_path):
    pytest.importorskip("onnx", reason="prepending preprocessing needs the onnx package")
    fake_trt.runtime["fp16_inputs"] = True
    with pytest.raises(RuntimeError, match="no inference engine.*fails the preprocessing probe"):
        select_engine(source, "tensorrt", options={"tensorrt": {"cache_dir": tmp_path}})
    assert fake_trt.cudart.live == {}  # pinned, device memory, streams and events all freed
    engine = select_engine(source, "auto", options={"tensorrt": {"cache_dir": tmp_path}})
    assert engine.selection[0]["engine"] == "tensorrt"
    assert "preprocessing probe" in engine.selection[0]["reason"]


def test_tensorrt_load_that_fails_half_way_frees_what_it_allocated(fake_trt, source, tmp_path):
    fake_trt.cudart.fail_malloc_after = 4  # the fifth device buffer: the second slot's second
    with pytest.raises(RuntimeError, match="tensorrt: failed to load: CUDA error 2"):
        select_engine(source, "tensorrt", options={"tensorrt": {"cache_dir": tmp_path}})
    assert fake_trt.cudart.live == {}
    bad = ModelSource.from_onnx(source.onnx_path, preprocessing=SPEC)
    bad.outputs = ("amplitude", "phase")  # the card disagrees with the plan
    fake_trt.cudart.fail_malloc_after = None
    with pytest.raises(ValueError, match="does not match the model card"):
        select_engine(bad, "tensorrt", options={"tensorrt": {"cache_dir": tmp_path}})
    assert fake_trt.cudart.live == {}


def test_tensorrt_11_and_old_cuda_python_are_refused_with_the_reason(fake_trt, source):
    from ptychopv.inference.engines.tensorrt import (TensorRTEngine, cuda_bindings_problem,
                                                     trt_version_problem)

    assert trt_version_problem("10.13.3.9") is None
    assert "older than 10" in trt_version_problem("8.6.1")
    assert "tensorrt>=10,<11" in trt_version_problem("11.0.0")
    assert cuda_bindings_problem("12.9.1") is None and cuda_bindings_problem("13.1.0") is None
    assert "holds the GIL" in cuda_bindings_problem("12.6.2.post1")
    assert "not installed" in cuda_bindings_problem(None)
    assert TensorRTEngine.unavailable(source) is None
    fake_trt.trt.__version__ = "11.1.0"
    assert "BuilderFlag.FP16" in TensorRTEngine.unavailable(source)
    fake_trt.trt.__version__ = "10.13.0"
    fake_trt.bindings.__version__ = "12.8.0"
    assert "holds the GIL" in TensorRTEngine.unavailable(source)


def test_plan_and_preprocessed_onnx_names_change_with_the_preprocessing_version(monkeypatch):
    from ptychopv.inference import export
    from ptychopv.inference.engines.tensorrt import plan_name, preprocessed_onnx_name, preprocessing_tag

    sha, profile = "ab" * 32, (1, 64, 64)
    before = (plan_name(sha, profile, True, "NVIDIA H200", "90", "10.13.0", preprocessing_tag(SPEC)),
              preprocessed_onnx_name(sha, SPEC))
    assert f"pre{export.PREPROCESSING_VERSION}-" in before[0] and "NVIDIA-H200-sm90" in before[0]
    monkeypatch.setattr(export, "PREPROCESSING_VERSION", export.PREPROCESSING_VERSION + 1)
    after = (plan_name(sha, profile, True, "NVIDIA H200", "90", "10.13.0", preprocessing_tag(SPEC)),
             preprocessed_onnx_name(sha, SPEC))
    assert before[0] != after[0] and before[1] != after[1]
    other = {"transform": "log1p", "divisor": 8.0}
    assert preprocessed_onnx_name(sha, other) != after[1]  # the spec keys it too


def test_pin_fp32_holds_everything_upstream_of_the_preprocessed_input():
    """Walked back from the roots, whatever the parser named its helper layers."""
    import types

    from ptychopv.inference.engines.tensorrt import pin_fp32

    trt = types.SimpleNamespace(float32="f32", float16="f16", bool="b",
                                LayerType=types.SimpleNamespace(CONSTANT="const", SHAPE="shape",
                                                                CAST="cast", OTHER="op"))

    class Tensor:
        def __init__(self, name, dtype="f32"):
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, name, ins, outs, type_="op"):
            self.name, self.type, self.ins, self.outs = name, type_, ins, outs
            self.precision, self.out_types = None, {}
            self.num_inputs, self.num_outputs = len(ins), len(outs)

        def get_input(self, j):
            return self.ins[j]

        def get_output(self, k):
            return self.outs[k]

        def set_output_type(self, k, dtype):
            self.out_types[k] = dtype

    t = {n: Tensor(n) for n in ["raw", "one", "bcast", "isnan", "bad", "badf", "clean", "log", "input",
                                "conv", "valid"]}
    t["isnan"].dtype = t["bad"].dtype = "b"
    layers = [Layer("ptychopv_pre/isnan", [t["raw"]], [t["isnan"]]),
              Layer("or", [t["isnan"], t["isnan"]], [t["bad"]]),
              Layer("cast", [t["bad"]], [t["badf"]], "cast"),
              Layer("reduce", [t["badf"]], [t["valid"]]),
              Layer("where", [t["bad"], t["raw"]], [t["clean"]]),
              Layer("one", [], [t["one"]], "const"),
              Layer("ONNXTRT_Broadcast_7", [t["one"]], [t["bcast"]]),
              Layer("log", [t["clean"], t["bcast"]], [t["log"]]),
              Layer("scale", [t["log"]], [t["input"]]),
              Layer("/encoder/conv", [t["input"]], [t["conv"]])]
    net = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert pin_fp32(net, trt, ("input", "valid")) == 6
    pinned = {layer.name for layer in layers if layer.precision == "f32"}
    assert pinned == {"ptychopv_pre/isnan", "reduce", "where", "ONNXTRT_Broadcast_7", "log", "scale"}
    assert layers[8].out_types == {0: "f32"} and layers[0].out_types == {}  # bool output kept


def test_a_batch_that_raises_half_way_leaves_no_stale_slot(source, model_files):
    engine = _cuda_pipeline_on_cpu(source, precision="fp32", batch_sizes=(1, 2))
    runner = engine._runners[2]
    real = runner.run
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real()

    runner.run = flaky
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.infer(frames(4))  # the first chunk is in flight when the second raises
    runner.run = real
    x = frames(1, seed=5)
    out = engine.infer(x)  # one frame: nothing of the failed call may land in it
    np.testing.assert_allclose(out["phase"], reference(model_files[0], x), atol=1e-4)


def _odd_output_model(path, declared, node):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("phase", TensorProto.FLOAT, declared)
    inits = [helper.make_tensor("ax", TensorProto.INT64, [1], [1])] if node == "Squeeze" else []
    n = (helper.make_node("Squeeze", ["x", "ax"], ["phase"]) if node == "Squeeze" else
         helper.make_node("AveragePool", ["x"], ["phase"], kernel_shape=[2, 2], strides=[2, 2]))
    m = helper.make_model(helper.make_graph([n], "g", [x], [y], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return ModelSource.from_onnx(path)


def test_a_model_whose_output_is_not_one_phase_per_input_pixel_is_refused(tmp_path):
    """A model whose output is not (B, 1, n, n) loaded and ran: a 16x16 phase per 32x32 frame, or a
    1-D row of one, stitched with the wrong geometry and nothing said. ONNX Runtime now refuses a
    declared output of another shape at load, and every engine an actual one at the first batch."""
    pytest.importorskip("onnxruntime")
    frames = np.random.default_rng(0).poisson(5, (3, 32, 32)).astype(np.float32)
    for declared, node, words in ((["N", 1, 16, 16], "AveragePool", "[batch, 1, 32, 32]"),
                                  (["N", 32, 32], "Squeeze", "[batch, 1, 32, 32]")):
        src = _odd_output_model(tmp_path / f"{node}-{len(declared)}-{declared[-1]}.onnx", declared, node)
        eng = None
        with pytest.raises(ValueError, match=r"output .*phase") as err:
            eng = select_engine(src, "onnxruntime", options={"onnxruntime": {"providers": "cpu", "sessions": 1}})
            eng.infer(frames)
        assert words in str(err.value)
        if eng is not None:
            eng.close()


def test_any_engine_refuses_a_phase_of_another_shape_at_the_first_batch():
    class Halving(Engine):
        name = "halving"

        def _load(self):
            pass

        def _run(self, x):
            return {"phase": x[:, 0, ::2, ::2].astype(np.float32)}

    eng = Halving(ModelSource(input_size=32))
    with pytest.raises(ValueError, match=r"output 'phase' is \(3, 16, 16\) for a batch of 3 32x32 frames"):
        eng.infer(np.ones((3, 32, 32), np.float32))
