"""Serving: bundle -> ONNX Runtime engine -> batching scheduler -> gRPC service. Never imports torch."""
