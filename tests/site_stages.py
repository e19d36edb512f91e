"""Plugins of the kind a site adds as its own stages (classes only: whoever uses them declares
them). tests/test_seams.py declares one at run time; tests/test_extensions.py copies this file
beside an IOC's config, where the config's extension module imports it."""

from __future__ import annotations

import numpy as np

from ptychopv.plugins.base import PluginBase


class GainPlugin(PluginBase):
    """Multiplies each frame by ``gain`` (which must be > 0) and sums what it passed on."""

    plugin_type = "NDPluginSiteGain"

    def __init__(self, name="Gain", **kw):
        super().__init__(name, **kw)
        self.gain = 1.0
        self.total = 0.0

    @property
    def gain(self):
        return self._gain

    @gain.setter
    def gain(self, v):
        if not v > 0:
            raise ValueError(f"gain must be > 0, got {v}")
        self._gain = float(v)

    def process(self, frames):
        frames = frames if isinstance(frames, list) else [frames]
        out = [f.derive(f.data * np.float32(self._gain)) for f in frames]
        self.total += sum(float(np.sum(f.data)) for f in out)
        return out


class SumPlugin(PluginBase):
    """The counts of every frame it sees, passed on unchanged: a stage the detector feeds."""

    plugin_type = "NDPluginSiteSum"

    def __init__(self, name="Sum", **kw):
        super().__init__(name, **kw)
        self.total = 0.0

    def process(self, frames):
        frames = frames if isinstance(frames, list) else [frames]
        for f in frames:
            self.total += float(f.data.sum())
        return frames


class HangPlugin(PluginBase):
    """A stage whose work never returns until a file ``hang.release`` appears beside this module
    (beside the IOC's config, where tests/test_extensions.py copies it): a hung engine or file
    system, as the chain's stall watch sees one."""

    plugin_type = "NDPluginSiteHang"

    def __init__(self, name="Hang", **kw):
        super().__init__(name, **kw)
        self.released = False

    def process(self, frames):
        import time
        from pathlib import Path

        release = Path(__file__).with_name("hang.release")
        while not release.exists():          # the test's release; nothing else ends the call
            time.sleep(0.05)
        self.released = True
        return frames
