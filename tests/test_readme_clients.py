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
