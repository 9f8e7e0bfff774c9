"""Frame models through the real server: frames in, one output per frame out, many streams batched
together; every bad frame gets its status; cancelling frees the row."""
from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from conftest import start_server
from lstmgen.bundle import load_manifest
from lstmgen_client import AsyncClient, Client, FailedPreconditionError, InvalidArgumentError, OverloadedError

pytestmark = pytest.mark.usefixtures("torch_one_thread")
D_IN = 3


def train_and_export(tmp, name: str, task: str, cell: str, standardize: str):
    from lstmgen.export.bundle import export_bundle
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, size=(40, 6, D_IN)).astype(np.float32)
    y = (rng.normal(size=(40, 6, 2)).astype(np.float32) if task == "regression" else np.arange(40) % 3)
    np.savez(tmp / f"{name}.npz", x=x, y=y)
    cfg = preset("sin-cos" if task == "regression" else "row-digits", epochs=1, hidden_size=8, num_layers=2,
                 projection_size=0, cell=cell, standardize=standardize, stream=False, device="cpu")
    best = train(cfg, str(tmp / f"{name}.npz"), tmp / name, log=lambda line: None, progress_bar=False)
    export_bundle(best, tmp / f"{name}-bundle")
    return tmp / f"{name}-bundle"


@pytest.fixture(scope="module")
def frame_bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frames")
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"regression": train_and_export(tmp, "reg", "regression", "lstm", "global"),
                "classification": train_and_export(tmp, "cls", "classification", "gru", "sequence")}
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def servers(frame_bundles, tmp_path_factory):
    logs = tmp_path_factory.mktemp("frame-logs")
    started = {k: start_server(b, logs / f"{k}.log", "--max-concurrent", "32") for k, b in frame_bundles.items()}
    yield started
    for s in started.values():
        s.stop()


def reference(bundle, x: np.ndarray) -> np.ndarray:
    """The step graph run frame by frame in this process, standardised as the manifest says: [T, D_out]."""
    m = load_manifest(bundle)
    std = m.frames.standardize
    if std["mode"] == "global":
        x = (x - np.array(std["mean"], np.float32)) / np.array(std["std"], np.float32)
    elif std["mode"] == "sequence":
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    sess = ort.InferenceSession(str(bundle / m.model_file), providers=["CPUExecutionProvider"])
    state = [np.zeros((t.shape[0], 1, t.shape[1]), np.float32) for t in m.state_tensors]
    out = []
    for frame in x.astype(np.float32):
        y, *state = sess.run(None, {m.inputs[0]: frame[None], **dict(zip(m.inputs[1:], state))})
        out.append(y[0])
    return np.stack(out)


def test_model_info_describes_the_frame_model(servers):
    with Client(servers["regression"].target) as c:
        info = c.model_info()
    assert (info.kind, info.cell, info.task, info.input_size, info.output_size, info.standardize) == \
        ("frames", "lstm", "regression", D_IN, 2, "global")
    with Client(servers["classification"].target) as c:
        info = c.model_info()
    assert (info.kind, info.cell, info.task, info.output_size, info.class_names) == \
        ("frames", "gru", "classification", 3, ("0", "1", "2"))
    assert info.limits.max_frames_per_message > 0


def test_one_output_per_frame_equals_the_graph(servers, frame_bundles):
    x = np.random.default_rng(1).normal(5, 3, size=(50, D_IN)).astype(np.float32)
    with Client(servers["regression"].target) as c:
        outs = list(c.stream_frames(x, frames_per_message=7))
    assert [o.index for o in outs] == list(range(50))
    got = np.stack([o.values for o in outs])
    assert isinstance(outs[0].values, np.ndarray)  # numpy in, numpy out
    np.testing.assert_allclose(got, reference(frame_bundles["regression"], x), rtol=1e-4, atol=1e-5)
    with Client(servers["regression"].target) as c:  # plain lists in, lists out
        listed = list(c.stream_frames(x.tolist()))
    assert isinstance(listed[0].values, list)
    np.testing.assert_allclose(np.array([o.values for o in listed]), got, rtol=1e-5, atol=1e-6)


