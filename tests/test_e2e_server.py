"""End to end through the real server process: real gRPC on loopback, real ONNX Runtime."""
from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lstmgen_client import AsyncClient, Client, InvalidArgumentError
from tests.conftest import CHAR_TEXT


@pytest.fixture
def client(char_server):
    with Client(char_server.target, timeout=30) as c:
        yield c


def test_stream_delivers_text_and_final_message(client):
    chunks = list(client.generate_stream("First", max_new_tokens=60, seed=7))
    assert chunks[0].text and chunks[0].finished is None or len(chunks) == 1
    fin = chunks[-1].finished
    assert fin is not None and all(c.finished is None for c in chunks[:-1])
    assert fin.reason == "length" and fin.generated_tokens == 60 and fin.prompt_tokens == 5 and fin.seed == 7
    assert sum(c.token_count for c in chunks) == 60
    text = "".join(c.text for c in chunks)
    assert len(text) == 60 and set(text) <= set(CHAR_TEXT)


def timed_stream(bundle, log, server_args: tuple, **generate) -> tuple[list, float]:
    """One stream from a server of its own started with `server_args`: its messages and the
    seconds they took."""
    from tests.conftest import start_server

    srv = start_server(bundle, log, *server_args)
    try:
        with Client(srv.target, timeout=60) as c:
            t0 = time.monotonic()
            chunks = list(c.generate_stream("All", seed=3, **generate))
            return chunks, time.monotonic() - t0
    finally:
        srv.stop()


def test_messages_coalesce_after_the_first_token(bundles, tmp_path):
    """After the first message a stream's messages are at least --min-message-interval-ms apart,
    so a fast model's tokens ride many to a message; the text is the same with or without."""
    texts = {}
    for ms in ("0", "20"):
        chunks, seconds = timed_stream(bundles["char"], tmp_path / f"srv{ms}.log",
                                       ("--min-message-interval-ms", ms, "--max-new-tokens", "2000"),
                                       max_new_tokens=2000)
        assert chunks[0].finished is None and sum(ch.token_count for ch in chunks) == 2000
        texts[ms] = "".join(ch.text for ch in chunks)
        if ms == "20":  # (here ~8 messages; ~340 without the floor)
            assert len(chunks) <= 2 + seconds / 0.020 and max(ch.token_count for ch in chunks) > 10
    assert texts["0"] == texts["20"]


def test_a_finished_stream_does_not_wait_out_its_pacing_interval(bundles, tmp_path):
    """With a 3 s message floor, a short stream's last message still goes out as soon as it is
    made: the pause between messages ends with the stream (a client's next request must not wait
    for the interval)."""
    chunks, seconds = timed_stream(bundles["char"], tmp_path / "srv.log", ("--min-message-interval-ms", "3000"),
                                   max_new_tokens=40)
    # what was made before the reader first looked (the first token, or on a busy machine all 40:
    # they take a few milliseconds), then the rest at once, not after the 3 s floor
    assert len(chunks) in (1, 2) and chunks[-1].finished is not None
    assert sum(ch.token_count for ch in chunks) == 40
    assert seconds < 1.5, seconds


def test_the_prompt_wait_reaches_the_server(bundles, tmp_path):
    """--prefill-wait-steps is the server's setting: its logged config says so, and it serves."""
    chunks, _ = timed_stream(bundles["char"], tmp_path / "srv.log", ("--prefill-wait-steps", "0"), max_new_tokens=5)
    assert sum(ch.token_count for ch in chunks) == 5 and chunks[-1].finished is not None
    assert "a new prompt waits up to 0 decode steps" in (tmp_path / "srv.log").read_text()


def test_same_seed_same_text_and_server_picks_seed(client):
    a = client.generate("Speak", max_new_tokens=50, seed=123, temperature=0.9, top_k=10)
    b = client.generate("Speak", max_new_tokens=50, seed=123, temperature=0.9, top_k=10)
    assert a.text == b.text
    c = client.generate("Speak", max_new_tokens=50)  # no seed: the server reports the one it used
    d = client.generate("Speak", max_new_tokens=50, seed=c.seed)
    assert c.text == d.text


def test_greedy_is_deterministic_and_default_length(client):
    a = client.generate("All:", greedy=True)
    b = client.generate("All:", temperature=0.0, seed=99)
    assert a.text == b.text and a.finished.generated_tokens == 40  # the server's --default-new-tokens


def test_concurrent_streams_match_solo_runs(char_server):
    """Different seeds and parameters at once: each stream gives exactly what it gives alone."""
    params = [dict(seed=s, max_new_tokens=80 + 7 * s, temperature=0.5 + 0.1 * s, top_k=s % 4, top_p=1.0 - 0.05 * s)
              for s in range(10)]
    prompts = ["First Citizen:", "All", "You are", "S", "hear me speak.\n", "Before", "die", "famish?", "resolved",
               "A" * 300]
    with Client(char_server.target) as c:
        solo = [c.generate(p, **kw).text for p, kw in zip(prompts, params)]

    async def together():
        async with AsyncClient(char_server.target) as ac:
            return await asyncio.gather(*(ac.generate(p, **kw) for p, kw in zip(prompts, params)))

    results = asyncio.run(together())
    assert [r.text for r in results] == solo
    assert len(set(solo)) == len(solo)


