"""Networks: parameter counts, output shapes and ranges, input checks, ONNX parity."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the networks need torch")

from ptychopv.inference.export import export_onnx, load_model, max_abs_difference, save_weights
from ptychopv.inference.networks import PtychoNN, PtychoNN2, build_model, count_parameters


def _conv(cin, cout):
    return cin * cout * 9 + cout


def test_ptychonn2_has_the_papers_layers_and_0_73_m_parameters():
    enc = [(1, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    dec = [(128, 128), (128, 128), (128, 64), (64, 64), (64, 32), (32, 32), (32, 16), (16, 16),
           (16, 1)]
    expected = sum(_conv(a, b) for a, b in enc + dec)
    for size in (64, 128, 256):
        model = build_model("ptychonn2", size)
        assert count_parameters(model) == expected == 733_921
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == enc + dec
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 4
    ups = [m for m in model.modules() if isinstance(m, torch.nn.Upsample)]
    assert len(ups) == 4 and all(u.mode == "bilinear" for u in ups)


def test_ptychonn_default_is_the_4_7_m_two_headed_network():
    model = build_model("ptychonn", 128)
    assert isinstance(model, PtychoNN)
    assert count_parameters(model) == 4_694_690
    assert model.output_names == ("amplitude", "phase")
    narrow = build_model("ptychonn", 64, width=8, depth=3)
    assert count_parameters(narrow) < 200_000


@pytest.mark.parametrize("size", [64, 128, 256])
def test_output_shape_and_range(size):
    torch.manual_seed(0)
    model = PtychoNN2(size, width=4).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size) * 50)
    assert out.shape == (2, 1, size, size)
    assert float(out.abs().max()) <= np.pi


def test_two_heads_shapes_and_ranges():
    model = build_model("ptychonn", 64, width=4).eval()
    with torch.no_grad():
        amp, phase = model(torch.randn(3, 1, 64, 64) * 20)
    assert amp.shape == phase.shape == (3, 1, 64, 64)
    assert 0 <= float(amp.min()) and float(amp.max()) <= 1
    assert float(phase.abs().max()) <= np.pi


@pytest.mark.parametrize("size", [0, 32, 100, 1024])
def test_unsupported_input_size_is_a_clear_error(size):
    with pytest.raises(ValueError, match="input size .* not supported.*64, 128, 256"):
        build_model("ptychonn2", size)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        build_model("unet", 64)
    with pytest.raises(TypeError, match="unknown option.*dropout"):
        build_model("ptychonn2", 64, dropout=0.1)
    with pytest.raises(TypeError, match="input size must be an int"):
        build_model("ptychonn2", 64.0)


def test_wrong_frame_size_at_forward_is_a_clear_error():
    model = build_model("ptychonn2", 64, width=4)
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 64, 64\), got \(1, 1, 128, 128\)"):
        model(torch.zeros(1, 1, 128, 128))


@pytest.mark.parametrize("name", ["ptychonn2", "ptychonn"])
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path, name):
    torch.manual_seed(1)
    model = build_model(name, 64, width=8)
    path = export_onnx(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.random((batch, 64, 64), dtype=np.float32)
        assert max_abs_difference(model, path, x) < 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(model.output_names)
    assert sess.get_inputs()[0].shape[1:] == [1, 64, 64]
    assert not isinstance(sess.get_inputs()[0].shape[0], int)  # symbolic: the dynamic batch axis
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_weights_round_trip_without_unpickling(tmp_path):
    torch.manual_seed(2)
    model = build_model("ptychonn2", 64, width=4)
    save_weights(model, tmp_path / "w.pt")
    again = load_model(tmp_path / "w.pt")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x))
    assert again.config() == {"name": "ptychonn2", "input_size": 64, "width": 4, "depth": 4,
                              "norm": False}
    (tmp_path / "bad.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_model(tmp_path / "bad.pt")


def test_norm_adds_batchnorm_after_each_conv_and_keeps_shapes():
    plain, normed = build_model("ptychonn2", 64, width=4), build_model("ptychonn2", 64, width=4, norm=True)
    convs = [m for m in normed.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in normed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == len(convs) - 1  # every double-conv conv, not the head's final conv
    assert count_parameters(normed) == count_parameters(plain) + 2 * sum(n.num_features for n in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert normed.config()["norm"] is True and plain.config()["norm"] is False
    with torch.no_grad():
        y = normed.eval()(torch.rand(3, 1, 64, 64))
    assert y.shape == (3, 1, 64, 64) and float(y.abs().max()) <= np.pi
    with pytest.raises(TypeError, match="norm must be True or False"):
        build_model("ptychonn2", 64, norm="yes")


@pytest.mark.parametrize("name", ["ptychonn2", "ptychonn"])
def test_norm_model_exports_to_onnx_and_rebuilds_from_its_config(tmp_path, name):
    torch.manual_seed(4)
    model = build_model(name, 64, width=4, norm=True)
    model.train()
    with torch.no_grad():  # move the running statistics off their identity defaults
        for _ in range(3):
            model(torch.rand(4, 1, 64, 64) * 3)
    rng = np.random.default_rng(1)
    x = rng.random((5, 64, 64), dtype=np.float32)
    model.eval()  # inference uses the running statistics, not the batch's
    path = export_onnx(model, tmp_path / "m.onnx")
    assert max_abs_difference(model, path, x) < 1e-4
    save_weights(model, tmp_path / "w.pt")
    again = load_model(tmp_path / "w.pt")
    assert again.config() == model.config() and again.norm
    config = dict(model.config())
    rebuilt = build_model(config.pop("name"), config.pop("input_size"), **config)
    rebuilt.load_state_dict(model.state_dict())  # same layers, running statistics included
    xt = torch.from_numpy(x[:, None])
    with torch.no_grad():
        a, b = model(xt), rebuilt.eval()(xt)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(u, v)


def test_input_standardization_runs_first_and_exports_to_onnx(tmp_path):
    torch.manual_seed(5)
    model = build_model("ptychonn2", 64, width=4).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        before = model(x)
        mean = torch.rand(64, 64)
        model.set_input_standardization(mean, 0.25)
        after = model(x)
        ref = model._forward((x - mean) / 0.25)  # the layers proper on the standardised frames
    assert not torch.allclose(before, after)
    assert torch.allclose(after, ref, atol=1e-6)
    path = export_onnx(model, tmp_path / "m.onnx")  # the buffers become constants of the graph
    assert max_abs_difference(model, path, x[:, 0].numpy()) < 1e-4
    save_weights(model, tmp_path / "w.pt")
    again = load_model(tmp_path / "w.pt")
    with torch.no_grad():
        assert torch.equal(again(x), after)


def test_bad_input_standardization_is_refused():
    model = build_model("ptychonn2", 64, width=4)
    with pytest.raises(ValueError, match="input mean must be 64x64"):
        model.set_input_standardization(torch.zeros(32, 32), 1.0)
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input scale must be a finite number > 0"):
            model.set_input_standardization(torch.zeros(64, 64), scale)


def test_weights_saved_before_standardization_load_as_the_identity(tmp_path):
    torch.manual_seed(6)
    model = build_model("ptychonn2", 64, width=4).eval()
    state = {k: v for k, v in model.state_dict().items() if k not in ("input_mean", "input_scale")}
    torch.save({"config": model.config(), "state_dict": state}, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert float(old.input_scale) == 1.0 and float(old.input_mean.abs().max()) == 0.0
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(old(x), model(x))


def test_initial_output_depends_on_the_input_and_is_not_saturated():
    torch.manual_seed(7)
    model = build_model("ptychonn2", 64, width=8).eval()
    x = torch.rand(16, 1, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert float(y.abs().max()) < 0.9 * np.pi  # the tanh starts away from its tails
    assert float(y.std(dim=0).mean()) > 1e-3  # frames give different outputs from the start
