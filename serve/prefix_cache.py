"""A bounded cache of LSTM states after prompt prefixes, so a prompt that starts like an earlier one
skips prefill the part they share.

An LSTM's whole memory after reading tokens t[0:n] is its state (today (h, c), each [L, H]; the
cache takes any tuple of arrays). States are kept only at checkpoints, multiples of `every` tokens,
and a lookup never covers a prompt's last token: that token must still be fed to produce logits.

Keys. key(n) = blake2b-128(blake2b(namespace) || int64 bytes of ids[:n]), computed with one running
hasher copied at each block end, so a lookup for a 1,000-token prompt hashes each token once and no
key holds the token list. The namespace (the model's sha256) binds keys to the model. With 128-bit
digests, a collision among even 10^9 entries has odds about 10^18 / 2^129 ~ 1.5e-21: negligible.

Memory. Least recently used entries go first once `budget_bytes` would be exceeded; an entry's
bytes are its arrays' nbytes plus ENTRY_OVERHEAD + ARRAY_OVERHEAD per array, the Python objects
around them (key, tuples, array headers, dict node: ~410 B for one array, ~490 B for two, ~765 B
for four, measured with tracemalloc on CPython 3.11).

Threads. The scheduler's worker thread owns the cache and alone calls lookup/store; `stats()` may be
read from another thread (metrics scrape): it reads plain ints, each atomically under the GIL, into
a frozen snapshot (fields may come from adjacent moments, never torn values).
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ENTRY_OVERHEAD = 256  # bytes counted per entry besides its arrays' data (see the module doc)
ARRAY_OVERHEAD = 128  # ... and per array in it

State = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class PrefixCacheStats:
    hits: int  # lookups that found a cached prefix
    misses: int  # lookups that found none (every lookup counts while the cache is on)
    tokens_saved: int  # prompt tokens not prefilled thanks to hits
    bytes_held: int  # entries' bytes, overheads included; never above the budget
    entries: int
    evictions: int  # entries dropped to make room


def entry_bytes(state: State) -> int:
    """What an entry holding `state` counts against the budget."""
    return ENTRY_OVERHEAD + sum(ARRAY_OVERHEAD + x.nbytes for x in state)


def _token_bytes(ids: Sequence[int], n: int) -> bytes:
    """ids[:n] as little-endian int64 bytes; a list and an array of the same ids give the same bytes."""
    if isinstance(ids, np.ndarray):
        return np.ascontiguousarray(ids[:n], dtype="<i8").tobytes()
    return struct.pack(f"<{n}q", *ids[:n])  # 8 us for 960 ints: half of array.array's, a third of numpy's


class PrefixCache:
    """LRU cache of states after prompt prefixes of length k * every. budget_bytes=0 turns it off."""

    def __init__(self, budget_bytes: int, every: int = 64, namespace: bytes = b""):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.budget_bytes, self.every = budget_bytes, every
        self._root = hashlib.blake2b(namespace).digest()  # fixed length: no namespace/ids ambiguity
        self._entries: OrderedDict[bytes, tuple[State, int]] = OrderedDict()  # key -> (state, bytes); LRU first
        self._bytes = self._hits = self._misses = self._saved = self._evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    # -- chunk planning --------------------------------------------------------------------------
    def boundaries(self, start: int, n: int) -> range:
        """Checkpoints p with start < p <= n - 1 for a prompt of n tokens prefilled up to `start`,
        in order (the first is the next one); empty when the cache is off."""
        if not self.enabled:
            return range(0)
        return range((start // self.every + 1) * self.every, n, self.every)

    # -- the worker thread -----------------------------------------------------------------------
    def _keys(self, ids: Sequence[int], blocks: int) -> list[bytes]:
        """keys[j] identifies ids[: (j + 1) * every]; one running hash, copied at each block end."""
        data = memoryview(_token_bytes(ids, blocks * self.every))
        step = 8 * self.every
        h = hashlib.blake2b(self._root, digest_size=16)
        keys = []
        for a in range(0, blocks * step, step):
            h.update(data[a : a + step])
            keys.append(h.copy().digest())
        return keys

    def _key(self, ids: Sequence[int], n: int) -> bytes:
        """The key of ids[:n] alone: the same running hash, without the copies at block ends."""
        return hashlib.blake2b(self._root + _token_bytes(ids, n), digest_size=16).digest()

    def lookup(self, ids: Sequence[int]) -> tuple[int, State | None]:
        """Longest cached prefix of ids[: len(ids) - 1] (the last prompt token must still be fed so
        that it produces logits): (n_tokens, state), or (0, None). The state's arrays are the cache's
        own, read-only: copy them into the batch (assigning into a batch array does). Counts a hit
        or a miss and marks the entry recently used. Off: (0, None), nothing counted."""
        if not self.enabled:
            return 0, None
        blocks = (len(ids) - 1) // self.every
        if blocks > 0 and self._entries:
            for j, key in zip(range(blocks, 0, -1), reversed(self._keys(ids, blocks))):
                hit = self._entries.get(key)
                if hit is not None:  # longest first: shorter ones may have been evicted
                    self._entries.move_to_end(key)
                    self._hits += 1
                    self._saved += j * self.every
                    return j * self.every, hit[0]
        self._misses += 1
        return 0, None

    def store(self, ids: Sequence[int], n: int, state: State) -> None:
        """Keep the state after ids[:n] (n a positive multiple of every, n <= len(ids)). The arrays
        are copied (callers pass views into a batch). Evicts least recently used entries to stay
        within the budget; an entry bigger than the whole budget is not stored. Storing a key
        already held only marks it recently used (same model, same tokens: same state)."""
        if not self.enabled:
            return
        if n <= 0 or n % self.every or n > len(ids):
            raise ValueError(f"n must be a positive multiple of {self.every} and <= {len(ids)}, got {n}")
        key = self._key(ids, n)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = entry_bytes(state)
        if size > self.budget_bytes:
            return
        while self._bytes + size > self.budget_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self._bytes -= freed
            self._evictions += 1
        kept = tuple(np.array(x, copy=True, order="C") for x in state)
        for x in kept:
            x.flags.writeable = False  # lookups hand these out without copying
        self._entries[key] = (kept, size)
        self._bytes += size

    def clear(self) -> None:
        """Drop every entry (not counted as evictions), e.g. when the model changes."""
        self._entries.clear()
        self._bytes = 0

    # -- any thread ------------------------------------------------------------------------------
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._hits, self._misses, self._saved, self._bytes, len(self._entries),
                                self._evictions)
