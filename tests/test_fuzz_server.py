"""Property-based fuzzing of every GenerateRequest field against the real server.

Each example is sent as raw bytes (so unknown fields and malformed messages can be sent too) with
a deadline; the status must be exactly what the server's own validation predicts (OK or
INVALID_ARGUMENT), RESOURCE_EXHAUSTED only for messages over max_request_bytes, never anything
else, and the server must stay up. LSTMGEN_FUZZ_EXAMPLES=10000 for the long run (default 200).
"""
from __future__ import annotations

import os
import struct

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lstmgen.bundle import load_manifest
from lstmgen.serve.errors import InvalidRequest, WrongModel
from lstmgen.serve.params import RequestLimits, encode_prompt, validate
from lstmgen.serve.service import request_from_pb
from lstmgen.serve.state_blob import GenerationState, codec_for, rng_position
from lstmgen_client.v1 import generator_pb2 as pb
from tests.conftest import CHAR_TEXT, start_server

EXAMPLES = int(os.environ.get("LSTMGEN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
LIMITS = RequestLimits(max_prompt_chars=2000, max_new_tokens=32, default_new_tokens=8, max_request_bytes=16384)
CALL_DEADLINE_S = 10.0  # a hang fails the example as DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def fuzz_server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "fuzz.log"
    s = start_server(bundles["char"], log, "--max-prompt-chars", str(LIMITS.max_prompt_chars),
                     "--max-new-tokens", str(LIMITS.max_new_tokens), "--default-new-tokens",
                     str(LIMITS.default_new_tokens), "--max-request-bytes", str(LIMITS.max_request_bytes),
                     "--log-level", "WARNING")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def generate(fuzz_server):
    with grpc.insecure_channel(fuzz_server.target) as ch:
        yield ch.unary_stream("/lstmgen.v1.Generator/Generate", response_deserializer=pb.GenerateResponse.FromString)


@pytest.fixture(scope="module")
def vocab(bundles):
    return load_manifest(bundles["char"]).vocab


@pytest.fixture(scope="module")
def codec(bundles):
    return codec_for(load_manifest(bundles["char"]))


chars = st.characters(exclude_categories=("Cs",))  # protobuf strings are UTF-8: no lone surrogates
in_vocab = st.text(st.sampled_from(sorted(set(CHAR_TEXT))), min_size=1, max_size=300)
prompts = st.one_of(
    in_vocab, in_vocab,  # listed twice: one_of picks a branch uniformly, so half the prompts can succeed
    st.text(chars, max_size=40),
    # around the char and byte limits; gRPC takes 0.1-1 s to refuse an oversized message, so fewer of those
    st.builds(lambda ch, n: ch * n, chars, st.one_of(st.integers(1_900, 4_100), st.integers(1_900, 4_100),
                                                     st.integers(1_900, 17_000))),
)
int32 = st.integers(-2**31, 2**31 - 1)
floats32 = st.floats(width=32) | st.sampled_from([0.0, -0.0, 1e-45, 3.4e38, -1.0, 0.5, 1.0, 1.5])
unit = st.floats(0.0, 1.0, width=32, exclude_min=True)


def usually(valid, hostile):
    """Unset, a valid value or a hostile one: most requests then fail on one field at most."""
    return st.one_of(st.none(), valid, valid, hostile)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(prompt=draw(prompts), top_k=draw(st.one_of(st.integers(0, 40), st.integers(0, 40), int32)),
                             greedy=draw(st.booleans()), skip_unknown=draw(st.booleans()),
                             stop=draw(st.lists(st.text(chars, max_size=70), max_size=10)
                                       | st.lists(st.text(chars, min_size=1, max_size=5), max_size=3)))
    for name, value in (("max_new_tokens", draw(usually(st.integers(1, 32), int32))),
                        ("temperature", draw(usually(st.floats(0, 3, width=32), floats32))),
                        ("top_p", draw(usually(unit, floats32))),
                        ("seed", draw(st.none() | st.integers(0, 2**64 - 1))),
                        ("min_p", draw(st.none() | unit | floats32)),
                        ("repetition_penalty", draw(st.none() | st.floats(0.5, 2, width=32) | floats32)),
                        ("frequency_penalty", draw(st.none() | st.floats(-2, 2, width=32) | floats32)),
                        ("presence_penalty", draw(st.none() | st.floats(-2, 2, width=32) | floats32)),
                        ("logprobs", draw(st.none() | st.booleans())),
                        ("return_state", draw(st.none() | st.booleans())),
                        ("state_every", draw(usually(st.integers(0, 40), st.integers(0, 2**32 - 1)))),
                        ("top_logprobs", draw(st.none() | st.integers(0, 25) | st.integers(0, 2**32 - 1)))):
        if value is not None:
            setattr(msg, name, value)
    return msg


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def unknown_fields(draw) -> bytes:
    """Well-formed fields with numbers the contract does not define (incl. the reserved 10-19)."""
    defined = {f.number for f in pb.GenerateRequest.DESCRIPTOR.fields}
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        num = draw(st.integers(10, 2**29 - 1).filter(lambda n: n not in defined))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        body = {0: lambda: varint(draw(st.integers(0, 2**64 - 1))), 1: lambda: draw(st.binary(min_size=8, max_size=8)),
                2: lambda: (lambda b: varint(len(b)) + b)(draw(st.binary(max_size=30))),
                5: lambda: struct.pack("<f", draw(st.floats(width=32)))}[wire]()
        out += varint(num << 3 | wire) + body
    return out


# A request's state: none, random bytes, or a well-formed state of this model, intact, with a byte
# changed or cut short (seed, what to do, where).
states = st.one_of(st.none(), st.none(), st.binary(max_size=64),
                   st.tuples(st.integers(0, 2**31), st.sampled_from(["intact", "flip", "cut"]), st.integers(0, 10**6)))


def make_state(codec, choice) -> bytes | None:
    if choice is None or isinstance(choice, bytes):
        return choice
    seed, how, at = choice
    rng = np.random.default_rng(seed)
    blob = codec.encode(GenerationState(
        tuple(rng.standard_normal(shape).astype(np.float32) for _, shape in codec.tensors),
        int(rng.integers(codec.vocab_size)), int(rng.integers(2**63)),
        rng_position(np.random.Generator(np.random.PCG64(seed))), ""))
    i = at % len(blob)
    return {"intact": blob, "flip": blob[:i] + bytes([blob[i] ^ 0x41]) + blob[i + 1:], "cut": blob[:i]}[how]


def expected_status(msg: pb.GenerateRequest | None, size: int, vocab, codec) -> str:
    if size > LIMITS.max_request_bytes:
        return "RESOURCE_EXHAUSTED"
    if msg is None:
        return "INVALID_ARGUMENT"
    try:  # the server's own order: the state (decoded at the edge), then the fields, then the prompt
        req = request_from_pb(msg, codec)
        validate(req, LIMITS)
        encode_prompt(req, vocab)
    except WrongModel:
        return "FAILED_PRECONDITION"
    except InvalidRequest:
        return "INVALID_ARGUMENT"
    return "OK"


def call(generate, data: bytes) -> tuple[str, list, str]:
    try:
        return "OK", list(generate(data, timeout=CALL_DEADLINE_S)), ""
    except grpc.RpcError as e:
        return e.code().name, [], e.details()


def check(generate, vocab, codec, data: bytes, msg: pb.GenerateRequest | None) -> None:
    status, out, details = call(generate, data)
    event(status)  # pytest --hypothesis-show-statistics shows the mix
    assert status == expected_status(msg, len(data), vocab, codec), (status, details)
    if status == "OK":
        fin = out[-1].finished
        assert out[-1].HasField("finished") and all(not m.HasField("finished") for m in out[:-1])
        assert sum(m.token_count for m in out) == fin.generated_tokens <= LIMITS.max_new_tokens
    elif status == "INVALID_ARGUMENT":  # the message names the field at fault
        assert details.split(":")[0].split("[")[0] in {"prompt", "max_new_tokens", "temperature", "top_p", "top_k",
                                                       "seed", "stop", "request", "min_p", "repetition_penalty",
                                                       "frequency_penalty", "presence_penalty", "top_logprobs",
                                                       "state", "state_every"}, details


@FUZZ
@given(msg=requests(), extra=unknown_fields(), state=states)
def test_fuzzed_requests_get_the_predicted_status(generate, vocab, codec, msg, extra, state):
    blob = make_state(codec, state)
    if blob is not None:
        msg.state = blob
    data = msg.SerializeToString() + extra
    check(generate, vocab, codec, data, pb.GenerateRequest.FromString(data))


@st.composite
def mutated(draw) -> bytes:
    """A serialized request with a few bytes overwritten, inserted or cut."""
    data = bytearray(draw(requests()).SerializeToString()[:400])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "cut"]))
        if op == "insert" or not data[i:]:
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


@FUZZ
@given(data=st.binary(max_size=300) | mutated())
def test_arbitrary_bytes_never_crash(generate, vocab, codec, data):
    try:
        msg = pb.GenerateRequest.FromString(data)
    except Exception:
        msg = None  # not a message (or bad UTF-8): the server says INVALID_ARGUMENT
    check(generate, vocab, codec, data, msg)


def test_server_survived(fuzz_server):
    with grpc.insecure_channel(fuzz_server.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING and fuzz_server.proc.poll() is None
    log = fuzz_server.log.read_text()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
