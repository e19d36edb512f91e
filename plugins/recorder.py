"""Scan recorder: frames + uniqueIds + positions + timestamps to the HDF5 scan layout (``Scan:`` records).

Capture is switched on and off through :meth:`RecorderPlugin.start_capture` /
:meth:`RecorderPlugin.stop_capture`, which run on the plugin's thread in order with the frames
(:meth:`~.base.PluginBase.submit`): frames queued before "capture off" are still written, then
the file is closed; the returned Future completes then (a ``busy`` record can wait on it).

The file is opened when the first frame arrives, since its shape and dtype fix the datasets'.
A frame whose shape differs from the scan's, or whose dtype cannot be stored without loss, is
counted in ``frames_rejected`` and reported in ``last_message``, and the scan goes on.
An existing file is never overwritten: the scan number moves on to a free name.

A full disk must not cost the frames already recorded: HDF5 grows a file's datasets before it
writes them, and a write that fails for want of room leaves a file HDF5 then refuses to open
(all of it lost). So the recorder checks the free space as it goes and closes the scan, readable,
while :data:`MIN_FREE_BYTES` (or room for :data:`RESERVE_FRAMES` more frames) are left; a write
that fails all the same stops the capture with the reason (MAJOR).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ptychopv.io.scanfile import ScanWriter

from .base import PluginBase
from .frame import Frame

log = logging.getLogger(__name__)


MIN_FREE_BYTES = 256 * 2**20     # a capture stops while this much room is left on the scan's disk ...
RESERVE_FRAMES = 256             # ... or room for this many more frames, whichever is more
DISK_CHECK_EVERY = 16            # frames between free-space checks
MAX_SCAN = 2**31 - 1             # Scan:Number_RBV is a 32-bit longin


def _numbered_scans(folder: str | Path) -> tuple[dict[int, Path], list[str]]:
    """``scan_N.h5`` files in ``folder`` by number, and those numbered past :data:`MAX_SCAN`."""
    nums, ignored = {}, []
    for p in sorted(Path(folder).glob("scan_*.h5")):
        tail = p.stem.split("_")[-1]
        if not re.fullmatch(r"[0-9]+", tail):     # isdigit() takes '²', which int() refuses
            continue
        if int(tail) < MAX_SCAN:
            nums[int(tail)] = p
        else:
            ignored.append(p.name)
    return nums, ignored


def next_scan_number(folder: str | Path) -> tuple[int, list[str]]:
    """The number after the highest ``scan_N.h5`` in ``folder``, and the files numbered past
    :data:`MAX_SCAN` (a copy, a hand-made name), which are left out: counting from them, the scan
    number shown wrapped to a negative one."""
    nums, ignored = _numbered_scans(folder)
    return max(nums, default=0) + 1, ignored


def newest_scan_file(folder: str | Path, recording: str | Path | None = None) -> Path | None:
    """The highest-numbered ``scan_N.h5`` in ``folder`` (the last captured, also by an IOC before
    a restart) other than the file ``recording`` now, or None."""
    nums, _ = _numbered_scans(folder)
    done = [n for n, p in nums.items() if not (recording and Path(recording) == p)]
    return nums[max(done)] if done else None


class RecorderPlugin(PluginBase):
    plugin_type = "NDFileHDF5"

    def __init__(self, folder: str | Path = ".", *, template: str = "scan_{scan:05d}.h5", scan_number: int = 1,
                 num_capture: int = 0, energy_ev: float = math.nan, detector_distance_m: float = math.nan,
                 detector_pixel_size_m: float = math.nan, flush_every: int = 1, **kw):
        kw.setdefault("blocking_callbacks", True)        # a recorder should not drop frames
        kw.setdefault("queue_size", 256)
        super().__init__(kw.pop("name", "Scan"), **kw)
        self.folder = Path(folder)
        self.template = template
        if self.file_name(1) == self.file_name(2):       # validates the template now
            # without the number every scan has one name: a capture after the first would look
            # for a free name for ever, on the plugin's thread
            raise ValueError(f"file template {self.template!r} must use {{scan}} (e.g. 'scan_{{scan:05d}}.h5')")
        self.scan_number = int(scan_number)
        self.num_capture = int(num_capture)
        self.metadata = {"energy_ev": energy_ev, "detector_distance_m": detector_distance_m,
                         "detector_pixel_size_m": detector_pixel_size_m}
        self.flush_every = flush_every
        self._capture = False
        self.current_file = ""            # Scan:FileName_RBV
        self.frames_captured = 0          # Scan:FramesCaptured_RBV
        self.frames_rejected = 0
        self._last_reject = ""
        self._writer: ScanWriter | None = None
        self._last_stream = 0
        self._path: Path | None = None

    @property
    def capture(self) -> bool:
        """Scan:Capture readback; change it with start_capture/stop_capture (ordered with frames)."""
        return self._capture

    def file_name(self, scan_number: int) -> Path:
        try:
            name = self.template.format(scan=int(scan_number))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"file template {self.template!r} must use only {{scan}} (e.g. "
                             f"'scan_{{scan:05d}}.h5'): {exc}") from None
        return self.folder / name

    # ------------------------------------------------------------------ control (any thread)
    def start_capture(self, scan_number: int | None = None) -> Future:
        """Capture on; the Future's result is the file name it will write."""
        return self.submit(self._start, scan_number)

    def stop_capture(self) -> Future:
        """Capture off once the frames queued so far are written; the Future's result is the file closed."""
        return self.submit(self._stop)

    # ------------------------------------------------------------------ on the plugin's thread
    def _start(self, scan_number: int | None) -> str:
        self._close()
        n = self.scan_number if scan_number is None else int(scan_number)
        while self.file_name(n).exists():                # never overwrite a recorded scan
            n += 1
        if not 0 <= n <= MAX_SCAN:
            raise ValueError(f"scan number {n} is past {MAX_SCAN} (Scan:Number_RBV is a 32-bit record): "
                             "move the scans to another chain.scan_folder")
        self.scan_number = n
        self._path = self.file_name(n)
        self.current_file = str(self._path)
        self.frames_captured = 0
        self.frames_rejected = 0
        self._capture = True
        return self.current_file

    def _stop(self) -> str:
        """End the capture; the closed file's path, or "" when nothing was closed cleanly. A file
        that fails to close (a flush on a full or lost disk) still ends the capture, MAJOR: it was
        left capturing, and the next scan recorded nothing (helper 20)."""
        path = self._writer.path if self._writer is not None else None
        try:
            closed = self._close()
        except Exception as exc:  # noqa: BLE001 - the capture ends either way, and says why
            log.exception("closing %s", path)
            self.report(f"{Path(str(path)).name}: closing the file failed ({type(exc).__name__}: {exc}); "
                        f"{self.frames_captured} frames were written to it, it may be incomplete", 2)
            closed = ""
        else:
            if closed:    # not "recording ..." any more: what the scan's file holds (and what it does not)
                if self.frames_rejected:
                    self.report(f"{Path(closed).name}: {self.frames_captured} frames recorded, "
                                f"{self.frames_rejected} not; file closed (last refused: {self._last_reject})", 1)
                else:
                    self.report(f"{Path(closed).name}: {self.frames_captured} frames recorded; file closed")
        if self._capture:
            self._capture = False
            if path is None and self._path is not None and not self._path.exists():
                # no frame came: no file was written, so none is named and the number stays free
                # (Scan:FileName_RBV named a file that never existed, and the next scan skipped it)
                self.report(f"{self._path.name}: no frame arrived during the capture; no file written", 1)
                self.current_file = ""
            else:
                self.scan_number += 1
        return closed

    def _close(self) -> str:
        if self._writer is None:
            return ""
        w, self._writer = self._writer, None
        w.close()
        return str(w.path)

    def process(self, frame: Frame):
        if not self._capture:
            return
        data = np.asarray(frame.data)
        if self._writer is None:
            if data.ndim != 2 or data.size == 0:
                self._reject(f"frame {frame.unique_id}: shape {data.shape} is not a 2-D image; not recorded")
                return
            try:
                # exclusive: a file that appeared since the capture chose this free name (another
                # writer) is never overwritten; the capture stops and says so
                self._writer = ScanWriter(self._path, data.shape, data.dtype, scan_id=self._path.stem,
                                          flush_every=self.flush_every, exclusive=True, **self.metadata)
            except (OSError, ValueError) as exc:
                self._capture = False                     # one message, not one per frame
                self._reject(f"cannot open {self._path}: {exc}; capture stopped", severity=2)
                return
        w = self._writer
        if data.shape != w.frame_shape:
            self._reject(f"frame {frame.unique_id}: shape {data.shape} differs from the scan's {w.frame_shape}; "
                         f"not recorded")
            return
        if not np.can_cast(data.dtype, w.dtype, "safe"):
            self._reject(f"frame {frame.unique_id}: dtype {data.dtype} cannot be stored as the scan's {w.dtype}; "
                         f"not recorded")
            return
        x, y = frame.position if frame.position is not None else (math.nan, math.nan)
        if self.frames_captured == 0:
            self.report(f"recording {self._path.name} from uniqueId {frame.unique_id}")
        elif frame.stream != self._last_stream:
            self.report(f"{self._path.name}: the detector stream restarted at uniqueId {frame.unique_id} "
                        f"(frame {self.frames_captured}); marked in /entry/data/stream")
        if self.frames_captured % DISK_CHECK_EVERY == 0 and not self._room(data.nbytes):
            return
        self._last_stream = frame.stream
        try:
            w.append(data, frame.unique_id, x, y, frame.timestamp, frame.stream)
        except (OSError, RuntimeError) as exc:
            self._end(f"{self._path.name}: writing frame {frame.unique_id} failed ({exc}); capture stopped "
                      f"after {self.frames_captured} frames")
            return
        self.frames_captured += 1
        if self.num_capture and self.frames_captured >= self.num_capture:
            self._stop()
        return

    def _room(self, frame_bytes: int) -> bool:
        """Is there room to go on? If not, the scan is closed while it can be (readable, every
        frame so far in it) and the capture stops, said at MAJOR."""
        try:
            free = shutil.disk_usage(self._path.parent).free
        except OSError:
            return True                                   # cannot tell: the write itself will say
        need = max(MIN_FREE_BYTES, RESERVE_FRAMES * frame_bytes)
        if free >= need:
            return True
        self._end(f"{self._path.name}: the disk is nearly full ({free / 2**20:.0f} MiB left, {need / 2**20:.0f} "
                  f"kept free); capture stopped after {self.frames_captured} frames, all in the file")
        return False

    def _end(self, message: str) -> None:
        """Stop the capture by itself, closing the file as far as it can, and say why (MAJOR)."""
        self._capture = False
        try:
            self._close()
        except Exception as exc:  # noqa: BLE001 - the message says the capture stopped either way
            message += f"; closing the file failed too ({exc})"
            self._writer = None
        self.scan_number += 1
        self._reject(message, severity=2)

    def _reject(self, message: str, severity: int = 1) -> None:
        self.frames_rejected += 1
        self._last_reject = message
        self.report(message, severity)

    def on_stop(self) -> None:
        self._stop()