def test_many_streams_batched_equal_each_alone(servers, frame_bundles):
    rng = np.random.default_rng(2)
    xs = [rng.normal(5, 3, size=(int(rng.integers(1, 40)), D_IN)).astype(np.float32) for _ in range(16)]
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        with Client(servers["regression"].target) as c:
            results[i] = np.stack([o.values for o in c.stream_frames(xs[i], frames_per_message=3)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], reference(frame_bundles["regression"], x), rtol=1e-4, atol=1e-5)


def test_classification_final_only_and_sequence_standardisation(servers, frame_bundles):
    x = np.random.default_rng(3).normal(5, 3, size=(12, D_IN)).astype(np.float32)
    want = reference(frame_bundles["classification"], x)
    with Client(servers["classification"].target) as c:
        every = list(c.stream_frames(x))
        final = list(c.stream_frames(x, final_only=True))
    np.testing.assert_allclose(np.stack([o.values for o in every]), want, rtol=1e-4, atol=1e-5)
    assert [o.label for o in every] == want.argmax(1).tolist()
    assert len(final) == 1 and final[0].index == 11 and final[0].label == int(want[-1].argmax())
    assert final[0].class_name == str(final[0].label)


def test_a_live_source_gets_outputs_as_it_goes(servers):
    """Frame 2 is only produced once the output of frame 1 has arrived: the stream really streams."""
    first_out = threading.Event()

    def source():
        yield [5.0, 5.0, 5.0]
        assert first_out.wait(10), "no output before the second frame"
        yield [4.0, 6.0, 5.0]

    with Client(servers["regression"].target) as c:
        outs = []
        for o in c.stream_frames(source(), frames_per_message=1):
            outs.append(o)
            first_out.set()
    assert [o.index for o in outs] == [0, 1]
    with Client(servers["classification"].target) as c:  # per-sequence standardisation needs the whole sequence
        with pytest.raises(InvalidArgumentError, match="whole sequence"):
            list(c.stream_frames(source()))


def test_async_client_streams_frames(servers, frame_bundles):
    x = np.random.default_rng(4).normal(5, 3, size=(9, D_IN)).astype(np.float32)

    async def live():
        for frame in x:
            await asyncio.sleep(0)
            yield frame.tolist()

    async def main():
        async with AsyncClient(servers["regression"].target) as c:
            return [o async for o in c.stream_frames(live(), frames_per_message=2)]

    outs = asyncio.run(main())
    np.testing.assert_allclose(np.array([o.values for o in outs]), reference(frame_bundles["regression"], x),
                               rtol=1e-4, atol=1e-5)


def raw_stream(target: str, messages: list) -> tuple[grpc.StatusCode, str]:
    from lstmgen_client.v1 import generator_pb2 as pb
    with grpc.insecure_channel(target) as ch:
        call = ch.stream_stream("/lstmgen.v1.FrameModel/StreamFrames",
                                request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                                response_deserializer=pb.FramesResponse.FromString)
        try:
            list(call(iter(messages), timeout=20))
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_bad_frames_get_invalid_argument(servers):
    from lstmgen_client.v1 import generator_pb2 as pb
    target = servers["regression"].target
    limit = Client(target).model_info().limits.max_frames_per_message
    cases = {
        "width": ([pb.FramesRequest(values=[1.0] * 4)], "not a whole number of frames of input_size 3"),
        "nan": ([pb.FramesRequest(values=[1.0] * 6), pb.FramesRequest(values=[1.0, float("nan"), 1.0])],
                "frame 2 holds a non-finite value"),
        "inf": ([pb.FramesRequest(values=[float("inf"), 0.0, 0.0])], "frame 0 holds a non-finite value"),
        "too many": ([pb.FramesRequest(values=[0.5] * (D_IN * (limit + 1)))], f"allowed 0..{limit}"),
        "final_only on regression": ([pb.FramesRequest(values=[1.0] * 3, options=pb.FrameStreamOptions(final_only=True))],
                                     "options.final_only"),
        "not a message": ([b"\xff\xff\xff"], "not a valid lstmgen.v1.FramesRequest"),
    }
    for name, (msgs, words) in cases.items():
        code, details = raw_stream(target, msgs)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (name, code, details)
    with Client(target) as c:  # still serving
        assert len(list(c.stream_frames([[1.0, 2.0, 3.0]]))) == 1
    assert "Traceback" not in servers["regression"].log.read_text()


