"""Frame streams against clients that misbehave, through the real server: streams that send and never
read (their unread outputs are capped, so the server's memory stays bounded and its other streams go
on), and streams that go quiet (--frame-idle-timeout ends them with DEADLINE_EXCEEDED and frees their
slot).

A client that does not read is made with a small HTTP/2 window (`HELD`): the server's writes then wait
for the client's reads, as they would for a stalled client on a real network."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from lstmgen.tools import scrape
from lstmgen.tools.scrape import scrape_metrics
from lstmgen_client import Client, OverloadedError
from lstmgen_client.v1 import generator_pb2 as pb
from tests.conftest import start_server
from tests.test_metrics import metrics_url

pytestmark = pytest.mark.usefixtures("torch_one_thread")
HELD = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]  # as in test_hardening_streams
D_IN, D_OUT = 3, 32  # wide outputs: what piles up is outputs, 128 bytes a frame
UNREAD = 16  # streams that send and never read
FRAME = [0.5, -1.0, 2.0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny regression model, 3 floats in and 32 out a frame."""
    from lstmgen.export.bundle import export_bundle
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    tmp = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    np.savez(tmp / "wide.npz", x=rng.normal(size=(20, 6, D_IN)).astype(np.float32),
             y=rng.normal(size=(20, 6, D_OUT)).astype(np.float32))
    cfg = preset("sin-cos", epochs=1, hidden_size=8, num_layers=1, projection_size=0, stream=False, device="cpu")
    best = train(cfg, str(tmp / "wide.npz"), tmp / "run", log=lambda line: None, progress_bar=False)
    export_bundle(best, tmp / "bundle")
    return tmp / "bundle"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class PeakRss(threading.Thread):
    """The largest RSS of process `pid` while the `with` block runs (sampled every 10 ms)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, rss_mb(pid), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def stream_frames(channel: grpc.Channel):
    return channel.stream_stream("/lstmgen.v1.FrameModel/StreamFrames",
                                 request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                                 response_deserializer=pb.FramesResponse.FromString)


def endless(frames_per_message: int = 1024):
    """As fast as gRPC takes them, forever: the same message of 1024 frames."""
    msg = pb.FramesRequest(values=FRAME * frames_per_message).SerializeToString()
    while True:
        yield msg


def wait_for(url: str, done, timeout: float = 30.0) -> dict:
    m = scrape.wait_for(url, done, timeout)
    assert done(m), m
    return m


def no_traceback(log: str) -> None:
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def flood(srv, url: str, x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """UNREAD streams that send and never read, and one that reads, all at once: the reading one's
    outputs, the frames the unread ones ran meanwhile, and the server's peak RSS."""
    before = scrape_metrics(url)["lstmgen_frames_total"]
    with grpc.insecure_channel(srv.target, options=HELD) as held:
        calls = [stream_frames(held)(endless(), metadata=(("x-request-id", f"unread-{i}"),)) for i in range(UNREAD)]
        # every unread stream has run at least its cap of outputs (uncapped: it runs on and on)
        m = wait_for(url, lambda m: m["lstmgen_frame_streams"] == UNREAD
                     and m["lstmgen_frames_total"] >= before + UNREAD * 4096)
        with PeakRss(srv.proc.pid) as rss, Client(srv.target, timeout=120) as c:
            shared = np.stack([o.values for o in c.stream_frames(x, frames_per_message=1000)])
            ran = scrape_metrics(url)["lstmgen_frames_total"] - m["lstmgen_frames_total"] - len(x)
        for call in calls:
            call.cancel()
    wait_for(url, lambda m: m["lstmgen_frame_streams"] == 0)
    return shared, ran, rss.peak


def test_streams_that_never_read_hold_bounded_memory(bundle, tmp_path):
    """16 streams send 1024-frame messages as fast as they can and never read. Each is stepped
    until 4,096 outputs wait unread, then its input is no longer read: the server holds per stream
    at most 4,096 + 1,024 frames in, as many outputs and gRPC's 64 KiB window, ~1 MB here, so it
    grows by < 32 MB (uncapped: by 214 MB while a well-behaved stream ran 40,000 frames, 152 MB of
    it kept after the cancels; capped but with gRPC's window grown by BDP probing: by 78 MB). The
    well-behaved stream meanwhile gets exactly what it gets alone, and the unread streams do not
    run. The allocator keeps what the flood took (~15 MB), but a second flood reuses it: the RSS
    after it is within 4 MB of that after the first."""
    srv = start_server(bundle, tmp_path / "unread.log", "--max-concurrent", "64", "--metrics-port", "0")
    try:
        url, pid = metrics_url(srv), srv.proc.pid
        x = np.random.default_rng(1).normal(size=(40_000, D_IN)).astype(np.float32)
        with Client(srv.target, timeout=120) as c:  # alone: the reference (and the server warmed up)
            alone = np.stack([o.values for o in c.stream_frames(x, frames_per_message=1000)])
        base, after = rss_mb(pid), []
        for _ in range(2):
            shared, ran, peak = flood(srv, url, x)
            np.testing.assert_allclose(shared, alone, rtol=1e-4, atol=1e-5)
            assert ran <= UNREAD * 1024, f"the unread streams ran {ran:.0f} frames meanwhile"  # a message each at most
            assert peak - base < 32, f"RSS {base:.0f} -> {peak:.0f} MB with {UNREAD} unread streams"
            after.append(rss_mb(pid))
        assert after[1] - after[0] < 4, f"RSS {base:.0f} MB before, {after[0]:.0f} / {after[1]:.0f} MB after each flood"
        no_traceback(srv.log.read_text())
    finally:
        srv.stop()


