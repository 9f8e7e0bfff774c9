"""The HTTP listener's guards (serve/http_server.py), with real sockets against a real
`lstmgen serve --http-port 0`: the read timeout, the connection cap, the descriptor reserve that
keeps gRPC and /metrics working, and one log line per interval instead of one per connection."""
from __future__ import annotations

import json
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, ServerProc, start_server

TRICKLE_S = 0.2  # a slow client's gap between bytes: well inside the read timeout each time


# -- a server and its addresses --------------------------------------------------------------------
def http_port(srv: ServerProc) -> int:
    return int(re.search(r"\(http on http://[\d.]+:(\d+)/\)", srv.ready_line).group(1))


def metrics_url(srv: ServerProc) -> str:
    return re.search(r"\(metrics on (\S+)\)", srv.ready_line).group(1)


def serve(bundle: Path, log: Path, *extra: str) -> ServerProc:
    return start_server(bundle, log, "--http-port", "0", "--metrics-port", "0", *extra)


def serve_with_nofile(bundle: Path, log: Path, nofile: int, *extra: str) -> ServerProc:
    """As `serve`, under a descriptor limit the server cannot raise (soft = hard)."""
    return start_server(bundle, log, "--http-port", "0", "--metrics-port", "0", *extra,
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))


# -- clients ---------------------------------------------------------------------------------------
def connect(port: int, send: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if send:
        s.sendall(send)
    return s


def wait_closed(socks: list[socket.socket], timeout: float, trickle: set[socket.socket] = frozenset(),
                at_least: int | None = None) -> dict[socket.socket, tuple[float, bytes]]:
    """Read the sockets until the server has closed all of them (or `at_least` of them); those in
    `trickle` send one more byte every TRICKLE_S meanwhile. Returns, for each closed one, (seconds
    waited, what the server sent)."""
    at_least = len(socks) if at_least is None else at_least
    t0 = time.monotonic()
    got = {s: b"" for s in socks}
    done: dict[socket.socket, tuple[float, bytes]] = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    next_trickle = t0
    while len(done) < at_least and time.monotonic() < t0 + timeout:
        for key, _ in sel.select(timeout=TRICKLE_S / 2):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            got[s] += data
            if not data:
                done[s] = (time.monotonic() - t0, got[s])
                sel.unregister(s)
        if time.monotonic() >= next_trickle:
            next_trickle += TRICKLE_S
            for s in trickle - done.keys():
                try:
                    s.send(b"a")
                except OSError:  # reset: closed
                    done[s] = (time.monotonic() - t0, got[s])
                    sel.unregister(s)
    sel.close()
    return done


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def complete(port: int) -> dict:
    body = json.dumps({"prompt": "First", "max_tokens": 8, "seed": 1}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())


def assert_all_serving(srv: ServerProc) -> None:
    """HTTP, gRPC and /metrics all answer."""
    from lstmgen_client import Client

    port = http_port(srv)
    assert get(f"http://127.0.0.1:{port}/health") == (200, b'{"status":"ok"}')
    assert len(complete(port)["choices"][0]["text"]) == 8
    with Client(srv.target) as c:
        assert len(c.generate("First", max_new_tokens=8, seed=1, timeout=30).text) == 8
    code, text = get(metrics_url(srv))
    assert code == 200 and b"lstmgen_requests_total" in text


def head(path: str = "/health") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()


def first_replies(socks: list[socket.socket], timeout: float) -> list[bytes]:
    """The first 12 bytes the server sends on each socket (its status line), or what it sent before closing."""
    deadline = time.monotonic() + timeout
    out = []
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        reply = b""
        while len(reply) < 12 and (chunk := s.recv(4096)):
            reply += chunk
        out.append(reply)
    return out


def report_lines(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if "HTTP connections since the last report" in ln]


# -- the read timeout ------------------------------------------------------------------------------
def test_requests_that_do_not_arrive_in_time_are_closed(bundles, tmp_path):
    srv = serve(bundles["char"], tmp_path / "server.log", "--http-read-timeout", "1")
    port = http_port(srv)
    try:
        silent = [connect(port) for _ in range(10)]
        partial = [connect(port, b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: ") for _ in range(10)]
        body = b'{"prompt": "First", "max_tokens": 8}'
        slow_body = [connect(port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           + f"content-length: {len(body) + 1000}\r\n\r\n".encode() + body) for _ in range(3)]
        # A kept-alive connection: uvicorn's keep-alive timer stops at the first byte of the next request
        kept = [connect(port, head()) for _ in range(3)]
        for s in kept:
            reply = b""
            while not reply.endswith(b'{"status":"ok"}'):
                reply += s.recv(4096)
            s.sendall(b"GET /hea")
        closed = wait_closed(silent + partial + slow_body + kept, timeout=20, trickle=set(partial + slow_body + kept))
        assert len(closed) == 26, f"{26 - len(closed)} connections still open after 20 s"
        for s in silent:  # nothing asked, nothing answered
            assert closed[s][1] == b"" and closed[s][0] >= 0.9
        for s in partial + slow_body + kept:
            assert closed[s][1].startswith(b"HTTP/1.1 408 ") and b"request_timeout" in closed[s][1]
            assert closed[s][0] >= 0.9
        assert_all_serving(srv)
    finally:
        assert srv.stop() == 0
    text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in text
    assert 1 <= len(report_lines(tmp_path / "server.log")) <= 3  # one line per 10 s, not one per connection


def test_the_read_timeout_holds_on_a_tls_port_too(bundles, tmp_path):
    """With TLS a connection is the protocol's only after its handshake: the handshake gets the
    same timeout, and the request after it too."""
    pytest.importorskip("cryptography")
    import ssl

    from test_security import make_ca, make_server_cert, pem

    ca_key, ca = make_ca("lstmgen test CA")
    key, cert = make_server_cert(ca_key, ca)
    for name, data in (("ca", pem(ca)), ("cert", pem(cert)), ("key", pem(key))):
        (tmp_path / name).write_bytes(data)
    srv = start_server(bundles["char"], tmp_path / "server.log", "--http-port", "0", "--http-read-timeout", "1",
                       "--tls-cert", str(tmp_path / "cert"), "--tls-key", str(tmp_path / "key"))
    port = int(re.search(r"\(http on https://[\d.]+:(\d+)/\)", srv.ready_line).group(1))
    tls = ssl.create_default_context(cafile=str(tmp_path / "ca"))
    try:
        silent = connect(port)  # no handshake at all
        partial = tls.wrap_socket(connect(port), server_hostname="127.0.0.1")
        partial.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        t0 = time.monotonic()
        assert wait_closed([silent], timeout=20).keys() == {silent}
        reply = b""
        while chunk := partial.recv(4096):  # the socket's own 10 s timeout bounds each read
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408 ") and 0.9 <= time.monotonic() - t0 < 20
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=tls, timeout=10) as r:
            assert r.status == 200
    finally:
        assert srv.stop() == 0
    assert "ERROR" not in (tmp_path / "server.log").read_text()  # no connection held the shutdown up


def test_bad_connection_flags_exit_2(bundles, tmp_path):
    for flag, value in (("--http-read-timeout", "0"), ("--http-read-timeout", "nan"),
                        ("--http-max-connections", "0")):
        r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bundles["char"]), "--http-port", "0",
                            flag, value], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and flag in r.stderr and "must be" in r.stderr, (flag, value, r.stderr)


