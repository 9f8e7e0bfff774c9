"""The LSTM variants `--cell peephole` and `--cell cifg` end to end: the PyTorch cell (train/cells.py)
and the ONNX graph our exporter writes, each against a float64 numpy reference of the equations;
a tiny language model and a tiny frame model of each cell trained, exported with parity (fp32 and
int8) and served, the state handed off; and the CUDA provider refused for a peephole bundle."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import start_server
from lstmgen.bundle import load_manifest
from lstmgen.errors import UsageError
from lstmgen.export.bundle import export_bundle
from lstmgen.export.onnx_graph import Builder, make_model, rnn_stack, rnn_weights
from lstmgen.serve import engine
from lstmgen.train.cells import VariantLSTM
from lstmgen.train.config import ModelConfig
from lstmgen.train.model import RecurrentLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")
CELLS = ("peephole", "cifg")
T, B, I, H, L = 6, 3, 5, 4, 2  # steps, batch, input, hidden, layers
LENS = np.array([6, 2, 4])  # per-row lengths of the packed / sequence_lens cases


# -- the float64 reference of the equations (train/cells.py), on torch's parameter layout -----------
def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def reference(cell: str, params: list[dict], x, h0, c0, lens=None, wrong: bool = False):
    """x [T, B, I], h0/c0 [L, B, H], params per layer (torch layout, float64). Rows past their length
    keep their state and output zeros (as the ONNX op with sequence_lens). wrong=True: a misreading
    the checks must tell apart (peephole: P dropped; cifg: i = f, the sign lost). Returns y [T, B, H],
    h, c [L, B, H]."""
    lens = np.full(x.shape[1], x.shape[0]) if lens is None else lens
    hs, cs = [], []
    for k, p in enumerate(params):
        h, c = h0[k], c0[k]
        ys = np.zeros((x.shape[0], x.shape[1], H))
        for t in range(x.shape[0]):
            a = x[t] @ p["weight_ih"].T + p["bias_ih"] + h @ p["weight_hh"].T + p["bias_hh"]
            if cell == "peephole":
                p_i, p_f, p_o = np.split(np.zeros(3 * H) if wrong else p["weight_peep"], 3)
                a_i, a_f, a_g, a_o = np.split(a, 4, axis=-1)
                i, f = _sigmoid(a_i + p_i * c), _sigmoid(a_f + p_f * c)
                c_new = f * c + i * np.tanh(a_g)
                o = _sigmoid(a_o + p_o * c_new)  # the new cell state, as ONNX says
            else:  # cifg: no input gate of its own, i = 1 - f
                a_f, a_g, a_o = np.split(a, 3, axis=-1)
                f = _sigmoid(a_f)
                c_new = f * c + (f if wrong else 1.0 - f) * np.tanh(a_g)
                o = _sigmoid(a_o)
            h_new = o * np.tanh(c_new)
            live = (t < lens)[:, None]
            h, c = np.where(live, h_new, h), np.where(live, c_new, c)
            ys[t] = np.where(live, h_new, 0.0)
        hs.append(h)
        cs.append(c)
        x = ys
    return ys, np.stack(hs), np.stack(cs)


def variant(cell: str, seed: int = 0) -> VariantLSTM:
    """Weights larger than the default init, so gates saturate differently and peepholes matter."""
    torch.manual_seed(seed)
    rnn = VariantLSTM(cell, I, H, L).double()
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            p.uniform_(-1.5, 1.5) if "peep" in name else p.uniform_(-0.6, 0.6)
    return rnn


def layer_params(rnn: VariantLSTM) -> list[dict]:
    return [{n: v.detach().double().numpy() for n, v in rnn.layer(k).items()} for k in range(rnn.num_layers)]


def inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (T, B, I)), rng.uniform(-0.8, 0.8, (L, B, H)), rng.uniform(-1.5, 1.5, (L, B, H)))


def max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(u, np.float64) - v).max()) for u, v in zip(a, b))


# -- (1) the graph our exporter writes, in ONNX Runtime, vs the reference --------------------------
def exported_stack(rnn: VariantLSTM) -> onnx.ModelProto:
    """export/onnx_graph.py's recurrent stack alone: x [T, B, I], lens, h, c -> Y [T, 1, B, H], h_out, c_out."""
    cell = rnn.cell
    sd = {f"{cell}.{k}": v for k, v in rnn.state_dict().items()}
    g = Builder()
    _, top_y = rnn_stack(g, rnn_weights(sd, cell, I, H, L), "x", ("h", "c"), ("h_out", "c_out"), "lens",
                         top_sequence=True)
    f32 = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("x", f32, [T, B, I]),
           helper.make_tensor_value_info("lens", TensorProto.INT32, [B]),
           *(helper.make_tensor_value_info(n, f32, [L, B, H]) for n in ("h", "c"))]
    outs = [helper.make_tensor_value_info(top_y, f32, [T, 1, B, H]),
            *(helper.make_tensor_value_info(n, f32, [L, B, H]) for n in ("h_out", "c_out"))]
    return make_model(g, "stack", "test", ins, outs, {}, 17)


