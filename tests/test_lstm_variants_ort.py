"""LSTM variants inside the ONNX `LSTM` op, checked numerically against ONNX Runtime's CPU kernels.

The op carries two variants besides the plain cell (ONNX operator spec, LSTM-22, default
activations f=Sigmoid, g=Tanh, h=Tanh; gate blocks of W/R/B in the order i, o, f, c):

* peepholes: optional input P [num_directions, 3*hidden], blocks in the order p_i, p_o, p_f;
      i_t = f(X W_i^T + H_{t-1} R_i^T + p_i * C_{t-1} + Wb_i + Rb_i)
      f_t = f(X W_f^T + H_{t-1} R_f^T + p_f * C_{t-1} + Wb_f + Rb_f)
      o_t = f(X W_o^T + H_{t-1} R_o^T + p_o * C_t     + Wb_o + Rb_o)      <- the new cell state
* coupled input and forget gates: attribute input_forget=1, whose whole definition in the spec is
  "Couple the input and forget gates if 1." (no equation).

Each graph here is built with onnx.helper (one or two stacked LSTM nodes, weights as initializers,
with and without sequence_lens) and run with ONNX Runtime's CPU provider, fp32 and after
quantize_dynamic (com.microsoft DynamicQuantizeLSTM, the project's --int8 path); the outputs Y, Y_h
and Y_c are compared with a float64 numpy reference of the equations above.

Observed with onnxruntime 1.32.0 / onnx 1.23.2 (docs/results.md, "LSTM variants in ONNX Runtime"):
P is honoured exactly as the spec says, in fp32 and in int8. input_forget=1 is honoured, but as
f_t = 1 - i_t: the forget gate's rows of W, R, B and p_f are ignored. That is the reverse of the
CIFG of Greff et al. / TFLite (i_t = 1 - f_t); such a cell is exported by writing the negated
forget-gate pre-activation into the input-gate slot (sigmoid(-a) = 1 - sigmoid(a)), with
input_forget=1 or, independent of the attribute's meaning, with input_forget=0 and the forget gate
kept in its own slot; the cifg tests check both. `python tests/test_lstm_variants_ort.py` prints
the figures of docs/results.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

T, B, H, I = 4, 3, 8, 5  # time steps, batch, hidden, input
LENS = np.array([4, 2, 3], dtype=np.int32)  # per-row lengths when sequence_lens is given
OPSET = 17  # the project's default export opset (LSTM-14 there; the variants are unchanged since LSTM-7)
VARIANTS = {  # name -> (peepholes, input_forget)
    "plain": (False, 0),
    "peephole": (True, 0),
    "coupled": (False, 1),
    "peephole+coupled": (True, 1),
}
FP32_ATOL = 1e-5  # float32 kernel vs float64 reference; observed <= 1.5e-7
INT8_ATOL = 0.03  # 7-bit per-channel weights, 8-bit activations; observed <= 6e-3
# a wrong reading of a variant must miss the kernel's output by more than this (1000x the fp32
# tolerance; twice the int8 one, so no output is within tolerance of two readings). The closest
# wrong reading, the output gate's peephole reading C_t-1 instead of C_t, misses by 0.03 to 0.08
# here (fp32 only: int8 cannot tell it apart); P ignored under input_forget=1 by 0.09 and more.
MARGIN_FP32, MARGIN_INT8 = 0.01, 2 * INT8_ATOL


# -- weights and graphs -----------------------------------------------------------------------------
def layer_params(layers: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per layer: W [1,4H,in], R [1,4H,H], B [1,8H], P [1,3H], h0/c0 [1,B,H] (float32, ONNX gate order)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(layers):
        n_in = I if k == 0 else H
        u = lambda *shape, s=0.6: rng.uniform(-s, s, size=shape).astype(np.float32)  # noqa: E731
        out.append({"W": u(1, 4 * H, n_in), "R": u(1, 4 * H, H), "B": u(1, 8 * H, s=0.3),
                    "P": u(1, 3 * H, s=1.5), "h0": u(1, B, H, s=0.8), "c0": u(1, B, H, s=1.5)})
    return out


def inputs_x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(T, B, I)).astype(np.float32)


def build_graph(params: list[dict], peephole: bool, input_forget: int, with_lens: bool) -> onnx.ModelProto:
    """Stacked forward LSTM nodes over X [T,B,I]. Inputs X, [seq_lens], h0_l{k}, c0_l{k}; outputs the
    top layer's Y [T,1,B,H] and every layer's Y_h_l{k}, Y_c_l{k} [1,B,H]."""
    nodes, inits = [], []
    if len(params) > 1:
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, I])]
    if with_lens:
        ins.append(helper.make_tensor_value_info("seq_lens", TensorProto.INT32, [B]))
    outs = []
    x = "X"
    for k, p in enumerate(params):
        names = {n: f"{n}_l{k}" for n in ("W", "R", "B", "P")}
        inits += [numpy_helper.from_array(p[n], names[n]) for n in ("W", "R", "B")]
        if peephole:
            inits.append(numpy_helper.from_array(p["P"], names["P"]))
        for s in ("h0", "c0"):
            ins.append(helper.make_tensor_value_info(f"{s}_l{k}", TensorProto.FLOAT, [1, B, H]))
        y, yh, yc = f"Y_l{k}", f"Y_h_l{k}", f"Y_c_l{k}"
        lstm_in = [x, names["W"], names["R"], names["B"], "seq_lens" if with_lens else "",
                   f"h0_l{k}", f"c0_l{k}", names["P"] if peephole else ""]
        attrs = {"input_forget": input_forget} if input_forget else {}
        nodes.append(helper.make_node("LSTM", lstm_in, [y, yh, yc], name=f"lstm_l{k}", hidden_size=H,
                                      direction="forward", **attrs))
        outs += [helper.make_tensor_value_info(yh, TensorProto.FLOAT, [1, B, H]),
                 helper.make_tensor_value_info(yc, TensorProto.FLOAT, [1, B, H])]
        if k < len(params) - 1:
            x = f"x_l{k + 1}"
            nodes.append(helper.make_node("Squeeze", [y, "axis1"], [x]))  # [T,1,B,H] -> [T,B,H]
    outs.insert(0, helper.make_tensor_value_info(y, TensorProto.FLOAT, [T, 1, B, H]))
    graph = helper.make_graph(nodes, "lstm_variants", ins, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(params: list[dict], x: np.ndarray, with_lens: bool) -> dict[str, np.ndarray]:
    f = {"X": x}
    if with_lens:
        f["seq_lens"] = LENS
    for k, p in enumerate(params):
        f[f"h0_l{k}"], f[f"c0_l{k}"] = p["h0"], p["c0"]
    return f


def run_ort(model: onnx.ModelProto, f: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, f)


# -- the float64 reference --------------------------------------------------------------------------
def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def ref_layer(x, p: dict, peephole: bool, coupling: str | None, lens, o_reads: str = "C_t"):
    """One forward layer, float64. coupling: None (the spec's equations, gates independent),
    "f=1-i" or "i=1-f"; o_reads: which cell state the output gate's peephole reads ("C_t" per the
    spec, "C_t-1" as a wrong reading to rule out). Rows past their length keep their state and
    output zeros, as the op does with sequence_lens. Returns Y [T,1,B,H], Y_h, Y_c [1,B,H]."""
    W, R, Bias = (p[n][0].astype(np.float64) for n in ("W", "R", "B"))
    P = p["P"][0].astype(np.float64) if peephole else np.zeros(3 * H)
    p_i, p_o, p_f = np.split(P, 3)
    h, c = p["h0"][0].astype(np.float64), p["c0"][0].astype(np.float64)
    lens = np.full(B, T) if lens is None else lens
    Y = np.zeros((T, 1, B, H))
    for t in range(T):
        a = x[t].astype(np.float64) @ W.T + h @ R.T + Bias[:4 * H] + Bias[4 * H:]
        a_i, a_o, a_f, a_c = np.split(a, 4, axis=-1)
        i = _sigmoid(a_i + p_i * c)
        f = _sigmoid(a_f + p_f * c)
        if coupling == "f=1-i":
            f = 1.0 - i
        elif coupling == "i=1-f":
            i = 1.0 - f
        c_new = f * c + i * np.tanh(a_c)
        o = _sigmoid(a_o + p_o * (c_new if o_reads == "C_t" else c))
        h_new = o * np.tanh(c_new)
        live = (t < lens)[:, None]
        h, c = np.where(live, h_new, h), np.where(live, c_new, c)
        Y[t, 0] = np.where(live, h_new, 0.0)
    return Y, h[None], c[None]


def ref_stack(params, x, peephole: bool, coupling: str | None, lens, o_reads: str = "C_t"):
    """The stacked reference: [Y of the top layer, Y_h_l0, Y_c_l0, Y_h_l1, ...] like the graph."""
    outs = []
    for p in params:
        Y, yh, yc = ref_layer(x, p, peephole, coupling, lens, o_reads)
        outs += [yh, yc]
        x = Y[:, 0]
    return [Y, *outs]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - v))) for u, v in zip(a, b))


def quantize(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """The project's --int8 path (quantize_dynamic, per channel, reduce_range)."""
    from lstmgen.export.quantize import quantize_int8

    src, dst = tmp / "fp32.onnx", tmp / "int8.onnx"
    onnx.save(model, str(src))
    quantize_int8(src, dst)
    return onnx.load(str(dst))