# -- the connection cap ----------------------------------------------------------------------------
def test_connection_cap_closes_idle_connections_and_refuses_when_all_are_busy(bundles, tmp_path):
    srv = serve(bundles["char"], tmp_path / "server.log", "--http-max-connections", "20",
                "--http-read-timeout", "120")
    port = http_port(srv)
    busy: list[socket.socket] = []
    try:
        silent = [connect(port) for _ in range(60)]
        # Past 20, each new connection closes the one that has waited longest for a request
        closed = wait_closed(silent, timeout=30, at_least=40)
        assert set(closed) == set(silent[:40]) and all(data == b"" for _, data in closed.values())
        assert_all_serving(srv)  # each of its HTTP requests closes an idle one: they are served
        # 20 connections mid-request (the head is in, the body is not): none of them is idle, so a
        # new connection gets a 503 at once. "100 Continue" shows the app is reading the body.
        for _ in range(20):
            s = connect(port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                              b"content-length: 100\r\nexpect: 100-continue\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 100 ")
            busy.append(s)
        t0 = time.monotonic()
        s = connect(port, head())
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        assert time.monotonic() - t0 < 2.0
        assert reply.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in reply and b"too_many_connections" in reply
        from lstmgen_client import Client

        with Client(srv.target) as c:  # gRPC is not HTTP's to refuse
            assert len(c.generate("First", max_new_tokens=8, seed=1, timeout=30).text) == 8
        assert get(metrics_url(srv))[0] == 200
        for s in busy:
            s.close()
        deadline = time.monotonic() + 30
        while get(f"http://127.0.0.1:{port}/health")[0] != 200:
            assert time.monotonic() < deadline, "HTTP still refused after the busy connections closed"
            time.sleep(0.05)
    finally:
        for s in busy:
            s.close()
        assert srv.stop() == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()
    lines = report_lines(tmp_path / "server.log")
    assert 1 <= len(lines) <= 4 and any("idle connections closed" in ln for ln in lines)


