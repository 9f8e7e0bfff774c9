"""The OpenAI-compatible HTTP API (serve/http_api.py), driven by the official `openai` package and
by `curl -N`, against a real `lstmgen serve --http-port 0` process that also serves gRPC."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ServerProc, start_server
from lstmgen.serve.errors import InvalidRequest
from lstmgen.serve.openai_compat import parse_completion

openai = pytest.importorskip("openai")


def start_http_server(bundle: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str, str, str]:
    """`lstmgen serve` with --http-port 0; returns (process, grpc target, http base URL, metrics URL)."""
    srv = start_server(bundle, log, "--http-port", "0", "--metrics-port", "0", *extra)
    m = re.search(r"\(metrics on (\S+)\) \(http on (https?://[\d.]+:\d+)/\)", srv.ready_line)
    if not m:
        srv.proc.kill()
        raise RuntimeError(f"no metrics/http addresses in the ready line: {srv.ready_line!r}")
    return srv.proc, srv.target, m.group(2), m.group(1)


def stop(proc: subprocess.Popen) -> int:
    return ServerProc(proc, "", Path()).stop()


@pytest.fixture(scope="module")
def http_server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "http_server.log"
    proc, target, base, metrics = start_http_server(bundles["char"], log, "--max-new-tokens", "300",
                                           "--max-concurrent", "4", "--max-queued", "2")
    yield target, base, metrics
    assert stop(proc) == 0


@pytest.fixture
def client(http_server):
    return openai.OpenAI(base_url=http_server[1] + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- the openai package as the client ------------------------------------------------------------
def test_openai_completion_matches_grpc(http_server, client):
    from lstmgen_client import Client

    r = client.completions.create(model="char", prompt="First", max_tokens=30, seed=7, temperature=0.8, top_p=0.9,
                                  extra_body={"top_k": 20, "repetition_penalty": 1.1})
    assert r.object == "text_completion" and r.model == "char" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 30 and r.usage.total_tokens == 35
    # The same request over gRPC on the same process gives the same text: one scheduler, one sampler.
    with Client(http_server[0]) as c:
        g = c.generate("First", max_new_tokens=30, seed=7, temperature=0.8, top_p=0.9, top_k=20,
                       repetition_penalty=1.1)
    assert g.text == r.choices[0].text


def test_openai_stream_n_and_prompts(client):
    texts: dict[int, str] = {}
    reasons, usage = {}, None
    for ev in client.completions.create(model="char", prompt=["First", "All"], n=2, max_tokens=12, seed=1,
                                        stream=True, stream_options={"include_usage": True}):
        if not ev.choices:
            usage = ev.usage
            continue
        ch = ev.choices[0]
        texts[ch.index] = texts.get(ch.index, "") + ch.text
        if ch.finish_reason:
            reasons[ch.index] = ch.finish_reason
    assert sorted(texts) == [0, 1, 2, 3] and reasons == {i: "length" for i in range(4)}
    assert all(len(t) == 12 for t in texts.values())  # char model: a token is a character
    assert texts[0] != texts[1]  # choice j samples with seed + j
    assert usage.prompt_tokens == 5 + 3 and usage.completion_tokens == 48
    # Not streamed, the same seeds give the same texts
    r = client.completions.create(model="char", prompt=["First", "All"], n=2, max_tokens=12, seed=1)
    assert {c.index: c.text for c in r.choices} == texts


def test_openai_logprobs_and_stop(client):
    r = client.completions.create(model="char", prompt="First", max_tokens=20, seed=3, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 20
    assert all(len(alts) == 3 and max(alts.values()) >= v - 1e-6 for alts, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == list(range(20))
    stop = r.choices[0].text[5:7]
    s = client.completions.create(model="char", prompt="First", max_tokens=20, seed=3, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and s.choices[0].text == r.choices[0].text[:5]


def test_openai_errors_name_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="char", prompt="First", max_tokens=100_000)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens" and "1..300" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="char", prompt="First", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="char", prompt=["First", "F\u00a7"])
    assert e.value.body["param"] == "prompt[1]" and "skip_unknown" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="First")
    assert e.value.body["param"] == "model" and "'char'" in e.value.body["message"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["char"]


def test_bad_bodies(http_server):
    base = http_server[1]
    assert post(base + "/v1/completions", b"{not json")[0] == 400
    code, body = post(base + "/v1/completions", {"prompt": "First", "max_tokens": "ten"})
    assert code == 400 and body["error"]["param"] == "max_tokens"
    code, body = post(base + "/v1/completions", {"prompt": "First", "echo": True})
    assert code == 400 and body["error"]["param"] == "echo"
    code, body = post(base + "/v1/completions", {"prompt": "First", "frobnicate": 1})
    assert code == 400 and body["error"]["param"] == "frobnicate"
    code, body = post(base + "/v1/completions", {"prompt": "x" * 200_000})
    assert code == 413 and "max-request-bytes" in body["error"]["message"]


def test_parse_rules():
    c = parse_completion({"prompt": "a", "n": 3, "seed": 5, "logprobs": 0}, "rid")
    assert [r.sampling.seed for r in c.choices] == [5, 6, 7] and all(r.seed_given for r in c.choices)
    assert c.choices[0].logprobs and c.choices[0].top_logprobs == 0
    assert [r.request_id for r in c.choices] == ["rid-0", "rid-1", "rid-2"]
    for body, param in (({"prompt": []}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({}, "prompt"),
                        ({"prompt": "a", "n": 0}, "n"), ({"prompt": "a", "best_of": 3}, "best_of"),
                        ({"prompt": "a", "stream": "yes"}, "stream"), ({"prompt": "a", "top_k": 1.5}, "top_k")):
        with pytest.raises(InvalidRequest) as e:
            parse_completion(body, "rid")
        assert e.value.field == param


# -- curl -N: server-sent events as they are made ---------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_events(http_server):
    out = subprocess.run(["curl", "-sN", http_server[1] + "/v1/completions", "-H", "content-type: application/json",
                          "-d", json.dumps({"prompt": "First", "max_tokens": 50, "stream": True, "seed": 2})],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    events = [e[len("data: "):] for e in out.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks).__len__() == 50
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- a client that goes away frees its row; metrics count HTTP calls like gRPC ones ----------------
def test_disconnect_frees_the_row_and_metrics(http_server, client):
    from lstmgen_client import Client

    murl = http_server[2]
    with client.completions.create(model="char", prompt="First", max_tokens=300, stream=True,
                                   extra_body={"min_p": 0.0}) as s:
        next(iter(s))  # the stream is running; now leave
    with Client(http_server[0]) as c:  # the row and its slot come back
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = _scrape(murl)
            if "lstmgen_open_streams 0.0" in text and "lstmgen_active_rows 0.0" in text:
                break
            time.sleep(0.05)
        assert "lstmgen_active_rows 0.0" in text and "lstmgen_open_streams 0.0" in text, text
        assert c.generate("First", max_new_tokens=3).finished is not None
    assert re.search(r'lstmgen_requests_total\{status="CANCELLED"\} [1-9]', text)


def test_a_whole_completion_times_its_first_token(http_server, client):
    """A completion that is not streamed is read to its end in the core (no tokens reach the edge
    before its end), yet the call's time to first token is observed once, from the core's time."""
    def ttft(text: str) -> tuple[float, float]:
        count = float(re.search(r"^lstmgen_time_to_first_token_seconds_count (\S+)$", text, re.M).group(1))
        total = float(re.search(r"^lstmgen_time_to_first_token_seconds_sum (\S+)$", text, re.M).group(1))
        return count, total

    before = ttft(_scrape(http_server[2]))
    t0 = time.perf_counter()
    r = client.completions.create(model="char", prompt="First", max_tokens=200, n=2, seed=3)
    took = time.perf_counter() - t0
    after = ttft(_scrape(http_server[2]))
    assert len(r.choices) == 2 and after[0] == before[0] + 1
    assert 0 < after[1] - before[1] < took  # the first token came before the whole answer


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_overload_is_429_and_counted(http_server):
    base, murl = http_server[1], http_server[2]
    code, body = post(base + "/v1/completions", {"prompt": "First", "n": 20, "max_tokens": 5})
    assert code == 429 and body["error"]["type"] == "rate_limit_error"
    assert re.search(r'lstmgen_rejections_total\{reason="overloaded"\} [1-9]', _scrape(murl))
    assert re.search(r'lstmgen_requests_total\{status="RESOURCE_EXHAUSTED"\} [1-9]', _scrape(murl))
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}


# -- TLS and the bearer token: the same flags as gRPC ------------------------------------------------
def test_tls_and_token(bundles, tmp_path):
    pytest.importorskip("cryptography")
    import ssl

    from test_security import TOKEN, make_ca, make_server_cert, pem

    ca_key, ca = make_ca("lstmgen test CA")
    key, cert = make_server_cert(ca_key, ca)
    for name, data in (("ca", pem(ca)), ("cert", pem(cert)), ("key", pem(key)), ("token", TOKEN.encode() + b"\n")):
        (tmp_path / name).write_bytes(data)
    proc, _target, base, murl = start_http_server(
        bundles["char"], tmp_path / "log", "--tls-cert", str(tmp_path / "cert"), "--tls-key", str(tmp_path / "key"),
        "--auth-token-file", str(tmp_path / "token"))
    try:
        assert base.startswith("https://")
        tls = ssl.create_default_context(cafile=str(tmp_path / "ca"))
        http = openai.DefaultHttpxClient(verify=tls)  # the openai package's own HTTP client
        good = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, http_client=http, max_retries=0)
        r = good.completions.create(model="char", prompt="First", max_tokens=5)
        assert len(r.choices[0].text) == 5
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="char", prompt="First", max_tokens=5)
        assert e.value.status_code == 401 and "Bearer" in e.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with urllib.request.urlopen(base + "/health", context=tls, timeout=10) as r:  # probes need no token
            assert json.loads(r.read()) == {"status": "ok"}
        with urllib.request.urlopen(base + "/", context=tls, timeout=10) as r:
            assert b"<html" in r.read().lower()
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on a TLS port
            urllib.request.urlopen(base.replace("https", "http") + "/health", timeout=10).read()
        assert re.search(r'lstmgen_rejections_total\{reason="unauthenticated"\} [1-9]', _scrape(murl))
    finally:
        assert stop(proc) == 0
