"""What a new user tripped on: gRPC's own log line before ours, a whole config before "not a bundle",
text-only settings in a frame model's config line, a prompt echoed before a connection error, and
unknown words read as <unk> without a word. Each through the real command in its own process."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import CHAR_TEXT, make_checkpoint, start_server


def lstmgen(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstmgen.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_on_a_busy_port_says_so_in_our_line_alone(bundles):
    with socket.create_server(("127.0.0.1", 0)) as busy:  # listening: the port is really taken
        port = busy.getsockname()[1]
        r = lstmgen("serve", str(bundles["char"]), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                    "--threads", "1")
    assert r.returncode == 2, r.stderr
    assert f"lstmgen serve: error: cannot listen on 127.0.0.1:{port}: port {port} is in use" in r.stderr, r.stderr
    assert not re.search(r"^E\d{4}", r.stderr, re.M) and "add_port" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "serving on" not in r.stdout


def test_serve_on_an_address_of_another_machine_names_it(bundles):
    r = lstmgen("serve", str(bundles["char"]), "--host", "192.0.2.1", "--port", "0", "--device", "cpu", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr == "lstmgen serve: error: cannot listen on 192.0.2.1:0: 192.0.2.1 is not an address of this " \
                       "machine\n", r.stderr


def test_serve_a_training_run_says_to_export_it_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    make_checkpoint(run / "best.pt", "char", CHAR_TEXT)
    (run / "config.json").write_text(json.dumps({"train": {"preset": "tiny"}}))
    r = lstmgen("serve", str(run), "--port", "0")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "config:" not in r.stderr, r.stderr
    assert f"{run} is a training run (best.pt, config.json), not a bundle" in r.stderr
    assert f"`lstmgen export {run} --out BUNDLE_DIR`" in r.stderr

    r = lstmgen("serve", str(run / "best.pt"), "--port", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a checkpoint, not a bundle" in r.stderr, r.stderr

    r = lstmgen("serve", str(tmp_path), "--port", "0")  # neither: the manifest is missing
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "manifest not found" in r.stderr, r.stderr


def config_line(log_text: str) -> str:
    return next(line for line in log_text.splitlines() if " config: " in line)


@pytest.mark.usefixtures("torch_one_thread")
def test_a_frame_model_config_line_holds_only_what_applies(tmp_path, char_server):
    from test_frames_server import train_and_export

    bundle = train_and_export(tmp_path, "reg", "regression", "lstm", "global")
    srv = start_server(bundle, tmp_path / "frames.log")
    try:
        frames = config_line(srv.log.read_text())
    finally:
        srv.stop()
    for text_only in ("prefix cache", "waits up to", "prompt", "new tokens", "queued", "messages", "http"):
        assert text_only not in frames, (text_only, frames)
    assert "limits: 512 concurrent streams" in frames and "idle streams end after 300s" in frames
    assert "state signing off" in frames
    text = config_line(char_server.log.read_text())
    assert "prefix cache 64 MiB" in text and "waits up to 8 decode steps" in text and "idle streams" not in text


def test_generate_against_a_dead_server_prints_the_error_and_no_prompt(char_server):
    with socket.socket() as reserved:  # bound, not listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        r = lstmgen("generate", "--server", f"127.0.0.1:{port}", "--prompt", "First Citizen:", "--timeout", "10")
    assert r.returncode != 0 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("lstmgen generate: UNAVAILABLE"), r.stderr
    ok = lstmgen("generate", "--server", char_server.target, "--prompt", "First Citizen:", "--max-new-tokens", "3")
    assert ok.returncode == 0 and ok.stdout.startswith("First Citizen:"), ok.stderr  # the echo once it answers


def logged(log, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if needle in line]
        if lines:
            return "\n".join(lines)
        time.sleep(0.05)
    return ""


def test_a_word_model_says_how_many_words_it_read_as_unk(word_server):
    from lstmgen_client import Client

    with Client(word_server.target) as c:
        c.generate("the zebra sat on the quokka zebra", max_new_tokens=2, request_id="unk-words-1")
        c.generate("the <unk> sat on the mat", max_new_tokens=2, request_id="unk-words-none")
    line = logged(word_server.log, "request_id=unk-words-1:")
    assert "INFO" in line and "3 unknown word(s) read as <unk>: 'zebra', 'quokka'" in line, line
    assert line.count("\n") == 0  # once per request
    assert logged(word_server.log, "stream end request_id=unk-words-none")
    assert not logged(word_server.log, "request_id=unk-words-none:", timeout=0)  # `<unk>` typed is a known word
