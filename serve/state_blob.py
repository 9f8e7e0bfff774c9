"""The portable generation state: everything the next token depends on, as bytes a client keeps.

An LSTM's memory of a text is its state tensors, a few kilobytes, so a server can hand it to the
client and forget it; any replica continues from it. Exact continuation needs more than (h, c):
the last sampled token (sampled, not yet fed to the model), the request's random generator where
it stopped, the text the stop matcher still holds back, and the penalty history when there is one.

Layout (integers little-endian):
    b"LGST" | version u8 | flags u8 (bit 0: signed) | header length u32 | header (UTF-8 JSON)
    | tensor data (float32, C order, in the header's order) | HMAC-SHA256 (32 bytes, when signed)
The header names the model by its sha256, so a state never silently runs on another model. With a
key, the MAC is checked before the header is parsed (only the fixed prefix is read first).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstmgen.errors import UsageError
from lstmgen.serve.errors import InvalidRequest, WrongModel

MAGIC = b"LGST"
VERSION = 1
_PREFIX = struct.Struct("<4sBBI")  # magic, version, flags, header length
_SIGNED = 1
_MAC = 32
MAX_PENDING_CHARS = 1024  # held-back text is shorter than the longest stop sequence
MIN_KEY_BYTES = 16
FIELD = "state"


@dataclass(frozen=True)
class GenerationState:
    tensors: tuple[np.ndarray, ...]  # the model's state for one row, each float32 [L, H] (h, c; a GRU's h)
    token: int  # the last sampled token: the model has not read it yet
    seed: int  # the seed the request's generator started from (Finished.seed)
    rng: tuple[int, int, int, int]  # numpy PCG64 position: state, inc, has_uint32, uinteger
    pending: str = ""  # generated text the stop matcher holds back (not sent yet)
    history: tuple[tuple[int, ...], tuple[float, ...]] | None = None  # penalty history: ids, counts


def rng_position(rng: np.random.Generator) -> tuple[int, int, int, int]:
    st = rng.bit_generator.state
    return st["state"]["state"], st["state"]["inc"], st["has_uint32"], st["uinteger"]


def rng_at(position: tuple[int, int, int, int]) -> np.random.Generator:
    bg = np.random.PCG64()
    state, inc, has_uint32, uinteger = position
    bg.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                "has_uint32": has_uint32, "uinteger": uinteger}
    return np.random.Generator(bg)


def read_state_key(path: str | Path) -> bytes:
    """The replicas' shared secret (--state-key FILE): its bytes, surrounding whitespace removed."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise UsageError(f"--state-key {path}: cannot read it: {e.strerror or e}") from e
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"--state-key {path}: holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
                         "(e.g. `head -c 32 /dev/urandom | base64 > FILE`)")
    return key


def codec_for(manifest, key: bytes | None = None) -> "StateCodec":
    """The codec of a bundle's model, whose state tensors the manifest names."""
    vocab = manifest.vocab  # end of text ends a generation and is never held back: not its character
    chars = "".join(vocab.piece(i) for i in range(len(vocab)) if i != vocab.eot_id) if vocab is not None else ""
    return StateCodec(manifest.model_sha256, state_layout(manifest), manifest.vocab_size, key,
                      frames=manifest.kind == "frames", text_chars=chars)


def state_layout(manifest) -> tuple[tuple[str, tuple[int, int]], ...]:
    """(name, one row's [L, H]) per state tensor, as the manifest describes them."""
    return tuple((t.name, tuple(t.shape)) for t in manifest.state_tensors)


