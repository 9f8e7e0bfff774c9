"""The OpenAI surfaces other tools call (issue 27), with the official `openai` client against a real
`lstmgen serve --http-port 0`: chat completions (unary and streamed) over a template, a served model
name, `models.retrieve`, unknown routes answered as OpenAI errors, logit_bias on HTTP and gRPC, and
seeds refused past 2^64-1 and reported on each choice."""
from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest

from lstmgen.serve.openai_chat import ChatTemplate
from lstmgen_client import Client
from lstmgen_client.v1 import generator_pb2 as pb
from test_http_api import post, start_http_server, stop

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "chat.log"
    proc, target, base, _ = start_http_server(bundles["char"], log, "--served-model-name", "ts",
                                              "--max-new-tokens", "200")
    yield target, base, log
    assert stop(proc) == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=30)


MESSAGES = [{"role": "system", "content": "You are all resolved."}, {"role": "user", "content": "Speak, speak."}]


def test_chat_is_the_completion_of_its_rendered_prompt(client):
    chat = client.chat.completions.create(model="ts", messages=MESSAGES, max_tokens=40, seed=3, temperature=0.8)
    prompt = ChatTemplate().render([(m["role"], m["content"]) for m in MESSAGES])
    assert prompt == "system: You are all resolved.\nuser: Speak, speak.\nassistant: "
    plain = client.completions.create(model="ts", prompt=prompt, max_tokens=40, seed=3, temperature=0.8,
                                      stop=list(ChatTemplate().stop))
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].finish_reason == plain.choices[0].finish_reason
    assert chat.usage.completion_tokens == plain.usage.completion_tokens
    assert chat.choices[0].model_extra["seed"] == 3


def test_chat_streams_deltas_with_logprobs(client):
    stream = client.chat.completions.create(model="ts", messages=MESSAGES, max_tokens=30, seed=5, stream=True,
                                            logprobs=True, top_logprobs=2, stream_options={"include_usage": True})
    text, roles, tokens, usage = "", [], 0, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            roles.append(c.delta.role)
            tokens += len(c.logprobs.content)
            assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    whole = client.chat.completions.create(model="ts", messages=MESSAGES, max_tokens=30, seed=5)
    assert text == whole.choices[0].message.content and roles[0] == "assistant"
    assert tokens == usage.completion_tokens == whole.usage.completion_tokens


def test_chat_errors_name_the_chat_parameter(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ts", messages=[{"role": "user", "content": "ROMEO"}], max_tokens=5)
    assert e.value.body["param"] == "messages" and "not in the vocabulary" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ts", messages=[{"role": "wizard", "content": "All"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ts", messages=MESSAGES, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {}}}])
    assert e.value.body["param"] == "tools"


def test_the_served_model_name_and_models_retrieve(client):
    assert [m.id for m in client.models.list()] == ["ts"]
    assert client.models.retrieve("ts").id == "ts"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert "'gpt-4' is not served here; this server serves 'ts'" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="All", max_tokens=2)


def test_an_unknown_route_is_an_openai_error_naming_the_routes(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="ts", input="All")
    message = str(e.value)
    assert "no route POST /v1/embeddings" in message and "POST /v1/chat/completions" in message
    with pytest.raises(openai.APIStatusError) as e:
        client.get("/completions", cast_to=object)
    assert e.value.status_code == 405 and "GET /v1/completions" in str(e.value)
    assert e.value.response.headers["allow"] == "POST"


def _vocab(base: str) -> list[str]:
    with grpc.insecure_channel(base) as ch:
        info = ch.unary_unary("/lstmgen.v1.Generator/GetModelInfo", response_deserializer=pb.ModelInfo.FromString)(
            pb.ModelInfoRequest(include_vocabulary=True).SerializeToString())
    return list(info.vocabulary)


def test_logit_bias_forces_and_bans_tokens_on_http_and_grpc(server, client):
    target, base, _ = server
    vocab = _vocab(target)
    e = vocab.index("e")
    forced = client.completions.create(model="ts", prompt="All", max_tokens=20, seed=1, logit_bias={str(e): 100})
    assert forced.choices[0].text == "e" * 20
    greedy = client.completions.create(model="ts", prompt="All", max_tokens=20, temperature=0)
    top = greedy.choices[0].text[0]
    banned = client.completions.create(model="ts", prompt="All", max_tokens=20, temperature=0,
                                       logit_bias={str(vocab.index(top)): -100})
    assert top not in banned.choices[0].text
    with grpc.insecure_channel(target) as ch:
        gen = ch.unary_stream("/lstmgen.v1.Generator/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateResponse.FromString)
        text = "".join(r.text for r in gen(pb.GenerateRequest(prompt="All", max_new_tokens=20, seed=1,
                                                               logit_bias={e: 100.0})))
        assert text == "e" * 20
        with Client(target) as c:  # the Python client takes it too
            assert c.generate("All", max_new_tokens=20, seed=1, logit_bias={e: 100}).text == "e" * 20
        with pytest.raises(grpc.RpcError) as err:
            list(gen(pb.GenerateRequest(prompt="All", max_new_tokens=2, logit_bias={len(vocab): 1.0})))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(gen(pb.GenerateRequest(prompt="All", max_new_tokens=2, logit_bias={e: 101.0})))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[-100, 100]" in err.value.details()
    for bias, param in (({"x": 1}, "logit_bias"), ({str(len(vocab)): 1}, "logit_bias"), ({str(e): 1e9}, f"logit_bias[{e}]")):
        status, body = post(base + "/v1/completions", {"prompt": "All", "max_tokens": 2, "logit_bias": bias})
        assert status == 400 and body["error"]["param"] == param, body


def test_seeds_are_refused_past_the_range_and_reported(client, server):
    for seed in (-1, 2**64):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="ts", prompt="All", max_tokens=2, seed=seed)
        assert e.value.body["param"] == "seed"
    r = client.completions.create(model="ts", prompt="All", max_tokens=2, seed=2**64 - 1, n=2)
    assert [c.model_extra["seed"] for c in r.choices] == [2**64 - 1, 0]  # choice j: seed + j, modulo 2^64
    unseeded = client.completions.create(model="ts", prompt="All", max_tokens=5)
    seed = unseeded.choices[0].model_extra["seed"]
    again = client.completions.create(model="ts", prompt="All", max_tokens=5, seed=seed)
    assert again.choices[0].text == unseeded.choices[0].text


def test_an_oversized_body_is_not_a_rate_limit(server):
    status, body = post(server[1] + "/v1/completions", b'{"prompt": "' + b"a" * 300_000 + b'"}')
    assert status == 413 and body["error"]["type"] == "invalid_request_error", body


def test_a_chat_template_file_is_used_and_a_bad_one_refused(bundles, tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"message": "{content}\n", "assistant": "", "stop": ["\n"]}))
    proc, _target, base, _ = start_http_server(bundles["char"], tmp_path / "t.log", "--chat-template", str(good))
    try:
        status, body = post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "All"}],
                                                             "max_tokens": 30, "seed": 2})
        _, plain = post(base + "/v1/completions", {"prompt": "All\n", "max_tokens": 30, "seed": 2, "stop": ["\n"]})
        assert status == 200 and body["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    finally:
        assert stop(proc) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"message": "{name}: {content}"}))
    out = subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bundles["char"]), "--port", "0",
                          "--http-port", "0", "--chat-template", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"{bad}: \"message\" may use {{role}} and {{content}} only" in out.stderr
    assert "Traceback" not in out.stderr
