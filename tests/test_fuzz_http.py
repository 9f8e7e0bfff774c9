"""Property-based fuzzing of /v1/completions bodies against the real server (issue 25): extreme
integers, floats past a double, deep nesting, lone surrogates in keys and values, unknown keys,
wrong types, and both framing headers at once. Every answer is 200 or a 4xx whose OpenAI error
names a parameter, never a 500; the log holds no traceback; the server keeps serving.
LSTMGEN_FUZZ_EXAMPLES=10000 for the long run (default 200)."""
from __future__ import annotations

import json
import os
import socket
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstmgen.serve.openai_compat import _KNOWN
from test_http_api import start_http_server, stop
from tests.test_hardening_streams import no_traceback

EXAMPLES = int(os.environ.get("LSTMGEN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
    HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "fuzz_http.log"
    proc, _target, base, _metrics = start_http_server(bundles["char"], log, "--max-new-tokens", "8",
                                                      "--default-new-tokens", "4", "--log-level", "WARNING")
    u = urllib.parse.urlparse(base)
    yield (u.hostname, u.port), log
    assert stop(proc) == 0


extreme_ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**31, 2**63, 2**64, -1, 10**20, -(10**20)]),
                         st.integers(0, 10))
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324]))
surrogates = st.sampled_from(["\ud800", "a\udfff b", "The \ud800 x"])
texts = st.one_of(st.sampled_from(["All", "First", "", "Citizen:"]), surrogates, st.text(max_size=8))
scalars = st.one_of(st.none(), st.booleans(), extreme_ints, floats, texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(texts, inner, max_size=3)), max_leaves=6)
keys = st.one_of(st.sampled_from(sorted(_KNOWN)), surrogates, st.text(max_size=6))


@st.composite
def bodies(draw) -> tuple[bytes, bool]:
    """(body bytes, both framing headers): a JSON object of fuzzed fields, sometimes nested deep or
    holding an integer of thousands of digits, which JSON allows and Python refuses to convert."""
    fields = draw(st.dictionaries(keys, values, max_size=5))
    if draw(st.booleans()):
        fields["prompt"] = draw(st.one_of(texts, values))
    fields.setdefault("max_tokens", draw(st.one_of(st.integers(1, 8), extreme_ints)))
    text = json.dumps(fields)  # lone surrogates stay escaped: valid JSON
    kind = draw(st.sampled_from(["plain", "plain", "deep", "digits"]))
    if kind == "deep":
        depth = draw(st.integers(1000, 60_000))
        text = text[:-1] + ', "logit_bias": ' + "[" * depth + "]" * depth + "}"
    elif kind == "digits":
        text = text[:-1] + f', "top_k": {"9" * draw(st.integers(4000, 6000))}}}'
    return text.encode(), draw(st.integers(0, 9)) == 0


def send(addr, body: bytes, both_framings: bool) -> tuple[int, bytes]:
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    if both_framings:
        data = (head + f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + \
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        data = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(addr, timeout=30) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


@FUZZ
@given(case=bodies())
def test_fuzzed_bodies_get_200_or_a_named_4xx(server, case):
    addr, _log = server
    body, both = case
    status, payload = send(addr, body, both)
    assert status in (200, 400, 404, 413), (status, payload[:500])
    if status != 200 and payload:
        error = json.loads(payload)["error"]
        assert error["message"] and error["type"] != "server_error", error
        assert status == 413 or error["param"] is not None, error
    if both:
        assert status == 400


def test_the_server_survived_without_a_traceback(server):
    addr, log = server
    status, payload = send(addr, b'{"prompt": "All", "max_tokens": 3}', False)
    assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 3
    no_traceback(log.read_text())
