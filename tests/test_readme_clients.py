"""The README's two Python client examples (sync and async) run against a real server. Only the
address and the prompt change: the test model's vocabulary has no 'ROMEO:'."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def client_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- tests/test_readme_clients.py runs these two blocks against a real server -->", 1)
    assert len(section) == 2, "README.md lost its tested client examples"
    blocks = re.findall(r"```python\n(.*?)```", section[1], re.S)[:2]
    assert "Client(" in blocks[0] and "AsyncClient(" in blocks[1]
    return blocks


def test_the_readme_client_examples_run(char_server):
    for block in client_blocks():
        code = block.replace("localhost:50051", char_server.target).replace("ROMEO:", "First Citizen:")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(out.stdout) > 40, out.stdout


def test_the_readme_openai_example_runs_against_the_readme_command(bundles, tmp_path):
    """The README's serve command on a bundle at bundles/ts (as its API example makes), and its
    OpenAI block, verbatim but for the port (8000 may be taken) and the prompt (the test model has
    no 'ROMEO:')."""
    import shutil

    from conftest import start_server
    from test_http_api import stop

    text = (ROOT / "README.md").read_text()
    part = text.split("<!-- tests/test_readme_clients.py runs this command and the block below -->", 1)[1]
    command = re.search(r"```\n(lstmgen serve .*?)\n```", part).group(1).split()
    block = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    assert command[:3] == ["lstmgen", "serve", "bundles/ts"] and command[3:] == ["--http-port", "8000"]
    shutil.copytree(bundles["char"], tmp_path / "bundles" / "ts")
    srv = start_server(tmp_path / command[2], tmp_path / "serve.log", "--http-port", "0")
    try:
        port = re.search(r"http on http://[\d.]+:(\d+)/", srv.ready_line).group(1)
        code = block.replace("localhost:8000", f"127.0.0.1:{port}").replace("ROMEO:", "First Citizen:")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(out.stdout) > 100, out.stdout
    finally:
        assert stop(srv.proc) == 0
