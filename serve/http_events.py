"""Streamed completions (`"stream": true`): every choice's Stream merged into server-sent events.

Each choice is a Stream read delta by delta and paced as a gRPC stream is (service.pace), so
tokens made meanwhile ride in one event. `events` writes one OpenAI chunk per Stream delta, then
the usage (when asked) and `[DONE]`; `EventStream` is the ASGI response that sends them and stops
their source as soon as the client disconnects. Completions that are not streamed do not come
here: they read each choice whole (serve/http_completions.py).
"""
from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, AsyncIterator

import anyio

from lstmgen.serve.openai_compat import CompletionRequest, usage_json
from lstmgen.serve.records import Delta
from lstmgen.serve.service import pace
from lstmgen.serve.stream import Stream

if TYPE_CHECKING:
    from lstmgen.serve.http_completions import Call


def dumps(obj: dict) -> bytes:
    """UTF-8 JSON; escaped (ASCII) when a string holds a lone surrogate (an unknown key "\\ud800"
    quoted in an error message), which UTF-8 cannot carry."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj).encode()


def sse(obj: dict) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


async def merged(call: Call) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from every choice's stream as they come. The queue is bounded: a
    client that stops reading stops the pumps, so its streams' rows park (Stream)."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(call.choices))
    scheduler, cfg = call.edge.scheduler, call.edge.cfg

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta, None))
                if delta.finished is None:
                    await pace(scheduler, cfg, stream)
            await queue.put((i, None, None))
        except Exception as e:  # the stream's error: the whole completion ends with it
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(call.choices)]
    try:
        left = len(tasks)
        while left:
            i, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                left -= 1
                continue
            call.took(delta.token_count)
            yield i, delta
    finally:
        for t in tasks:
            t.cancel()


async def events(call: Call, creq: CompletionRequest, fmt) -> AsyncIterator[bytes]:
    """Server-sent events: one per delta, then the usage (when asked) and `[DONE]`. An error
    after the stream started arrives as an event holding the error body."""
    finished: list = [None] * len(call.choices)
    offsets = [0] * len(call.choices)
    deltas = merged(call)
    try:
        async for i, delta in deltas:
            finished[i] = delta.finished
            lps = list(delta.logprobs) if creq.logprobs is not None else None
            choice = fmt.delta(i, delta.text, lps, offsets[i], delta.finished)
            offsets[i] += len(delta.text)
            yield sse({**call.head(fmt, fmt.chunk), "choices": [choice]})
        if creq.include_usage:
            yield sse({**call.head(fmt, fmt.chunk), "choices": [], "usage": usage_json(finished, creq.n)})
        yield b"data: [DONE]\n\n"
        call.status = "OK"
    except Exception as e:
        _status, body = call.failed(e, fmt.param)
        yield sse(body)
    finally:
        await deltas.aclose()
        call.end()


async def wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """An ASGI text/event-stream response that stops the event source as soon as the client
    disconnects, even while no event is due (a queued request writes nothing for a while)."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]):
        self.events, self.headers = events, headers

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")] + [(k.encode(), v.encode()) for k, v in self.headers.items()]
        try:
            async with anyio.create_task_group() as tg:
                async def body() -> None:
                    try:
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                        async for event in self.events:
                            await send({"type": "http.response.body", "body": event, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # the connection broke while writing
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                await wait_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.events.aclose()  # runs the source's finally: streams cancelled, call counted
