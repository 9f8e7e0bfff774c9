"""The playground page (serve/playground/index.html) in a real headless Chromium (Debian's `chromium`),
driven over the DevTools protocol on a pipe (stdlib only: no driver, no websocket package).

The test loads `/` from `lstmgen serve --http-port`, types a prompt, clicks Generate, and waits for
the streamed text and the model's info to appear. With CI set, a missing chromium fails the test
(`.ci/run` installs it); elsewhere it skips. LSTMGEN_SCREENSHOT=path.png saves what the page shows.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_http_api import start_http_server, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Chromium with --remote-debugging-pipe: JSON messages separated by NUL on fds 3 (in) and 4 (out)."""

    def __init__(self, profile: Path, width: int = 1200, height: int = 760):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: the protocol's fixed descriptors
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            close_fds=False, preexec_fn=fds,  # close_fds would close 3 and 4 after preexec_fn
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf, self._id, self.session = b"", 0, None

    def call(self, method: str, timeout: float = 20.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._to_child)
        os.close(self._from_child)


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does this as root)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


def test_playground_streams_text(chromium, bundles, tmp_path):
    proc, _target, base, _metrics = start_http_server(bundles["char"], tmp_path / "server.log")
    browser = DevTools(tmp_path / "profile")
    try:
        browser.open(base + "/")
        info = browser.wait_for("document.getElementById('info').textContent.includes('LSTM') && "
                                "document.getElementById('info').textContent")
        assert "char-level" in info and "vocabulary" in info  # the model's info, from GET /v1/models
        browser.js("document.getElementById('prompt').value = 'First Citizen:\\n';"
                   "document.getElementById('max_tokens').value = '120';"
                   "document.getElementById('seed').value = '4';"
                   "document.getElementById('go').click(); true")
        status = browser.wait_for("document.getElementById('status').textContent.startsWith('done') && "
                                  "document.getElementById('status').textContent")
        text = browser.js("document.getElementById('generated').textContent")
        assert "120 tokens" in status and len(text) == 120, (status, text)
        shot = os.environ.get("LSTMGEN_SCREENSHOT")
        if shot:
            Path(shot).write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
        assert stop(proc) == 0


def test_playground_fits_the_model_and_sends_what_was_typed(chromium, bundles, tmp_path):
    """The default prompt is one the served model can read (a word model gets no 'ROMEO:'), a stop
    string may hold a comma, a seed past 2^53 reaches the server exactly, and an error is shown
    once, not with its parameter repeated."""
    proc, _target, base, _metrics = start_http_server(bundles["word"], tmp_path / "server.log")
    browser = DevTools(tmp_path / "profile")
    try:
        browser.open(base + "/")
        prompt = browser.wait_for("document.getElementById('info').textContent.includes('LSTM') && "
                                  "document.getElementById('prompt').value")
        assert prompt == "the"
        big = str(2**64 - 1)
        browser.js("document.getElementById('max_tokens').value = '30';"
                   f"document.getElementById('seed').value = '{big}';"
                   "document.getElementById('stop_seq').value = 'cat, dog\\nmat';"
                   "document.getElementById('go').click(); true")
        status = browser.wait_for("document.getElementById('status').textContent.startsWith('done') && "
                                  "document.getElementById('status').textContent")
        assert status.endswith(f"seed {big}"), status
        assert browser.js("JSON.stringify(request().stop)") == '["cat, dog","mat"]'
        browser.js("document.getElementById('temperature').value = '-1';"
                   "document.getElementById('go').click(); true")
        error = browser.wait_for("document.getElementById('status').className === 'error' && "
                                 "document.getElementById('status').textContent")
        assert error.startswith("temperature: is -1") and error.count("temperature") == 1, error
    finally:
        browser.close()
        assert stop(proc) == 0
    requests = [line for line in (tmp_path / "server.log").read_text().splitlines() if "completion end" in line]
    assert len(requests) == 2, requests
