"""Export: checkpoint -> single-step ONNX graph (+ prompt graph) + manifest, verified (needs torch, onnx)."""
