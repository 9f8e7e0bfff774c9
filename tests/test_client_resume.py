"""The resuming client's bookkeeping (lstmgen_client.resume) on made-up chunks, and the client's
state and replica options against real servers."""
from __future__ import annotations

import asyncio
import re

from lstmgen_client import AsyncClient, AsyncConversation, Client, Finished, StreamChunk, TokenLogprob
from lstmgen_client.errors import InternalError, InvalidArgumentError, UnavailableError
from lstmgen_client.resume import Resumer, resumable
from lstmgen_client.v1 import generator_pb2 as pb


def lp(i: int) -> TokenLogprob:
    return TokenLogprob(i, f"t{i}", -0.5)


def test_resume_drops_exactly_what_the_caller_had():
    r = Resumer(pb.GenerateRequest(prompt="hi", max_new_tokens=10, seed=3, state_every=4), 10)
    seen = [r.filter(StreamChunk("abcd", 4, None, (lp(0), lp(1), lp(2), lp(3)), b"S4")),
            r.filter(StreamChunk("ef", 2, None, (lp(4), lp(5))))]
    assert [c.text for c in seen] == ["abcd", "ef"]
    req = r.next_request()  # the stream broke after "ef": continue from the state after "abcd"
    assert (req.prompt, req.state, req.max_new_tokens, req.seed) == ("", b"S4", 6, 3)
    # the new stream regenerates "ef" (2 tokens) first: dropped, even split across messages
    out = [r.filter(StreamChunk("e", 1, None, (lp(4),))),
           r.filter(StreamChunk("fgh", 3, None, (lp(5), lp(6), lp(7)), b"S8")),
           r.filter(StreamChunk("ij", 2, Finished("length", 0, 6, 3), (lp(8), lp(9))))]
    assert out[0] is None
    assert (out[1].text, out[1].token_count, [x.token_id for x in out[1].logprobs]) == ("gh", 2, [6, 7])
    assert out[2].finished.generated_tokens == 10  # made whole: 4 before the state + 6 after
    assert r.finished  # a break after this message needs no resume (the client returns)
    again = r.next_request()  # a second break: from the newest state
    assert (again.state, again.max_new_tokens) == (b"S8", 2)


def test_resume_before_any_state_redoes_the_request():
    first = pb.GenerateRequest(prompt="hi", max_new_tokens=5, seed=1)
    r = Resumer(first, 5)
    assert r.filter(StreamChunk("ab", 2)).text == "ab"
    assert r.next_request() is first
    assert r.filter(StreamChunk("abc", 3)).text == "c"


def test_what_counts_as_a_dropped_stream():
    assert resumable(UnavailableError("UNAVAILABLE: Stream removed (Socket closed)"))
    assert resumable(InternalError("INTERNAL: Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"))
    assert not resumable(InternalError("INTERNAL: internal error in the decode step: ValueError"))
    assert not resumable(InvalidArgumentError("INVALID_ARGUMENT: state: truncated"))


def test_an_empty_address_list_is_refused():
    try:
        Client([])
    except InvalidArgumentError as e:
        assert "target" in str(e)
    else:
        raise AssertionError("an empty address list was accepted")


def test_two_replicas_share_the_calls(bundles, tmp_path):
    """A client given both replicas' addresses spreads its calls over them (gRPC's round_robin)."""
    from conftest import start_server
    servers = [start_server(bundles["char"], tmp_path / f"r{i}.log") for i in range(2)]
    try:
        with Client([s.target for s in servers]) as c:
            for _ in range(6):
                c.generate("First", max_new_tokens=3)
        counts = [len(re.findall("stream end", s.log.read_text())) for s in servers]
        assert sum(counts) == 6 and min(counts) >= 2, counts
    finally:
        for s in servers:
            s.stop()


def test_async_client_state_and_conversation(char_server):
    async def main():
        async with AsyncClient(char_server.target) as c:
            params = dict(temperature=0.8, top_p=0.9, seed=4)
            full = await c.generate("First", max_new_tokens=40, **params)
            a = await c.generate("First", max_new_tokens=15, return_state=True, **params)
            b = await c.generate("", state=a.state, max_new_tokens=25, **params)
            assert a.text + b.text == full.text
            conv = AsyncConversation(c, max_new_tokens=6, greedy=True)
            r1 = await conv.say("First")
            r2 = await conv.say(" Citizen")
            fresh = await c.generate("First" + r1.text + " Citizen", max_new_tokens=6, greedy=True)
            assert r2.text == fresh.text
            # resume=True on a healthy stream changes nothing
            chunks = [ch async for ch in c.generate_stream("First", max_new_tokens=40, resume=True, **params)]
            assert "".join(ch.text for ch in chunks) == full.text
    asyncio.run(main())
