"""The stitched-image restorer at run time: the model card's ``restore.onnx`` in ONNX Runtime.

:mod:`ptychopv.science.restore` says what it is and prepares its input; this runs it. One
intra-op thread and no spinning: it runs in the stitch stage's publisher beside the inference,
whose threads matter more.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from ..science import restore as _restore
from .onnxfile import open_session


class Restorer:
    """``restore.onnx`` at ``path``; call it with a stitched phase and weight to get the restored
    phase. ValueError if the file is missing, not ONNX, or does not map (1, 2, H, W) to (1, 1, H, W)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        try:
            self._session = open_session(path, threads=threads, spin=False)
        except ImportError:
            raise ValueError("ONNX Runtime is not installed (pip install 'ptychopv[onnx]')") from None
        ins, outs = self._session.get_inputs(), self._session.get_outputs()
        if (len(ins) != 1 or len(outs) != 1 or len(ins[0].shape) != 4 or ins[0].shape[1] != len(_restore.INPUTS)
                or len(outs[0].shape) != 4 or outs[0].shape[1] != 1):
            raise ValueError(f"{os.path.basename(path)} is not a restorer: it maps {[i.shape for i in ins]} to "
                             f"{[o.shape for o in outs]}, not (1, {len(_restore.INPUTS)}, H, W) to (1, 1, H, W)")
        self._input = ins[0].name
        self._lock = threading.Lock()       # one run at a time (the publisher and a caller)
        self.path = str(path)

    def __call__(self, phase: np.ndarray, weight: np.ndarray) -> np.ndarray:
        x, covered, mean = _restore.prepare(phase, weight)
        with self._lock:
            out = self._session.run(None, {self._input: x})[0]
        return _restore.finish(out, phase, covered, mean)


def load(card: dict | None, folder: str | os.PathLike | None) -> tuple[Restorer | None, dict | None, str | None]:
    """The restorer a model card names, from the version's ``folder``: ``(restorer, entry, None)``,
    or ``(None, entry, why)`` when the card has none (``why`` None then) or it cannot be used (a
    malformed entry, a file the card does not list among its hashed ``files``, a missing or corrupt
    file: ``why`` says which, in at most 80 characters). The registry checks a listed file's hash
    against the card when the version is read (``ModelRegistry.get``)."""
    entry = (card or {}).get("restore")
    if entry is None:
        return None, None, None
    try:
        _restore.check_entry(entry)
        if folder is None:
            raise ValueError("no model folder to read it from")
        if _restore.FILE not in ((card or {}).get("files") or {}):
            raise ValueError(f"{_restore.FILE} is not among the card's hashed files")
        path = os.path.join(folder, _restore.FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{_restore.FILE} does not exist in the model's folder")
        return Restorer(path), entry, None
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own; any of them: not used
        # the reason, not the folder's path (it has 80 characters of a 128-character record)
        why = str(exc).replace(os.path.join(str(folder or ""), ""), "")
        return None, entry, why[:80]
