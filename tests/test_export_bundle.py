"""export_bundle and `lstmgen export`: checkpoint on disk -> verified bundle folder."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from lstmgen.bundle import load_manifest, sha256_file
from lstmgen.cli import main
from lstmgen.export import onnx_graph, parity
from lstmgen.export.bundle import ExportError, export_bundle
from lstmgen.export.parity import ParityError
from lstmgen.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from lstmgen.train.config import ModelConfig, TrainConfig
from lstmgen.train.model import RecurrentLM
from lstmgen.vocab import Vocab

VOCAB = Vocab.build("char", ["abcdefghijklmnopqrstuvwxyz .,!?\n"])  # 32 symbols


def make_run(run_dir: Path, tie_weights: bool = False, num_layers: int = 2) -> Path:
    cfg = ModelConfig(len(VOCAB), 16, 16, num_layers, tie_weights=tie_weights)
    torch.manual_seed(0)
    model = RecurrentLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    ckpt = Checkpoint(cfg, TrainConfig(embedding_size=16, hidden_size=16, num_layers=num_layers),
                      VOCAB, model.state_dict(),
                      progress={"epoch": 3, "step": 120, "optimizer": {"state": {}}, "rng": torch.zeros(4)},
                      metrics={"best_val_loss": torch.tensor(2.25), "val_bpc": 3.2, "history": [{"epoch": 1}]},
                      corpus={"path": "data/tiny.txt", "sha256": "ab" * 32, "train_tokens": 1000})
    save_checkpoint(ckpt, run_dir / "best.pt")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("tie_weights,num_layers", [(False, 2), (True, 2), (False, 1)])
def test_export_writes_a_verified_bundle(tmp_path, tie_weights, num_layers):
    run = make_run(tmp_path / "run", tie_weights, num_layers)
    manifest, report = export_bundle(run, tmp_path / "bundle", verify_prompt="hello world")
    bundle = tmp_path / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx", "prompt.onnx"]
    loaded = load_manifest(bundle)  # checks the sha256 of both graphs
    assert loaded == manifest
    assert manifest.model_sha256 == sha256_file(bundle / "model.onnx")
    assert manifest.prompt_model_sha256 == sha256_file(bundle / "prompt.onnx")
    assert (manifest.num_layers, manifest.hidden_size, manifest.embedding_size) == (num_layers, 16, 16)
    assert manifest.vocab == VOCAB and manifest.level == "char" and manifest.opset == 17
    assert manifest.quantization == "fp32"
    for s in report.fp32.step:
        assert s.tokens_identical and s.steps >= 200 and s.max_logit_diff < 1e-4
    assert [s.batch for s in report.fp32.step] == [1, 7]
    assert report.fp32.prompt.max_logit_diff < 1e-4 and len(set(report.fp32.prompt.lengths)) > 3
    for name in ("model.onnx", "prompt.onnx"):
        onnx.checker.check_model(str(bundle / name), full_check=True)


def test_manifest_provenance(tmp_path, run_dir):
    manifest, _ = export_bundle(run_dir, tmp_path / "b")
    prov = manifest.provenance
    assert prov["checkpoint_sha256"] == sha256_file(run_dir / "best.pt")
    assert prov["corpus"]["path"] == "data/tiny.txt"
    assert prov["training"] == {"epoch": 3, "step": 120}  # no optimizer or RNG state
    assert prov["validation"] == {"best_val_loss": 2.25, "val_bpc": 3.2}
    assert prov["versions"]["lstmgen"] and prov["exported_at"]
    assert prov["parity"]["fp32"]["step"][1]["batch"] == 7


def test_no_prompt_graph_and_no_verify(tmp_path, run_dir):
    manifest, report = export_bundle(run_dir / "best.pt", tmp_path / "b", prompt_graph=False, verify=False)
    assert report is None and manifest.prompt_model_file is None
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "model.onnx"]
    load_manifest(tmp_path / "b")


def test_swapped_gate_order_is_caught_and_leaves_no_bundle(tmp_path, run_dir, monkeypatch):
    export_bundle(run_dir, tmp_path / "b", prompt_graph=False)  # a good bundle first
    before = sha256_file(tmp_path / "b" / "model.onnx")
    monkeypatch.setattr(onnx_graph, "TORCH_TO_ONNX_GATES", (0, 1, 2, 3))  # PyTorch order, unconverted
    with pytest.raises(ParityError, match=r"batch 1, step \d+, row 0"):
        export_bundle(run_dir, tmp_path / "b")
    assert sha256_file(tmp_path / "b" / "model.onnx") == before  # the earlier bundle is untouched
    with pytest.raises(ParityError):
        export_bundle(run_dir, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no half bundle, no temporaries


def test_corrupt_initializer_is_caught(tmp_path, run_dir):
    export_bundle(run_dir, tmp_path / "b", verify=False)
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    bias = next(i for i in model.graph.initializer if i.name == "head.bias")
    arr = onnx.numpy_helper.to_array(bias).copy()
    arr[3] += 0.05  # too small to flip many argmaxes, far above the logit tolerance
    bias.CopyFrom(onnx.numpy_helper.from_array(arr, "head.bias"))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    torch_model = load_checkpoint(run_dir).build_model()
    with pytest.raises(ParityError, match="logit|token"):
        parity.check_graphs(torch_model, str(tmp_path / "bad.onnx"), None, [1, 2, 3], steps=20)


def test_prompt_graph_mismatch_is_caught(tmp_path, run_dir):
    export_bundle(run_dir, tmp_path / "b")
    ckpt = load_checkpoint(run_dir)
    sd = {k: v + 0.01 for k, v in ckpt.state_dict.items()}  # same shapes, other weights
    onnx.save(onnx_graph.build_prompt_graph(sd, ckpt.model_config), str(tmp_path / "p.onnx"))
    prompts = parity.verification_prompts([1, 2, 3, 4, 5], 32, 4)
    with pytest.raises(ParityError, match="prompt graph row 0"):
        parity.check_prompt(parity.session(str(tmp_path / "p.onnx")),
                            parity.session(str(tmp_path / "b" / "model.onnx")), prompts, 2, 16)


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path, run_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(run_dir, tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"


def test_missing_checkpoint_and_bad_prompt(tmp_path, run_dir):
    with pytest.raises(CheckpointError):
        export_bundle(tmp_path / "nope", tmp_path / "b")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        export_bundle(run_dir, tmp_path / "b", verify_prompt="HELLO")
    assert not (tmp_path / "b").exists()


def test_int8_quantizes_the_lstm_ops(tmp_path, run_dir):
    manifest, report = export_bundle(run_dir, tmp_path / "q", int8=True)
    assert manifest.quantization == "int8-dynamic"
    load_manifest(tmp_path / "q")
    for name in ("model.onnx", "prompt.onnx"):
        ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "q" / name)).graph.node)
        assert ops["DynamicQuantizeLSTM"] == 2 and ops["LSTM"] == 0
        assert ops["MatMulInteger"] == 1  # the head
    assert report.fp32.step[0].tokens_identical  # fp32 is verified before quantizing
    assert report.int8 is not None and report.int8.quantization == "int8-dynamic"
    for s in report.int8.step:
        assert 0.5 <= s.token_agreement <= 1.0 and s.max_logit_diff > 0
    assert report.int8.prompt is not None


def test_cli_export(tmp_path, run_dir, capsys):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b"), "--verify-steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "batch 1" in out and "batch 7" in out and "identical" in out and "prompt graph" in out
    load_manifest(tmp_path / "b")


def test_cli_errors_return_2_without_traceback(tmp_path, run_dir, capsys, monkeypatch):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "Traceback" not in err and err.count("\n") == 1
    monkeypatch.setattr(onnx_graph, "TORCH_TO_ONNX_GATES", (0, 2, 1, 3))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "parity check failed" in err and not (tmp_path / "b").exists()


def test_cli_module_imports_no_torch():
    code = ("import sys, lstmgen.export.cli; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'onnx', 'onnxruntime')))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
