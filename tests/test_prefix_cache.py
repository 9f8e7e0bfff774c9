"""The prefix-state cache (serve/prefix_cache.py) and its metrics, on plain arrays: no model needed."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lstmgen.serve.metrics import WeightedHistogram, _SchedulerCollector
from lstmgen.serve.prefix_cache import (ARRAY_OVERHEAD, ENTRY_OVERHEAD, PrefixCache, PrefixCacheStats,
                                        entry_bytes)
from lstmgen.serve.records import Stats

L, H = 2, 8
ENTRY = ENTRY_OVERHEAD + 2 * (ARRAY_OVERHEAD + L * H * 4)  # one (h, c) entry, float32 [L, H] each


def state(seed: float) -> tuple[np.ndarray, np.ndarray]:
    h = np.full((L, H), seed, np.float32) + np.arange(L * H, dtype=np.float32).reshape(L, H)  # [L, H]
    return h, -h


def same(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def test_entry_bytes_counts_data_and_overhead():
    assert entry_bytes(state(0)) == ENTRY == 256 + 2 * (128 + 64)


def test_hit_returns_the_stored_arrays_as_copies():
    cache = PrefixCache(1 << 20, every=4)
    ids = list(range(10))
    batch_h = np.zeros((L, 3, H), np.float32)  # [L, B, H]: the caller passes views of one row
    batch_c = np.ones((L, 3, H), np.float32)
    batch_h[:, 1], batch_c[:, 1] = state(7)
    cache.store(ids, 8, (batch_h[:, 1], batch_c[:, 1]))
    batch_h[:] = 99  # the batch moves on: the cached state must not
    batch_c[:] = 99
    n, got = cache.lookup(ids)
    assert n == 8 and same(got, state(7))
    assert not any(np.shares_memory(g, b) for g in got for b in (batch_h, batch_c))
    assert all(g.flags.c_contiguous and not g.flags.writeable for g in got)
    with pytest.raises(ValueError):
        got[0][0, 0] = 1  # a caller cannot corrupt the cache through a hit


def test_longest_prefix_wins_and_shorter_ones_still_serve():
    cache = PrefixCache(1 << 20, every=4)
    ids = list(range(100, 120))
    for n in (4, 8, 12):
        cache.store(ids, n, state(n))
    n, got = cache.lookup(ids)
    assert n == 12 and same(got, state(12))
    n, got = cache.lookup(ids[:11] + [0, 0, 0, 0, 0])  # diverges inside the third block
    assert n == 8 and same(got, state(8))


def test_longest_found_even_when_shorter_ones_were_evicted():
    cache = PrefixCache(2 * ENTRY, every=2)
    ids = list(range(9))
    cache.store(ids, 2, state(2))
    cache.store(ids, 4, state(4))
    cache.store(ids, 8, state(8))  # evicts the entry at 2
    assert cache.lookup(ids[:3]) == (0, None)
    n, got = cache.lookup(ids)
    assert n == 8 and same(got, state(8))


@pytest.mark.parametrize("length, expect", [(8, 4), (9, 8), (12, 8), (13, 12), (4, 0), (1, 0), (0, 0)])
def test_the_last_prompt_token_is_never_covered(length, expect):
    cache = PrefixCache(1 << 20, every=4)
    ids = list(range(40))
    for n in (4, 8, 12):
        cache.store(ids, n, state(n))
    n, got = cache.lookup(ids[:length])
    assert n == expect and n < max(length, 1)
    assert (got is None) == (n == 0)


@pytest.mark.parametrize("pos", [0, 3, 4, 6, 7])
def test_a_changed_token_misses_from_its_block_on(pos):
    cache = PrefixCache(1 << 20, every=4)
    ids = list(range(50, 59))  # 9 tokens: checkpoints 4 and 8
    cache.store(ids, 4, state(4))
    cache.store(ids, 8, state(8))
    other = list(ids)
    other[pos] += 1
    n, _ = cache.lookup(other)
    assert n == (0 if pos < 4 else 4)


def test_token_values_are_not_truncated_or_reordered():
    cache = PrefixCache(1 << 20, every=2)
    cache.store([1, 2, 0], 2, state(1))
    for other in ([2, 1, 0], [1 + 2**32, 2, 0], [1 + 2**16, 2, 0], [258, 0, 0], [1, 2 + 2**40, 0]):
        assert cache.lookup(other) == (0, None), other
    assert cache.lookup([1, 2, 5])[0] == 2


def test_lists_and_arrays_of_the_same_ids_share_keys():
    cache = PrefixCache(1 << 20, every=4)
    ids = list(range(9))
    cache.store(np.asarray(ids, np.int32), 8, state(1))
    assert cache.lookup(ids)[0] == 8
    assert cache.lookup(np.asarray(ids, np.int64))[0] == 8
    assert cache.lookup([np.int64(i) for i in ids])[0] == 8


def test_store_key_equals_the_lookup_chain():
    cache = PrefixCache(1 << 20, every=3)
    ids = list(range(1000, 1013))
    chain = cache._keys(ids, 4)
    assert [cache._key(ids, 3 * (j + 1)) for j in range(4)] == chain and len(set(chain)) == 4
    assert all(len(k) == 16 for k in chain)


def test_namespace_separates_models():
    a, b = PrefixCache(1 << 20, every=4, namespace=b"model-a"), PrefixCache(1 << 20, every=4, namespace=b"model-b")
    ids = list(range(9))
    a.store(ids, 8, state(1))
    b._entries.update(a._entries)  # even sharing one store, keys of model a never match for model b
    assert b.lookup(ids) == (0, None)
    assert PrefixCache(1 << 20, every=4, namespace=b"model-a")._keys(ids, 2) == a._keys(ids, 2)
    assert a.lookup(ids)[0] == 8


def test_lru_eviction_order_and_budget():
    cache = PrefixCache(3 * ENTRY, every=1)
    prompts = [[k, k] for k in range(5)]  # distinct 2-token prompts, one checkpoint each (n=1)
    for p in prompts[:3]:
        cache.store(p, 1, state(p[0]))
    assert cache.stats().bytes_held == 3 * ENTRY
    assert cache.lookup(prompts[0])[0] == 1  # 0 is now the most recent: 1 goes first
    cache.store(prompts[3], 1, state(3))
    assert cache.lookup(prompts[1]) == (0, None)
    cache.store(prompts[2], 1, state(2))  # storing again refreshes: 0 goes next, not 2
    cache.store(prompts[4], 1, state(4))
    assert [cache.lookup(p)[0] for p in prompts] == [0, 0, 1, 1, 1]
    st = cache.stats()
    assert st.evictions == 2 and st.entries == 3 and st.bytes_held == 3 * ENTRY <= cache.budget_bytes


def test_budget_never_exceeded_with_mixed_sizes():
    rng = np.random.default_rng(0)
    budget = 10_000
    cache = PrefixCache(budget, every=1)
    held = 0
    for i in range(300):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 200)))
        st = (np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(shape[1], np.float64))
        cache.store([i, i], 1, st)
        s = cache.stats()
        assert s.bytes_held <= budget
        assert s.bytes_held == sum(size for _, size in cache._entries.values())
        held = max(held, s.bytes_held)
    assert held > budget // 2 and cache.stats().evictions > 0


def test_an_entry_bigger_than_the_budget_is_refused():
    cache = PrefixCache(ENTRY - 1, every=1)
    cache.store([1, 2], 1, state(0))
    assert cache.stats() == PrefixCacheStats(0, 0, 0, 0, 0, 0)
    assert cache.lookup([1, 2]) == (0, None)
    fits = PrefixCache(ENTRY, every=1)
    fits.store([1, 2], 1, state(0))
    fits.store([3, 4], 1, state(0))  # the second one evicts the first: never both
    assert fits.stats().entries == 1 and fits.stats().bytes_held == ENTRY and fits.stats().evictions == 1


def test_stats_count_hits_misses_saved_and_bytes():
    cache = PrefixCache(1 << 20, every=4)
    ids = list(range(13))
    cache.lookup(ids)  # empty cache: a miss
    cache.store(ids, 4, state(4))
    cache.store(ids, 12, state(12))
    cache.store(ids, 12, state(12))  # the same key: no second entry, no bytes
    cache.lookup(ids)  # 12
    cache.lookup(ids[:9])  # 4
    cache.lookup([7] * 13)  # miss
    cache.lookup([1])  # too short for any checkpoint: still a lookup that found nothing
    assert cache.stats() == PrefixCacheStats(hits=2, misses=3, tokens_saved=16, bytes_held=2 * ENTRY, entries=2,
                                             evictions=0)


def test_every_1_covers_all_but_the_last_token():
    cache = PrefixCache(1 << 20, every=1)
    ids = [5, 4, 3, 2, 1]
    for n in range(1, 6):
        cache.store(ids, n, state(n))
    assert cache.stats().entries == 5
    for length in range(1, 7):
        n, got = cache.lookup((ids + [0])[:length])
        assert n == min(length - 1, 5) and (got is None or same(got, state(n)))


def test_budget_zero_is_off():
    cache = PrefixCache(0, every=4)
    ids = list(range(20))
    cache.store(ids, 8, state(1))
    assert cache.lookup(ids) == (0, None)
    assert cache.stats() == PrefixCacheStats(0, 0, 0, 0, 0, 0)
    assert not cache.enabled and list(cache.boundaries(0, 20)) == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        PrefixCache(-1)
    with pytest.raises(ValueError):
        PrefixCache(100, every=0)
    cache = PrefixCache(1 << 20, every=4)
    for n in (0, 3, 12):  # not a positive multiple of every, or past the ids
        with pytest.raises(ValueError):
            cache.store(list(range(10)), n, state(0))


def test_boundaries():
    cache = PrefixCache(1 << 20, every=64)
    assert list(cache.boundaries(0, 1000)) == list(range(64, 961, 64))
    assert cache.boundaries(0, 1000)[0] == 64 and cache.boundaries(64, 1000)[0] == 128
    assert cache.boundaries(70, 1000)[0] == 128
    assert list(cache.boundaries(0, 64)) == [] and list(cache.boundaries(0, 65)) == [64]


def test_stats_read_from_another_thread_while_storing():
    cache = PrefixCache(20 * ENTRY, every=1)
    seen, done = [], threading.Event()

    def scrape():
        while not done.is_set():
            seen.append(cache.stats())

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for i in range(3000):
            cache.store([i, i], 1, state(i))
            cache.lookup([i, i])
    finally:
        done.set()
        t.join()
    assert seen and all(0 <= s.bytes_held <= cache.budget_bytes and s.entries <= 20 for s in seen)
    assert cache.stats().hits == 3000 and cache.stats().evictions == 2980


class _FakeScheduler:
    def __init__(self, prefix_cache):
        self.prefix_cache, self.in_system = prefix_cache, 0

    def stats(self) -> Stats:
        return Stats(active_rows=1, generating_rows=1, queued=0, steps=5, tokens_generated=5, prompt_tokens=3)


def scrape(scheduler) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(_SchedulerCollector(scheduler, WeightedHistogram((0.1, 1.0))))
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_collector_exports_the_prefix_cache_only_when_there_is_one():
    assert not any("prefix_cache" in k for k in scrape(_FakeScheduler(None)))
    cache = PrefixCache(2 * ENTRY, every=4)
    ids = list(range(13))
    for n in (4, 8, 12):
        cache.store(ids, n, state(n))  # the third evicts the first
    cache.lookup(ids)
    cache.lookup([9] * 13)
    m = scrape(_FakeScheduler(cache))
    assert m["lstmgen_prefix_cache_hits_total"] == 1
    assert m["lstmgen_prefix_cache_misses_total"] == 1
    assert m["lstmgen_prefix_cache_tokens_saved_total"] == 12
    assert m["lstmgen_prefix_cache_evictions_total"] == 1
    assert m["lstmgen_prefix_cache_bytes"] == 2 * ENTRY
    assert m["lstmgen_prefix_cache_entries"] == 2
    assert m["lstmgen_decode_steps_total"] == 5  # the scheduler's own families are still there
