"""ptychopv: real-time streaming ptychography for EPICS beamlines.

Subpackages (top-level folders of the repository):

- ``ptychopv.ioc``        PV schema, soft IOC, continual-learning controller
- ``ptychopv.plugins``    areaDetector-style PVA plugin chain
- ``ptychopv.inference``  networks, ONNX export, inference engines, model registry
- ``ptychopv.hpc``        reconstruction, labels, training corpus, training, executors

The core package holds what every part shares: configuration, the EPICS loopback
environment, NTNDArray codecs, the scan-file layout, the forward model and the simulator.
"""

__version__ = "0.1.0"
