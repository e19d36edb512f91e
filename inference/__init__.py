"""Networks, ONNX export, inference engines and the model registry.

Importing this package imports neither torch nor any EPICS library: ``networks`` and
``export`` need torch, the engines import their framework only when loaded, so an edge box
with ONNX Runtime alone can run ``select_engine(ModelRegistry(path).latest().source())``.
"""

from .engines import AUTO_ORDER, ENGINES, Engine, ModelSource, available_engines, select_engine
from .preprocessing import make_spec, normalize
from .registry import ModelRegistry, ModelVersion, RegistryError

__all__ = ["AUTO_ORDER", "ENGINES", "Engine", "ModelRegistry", "ModelSource", "ModelVersion",
           "RegistryError", "available_engines", "make_spec", "normalize", "select_engine"]
