"""State hand-off through real servers: a generation split in two equals the unsplit one, on the
same server or another replica; bad blobs get their documented status and the server goes on."""
from __future__ import annotations

import grpc
import pytest

from conftest import start_server
from lstmgen_client import (Client, Conversation, FailedPreconditionError, InvalidArgumentError)

SETTINGS = [
    dict(temperature=0.8, top_p=0.9, top_k=40),
    dict(greedy=True),
    dict(temperature=1.0, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
    dict(temperature=0.9, logprobs=True, top_logprobs=3),
    dict(temperature=1.2, stop=["e ", "ak", "t:\n"]),  # multi-character stops: text held back at the split
]


def split_equals_unsplit(first: Client, second: Client, prompt: str, n: int, m: int, **params) -> str:
    """Generate n tokens with the state, continue m more (on `second`), compare with n + m at once."""
    full = first.generate(prompt, max_new_tokens=n + m, **params)
    a = first.generate(prompt, max_new_tokens=n, return_state=True, **params)
    if a.finish_reason != "length":  # ended before the split: the unsplit run ends the same way
        assert (a.text, a.finish_reason) == (full.text, full.finish_reason)
        return "ended"
    assert a.state, "return_state gave no state"
    b = second.generate("", state=a.state, max_new_tokens=m, **params)
    assert a.text + b.text == full.text
    assert b.finish_reason == full.finish_reason
    assert a.finished.generated_tokens + b.finished.generated_tokens == full.finished.generated_tokens
    assert b.seed == full.seed
    assert a.logprobs + b.logprobs == full.logprobs
    return "held" if a.finished.held_text else "split"


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda d: ",".join(d))
def test_split_equals_unsplit_char(char_server, settings):
    outcomes = set()
    with Client(char_server.target) as c:
        for seed in range(4):
            outcomes.add(split_equals_unsplit(c, c, "First Citizen:", 17 + seed, 23, seed=seed, **settings))
    assert "split" in outcomes or "held" in outcomes


def test_held_back_text_is_carried(char_server):
    """A split in the middle of a possible stop sequence: the text is held in the state, reported in
    held_text, and the continuation finishes it (or cuts it) exactly as the unsplit run does."""
    held = 0
    with Client(char_server.target) as c:
        for seed in range(40):
            for n in (3, 5, 8):
                out = split_equals_unsplit(c, c, "All:", n, 12, seed=seed, temperature=1.3, stop=["ee", "a a", "s:\n"])
                held += out == "held"
    assert held >= 2, "no split landed inside a possible stop sequence; the test proves nothing"


@pytest.mark.parametrize("settings", SETTINGS[:3], ids=lambda d: ",".join(d))
def test_split_equals_unsplit_word(word_server, settings):
    with Client(word_server.target) as c:
        for seed in range(3):
            split_equals_unsplit(c, c, "the cat", 5 + seed, 9, seed=seed, **settings)


def test_continue_with_new_text_reads_it_after_the_state(char_server):
    """A turn with a prompt after the state reads that text as if it followed the generated text."""
    with Client(char_server.target) as c:
        a = c.generate("First", max_new_tokens=10, greedy=True, return_state=True)
        turn = c.generate(" Citizen", state=a.state, max_new_tokens=15, greedy=True)
        fresh = c.generate("First" + a.text + " Citizen", max_new_tokens=15, greedy=True)
        assert turn.text == fresh.text
        assert turn.finished.prompt_tokens == len(" Citizen")


def test_conversation_keeps_state(char_server):
    with Client(char_server.target) as c:
        conv = Conversation(c, max_new_tokens=8, greedy=True)
        r1 = conv.say("First")
        r2 = conv.say(" Citizen:")
        assert conv.turns == 2 and conv.state
        assert r2.text == c.generate("First" + r1.text + " Citizen:", max_new_tokens=8, greedy=True).text


@pytest.fixture(scope="module")
def unpaced_server(bundles, tmp_path_factory):
    """A server that sends every token as it comes (no message floor): a 60-token stream of the
    tiny model is over within one 16 ms interval, and its last message would carry all of it."""
    srv = start_server(bundles["char"], tmp_path_factory.mktemp("unpaced") / "server.log",
                       "--min-message-interval-ms", "0")
    yield srv
    srv.stop()


def test_state_every_messages_end_at_their_state(unpaced_server):
    """Each message with a state ends exactly there: continuing from it gives the rest of the stream.
    States are checkpoints for a reader that keeps up: what a late read finds already finished
    comes as one message without them, and a short stream of the tiny model can end within one
    stall of a busy CI machine (60 tokens did, once). So the stream is long, and read again if a
    stall still swallowed it."""
    params = dict(temperature=0.8, top_p=0.9, seed=11)
    n = 200
    with Client(unpaced_server.target) as c:
        full = c.generate("First", max_new_tokens=n, **params)
        for _ in range(3):
            chunks = list(c.generate_stream("First", max_new_tokens=n, state_every=7, **params))
            assert "".join(ch.text for ch in chunks) == full.text
            done, states = 0, []
            for i, ch in enumerate(chunks):
                done += ch.token_count
                if ch.state is not None:
                    assert done % 7 == 0
                    states.append((done, len("".join(x.text for x in chunks[: i + 1])), ch.state))
            if states:
                break
        assert states and chunks[-1].state is None  # no return_state: the last message has none
        for done, n_chars, st in states:
            rest = c.generate("", state=st, max_new_tokens=n - done, **params)
            assert full.text[:n_chars] + rest.text == full.text


def test_a_different_seed_starts_a_fresh_generator(char_server):
    with Client(char_server.target) as c:
        a = c.generate("First", max_new_tokens=5, temperature=1.0, seed=1, return_state=True)
        same = c.generate("", state=a.state, max_new_tokens=30, temperature=1.0)
        other = c.generate("", state=a.state, max_new_tokens=30, temperature=1.0, seed=2)
        assert same.seed == 1 and other.seed == 2
        assert same.text != other.text


# -- bad blobs -------------------------------------------------------------------------------------
def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(Exception) as e:
        fn()
    return e.value.code, str(e.value)


