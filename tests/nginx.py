"""A real nginx in front of test replicas, run from the shipped deploy/nginx/nginx.conf.

The config is rendered with only what a deployment edits: the upstream `server` lines (one per
replica, parameters kept) and the `listen` line (a free loopback port). nginx runs in the
foreground under a prefix in the test's folder, so it needs no root and writes nothing elsewhere.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
UPSTREAM_LINE = re.compile(r"^([ \t]*)server \S+(.*;)[ \t]*$", re.M)  # inside `upstream`: the only `server X;` lines
LISTEN_LINE = re.compile(r"^([ \t]*)listen \d+(.*;)[ \t]*$", re.M)


def nginx_binary() -> str | None:
    # Debian puts it in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def require_nginx() -> str:
    """The binary, or a skip; under CI a missing nginx fails (.ci/run installs it)."""
    binary = nginx_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed: `apt-get install -y nginx` (.ci/run does this as root)")
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    return binary


def render(upstreams: list[str], port: int | str, conf: Path = CONF) -> str:
    """The shipped config for these replicas, listening on 127.0.0.1:port."""
    text = conf.read_text()
    lines = list(UPSTREAM_LINE.finditer(text))
    assert lines and LISTEN_LINE.search(text), f"{conf} lost its upstream `server` or `listen` lines"
    indent, params = lines[0].group(1), lines[0].group(2)
    servers = "".join(f"{indent}server {u}{params}\n" for u in upstreams)
    text = text[:lines[0].start()] + servers + text[lines[-1].end() + 1:]
    return LISTEN_LINE.sub(lambda m: f"{m.group(1)}listen 127.0.0.1:{port}{m.group(2)}", text, count=1)


def prepare(upstreams: list[str], port: int | str, prefix: Path) -> Path:
    """The prefix folder nginx -p expects (logs/, temp/) and the rendered config in it."""
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    (prefix / "temp").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(upstreams, port))
    return conf


def command(binary: str, prefix: Path, conf: Path, *extra: str) -> list[str]:
    return [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "logs" / "error.log"), *extra]


@dataclass
class NginxProc:
    proc: subprocess.Popen
    target: str  # "127.0.0.1:PORT"
    log: Path  # error log
    access_log: Path  # one line per call: upstream=<replica> grpc_status=<code>

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: the master ends its workers
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> "NginxProc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, so a killed pytest leaves no nginx behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def start_nginx(upstreams: list[str], tmp_dir: Path, timeout: float = 10.0) -> NginxProc:
    """nginx in the foreground in front of `upstreams`, once its port accepts connections."""
    binary = require_nginx()
    prefix = tmp_dir / "nginx"
    for _ in range(3):  # the free port can be taken between our probe and nginx's bind: try another
        port = _free_port()
        conf = prepare(upstreams, port, prefix)
        err = prefix / "logs" / "error.log"
        proc = subprocess.Popen(command(binary, prefix, conf, "-g", "daemon off;"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        nginx = NginxProc(proc, f"127.0.0.1:{port}", err, prefix / "logs" / "access.log")
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _accepts(port):
                return nginx
            time.sleep(0.05)
        nginx.stop()
        if "Address already in use" not in (err.read_text() if err.exists() else ""):
            break
    raise RuntimeError(f"nginx did not start: {err.read_text() if err.exists() else '(no error log)'}")
