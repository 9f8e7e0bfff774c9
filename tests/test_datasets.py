"""`lstmgen data fetch` and `--data NAME` against a tiny fake corpus on a local HTTP server
(no internet): download, checksum mismatch, an interrupted download resumed with HTTP Range."""
from __future__ import annotations

import hashlib
import http.server
import re
import threading

import pytest

from lstmgen import datasets
from lstmgen.cli import main
from lstmgen.datasets import CORPORA, Corpus, DatasetError, File

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves TEXT at any path; honours `Range: bytes=N-`; `/cut/...` drops the connection halfway."""
    ranges: list = []

    def do_GET(self):
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        self.ranges.append(start)
        body = TEXT[start:]
        self.send_response(206 if m else 200)
        self.send_header("Content-Length", str(len(body)))
        if m:
            self.send_header("Content-Range", f"bytes {start}-{len(TEXT) - 1}/{len(TEXT)}")
        self.end_headers()
        if self.path.startswith("/cut/") and not m:
            self.wfile.write(body[: len(body) // 2])  # then close: the client sees a short read
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def fake(url: str, sha: str | None = None) -> File:
    return File("input.txt", url, sha or hashlib.sha256(TEXT).hexdigest(), len(TEXT))


def test_download_and_reuse(server, tmp_path):
    Handler.ranges.clear()
    dest = datasets.fetch_file(fake(server + "/input.txt"), tmp_path / "c" / "input.txt", log=lambda m: None)
    assert dest.read_bytes() == TEXT and not (tmp_path / "c" / "input.txt.part").exists()
    datasets.fetch_file(fake(server + "/input.txt"), dest, log=lambda m: None)
    assert Handler.ranges == [0]  # cached: not downloaded again


def test_checksum_mismatch_removes_the_copy(server, tmp_path):
    with pytest.raises(DatasetError, match="checksum mismatch"):
        datasets.fetch_file(fake(server + "/input.txt", "0" * 64), tmp_path / "input.txt", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_partial_download_resumes(server, tmp_path):
    Handler.ranges.clear()
    f = fake(server + "/cut/input.txt")
    with pytest.raises(DatasetError, match="resume"):
        datasets.fetch_file(f, tmp_path / "input.txt", log=lambda m: None)
    part = tmp_path / "input.txt.part"
    assert 0 < part.stat().st_size < len(TEXT)
    logs = []
    assert datasets.fetch_file(f, tmp_path / "input.txt", log=logs.append).read_bytes() == TEXT
    assert Handler.ranges == [0, len(TEXT) // 2] and "resuming" in logs[0]


def test_cli_fetch_and_data_name(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(CORPORA, "tinyshakespeare", Corpus("tinyshakespeare", "char", (fake(server + "/x"),),
                                                           "test", "input.txt"))
    assert main(["data", "fetch", "tinyshakespeare", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tinyshakespeare" / "input.txt")
    monkeypatch.setenv("LSTMGEN_DATA", str(tmp_path))
    assert datasets.resolve("tinyshakespeare") == str(tmp_path / "tinyshakespeare" / "input.txt")
    assert datasets.resolve("some/file.txt") == "some/file.txt"
    from lstmgen.train.data import load_corpus  # `train --data NAME`
    corpus = load_corpus("tinyshakespeare", "char")
    assert corpus.source["kind"] == "named" and corpus.source["path"] == str(tmp_path / "tinyshakespeare" / "input.txt")
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["data", "fetch", "nope"])


def test_pinned_checksums_are_the_canonical_ones():
    """Every pinned file names an immutable commit of its canonical repository and a sha256."""
    for c in CORPORA.values():
        for f in c.files:
            assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and re.search(r"/[0-9a-f]{40}/", f.url) and f.size > 0
