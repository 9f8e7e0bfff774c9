"""lstmgen/text.py, the one text pipeline: reading, encoding and its unknown-symbol policy, the
held-out split, numpy streams and the loss figures; and that training, `lstmgen eval` and serving
use it alike (the validation split training read is recorded in the bundle and `lstmgen eval
BUNDLE` with no --data scores exactly that)."""
from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest

import lstmgen.text as text_module
from conftest import CHAR_TEXT, WORD_TEXT, export, make_checkpoint
from lstmgen.bundle import BundleError, load_manifest
from lstmgen.cli import main
from lstmgen.evaluate import EvalConfig, EvalError, EvalResult, evaluate_bundle, recorded_part
from lstmgen.text import (TextError, ValidationSplit, batchify, bits_per_char, encode, figure_text, figures,
                          held_out_start, perplexity, read_text, symbols)
from lstmgen.vocab import EOS, UNK, UnknownTokensError, Vocab

B = 4
LINES = ["First Citizen:", "Before we proceed any further, hear me speak.", "All:", "Speak, speak.",
         "You are all resolved rather to die than to famish?", "Resolved. resolved."]


def lines(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(LINES) + "\n" for _ in range(n))


def layout(tmp_path, n: int):
    """A corpus folder with its own validation file: train.txt and valid.txt of n lines each."""
    d = tmp_path / "corpus"
    d.mkdir()
    for split, seed in (("train", 1), ("valid", 2)):
        (d / f"{split}.txt").write_text(lines(n, seed))
    return d


# -- reading --------------------------------------------------------------------------------------
def test_read_text_universal_newlines_and_bom(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_text(f) == "one\ntwo\nthree\n"


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "file not found"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: p.write_bytes(b"ok\n\xff\xfe bad"), r"not UTF-8 text \(bad byte b'\\xff' at offset 3\)"),
    (lambda p: p.write_bytes(b""), "file is empty"),
    (lambda p: p.write_bytes(b"  \n\n"), "file is empty"),
])
def test_read_text_errors_name_the_file_and_the_problem(tmp_path, make, match):
    p = tmp_path / "corpus.txt"
    make(p)
    with pytest.raises(TextError, match=match) as e:
        read_text(p)
    assert str(e.value).startswith(f"{p}: ")


def test_an_unreadable_file_is_the_same_error(tmp_path, monkeypatch):
    p = tmp_path / "locked.txt"
    p.write_text("text\n")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(text_module, "open", refuse, raising=False)  # shadows the builtin in lstmgen.text
    with pytest.raises(TextError, match="cannot be read: Permission denied") as e:
        read_text(p)
    assert str(e.value).startswith(f"{p}: ")


def test_training_and_eval_read_with_this_reader(tmp_path):
    import lstmgen.evaluate
    import lstmgen.train.data

    assert lstmgen.train.data.read_text is read_text and lstmgen.evaluate.read_text is read_text
    assert lstmgen.train.data.DataError is TextError and issubclass(EvalError, TextError)


# -- encoding -------------------------------------------------------------------------------------
def test_char_round_trip_and_unknown_policy():
    v = Vocab.build("char", ["abc\n"])
    enc = encode(v, "cab\nba")
    assert enc.ids.dtype == np.int64 and v.decode(enc.ids.tolist()) == "cab\nba"
    assert (enc.unknown, enc.unk_mapped, enc.skipped) == ((), 0, 0)
    assert encode(v, "ab", lines=True).ids.tolist() == encode(v, "ab").ids.tolist()  # no <eos> for chars
    with pytest.raises(UnknownTokensError, match=r"2 character\(s\) not in the vocabulary: 'z', 'Z'") as e:
        encode(v, "azbZz")
    assert e.value.unknown == ["z", "Z"]
    skipped = encode(v, "azbZz", skip_unknown=True)
    assert v.decode(skipped.ids.tolist()) == "ab" and skipped.skipped == 3 and skipped.unknown == ("z", "Z")


