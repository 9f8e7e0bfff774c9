"""Frame models (train/frame_model.py, frame_task.py): masking and packing, the last valid frame,
state carried across stream batches, short real runs, the checkpoint and the CLI."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from lstmgen.cli import main
from lstmgen.train.checkpoint import CheckpointError, load_checkpoint, load_frame_checkpoint
from lstmgen.train.config import preset
from lstmgen.train.frame_model import (FrameModel, FrameModelConfig, classification_loss, last_valid,
                                       regression_loss)
from lstmgen.train.frame_task import _Split, evaluate_frames
from lstmgen.train.frame_data import load_frames
from lstmgen.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")
LENGTHS = [5, 3, 1]


def model(task="regression", cell="lstm", d_in=3, d_out=2, seed=0, **kw) -> FrameModel:
    torch.manual_seed(seed)
    return FrameModel(FrameModelConfig(task, d_in, d_out, hidden_size=8, num_layers=2, cell=cell, **kw)).eval()


def padded(pad_x: float, pad_y: float, d_in=3, d_out=2, seed=1):
    """x [T, B, D_in], y [T, B, D_out] with LENGTHS valid frames per row and the rest set to the pads."""
    g = torch.Generator().manual_seed(seed)
    T, B = max(LENGTHS), len(LENGTHS)
    x, y = torch.randn(T, B, d_in, generator=g), torch.randn(T, B, d_out, generator=g)
    for b, n in enumerate(LENGTHS):
        x[n:, b], y[n:, b] = pad_x, pad_y
    return x, y, torch.tensor(LENGTHS)


# -- masking and packing ----------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padding_changes_nothing_in_the_regression_loss_or_its_gradient(cell):
    m = model(cell=cell, projection_size=4)
    results = []
    for pad_x, pad_y in ((0.0, 0.0), (1e3, float("nan")), (-7.0, 1e6)):
        x, y, lengths = padded(pad_x, pad_y)
        m.zero_grad()
        out, _ = m(x, m.init_state(3), lengths)
        loss = regression_loss(out, y, lengths)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b)
    x, y, lengths = padded(0.0, 0.0)
    out, _ = m(x, m.init_state(3), lengths)
    mask = torch.arange(5)[:, None] < lengths[None]  # [T, B]
    manual = ((out - y) ** 2)[mask].mean()  # over the 9 valid frames' 18 values, not the 15 x 2 padded
    assert regression_loss(out, y, lengths).item() == pytest.approx(manual.item())
    assert regression_loss(out, y, lengths).item() != pytest.approx(((out - y) ** 2).mean().item())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_rows_equal_each_row_alone_outputs_and_final_state(cell):
    m = model(cell=cell)
    x, _, lengths = padded(5.0, 0.0)
    with torch.no_grad():
        out, state = m(x, m.init_state(3), lengths)  # [T, B, D_out]
        for b, n in enumerate(LENGTHS):
            alone, alone_state = m(x[:n, b:b + 1], m.init_state(1))
            torch.testing.assert_close(out[:n, b:b + 1], alone, rtol=1e-5, atol=1e-6)
            for s, a in zip(state, alone_state):  # the state after the row's last VALID frame
                torch.testing.assert_close(s[:, b:b + 1], a, rtol=1e-5, atol=1e-6)
        unpacked, _ = m(x, m.init_state(3))  # no lengths: the padded frames are run as frames
        assert not torch.allclose(unpacked[:, 2], out[:, 2])


def test_classification_reads_the_last_valid_frame():
    m = model("classification", d_out=4)
    x, _, lengths = padded(0.0, 0.0)
    labels = torch.tensor([1, 3, 0])
    with torch.no_grad():
        out, _ = m(x, m.init_state(3), lengths)
        logits = last_valid(out, lengths)  # [B, C]
        for b, n in enumerate(LENGTHS):
            alone, _ = m(x[:n, b:b + 1], m.init_state(1))
            torch.testing.assert_close(logits[b], alone[-1, 0], rtol=1e-5, atol=1e-6)
        loss, correct = classification_loss(out, labels, lengths)
        x2 = x.clone()
        x2[3:, 1] = 100.0  # row 1's padding (it has 3 frames)
        out2, _ = m(x2, m.init_state(3), lengths)
        assert classification_loss(out2, labels, lengths)[0].item() == pytest.approx(loss.item())
        x2[2, 1] = 100.0  # row 1's last valid frame
        out3, _ = m(x2, m.init_state(3), lengths)
        assert not torch.allclose(last_valid(out3, lengths)[1], logits[1])
        torch.testing.assert_close(last_valid(out3, lengths)[0], logits[0])
    assert 0 <= int(correct) <= 3


def test_stream_evaluation_carries_the_state_across_batches():
    d = load_frames("builtin:sin-cos", "regression")
    valid = d.valid.take(np.array([0]))
    m = model(d_in=1, d_out=1, projection_size=4)
    chunked = evaluate_frames(m, _Split(valid, "regression", 4, 7, True, torch.device("cpu"), "v"))
    whole = evaluate_frames(m, _Split(valid, "regression", 4, 10**6, True, torch.device("cpu"), "v"))
    assert chunked["mse"] == pytest.approx(whole["mse"], rel=1e-5)
    # the same chunks each from a zero state score differently: the equality above is the state flowing
    split = _Split(valid, "regression", 4, 7, True, torch.device("cpu"), "v")
    total = count = 0.0
    with torch.no_grad():
        for x, y, _ in split.batches():
            out, _ = m(x, m.init_state(4))
            total, count = total + ((out - y) ** 2).sum().item(), count + y.numel()
    assert total / count != pytest.approx(whole["mse"], rel=1e-3)


# -- short real runs --------------------------------------------------------------------------------
def test_sin_cos_learns_the_cosine(tmp_path):
    out = tmp_path / "run"
    best = train(preset("sin-cos", device="cpu"), "builtin:sin-cos", out, log=lambda line: None,
                 progress_bar=False)
    ck = load_frame_checkpoint(best)
    # predicting 0 scores var(cos) = 0.5; the preset's 500 updates get far below it
    # (test MSE 0.0106 measured; 0.006-0.013 over five seeds)
    assert ck.metrics["test_mse"] < 0.05 and ck.metrics["val_mse"] < 0.05
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert float(rows[-1]["val_mse"]) < float(rows[0]["val_mse"])
    assert ck.train_config.stream and ck.data["stream"] and ck.data["spec"] == "builtin:sin-cos"


def _first_frame_classes(path, n=480, seed=0):
    """The class is told by the FIRST frame only; later frames are noise and the padding holds another
    class's signal, so only a model that remembers and reads its last VALID frame gets it right."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 9, size=n)
    labels = rng.integers(0, 3, size=n)
    x = rng.normal(0, 0.3, size=(n, 8, 3)).astype(np.float32)
    x[np.arange(n), 0, labels] += 2.0
    for i, k in enumerate(lengths):
        x[i, k:] = 0.0
        x[i, k:, (labels[i] + 1) % 3] = 4.0  # misleading padding
    np.savez(path, x=x, y=labels, lengths=lengths, class_names=np.array(["red", "green", "blue"]))
    return path