def test_the_wrong_kind_of_call(servers, char_server):
    with Client(servers["regression"].target) as c:
        with pytest.raises(FailedPreconditionError, match="frame model"):
            c.generate("hello")
    with Client(char_server.target) as c:
        with pytest.raises(FailedPreconditionError, match="text model"):
            list(c.stream_frames([[1.0, 2.0]]))
    from lstmgen_client.v1 import generator_pb2 as pb  # the server says so too, not only the client
    code, details = raw_stream(char_server.target, [pb.FramesRequest(values=[1.0])])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "text model" in details


def test_cancelling_frees_the_row(frame_bundles, tmp_path):
    srv = start_server(frame_bundles["regression"], tmp_path / "one.log", "--max-concurrent", "1")
    try:
        with Client(srv.target) as c:
            def endless():
                while True:
                    yield [1.0, 2.0, 3.0]
            stream = c.stream_frames(endless(), frames_per_message=1)
            next(stream)
            with Client(srv.target) as other:  # the one row is taken
                with pytest.raises(OverloadedError):
                    list(other.stream_frames([[1.0, 2.0, 3.0]]))
            stream.close()  # cancels the call
            for _ in range(100):  # the row comes back
                try:
                    assert len(list(c.stream_frames([[1.0, 2.0, 3.0]]))) == 1
                    break
                except OverloadedError:
                    import time
                    time.sleep(0.05)
            else:
                raise AssertionError("the cancelled stream's row never came back")
    finally:
        srv.stop()
    assert "Traceback" not in (tmp_path / "one.log").read_text()


def test_a_sequence_continues_from_its_state_on_another_replica(servers, frame_bundles, tmp_path):
    """Half the frames with return_state, the rest from that state on a second server: the outputs
    (and frame indices) are those of the unbroken sequence; bad states get their status."""
    x = np.random.default_rng(5).normal(5, 3, size=(30, D_IN)).astype(np.float32)
    other = start_server(frame_bundles["regression"], tmp_path / "replica.log")
    try:
        with Client(servers["regression"].target) as a, Client(other.target) as b:
            whole = np.stack([o.values for o in a.stream_frames(x)])
            call = a.stream_frames(x[:12], return_state=True)
            first = list(call)
            assert call.state
            rest = list(b.stream_frames(x[12:], state=call.state))
            assert [o.index for o in rest] == list(range(12, 30))
            np.testing.assert_allclose(np.stack([o.values for o in first + rest]), whole, rtol=1e-5, atol=1e-6)
            blob = call.state
            with pytest.raises(InvalidArgumentError, match="truncated"):
                list(b.stream_frames(x[:2], state=blob[:-3]))
            with Client(servers["classification"].target) as c:  # another model's state
                with pytest.raises(FailedPreconditionError, match="made by model"):
                    list(c.stream_frames(x[:2], state=blob))
    finally:
        other.stop()


def test_the_client_streams_frames_without_numpy(servers):
    """A client-only install has no numpy: lists in, lists out, numpy never imported."""
    import subprocess
    import sys
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def block(name, *a, **k):\n"
            "    if name == 'numpy' or name.startswith('numpy.'):\n"
            "        raise ImportError('numpy is blocked in this test')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = block\n"
            "from lstmgen_client import Client\n"
            f"with Client({servers['regression'].target!r}) as c:\n"
            "    outs = list(c.stream_frames([[1.0, 2.0, 3.0]] * 5, frames_per_message=2))\n"
            "assert [o.index for o in outs] == [0, 1, 2, 3, 4] and all(len(o.values) == 2 for o in outs)\n"
            "assert 'numpy' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_frame_metrics(frame_bundles, tmp_path):
    import re
    import urllib.request
    srv = start_server(frame_bundles["regression"], tmp_path / "m.log", "--metrics-port", "0")
    try:
        port = int(re.search(r"metrics on http://[\d.]+:(\d+)", srv.ready_line).group(1))
        with Client(srv.target) as c:
            assert len(list(c.stream_frames([[1.0, 2.0, 3.0]] * 7))) == 7
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert re.search(r"^lstmgen_frames_total 7\.0$", text, re.M), text[-2000:]
        assert re.search(r'^lstmgen_requests_total\{status="OK"\} 1\.0$', text, re.M)
        assert re.search(r"^lstmgen_frame_streams 0\.0$", text, re.M)
    finally:
        srv.stop()
