"""What `lstmgen train` and `lstmgen eval` show: plain lines away from a terminal, --quiet, --log-format
json; a failed run leaves no empty folder; word-level --min-count / --max-vocab map rare words to <unk>."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from lstmgen.cli import main
from lstmgen.console import Console
from lstmgen.text import encode
from lstmgen.vocab import UNK, Vocab

SMALL = ["--preset", "tiny", "--embedding-size", "16", "--hidden-size", "32", "--batch-size", "4",
         "--bptt", "16", "--eval-batch-size", "4", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "c.txt"
    # "tails" occurs only in the validation tail, "rare" once in the training text
    f.write_text("rare\n" + "".join(f"line {i % 7} of a small text, said {i % 3}.\n" for i in range(120)) + "tails\n")
    return f


def test_train_into_a_file_writes_plain_lines(tmp_path, text_file):
    """`lstmgen train ... > log 2>&1`: one plain line per interval with loss, rate and ETA; no \\r frames."""
    log = tmp_path / "log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lstmgen.cli", "train", "--data", str(text_file), "--out",
                               str(tmp_path / "run"), "--max-steps", "12", "--log-interval", "4",
                               "--progress-interval", "0", *SMALL], stdout=f, stderr=subprocess.STDOUT,
                              env=env, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "\x1b" not in text
    progress = [line for line in text.splitlines() if "ETA" in line]
    assert len(progress) == 3, text
    assert all("loss" in line and "tok/s" in line and "step" in line for line in progress)
    assert "val loss" in text and "best checkpoint:" in text


def test_quiet_prints_only_the_result(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--max-steps", "4", "--quiet", *SMALL]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"best checkpoint: {out / 'best.pt'}\n" and captured.err == ""


def test_log_format_json_is_one_object_per_line(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_file), "--out", str(out), "--max-steps", "8", "--log-interval", "4",
                 "--progress-interval", "0", "--log-format", "json", *SMALL]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert captured.err == "" and all({"time", "level", "message"} <= set(r) for r in records)
    steps = [r for r in records if r.get("event") == "progress"]
    assert [r["step"] for r in steps] == [4, 8] and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert records[-1]["best_checkpoint"] == str(out / "best.pt")


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    at_terminal, piped = Console(err=tty, out=io.StringIO()), Console(err=pipe, out=io.StringIO(), interval=3600)
    assert at_terminal.bar and not at_terminal.lines and piped.lines and not piped.bar
    for c in (at_terminal, piped):
        c.progress("step 1")
        c.progress("step 2")  # within the interval: not shown
    assert tty.getvalue() == "" and pipe.getvalue() == "step 1\n"
    assert not Console(err=tty, fmt="json").bar and not Console(err=pipe, quiet=True).lines


def test_a_failed_run_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(out), *SMALL]) == 2
    assert not out.exists()
    out.mkdir()  # a folder the user made is theirs: kept
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(out), *SMALL]) == 2
    assert out.is_dir()
    assert "file not found" in capsys.readouterr().err


def test_vocab_limits_keep_frequent_words():
    text = "a a a b b c\nd d d d\n"
    assert Vocab.build("word", [text], min_count=2).tokens == ("<eos>", UNK, "a", "b", "d")
    assert Vocab.build("word", [text], max_vocab=4).tokens == ("<eos>", UNK, "a", "d")
    v = Vocab.build("word", [text], min_count=3)
    assert encode(v, "a b z\n", lines=True).ids.tolist() == [v.stoi["a"], v.unk_id, v.unk_id, v.stoi["<eos>"]]


def test_min_count_trains_a_word_model_on_plain_text(tmp_path, text_file, capsys):
    from lstmgen.train.checkpoint import load_checkpoint

    base = ["train", "--data", str(text_file), "--level", "word", "--max-steps", "2", "--quiet", *SMALL]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 2  # valid holds "tails", the vocabulary no <unk>
    assert "--min-count N or --max-vocab N" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "m"), "--min-count", "2"]) == 0
    vocab = load_checkpoint(tmp_path / "m" / "best.pt").vocab
    assert UNK in vocab.tokens and "rare" not in vocab.tokens and "tails" not in vocab.tokens
    assert main([*base, "--out", str(tmp_path / "v"), "--max-vocab", "8"]) == 0
    assert len(load_checkpoint(tmp_path / "v" / "best.pt").vocab) == 8
    assert main(["train", "--data", str(text_file), "--out", str(tmp_path / "c"), "--min-count", "2", *SMALL]) == 2
    assert "word level only" in capsys.readouterr().err