@pytest.mark.parametrize("cell", CELLS)
def test_exported_lstm_nodes_compute_the_cell(cell):
    rnn = variant(cell)
    model = exported_stack(rnn)
    onnx.checker.check_model(model, full_check=True)
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert len(lstms) == L
    for n in lstms:  # a plain LSTM node for cifg (no attribute whose meaning runtimes disagree on)
        assert [a.name for a in n.attribute if a.name == "input_forget"] == []
        assert (len(n.input) == 8 and n.input[7] != "") == (cell == "peephole")
    x, h0, c0 = inputs()
    feeds = {"x": x.astype(np.float32), "lens": LENS.astype(np.int32),
             "h": h0.astype(np.float32), "c": c0.astype(np.float32)}
    y, h, c = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    params = layer_params(rnn)
    want = reference(cell, params, x, h0, c0, LENS)
    assert max_diff([y[:, 0], h, c], want) < 1e-5
    # P really read (peephole), the input gate really 1 - f (cifg): the misreading is far off
    assert max_diff([y[:, 0], h, c], reference(cell, params, x, h0, c0, LENS, wrong=True)) > 1e-2


# -- (2) the PyTorch cell vs the same reference -----------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_torch_cell_computes_the_equations(cell):
    rnn = variant(cell).eval()
    x, h0, c0 = inputs()
    with torch.no_grad():
        y, (h, c) = rnn(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    params = layer_params(rnn)
    assert max_diff([y, h, c], reference(cell, params, x, h0, c0)) < 1e-10
    # packed rows of different lengths: the state stops at each row's last step, as in ONNX
    packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(LENS), enforce_sorted=False)
    with torch.no_grad():
        yp, (hp, cp) = rnn(packed, (torch.from_numpy(h0), torch.from_numpy(c0)))
    yp, lens = pad_packed_sequence(yp, total_length=T)
    assert lens.tolist() == LENS.tolist()
    assert max_diff([yp, hp, cp], reference(cell, params, x, h0, c0, LENS)) < 1e-10


@pytest.mark.parametrize("cell", CELLS)
def test_parameters_are_laid_out_for_export_and_all_trained(cell):
    rnn = VariantLSTM(cell, I, H, L, dropout=0.5)
    gates = 4 if cell == "peephole" else 3  # cifg: the input gate has no weights of its own
    shapes = {n: tuple(p.shape) for n, p in rnn.named_parameters()}
    want = {f"{n}_l{k}": s for k in range(L) for n, s in (
        ("weight_ih", (gates * H, I if k == 0 else H)), ("weight_hh", (gates * H, H)),
        ("bias_ih", (gates * H,)), ("bias_hh", (gates * H,)))}
    if cell == "peephole":
        want.update({f"weight_peep_l{k}": (3 * H,) for k in range(L)})
    assert shapes == want
    assert all(p.abs().max() <= H ** -0.5 for p in rnn.parameters())  # nn.LSTM's init, peepholes too
    x = torch.randn(T, B, I)
    y, (h, c) = rnn.train()(x, (torch.zeros(L, B, H), torch.zeros(L, B, H)))
    (y.sum() + c.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rnn.parameters())
    torch.manual_seed(0)
    a = rnn(x)[0]
    torch.manual_seed(1)
    assert not torch.equal(a, rnn(x)[0])  # dropout between the layers in training
    rnn.eval()
    assert torch.equal(rnn(x)[0], rnn(x)[0])
    model = RecurrentLM(ModelConfig(10, 8, H, L, init_scale=0.05, cell=cell))  # Zaremba's init reaches them
    assert model.rnn is getattr(model, cell) and all(p.abs().max() <= 0.05 for p in model.parameters())
    assert {k.split(".")[0] for k in model.state_dict()} == {"embed", cell, "head"}


