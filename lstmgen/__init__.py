"""lstmgen: train, export and serve stacked-LSTM text generators.

Torch-free core shared by every stage: the vocabulary (`lstmgen.vocab`) and the bundle
manifest (`lstmgen.bundle`). Stage packages: lstmgen.train, lstmgen.export (need torch),
lstmgen.serve (ONNX Runtime, no torch); the benchmark, load generator and demo live in the tools
home, lstmgen.tools. The client library is the separate `lstmgen_client`.
"""

__version__ = "0.1.0"

# The in-process API (lstmgen/api.py), loaded on first use so `import lstmgen` stays light:
# lstmgen.Generator, lstmgen.Completion, lstmgen.TrainConfig, lstmgen.ExportConfig, and
# lstmgen.train(...) / lstmgen.export(...) (the stage packages are callable, see train/__init__.py).
_LAZY = {"Generator": "lstmgen.api", "Completion": "lstmgen.api", "EngineInfo": "lstmgen.api", "ModelInfo": "lstmgen.api",
         "TrainConfig": "lstmgen.train.config", "FrameTrainConfig": "lstmgen.train.config", "ExportConfig": "lstmgen.export.config"}
__all__ = ["Generator", "Completion", "EngineInfo", "ModelInfo", "TrainConfig", "FrameTrainConfig", "ExportConfig", "train", "export", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in ("train", "export"):
        return importlib.import_module(f"lstmgen.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lstmgen' has no attribute {name!r}")