def test_word_model_rows_sample_alone_as_in_a_batch(tmp_path):
    """A 5,000-word model through the real server: rows longer than the char models' (the
    sampler's windowed selection, and its parallel kernel once 20 such rows share a step). Each
    seeded request gives the same text alone and among 39 others with other settings."""
    import numpy as np

    from lstmgen.serve.engine import Engine, EngineConfig
    from lstmgen.serve.sampling_kernels import WINDOW, weights
    from tests.conftest import export, make_checkpoint, start_server

    words = " ".join(f"w{i}" for i in range(5000))
    bundle = export(make_checkpoint(tmp_path / "big.pt", "word", words, seed=4, head_scale=30.0), tmp_path / "big")
    # Spread logits (a few hundred words hold most of the mass), so that the window, not the
    # whole row, holds the boundary
    engine = Engine(bundle, EngineConfig(device="cpu", intra_op_threads=1))
    tokens, state = np.arange(8, dtype=np.int64), engine.zeros(8)
    for _ in range(5):
        logits, state = engine.step(tokens, state)  # [8, V]
    w, ok = np.empty_like(logits), np.empty(8, bool)
    weights(np.ascontiguousarray(logits, np.float32), np.full(8, 1.25, np.float32), w, ok)
    inside = w >= WINDOW
    assert ok.all() and (inside.sum(axis=1) < 2500).all()
    assert ((w * inside).sum(axis=1) >= 0.9 * w.sum(axis=1)).all()

    settings = [dict(temperature=0.8, top_k=40), dict(temperature=0.8, top_p=0.9),
                dict(temperature=0.8, top_k=40, top_p=0.9), dict(temperature=0.7, min_p=0.05),
                dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2)]
    params = [dict(seed=s, max_new_tokens=60, **settings[s % len(settings)]) for s in range(40)]
    srv = start_server(bundle, tmp_path / "srv.log")
    try:
        with Client(srv.target) as c:
            solo = [c.generate("w1 w2 w3", **kw).text for kw in params[:10]]

        async def together():
            async with AsyncClient(srv.target) as ac:
                return await asyncio.gather(*(ac.generate("w1 w2 w3", **kw) for kw in params))

        results = [r.text for r in asyncio.run(together())]
    finally:
        srv.stop()
    assert results[:10] == solo
    assert len(set(results)) > 1 and all(len(t.split()) == 60 for t in results)


def test_stop_sequence(client):
    base = client.generate("First", max_new_tokens=80, seed=5).text
    stop = base[30:33]
    cut = base.index(stop)
    r = client.generate("First", max_new_tokens=80, seed=5, stop=[stop, "\x00never"])
    assert r.finish_reason == "stop_sequence" and r.finished.stop_sequence == stop
    assert r.text == base[:cut]


def test_end_of_text(bundles, tmp_path):
    from tests.conftest import start_server

    srv = start_server(bundles["eot"], tmp_path / "eot.log")
    try:
        with Client(srv.target) as c:
            r = c.generate("All", max_new_tokens=400, seed=1)
        assert r.finish_reason == "end_of_text" and r.finished.generated_tokens < 400
        assert "\x03" not in r.text
    finally:
        assert srv.stop() == 0