# -- (3) a tiny language model: trained, exported with parity, served, state handed off ------------
@pytest.fixture(scope="module")
def text_bundles(tmp_path_factory):
    from lstmgen.cli import main

    d = tmp_path_factory.mktemp("cells")
    data = d / "c.txt"
    data.write_text("".join(f"the cat {i % 5} sat on the mat {i % 3}.\n" for i in range(200)))
    out = {}
    for cell in CELLS:
        rc = main(["train", "--cell", cell, "--data", str(data), "--out", str(d / cell), "--preset", "tiny",
                   "--embedding-size", "16", "--hidden-size", "24", "--batch-size", "4", "--bptt", "16",
                   "--eval-batch-size", "4", "--max-steps", "12", "--device", "cpu", "--no-progress"])
        assert rc == 0
        fp32 = export_bundle(d / cell, d / f"{cell}-b", verify_steps=40)
        int8 = export_bundle(d / cell, d / f"{cell}-q", verify_steps=40, int8=True)
        out[cell] = (d / f"{cell}-b", fp32, int8)
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_text_bundle_is_verified_fp32_and_int8(text_bundles, cell):
    bundle, (manifest, report), (_, report8) = text_bundles[cell]
    assert load_manifest(bundle) == manifest and (manifest.kind, manifest.cell) == ("text", cell)
    assert manifest.inputs == ("tokens", "h", "c") and manifest.outputs == ("logits", "h_out", "c_out")
    assert [s.batch for s in report.fp32.step] == [1, 7]
    for s in report.fp32.step:
        assert s.tokens_identical and s.max_logit_diff < 1e-4 and s.steps >= 40
    assert report.fp32.prompt.max_logit_diff < 1e-4
    assert report8.int8 is not None and report8.int8.quantization == "int8-dynamic"
    for s in report8.int8.step:  # measured only; a dropped P or a lost sign would be far off
        assert s.max_logit_diff < 0.1 and s.token_agreement > 0.9
    graph = onnx.load(str(bundle / "model.onnx"))
    assert Counter(n.op_type for n in graph.graph.node)["LSTM"] == 2
    assert {p.key: p.value for p in graph.metadata_props}["lstmgen.cell"] == cell


def test_served_and_the_state_hands_off(text_bundles, tmp_path):
    from lstmgen_client import Client

    for cell in CELLS:
        srv = start_server(text_bundles[cell][0], tmp_path / f"{cell}.log")
        try:
            with Client(srv.target) as c:
                assert c.model_info().cell == cell
                for seed, params in enumerate([dict(greedy=True), dict(temperature=0.9, top_k=10)]):
                    full = c.generate("the cat", max_new_tokens=30, seed=seed, **params)
                    a = c.generate("the cat", max_new_tokens=12, seed=seed, return_state=True, **params)
                    assert a.finish_reason == "length" and a.state
                    b = c.generate("", state=a.state, max_new_tokens=18, seed=seed, **params)
                    assert a.text + b.text == full.text and len(full.text) > 0
        finally:
            assert srv.stop() == 0