def test_bad_states_get_their_status_and_the_server_goes_on(char_server, word_server):
    with Client(char_server.target) as c, Client(word_server.target) as w:
        good = c.generate("First", max_new_tokens=5, return_state=True, seed=3).state
        foreign = w.generate("the", max_new_tokens=3, return_state=True).state
        nan = bytearray(good)
        nan[-4:] = b"\x00\x00\xc0\x7f"  # a float32 NaN in the last tensor value
        cases = {
            "foreign": (foreign, grpc.StatusCode.FAILED_PRECONDITION, "made by model"),
            "truncated": (good[:-5], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
            "extended": (good + b"\0\0\0\0", grpc.StatusCode.INVALID_ARGUMENT, "truncated or extended"),
            "garbage": (b"\x00" * 64, grpc.StatusCode.INVALID_ARGUMENT, "not an lstmgen state"),
            "non-finite": (bytes(nan), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
            "oversized": (good + b"\0" * 70_000, grpc.StatusCode.INVALID_ARGUMENT, "at most"),
            "header": (good.replace(b'"token":', b'"tokeN":', 1), grpc.StatusCode.INVALID_ARGUMENT, "not a token id"),
        }
        for name, (blob, code, words) in cases.items():
            got, msg = _code(lambda: c.generate("", state=blob, max_new_tokens=5))
            assert got == code, name
            assert "state:" in msg and words in msg, (name, msg)
        with pytest.raises(FailedPreconditionError):
            c.generate("", state=foreign)
        with pytest.raises(InvalidArgumentError, match="state_every"):
            c.generate("x", state_every=10**6)
        assert c.generate("", state=good, max_new_tokens=5).text  # still serving
    log = char_server.log.read_text()
    assert "Traceback" not in log


# -- replicas sharing a --state-key ------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(bundles, tmp_path_factory):
    d = tmp_path_factory.mktemp("keyed")
    (d / "key").write_text("a shared secret of the replicas\n")
    (d / "other").write_text("another secret, another cluster\n")
    servers = [start_server(bundles["char"], d / f"{i}.log", "--state-key", str(d / key))
               for i, key in enumerate(("key", "key", "other"))]
    yield servers
    for s in servers:
        s.stop()


def test_split_across_replicas(keyed, char_server):
    a, b, _ = keyed
    with Client(a.target) as ca, Client(b.target) as cb:
        assert ca.model_info().state_signed
        for seed, settings in enumerate(SETTINGS):
            split_equals_unsplit(ca, cb, "First Citizen:", 20, 20, seed=seed, **settings)
    with Client(char_server.target) as plain, Client(a.target) as ca:
        assert not plain.model_info().state_signed
        # the same model without a key: unsigned blobs are refused by a keyed server and vice versa
        unsigned = plain.generate("First", max_new_tokens=4, return_state=True).state
        assert "not signed" in _code(lambda: ca.generate("", state=unsigned))[1]
        signed = ca.generate("First", max_new_tokens=4, return_state=True).state
        assert "no --state-key" in _code(lambda: plain.generate("", state=signed))[1]


def test_tampered_or_foreign_key_blob_is_refused(keyed):
    a, _, other = keyed
    with Client(a.target) as ca, Client(other.target) as co:
        blob = ca.generate("First", max_new_tokens=4, return_state=True).state
        for i in (12, len(blob) // 2, len(blob) - 40):
            bad = blob[:i] + bytes([blob[i] ^ 0x20]) + blob[i + 1:]
            code, msg = _code(lambda: ca.generate("", state=bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature" in msg
        code, msg = _code(lambda: co.generate("", state=blob))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature" in msg


def test_state_key_file_errors(bundles, tmp_path):
    import subprocess
    import sys
    (tmp_path / "short").write_text("short")
    for key, words in ((tmp_path / "short", "at least 16"), (tmp_path / "missing", "cannot read")):
        r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bundles["char"]), "--port", "0",
                            "--host", "127.0.0.1", "--state-key", str(key)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr and str(key) in r.stderr and "Traceback" not in r.stderr


def test_cli_state_out_and_in(char_server, tmp_path):
    """`lstmgen generate --state-out F`, then `--state-in F` (no prompt): the two halves make the whole."""
    import json
    import subprocess
    import sys

    def gen(*args: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "generate", "--server", char_server.target, "--json",
                            "--seed", "9", "--temperature", "0.8", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    state = tmp_path / "s.bin"
    full = gen("--prompt", "First", "--max-new-tokens", "50")
    first = gen("--prompt", "First", "--max-new-tokens", "20", "--state-out", str(state))
    assert state.stat().st_size > 0
    rest = gen("--state-in", str(state), "--max-new-tokens", "30")
    assert first["text"] + rest["text"] == full["text"]
    bad = subprocess.run([sys.executable, "-m", "lstmgen.cli", "generate", "--server", char_server.target,
                          "--state-in", str(tmp_path / "missing.bin")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "missing.bin" in bad.stderr and "Traceback" not in bad.stderr


def test_a_gru_model_serves_and_hands_off_its_single_state_tensor(bundles, char_server, tmp_path):
    """The server takes the state layout from the manifest: a GRU's state is h alone."""
    srv = start_server(bundles["gru"], tmp_path / "gru.log", "--prefix-cache-every", "4")
    try:
        with Client(srv.target) as c:
            info = c.model_info()
            assert info.cell == "gru" and info.kind == "text"
            lstm = Client(char_server.target).model_info()  # the same sizes with (h, c)
            assert lstm.state_bytes - info.state_bytes >= info.num_layers * info.hidden_size * 4  # h alone
            for seed, settings in enumerate(SETTINGS[:3]):
                split_equals_unsplit(c, c, "First Citizen:", 12, 15, seed=seed, **settings)
            turn = c.generate("First", max_new_tokens=6, greedy=True, return_state=True)
            more = c.generate(" Citizen", state=turn.state, max_new_tokens=6, greedy=True)
            assert more.text == c.generate("First" + turn.text + " Citizen", max_new_tokens=6, greedy=True).text
    finally:
        srv.stop()
    assert "Traceback" not in (tmp_path / "gru.log").read_text()


def test_conversation_turns_after_a_stop_sequence_do_not_repeat_it(char_server):
    """A reply that ended on its stop sequence has read it: the next turn, written in full, sends only
    the rest, and the model's context equals one text with each piece once."""
    stops = ["e", "t", "a", "o"]
    with Client(char_server.target) as c:
        for seed in range(6):
            conv = Conversation(c, max_new_tokens=30, temperature=1.0, seed=seed, stop=stops)
            r1 = conv.say("First")
            if r1.finish_reason != "stop_sequence":
                continue
            stop = r1.finished.stop_sequence
            r2 = conv.say(stop + " Citizen:", greedy=True, stop=[])
            fresh = c.generate("First" + r1.text + stop + " Citizen:", greedy=True, max_new_tokens=30)
            assert r2.text == fresh.text
            return
    raise AssertionError("no first turn ended on a stop sequence; the test proves nothing")
