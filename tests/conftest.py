"""Shared fixtures: tiny real models (random weights), their exported bundles, and a real server
process on a free loopback port."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAR_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n"
             "All:\nSpeak, speak.\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n")
WORD_TEXT = "the cat sat on the mat\nthe dog ate the <unk> bone\na cat and a dog\n"


def make_checkpoint(path: Path, level: str, text: str, *, hidden: int = 16, embedding: int = 16,
                    layers: int = 2, tie: bool = False, seed: int = 0, eot_bias: float = 0.0,
                    cell: str = "lstm", head_scale: float = 1.0) -> Path:
    """A randomly initialised RecurrentLM (an LSTM or GRU stack) saved as an lstmgen checkpoint (tiny:
    exports in ms). head_scale multiplies the output layer: spread logits, as a trained model's."""
    import torch

    from lstmgen.train.checkpoint import Checkpoint, save_checkpoint
    from lstmgen.train.config import TrainConfig
    from lstmgen.train.model import RecurrentLM
    from lstmgen.vocab import Vocab

    vocab = Vocab.build(level, [text + ("\x03" if eot_bias and level == "char" else "")])
    cfg = TrainConfig(level=level, embedding_size=embedding, hidden_size=hidden, num_layers=layers, tie_weights=tie,
                      cell=cell)
    torch.manual_seed(seed)
    model = RecurrentLM(cfg.model_config(len(vocab))).eval()
    with torch.no_grad():
        if eot_bias:
            model.head.bias[vocab.eot_id] += eot_bias
        model.head.weight *= head_scale
        model.head.bias *= head_scale
    ckpt = Checkpoint(cfg.model_config(len(vocab)), cfg, vocab, model.state_dict(),
                      metrics={"note": "random weights for tests"}, corpus={"source": "tests"})
    return save_checkpoint(ckpt, path)


@pytest.fixture
def torch_one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box threads stall each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def export(ckpt: Path, out: Path, **kw) -> Path:
    from lstmgen.export.bundle import export_bundle

    export_bundle(ckpt, out, **kw)
    return out


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    return {
        "char": export(make_checkpoint(d / "char.pt", "char", CHAR_TEXT), d / "char"),
        "word": export(make_checkpoint(d / "word.pt", "word", WORD_TEXT, seed=1), d / "word"),
        # head bias pushes the end-of-text symbol: generation ends with END_OF_TEXT early
        "eot": export(make_checkpoint(d / "eot.pt", "char", CHAR_TEXT, seed=2, eot_bias=4.0), d / "eot"),
        "gru": export(make_checkpoint(d / "gru.pt", "char", CHAR_TEXT, seed=3, cell="gru"), d / "gru"),
    }


@dataclass
class ServerProc:
    proc: subprocess.Popen
    target: str
    log: Path
    ready_line: str = ""  # what the server printed once serving (its gRPC, metrics and HTTP addresses)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(bundle: Path, log: Path, *extra: str, timeout: float = 60.0, preexec_fn=None) -> ServerProc:
    """`lstmgen serve` in its own process on a free loopback port; waits for its ready line
    (`preexec_fn` runs in the child before the server starts: a resource limit, say)."""
    cmd = [sys.executable, "-m", "lstmgen.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--threads", "1", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    errf = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, env=env, preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"serving on ([\d.]+):(\d+)", line)
        if m:
            return ServerProc(proc, f"{m.group(1)}:{m.group(2)}", log, line)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()}")


@pytest.fixture(scope="session")
def char_server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "char_server.log"
    srv = start_server(bundles["char"], log, "--max-prompt-chars", "2000", "--max-new-tokens", "500",
                       "--default-new-tokens", "40")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def word_server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "word_server.log"
    srv = start_server(bundles["word"], log)
    yield srv
    srv.stop()
