"""Start-up on hostile files and busy ports: a graph file that is not protobuf (zeros, 0xFF, random
bytes, a real graph with zeros after it), with the manifest's checksum updated to match, is refused
at once naming the file, not walked field by field for minutes; a busy --metrics-port or --http-port
stops the server naming the flag and the port."""
from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time

import pytest

from lstmgen import onnx_wire
from lstmgen.bundle import BundleError, sha256_file
from lstmgen.serve.engine import Engine, EngineConfig
from test_hardening_bundle import copy_bundle

MB = 1 << 20
SIZE = 64 * MB  # the old walk took about 17 s over this many zero bytes


def _flood(n: int) -> bytes:
    """Valid protobuf, no ONNX model: ModelProto.ir_version (field 1) set n // 2 times."""
    return b"\x08\x00" * (n // 2)


GARBAGE = {  # name -> (the graph's bytes from the real ones, words in the refusal)
    "zeros": (lambda real: bytes(SIZE), "field number 0 at byte 0 is not valid protobuf (zero bytes"),
    "ff": (lambda real: b"\xff" * SIZE, "overlong varint at byte"),
    "random": (lambda real: random.Random(0).randbytes(SIZE), "at byte"),
    "real-then-zeros": (lambda real: real + bytes(SIZE), "field number 0 at byte "),
    "half-then-zeros": (lambda real: real[:len(real) // 2] + bytes(SIZE), "field number 0 at byte"),
    "field-flood": (lambda real: _flood(SIZE), f"more than {onnx_wire.MAX_FIELDS:,} protobuf fields"),
}


def _replace_model(src, dst, make) -> bytes:
    """A copy of the bundle whose model.onnx is `make(real bytes)`, its checksum updated to match."""
    bad = copy_bundle(src, dst)
    data = make((bad / "model.onnx").read_bytes())
    (bad / "model.onnx").write_bytes(data)
    d = json.loads((bad / "manifest.json").read_text())
    d["model_sha256"] = sha256_file(bad / "model.onnx")
    (bad / "manifest.json").write_text(json.dumps(d))
    return bad


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_graph_with_matching_checksum_is_refused_at_once(bundles, tmp_path, name):
    make, words = GARBAGE[name]
    bad = _replace_model(bundles["char"], tmp_path / "b", make)
    t0 = time.perf_counter()
    with pytest.raises(BundleError) as e:
        Engine(bad, EngineConfig(device="cpu"))
    seconds = time.perf_counter() - t0  # reading and hashing 64 MB included
    msg = str(e.value)
    assert msg.startswith(f"{bad / 'model.onnx'}: not an ONNX model: ") and words in msg, msg
    assert seconds < 10, f"{name}: {seconds:.1f} s for {SIZE // MB} MB"


@pytest.mark.parametrize("name", list(GARBAGE))
def test_wire_walk_reads_a_bounded_number_of_fields(bundles, name):
    """Counted, not timed: a hostile file costs the walk at most MAX_FIELDS fields, whatever its
    size, and garbage is refused within a few fields of where it starts (zeros alone: one)."""
    real = (bundles["char"] / "model.onnx").read_bytes()
    read = _count_fields(GARBAGE[name][0](real), expect_error=True)
    assert read <= onnx_wire.MAX_FIELDS + 1
    if name in ("zeros", "ff", "random"):
        assert read <= 10, f"{name}: {read} fields read before refusing"
    elif name != "field-flood":  # the real graph's few hundred fields, then the zeros' first
        assert read <= 1000, f"{name}: {read} fields read before refusing"


def test_real_graphs_read_far_fewer_fields_than_the_budget(bundles):
    for b in bundles.values():
        for f in sorted(b.glob("*.onnx")):
            read = _count_fields(f.read_bytes(), expect_error=False)
            assert read < onnx_wire.MAX_FIELDS // 100, f"{f}: {read} fields"


def _count_fields(data: bytes, expect_error: bool) -> int:
    walks = []

    class Counting(onnx_wire._Walk):
        def __init__(self, buf):
            super().__init__(buf)
            walks.append(self)

    real = onnx_wire._Walk
    onnx_wire._Walk = Counting
    try:
        if expect_error:
            with pytest.raises(onnx_wire.WireError):
                onnx_wire.external_tensors(data)
        else:
            assert onnx_wire.external_tensors(data) == []
    finally:
        onnx_wire._Walk = real
    return onnx_wire.MAX_FIELDS - walks[0].left


def _serve(bundle, *extra, timeout=60):
    return subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bundle), "--host", "127.0.0.1",
                           "--port", "0", "--device", "cpu", "--threads", "1", *extra],
                          capture_output=True, text=True, timeout=timeout)


def test_serve_refuses_a_zero_filled_graph_with_exit_2(bundles, tmp_path):
    bad = _replace_model(bundles["char"], tmp_path / "b", lambda real: bytes(SIZE))
    r = _serve(bad)
    assert r.returncode == 2, r.stderr
    assert f"{bad / 'model.onnx'}: not an ONNX model: field number 0 at byte 0" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("flag,words", [("--metrics-port", "for metrics (--metrics-port)"),
                                        ("--http-port", "for HTTP (--http-port)")])
def test_busy_port_exits_2_naming_the_flag_and_port(bundles, flag, words):
    with socket.create_server(("127.0.0.1", 0)) as busy:  # listening: the port is really taken
        port = busy.getsockname()[1]
        r = _serve(bundles["char"], flag, str(port))
    assert r.returncode == 2, r.stderr
    assert f"cannot listen on 127.0.0.1:{port} {words}" in r.stderr, r.stderr
    assert "in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