BAD = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x" * 2001), "prompt"),
    (dict(prompt="hello \u00e9\u4e2d"), "prompt"),
    (dict(prompt="First", max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="First", max_new_tokens=501), "max_new_tokens"),
    (dict(prompt="First", max_new_tokens=-3), "max_new_tokens"),
    (dict(prompt="First", temperature=-0.5), "temperature"),
    (dict(prompt="First", temperature=math.nan), "temperature"),
    (dict(prompt="First", temperature=math.inf), "temperature"),
    (dict(prompt="First", top_p=0.0), "top_p"),
    (dict(prompt="First", top_p=1.5), "top_p"),
    (dict(prompt="First", top_p=math.nan), "top_p"),
    (dict(prompt="First", top_k=-1), "top_k"),
    (dict(prompt="First", stop=[""]), "stop[0]"),
    (dict(prompt="First", stop=["a"] * 9), "stop"),
    (dict(prompt="First", stop=["x" * 65]), "stop[0]"),
    (dict(prompt="First", min_p=-0.1), "min_p"),
    (dict(prompt="First", min_p=1.5), "min_p"),
    (dict(prompt="First", repetition_penalty=0.0), "repetition_penalty"),
    (dict(prompt="First", repetition_penalty=1.4e-45), "repetition_penalty"),  # divided by: inf logits
    (dict(prompt="First", repetition_penalty=0.0099), "repetition_penalty"),
    (dict(prompt="First", repetition_penalty=101.0), "repetition_penalty"),
    (dict(prompt="First", repetition_penalty=math.nan), "repetition_penalty"),
    (dict(prompt="First", frequency_penalty=2.5), "frequency_penalty"),
    (dict(prompt="First", presence_penalty=-2.5), "presence_penalty"),
    (dict(prompt="First", presence_penalty=math.nan), "presence_penalty"),
    (dict(prompt="First", logprobs=True, top_logprobs=21), "top_logprobs"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_field(client, kwargs, field):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    with pytest.raises(InvalidArgumentError) as e:
        client.generate(prompt, **kwargs)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.split(": ", 1)[1].startswith(field)
    assert client.generate("First", max_new_tokens=5, seed=1).finished.generated_tokens == 5  # still serving


def test_the_penalties_own_edges_are_allowed(client):
    for kw in (dict(repetition_penalty=0.01), dict(repetition_penalty=100.0),
               dict(frequency_penalty=-2.0, presence_penalty=2.0)):
        assert client.generate("First", max_new_tokens=5, seed=1, **kw).finished.generated_tokens == 5


def test_unknown_chars_named_or_skipped(client):
    with pytest.raises(InvalidArgumentError) as e:
        client.generate("Fir\u00e9st\u4e2d", max_new_tokens=5)
    assert "'\u00e9'" in e.value.message and "'\u4e2d'" in e.value.message
    r = client.generate("Fir\u00e9st\u4e2d", max_new_tokens=5, skip_unknown=True, seed=3)
    assert r.finished.prompt_tokens == 5
    with pytest.raises(InvalidArgumentError, match="no tokens"):
        client.generate("\u4e2d\u4e2d", max_new_tokens=5, skip_unknown=True)


def test_word_model_maps_unknown_words(word_server):
    with Client(word_server.target) as c:
        r = c.generate("the zebra sat", max_new_tokens=12, seed=2)
        info = c.model_info(include_vocabulary=True)
    assert r.finished.prompt_tokens == 3 and info.level == "word" and "<unk>" in info.vocabulary
    words = r.text.replace("\n", " ").split()
    assert len(words) + r.text.count("\n") == 12 and set(words) <= set(info.vocabulary)


def test_model_info(client):
    info = client.model_info()
    assert info.level == "char" and info.num_layers == 2 and info.hidden_size == 16
    assert info.execution_provider == "CPUExecutionProvider" and info.has_prompt_graph
    assert info.limits.max_new_tokens == 500 and info.limits.max_prompt_chars == 2000
    assert len(info.model_sha256) == 64 and info.vocabulary == ()


def test_health_and_reflection(char_server):
    with grpc.insecure_channel(char_server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "lstmgen.v1.Generator"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"lstmgen.v1.Generator", "grpc.health.v1.Health"} <= names


def test_deadline_exceeded_is_reported(client):
    from lstmgen_client import DeadlineExceededError

    with pytest.raises(DeadlineExceededError):
        client.generate("First", max_new_tokens=500, timeout=0.0005)


def run_serve(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", *args, "--port", "0"],
                          capture_output=True, text=True, timeout=60)


def test_missing_or_corrupt_bundle_fails_at_start_naming_the_file(bundles, tmp_path):
    import shutil

    r = run_serve(str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr and "not found" in r.stderr
    broken = tmp_path / "broken"
    shutil.copytree(bundles["char"], broken)
    with open(broken / "model.onnx", "r+b") as f:  # flip bytes: checksum no longer matches
        f.seek(100)
        f.write(b"\x00garbage\x00")
    r = run_serve(str(broken))
    assert r.returncode == 2 and "model.onnx" in r.stderr and "sha256" in r.stderr
    (broken / "manifest.json").write_text("{ not json")
    r = run_serve(str(broken))
    assert r.returncode == 2 and "manifest.json" in r.stderr and "JSON" in r.stderr


def test_server_process_has_no_torch(char_server):
    maps = open(f"/proc/{char_server.proc.pid}/maps").read()
    assert "libtorch" not in maps and "onnxruntime" in maps


def test_sigterm_graceful_stop(bundles, tmp_path):
    """SIGTERM: health NOT_SERVING, new streams UNAVAILABLE, the in-flight stream finishes, exit 0."""

    from lstmgen_client import UnavailableError
    from tests.conftest import start_server

    srv = start_server(bundles["char"], tmp_path / "srv.log", "--grace", "60", "--max-new-tokens", "100000")
    try:
        with Client(srv.target) as c:
            stream = c.generate_stream("All", max_new_tokens=40000, seed=1, timeout=60)
            first = next(stream)
            srv.proc.send_signal(15)
            signalled = time.monotonic()
            time.sleep(0.3)
            with grpc.insecure_channel(srv.target) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(UnavailableError):
                c.generate("All", max_new_tokens=5)
            rest = list(stream)
            assert time.monotonic() - signalled > 0.5  # it really was in flight at the signal
        assert rest[-1].finished.reason == "length"
        assert first.token_count + sum(ch.token_count for ch in rest) == 40000
        assert srv.proc.wait(30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
