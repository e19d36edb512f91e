"""Networks, ONNX export, inference engines and the model registry.

Importing this package imports neither torch nor any EPICS library: ``networks`` and
``export`` need torch, the engines import their framework only when loaded, so an edge box
with ONNX Runtime alone can run ``select_engine(ModelRegistry(path).latest().source())``.

Two registries declare the extensible kinds here, by name -> ``"module:Class"`` (imported on
use): ``NETWORKS`` (trainable networks; ``TrainOptions.model`` and the CLI derive from it) and
``ENGINES`` (inference engines; ``chain.engine`` and ``auto`` derive from it). Add one with
:func:`register_network` or :func:`~ptychopv.inference.engines.register_engine`, or one line.
"""

import importlib

from .engines import AUTO_ORDER, ENGINES, Engine, ModelSource, available_engines, register_engine, select_engine
from .preprocessing import make_spec, normalize
from .registry import ModelRegistry, ModelVersion, RegistryError

NETWORKS: dict[str, str] = {
    "ptychonn2": "ptychopv.inference.networks:PtychoNN2",
    "ptychonn": "ptychopv.inference.networks:PtychoNN",
}


def register_network(name: str, target: str) -> None:
    """Add a network class (``"package.module:Class"``, a ``_PtychoBase`` subclass) by name."""
    if name in NETWORKS:
        raise ValueError(f"network {name!r} is already registered")
    NETWORKS[name] = target


def network_class(name: str):
    """The network class registered as ``name`` (imports torch)."""
    try:
        module, cls = NETWORKS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(NETWORKS)}") from None
    return getattr(importlib.import_module(module), cls)


__all__ = ["AUTO_ORDER", "ENGINES", "NETWORKS", "Engine", "ModelRegistry", "ModelSource", "ModelVersion",
           "RegistryError", "available_engines", "make_spec", "network_class", "normalize", "register_engine",
           "register_network", "select_engine"]
