"""What outside gRPC clients found, through real server processes: reflection describes methods and
enum values (v1 and v1alpha); reflection needs no token where Generate does; ModelInfo.state_bytes
bounds every state blob (text and frames) and is tight; state_every puts the latest state on every
message that crosses a boundary; the Python client names the range a field can carry."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as refl
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import start_server
from lstmgen_client import Client, InvalidArgumentError, UnauthenticatedError

PROTO = "lstmgen/v1/generator.proto"


def _reflect(ch, version: str, *requests: refl.ServerReflectionRequest) -> list[refl.ServerReflectionResponse]:
    """grpc.reflection.v1 and v1alpha share their messages and field numbers."""
    call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                            request_serializer=refl.ServerReflectionRequest.SerializeToString,
                            response_deserializer=refl.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=10))


# -- reflection describes methods and enum values ---------------------------------------------------
def test_reflection_client_finds_a_method_and_an_enum_value(char_server):
    """grpcio-reflection's own client, as `grpcurl describe lstmgen.v1.Generator.Generate` uses it."""
    with grpc.insecure_channel(char_server.target) as ch:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        method = pool.FindMethodByName("lstmgen.v1.Generator.Generate")
        assert method.input_type.full_name == "lstmgen.v1.GenerateRequest"
        assert method.output_type.full_name == "lstmgen.v1.GenerateResponse" and method.server_streaming
        fresh = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))  # nothing cached yet
        assert fresh.FindMethodByName("grpc.health.v1.Health.Check").containing_service.name == "Health"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize("symbol, file", [
    ("lstmgen.v1.Generator.Generate", PROTO),
    ("lstmgen.v1.Generator.GetModelInfo", PROTO),
    ("lstmgen.v1.FinishReason.FINISH_REASON_STOP_SEQUENCE", PROTO),  # under its enum, as grpcurl asks
    ("lstmgen.v1.FINISH_REASON_STOP_SEQUENCE", PROTO),  # protobuf's own scope
    ("lstmgen.v1.GenerateRequest.prompt", PROTO),
    ("grpc.health.v1.Health.Watch", health_pb2.DESCRIPTOR.name),
    ("grpc.reflection.v1.ServerReflection.ServerReflectionInfo", "grpc/reflection/v1/reflection.proto"),
    ("grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo", refl.DESCRIPTOR.name),
])
def test_raw_file_containing_symbol(char_server, version, symbol, file):
    asked = refl.ServerReflectionRequest(file_containing_symbol=symbol)
    with grpc.insecure_channel(char_server.target) as ch:
        (resp,) = _reflect(ch, version, asked)
        missing, = _reflect(ch, version, refl.ServerReflectionRequest(file_containing_symbol="lstmgen.v1.Nope"))
    assert resp.WhichOneof("message_response") == "file_descriptor_response", resp.error_response
    names = [descriptor_pb2.FileDescriptorProto.FromString(b).name
             for b in resp.file_descriptor_response.file_descriptor_proto]
    assert names[0] == file
    assert resp.original_request == asked  # the client's request, not the one the server made of it
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# -- reflection is open on a token-protected server -------------------------------------------------
TOKEN = "surface-test-token-0123456789"


