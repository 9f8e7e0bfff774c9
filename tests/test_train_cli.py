"""`lstmgen train` end to end through lstmgen.cli.main, and its error handling."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lstmgen.cli import main
from lstmgen.train.checkpoint import load_checkpoint

SMALL = ["--preset", "tiny", "--embedding-size", "16", "--hidden-size", "32", "--batch-size", "4",
         "--bptt", "16", "--eval-batch-size", "4", "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "c.txt"
    # the last word occurs only in the validation tail (its characters do not)
    f.write_text("".join(f"line {i % 7} of a small text, said {i % 3}.\n" for i in range(120)) + "tails\n")
    return f


def test_train_end_to_end_and_resume(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(text_file), "--out", str(out), "--max-steps", "8",
               "--optimizer", "sgd", "--lr", "0.5", "--no-tie-weights", *SMALL])
    assert rc == 0
    captured = capsys.readouterr()
    assert "best checkpoint:" in captured.out and "val loss" in captured.out
    cfg = json.loads((out / "config.json").read_text())["train"]
    assert (cfg["optimizer"], cfg["lr"], cfg["hidden_size"], cfg["max_steps"]) == ("sgd", 0.5, 32, 8)
    assert cfg["bptt"] == 16 and cfg["level"] == "char"  # the preset's value where no flag was given

    # --resume without --preset or --data continues with the saved config and corpus
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "12", "--no-progress"]) == 0
    ck = load_checkpoint(out / "last.pt")
    assert ck.progress["global_step"] == 12 and ck.train_config.optimizer == "sgd"


@pytest.mark.parametrize("argv, expect", [
    (["--data", "{tmp}/missing.txt"], "missing.txt: file not found"),
    ([], "--data is required"),
    (["--data", "{text}", "--resume"], "nothing to resume"),
    (["--data", "{text}", "--hidden-size", "0"], "hidden_size must be >= 1"),
    (["--data", "{text}", "--level", "word"], "no <unk> to map them to: 'tails'"),
    (["--data", "{text}", "--device", "cuda"], None),  # error unless a GPU is really there
])
def test_errors_print_one_message_and_return_2(tmp_path, text_file, capsys, argv, expect):
    argv = [a.format(tmp=tmp_path, text=text_file) for a in argv]
    rc = main(["train", "--out", str(tmp_path / "run"), "--max-steps", "2", *SMALL, *argv])
    err = capsys.readouterr().err
    if expect is None and rc == 0:
        return
    assert rc == 2
    assert err.startswith("lstmgen train: error: ") and err.count("\n") == 1 and "Traceback" not in err
    if expect:
        assert expect in err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--preset", "--out", "--resume", "--epochs", "--max-steps", "--max-seconds",
                 "--batch-size", "--bptt", "--lr", "--lr-decay", "--decay-after", "--clip-norm",
                 "--hidden-size", "--num-layers", "--embedding-size", "--dropout", "--tie-weights",
                 "--optimizer", "--level", "--seed", "--device", "--save-every", "ptb-medium"):
        assert flag in out, flag


def test_cli_module_does_not_import_torch():
    code = "import sys, lstmgen.train.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
