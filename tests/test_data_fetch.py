"""`lstmgen data fetch` offline: the error says where the cache is, where a file downloaded by hand
goes and that its sha256 is checked, and leaves no empty folder; `data list` prints the cache
folder; a name that is neither a file nor a corpus lists the known corpora."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest

from lstmgen import datasets
from lstmgen.cli import main
from lstmgen.datasets import CORPORA, DatasetError

UNREACHABLE = "http://127.0.0.1:1/input.txt"  # port 1: connection refused at once, no network needed


@pytest.fixture
def offline(monkeypatch):
    """tinyshakespeare with its real name, size and sha256, at a URL nothing answers."""
    real = CORPORA["tinyshakespeare"]
    f = dataclasses.replace(real.files[0], url=UNREACHABLE)
    monkeypatch.setitem(CORPORA, "tinyshakespeare", dataclasses.replace(real, files=(f,)))
    return f


def empty_folders(root):
    return [p for p in root.rglob("*") if p.is_dir() and not any(p.iterdir())]


@pytest.mark.parametrize("cache_exists", [False, True])
def test_offline_fetch_says_where_to_put_the_file(tmp_path, monkeypatch, capsys, offline, cache_exists):
    cache = tmp_path / "cache"
    if cache_exists:
        cache.mkdir()
    monkeypatch.setenv("LSTMGEN_DATA", str(cache))
    assert main(["data", "fetch", "tinyshakespeare"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    expected = cache / "tinyshakespeare" / "input.txt"
    assert f"The cache folder is {cache}" in err and f"place it at {expected}" in err
    assert "'input.txt'" in err and offline.sha256 in err and "checked" in err and UNREACHABLE in err
    assert "nothing was downloaded" in err and "resume" not in err  # nothing to resume
    if cache_exists:  # the user's own folder is kept, with nothing left in it
        assert cache.is_dir() and list(cache.iterdir()) == []
    else:
        assert empty_folders(tmp_path) == [] and not cache.exists()


def test_a_file_placed_by_hand_is_checked_and_used(tmp_path, monkeypatch):
    text = b"First Citizen:\nSpeak, speak.\n" * 20
    f = datasets.File("input.txt", UNREACHABLE, hashlib.sha256(text).hexdigest(), len(text))
    monkeypatch.setitem(CORPORA, "tinyshakespeare", datasets.Corpus("tinyshakespeare", "char", (f,), "test",
                                                                    "input.txt"))
    dest = tmp_path / "tinyshakespeare" / "input.txt"
    dest.parent.mkdir()
    dest.write_bytes(text[:-1] + b"?")  # not the pinned file
    with pytest.raises(DatasetError, match=f"sha256 .*expected {f.sha256}"):
        datasets.fetch("tinyshakespeare", tmp_path)
    dest.write_bytes(text)
    assert datasets.fetch("tinyshakespeare", tmp_path) == dest  # no download: the URL answers nothing


def test_data_list_prints_the_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LSTMGEN_DATA", str(tmp_path / "c"))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {tmp_path / 'c'}" in out and "tinyshakespeare" in out
    assert not (tmp_path / "c").exists()  # listing creates nothing


def test_an_unknown_name_lists_the_known_ones(tmp_path, monkeypatch, capsys, bundles):
    known = ", ".join(CORPORA)
    with pytest.raises(DatasetError, match=f"unknown corpus 'nope'; known: {known}"):
        datasets.fetch("nope", tmp_path)
    with pytest.raises(SystemExit):
        main(["data", "fetch", "nope"])
    assert "tinyshakespeare" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # `--data tinyshakespear`: neither a file here nor a corpus
    with pytest.raises(DatasetError, match=f"tinyshakespear: file not found, and not a corpus name.*{known}"):
        datasets.resolve("tinyshakespear")
    assert main(["eval", str(bundles["char"]), "--data", "tinyshakespear", "--no-progress"]) == 2
    assert known in capsys.readouterr().err
    (tmp_path / "mine.train.txt").write_text("x\n")  # a split prefix is left to the loader
    assert datasets.resolve("mine") == "mine"
