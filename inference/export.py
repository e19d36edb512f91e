"""ONNX export of a PtychoNN network with a dynamic batch axis.

The ONNX graph takes ``input`` ``(batch, 1, H, W)`` float32 and returns one tensor per head,
named after ``model.output_names`` (``phase``, or ``amplitude`` and ``phase``). Opset 17 is
read by ONNX Runtime >= 1.13 and TensorRT >= 8.6. Files are written to a temporary name and
renamed, so a reader never sees half a model.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

INPUT_NAME = "input"
DEFAULT_OPSET = 17


def export_onnx(model, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (a network from ``networks.build_model``) to ``path`` as ONNX."""
    import torch

    path = Path(path)
    outputs = list(getattr(model, "output_names", ()) or ["phase"])
    n = int(model.input_size)
    was_training = model.training
    model = model.eval()
    # Export on the CPU copy of the weights: the graph is device independent.
    device = next(model.parameters()).device
    example = torch.zeros(2, 1, n, n, device=device)
    dynamic = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the torch.export one, which
            # needs onnxscript; this graph (conv, pool, resize) exports the same with either.
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_axes=dynamic, do_constant_folding=True)
        _check(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        model.train(was_training)
    return path


def _check(path: str | os.PathLike) -> None:
    try:
        import onnx
    except ImportError:  # the checker is a nicety; ONNX Runtime validates on load anyway
        return
    onnx.checker.check_model(str(path))


def max_abs_difference(model, onnx_path: str | os.PathLike, batch: np.ndarray) -> float:
    """Largest |PyTorch - ONNX Runtime| over all outputs for ``batch`` ``(B, H, W)``."""
    import torch

    from .onnxfile import open_session

    x = np.ascontiguousarray(batch, dtype=np.float32)[:, None]
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x))
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = open_session(onnx_path, providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})
    return max(float(np.max(np.abs(r.numpy() - g))) for r, g in zip(ref, got))


def save_weights(model, path: str | os.PathLike) -> Path:
    """Write the network's config and state dict (tensors only; read back without unpickling)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"config": model.config(), "state_dict": state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_model(path: str | os.PathLike, map_location: str = "cpu"):
    """Rebuild a network saved by ``save_weights`` (``weights_only``: nothing is unpickled)."""
    import torch

    from .networks import build_model

    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        config = dict(blob["config"])
        state = blob["state_dict"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a ptychopv weights file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle opcode, ...
        raise ValueError(f"cannot read weights file {path}: {exc}") from None
    model = build_model(config.pop("name"), config.pop("input_size"), **config)
    # Weights saved before the networks held input standardisation buffers: keep the identity.
    missing = {"input_mean", "input_scale"} - set(state)
    for name in missing:
        state[name] = getattr(model, name).detach().clone()
    model.load_state_dict(state)
    return model.eval()


# The graph ``prepend_preprocessing`` writes, by version. It is part of the preprocessed-ONNX
# file name and of the TensorRT plan cache key: bump it whenever that graph changes, so a fix
# here never meets a stale file built by the old code. 2: non-finite frames found on the
# device (output ``valid``, bad frames zeroed); nodes and tensors named under PRE_PREFIX.
PREPROCESSING_VERSION = 2
PRE_PREFIX = "ptychopv_pre/"
VALID_OUTPUT = "valid"


def prepend_preprocessing(src: str | os.PathLike, dst: str | os.PathLike, spec: dict | None) -> Path:
    """Copy of the ONNX model ``src`` whose input takes raw intensities: the model card's
    preprocessing (clamp at 0, log1p, divide; ``None``: none) becomes the first nodes of the
    graph, so a GPU engine (TensorRT) runs it on the device. The new graph also checks every
    frame for NaN or inf: it zeroes a bad frame before the network (the host's policy) and
    returns ``valid`` ``(B,)``, 1.0 or 0.0 per frame, as an extra output.

    Every node and tensor it adds is named under ``PRE_PREFIX`` (the last one keeps the old
    input name); the TensorRT engine keeps these layers in FP32, because raw counts of 65520
    and more are inf in FP16. Needs the ``onnx`` package, not torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .preprocessing import check_spec

    spec = check_spec(spec)
    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)
    old = graph.input[0]
    raw = f"{old.name}_raw"
    p = PRE_PREFIX
    f32 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.float32), p + name)
    graph.initializer.extend([f32("zero", 0.0), f32("half", 0.5), f32("one", 1.0),
                              f32("max", np.finfo(np.float32).max),
                              numpy_helper.from_array(np.array([-1], np.int64), p + "flat")])
    node = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], name=out, **kw)
    # Per frame: any NaN or inf? inf as |x| > FLT_MAX: TensorRT's ONNX parser has long taken
    # IsNaN, Abs and Greater, IsInf not everywhere. ReduceMax's axes: an attribute before opset 18.
    axes = [1, 2, 3]
    if opset >= 18:
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), p + "axes"))
        reduce = node("ReduceMax", [p + "bad_px_f", p + "axes"], p + "bad_frame", keepdims=1)
    else:
        reduce = node("ReduceMax", [p + "bad_px_f"], p + "bad_frame", axes=axes, keepdims=1)
    nodes = [node("IsNaN", [raw], p + "isnan"),
             node("Abs", [raw], p + "abs"),
             node("Greater", [p + "abs", p + "max"], p + "isinf"),
             node("Or", [p + "isnan", p + "isinf"], p + "bad_px"),
             node("Cast", [p + "bad_px"], p + "bad_px_f", to=TensorProto.FLOAT),
             reduce,
             node("Sub", [p + "one", p + "bad_frame"], p + "valid4"),
             node("Reshape", [p + "valid4", p + "flat"], VALID_OUTPUT),
             node("Greater", [p + "bad_frame", p + "half"], p + "bad_cond"),
             node("Where", [p + "bad_cond", p + "zero", raw], p + "clean")]
    last = p + "clean"
    if spec is not None:
        graph.initializer.append(f32("scale", 1.0 / spec["divisor"]))
        nodes.append(node("Relu", [last], p + "clamped"))
        last = p + "clamped"
        if spec["transform"] == "log1p":
            nodes += [node("Add", [last, p + "one"], p + "plus1"), node("Log", [p + "plus1"], p + "log")]
            last = p + "log"
        nodes.append(helper.make_node("Mul", [last, p + "scale"], [old.name], name=p + "scale_mul"))
    else:
        nodes.append(helper.make_node("Identity", [last], [old.name], name=p + "identity"))
    new_input = helper.make_tensor_value_info(raw, TensorProto.FLOAT, None)
    new_input.type.CopyFrom(old.type)
    for i, n in enumerate(nodes):
        graph.node.insert(i, n)
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    batch = old.type.tensor_type.shape.dim[0]
    graph.output.append(helper.make_tensor_value_info(
        VALID_OUTPUT, TensorProto.FLOAT, [batch.dim_param or (batch.dim_value or "batch")]))
    onnx.checker.check_model(model)
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst
