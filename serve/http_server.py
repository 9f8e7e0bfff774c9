"""The HTTP listener: uvicorn on the server's event loop, on a socket bound and accepted here.

serve/http_api.py is the application (routes, OpenAI bodies); this module owns the socket and
the connections: a busy port fails at start, port 0 reports the port it got, and no client can
hold connections for free. A request (head and body) must arrive within a read timeout; open
connections are capped below the descriptor limit, keeping a reserve for gRPC and /metrics;
and what is shed or refused is logged as one line per interval, never one per connection.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import json
import logging
import os
import resource
import socket
import struct
import termios
from collections import Counter
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from lstmgen.errors import UserError
from lstmgen.serve.openai_compat import error_json

log = logging.getLogger("lstmgen.http")

REPORT_INTERVAL_S = 10.0  # at most one line per interval about shed connections and failed accepts
FIRST_REPORT_S = 1.0  # the first line after a quiet spell: soon, but after the rest of its burst
ACCEPT_PAUSE_S = 0.5  # out of descriptors: accepting sooner only fails again (the kernel queues meanwhile)
ACCEPTS_PER_WAKEUP = 128  # then the loop's other callbacks (gRPC-side streams, timers) get a turn
EVICTION_CANDIDATES = 16  # idle connections looked at, oldest first, to make room for a new one
TLS_SHUTDOWN_S = 2.0  # a closing TLS connection waits this long for the peer's close_notify (asyncio: 30)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
TIMED_OUT = "closed: no complete request within the read timeout"


class HttpBindError(UserError, OSError):
    """The HTTP address cannot be listened on."""


@dataclass(frozen=True)
class ConnectionLimits:
    read_timeout_s: float = 30.0  # a request's head and body, from connecting or from the last response
    max_connections: int = 1024  # open HTTP connections; fewer if the descriptor limit leaves less room


@dataclass(frozen=True)
class Descriptors:
    """The process's descriptor budget, read once at start."""
    limit: int  # soft RLIMIT_NOFILE (after raising it to the hard limit)
    in_use: int  # open at start: the model, gRPC's listener and pollers, logs
    reserve: int  # kept free for gRPC calls, /metrics and whatever else the process opens
    raised_from: int = 0  # the soft limit before start, when it was raised

    @property
    def ceiling(self) -> int:
        """An accepted descriptor at or above this number eats into the reserve: descriptors are
        handed out lowest first, so every one below it is in use."""
        return self.limit - self.reserve

    def cap(self, wanted: int) -> int:
        return max(1, min(wanted, self.ceiling - self.in_use))


def descriptors() -> Descriptors:
    """Raise the soft descriptor limit to the hard one (as Go's runtime and nginx do: the soft
    default of 1,024 is a select() relic) and measure what is already open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20  # unlimited hard: the kernel's nr_open bounds it
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: /dev/fd, or a guess
        in_use = len(os.listdir("/dev/fd")) if os.path.isdir("/dev/fd") else 64
    return Descriptors(limit=soft, in_use=in_use, reserve=max(64, soft // 10),
                       raised_from=before if soft != before else 0)


def _unread_bytes(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:  # closed already
        return 0


def _canned(status: str, message: str, kind: str, code: str, extra: str = "") -> bytes:
    """A whole response written without the HTTP machinery: the connection closes after it."""
    body = json.dumps(error_json(message, kind, None, code)).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode() + body


class _Report:
    """Counts shed connections, read timeouts and failed accepts, and logs them as one line: a
    second after the first, then at most every REPORT_INTERVAL_S. Under a flood a line per event
    is the flood's amplifier (asyncio's accept loop once logged 888,281 lines in 25 s)."""

    def __init__(self, interval_s: float = REPORT_INTERVAL_S):
        self.interval_s = interval_s
        self._counts: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        self._last = float("-inf")

    def note(self, what: str) -> None:
        self._counts[what] += 1
        if self._timer is None:  # the first line waits a moment, so that a burst makes one line
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(FIRST_REPORT_S, self._last + self.interval_s - loop.time()),
                                          self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counts:
            return
        self._last = asyncio.get_running_loop().time()
        # Timeouts alone are ordinary (browsers open spare connections); anything else is pressure
        level = logging.INFO if set(self._counts) == {TIMED_OUT} else logging.WARNING
        log.log(level, "HTTP connections since the last report (at most one every %gs): %s", self.interval_s,
                "; ".join(f"{n:,} {what}" for what, n in self._counts.items()))
        self._counts.clear()


class _GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP/1.1 protocol with a read deadline and a place in the listener's books.

    The deadline runs from connecting, and again from each response's end on a kept-alive
    connection (uvicorn's keep-alive timer stops at the first byte, so a trickle defeats it).
    When it passes before the whole request is in, the connection is closed: with a 408 if the
    client sent something and no response has begun, silently if it sent nothing at all."""

    def __init__(self, listener: _Listener, fd: int, **kw):
        super().__init__(**kw)
        self._listener = listener
        self.fd = fd  # the accepted socket's, for what the kernel holds unread
        self.setup: asyncio.Task | None = None  # until it ends: the TLS handshake, or this loop turn
        self._deadline: asyncio.TimerHandle | None = None
        self._before = None  # the request cycle before the one being waited for
        self._got_bytes = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_request()

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        super().data_received(data)
        self._note_progress()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_request()
        super().on_response_complete()  # may start a pipelined request at once
        self._note_progress()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._listener.closed(self)
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._before, self._got_bytes = self.cycle, False
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self._listener.limits.read_timeout_s, self._read_timed_out)
        self._listener.waiting(self)

    def _started(self) -> bool:
        return self.cycle is not None and self.cycle is not self._before

    def _note_progress(self) -> None:
        if self._started():  # a request head is in: the connection is no longer idle
            self._listener.busy(self)

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or (self._started() and not self.cycle.more_body):
            return  # the whole request is in: the application decides how long the response takes
        if self._got_bytes and not (self._started() and self.cycle.response_started):
            # The app, if it is waiting for the body, sees a disconnect (connection_lost)
            self.transport.write(self._listener.timeout_response)
            self.transport.close()  # after the 408 is sent
        else:
            self.transport.abort()  # nothing to send: no wait for a TLS peer's goodbye either
        self._listener.report.note(TIMED_OUT)


class _Listener:
    """Accepts on the bound socket itself (not asyncio's create_server), so a connection is
    judged before it costs more than its descriptor. Past the cap, or when the new descriptor
    falls in the reserve, it is one in for one out: the connection that has waited longest for a
    request (silent, a partial head, idle keep-alive: nothing the server owes it) is closed to
    make room; with none idle, the new one gets a 503 and is closed at once. Out of descriptors
    (something else took them), accepting pauses for a moment; asyncio's accept loop (3.11)
    instead retries, logging a traceback each time, up to 100 times per wakeup."""

    def __init__(self, sock: socket.socket, server: uvicorn.Server, ssl, limits: ConnectionLimits,
                 fds: Descriptors):
        self.sock, self.server, self.ssl, self.limits, self.fds = sock, server, ssl, limits, fds
        self.cap = fds.cap(limits.max_connections)
        self.report = _Report()
        self.timeout_response = _canned("408 Request Timeout", f"the request did not arrive within "
                                         f"{limits.read_timeout_s:g}s (--http-read-timeout)", "invalid_request_error",
                                         "request_timeout")
        self._busy_response = _canned("503 Service Unavailable", f"too many HTTP connections (limit {self.cap}); "
                                      "retry later", "service_unavailable_error", "too_many_connections",
                                      "retry-after: 1\r\n")
        self._open: set[_GuardedProtocol] = set()  # accepted and not closed (TLS handshakes included)
        self._waiting: dict[_GuardedProtocol, None] = {}  # idle, longest-waiting first
        self._resume: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def stop(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.report.flush()

    # -- the books, kept by the protocols --------------------------------------------------------
    def waiting(self, p: _GuardedProtocol) -> None:
        if p in self._open:  # not one closed to make room before it was even connected
            self._waiting.pop(p, None)
            self._waiting[p] = None  # to the end: the most recent to start waiting

    def busy(self, p: _GuardedProtocol) -> None:
        self._waiting.pop(p, None)

    def closed(self, p: _GuardedProtocol) -> None:
        self._waiting.pop(p, None)
        self._open.discard(p)

    # -- accepting -------------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    self.report.note(f"accepts failed ({e.strerror})")
                    return
                self.report.note(f"accepts failed ({e.strerror}; accepting paused {ACCEPT_PAUSE_S:g}s each time)")
                self._loop.remove_reader(self.sock.fileno())
                self._resume = self._loop.call_later(ACCEPT_PAUSE_S, self.start)
                return
            if not self._admit(conn):
                return  # a connection closed to make room frees its descriptor on the loop's next turn

    def _admit(self, conn: socket.socket) -> bool:
        """Serve or refuse `conn`; False when an idle connection was closed to make room for it."""
        # Past either limit, one in for one out; with nothing idle to close, the new one is refused
        full = conn.fileno() >= self.fds.ceiling or len(self._open) >= self.cap
        if full and not self._evict_one():
            why = (f"the descriptor reserve ({self.fds.reserve} of {self.fds.limit}) is kept for gRPC and metrics"
                   if conn.fileno() >= self.fds.ceiling else
                   f"{self.cap} connections (--http-max-connections), none idle")
            self._refuse(conn, f"refused with 503: {why}")
            return True
        p = _GuardedProtocol(self, conn.fileno(), config=self.server.config, server_state=self.server.server_state,
                             app_state=self.server.lifespan.state)
        self._open.add(p)
        self._waiting[p] = None  # idle from the start: a burst's connections can make room for the next
        p.setup = self._loop.create_task(self._connect(conn, p))
        p.setup.add_done_callback(lambda t: conn.close() if t.cancelled() else None)  # closed before it began
        return not full

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request, among those with nothing
        unread in the kernel either: one accepted in this same burst may hold a whole request the
        loop has not read yet. Looks at the few oldest only, so a burst costs no scan of them all."""
        victim = next((p for p in itertools.islice(self._waiting, EVICTION_CANDIDATES) if not _unread_bytes(p.fd)),
                      None)
        if victim is None:
            return False
        self.closed(victim)  # out of the books now; its descriptor is freed on the loop's next turn
        if victim.transport is not None:
            victim.transport.abort()  # idle: nothing to send, and no wait for a TLS peer's goodbye
        else:  # not connected yet (a TLS handshake, or accepted this loop turn)
            victim.setup.cancel()
        self.report.note(f"idle connections closed to admit new ones (at {self.cap} connections, "
                         "--http-max-connections, or at the descriptor reserve)")
        return True

    async def _connect(self, conn: socket.socket, p: _GuardedProtocol) -> None:
        tls = ({"ssl": self.ssl, "ssl_handshake_timeout": self.limits.read_timeout_s,
                "ssl_shutdown_timeout": TLS_SHUTDOWN_S} if self.ssl else {})
        try:  # from here the transport owns the socket, and closes it however this ends
            await self._loop.connect_accepted_socket(lambda: p, conn, **tls)
        except (Exception, asyncio.CancelledError) as e:  # a failed or slow TLS handshake, or closed to make room
            log.debug("HTTP connection ended before it began: %r", e)
            self.closed(p)

    def _refuse(self, conn: socket.socket, why: str) -> None:
        try:
            conn.setblocking(False)
            conn.send(self._busy_response)  # fits: a new connection's send buffer is empty
            conn.recv(65536)  # what the client sent already: closing on unread bytes would send a reset
        except OSError:
            pass
        conn.close()
        self.report.note(why)


class HttpServer:
    """uvicorn on the running event loop, on a socket bound here (so a busy port fails at start,
    and port 0 reports the port it got). Signals stay with run_until_signal."""

    def __init__(self, app, host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None,
                 grace_s: float = 2.0, limits: ConnectionLimits = ConnectionLimits()):
        self.host, self.port, self.limits = host, port, limits
        self._config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                      ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                      timeout_graceful_shutdown=max(grace_s, 0.1))
        self._server = uvicorn.Server(self._config)
        self._sock: socket.socket | None = None
        self._listener: _Listener | None = None
        self._ticker: asyncio.Task | None = None

    async def start(self) -> int:
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self._sock = socket.create_server((self.host, self.port), family=family, backlog=self._config.backlog)
        except OSError as e:
            raise HttpBindError(f"cannot listen on {self.host}:{self.port} for HTTP (--http-port): {e.strerror}; "
                                "in use (another server?) or not an address of this machine") from None
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)  # "off": a no-op (as uvicorn's _serve)
        self._server.servers = []  # uvicorn's shutdown closes these; the socket is accepted by _Listener
        fds = descriptors()
        self._listener = _Listener(self._sock, self._server, self._config.ssl, self.limits, fds)
        self._listener.start()
        self._ticker = asyncio.create_task(self._server.main_loop())  # the Date header, once a second
        self.port = self._sock.getsockname()[1]
        log.info("HTTP: at most %d connections, a request must arrive within %gs; descriptors: limit %d%s, "
                 "%d open at start, %d kept free for gRPC and metrics", self._listener.cap,
                 self.limits.read_timeout_s, fds.limit,
                 f" (raised from {fds.raised_from})" if fds.raised_from else "", fds.in_use, fds.reserve)
        return self.port

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._listener is not None:
            self._listener.stop()
        if self._ticker is not None:
            await self._ticker
        await self._server.shutdown(sockets=[self._sock] if self._sock else None)
