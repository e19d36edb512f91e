"""An ONNX file on disk: open it with ONNX Runtime, read its input size and outputs.

A leaf of the inference package (it imports nothing else of it), so the engines, the export and
``ModelSource`` can all use it without importing one another.
"""

from __future__ import annotations

import os
from pathlib import Path

CPU_EP = "CPUExecutionProvider"


def cpu_threads() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def open_session(path: str | os.PathLike, providers=None, threads: int | None = None,
                 spin: bool = True):
    """An ``InferenceSession`` for ``path``; a missing, truncated or corrupt file is a ValueError."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX model {path} does not exist")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: provider fall-back warnings are reported by us
    if not spin:  # spinning threads cut latency but burn a shared CPU between batches
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=providers or [CPU_EP])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own InvalidProtobuf / Fail
        raise ValueError(f"cannot load ONNX model {path} ({path.stat().st_size} bytes): the file "
                         f"is truncated or not a valid ONNX model: {exc}") from None



def onnx_io(path: str | os.PathLike) -> tuple[tuple[int, int], tuple[str, ...]]:
    """``((H, W), output names)`` of an exported model, read with ONNX Runtime (no torch)."""
    session = open_session(path, providers=[CPU_EP], threads=1)
    shape = session.get_inputs()[0].shape
    return (int(shape[2]), int(shape[3])), tuple(o.name for o in session.get_outputs())