CASES = [pytest.param(layers, with_lens, id=f"{layers}layer-{'lens' if with_lens else 'nolens'}")
         for layers in (1, 2) for with_lens in (True, False)]


# -- fp32 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, with_lens", CASES)
def test_plain_lstm_matches_the_reference(layers, with_lens):
    params, x = layer_params(layers), inputs_x()
    got = run_ort(build_graph(params, False, 0, with_lens), feeds(params, x, with_lens))
    assert max_diff(got, ref_stack(params, x, False, None, LENS if with_lens else None)) < FP32_ATOL


@pytest.mark.parametrize("layers, with_lens", CASES)
def test_peepholes_are_honoured_as_the_spec_says(layers, with_lens):
    params, x = layer_params(layers), inputs_x()
    lens = LENS if with_lens else None
    got = run_ort(build_graph(params, True, 0, with_lens), feeds(params, x, with_lens))
    assert max_diff(got, ref_stack(params, x, True, None, lens)) < FP32_ATOL
    # and P is really read, in the spec's block order (i, o, f), o reading the new cell state C_t
    assert max_diff(got, ref_stack(params, x, False, None, lens)) > MARGIN_FP32  # not ignored
    assert max_diff(got, ref_stack(params, x, True, None, lens, o_reads="C_t-1")) > MARGIN_FP32
    swapped = [{**p, "P": p["P"][:, np.r_[0:H, 2 * H:3 * H, H:2 * H]]} for p in params]  # as (i, f, o)
    assert max_diff(got, ref_stack(swapped, x, True, None, lens)) > MARGIN_FP32