# -- (4) a frame model per cell: trained on rows of different lengths, exported with parity ---------
@pytest.mark.parametrize("cell", CELLS)
def test_frame_model_exports_with_parity(tmp_path, cell):
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7, 3)).astype(np.float32)
    lengths = rng.integers(2, 8, size=40)  # packed sequences through the variant in training
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 3, lengths=lengths)
    cfg = preset("row-digits", epochs=1, hidden_size=8, num_layers=2, projection_size=4, cell=cell, device="cpu")
    best = train(cfg, str(tmp_path / "d.npz"), tmp_path / "run", log=lambda line: None, progress_bar=False)
    for int8 in (False, True):
        manifest, report = export_bundle(best, tmp_path / f"b{int8}", verify_steps=40, int8=int8)
        assert (manifest.kind, manifest.cell, manifest.inputs) == ("frames", cell, ("x", "h", "c"))
        for s in report.fp32.step:
            assert s.max_output_diff < 1e-4 and s.max_state_diff < 1e-4 and s.argmax_agreement == 1.0
        seq = report.fp32.sequence
        assert seq.max_output_diff < 1e-4 and seq.torch_output_diff < 1e-4 and seq.torch_state_diff < 1e-4
        if int8:
            assert all(s.max_output_diff < 0.1 for s in report.int8.step)


# -- (5) the CUDA provider -------------------------------------------------------------------------
def test_cuda_is_refused_for_a_peephole_bundle(monkeypatch, text_bundles):
    with pytest.raises(UsageError, match=r"--device cuda: this bundle's cell is 'peephole'.*CUDAExecutionProvider"
                                         r".*--device cpu"):
        engine.choose_providers("cuda", "peephole")
    with pytest.raises(UsageError, match="'peephole'"):  # the engine asks with its manifest's cell
        engine.Engine(text_bundles["peephole"][0], engine.EngineConfig(device="cuda"))
    monkeypatch.setattr(engine.ort, "get_available_providers", lambda: [engine.CUDA, engine.CPU])
    providers, why = engine.choose_providers("auto", "peephole")
    assert providers == [engine.CPU] and "'peephole'" in why
    # cifg is exported as a plain LSTM node (no P, input_forget 0), which cuDNN runs
    for cell in ("cifg", "lstm", "gru"):
        want = [engine.CUDA, engine.CPU]
        assert engine.choose_providers("auto", cell)[0] == engine.choose_providers("cuda", cell)[0] == want


def _bench(shape: str, updates: int, rounds: int) -> None:  # pragma: no cover - docs/results.md's speed table
    """Training tokens/s of each cell: embedding -> 2-layer cell -> head, dropout 0.5, Adam, at the
    char-rnn shape or a small one; rounds interleave the cells, the best round of each counts."""
    import time

    import torch.nn.functional as F
    from torch import nn

    V, E, Hs, Ls, Bs, Ts = (65, 128, 512, 2, 100, 100) if shape == "char" else (65, 64, 128, 2, 32, 64)
    steps, best = {}, {}
    for cell in ("lstm", "peephole", "cifg", "gru"):
        torch.manual_seed(0)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](E, Hs, Ls, dropout=0.5) if cell in ("lstm", "gru") \
            else VariantLSTM(cell, E, Hs, Ls, 0.5)
        m = nn.ModuleList([nn.Embedding(V, E), rnn, nn.Linear(Hs, V)])
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        x, y = torch.randint(V, (Ts, Bs)), torch.randint(V, (Ts, Bs))

        def step(m=m, opt=opt, cell=cell, x=x, y=y):
            zeros = torch.zeros(Ls, Bs, Hs)
            out, _ = m[1](F.dropout(m[0](x), 0.5, True), zeros if cell == "gru" else (zeros, zeros))
            loss = F.cross_entropy(m[2](F.dropout(out, 0.5, True)).view(-1, V), y.view(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        for _ in range(3):  # warm-up
            step()
        steps[cell], best[cell] = step, float("inf")
    for _ in range(rounds):
        for cell, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(updates):
                step()
            best[cell] = min(best[cell], time.perf_counter() - t0)
    for cell in steps:
        ratio = best[cell] / best["lstm"]
        print(f"{shape} {cell:9s} {updates * Ts * Bs / best[cell]:>9,.0f} tokens/s ({ratio:.2f}x nn.LSTM's time)")


if __name__ == "__main__":  # OMP_NUM_THREADS=2 python tests/test_cells.py
    _bench("char", 8, 3)
    _bench("small", 15, 4)
