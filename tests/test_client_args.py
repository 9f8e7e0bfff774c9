"""Python client edges (issue 9): arguments a request cannot carry raise InvalidArgumentError when
generate / generate_stream is called, before any call; one stop string is one sequence; deadlines."""
from __future__ import annotations

import asyncio

import pytest

from lstmgen_client import AsyncClient, Client, DeadlineExceededError, InvalidArgumentError

NOWHERE = "127.0.0.1:9"  # nothing listens: a call made here would fail as UNAVAILABLE, not as these do


@pytest.mark.parametrize("kwargs, field", [
    (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed"),
    (dict(max_new_tokens=2**31), "max_new_tokens"), (dict(top_k=-2**31 - 1), "top_k"),
    (dict(stop=["ok", 3]), "stop"), (dict(timeout=0), "timeout"), (dict(timeout=-1), "timeout"),
])
def test_unsendable_arguments_raise_at_call_time(kwargs, field):
    with Client(NOWHERE, timeout=5) as c:
        with pytest.raises(InvalidArgumentError, match=f"^INVALID_ARGUMENT: {field}:"):
            c.generate_stream("All", **kwargs)  # raises here, not on the first iteration
        with pytest.raises(InvalidArgumentError, match=f"^INVALID_ARGUMENT: {field}:"):
            c.generate("All", **kwargs)


def test_empty_prompt_raises_before_iterating():
    async def main():
        async with AsyncClient(NOWHERE, timeout=5) as c:
            with pytest.raises(InvalidArgumentError, match="^INVALID_ARGUMENT: prompt:"):
                c.generate_stream("")
            with pytest.raises(InvalidArgumentError, match="^INVALID_ARGUMENT: prompt:"):
                await c.generate("")
    with Client(NOWHERE, timeout=5) as c:
        with pytest.raises(InvalidArgumentError, match="^INVALID_ARGUMENT: prompt:"):
            c.generate_stream("")
    asyncio.run(main())


def test_zero_timeout_is_refused_not_the_default():
    for kwargs in (dict(timeout=0), dict(timeout=5, stream_timeout=0)):
        with pytest.raises(InvalidArgumentError, match="timeout: is 0"):
            Client(NOWHERE, **kwargs)


def test_stream_deadline_is_separate_from_the_call_default(char_server):
    with Client(char_server.target, timeout=7, stream_timeout=None) as c:
        assert (c.timeout, c.stream_timeout) == (7, None)
    with Client(char_server.target, timeout=30) as c:
        assert c.stream_timeout == 30  # unset: the same as timeout
        with pytest.raises(DeadlineExceededError):  # a call's own deadline wins, however small
            c.generate("First", max_new_tokens=500, timeout=0.0005)


def test_a_single_stop_string_is_one_sequence(char_server):
    with Client(char_server.target, timeout=30) as c:
        whole = c.generate("All", max_new_tokens=40, seed=3)
        cut = whole.text[10:13]  # stop on three characters the text holds: cut just before them
        r = c.generate("All", max_new_tokens=40, seed=3, stop=cut)
        assert r.finish_reason == "stop_sequence" and r.finished.stop_sequence == cut
        assert r.text == whole.text[: whole.text.index(cut)]
        assert c.generate("All", max_new_tokens=40, seed=3, stop=[cut]).text == r.text