@pytest.fixture(scope="module")
def token_server(bundles, tmp_path_factory):
    d = tmp_path_factory.mktemp("token")
    (d / "token").write_text(TOKEN + "\n")
    srv = start_server(bundles["char"], d / "server.log", "--auth-token-file", str(d / "token"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_needs_no_token_but_generate_does(token_server, version):
    with grpc.insecure_channel(token_server.target) as ch:
        listed, described = _reflect(ch, version, refl.ServerReflectionRequest(list_services=""),
                                     refl.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"))
        assert {"lstmgen.v1.Generator", "grpc.health.v1.Health"} <= {s.name for s in
                                                                      listed.list_services_response.service}
        assert described.file_descriptor_response.file_descriptor_proto
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
    with Client(token_server.target, timeout=10) as c:
        with pytest.raises(UnauthenticatedError):
            c.generate("First", max_new_tokens=3)
    with Client(token_server.target, timeout=10, token=TOKEN) as c:
        assert c.generate("First", max_new_tokens=3).finished.generated_tokens == 3


# -- ModelInfo.state_bytes bounds every state -------------------------------------------------------
def _text_states(c: Client) -> list[tuple[bytes, str]]:
    """States at LENGTH (text held back in them), at STOP, mid-stream, over many seeds and both
    ends of the seed range; penalties off."""
    out = []
    stops = ["ee", "a a", "s:\n", "\n\n", "Citizen:\nBef", '"', "\\"]
    for seed in [*range(30), 2**53 - 1, 2**64 - 1]:
        for n in (4, 9):
            r = c.generate("All:", max_new_tokens=n, seed=seed, temperature=1.3, stop=stops, return_state=True)
            out.append((r.state, r.finish_reason))
        r = c.generate("All:", max_new_tokens=30, seed=seed, stop=["e", "a"], return_state=True)
        out.append((r.state, r.finish_reason))
        chunks = list(c.generate_stream("First", max_new_tokens=40, seed=seed, stop=stops, state_every=5,
                                        return_state=True))
        out += [(ch.state, "every") for ch in chunks if ch.state]
    return out


def test_state_bytes_bounds_every_text_state_and_is_tight(char_server):
    with Client(char_server.target, timeout=30) as c:
        info = c.model_info()
        states = _text_states(c)
        greedy = c.generate("First", max_new_tokens=5, greedy=True, return_state=True).state
    reasons = {reason for _, reason in states}
    assert {"length", "stop_sequence", "every"} <= reasons
    sizes = [len(s) for s, _ in states] + [len(greedy)]
    assert max(sizes) <= info.state_bytes, (max(sizes), info.state_bytes)
    # tight: above the largest seen by at most what no test can reach on purpose (a held text of the
    # longest stop sequence allowed, 63 characters, each at most 2 bytes in JSON here, and a few digits)
    assert info.state_bytes - max(sizes) <= 2 * (info.limits.max_stop_sequence_chars - 1) + 40


def test_state_bytes_bounds_a_word_models_states(word_server):
    with Client(word_server.target, timeout=30) as c:
        info = c.model_info()
        sizes = [len(c.generate("the cat", max_new_tokens=6, seed=seed, stop=["the c", "a d"],
                                return_state=True).state) for seed in (0, 1, 2, 2**64 - 1)]
    assert max(sizes) <= info.state_bytes <= max(sizes) + 8 * (info.limits.max_stop_sequence_chars - 1) + 60


def test_state_bytes_bounds_a_frame_streams_state(tmp_path):
    from test_frames_server import D_IN, train_and_export

    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bundle = train_and_export(tmp_path, "reg", "regression", "lstm", "global")
    finally:
        torch.set_num_threads(n)
    srv = start_server(bundle, tmp_path / "frames.log")
    try:
        with Client(srv.target, timeout=30) as c:
            info = c.model_info()
            sizes = []
            for frames in (1, 7, 30):
                call = c.stream_frames(np.ones((frames, D_IN), np.float32), return_state=True)
                list(call)
                sizes.append(len(call.state))
    finally:
        srv.stop()
    assert max(sizes) <= info.state_bytes <= max(sizes) + 19  # the frame count's digits, at most 19


# -- state_every: every message that crosses a boundary carries the latest state ---------------------
@pytest.fixture(scope="module")
def merging_server(bundles, tmp_path_factory):
    """Messages 200 ms apart: a 250-token stream of the tiny model piles up between them."""
    srv = start_server(bundles["char"], tmp_path_factory.mktemp("merging") / "server.log",
                       "--min-message-interval-ms", "200")
    yield srv
    srv.stop()


def _check_state_every(target: str, return_state: bool) -> list[tuple[int, int, bool]]:
    """state_every=32 over 250 tokens, read slowly: every message whose tokens cross a multiple of 32
    carries a state, the one at its end (the latest), and continuing from it gives the rest."""
    every, n, params = 32, 250, dict(temperature=0.9, seed=5)
    with Client(target, timeout=60) as c:
        full = c.generate("First", max_new_tokens=n, **params)
        spans, text = [], ""
        for ch in c.generate_stream("First", max_new_tokens=n, state_every=every, return_state=return_state,
                                    **params):
            start = spans[-1][0] + spans[-1][1] if spans else 0
            text += ch.text
            spans.append((start, ch.token_count, ch.state, len(text)))
            time.sleep(0.05)  # a slow reader
        assert text == full.text
        for start, count, state, n_chars in spans:
            end = start + count
            if end // every > start // every or (return_state and end == n):
                assert state is not None, f"tokens {start + 1}..{end} cross a multiple of {every} without a state"
            if state is not None:
                assert end % every == 0 or end == n  # the state at the message's end: the latest one
                if end < n:
                    rest = c.generate("", state=state, max_new_tokens=n - end, **params)
                    assert full.text[:n_chars] + rest.text == full.text
        assert (spans[-1][2] is not None) == return_state
    return [(start, count, state is not None) for start, count, state, _ in spans]


@pytest.mark.parametrize("return_state", [False, True])
def test_every_message_crossing_a_boundary_carries_a_state(merging_server, return_state):
    spans = _check_state_every(merging_server.target, return_state)
    # the messages did merge: one spans several boundaries (it ends at the latest, 224, say)
    assert any((start + count) // 32 - start // 32 >= 2 for start, count, _ in spans), spans


def test_every_message_crossing_a_boundary_carries_a_state_at_the_default_pace(char_server):
    for return_state in (False, True):
        _check_state_every(char_server.target, return_state)


# -- the Python client names the range a field carries ------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=2**31), "max_new_tokens: 2147483648 is not in 1..2147483647"),
    (dict(max_new_tokens=-2**31 - 1), "max_new_tokens: -2147483649 is not in 1..2147483647"),
    (dict(top_k=2**31), "top_k: 2147483648 is not in 0..2147483647 (0 = off)"),
    (dict(seed=2**64), "seed: 18446744073709551616 is not in 0..18446744073709551615"),
    (dict(seed=-1), "seed: -1 is not in 0..18446744073709551615"),
    (dict(state_every=2**32), "state_every: 4294967296 is not in 0..2147483647 (0 = off)"),
    (dict(top_logprobs=2**32), "top_logprobs: 4294967296 is not in 0..4294967295"),
    (dict(seed=1.5), "seed: 1.5 is not an integer in 0..18446744073709551615"),
    (dict(max_new_tokens=True), "max_new_tokens: True is not an integer in 1..2147483647"),
])
def test_client_names_the_fields_range(kwargs, message):
    with Client("127.0.0.1:9", timeout=5) as c:  # nothing listens: the client refuses before any call
        with pytest.raises(InvalidArgumentError) as e:
            c.generate("All", **kwargs)
    assert str(e.value).endswith(f"INVALID_ARGUMENT: {message}"), str(e.value)


def test_values_the_wire_carries_go_to_the_server(char_server):
    """The server's own limits decide what the wire can carry: its message names them."""
    with Client(char_server.target, timeout=10) as c:
        with pytest.raises(InvalidArgumentError, match=r"max_new_tokens: is 0; allowed 1\.\.500"):
            c.generate("First", max_new_tokens=0)
        with pytest.raises(InvalidArgumentError, match=r"max_new_tokens: is 2147483647; allowed 1\.\.500"):
            c.generate("First", max_new_tokens=2**31 - 1)