def test_word_lines_eos_and_unknown_policy():
    v = Vocab.build("word", [f"the cat sat\na dog {UNK}\n"])
    file_ids = encode(v, "the cat\nsat", lines=True).ids.tolist()  # a file: its last line ends too
    assert [v.tokens[i] for i in file_ids] == ["the", "cat", EOS, "sat", EOS]
    prompt = encode(v, "the cat\nsat").ids.tolist()  # a prompt: <eos> only where a "\n" is
    assert [v.tokens[i] for i in prompt] == ["the", "cat", EOS, "sat"]
    enc = encode(v, "the zebra sat on the quokka zebra <unk>\n", lines=True)
    assert [v.tokens[i] for i in enc.ids] == ["the", UNK, "sat", UNK, "the", UNK, UNK, UNK, EOS]
    assert enc.unk_mapped == 4 and enc.unknown == ("zebra", "on", "quokka")  # a typed <unk> is a known word
    assert encode(v, "zebra", skip_unknown=True).ids.tolist() == [v.unk_id]  # <unk> stands for it: nothing skipped
    no_unk = Vocab.build("word", ["the cat\n"])
    with pytest.raises(UnknownTokensError, match=r"1 word\(s\) not in the vocabulary, which has no <unk> "
                                                 r"to map them to: 'dog'"):
        encode(no_unk, "the dog\n")
    skipped = encode(no_unk, "the dog dog\n", skip_unknown=True, lines=True)
    assert [no_unk.tokens[i] for i in skipped.ids] == ["the", EOS] and skipped.skipped == 2


def test_a_line_ends_at_newline_only():
    # files are read with universal newlines (CR, CRLF -> LF); other separators are white space in a line
    assert symbols("a\x0cb\u2028c\nd", "word") == ["a", "b", "c", EOS, "d"]
    assert symbols("a\n\n", "word") == ["a", EOS, EOS] == symbols("a\n\n", "word", lines=True)
    assert symbols("", "word", lines=True) == [] and symbols("x y", "word", lines=True) == ["x", "y", EOS]


def test_vocab_and_serving_encode_through_it():
    from lstmgen.serve.errors import InvalidRequest
    from lstmgen.serve.params import GenerationRequest, encode_prompt

    v = Vocab.build("word", [WORD_TEXT])
    prompt = "the zebra sat\non"
    assert v.encode(prompt) == encode(v, prompt).ids.tolist() == encode_prompt(GenerationRequest(prompt), v)
    c = Vocab.build("char", [CHAR_TEXT])
    assert encode_prompt(GenerationRequest("Fi~rst", skip_unknown=True), c) == encode(c, "First").ids.tolist()
    with pytest.raises(InvalidRequest, match=r"1 character\(s\) not in the vocabulary: '~'.*skip_unknown drops"):
        encode_prompt(GenerationRequest("Fi~rst"), c)


# -- the held-out split ---------------------------------------------------------------------------
def test_training_holds_out_the_split_this_module_cuts(tmp_path):
    from lstmgen.train.data import load_corpus

    for level, fraction in (("char", 0.1), ("word", 0.15)):
        text = lines(80, seed=3)
        f = tmp_path / f"{level}.txt"
        f.write_text(text)
        c = load_corpus(str(f), level, fraction)
        start = held_out_start(text, level, fraction)
        split = ValidationSplit.from_dict(c.source["validation"])
        assert (split.file, split.start, split.end, split.fraction, split.level) == (f.name, start, len(text),
                                                                                     fraction, level)
        assert split.sha256 == c.source["sha256"] and split.path == str(f.resolve())
        assert c.valid.tolist() == encode(c.vocab, text[start:], lines=True).ids.tolist()
        assert c.train.tolist() == encode(c.vocab, text[:start], lines=True).ids.tolist()
        if level == "word":
            assert text[start - 1] == "\n"  # a line start: no word is cut


def test_a_validation_file_is_recorded_whole(tmp_path):
    from lstmgen.train.data import load_corpus

    d = layout(tmp_path, 30)
    c = load_corpus(str(d), "char")
    split = ValidationSplit.from_dict(c.source["validation"])
    assert (split.file, split.start, split.end, split.fraction) == ("valid.txt", 0, len(lines(30, 2)), None)
    assert split.sha256 == c.source["files"]["valid"]["sha256"]
    assert split.describe() == "the whole of valid.txt, the validation split"


# -- streams --------------------------------------------------------------------------------------
def test_batchify_makes_contiguous_streams_and_drops_the_rest():
    s = batchify(np.arange(103, dtype=np.int64), 4)
    assert s.shape == (25, 4) and s.flags["C_CONTIGUOUS"] and s.dtype == np.int64
    for b in range(4):
        assert np.array_equal(s[:, b], np.arange(25 * b, 25 * b + 25))
    with pytest.raises(TextError, match="7 tokens are too few for 4 streams"):
        batchify(np.arange(7), 4)


