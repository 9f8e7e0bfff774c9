"""lstmgen: train, export and serve stacked-LSTM text generators.

Torch-free core shared by every stage: the vocabulary (`lstmgen.vocab`) and the bundle
manifest (`lstmgen.bundle`). Stage packages: lstmgen.train, lstmgen.export (need torch),
lstmgen.serve (ONNX Runtime, no torch). The client library is the separate `lstmgen_client`.
"""

__version__ = "0.1.0"