@pytest.mark.parametrize("peephole", [False, True], ids=["coupled", "peephole+coupled"])
@pytest.mark.parametrize("layers, with_lens", CASES)
def test_input_forget_couples_as_f_equals_one_minus_i(layers, with_lens, peephole):
    # The spec gives no equation for input_forget=1. onnxruntime 1.32.0's CPU kernel (and
    # DynamicQuantizeLSTM, below) computes i_t as usual and sets f_t = 1 - i_t: the forget gate's
    # rows of W, R, B and its peephole p_f are never read. Not the CIFG of Greff et al. / TFLite
    # (i_t = 1 - f_t), and not the uncoupled cell. If ORT changes its reading, this test fails.
    params, x = layer_params(layers), inputs_x()
    lens = LENS if with_lens else None
    got = run_ort(build_graph(params, peephole, 1, with_lens), feeds(params, x, with_lens))
    assert max_diff(got, ref_stack(params, x, peephole, "f=1-i", lens)) < FP32_ATOL
    assert max_diff(got, ref_stack(params, x, peephole, None, lens)) > MARGIN_FP32  # the attribute is not ignored
    assert max_diff(got, ref_stack(params, x, peephole, "i=1-f", lens)) > MARGIN_FP32  # nor read as CIFG
    # the forget gate's weights are dead: change them and nothing moves
    dead = [{**p, "W": p["W"].copy(), "R": p["R"].copy(), "B": p["B"].copy(), "P": p["P"].copy()}
            for p in params]
    for p in dead:
        p["W"][0, 2 * H:3 * H] = 7.0
        p["R"][0, 2 * H:3 * H] = -7.0
        p["B"][0, 2 * H:3 * H] = p["B"][0, 6 * H:7 * H] = 3.0
        p["P"][0, 2 * H:] = 5.0
    again = run_ort(build_graph(dead, peephole, 1, with_lens), feeds(dead, x, with_lens))
    assert max_diff(again, got) == 0.0


