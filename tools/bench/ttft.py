"""Section 5: time to first token for a long prompt, cold and when it shares its first 95% with an
earlier prompt (the server's prefix-state cache)."""
from __future__ import annotations

import time


def random_prompt(vocab, chars: int, rng) -> str:
    """About `chars` characters of random tokens of the vocabulary (words joined by spaces)."""
    if vocab.level == "word":
        words = [t for t in vocab.tokens if t.isprintable() and not t.startswith("<") and t.strip()]
        out = ""
        while len(out) < chars:
            out += words[int(rng.integers(len(words)))] + " "
        return out[:chars].rsplit(" ", 1)[0]
    symbols = [t for t in vocab.tokens if t.isprintable()]
    return "".join(symbols[int(i)] for i in rng.integers(len(symbols), size=chars))


def prefix_ttft(target: str, vocab, chars: int = 1000, shared: int = 950, trials: int = 7) -> dict:
    """Time to first token (client side, one request at a time) for `chars`-character prompts: cold
    (nothing shared with earlier prompts), and sharing their first `shared` characters with a prompt
    sent just before (a prefix-cache hit). Medians, ms."""
    import numpy as np

    from lstmgen_client import Client

    rng = np.random.default_rng(7)

    def ttft(client, prompt: str) -> float:
        t0 = time.perf_counter()
        for _ in client.generate_stream(prompt, max_new_tokens=1, greedy=True):
            break
        return 1e3 * (time.perf_counter() - t0)

    cold, hit = [], []
    with Client(target) as client:
        ttft(client, random_prompt(vocab, chars, rng))  # warm-up
        for _ in range(trials):
            base = random_prompt(vocab, chars, rng)
            cold.append(ttft(client, base))  # unlike any earlier prompt: a miss
            hit.append(ttft(client, base[:shared] + random_prompt(vocab, chars - shared, rng)))
    return {"prompt_chars": chars, "shared_chars": shared, "cold_ms": float(np.median(cold)),
            "hit_ms": float(np.median(hit)), "speedup": float(np.median(cold) / np.median(hit)),
            "cold_runs_ms": cold, "hit_runs_ms": hit}