def test_classification_on_variable_lengths_through_the_cli(tmp_path, capsys):
    data = _first_frame_classes(tmp_path / "cls.npz")
    out = tmp_path / "run"
    rc = main(["train", "--task", "classification", "--data", str(data), "--out", str(out), "--epochs", "12",
               "--batch-size", "32", "--projection-size", "0", "--hidden-size", "24", "--lr", "0.01",
               "--dropout", "0", "--valid-fraction", "0.2", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    ck = load_frame_checkpoint(out)
    assert ck.metrics["val_accuracy"] >= 0.9, ck.metrics["history"]
    assert ck.class_names == ["red", "green", "blue"] and ck.model_config.output_size == 3
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {"val_loss", "val_accuracy", "train_loss"} <= set(rows[0])
    assert "accuracy" in capsys.readouterr().out


def test_mnist_idx_folder_and_npy_inputs_through_the_cli(tmp_path, capsys):
    from lstmgen.train.idx import write_idx

    rng = np.random.default_rng(7)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for split, n in (("train", 40), ("t10k", 10)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 255, size=(n, 28, 28)).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)  # one gzipped, one not
    out = tmp_path / "run"
    rc = main(["train", "--task", "classification", "--data", f"mnist:{folder}", "--out", str(out),
               "--epochs", "1", "--hidden-size", "8", "--projection-size", "8", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    ck = load_frame_checkpoint(out)
    assert (ck.model_config.input_size, ck.model_config.output_size) == (28, 10)
    assert ck.class_names == [str(i) for i in range(10)] and ck.data["kind"] == "mnist"
    assert "test_accuracy" in ck.metrics and ck.data["sequences"] == {"train": 36, "valid": 4, "test": 10}

    np.save(tmp_path / "x.npy", rng.normal(size=(12, 5, 2)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.normal(size=(12, 5, 3)).astype(np.float32))
    rc = main(["train", "--task", "regression", "--data", str(tmp_path / "x.npy"), "--targets",
               str(tmp_path / "y.npy"), "--out", str(tmp_path / "run2"), "--epochs", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    ck = load_frame_checkpoint(tmp_path / "run2")
    assert (ck.model_config.input_size, ck.model_config.output_size) == (2, 3) and len(ck.data["files"]) == 2


def test_digits_reach_a_clear_accuracy(tmp_path):
    pytest.importorskip("sklearn")
    best = train(preset("row-digits", epochs=10, device="cpu"), "builtin:digits", tmp_path / "run",
                 log=lambda line: None, progress_bar=False)
    # the full preset (40 epochs) reaches about 97-98% on the held-out images; 10 epochs clear 90%
    assert load_frame_checkpoint(best).metrics["test_accuracy"] >= 0.9


# -- the checkpoint export will read ----------------------------------------------------------------
def test_checkpoint_holds_what_export_needs(tmp_path):
    rng = np.random.default_rng(5)
    xs = [rng.normal(3, 2, size=(int(n), 4)).astype(np.float32) for n in rng.integers(3, 12, size=40)]
    x, y = np.empty(40, dtype=object), np.empty(40, dtype=object)
    for i, s in enumerate(xs):
        x[i], y[i] = s, s[:, :2].cumsum(0)
    np.savez(tmp_path / "seq.npz", x=x, y=y)
    cfg = preset("tiny", task="regression", cell="gru", hidden_size=8, num_layers=1, projection_size=6,
                 standardize="sequence", batch_size=8, eval_batch_size=8, epochs=2, device="cpu")
    best = train(cfg, str(tmp_path / "seq.npz"), tmp_path / "run", log=lambda line: None, progress_bar=False)
    ck = load_frame_checkpoint(best)
    mc = ck.model_config
    assert (ck.task, mc.cell, mc.input_size, mc.output_size, mc.projection_size, mc.hidden_size) == \
        ("regression", "gru", 4, 2, 6, 8)
    assert ck.standardize == {"mode": "sequence", "applies_to": "inputs", "std_floor": 1e-6, "ddof": 0}
    assert ck.data["spec"] == str(tmp_path / "seq.npz") and ck.data["files"][0]["sha256"]
    assert ck.class_names == [] and math.isfinite(ck.metrics["val_mse"])
    assert sorted(k.split(".")[0] for k in ck.state_dict) == ["gru"] * 4 + ["head"] * 2 + ["proj"] * 2
    model = ck.build_model()
    assert len(model.init_state(2)) == 1  # a GRU's state is h alone
    with pytest.raises(CheckpointError, match="a regression model over float frames, not a language model"):
        load_checkpoint(best)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["task"] == "regression" and saved["model"]["cell"] == "gru"
    assert saved["data"]["standardize"]["mode"] == "sequence"


def test_global_standardisation_statistics_reach_the_checkpoint(tmp_path):
    x = np.random.default_rng(6).normal(10, 5, size=(30, 4, 2)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(30) % 2)
    cfg = preset("row-digits", standardize="global", epochs=1, hidden_size=4, projection_size=0, device="cpu")
    ck = load_frame_checkpoint(train(cfg, str(tmp_path / "c.npz"), tmp_path / "run", log=lambda line: None,
                                     progress_bar=False))
    st = ck.standardize
    assert st["mode"] == "global" and len(st["mean"]) == len(st["std"]) == 2
    assert 8 < st["mean"][0] < 12 and 3 < st["std"][1] < 7
    assert ck.class_names == ["0", "1"] and ck.model_config.task == "classification"


# -- CLI errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expect", [
    (["--data", "builtin:sin-cos"], "builtin:sin-cos is frame data, not text; train it with --task regression"),
    (["--task", "classification", "--data", "builtin:sin-cos"], "builtin:sin-cos is regression data"),
    (["--task", "regression", "--data", "builtin:sin-cos", "--preset", "sin-cos", "--resume"],
     "nothing to resume"),
    (["--task", "classification", "--data", "{npz}", "--stream"], "continuous-stream mode is for regression"),
    (["--data", "{text}", "--targets", "{npz}"], "--targets is for frame data"),
    (["--data", "{text}", "--standardize", "global"], "--standardize applies to --task regression or classification"),
    (["--task", "regression", "--data", "{npz}", "--level", "word", "--min-count", "2"],
     "--level, --min-count apply to --task lm, not --task regression"),
    (["--task", "regression", "--data", "{npz}", "--cell", "rnn"], None),  # argparse: invalid choice
    (["--task", "regression", "--data", "{tmp}/none.npz"], "none.npz: file not found"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, expect):
    npz = _first_frame_classes(tmp_path / "c.npz", n=20)
    text = tmp_path / "t.txt"
    text.write_text("some text\n" * 50)
    argv = [a.format(tmp=tmp_path, npz=npz, text=text) for a in argv]
    if expect is None:
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", str(tmp_path / "run"), *argv])
        assert e.value.code == 2 and "invalid choice: 'rnn'" in capsys.readouterr().err
        return
    rc = main(["train", "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lstmgen train: error: ") and err.count("\n") == 1, err
    assert expect in err, err
    assert not (tmp_path / "run").exists()  # a run that never started leaves nothing behind


def test_help_shows_the_frame_flags_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for word in ("--task", "--cell", "--targets", "--standardize", "--stream", "--projection-size",
                 "builtin:sin-cos", "builtin:digits", "mnist:DIR", "sin-cos", "row-digits"):
        assert word in out, word


@pytest.mark.parametrize("spec, name", [("builtin:sin-cos", "sin-cos"), ("builtin:digits", "row-digits")])
def test_a_frame_run_stopped_mid_epoch_resumes_exactly(tmp_path, spec, name):
    """One training loop for every task: a frame run stopped at an update inside an epoch (the
    state carried on a stream; the epoch's shuffled order for sequences) continues with resume=True
    to the weights an uninterrupted run reaches."""
    from lstmgen.train.checkpoint import load_frame_checkpoint
    from lstmgen.train.config import preset

    task = "regression" if name == "sin-cos" else "classification"
    quiet = dict(log=lambda s: None, progress_bar=False)
    cfg = preset(name, task=task, epochs=0, max_steps=7, hidden_size=8, projection_size=8, batch_size=16,
                 save_every=0)
    train(cfg, spec, tmp_path / "whole", **quiet)
    train(preset(name, task=task, epochs=0, max_steps=3, hidden_size=8, projection_size=8, batch_size=16,
                 save_every=0), spec, tmp_path / "split", **quiet)
    assert load_frame_checkpoint(tmp_path / "split" / "last.pt").progress["step_in_epoch"] == 3
    train(cfg, None, tmp_path / "split", resume=True, **quiet)
    whole, split = (load_frame_checkpoint(tmp_path / r / "last.pt") for r in ("whole", "split"))
    assert split.progress["global_step"] == 7
    for k, t in whole.state_dict.items():
        assert torch.equal(split.state_dict[k], t), k


def test_a_frame_run_resumes_from_another_directory_and_by_another_name(tmp_path, monkeypatch):
    """The checkpoint records the data by resolved path and content: a run trained on a relative
    path resumes from elsewhere without --data, or with the same file named another way; a
    last.pt with no resume state (an earlier version's frame run) is refused by name."""
    import torch as _torch

    from lstmgen.train.config import preset
    from lstmgen.train.setup import TrainError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _first_frame_classes(tmp_path / "a" / "c.npz", n=40)
    quiet = dict(log=lambda s: None, progress_bar=False)
    cfg = preset("row-digits", epochs=0, max_steps=2, hidden_size=8, projection_size=8, batch_size=8, save_every=0)
    monkeypatch.chdir(tmp_path / "a")
    train(cfg, "c.npz", tmp_path / "run", **quiet)
    monkeypatch.chdir(tmp_path / "b")
    train(preset("row-digits", epochs=0, max_steps=3, hidden_size=8, projection_size=8, batch_size=8,
                 save_every=0), None, tmp_path / "run", resume=True, **quiet)
    train(preset("row-digits", epochs=0, max_steps=4, hidden_size=8, projection_size=8, batch_size=8,
                 save_every=0), str(tmp_path / "a" / "c.npz"), tmp_path / "run", resume=True, **quiet)
    last = tmp_path / "run" / "last.pt"
    ck = _torch.load(last, weights_only=True)
    assert ck["progress"]["global_step"] == 4
    ck["progress"] = {"epoch": 1, "global_step": 4}  # what the frame trainer before this version saved
    _torch.save(ck, last)
    with pytest.raises(TrainError, match="holds no resume state"):
        train(cfg, None, tmp_path / "run", resume=True, **quiet)
