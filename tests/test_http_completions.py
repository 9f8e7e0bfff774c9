"""The HTTP completions handler (serve/http_completions.py) on a stand-in scheduler, in process: a
completion that is not streamed reads each choice through `submit_completion` (never a Stream),
and every way out - the client leaving, a choice failing, a refused choice, the handler cancelled
at shutdown - cancels every choice still running and gives back its admission slot."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("starlette")
from starlette.requests import Request  # noqa: E402

from lstmgen.serve.completion import CompletionSink  # noqa: E402
from lstmgen.serve.errors import Overloaded, StepFailed  # noqa: E402
from lstmgen.serve.http_completions import Completions  # noqa: E402
from lstmgen.serve.metrics import Metrics  # noqa: E402
from lstmgen.serve.openai_chat import ChatFormat, ChatTemplate, chat_to_completion  # noqa: E402
from lstmgen.serve.openai_compat import CompletionFormat, parse_completion  # noqa: E402
from lstmgen.serve.params import RequestLimits  # noqa: E402
from lstmgen.serve.records import Finished, TokenLogprob  # noqa: E402
from lstmgen.serve.service import ServiceConfig  # noqa: E402
from lstmgen.serve.stopping import FinishReason  # noqa: E402


class FakeScheduler:
    """Admits into CompletionSinks the test resolves; counts open slots as the scheduler does."""

    def __init__(self, refuse_after: int | None = None):
        self.limits = RequestLimits(max_new_tokens=300)
        self.sinks: list[CompletionSink] = []
        self.open = 0
        self.refuse_after = refuse_after

    def submit_completion(self, req) -> CompletionSink:
        if self.refuse_after is not None and len(self.sinks) >= self.refuse_after:
            raise Overloaded("full")
        self.open += 1
        sink = CompletionSink(on_close=self._closed)
        self.sinks.append(sink)
        return sink

    def submit(self, req):
        raise AssertionError("a completion that is not streamed must not read a Stream")

    def _closed(self) -> None:
        self.open -= 1


def finish(sink: CompletionSink, text: str, seed: int, logprob: TokenLogprob | None = None) -> None:
    """What the worker does: push the tokens, the last push resolves the future."""
    for ch in text[:-1]:
        sink.push(ch, 1, None, None, logprob)
    sink.push(text[-1], 1, Finished(FinishReason.LENGTH, 5, len(text), seed), None, logprob)


class Client:
    """One ASGI request: its body at once, then a disconnect when `leave` is set."""

    def __init__(self, body: dict):
        self.body = json.dumps(body).encode()
        self.leave = asyncio.Event()
        self.sent = False

    async def receive(self) -> dict:
        if not self.sent:
            self.sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    def request(self) -> Request:
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(self.body)).encode())]}
        return Request(scope, self.receive)


def counted(metrics: Metrics, status: str) -> float:
    return metrics.registry.get_sample_value("lstmgen_requests_total", {"status": status}) or 0.0


async def _until(check) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("timed out")


def run(body: dict, scheduler: FakeScheduler, act, fmt=CompletionFormat, parse=parse_completion):
    """Start the handler, let `act(client)` play the worker and the client, return (response, metrics)."""
    metrics = Metrics()
    edge = Completions(scheduler, "m", metrics, ServiceConfig())

    async def main():
        client = Client(body)
        task = asyncio.create_task(edge(client.request(), fmt, parse))
        await _until(lambda: scheduler.sinks or task.done())
        await act(client, task)
        return await task if not task.cancelled() else None

    return asyncio.run(main()), metrics


def test_choices_end_in_any_order_and_answer_in_choice_order():
    s = FakeScheduler()
    lp = TokenLogprob(1, "a", -0.5, ((1, "a", -0.5),))

    async def act(client, task):
        await _until(lambda: len(s.sinks) == 2)
        finish(s.sinks[1], "bb", 8, lp)
        await asyncio.sleep(0)
        finish(s.sinks[0], "aaa", 7, lp)

    r, m = run({"prompt": "x", "n": 2, "seed": 7, "max_tokens": 3, "logprobs": 1}, s, act)
    body = json.loads(r.body)
    assert r.status_code == 200 and [c["text"] for c in body["choices"]] == ["aaa", "bb"]
    assert [c["seed"] for c in body["choices"]] == [7, 8]
    assert body["choices"][1]["logprobs"]["text_offset"] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert s.open == 0 and counted(m, "OK") == 1


def test_chat_reads_choices_whole_too():
    s = FakeScheduler()

    async def act(client, task):
        finish(s.sinks[0], "hi", 1)

    def parse(body, rid):
        return parse_completion(chat_to_completion(body, ChatTemplate()), rid)

    r, _ = run({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}, s, act, ChatFormat, parse)
    body = json.loads(r.body)
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


def test_a_client_that_leaves_cancels_every_running_choice():
    s = FakeScheduler()

    async def act(client, task):
        await _until(lambda: len(s.sinks) == 3)
        finish(s.sinks[0], "a", 1)  # one ended; two still run
        client.leave.set()

    r, m = run({"prompt": "x", "n": 3, "max_tokens": 3}, s, act)
    assert r.status_code == 499
    assert not s.sinks[0].future.cancelled() and all(k.future.cancelled() for k in s.sinks[1:])
    assert s.open == 0 and counted(m, "CANCELLED") == 1
    assert m.registry.get_sample_value("lstmgen_open_streams") == 0


def test_a_failed_choice_fails_the_call_and_cancels_the_rest(monkeypatch):
    s = FakeScheduler()
    wrapped, wrap = [], asyncio.wrap_future
    monkeypatch.setattr(asyncio, "wrap_future", lambda f: wrapped.append(wrap(f)) or wrapped[-1])

    async def act(client, task):
        await _until(lambda: len(s.sinks) == 3)
        s.sinks[2].push("", 0, None, StepFailed("model step failed: boom"))
        s.sinks[0].push("", 0, None, StepFailed("model step failed: again"))

    r, m = run({"prompt": "x", "n": 3, "max_tokens": 3}, s, act)
    body = json.loads(r.body)
    assert r.status_code == 500 and body["error"] == {"message": "model step failed: again", "type": "server_error",
                                                      "param": None, "code": "internal"}  # choice order
    assert s.sinks[1].future.cancelled() and s.open == 0 and counted(m, "INTERNAL") == 1
    # the second error was read: asyncio does not log it as "Future exception was never retrieved"
    assert len(wrapped) == 3 and not any(w._log_traceback for w in wrapped)


def test_a_refused_choice_cancels_the_admitted_ones():
    s = FakeScheduler(refuse_after=1)

    async def act(client, task):
        pass

    r, m = run({"prompt": "x", "n": 2, "max_tokens": 3}, s, act)
    assert r.status_code == 429 and json.loads(r.body)["error"]["type"] == "rate_limit_error"
    assert s.sinks[0].future.cancelled() and s.open == 0
    assert m.registry.get_sample_value("lstmgen_rejections_total", {"reason": "overloaded"}) == 1


def test_a_handler_cancelled_at_shutdown_cancels_its_choices():
    s = FakeScheduler()

    async def act(client, task):
        await _until(lambda: len(s.sinks) == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _, m = run({"prompt": "x", "n": 2, "max_tokens": 3}, s, act)
    assert all(k.future.cancelled() for k in s.sinks) and s.open == 0
    assert counted(m, "CANCELLED") == 1 and m.registry.get_sample_value("lstmgen_open_streams") == 0


def test_a_failed_call_still_times_its_first_token_and_counts_its_tokens():
    """A call that fails after its rows made tokens is timed and counted as a streamed call that
    read them would be: from the core's first-token time and each row's count."""
    import time
    from types import SimpleNamespace

    s = FakeScheduler()
    t_first = time.perf_counter()

    async def act(client, task):
        await _until(lambda: len(s.sinks) == 2)
        for sink in s.sinks:  # what the worker records on the rows
            sink.seq = SimpleNamespace(first_token_at=t_first, stopper=SimpleNamespace(generated=4))
        s.sinks[1].push("", 0, None, StepFailed("model step failed: boom"))

    r, m = run({"prompt": "x", "n": 2, "max_tokens": 30}, s, act)
    assert r.status_code == 500
    assert m.registry.get_sample_value("lstmgen_time_to_first_token_seconds_count") == 1
    assert s.open == 0
