"""GRU language models through `lstmgen export`: the ONNX GRU op (gates reordered, linear_before_reset=1),
the state as (h,) in the graphs and the manifest, parity with PyTorch, and --int8 refused."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lstmgen.bundle import StateTensor, load_manifest
from lstmgen.cli import main
from lstmgen.errors import UsageError
from lstmgen.export import onnx_graph, parity
from lstmgen.export.bundle import export_bundle
from lstmgen.export.parity import ParityError
from lstmgen.train.checkpoint import Checkpoint, save_checkpoint
from lstmgen.train.config import ModelConfig, TrainConfig
from lstmgen.train.model import RecurrentLM
from lstmgen.vocab import Vocab

pytestmark = pytest.mark.usefixtures("torch_one_thread")
VOCAB = Vocab.build("char", ["abcdefghijklmnopqrstuvwxyz .,!?\n"])  # 32 symbols


def gru_model(num_layers: int = 2, tie: bool = False, seed: int = 0) -> RecurrentLM:
    cfg = ModelConfig(len(VOCAB), 16, 16, num_layers, tie_weights=tie, cell="gru")
    torch.manual_seed(seed)
    model = RecurrentLM(cfg).eval()
    with torch.no_grad():  # larger than the default init, so greedy decoding is not all one token
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


def gru_run(run_dir, num_layers: int = 2, tie: bool = False):
    model = gru_model(num_layers, tie)
    tc = TrainConfig(cell="gru", embedding_size=16, hidden_size=16, num_layers=num_layers, tie_weights=tie)
    save_checkpoint(Checkpoint(model.cfg, tc, VOCAB, model.state_dict(), corpus={"path": "tiny.txt"}),
                    run_dir / "best.pt")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return gru_run(tmp_path_factory.mktemp("gru"))


def ort_session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("num_layers,tie", [(2, False), (1, False), (3, True)])
def test_gru_exports_a_verified_bundle(tmp_path, num_layers, tie):
    run = gru_run(tmp_path / "run", num_layers, tie)
    manifest, report = export_bundle(run, tmp_path / "b", verify_steps=60)
    assert load_manifest(tmp_path / "b") == manifest
    assert (manifest.kind, manifest.cell) == ("text", "gru")
    assert manifest.state_tensors == (StateTensor("h", (num_layers, 16)),)
    assert manifest.inputs == ("tokens", "h") and manifest.outputs == ("logits", "h_out")
    assert manifest.prompt_inputs == ("tokens", "lengths", "h")
    for s in report.fp32.step:
        assert s.tokens_identical and s.max_logit_diff < 1e-4
    assert report.fp32.prompt.max_logit_diff < 1e-4 and report.fp32.prompt.max_state_diff < 1e-4
    for name in ("model.onnx", "prompt.onnx"):
        graph = onnx.load(str(tmp_path / "b" / name))
        ops = Counter(n.op_type for n in graph.graph.node)
        assert ops["GRU"] == num_layers and ops["LSTM"] == 0
        gru = next(n for n in graph.graph.node if n.op_type == "GRU")
        assert {a.name: onnx.helper.get_attribute_value(a) for a in gru.attribute}["linear_before_reset"] == 1
        assert [i.name for i in graph.graph.input][-1] == "h"
        assert [o.name for o in graph.graph.output] == ["logits", "h_out"]
        props = {p.key: p.value for p in graph.metadata_props}
        assert props["lstmgen.cell"] == "gru"


def test_bundle_generates_the_same_50_tokens_as_pytorch(tmp_path, run_dir):
    """Greedy decoding of the logits plus a fixed noise per step (Gumbel-max: seeded sampling), since
    plain greedy from random weights repeats one token; equal tokens need equal logits all along."""
    export_bundle(run_dir, tmp_path / "b", verify=False)
    sess = ort_session(tmp_path / "b" / "model.onnx")
    model = gru_model()
    noise = np.random.default_rng(3).gumbel(size=(50, len(VOCAB))).astype(np.float32)  # [steps, V]
    prompt = VOCAB.encode("the cat sat")
    with torch.inference_mode():
        logits_t, state_t = model(torch.tensor(prompt)[:, None], model.init_state(1))  # the prompt at once
        want = [int((logits_t[-1, 0].numpy() + noise[0]).argmax())]
        for t in range(1, 50):
            logits_t, state_t = model(torch.tensor([[want[-1]]]), state_t)
            want.append(int((logits_t[0, 0].numpy() + noise[t]).argmax()))
    h = np.zeros((2, 1, 16), np.float32)
    for tok in prompt:  # the bundle's step graph alone, token by token
        logits, h = sess.run(None, {"tokens": np.array([tok], np.int64), "h": h})
    got = [int((logits[0] + noise[0]).argmax())]
    for t in range(1, 50):
        logits, h = sess.run(None, {"tokens": np.array([got[-1]], np.int64), "h": h})
        got.append(int((logits[0] + noise[t]).argmax()))
    assert got == want and len(set(got)) > 10
    np.testing.assert_allclose(h, state_t[0].numpy(), atol=1e-5)


def test_prompt_graph_matches_stepping_at_once(tmp_path, run_dir):
    export_bundle(run_dir, tmp_path / "b", verify=False)
    prompts = parity.verification_prompts(parity.default_prompt(32), 32, 5)
    res = parity.check_prompt(ort_session(tmp_path / "b" / "prompt.onnx"), ort_session(tmp_path / "b" / "model.onnx"),
                              prompts, 2, 16, cell="gru")
    assert res.max_logit_diff < 1e-4 and len(set(res.lengths)) == 5


def test_gru_gate_reorder_is_torch_rzn_to_onnx_zrh():
    H = 2
    w = np.repeat(np.arange(3, dtype=np.float32), H)[:, None]  # gate blocks r=0 z=1 n=2
    assert onnx_graph.reorder_gates(w, H, onnx_graph.TORCH_TO_ONNX_GRU_GATES)[:, 0].tolist() == [1, 1, 0, 0, 2, 2]


def test_pytorch_order_gates_are_caught_and_leave_no_bundle(tmp_path, run_dir, monkeypatch):
    monkeypatch.setattr(onnx_graph, "TORCH_TO_ONNX_GRU_GATES", (0, 1, 2))  # r and z not swapped
    with pytest.raises(ParityError, match=r"batch 1, step \d+"):
        export_bundle(run_dir, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_linear_before_reset_0_would_not_be_pytorch(tmp_path):
    """Why the attribute is set: the default (reset before the recurrent matmul) is another cell."""
    model = gru_model()
    step = onnx_graph.build_step_graph(model.state_dict(), model.cfg)
    for node in step.graph.node:
        for a in node.attribute:
            if a.name == "linear_before_reset":
                a.i = 0
    onnx.save(step, str(tmp_path / "lbr0.onnx"))
    res = parity.check_step(model, ort_session(tmp_path / "lbr0.onnx"), [[1, 2, 3, 4]], steps=20, strict=False)
    assert res.max_logit_diff > 1e-2


def test_int8_is_refused_for_a_gru(tmp_path, run_dir):
    with pytest.raises(UsageError, match="--int8 is for LSTM models; this is a GRU"):
        export_bundle(run_dir, tmp_path / "b", int8=True)
    assert not (tmp_path / "b").exists()


def test_cli_export_of_a_gru(tmp_path, run_dir, capsys):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b"), "--verify-steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "gru 2 x 16" in out and "identical" in out and "prompt graph" in out
    assert main(["export", str(run_dir), "--out", str(tmp_path / "q"), "--int8"]) == 2
    assert "--int8 is for LSTM models" in capsys.readouterr().err