def test_the_trainers_tensor_streams_are_these():
    import torch

    from lstmgen.train.data import DataError
    from lstmgen.train.data import batchify as torch_batchify

    ids = np.arange(4 * 50 + 3, dtype=np.int64)
    t = torch_batchify(torch.from_numpy(ids), 4)
    assert t.dtype == torch.long and t.is_contiguous() and np.array_equal(t.numpy(), batchify(ids, 4))
    with pytest.raises(DataError, match="too few"):
        torch_batchify(torch.arange(7), 4)


# -- figures --------------------------------------------------------------------------------------
def test_figures_against_hand_computation():
    nats = 4.7689  # PTB-small's test loss: ppl about 117.8
    assert perplexity(nats) == pytest.approx(2.718281828459045 ** nats, rel=1e-12)
    assert bits_per_char(1.4620) == pytest.approx(1.4620 / 0.6931471805599453, rel=1e-12)
    assert figures("word", nats) == {"ppl": perplexity(nats)} and figures("char", 1.0) == {"bpc": 1 / math.log(2)}
    assert perplexity(1e6) == math.exp(700.0)  # capped below overflow
    assert figure_text("word", math.log(117.349)) == "ppl 117.35"
    assert figure_text("word", math.log(117.349), precise=True) == "ppl 117.349"
    assert figure_text("char", 1.4620) == "2.1092 bpc"


def test_trainer_eval_and_logs_report_the_same_figures():
    from types import SimpleNamespace

    from lstmgen.train.lm_task import TextTask
    from lstmgen.train.runlog import _best_note

    for level, key in (("word", "ppl"), ("char", "bpc")):
        loss = 1.7
        want = figures(level, loss)[key]
        task = SimpleNamespace(cfg=SimpleNamespace(level=level))  # all TextTask.figures reads
        assert TextTask.figures(task, {"loss": loss * 10, "count": 10}) == pytest.approx({"loss": loss, key: want})
        r = EvalResult("b", "d", level, 10, loss, 1.0, 0, 1)
        assert r.figures() == {key: want} and r.to_dict()[key] == want
        assert figure_text(level, loss, precise=True) in r.line()
        assert _best_note(level, [], loss) == f"best val {loss:.4f} ({figure_text(level, loss)})"


