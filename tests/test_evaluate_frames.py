"""lstmgen/evaluate_frames.py: a frame bundle's held-out figures through the serving engine
(FrameEngine) equal the trainer's PyTorch figures (same split, the manifest's standardisation), by
either graph; torch-free."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from lstmgen.bundle import BundleError
from lstmgen.errors import UsageError
from lstmgen.evaluate_frames import evaluate_frames, main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _train_and_export(tmp_path, npz, **overrides):
    from lstmgen.export.bundle import export_bundle
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    cfg = preset("tiny", hidden_size=8, num_layers=1, batch_size=8, eval_batch_size=8, epochs=2, device="cpu",
                 **overrides)
    best = train(cfg, str(npz), tmp_path / "run", log=lambda line: None, progress_bar=False)
    export_bundle(best, tmp_path / "b", verify_steps=10)
    return tmp_path / "b"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    x = rng.normal(4, 3, size=(60, 5, 3)).astype(np.float32)
    y = (x[:, 0, 0] > 4).astype(np.int64)  # learnable from the first frame
    np.savez(d / "c.npz", x=x[:40], y=y[:40], x_test=x[40:], y_test=y[40:])
    return _train_and_export(d, d / "c.npz", task="classification", cell="gru", standardize="global",
                             projection_size=4), d / "c.npz"


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg")
    rng = np.random.default_rng(1)
    def seqs(n):
        xs = np.empty(n, dtype=object)
        ys = np.empty(n, dtype=object)
        for i, t in enumerate(rng.integers(2, 9, size=n)):
            xs[i] = rng.normal(2, 2, size=(int(t), 2)).astype(np.float32)
            ys[i] = xs[i][:, :1].cumsum(0)
        return xs, ys
    (x, y), (xt, yt) = seqs(40), seqs(15)
    np.savez(d / "r.npz", x=x, y=y, x_test=xt, y_test=yt)
    return _train_and_export(d, d / "r.npz", task="regression", cell="lstm", standardize="sequence"), d / "r.npz"


@pytest.mark.parametrize("graph", ["sequence", "step"])
def test_classifier_accuracy_equals_the_trainers(classifier, graph):
    bundle, npz = classifier
    r = evaluate_frames(bundle, str(npz), graph=graph)
    assert r["task"] == "classification" and r["sequences"] == 20 and r["split"] == "test"
    assert r["accuracy"] == pytest.approx(r["pytorch_at_training"], abs=1e-9)
    assert r["correct"] == round(r["accuracy"] * 20)


@pytest.mark.parametrize("graph", ["sequence", "step"])
def test_regression_mse_equals_the_trainers_with_variable_lengths(regressor, graph):
    bundle, npz = regressor
    r = evaluate_frames(bundle, str(npz), graph=graph)
    assert r["mse"] == pytest.approx(r["pytorch_at_training"], rel=1e-5)
    assert r["frames"] < 15 * 8  # variable lengths: the padding is not scored


def test_errors(classifier, bundles, tmp_path):
    bundle, npz = classifier
    with pytest.raises(UsageError, match="needs a frames bundle"):
        evaluate_frames(bundles["char"], str(npz))
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 3, 7), np.float32), y=np.arange(4) % 2)
    with pytest.raises(UsageError, match="frames of 7 features; the model reads 3"):
        evaluate_frames(bundle, str(tmp_path / "wide.npz"), split="train")
    with pytest.raises(UsageError, match="no 'test' split"):
        evaluate_frames(bundle, str(tmp_path / "wide.npz"))


def test_command_line(classifier, capsys):
    bundle, npz = classifier
    assert main([str(bundle), str(npz), "--graph", "step"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_imports_no_torch():
    code = ("import sys, lstmgen.evaluate_frames; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'onnx')))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_runs_through_the_engine(classifier, tmp_path):
    """The engine's checks and provider choice apply: a replaced graph fails its checksum, and the
    result names the provider that measured it."""
    bundle, npz = classifier
    assert evaluate_frames(bundle, str(npz), device="cpu")["provider"] == "CPUExecutionProvider"
    bad = shutil.copytree(bundle, tmp_path / "bad")
    seq = bad / "sequence.onnx"
    seq.write_bytes(seq.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="sequence.onnx: sha256"):
        evaluate_frames(bad, str(npz))


def test_frame_engine_runs_either_graph(classifier):
    from lstmgen.serve.engine import EngineConfig
    from lstmgen.serve.frame_engine import FrameEngine

    bundle, _ = classifier
    engine = FrameEngine(bundle, EngineConfig(device="cpu", intra_op_threads=1))
    x = np.random.default_rng(2).normal(size=(4, 5, 3)).astype(np.float32)  # [B, T, D_in]
    lengths = np.array([5, 1, 3, 2])
    runs = {g: engine.run(x, lengths, engine.zeros(4), g) for g in ("auto", "sequence", "step")}
    for y, state in runs.values():
        valid = np.arange(5)[None, :] < lengths[:, None]  # [B, T]: padded frames' y is unspecified
        np.testing.assert_allclose(y[valid], runs["step"][0][valid], rtol=1e-5, atol=1e-6)
        for a, b in zip(state, runs["step"][1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
