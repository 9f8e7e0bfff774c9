"""Write serve/sampler_prep.onnx, the sampler's dense pass (`python tools/gen_sampler_graph.py [OUT]`).

Serving installs no `onnx` package, so the graph ships as a file; tests/test_sampling_exact.py
checks that this script still makes exactly the committed bytes.

    inputs   logits float32 [B, V], inv_temperature float32 [B, 1]
    outputs  weights float32 [B, V]       exp((logits - row max) * inv_temperature), max exactly 1
             total float32 [B, 1]         each row's sum of weights: NaN or inf when the row has a
                                          NaN, a +inf or nothing but -inf (ReduceMax may skip a NaN;
                                          the sum never does), so the sampler needs no pass of its own

(Sums of blocks of 256 in the graph, by Slice + Reshape + ReduceSum, doubled its cost; the kernel
sums them faster.)
"""
from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "serve" / "sampler_prep.onnx"


def build():
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMax", ["logits"], ["row_max"], axes=[1], keepdims=1),  # [B, 1]
        helper.make_node("Sub", ["logits", "row_max"], ["shifted"]),  # [B, V], <= 0
        helper.make_node("Mul", ["shifted", "inv_temperature"], ["scaled"]),
        helper.make_node("Exp", ["scaled"], ["weights"]),  # [B, V]
        helper.make_node("ReduceSum", ["weights", "sum_axes"], ["total"], keepdims=1),  # [B, 1]
    ]
    graph = helper.make_graph(
        nodes, "lstmgen_sampler_prep",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "V"]),
         helper.make_tensor_value_info("inv_temperature", TensorProto.FLOAT, ["B", 1])],
        [helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["B", "V"]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["B", 1])],
        initializer=[helper.make_tensor("sum_axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="lstmgen tools/gen_sampler_graph.py")
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.write_bytes(build())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
