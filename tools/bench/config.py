"""What one `lstmgen bench` run measures (BenchConfig), and the sampling modes it can measure."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "char-rnn"
    checkpoint: str | None = None  # default: random weights in the preset's shape
    vocab_size: int = 83  # for random weights (Anna Karenina has 83 symbols); word-level above 256
    work_dir: str = "bench-out"
    concurrency: tuple[int, ...] = (1, 8, 64, 256)
    batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    seconds: float = 8.0  # per server point
    max_new_tokens: int = 256
    prompt_chars: int = 1000
    eager_tokens: int = 400
    int8: bool = False
    threads: int = 0  # ORT intra-op threads in the server (0: default)
    sampling: tuple[str, ...] = ("plain",)  # modes of SAMPLING_MODES, each measured in one run
    entropy: float | None = None  # target mean entropy (nats) for random weights; None: by level
    repeats: int = 1  # server points measured this many times, modes interleaved; medians reported
    state_every: int = 0  # > 0: also measure return_state and state_every=N at 64 streams (section 6)


# What users run (temperature 0.8, top_k 40, top_p 0.9); "mixed" cycles rows through different
# settings in one batch, penalties included: the realistic case for a shared server.
SAMPLING_MODES: dict[str, list[dict]] = {
    "greedy": [dict(greedy=True)],
    "plain": [dict(temperature=0.8)],
    "top_k": [dict(temperature=0.8, top_k=40)],
    "top_p": [dict(temperature=0.8, top_p=0.9)],
    "mixed": [dict(greedy=True), dict(temperature=0.8), dict(temperature=0.8, top_k=40),
              dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=40, top_p=0.9),
              dict(temperature=0.7, min_p=0.05), dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2),
              dict(temperature=0.9, top_p=0.95, frequency_penalty=0.5, presence_penalty=0.3)],
}
WORD_LEVEL_FROM = 257  # --vocab-size above this makes a word-level vocabulary
TARGET_ENTROPY = {"word": 4.8, "char": 1.4}  # nats per token of trained models (docs/results.md)


def mode_params(mode: str, batch: int):
    """The SamplingParams of each row of a batch in this mode (rows cycle through the settings)."""
    from lstmgen.serve.params import SamplingParams

    settings = SAMPLING_MODES[mode]
    return [SamplingParams(seed=i, **settings[i % len(settings)]) for i in range(batch)]
