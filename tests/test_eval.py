"""`lstmgen eval` (ONNX Runtime, no torch) against the trainer's PyTorch evaluation of the same
checkpoint, and its errors."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from lstmgen.cli import main
from lstmgen.evaluate import EvalConfig, EvalError, evaluate_bundle
from lstmgen.export.bundle import export_bundle
from lstmgen.text import TextError
from lstmgen.train.checkpoint import load_checkpoint
from lstmgen.train.config import preset
from lstmgen.train.data import batchify, load_corpus
from lstmgen.train.lm_task import evaluate
from lstmgen.train.trainer import train

BATCH, BPTT = 10, 35  # the eval defaults: the comparison uses the same streams on both sides


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def sentences(n: int, seed: int) -> str:
    """A few fixed sentences in random order: learnable in a few dozen steps at either level."""
    rng = random.Random(seed)
    said = ["the cat sat on the mat .", "a dog ran on the mat .", "the dog sat .", "a cat ran ."]
    return "".join(rng.choice(said) + "\n" for _ in range(n))


def trained_bundle(tmp_path, level: str, train_text: str, valid_text: str):
    """A few real training steps (so the loss is far from ln V), exported to a bundle."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text(train_text)
    (d / "valid.txt").write_text(valid_text)
    cfg = preset("tiny", level=level, embedding_size=16, hidden_size=24, batch_size=4, bptt=16,
                 eval_batch_size=BATCH, epochs=50, max_steps=60, seed=3, device="cpu", save_every=0)
    train(cfg, str(d), tmp_path / "run", log=lambda s: None, progress_bar=False)
    bundle = tmp_path / "bundle"
    export_bundle(tmp_path / "run" / "best.pt", bundle, verify_steps=10)
    return d, bundle


def torch_loss(run_dir, corpus_dir, level: str) -> float:
    model = load_checkpoint(run_dir / "best.pt").build_model()
    valid = load_corpus(str(corpus_dir), level).valid
    return evaluate(model, batchify(valid, BATCH), BPTT)


@pytest.mark.parametrize("level", ["char", "word"])
def test_eval_matches_pytorch_evaluate(tmp_path, level):
    valid = sentences(40, seed=2)
    if level == "word":
        valid += "a zebra sat .\n"  # out of vocabulary: <unk>, as training's encoding does
    train_text = sentences(150, seed=1) + ("<unk> ran .\n" if level == "word" else "")
    d, bundle = trained_bundle(tmp_path, level, train_text, valid)
    want = torch_loss(tmp_path / "run", d, level)
    got = evaluate_bundle(bundle, d / "valid.txt", EvalConfig(BATCH, BPTT, progress=False))
    assert abs(got.loss - want) / want < 1e-3, (got.loss, want)
    vocab_size = len(load_checkpoint(tmp_path / "run" / "best.pt").vocab)
    assert got.loss < math.log(vocab_size) - 0.3  # trained, not random
    n_ids = len(load_corpus(str(d), level).valid)
    assert got.tokens == (n_ids // BATCH - 1) * BATCH
    assert got.unk_mapped == (1 if level == "word" else 0)
    assert ("ppl" if level == "word" else "bpc") in got.figures()
    # chunk length changes only the rounding: the state is carried across chunks
    other = evaluate_bundle(bundle, d / "valid.txt", EvalConfig(BATCH, 7, progress=False))
    assert other.loss == pytest.approx(got.loss, rel=1e-9)


def test_cli_prints_and_writes_json(tmp_path, bundles, capsys):
    f = tmp_path / "t.txt"
    f.write_text("First Citizen:\nSpeak, speak.\n" * 20)
    out = tmp_path / "r.json"
    rc = main(["eval", str(bundles["char"]), "--data", str(f), "--batch-size", "4", "--json", str(out),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bpc" in printed and "tokens/s" in printed
    r = json.loads(out.read_text())
    assert r["tokens"] == (len(f.read_text()) // 4 - 1) * 4 and r["level"] == "char"
    assert r["bpc"] == pytest.approx(r["loss"] / 0.6931471805599453) and r["tokens_per_s"] > 0


def test_unknown_chars_are_a_clear_error(tmp_path, bundles, capsys):
    f = tmp_path / "odd.txt"
    f.write_text("First Citizen: Zebras & quokkas\n" * 10)
    with pytest.raises(EvalError) as e:
        evaluate_bundle(bundles["char"], f, EvalConfig(progress=False))
    msg = str(e.value)
    assert str(f) in msg and "not in the bundle's vocabulary" in msg and "'&'" in msg and "'Z'" in msg
    rc = main(["eval", str(bundles["char"]), "--data", str(f), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lstmgen eval: error: ") and str(f) in err and "Traceback" not in err


def test_unknown_words_without_unk_and_other_errors(tmp_path, bundles):
    from lstmgen.evaluate import encode_text
    from lstmgen.vocab import Vocab

    vocab = Vocab.build("word", ["the cat sat\n"])  # no <unk>
    with pytest.raises(EvalError, match=r"f.txt: 2 word\(s\).*no <unk>.*'dog', 'ran'"):
        encode_text(vocab, "the dog ran\nthe dog\n", "f.txt")
    short = tmp_path / "short.txt"
    short.write_text("the cat\n")
    with pytest.raises(EvalError, match="too few"):
        evaluate_bundle(bundles["word"], short, EvalConfig(progress=False))
    with pytest.raises(TextError, match="not found"):  # the text pipeline's reader (lstmgen/text.py)
        evaluate_bundle(bundles["word"], tmp_path / "absent.txt", EvalConfig(progress=False))


def test_evaluate_module_does_not_import_torch():
    code = "import sys, lstmgen.evaluate, lstmgen.serve.engine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
