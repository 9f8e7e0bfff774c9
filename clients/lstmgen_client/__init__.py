"""Python client for the lstmgen gRPC server."""
