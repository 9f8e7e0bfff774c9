"""Section 3: the raw ONNX Runtime step in a loop at several batch sizes, and beside each step the
time the sampler takes for that batch in every sampling mode asked for."""
from __future__ import annotations

import time
from pathlib import Path

from lstmgen.tools.bench.config import mode_params


def time_sampling(outputs, mode: str, repeats: int = 20) -> float:
    """Median seconds of one sampler call in this mode (histories of 100 seen tokens for the rows
    with penalties, as after a 100-token generation), called as the server calls it: on each of
    `repeats` step outputs [B, V] from the iterator `outputs`, which the penalties may change in
    place. Each call gets new logits, as in the server: on the same logits again and again the
    CPU's branch predictor learns the rows by heart, and the sampler ran 20-40% faster than on new
    ones (B = 64, V = 10,000, top_p)."""
    import numpy as np

    from lstmgen.serve.penalties import TokenHistory
    from lstmgen.serve.sampling import BatchSampling, choose

    rng = np.random.default_rng(0)
    sp = histories = None
    times = []
    for _, logits in zip(range(repeats + 2), outputs):
        b, v = logits.shape
        if sp is None:
            sp = BatchSampling.from_params(mode_params(mode, b))
            histories = []
            for _ in range(b):
                h = TokenHistory(rng.integers(0, v, 20).tolist())
                for t in rng.integers(0, v, 100).tolist():
                    h.add(t)
                histories.append(h)
        u = rng.random(b)
        t0 = time.perf_counter()
        choose(logits, sp, u, histories, overwrite=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


class RawStep:
    """The raw ONNX Runtime step in a loop, state fed back: its rate at a batch size. Measured
    once up front (ort_steps) and again beside each server point: a VM's speed drifts by 10-20%
    over a minute, and a ratio of two figures taken minutes apart carries that drift."""

    def __init__(self, bundle: Path, engine_cfg=None):
        import numpy as np

        from lstmgen.serve.engine import Engine, EngineConfig

        # ORT's default session options unless told otherwise (tools/contention_bench.py: the server's)
        self.engine = Engine(bundle, engine_cfg or EngineConfig(device="cpu"))
        self._rng = np.random.default_rng(0)

    def windows(self, batch: int, seconds: float, n: int = 1):
        """Tokens/s in each of `n` windows of `seconds` at `batch`."""
        steps = self.outputs(batch)
        for _ in range(3):
            next(steps)
        rates = []
        for _ in range(n):
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                next(steps)
                count += 1
            rates.append(batch * count / (time.perf_counter() - t0))
        return rates

    def tokens_per_s(self, batch: int, seconds: float = 1.0) -> float:
        return self.windows(batch, seconds)[0]

    def around(self, batch: int, run):
        """`run()` between two readings of the raw step at `batch`, just before and just after it
        -> (what run returned, the readings' mean): a pair, each side measured in the same spell."""
        before = self.tokens_per_s(batch)
        out = run()
        return out, (before + self.tokens_per_s(batch)) / 2

    def outputs(self, batch: int):
        """Each step's logits [B, V] in turn (state fed back), without end."""
        tokens = self._rng.integers(0, self.engine.manifest.vocab_size, batch).astype("int64")
        state = self.engine.zeros(batch)
        while True:
            logits, state = self.engine.step(tokens, state)
            yield logits


def ort_steps(raw: RawStep, batches, seconds: float = 1.5, modes=(), windows: int = 3,
              served: RawStep | None = None) -> tuple[dict, dict]:
    """Raw step tokens/s by batch (the median of `windows` windows of `seconds`), and
    {batch: {"step_ms", "sampling_ms": {mode: ms}}}: the model step and the sampler side by side.
    The sampler is timed right after each of 20 steps of `served` (the step with the server's
    session options: with ORT's default, its threads spin on between steps and take the cores
    the sampler's threads need, which the server does not let them do)."""
    import numpy as np

    out, detail = {}, {}
    for b in batches:
        rates = raw.windows(b, seconds, windows)
        out[str(b)] = float(np.median(rates))
        detail[str(b)] = {"step_ms": 1e3 * b / out[str(b)],
                          "sampling_ms": {m: 1e3 * time_sampling((served or raw).outputs(b), m) for m in modes}}
    return out, detail


def uniform_worst_case(vocab_size: int, batch: int, modes) -> dict[str, float]:
    """Sampler ms per call on nearly uniform logits (random weights, unscaled): a nucleus then
    holds most of the vocabulary. Eight different arrays in turn, each call on a fresh copy."""
    import itertools

    import numpy as np

    rng = np.random.default_rng(1)
    arrays = [rng.normal(0, 0.05, (batch, vocab_size)).astype(np.float32) for _ in range(8)]
    return {m: 1e3 * time_sampling((a.copy() for a in itertools.cycle(arrays)), m) for m in modes}