def cifg_as_lstm(params: list[dict], input_forget: int) -> list[dict]:
    """Weights of a CIFG cell (i = 1 - f, forget gate trained) laid out for the ONNX op. The
    input-gate slot gets the negated forget-gate pre-activation (rows of W, R, both biases and the
    peephole), since sigmoid(-a) = 1 - sigmoid(a). With input_forget=1 (ORT: f = 1 - i) the
    forget-gate slot is unused (zeros); with input_forget=0 it keeps the forget gate, so the plain
    equations of the spec compute i = 1 - f with no reliance on the attribute's meaning."""
    out = []
    for p in params:
        q = {n: p[n].copy() for n in p}
        fill = (lambda a: 0.0) if input_forget else (lambda a: a)  # noqa: E731
        for n in ("W", "R"):
            q[n][0, 0:H], q[n][0, 2 * H:3 * H] = -p[n][0, 2 * H:3 * H], fill(p[n][0, 2 * H:3 * H])
        for b in (0, 4 * H):  # Wb, then Rb
            f_rows = p["B"][0, b + 2 * H:b + 3 * H]
            q["B"][0, b:b + H], q["B"][0, b + 2 * H:b + 3 * H] = -f_rows, fill(f_rows)
        q["P"][0, 0:H], q["P"][0, 2 * H:] = -p["P"][0, 2 * H:], fill(p["P"][0, 2 * H:])
        out.append(q)
    return out


@pytest.mark.parametrize("input_forget", [1, 0], ids=["input_forget=1", "input_forget=0"])
@pytest.mark.parametrize("peephole", [False, True], ids=["cifg", "peephole+cifg"])
@pytest.mark.parametrize("layers, with_lens", CASES)
def test_a_cifg_cell_exports_with_the_input_gate_negated(layers, with_lens, peephole, input_forget):
    params, x = layer_params(layers), inputs_x()
    lens = LENS if with_lens else None
    want = ref_stack(params, x, peephole, "i=1-f", lens)  # the CIFG cell with its trained forget gate
    mapped = cifg_as_lstm(params, input_forget)
    model = build_graph(mapped, peephole, input_forget, with_lens)
    assert max_diff(run_ort(model, feeds(mapped, x, with_lens)), want) < FP32_ATOL
    if input_forget == 0 and not with_lens:  # the attribute-free form runs the same on onnx's evaluator
        from onnx.reference import ReferenceEvaluator

        assert max_diff(ReferenceEvaluator(model).run(None, feeds(mapped, x, False)), want) < FP32_ATOL


def test_onnx_reference_evaluator_ignores_input_forget():
    # onnx 1.23.2's own ReferenceEvaluator takes input_forget and does nothing with it (it runs the
    # uncoupled equations), another sign that the spec leaves the coupling undefined. It also ignores
    # sequence_lens, hence none here. P is honoured there as in ORT.
    from onnx.reference import ReferenceEvaluator

    params, x = layer_params(1), inputs_x()
    got = ReferenceEvaluator(build_graph(params, True, 1, False)).run(None, feeds(params, x, False))
    assert max_diff(got, ref_stack(params, x, True, None, None)) < FP32_ATOL