IDLE_S = 2  # --frame-idle-timeout of the one-slot server


@pytest.fixture(scope="module")
def one_slot(bundle, tmp_path_factory):
    """One frame stream at a time, ended after 2 s without a message either way."""
    log = tmp_path_factory.mktemp("idle") / "idle.log"
    srv = start_server(bundle, log, "--max-concurrent", "1", "--frame-idle-timeout", str(IDLE_S), "--metrics-port", "0")
    yield srv
    srv.stop()


def assert_idle_ended(srv, e: grpc.RpcError, rid: str) -> None:
    """The server ended the call (not our own deadline), with one INFO line and no traceback."""
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (e.code(), e.details())
    assert f"for {IDLE_S}s, the server's --frame-idle-timeout" in e.details(), e.details()
    line = f"INFO lstmgen.frames.service: frame stream end request_id={rid} status=DEADLINE_EXCEEDED"
    deadline = time.monotonic() + 10
    while line not in srv.log.read_text():
        assert time.monotonic() < deadline, srv.log.read_text()[-3000:]
        time.sleep(0.05)
    no_traceback(srv.log.read_text())


def test_a_quiet_stream_ends_and_frees_its_slot(one_slot):
    """A live source that sent a frame, read its output and went quiet (without half-closing) holds
    the one slot for 2 s, then ends with DEADLINE_EXCEEDED; the next stream gets the slot."""
    url = metrics_url(one_slot)
    wait_for(url, lambda m: m["lstmgen_frame_streams"] == 0)
    quiet = threading.Event()

    def one_frame_then_quiet():
        yield pb.FramesRequest(values=FRAME)
        quiet.wait(60)

    with grpc.insecure_channel(one_slot.target) as ch:
        call = stream_frames(ch)(one_frame_then_quiet(), metadata=(("x-request-id", "quiet"),), timeout=30)
        assert next(call).frames == 1
        read = time.monotonic()
        with Client(one_slot.target, timeout=10) as c, pytest.raises(OverloadedError):  # the slot is taken
            list(c.stream_frames([FRAME]))
        with pytest.raises(grpc.RpcError) as e:
            next(call)
        waited = time.monotonic() - read
        quiet.set()
    assert_idle_ended(one_slot, e.value, "quiet")
    assert IDLE_S - 0.2 < waited < IDLE_S + 8, waited
    m = wait_for(url, lambda m: m["lstmgen_frame_streams"] == 0)
    assert m['lstmgen_requests_total{status="DEADLINE_EXCEEDED"}'] >= 1
    with Client(one_slot.target, timeout=10) as c:
        assert len(list(c.stream_frames([FRAME] * 5))) == 5


def test_a_stream_that_never_sends_ends(one_slot):
    """Opened, not a single message: DEADLINE_EXCEEDED after the idle timeout."""
    quiet = threading.Event()

    def nothing():
        quiet.wait(60)
        yield from ()

    with grpc.insecure_channel(one_slot.target) as ch:
        call = stream_frames(ch)(nothing(), metadata=(("x-request-id", "silent"),), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            next(call)
        quiet.set()
    assert_idle_ended(one_slot, e.value, "silent")


def test_a_stream_that_never_reads_ends_and_frees_its_slot(one_slot):
    """Sends without end and never reads: once its outputs are capped neither side moves, and after
    the idle timeout its slot is free. The client, reading at last, gets the outputs written before
    and then DEADLINE_EXCEEDED."""
    url = metrics_url(one_slot)
    wait_for(url, lambda m: m["lstmgen_frame_streams"] == 0)
    before = scrape_metrics(url)["lstmgen_frames_total"]
    with grpc.insecure_channel(one_slot.target, options=HELD) as held:
        call = stream_frames(held)(endless(), metadata=(("x-request-id", "unread"),), timeout=30)
        wait_for(url, lambda m: m["lstmgen_frames_total"] >= before + 4096)  # it ran up to its cap
        wait_for(url, lambda m: m["lstmgen_frame_streams"] == 0)  # and was ended
        with Client(one_slot.target, timeout=10) as c:
            assert len(list(c.stream_frames([FRAME] * 3))) == 3
        got = 0
        with pytest.raises(grpc.RpcError) as e:
            for msg in call:
                got += msg.frames
    assert_idle_ended(one_slot, e.value, "unread")
    assert got > 0


def test_a_source_that_pauses_less_than_the_timeout_is_kept(one_slot):
    """Empty messages through a pause longer than the idle timeout (frames 3.2 s apart, a message
    every 0.4 s: 5x inside the timeout, room for a busy machine) keep a stream open: idle means no
    message either way, not a stream's age or a pause in its frames."""
    def paced():
        for i in range(10):
            time.sleep(0.4)
            yield pb.FramesRequest(values=FRAME if i % 8 == 0 else [])  # frames at 0.4 s and 3.6 s

    with grpc.insecure_channel(one_slot.target) as ch:
        outs = list(stream_frames(ch)(paced(), timeout=30))
    assert sum(o.frames for o in outs) == 2 and outs[-1].finished


def test_the_idle_timeout_flag_is_checked(bundle):
    r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bundle), "--frame-idle-timeout", "-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--frame-idle-timeout must be >= 0" in r.stderr, r.stderr