# -- the recorded split, from training to `lstmgen eval` ------------------------------------------
def test_manifest_records_the_split_and_checks_it(tmp_path):
    import lstmgen.manifest_schema as schema

    split = ValidationSplit("input.txt", "ab" * 32, "char", 10, 20, 0.1, path="/data/input.txt")
    raw = {"format_version": 1, "num_layers": 1, "hidden_size": 2, "embedding_size": 2, "opset": 17,
           "vocab": {"level": "char", "tokens": ["a"]}, "validation_split": split.to_dict()}
    schema.check_fields(raw)
    assert "corpus" not in raw["validation_split"]  # None fields are left out
    for change, match in ((dict(level="word"), "disagrees with the vocabulary's 'char'"),
                          (dict(start=30), "not a span"), (dict(fraction=1.5), "fraction must be a number in"),
                          (dict(extra=1), "unknown field"), (dict(start="0"), "start must be an integer")):
        bad = {**raw, "validation_split": {**raw["validation_split"], **change}}
        with pytest.raises(schema.SchemaError, match=match):
            schema.check_fields(bad)
    del raw["validation_split"]["sha256"]
    with pytest.raises(schema.SchemaError, match="'validation_split.sha256' is missing"):
        schema.check_fields(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained a few real steps on one file whose last 10% training holds out, exported."""
    import torch

    from lstmgen.export.bundle import export_bundle
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    d = tmp_path_factory.mktemp("trained")
    f = d / "input.txt"
    f.write_text(lines(150, seed=1))
    cfg = preset("tiny", embedding_size=16, hidden_size=24, batch_size=4, bptt=16, eval_batch_size=B,
                 epochs=50, max_steps=30, seed=3, device="cpu", save_every=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torch_one_thread fixture: tiny models gain nothing from threads
    try:
        train(cfg, str(f), d / "run", log=lambda s: None, progress_bar=False)
        export_bundle(d / "run" / "best.pt", d / "bundle", verify_steps=10)
    finally:
        torch.set_num_threads(threads)
    return f, d / "run", d / "bundle"


def test_eval_without_data_scores_the_split_training_validated_on(trained, tmp_path, capsys):
    from lstmgen.train.checkpoint import load_checkpoint

    f, run, bundle = trained
    text = f.read_text()
    start = held_out_start(text, "char", 0.1)
    best = load_checkpoint(run / "best.pt")
    split = load_manifest(bundle).validation_split
    assert split == ValidationSplit.from_dict(best.corpus["validation"])  # checkpoint -> manifest
    assert (split.file, split.start, split.end, split.fraction) == ("input.txt", start, len(text), 0.1)
    cfg = EvalConfig(batch_size=B, progress=False)
    got = evaluate_bundle(bundle, None, cfg)
    assert got.span == (start, len(text)) and got.data == str(f.resolve())
    assert got.scored == f"the validation tail of input.txt, chars {start:,}..{len(text):,} (10%), recorded in the bundle"
    assert got.tokens == (best.metrics["valid_tokens"] // B - 1) * B  # the trainer's validation streams
    assert got.loss == pytest.approx(best.metrics["best_val_loss"], rel=1e-3)  # ... and its figure
    assert evaluate_bundle(bundle, f, cfg).loss == pytest.approx(got.loss, rel=1e-9)  # --data FILE: the same tail
    out = tmp_path / "r.json"
    assert main(["eval", str(bundle), "--batch-size", str(B), "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"scored the validation tail of input.txt, chars {start:,}..{len(text):,} (10%), recorded in the bundle" \
        in printed
    assert json.loads(out.read_text())["span"] == [start, len(text)]


def test_eval_without_data_names_what_the_bundle_recorded(trained, tmp_path, capsys):
    f, _, bundle = trained
    moved = tmp_path / "elsewhere.txt"
    shutil.move(f, moved)
    try:
        rc = main(["eval", str(bundle), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("lstmgen eval: error: ") and "Traceback" not in err
        assert "records its validation split as the validation tail of input.txt, chars" in err
        assert f"{f.resolve()} is not found" in err and "--data FILE" in err
        assert evaluate_bundle(bundle, moved, EvalConfig(batch_size=B, progress=False)).span[0] > 0  # by sha256
        f.write_text(moved.read_text() + "more\n")
        with pytest.raises(EvalError, match="has changed since training"):
            evaluate_bundle(bundle, None, EvalConfig(batch_size=B, progress=False))
    finally:
        shutil.move(moved, f)


def test_a_bundle_without_a_recorded_split_asks_for_data(bundles):
    assert load_manifest(bundles["char"]).validation_split is None  # a checkpoint that records none
    with pytest.raises(EvalError, match="records no validation split.*--data FILE"):
        evaluate_bundle(bundles["char"], None, EvalConfig(progress=False))


def test_a_recorded_corpus_is_found_in_the_data_cache(tmp_path, monkeypatch):
    from lstmgen.datasets import sha256_of

    cache = tmp_path / "cache"
    (cache / "tinyshakespeare").mkdir(parents=True)
    f = cache / "tinyshakespeare" / "input.txt"
    f.write_text(lines(20, seed=4))
    monkeypatch.setenv("LSTMGEN_DATA", str(cache))
    split = ValidationSplit("input.txt", sha256_of(f), "char", 5, 9, 0.1, path=str(tmp_path / "gone" / "input.txt"),
                            corpus="tinyshakespeare")
    path, part = recorded_part("B", split)
    assert path == f and (part.start, part.end) == (5, 9)
    with pytest.raises(EvalError, match="or --data tinyshakespeare"):
        recorded_part("B", ValidationSplit("input.txt", "0" * 64, "char", 5, 9, 0.1, corpus="tinyshakespeare"))


def test_a_layouts_validation_file_is_scored_whole_without_data(tmp_path):
    from lstmgen.train.checkpoint import load_checkpoint, save_checkpoint
    from lstmgen.train.data import load_corpus

    d = layout(tmp_path, 40)
    ckpt = make_checkpoint(tmp_path / "m.pt", "char", "".join(LINES) + "\n")
    c = load_checkpoint(ckpt)
    c.corpus = load_corpus(str(d), "char").source
    save_checkpoint(c, ckpt)
    bundle = export(ckpt, tmp_path / "bundle", verify_steps=10)
    got = evaluate_bundle(bundle, None, EvalConfig(batch_size=B, progress=False))
    assert got.span == (0, len(lines(40, 2))) and got.data == str((d / "valid.txt").resolve())
    assert got.scored == "the whole of valid.txt, the validation split, recorded in the bundle"
    # a manifest edited to disagree with its vocabulary is refused by the schema
    m = json.loads((bundle / "manifest.json").read_text())
    m["validation_split"]["level"] = "word"
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="validation_split.level"):
        load_manifest(bundle)