class StateCodec:
    """Encodes and checks the states of one model. Decoding never trusts the blob: every field is
    checked, and a failure names what was wrong."""

    def __init__(self, model_sha256: str, tensors: tuple[tuple[str, tuple[int, int]], ...], vocab_size: int,
                 key: bytes | None = None, *, frames: bool = False, text_chars: str = ""):
        """`frames`: a frame model's codec (state_bytes is then a frame stream's); `text_chars`: the
        characters the model's tokens write, which bound what held-back text costs in the header."""
        self.model_sha256 = model_sha256
        self.tensors = tensors  # (name, one row's shape [L, H]) per state tensor, in the graph's order
        self.vocab_size = vocab_size
        self.key = key
        self.frames = frames
        self._sizes = [int(np.prod(shape)) for _, shape in tensors]
        self._tensor_bytes = 4 * sum(self._sizes)
        # the header with a full penalty history (every token id and a count) still fits
        self.max_bytes = self._tensor_bytes + 64 * 1024 + 24 * vocab_size
        # Held-back text in the header: the widest of the model's characters (JSON escapes and UTF-8),
        # or of any character (a control character's \u00XX) when they are not known.
        self._widest_char = max(set(text_chars) or {"\x00"}, key=lambda ch: len(_json(ch)))

    @property
    def state_bytes(self) -> int:
        """state_bytes_bound() with no held-back text (a frame model's codec: its frame streams' bound)."""
        return self.state_bytes_bound()

    def state_bytes_bound(self, held_chars: int = 0) -> int:
        """The largest blob this codec writes without a penalty history (ModelInfo.state_bytes): every
        header field at its widest, the held-back text `held_chars` of the widest character (a server's
        longest stop sequence less one: the matcher never holds more). A frame model's codec: the largest
        frame stream state (a frame count of 19 digits)."""
        zeros = tuple(np.zeros(shape, np.float32) for _, shape in self.tensors)
        if self.frames:
            return len(self.encode_frames(zeros, 2**63 - 1))
        rng = (2**128 - 1, 2**128 - 1, 1, 2**32 - 1)  # PCG64's state and increment are 128-bit
        widest = GenerationState(zeros, max(self.vocab_size - 1, 0), 2**64 - 1, rng, self._widest_char * held_chars)
        return len(self.encode(widest))

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, st: GenerationState) -> bytes:
        header = {"model": self.model_sha256, "tensors": self._described(),
                  "token": st.token, "seed": st.seed, "rng": [str(v) for v in st.rng], "pending": st.pending}
        if st.history is not None:
            header["history"] = [list(st.history[0]), list(st.history[1])]
        return self._pack(header, st.tensors)

    def encode_frames(self, tensors: tuple[np.ndarray, ...], frames: int) -> bytes:
        """A frame stream's state: its tensors after `frames` frames (nothing else decides its next output)."""
        return self._pack({"model": self.model_sha256, "tensors": self._described(), "frames": frames}, tensors)

    def _pack(self, header: dict, tensors) -> bytes:
        head = _json(header)
        body = b"".join([_PREFIX.pack(MAGIC, VERSION, _SIGNED if self.key else 0, len(head)), head,
                         *(np.ascontiguousarray(t, dtype="<f4").tobytes() for t in tensors)])
        return body + self._mac(body) if self.key else body

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, blob: bytes) -> GenerationState:
        header, data = self._open(blob)
        if "frames" in header:
            raise _bad("is a frame stream's state, not a text generation's")
        return self._fields(header, data)

    def decode_frames(self, blob: bytes) -> tuple[tuple[np.ndarray, ...], int]:
        """A frame stream's state blob -> (its tensors, the frames it has read)."""
        header, data = self._open(blob)
        tensors = self._tensors(header, data)
        frames = header.get("frames")
        if not _int_in(frames, 0, 2**63 - 1):
            raise _bad("is not a frame stream's state (no frame count)")
        return tensors, frames

    def _open(self, blob: bytes) -> tuple[dict, bytes]:
        """The checked prefix and signature; the header (a dict) and the tensor bytes."""
        if len(blob) > self.max_bytes:
            raise _bad(f"is {len(blob):,} bytes; this model's states are at most {self.max_bytes:,}")
        if len(blob) < _PREFIX.size or blob[:4] != MAGIC:
            raise _bad("is not an lstmgen state (it must be the bytes a server returned, unchanged)")
        _, version, flags, head_len = _PREFIX.unpack_from(blob)
        if version != VERSION:
            raise _bad(f"has format version {version}; this server reads version {VERSION}")
        if flags & ~_SIGNED:
            raise _bad(f"has unknown flags {flags:#x}")
        body = blob
        if self.key is not None:
            if not flags & _SIGNED:
                raise _bad("is not signed; this server only accepts states signed with its --state-key")
            body, mac = blob[:-_MAC], blob[-_MAC:]
            if len(blob) < _PREFIX.size + _MAC or not hmac.compare_digest(mac, self._mac(body)):
                raise _bad("signature does not match: the state was altered, truncated, or signed with "
                           "another --state-key")
        elif flags & _SIGNED:
            raise _bad("is signed, but this server has no --state-key to check it (start it with the "
                       "key of the server that made the state)")
        if _PREFIX.size + head_len > len(body):
            raise _bad(f"is {len(body):,} bytes, shorter than its {head_len:,}-byte header: truncated")
        try:  # untrusted without a key: no NaN/Infinity, and deep nesting or huge numbers are refused, not raised
            header = json.loads(body[_PREFIX.size:_PREFIX.size + head_len].decode(), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _bad(f"header is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
        if not isinstance(header, dict):
            raise _bad("header is not a JSON object")
        return header, body[_PREFIX.size + head_len:]

    def _tensors(self, h: dict, data: bytes) -> tuple[np.ndarray, ...]:
        """The model binding and the tensors: this model's names and shapes, finite values."""
        model = h.get("model")
        if model != self.model_sha256:
            shown = model[:16] + "..." if isinstance(model, str) else repr(model)
            raise WrongModel(FIELD, f"was made by model {shown}; this server serves {self.model_sha256[:16]}...")
        want = self._described()
        if h.get("tensors") != want:
            raise _bad(f"tensors {h.get('tensors')!r:.120} differ from this model's {want}")
        if len(data) != self._tensor_bytes:
            raise _bad(f"holds {len(data):,} bytes of tensor data where this model's state has "
                       f"{self._tensor_bytes:,}: truncated or extended")
        flat = np.frombuffer(data, dtype="<f4").astype(np.float32)  # copy: the blob's bytes are read-only
        if not np.isfinite(flat).all():
            raise _bad("holds non-finite values (NaN or infinity)")
        ends = np.cumsum([0, *self._sizes])
        return tuple(flat[a:b].reshape(shape) for a, b, (_, shape) in zip(ends[:-1], ends[1:], self.tensors))

    def _fields(self, h: dict, data: bytes) -> GenerationState:
        tensors = self._tensors(h, data)
        token, seed = h.get("token"), h.get("seed")
        if not _int_in(token, 0, self.vocab_size - 1):
            raise _bad(f"token {token!r:.40} is not a token id of this model (0..{self.vocab_size - 1})")
        if not _int_in(seed, 0, 2**64 - 1):
            raise _bad(f"seed {seed!r:.40} is not in 0..2^64-1")
        rng = h.get("rng")
        try:  # decimal strings as encode writes them (128-bit values do not fit a JSON number)
            if not (isinstance(rng, list) and len(rng) == 4 and all(isinstance(v, str) and len(v) <= 40 for v in rng)):
                raise ValueError
            state, inc, has_uint32, uinteger = (int(v) for v in rng)
        except ValueError:
            raise _bad("random generator position is malformed") from None
        if not (0 <= state < 2**128 and 0 <= inc < 2**128 and inc % 2 == 1 and has_uint32 in (0, 1)
                and 0 <= uinteger < 2**32):
            raise _bad("random generator position is out of range")
        pending = h.get("pending", "")
        if not isinstance(pending, str) or len(pending) > MAX_PENDING_CHARS or not _utf8(pending):
            raise _bad(f"held-back text must be a valid string of at most {MAX_PENDING_CHARS} characters")
        history = self._history(h.get("history"))
        return GenerationState(tensors, token, seed, (state, inc, has_uint32, uinteger), pending, history)

    def _described(self) -> list:
        return [[name, list(shape)] for name, shape in self.tensors]

    def _history(self, raw) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        if raw is None:
            return None
        ok = isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, list) for x in raw) \
            and len(raw[0]) == len(raw[1]) <= self.vocab_size
        if ok:
            ids, counts = raw
            ok = (all(_int_in(t, 0, self.vocab_size - 1) for t in ids) and len(set(ids)) == len(ids)
                  and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c < 2**53
                          for c in counts))  # a bound, not isfinite: a 400-digit int overflows a float
        if not ok:
            raise _bad("penalty history is malformed (distinct token ids of this model, counts >= 0)")
        return tuple(ids), tuple(float(c) for c in counts)


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate would fail only when the response is written
        return True
    except UnicodeEncodeError:
        return False


def _int_in(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(FIELD, message)
