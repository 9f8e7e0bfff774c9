"""The state blob decoder trusts nothing: every way a blob can be wrong has its own status and message."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from lstmgen.serve.errors import InvalidRequest, WrongModel
from lstmgen.serve.state_blob import GenerationState, StateCodec, rng_at, rng_position

SHA = "ab" * 32
L, H, V = 2, 8, 50


def codec(key: bytes | None = None, sha: str = SHA, shape=(L, H)) -> StateCodec:
    return StateCodec(sha, (("h", shape), ("c", shape)), V, key)


def state(history=None) -> GenerationState:
    rng = np.random.Generator(np.random.PCG64(123))
    rng.random()
    r = np.random.default_rng(0)
    return GenerationState((r.standard_normal((L, H)).astype(np.float32), r.standard_normal((L, H)).astype(np.float32)),
                           token=7, seed=123, rng=rng_position(rng), pending="ab", history=history)


def parts(blob: bytes) -> tuple[dict, int]:
    head_len = struct.unpack_from("<I", blob, 6)[0]
    return json.loads(blob[10:10 + head_len]), head_len


def rebuild(blob: bytes, header: dict) -> bytes:
    """A blob with another header (what a client editing the bytes would send)."""
    _, head_len = parts(blob)
    head = json.dumps(header).encode()
    return blob[:6] + struct.pack("<I", len(head)) + head + blob[10 + head_len:]


@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_round_trip(key):
    c, st = codec(key), state(history=((1, 7, 9), (0.0, 2.0, 1.0)))
    back = c.decode(c.encode(st))
    for a, b in zip(back.tensors, st.tensors):
        np.testing.assert_array_equal(a, b)
    assert (back.token, back.seed, back.rng, back.pending, back.history) == \
        (st.token, st.seed, st.rng, st.pending, st.history)


def test_generator_position_survives():
    rng = np.random.Generator(np.random.PCG64(5))
    rng.random()
    again = rng_at(rng_position(rng))
    assert [again.random() for _ in range(5)] == [rng.random() for _ in range(5)]


def refused(c: StateCodec, blob: bytes, cls=InvalidRequest) -> str:
    with pytest.raises(cls) as e:
        c.decode(blob)
    assert type(e.value) is cls
    assert str(e.value).startswith("state: ")
    return str(e.value)


def test_another_model_is_a_failed_precondition():
    blob = codec(sha="cd" * 32).encode(state())
    assert "made by model cdcdcdcd" in refused(codec(), blob, WrongModel)


def test_truncated_extended_and_garbage():
    c = codec()
    blob = c.encode(state())
    assert "truncated" in refused(c, blob[:-1])
    assert "truncated" in refused(c, blob + b"\0")
    assert "not an lstmgen state" in refused(c, b"hello")
    assert "not an lstmgen state" in refused(c, b"")
    assert "not valid JSON" in refused(c, blob[:10] + b"{" * parts(blob)[1] + blob[10 + parts(blob)[1]:])


def test_version_flags_and_size():
    c = codec()
    blob = c.encode(state())
    assert "format version 9" in refused(c, blob[:4] + b"\x09" + blob[5:])
    assert "unknown flags" in refused(c, blob[:5] + b"\x04" + blob[6:])
    assert "at most" in refused(c, blob + b"\0" * c.max_bytes)


def test_wrong_shapes():
    blob = codec(shape=(L, H * 2)).encode(GenerationState((np.zeros((L, 2 * H), np.float32),) * 2, 1, 1, (0, 1, 0, 0)))
    assert "differ from this model's" in refused(codec(), blob)


def test_non_finite_values():
    c = codec()
    st = state()
    for bad in (np.nan, np.inf, -np.inf):
        h = st.tensors[0].copy()
        h[1, 3] = bad
        assert "non-finite" in refused(c, c.encode(GenerationState((h, st.tensors[1]), 7, 123, st.rng)))


@pytest.mark.parametrize("field, value, words", [
    ("token", V, "not a token id"), ("token", -1, "not a token id"), ("token", "7", "not a token id"),
    ("token", True, "not a token id"), ("seed", 2**64, "seed"), ("rng", ["1", "2", "0", "0"], "out of range"),
    ("rng", "xyz", "malformed"), ("rng", ["1", str(2**128 + 1), "0", "0"], "out of range"),
    ("pending", 5, "held-back"), ("pending", "x" * 5000, "held-back"),
    ("history", [[1, 1], [0, 0]], "history"), ("history", [[V], [1]], "history"), ("history", [[1], [-1]], "history"),
    ("history", [[1], ["NaN"]], "history"), ("history", "x", "history"), ("model", None, "made by model"),
])
def test_every_header_field_is_checked(field, value, words):
    c = codec()
    blob = c.encode(state())
    header, _ = parts(blob)
    header[field] = value
    cls = WrongModel if field == "model" else InvalidRequest
    assert words in refused(c, rebuild(blob, header), cls)


def test_signed_blobs():
    keyed, other, plain = codec(b"k" * 32), codec(b"x" * 32), codec()
    blob = keyed.encode(state())
    assert keyed.decode(blob).token == 7
    for i in (0, 8, 20, len(blob) // 2, len(blob) - 40, len(blob) - 1):  # any byte changed
        bad = blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:]
        refused(keyed, bad)
    assert "signature does not match" in refused(keyed, blob[:-1])
    assert "signature does not match" in refused(other, blob)
    assert "not signed" in refused(keyed, plain.encode(state()))
    assert "no --state-key" in refused(plain, blob)


def test_unsigned_tensor_edit_is_accepted_but_header_edits_are_checked():
    """Without a key the blob is validated, not authenticated: a client may change the numbers (and
    gets what it asked for), never the structure."""
    c = codec()
    blob = bytearray(c.encode(state()))
    blob[-3] ^= 1
    assert c.decode(bytes(blob)).token == 7


def test_state_bytes_bounds_every_state_without_history():
    """ModelInfo.state_bytes: every header field at its widest (the largest of each, not a sum of
    guesses), held-back text included; the bound is reached, so it is tight."""
    c = codec()
    widest = GenerationState((np.zeros((L, H), np.float32),) * 2, V - 1, 2**64 - 1,
                             (2**128 - 1, 2**128 - 1, 1, 2**32 - 1), "\x01" * 5)  # \u0001: 6 bytes each in JSON
    assert c.state_bytes_bound(5) == len(c.encode(widest)) == c.state_bytes + 5 * 6
    assert len(c.encode(state())) <= c.state_bytes_bound(2)  # pending "ab"
    assert c.state_bytes < 2 * L * H * 4 + 400
    frames = StateCodec(SHA, (("h", (L, H)),), 0, frames=True)
    assert frames.state_bytes == len(frames.encode_frames((np.zeros((L, H), np.float32),), 2**63 - 1))


@pytest.mark.parametrize("header_text, words", [
    ('{"a":' * 1000 + "1" + "}" * 1000, "not valid JSON"),  # nesting past Python's recursion limit
    ('{"model": ' + "9" * 5000 + "}", "not valid JSON"),  # past int's digit limit
    ('{"model": NaN}', "not valid JSON"),
])
def test_hostile_headers_are_refused_not_raised(header_text, words):
    c = codec()
    blob = c.encode(state())
    assert words in refused(c, rebuild(blob, {}).replace(b"{}", header_text.encode(), 1)
                            [:6] + struct.pack("<I", len(header_text)) + header_text.encode() + blob[10 + parts(blob)[1]:])


@pytest.mark.parametrize("field, value, words", [
    ("rng", [1e309, 1, 0, 0], "not valid JSON"),  # json writes Infinity
    ("rng", ["1" * 5000, "1", "0", "0"], "malformed"),
    ("history", [[1], [10**400]], "history"), ("pending", "\ud800", "held-back"),
])
def test_hostile_field_values(field, value, words):
    c = codec()
    blob = c.encode(state())
    header, _ = parts(blob)
    header[field] = value
    head = json.dumps(header).encode()  # json writes a lone surrogate as an escape, as an attacker would
    assert words in refused(c, blob[:6] + struct.pack("<I", len(head)) + head + blob[10 + parts(blob)[1]:])