# -- int8: quantize_dynamic -> DynamicQuantizeLSTM ------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layers, with_lens", [(1, True), (2, True), (2, False)])
def test_dynamic_quantization_keeps_p_and_input_forget(variant, layers, with_lens, tmp_path):
    peephole, input_forget = VARIANTS[variant]
    params, x = layer_params(layers), inputs_x()
    lens = LENS if with_lens else None
    q = quantize(build_graph(params, peephole, input_forget, with_lens), tmp_path)
    lstms = [n for n in q.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    assert len(lstms) == layers and not any(n.op_type == "LSTM" for n in q.graph.node)
    inits = {t.name: t for t in q.graph.initializer}
    for k, n in enumerate(lstms):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("input_forget", 0) == input_forget
        assert n.input[7] == (f"P_l{k}" if peephole else "")  # P kept, unquantized
        if peephole:
            np.testing.assert_array_equal(numpy_helper.to_array(inits[f"P_l{k}"]), params[k]["P"])
    got = run_ort(q, feeds(params, x, with_lens))
    coupling = "f=1-i" if input_forget else None
    assert max_diff(got, ref_stack(params, x, peephole, coupling, lens)) < INT8_ATOL
    if peephole:  # P is read by the int8 kernel too, not only kept in the graph
        assert max_diff(got, ref_stack(params, x, False, coupling, lens)) > MARGIN_INT8
    if input_forget:  # coupled the same way as the fp32 kernel
        assert max_diff(got, ref_stack(params, x, peephole, None, lens)) > MARGIN_INT8
        assert max_diff(got, ref_stack(params, x, peephole, "i=1-f", lens)) > MARGIN_INT8


@pytest.mark.parametrize("input_forget", [1, 0], ids=["input_forget=1", "input_forget=0"])
@pytest.mark.parametrize("peephole", [False, True], ids=["cifg", "peephole+cifg"])
def test_a_cifg_cell_survives_dynamic_quantization(peephole, input_forget, tmp_path):
    params, x = layer_params(2), inputs_x()
    mapped = cifg_as_lstm(params, input_forget)
    q = quantize(build_graph(mapped, peephole, input_forget, True), tmp_path)
    want = ref_stack(params, x, peephole, "i=1-f", LENS)
    assert max_diff(run_ort(q, feeds(mapped, x, True)), want) < INT8_ATOL


def _table() -> None:  # pragma: no cover - prints the figures of docs/results.md
    import tempfile

    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; T={T} B={B} H={H} I={I}")
    print("| variant | layers | sequence_lens | ORT fp32 vs its reference | ORT int8 vs its reference |"
          " ORT fp32 vs the uncoupled / P-less reading |")
    for name, (peephole, input_forget) in VARIANTS.items():
        for layers in (1, 2):
            for with_lens in (True, False):
                params, x = layer_params(layers), inputs_x()
                lens = LENS if with_lens else None
                coupling = "f=1-i" if input_forget else None
                m = build_graph(params, peephole, input_forget, with_lens)
                f = feeds(params, x, with_lens)
                fp = run_ort(m, f)
                with tempfile.TemporaryDirectory() as d:
                    i8 = run_ort(quantize(m, Path(d)), f)
                want = ref_stack(params, x, peephole, coupling, lens)
                other = ref_stack(params, x, False, None, lens) if (peephole or input_forget) else want
                miss = f"{max_diff(fp, other):.2f}" if other is not want else "-"
                print(f"| {name} | {layers} | {'yes' if with_lens else 'no'} | {max_diff(fp, want):.1e} | "
                      f"{max_diff(i8, want):.1e} | {miss} |")
    print("CIFG (i = 1 - f) cell, negated forget gate in the input-gate slot, vs the CIFG reference:")
    for layers in (1, 2):
        params, x = layer_params(layers), inputs_x()
        for peephole in (False, True):
            want = ref_stack(params, x, peephole, "i=1-f", LENS)
            plain_read = max_diff(run_ort(build_graph(params, peephole, 1, True), feeds(params, x, True)), want)
            for input_forget in (1, 0):
                mapped = cifg_as_lstm(params, input_forget)
                m, f = build_graph(mapped, peephole, input_forget, True), feeds(mapped, x, True)
                with tempfile.TemporaryDirectory() as d:
                    i8 = run_ort(quantize(m, Path(d)), f)
                print(f"  layers {layers} peephole {peephole} input_forget={input_forget}: fp32 "
                      f"{max_diff(run_ort(m, f), want):.1e}, int8 {max_diff(i8, want):.1e} "
                      f"(unmapped weights with input_forget=1 miss by {plain_read:.2f})")


if __name__ == "__main__":
    _table()