# -- the descriptor limit --------------------------------------------------------------------------
def test_more_connections_than_descriptors_leave_grpc_and_metrics_working(bundles, tmp_path):
    log = tmp_path / "server.log"
    srv = serve_with_nofile(bundles["char"], log, 256)
    port = http_port(srv)
    socks: list[socket.socket] = []
    try:
        cap = int(re.search(r"HTTP: at most (\d+) connections", log.read_text()).group(1))
        assert cap < 256 - 64
        socks = [connect(port) for _ in range(400)]  # more than the server has descriptors
        closed = wait_closed(socks, timeout=30, at_least=400 - cap)
        assert len(closed) >= 400 - cap
        assert_all_serving(srv)
    finally:
        for s in socks:
            s.close()
        assert srv.stop() == 0
    text = log.read_text()
    assert "Too many open files" not in text and "out of system resource" not in text
    assert 1 <= len(report_lines(log)) <= 4 and len(text.splitlines()) < 60


SCRIPT = """
import asyncio, logging, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
from lstmgen.serve.http_server import ConnectionLimits, HttpServer

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

async def line():
    loop, done = asyncio.get_running_loop(), asyncio.Event()
    loop.add_reader(0, lambda: (sys.stdin.readline(), loop.remove_reader(0), done.set()))
    await done.wait()

async def main():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    srv = HttpServer(app, "127.0.0.1", 0, limits=ConnectionLimits(30.0, 1000))
    print(await srv.start(), flush=True)
    hog = []
    try:
        while True:  # every descriptor taken, by someone else: accept() fails with EMFILE
            hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print("full", flush=True)
    await line()
    for fd in hog:
        os.close(fd)
    print("freed", flush=True)
    await line()
    await srv.stop()

asyncio.run(main())
"""


def test_out_of_descriptors_pauses_accepting_and_logs_once_per_interval(tmp_path):
    log = tmp_path / "listener.log"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True, cwd=ROOT)
    socks: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "full"
        socks = [connect(port, head()) for _ in range(200)]  # queued by the kernel: accept() fails
        deadline = time.monotonic() + 30
        while not report_lines(log):  # the first failure is reported within a second
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        quiet_until = time.monotonic() + 2.0  # ~4 more failed accepts (one per 0.5 s pause), no more lines
        while time.monotonic() < quiet_until:
            assert len(report_lines(log)) == 1, log.read_text()
            time.sleep(0.05)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "freed"
        # Accepting resumes: every queued connection is answered (200, or 503 past the cap), none hangs
        answers = first_replies(socks, timeout=30)
        assert len(answers) == 200 and {a[:12] for a in answers} <= {b"HTTP/1.1 200", b"HTTP/1.1 503"}
        assert b"HTTP/1.1 200" in {a[:12] for a in answers}
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    text = log.read_text()
    lines = report_lines(log)
    assert "out of system resource" not in text and "Traceback" not in text
    failed = [int(m.group(1)) for ln in lines for m in [re.search(r"(\d+) accepts failed", ln)] if m]
    assert len(lines) <= 3 and sum(failed) >= 3, lines  # counted: a line within a second, the rest in one more

