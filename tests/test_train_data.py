"""train/data.py: split layouts, encoding of held-out splits, the recorded validation split, downloads
and TBPTT batches as tensors. Reading, encoding and numpy batching themselves: tests/test_text_pipeline.py."""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest
import torch

from lstmgen.train.data import DataError, batchify, find_splits, get_batch, load_corpus, num_batches
from lstmgen.vocab import EOS, UNK


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# -- reading --------------------------------------------------------------------------------------
def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        load_corpus(str(tmp_path / "nope.txt"), "char")
    assert "nope.txt" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no split files"):
        load_corpus(str(tmp_path / "empty"), "char")


# -- split layouts --------------------------------------------------------------------------------
def make_ptb(d):
    write(d / "ptb.train.txt", " the cat sat \n the dog sat \n a <unk> ran \n")
    write(d / "ptb.valid.txt", " the cat ran \n a zebra sat \n")  # zebra -> <unk>
    write(d / "ptb.test.txt", " the dog ran \n")
    return d


def test_ptb_layout_from_directory_file_and_prefix(tmp_path):
    d = make_ptb(tmp_path / "ptb")
    for data in (d, d / "ptb.train.txt", d / "ptb.valid.txt", d / "ptb"):
        layout, files = find_splits(data)
        assert layout == "ptb" and files == {s: d / f"ptb.{s}.txt" for s in ("train", "valid", "test")}
    c = load_corpus(str(d / "ptb"), "word")
    v = c.vocab
    assert set(v.tokens) == {"the", "cat", "sat", "dog", "a", "ran", UNK, EOS}  # train only
    assert [v.tokens[i] for i in c.valid] == ["the", "cat", "ran", EOS, "a", UNK, "sat", EOS]
    assert c.test is not None and c.test.dtype == torch.long and len(c.test) == 4
    src = c.source
    assert src["layout"] == "ptb" and src["tokens"] == {"train": 12, "valid": 8, "test": 4}
    assert src["sha256"] == hashlib.sha256((d / "ptb.train.txt").read_bytes()).hexdigest()
    assert src["files"]["valid"]["bytes"] == (d / "ptb.valid.txt").stat().st_size


def test_wikitext_layout(tmp_path):
    d = tmp_path / "wt"
    write(d / "train.txt", "abcabc\nab\n")
    write(d / "valid.txt", "cab\n")
    write(d / "test.txt", "bca\n")
    c = load_corpus(str(d), "char")
    assert c.source["layout"] == "wikitext" and len(c.vocab) == 4  # a b c \n
    assert c.vocab.decode(c.valid.tolist()) == "cab\n" and c.vocab.decode(c.test.tolist()) == "bca\n"
    assert find_splits(d / "valid.txt")[0] == "wikitext"


def test_single_file_holds_out_last_tenth(tmp_path):
    text = "".join(chr(ord("a") + i % 7) for i in range(1000))
    c = load_corpus(str(write(tmp_path / "one.txt", text)), "char")
    assert (len(c.train), len(c.valid)) == (900, 100) and c.test is None
    assert c.vocab.decode(c.valid.tolist()) == text[900:]
    assert c.source["layout"] == "single" and c.source["valid_fraction"] == 0.1
    # word level cuts at a line start, so no word is split between train and valid
    words = "".join(f"w{i % 5} w{(i + 1) % 5}\n" for i in range(50))
    w = load_corpus(str(write(tmp_path / "words.txt", words)), "word", valid_fraction=0.2)
    assert len(w.train) + len(w.valid) == 150 and len(w.valid) % 3 == 0


def test_unknown_symbols_in_held_out_splits(tmp_path):
    d = tmp_path / "c"
    write(d / "train.txt", "aaa bbb\n")
    write(d / "valid.txt", "aaa ccc ddd\n")
    with pytest.raises(DataError) as e:  # word level, no <unk> in the vocabulary
        load_corpus(str(d), "word")
    msg = str(e.value)
    assert "valid split" in msg and "'ccc'" in msg and "'ddd'" in msg and "valid.txt" in msg
    write(d / "valid.txt", "ab\nxyz\n")  # chars: the alphabet covers every split (char-rnn, nanoGPT)
    c = load_corpus(str(d), "char")
    assert {"x", "y", "z"} <= set(c.vocab.tokens)
    assert c.vocab.decode(c.valid.tolist()) == "ab\nxyz\n"


def test_download_caches_and_records_sha256(tmp_path):
    served = write(tmp_path / "www" / "corpus.txt", "hello world\n" * 40)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/corpus.txt"
        c = load_corpus(url, "char", cache_dir=tmp_path / "cache")
        assert c.source["kind"] == "url" and c.source["url"] == url
        assert c.source["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
        served.unlink()  # a second load reads the cache
        assert load_corpus(url, "char", cache_dir=tmp_path / "cache").source["sha256"] == c.source["sha256"]
        with pytest.raises(DataError, match="download failed.*404") as e:
            load_corpus(url + ".missing", "char", cache_dir=tmp_path / "cache")
        assert url in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


# -- TBPTT batching -------------------------------------------------------------------------------
# the streams themselves: tests/test_text_pipeline.py (numpy, and this tensor edge)
def test_get_batch_shapes_and_stream_continuity():
    s = batchify(torch.arange(4 * 50), 4)  # [50, 4]
    bptt = 8
    batches = [get_batch(s, i, bptt) for i in range(0, s.size(0) - 1, bptt)]
    assert len(batches) == num_batches(s, bptt) == 7
    assert [x.shape[0] for x, _ in batches] == [8] * 6 + [1]  # the last one is shorter
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] == 4
        assert torch.equal(y, x + 1)  # targets are the next token of the same stream
    for (_, y0), (x1, _) in zip(batches, batches[1:]):
        assert torch.equal(x1[0], y0[-1])  # stream b picks up where it left off
    xs = torch.cat([x for x, _ in batches])  # [49, 4]
    assert torch.equal(xs[:, 2], torch.arange(100, 149))
