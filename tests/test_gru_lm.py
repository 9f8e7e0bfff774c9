"""`--cell gru` for the language model, and the LSTM default left as it was: its state_dict keys,
and checkpoints written before the cell field existed still loading."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import CHAR_TEXT, make_checkpoint
from lstmgen.cli import main
from lstmgen.train.checkpoint import load_checkpoint
from lstmgen.train.config import ModelConfig, TrainConfig
from lstmgen.train.model import RecurrentLM
from lstmgen.train.rundir import saved_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SMALL = ["--preset", "tiny", "--embedding-size", "16", "--hidden-size", "24", "--batch-size", "4",
         "--bptt", "16", "--eval-batch-size", "4", "--device", "cpu", "--no-progress"]
LSTM_KEYS = ["embed.weight", "head.bias", "head.weight"] + [
    f"lstm.{w}_{kind}_l{k}" for k in range(2) for w in ("bias", "weight") for kind in ("hh", "ih")]


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("".join(f"the cat {i % 5} sat on the mat {i % 3}.\n" for i in range(200)))
    return f


def test_gru_language_model_trains_resumes_and_loads_back(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--cell", "gru", "--data", str(text_file), "--out", str(out), "--max-steps", "6",
               "--save-every", "3", *SMALL])
    assert rc == 0, capsys.readouterr().err
    assert "cell gru" in capsys.readouterr().out
    ck = load_checkpoint(out / "last.pt")
    assert ck.model_config.cell == "gru" and ck.train_config.cell == "gru"
    assert sorted({k.split(".")[0] for k in ck.state_dict}) == ["embed", "gru", "head"]
    assert ck.state_dict["gru.weight_hh_l0"].shape == (3 * 24, 24)  # r, z, n gates
    assert [t.shape for t in ck.progress["hidden"]] == [(2, 4, 24)]  # h alone, mid-epoch
    # resume mid-epoch: the saved GRU state (one tensor) is restored
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "10", "--no-progress"]) == 0
    ck = load_checkpoint(out / "last.pt")
    assert ck.progress["global_step"] == 10 and ck.model_config.cell == "gru"
    model = ck.build_model()
    assert isinstance(model.rnn, torch.nn.GRU)
    tokens = torch.tensor([ck.vocab.encode("the cat")]).t()  # [T, 1]
    logits, state = model(tokens, model.init_state(1))
    assert logits.shape == (7, 1, len(ck.vocab)) and len(state) == 1 and state[0].shape == (2, 1, 24)
    assert json.loads((out / "config.json").read_text())["model"]["cell"] == "gru"


def test_gru_language_model_learns(tmp_path, text_file):
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    cfg = preset("tiny", cell="gru", embedding_size=16, hidden_size=32, batch_size=4, bptt=16,
                 eval_batch_size=4, max_steps=80, epochs=50, device="cpu")
    ck = load_checkpoint(train(cfg, str(text_file), tmp_path / "run", log=lambda line: None, progress_bar=False))
    first, last = ck.metrics["history"][0], ck.metrics["history"][-1]
    vocab = len(ck.vocab)
    assert last["val_loss"] < 0.6 * torch.log(torch.tensor(float(vocab))).item()  # far below a uniform guess
    assert last["val_loss"] <= first["val_loss"]


def test_resuming_with_another_cell_is_refused(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--max-steps", "2", *SMALL]) == 0
    rc = main(["train", "--out", str(out), "--resume", "--cell", "gru", "--max-steps", "4", "--no-progress"])
    assert rc == 2 and "cannot resume with a different cell 'lstm' -> 'gru'" in capsys.readouterr().err


def test_lstm_default_keeps_its_state_dict_keys():
    assert ModelConfig(10).cell == "lstm" and TrainConfig().cell == "lstm" and TrainConfig().task == "lm"
    model = RecurrentLM(ModelConfig(10, 8, 8, 2))
    assert sorted(model.state_dict()) == sorted(LSTM_KEYS)
    assert isinstance(model.lstm, torch.nn.LSTM) and model.rnn is model.lstm
    assert [t.shape for t in model.init_state(3)] == [(2, 3, 8), (2, 3, 8)]  # (h, c)


def test_checkpoint_written_before_the_cell_field_still_loads(tmp_path):
    path = make_checkpoint(tmp_path / "new.pt", "char", CHAR_TEXT)
    raw = torch.load(path, weights_only=True)
    for section in ("model_config", "train_config"):  # what an older lstmgen wrote
        for k in ("cell", "task", "projection_size", "standardize", "stream"):
            raw[section].pop(k, None)
    assert "task" not in raw and "cell" not in raw["model_config"]
    torch.save(raw, tmp_path / "old.pt")
    ck = load_checkpoint(tmp_path / "old.pt")
    assert ck.model_config.cell == "lstm" and ck.train_config.task == "lm"
    model = ck.build_model()  # strict load: the weights still sit under lstm.*
    assert sorted(model.state_dict()) == sorted(LSTM_KEYS)
    ref = load_checkpoint(path).build_model()
    x = torch.tensor([[1], [2], [3]])
    torch.testing.assert_close(model(x, model.init_state(1))[0], ref(x, ref.init_state(1))[0])


def test_config_json_of_an_older_run_still_reads(tmp_path):
    old = {k: v for k, v in TrainConfig().__dict__.items() if k not in ("task", "cell")}
    (tmp_path / "config.json").write_text(json.dumps({"train": old}))
    cfg = saved_config(tmp_path)
    assert (type(cfg), cfg.task, cfg.cell) == (TrainConfig, "lm", "lstm")
    # the one flat TrainConfig of earlier versions held the frame tasks' fields too
    flat = {**TrainConfig().__dict__, "projection_size": 0, "standardize": "none", "stream": False}
    (tmp_path / "config.json").write_text(json.dumps({"train": flat}))
    assert saved_config(tmp_path) == TrainConfig()
