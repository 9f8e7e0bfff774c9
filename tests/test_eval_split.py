"""`lstmgen eval` never scores the text a model was trained on: the training file named in the
bundle's provenance (by path or sha256), or a corpus name without a test split, is scored on the
tail training held out for validation, at the trainer's own cut, and the result says which part."""
from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest

from conftest import CHAR_TEXT, export, make_checkpoint
from lstmgen.cli import main
from lstmgen.datasets import CORPORA, Corpus, File
from lstmgen.evaluate import EvalConfig, EvalError, evaluate_bundle
from lstmgen.text import held_out_start
from lstmgen.train.checkpoint import load_checkpoint, save_checkpoint
from lstmgen.train.data import load_corpus

B = 4
CFG = EvalConfig(batch_size=B, progress=False)
LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "All:", "Speak, speak.",
         "You are all resolved rather to die than to famish?", "Resolved. resolved."]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def lines(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(LINES) + "\n" for _ in range(n))


def bundle_trained_on(tmp_path, level: str, text: str, corpus: dict | None, name: str = "bundle"):
    """A tiny random-weight bundle whose provenance says it was trained on `corpus` (a real
    load_corpus source dict; None: the test helpers' provenance, which names no file)."""
    ckpt = make_checkpoint(tmp_path / f"{name}.pt", level, text)
    if corpus is not None:
        c = load_checkpoint(ckpt)
        c.corpus = corpus
        save_checkpoint(c, ckpt)
    return export(ckpt, tmp_path / name, verify_steps=10)


def test_the_training_file_scores_only_its_held_out_tail(tmp_path, capsys):
    text = lines(120, seed=1)
    f = tmp_path / "input.txt"
    f.write_text(text)
    trained = load_corpus(str(f), "char", 0.1)  # what training read and held out
    bundle = bundle_trained_on(tmp_path, "char", text, trained.source)
    got = evaluate_bundle(bundle, f, CFG)
    start = held_out_start(text, "char", 0.1)
    assert got.span == (start, len(text)) and start > 0
    assert got.tokens == (len(trained.valid) // B - 1) * B  # the trainer's validation stream, not the file
    assert f"the validation tail of input.txt, chars {start:,}..{len(text):,} (10%), as training held it out" \
        == got.scored
    tail = tmp_path / "tail.txt"
    tail.write_text(text[start:])
    alone = evaluate_bundle(bundle, tail, CFG)  # the tail as a file of its own: the same figure
    assert alone.loss == pytest.approx(got.loss, rel=1e-9) and alone.tokens == got.tokens
    assert "not the bundle's training text" in alone.scored and alone.span == (0, len(text) - start)
    # a copy elsewhere is found by its sha256
    copy = tmp_path / "elsewhere" / "shakespeare.txt"
    copy.parent.mkdir()
    shutil.copy(f, copy)
    assert evaluate_bundle(bundle, copy, CFG).span == (start, len(text))
    # the command says it, and writes it in the JSON
    out = tmp_path / "r.json"
    assert main(["eval", str(bundle), "--data", str(f), "--batch-size", str(B), "--no-progress",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"scored the validation tail of input.txt, chars {start:,}..{len(text):,} (10%)" in printed
    r = json.loads(out.read_text())
    assert r["span"] == [start, len(text)] and r["scored"] == got.scored and r["tokens"] == got.tokens


def test_word_level_uses_the_trainers_line_start_cut(tmp_path):
    text = "".join(w + "\n" for w in ["the cat sat on the mat", "a dog ran", "the dog sat on a cat"] * 30)
    f = tmp_path / "words.txt"
    f.write_text(text)
    trained = load_corpus(str(f), "word", 0.15)
    bundle = bundle_trained_on(tmp_path, "word", text, trained.source)
    got = evaluate_bundle(bundle, f, CFG)
    start = got.span[0]
    assert start == held_out_start(text, "word", 0.15) and text[start - 1] == "\n"
    assert got.tokens == (len(trained.valid) // B - 1) * B and "(15%)" in got.scored


def test_a_training_split_with_its_own_validation_file_is_refused(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for split, seed in (("train", 1), ("valid", 2), ("test", 3)):
        (d / f"{split}.txt").write_text(lines(60, seed))
    trained = load_corpus(str(d), "char")
    bundle = bundle_trained_on(tmp_path, "char", "".join(LINES) + "\n", trained.source)
    with pytest.raises(EvalError) as e:
        evaluate_bundle(bundle, d / "train.txt", CFG)
    assert "trained on" in str(e.value) and str(d / "valid.txt") in str(e.value)
    test = evaluate_bundle(bundle, d / "test.txt", CFG)
    assert test.span == (0, len((d / "test.txt").read_text())) and "the test split" in test.scored


def test_a_file_the_provenance_cannot_check_is_scored_whole_and_says_so(tmp_path, bundles):
    f = tmp_path / "t.txt"
    f.write_text(CHAR_TEXT * 5)
    got = evaluate_bundle(bundles["char"], f, CFG)  # the helpers' provenance names no training file
    assert got.span == (0, len(f.read_text())) and "cannot be checked" in got.scored


@pytest.fixture
def one_file_corpus(tmp_path, monkeypatch):
    """`tinyshakespeare` in a cache of our own: a small file with its own pinned sha256."""
    text = lines(150, seed=5)
    cache = tmp_path / "cache"
    (cache / "tinyshakespeare").mkdir(parents=True)
    (cache / "tinyshakespeare" / "input.txt").write_text(text)
    data = text.encode()
    monkeypatch.setitem(CORPORA, "tinyshakespeare", Corpus("tinyshakespeare", "char", (
        File("input.txt", "http://127.0.0.1:1/input.txt", hashlib.sha256(data).hexdigest(), len(data)),),
        "test", "input.txt"))
    monkeypatch.setenv("LSTMGEN_DATA", str(cache))
    return text


def test_a_corpus_name_without_a_test_split_scores_the_held_out_tail(tmp_path, one_file_corpus, capsys):
    text = one_file_corpus
    trained = load_corpus("tinyshakespeare", "char", 0.2)  # `lstmgen train --data tinyshakespeare`
    bundle = bundle_trained_on(tmp_path, "char", text, trained.source)
    got = evaluate_bundle(bundle, "tinyshakespeare", CFG)
    start = held_out_start(text, "char", 0.2)
    assert got.span == (start, len(text)) and got.tokens == (len(trained.valid) // B - 1) * B
    assert "validation tail of input.txt" in got.scored and "(20%), as training held it out" in got.scored
    assert main(["eval", str(bundle), "--data", "tinyshakespeare", "--batch-size", str(B), "--no-progress"]) == 0
    assert f"chars {start:,}..{len(text):,} (20%)" in capsys.readouterr().out


def test_a_corpus_name_is_never_scored_whole_even_when_the_provenance_is_silent(tmp_path, one_file_corpus):
    text = one_file_corpus
    bundle = bundle_trained_on(tmp_path, "char", text, None)  # provenance names no training text
    got = evaluate_bundle(bundle, "tinyshakespeare", CFG)
    assert got.span == (held_out_start(text, "char", 0.1), len(text))  # the trainer's default fraction
    assert "no test split" in got.scored and "validation tail" in got.scored
