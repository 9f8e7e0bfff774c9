"""The hand-built ONNX graphs against the PyTorch model, at tiny size (vocab 32, hidden 16)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from lstmgen.bundle import PROMPT_INPUTS, STEP_INPUTS, STEP_OUTPUTS
from lstmgen.export import onnx_graph, parity
from lstmgen.export.onnx_graph import build_prompt_graph, build_step_graph
from lstmgen.train.config import ModelConfig
from lstmgen.train.model import RecurrentLM

CONFIGS = {
    "2-layer": ModelConfig(32, 16, 16, 2),
    "tied": ModelConfig(32, 16, 16, 2, tie_weights=True),
    "1-layer": ModelConfig(32, 16, 24, 1),
    "3-layer-narrow-embedding": ModelConfig(32, 8, 16, 3),
}


def tiny_model(cfg: ModelConfig, seed: int = 0) -> RecurrentLM:
    torch.manual_seed(seed)
    model = RecurrentLM(cfg).eval()
    with torch.no_grad():  # larger than PyTorch's default init, so the logits are not all ~0
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # see parity.session: no spinning pool next to PyTorch's threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.fixture(params=list(CONFIGS), scope="module")
def exported(request):
    cfg = CONFIGS[request.param]
    model = tiny_model(cfg)
    step = build_step_graph(model.state_dict(), cfg)
    prompt = build_prompt_graph(model.state_dict(), cfg)
    return cfg, model, step, prompt


def test_graphs_pass_the_full_checker(exported):
    _, _, step, prompt = exported
    onnx.checker.check_model(step, full_check=True)
    onnx.checker.check_model(prompt, full_check=True)
    assert step.producer_name == prompt.producer_name == "lstmgen"
    assert step.opset_import[0].version == onnx_graph.DEFAULT_OPSET
    assert step.graph.doc_string and prompt.graph.doc_string


def test_step_graph_contract(exported):
    cfg, _, step, _ = exported
    L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    ins = {i.name: i for i in step.graph.input}
    outs = {o.name: o for o in step.graph.output}
    assert tuple(ins) == STEP_INPUTS and tuple(outs) == STEP_OUTPUTS
    assert ins["tokens"].type.tensor_type.elem_type == TensorProto.INT64
    assert dims(ins["tokens"]) == ["batch"]
    for name in ("h", "c"):
        assert ins[name].type.tensor_type.elem_type == TensorProto.FLOAT
        assert dims(ins[name]) == [L, "batch", H]
    assert dims(outs["logits"]) == ["batch", V]
    assert dims(outs["h_out"]) == dims(outs["c_out"]) == [L, "batch", H]
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in outs.values())
    # one plain LSTM op per layer, weights as initializers (what quantize_dynamic looks for)
    lstms = [n for n in step.graph.node if n.op_type == "LSTM"]
    inits = {i.name for i in step.graph.initializer}
    assert len(lstms) == L and all(n.input[1] in inits and n.input[2] in inits for n in lstms)


def test_prompt_graph_contract(exported):
    cfg, _, _, prompt = exported
    ins = {i.name: i for i in prompt.graph.input}
    assert tuple(ins) == PROMPT_INPUTS
    assert dims(ins["tokens"]) == ["batch", "time"]
    assert ins["lengths"].type.tensor_type.elem_type == TensorProto.INT32
    assert dims(ins["lengths"]) == ["batch"]
    assert tuple(o.name for o in prompt.graph.output) == STEP_OUTPUTS
    assert all(n.input[4] == "lengths" for n in prompt.graph.node if n.op_type == "LSTM")


@pytest.mark.parametrize("batch", [1, 7])
def test_step_graph_matches_pytorch(exported, batch):
    cfg, model, step, _ = exported
    rng = np.random.default_rng(batch)
    shape = (cfg.num_layers, batch, cfg.hidden_size)
    h, c = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    tokens = rng.integers(cfg.vocab_size, size=batch)
    logits, h_out, c_out = session(step).run(None, {"tokens": tokens, "h": h, "c": c})
    with torch.no_grad():
        ref, (rh, rc) = model(torch.from_numpy(tokens)[None], (torch.from_numpy(h), torch.from_numpy(c)))
    assert logits.shape == (batch, cfg.vocab_size) and h_out.shape == shape
    np.testing.assert_allclose(logits, ref[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(h_out, rh.numpy(), atol=1e-5)
    np.testing.assert_allclose(c_out, rc.numpy(), atol=1e-5)


def test_greedy_parity_over_200_steps(exported):
    cfg, model, step, _ = exported
    first = parity.default_prompt(cfg.vocab_size)
    sess = session(step)
    for batch in (1, 7):
        prompts = parity.verification_prompts(first, cfg.vocab_size, batch)
        res = parity.check_step(model, sess, prompts, steps=200)
        assert res.tokens_identical and res.token_agreement == 1.0
        assert res.steps >= 200 and res.max_logit_diff < 1e-4, res


def test_prompt_graph_matches_stepping(exported):
    cfg, _, step, prompt = exported
    prompts = parity.verification_prompts(parity.default_prompt(cfg.vocab_size, 13), cfg.vocab_size, 7)
    assert len({len(p) for p in prompts}) > 3  # mixed lengths, right-padded in one call
    res = parity.check_prompt(session(prompt), session(step), prompts, cfg.num_layers, cfg.hidden_size)
    assert res.max_logit_diff < 1e-4 and res.max_state_diff < 1e-4


def test_tied_weights_are_stored_once():
    cfg = CONFIGS["tied"]
    step = build_step_graph(tiny_model(cfg).state_dict(), cfg)
    big = [i.name for i in step.graph.initializer if list(i.dims) == [cfg.vocab_size, cfg.embedding_size]]
    assert big == ["embed.weight"]
    gemm = next(n for n in step.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == "embed.weight"


def test_gate_reorder_is_torch_ifgo_to_onnx_iofc():
    H = 2
    w = np.repeat(np.arange(4, dtype=np.float32), H)[:, None]  # gate blocks i=0 f=1 g=2 o=3
    assert onnx_graph.reorder_gates(w, H)[:, 0].tolist() == [0, 0, 3, 3, 1, 1, 2, 2]


@pytest.mark.parametrize("opset", [14, 21])
def test_other_opsets(opset):
    cfg = CONFIGS["2-layer"]
    model = tiny_model(cfg)
    step = build_step_graph(model.state_dict(), cfg, opset)
    onnx.checker.check_model(step, full_check=True)
    res = parity.check_step(model, session(step), [[1, 2, 3]], steps=20)
    assert res.tokens_identical


def test_opset_too_old_and_mismatched_state_dict():
    cfg = CONFIGS["2-layer"]
    sd = tiny_model(cfg).state_dict()
    with pytest.raises(ValueError, match="opset"):
        build_step_graph(sd, cfg, 12)
    with pytest.raises(onnx_graph.GraphError, match="weight_ih_l0"):
        build_step_graph(sd, ModelConfig(32, 16, 20, 2))
