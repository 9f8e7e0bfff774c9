"""Optional int8: ONNX Runtime dynamic quantization of a graph's weights.

ORT turns each LSTM op into com.microsoft DynamicQuantizeLSTM (W and R stored int8, whatever
`weight_type` says), the Gemm head into DynamicQuantizeLinear + MatMulInteger, and the embedding
Gather into a Gather over int8 rows + DequantizeLinear. Activations are quantized per call.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from lstmgen.errors import UserError

OP_TYPES = ("LSTM", "MatMul", "Gather")  # Gemm counts as MatMul: dynamic mode rewrites it first


class QuantizeError(UserError, RuntimeError):
    """This onnxruntime's quantizer cannot make an int8 LSTM (its version decides, not the input)."""


@contextmanager
def _quiet_root_logger():
    # quantize_dynamic logs advice ("consider pre-processing") and every int64 tensor it skips
    # through the root logger; silence that for the call only
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Counter:
    """Quantize `src` into `dst` (may be the same file); returns the node op types of the result.
    Raises QuantizeError when no LSTM op was quantized."""
    dst = Path(dst)
    part = dst.with_name(dst.name + ".int8.part")
    with _quiet_root_logger():
        # reduce_range: 7-bit weights avoid u8s8 overflow on CPUs without VNNI
        quantize_dynamic(str(src), str(part), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, op_types_to_quantize=list(OP_TYPES))
    model = onnx.load(str(part))
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    if ops["DynamicQuantizeLSTM"] == 0:
        part.unlink()
        raise QuantizeError(f"{src}: quantize_dynamic left the LSTM ops unquantized ({dict(ops)})")
    os.replace(part, dst)
    return ops
