"""`lstmgen bench`: one run, one model, every layer measured side by side.

1. the machine's fp32 matmul rate and the model's ceiling in tokens/s (FLOPs per token from its
   shapes); 2. PyTorch eager generation one request at a time (the seeds' sampling loop);
3. raw ONNX Runtime step throughput at several batch sizes, and beside each step the time the
sampler takes for that batch in every sampling mode asked for; 4. the real gRPC server under 1..256
concurrent streams driven by a separate client process, per sampling mode, against raw ORT at the
same batch; 5. time to first token for a long prompt, cold and when it shares its first 95% with an
earlier prompt (the prefix-state cache); 6. with --state-every N, what returning the state costs:
the server at 64 streams with return_state, and with a state every N tokens, against without.

Random weights give nearly uniform logits, which no trained model has (a nucleus would hold almost
the whole vocabulary). The output layer is scaled until the mean entropy per token matches a
trained model's (word level 4.8 nats, as a PTB model; char level 1.4 nats, as char-rnn on Tiny
Shakespeare); the uniform worst case of the sampler is reported on a line of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import string
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


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


def flops_per_token(cfg) -> int:
    """Multiply-adds x 2 of one step: every LSTM layer's gate matmuls plus the output layer."""
    f, inp = 0, cfg.embedding_size
    for _ in range(cfg.num_layers):
        f += 2 * 4 * cfg.hidden_size * (inp + cfg.hidden_size)
        inp = cfg.hidden_size
    return f + 2 * cfg.hidden_size * cfg.vocab_size


def _best_rate(run, n: int, trials: int, seconds: float) -> float:
    """Best sustained FLOP/s of an n x n x n GEMM over a few trials (the machine is shared: the
    best trial is the closest to what the hardware can do)."""
    for _ in range(3):
        run()
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run()
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def matmul_rates(trials: int = 5, seconds: float = 0.5, n: int = 2048) -> dict[str, float]:
    """fp32 GEMM FLOP/s on all cores through each library at hand: PyTorch's BLAS (MKL, which takes
    a slower path on AMD CPUs) and ONNX Runtime's MLAS. The machine's limit is the best of them."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = {"torch": _best_rate(lambda: a @ b, n, trials, seconds)}
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"A": a.numpy(), "B": b.numpy()}
    rates["onnxruntime"] = _best_rate(lambda: sess.run(None, feeds), n, trials, seconds)
    return rates


def bench_vocab(size: int):
    """A char vocabulary of printable symbols, or (size >= WORD_LEVEL_FROM) a word vocabulary
    with <unk> and <eos>, so any prompt encodes."""
    from lstmgen.vocab import EOS, UNK, Vocab

    if size < WORD_LEVEL_FROM:
        symbols = (" \n" + string.ascii_letters + string.punctuation + string.digits)[:size]
        return Vocab("char", tuple(sorted(symbols)))
    common = ["the", "of", "and", "to", "a", "in", "is", "that", "it", "was"]
    words = [EOS, UNK] + common + [f"w{i}" for i in range(size - 2 - len(common))]
    return Vocab("word", tuple(words))


def mean_entropy(logits) -> float:
    """Mean entropy (nats) of softmax over the last axis; logits a torch tensor [N, V]."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def shape_logits(model, vocab_size: int, target: float) -> tuple[float, float]:
    """Scale the output layer so the mean entropy of the model's next-token distributions over a
    random token stream is `target` nats; returns (scale, entropy reached)."""
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (64, 16), generator=g)  # [T, B]
    with torch.no_grad():
        y, _ = model(tokens, model.init_state(16))  # [T, B, V]
        y = y.reshape(-1, vocab_size)
        bias = model.head.bias.detach().clone()
        base = y - bias  # the head's matmul part; logits = s * base + s * bias
        lo, hi = 1e-3, 1e3
        for _ in range(60):  # entropy falls as the scale grows: bisection in log space
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if mean_entropy(mid * (base + bias)) > target else (lo, mid)
        scale = (lo * hi) ** 0.5
        model.head.weight.mul_(scale)
        model.head.bias.mul_(scale)
    return scale, mean_entropy(scale * (base + bias))


def make_bundle(cfg: BenchConfig, work: Path):
    import torch

    from lstmgen.export.bundle import export_bundle
    from lstmgen.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from lstmgen.train.config import preset
    from lstmgen.train.model import StackedLSTM

    entropy = None
    if cfg.checkpoint:
        ckpt = load_checkpoint(cfg.checkpoint)
    else:
        vocab = bench_vocab(cfg.vocab_size)
        tc = preset(cfg.preset)
        torch.manual_seed(0)
        model = StackedLSTM(tc.model_config(len(vocab))).eval()
        target = cfg.entropy if cfg.entropy is not None else TARGET_ENTROPY[vocab.level]
        scale, entropy = shape_logits(model, len(vocab), target)
        ckpt = Checkpoint(tc.model_config(len(vocab)), tc, vocab, model.state_dict(),
                          corpus={"source": f"random weights, {cfg.preset} shape, output layer x{scale:.3g} "
                                            f"for {entropy:.2f} nats/token"})
        save_checkpoint(ckpt, work / "model.pt")
    path = cfg.checkpoint or work / "model.pt"
    export_bundle(path, work / "bundle", int8=cfg.int8)
    return ckpt, work / "bundle", entropy


def mode_params(mode: str, batch: int):
    """The SamplingParams of each row of a batch in this mode (rows cycle through the settings)."""
    from lstmgen.serve.params import SamplingParams

    settings = SAMPLING_MODES[mode]
    return [SamplingParams(seed=i, **settings[i % len(settings)]) for i in range(batch)]


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


def torch_eager(ckpt, tokens: int) -> float:
    """The seeds' sampling loop: one token per forward call, batch 1."""
    import torch

    model = ckpt.build_model()
    with torch.no_grad():
        state = model.init_state(1)
        x = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(20):  # warm-up
            logits, state = model(x, state)
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits, state = model(x, state)
            probs = torch.softmax(logits[-1, 0] / 0.8, dim=-1)
            x = torch.multinomial(probs, 1).view(1, 1)
        return tokens / (time.perf_counter() - t0)


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


def scheduler_alone(bundle: Path, streams: int, seconds: float, prompt: str, max_new_tokens: int, mode: str,
                    threads: int = 0, warmup: float = 2.0) -> float:
    """Tokens/s of the server's scheduler with no gRPC and no load generator process: its worker,
    batching and message pacing in this process, `streams` readers issuing requests back to back
    (their first of staggered lengths, as the load generator's), counted over `seconds` after
    `warmup`. Beside the server's own figure it splits what is lost to the raw step into the
    scheduler's share and the serving edge's (gRPC, the event loop's writes, the client)."""
    import asyncio

    from lstmgen.serve.engine import Engine, EngineConfig
    from lstmgen.serve.params import GenerationRequest, SamplingParams
    from lstmgen.serve.scheduler import Scheduler
    from lstmgen.serve.service import ServiceConfig, pace
    from lstmgen_client.loadgen import request_seed, staggered_length

    engine = Engine(bundle, EngineConfig(device="cpu", intra_op_threads=threads, spin="run"))  # serve's
    settings = SAMPLING_MODES[mode]
    cfg = ServiceConfig()

    async def run() -> float:
        scheduler = Scheduler(engine)
        scheduler.start()
        start = time.perf_counter() + warmup
        stop, tokens = start + seconds, [0]

        async def reader(i: int) -> None:
            n = 0
            while time.perf_counter() < stop:
                length = staggered_length(max_new_tokens, i, streams) if n == 0 else max_new_tokens
                sampling = SamplingParams(**settings[i % len(settings)], seed=request_seed(i, n))
                stream = scheduler.submit(GenerationRequest(prompt=prompt, max_new_tokens=length,
                                                            sampling=sampling, seed_given=True))
                async for chunk in stream:
                    if start <= time.perf_counter() < stop:
                        tokens[0] += chunk.token_count
                    if chunk.finished is None:
                        await pace(scheduler, cfg, stream)
                n += 1

        try:
            await asyncio.gather(*(reader(i) for i in range(streams)))
        finally:
            await scheduler.close()
        return tokens[0] / seconds

    return asyncio.run(run())


def start_server(bundle: Path, threads: int, max_concurrent: int):
    """The real server in its own process -> (process, its gRPC target, its /metrics URL)."""
    cmd = [sys.executable, "-m", "lstmgen.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--threads", str(threads), "--log-level", "WARNING", "--metrics-port", "0",
           "--max-concurrent", str(max_concurrent), "--max-prompt-chars", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"serving on ([\d.]+):(\d+)", line)
    metrics = re.search(r"metrics on (http://\S+/metrics)", line)
    if not (m and metrics):
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, f"{m.group(1)}:{m.group(2)}", metrics.group(1)


def inside_server(deltas: dict, seconds: float | None = None) -> dict:
    """What the server's counters grew by (loadgen.counter_deltas) -> its mean decode step and the
    time it took to choose that step's tokens, ms; over a window of `seconds` of steady load also
    where each iteration went: its length, the prompt calls and everything else (the per-row
    Python, handing out the text, admitting requests, and whatever the event loop and the load
    generator take from the worker), the rows a step carried, the tokens/s the server made and
    the cores its threads kept busy (CPU seconds a second)."""
    steps = deltas.get('lstmgen_step_seconds_count{kind="decode"}', 0.0)
    if steps <= 0:
        return {}
    ms = lambda key: 1e3 * deltas.get(key, 0.0) / steps  # noqa: E731 (per decode step)
    out = {"decode_steps": steps, "step_ms": ms('lstmgen_step_seconds_sum{kind="decode"}'),
           "sampling_ms": ms("lstmgen_sampling_seconds_sum")}
    if seconds:
        out.update(iteration_ms=1e3 * seconds / steps, prompt_ms=ms('lstmgen_step_seconds_sum{kind="prompt"}'),
                   rows_per_step=deltas.get('lstmgen_batch_rows_sum{kind="decode"}', 0.0) / steps,
                   tokens_per_s=deltas.get("lstmgen_generated_tokens_total", 0.0) / seconds)
        out["other_ms"] = out["iteration_ms"] - out["step_ms"] - out["sampling_ms"] - out["prompt_ms"]
        if "process_cpu_seconds_total" in deltas:  # every thread: the model's, the event loop's, gRPC's
            out["server_cores"] = deltas["process_cpu_seconds_total"] / seconds
    return out


def where_it_went(i: dict) -> str:
    """inside_server's figures in a line: the step and the sampler, and with a window the whole
    iteration, taken apart."""
    sampling = f"sampling {i['sampling_ms']:.3f} ms ({i['sampling_ms'] / i['step_ms']:.0%} of the step)"
    if "iteration_ms" not in i:
        return f"step {i['step_ms']:.3f} ms, {sampling}"
    raw = (f" ({i['step_ms'] / i['raw_step_ms']:.2f}x the raw step, {i['raw_step_ms']:.3f} ms)"
           if i.get("raw_step_ms") else "")
    cores = [f"{name} {i[key]:.2f}" for name, key in (("server", "server_cores"),
                                                        ("load generator", "load_generator_cores"))
             if i.get(key) is not None]
    return (f"iteration {i['iteration_ms']:.3f} ms = step {i['step_ms']:.3f} ms{raw} + {sampling} + prompts "
            f"{i['prompt_ms']:.3f} ms + the rest {i['other_ms']:.3f} ms; {i['rows_per_step']:.1f} rows a step, "
            f"{i['tokens_per_s']:,.0f} tok/s made"
            + (f"; cores in use: {', '.join(cores)} (of {os.cpu_count()})" if cores else ""))


def load(target: str, streams: int, seconds: float, prompt: str, max_new_tokens: int, mode: str = "plain",
         extra: dict | None = None, metrics_url: str | None = None) -> dict:
    settings = [{**d, **(extra or {})} for d in SAMPLING_MODES[mode]]
    cmd = [sys.executable, "-m", "lstmgen_client.loadgen", "--target", target, "--streams", str(streams),
           "--seconds", str(seconds), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens),
           "--sampling-json", json.dumps(settings)] + (["--metrics", metrics_url] if metrics_url else [])
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


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


def run_bench(cfg: BenchConfig, log=print) -> dict:
    import torch

    from lstmgen.serve.engine import EngineConfig

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle, entropy = make_bundle(cfg, work)
    mc = ckpt.model_config
    fpt = flops_per_token(mc)
    params = sum(v.numel() for k, v in ckpt.state_dict.items() if not (mc.tie_weights and k == "head.weight"))
    log(f"model: {mc.num_layers} x {mc.hidden_size}, embedding {mc.embedding_size}, {ckpt.vocab.level} vocab "
        f"{mc.vocab_size}, {params / 1e6:.2f}M parameters, {fpt / 1e6:.2f} MFLOP/token"
        + (f"; logits shaped to {entropy:.2f} nats/token" if entropy is not None else ""))
    rates = matmul_rates()
    rate = max(rates.values())
    ceiling = rate / fpt
    log(f"1. fp32 matmul {rate / 1e9:.1f} GFLOP/s ("
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + f") -> ceiling {ceiling:,.0f} tokens/s")
    eager = torch_eager(ckpt, cfg.eager_tokens)
    log(f"2. PyTorch eager, one request: {eager:,.0f} tokens/s")
    batches = sorted(set(cfg.batches) | {n for n in cfg.concurrency if n <= max(cfg.batches)})
    # the raw step with ORT's default session options, at the server's thread count: with --threads N
    # the server's N-thread step is paired with an N-thread raw step, not with one on every core
    raw_step = RawStep(bundle, EngineConfig(device="cpu", intra_op_threads=cfg.threads))
    served = RawStep(bundle, EngineConfig(device="cpu", intra_op_threads=cfg.threads, spin="run"))
    ort, steps = ort_steps(raw_step, batches, modes=cfg.sampling, served=served)
    del served  # its session's memory
    log("3. ORT step: " + ", ".join(f"B={b}: {v:,.0f} tok/s ({share(v, ceiling, CEILING)})" for b, v in ort.items()))
    for b, d in steps.items():
        log(f"   B={b}: step {d['step_ms']:.3f} ms; sampling " + ", ".join(
            f"{m} {ms:.3f} ms ({ms / d['step_ms']:.0%} of the step)" for m, ms in d["sampling_ms"].items()))
    worst_b = max(batches)
    worst = uniform_worst_case(mc.vocab_size, worst_b, cfg.sampling)
    log(f"   uniform worst case (not targeted), B={worst_b}: " + ", ".join(
        f"{m} {ms:.3f} ms ({ms / steps[str(worst_b)]['step_ms']:.0%} of the step)" for m, ms in worst.items()))
    by_mode: dict[str, dict] = {}
    ttft_prompt, prefix, state_cost = None, {}, {}
    proc, target, metrics_url = start_server(bundle, cfg.threads, max(cfg.concurrency))
    try:
        runs: dict[tuple[str, int], list[dict]] = {}
        alone_at = 64 if 64 in cfg.concurrency else max(cfg.concurrency)  # the targets' stream count
        for r in range(cfg.repeats):  # modes interleaved, so a slow spell of the machine hits all
            for mode in cfg.sampling:
                for n in cfg.concurrency:
                    # each run's ratio is a pair: the raw step at the same batch around it
                    point = lambda: load(target, n, cfg.seconds, "The ", cfg.max_new_tokens, mode,  # noqa: E731
                                         metrics_url=metrics_url)
                    s, raw = raw_step.around(n, point) if str(n) in ort else (point(), None)
                    s["raw_ort_tokens_per_s"] = raw
                    window = s.get("server", {}).get("window")
                    s["inside_server"] = inside_server(window["deltas"], window["seconds"]) if window else {}
                    if s["inside_server"] and s["raw_ort_tokens_per_s"]:  # the same step, bare, beside it
                        s["inside_server"]["raw_step_ms"] = 1e3 * n / s["raw_ort_tokens_per_s"]
                    if s["inside_server"] and "load_generator_cpu" in s:  # the same window, the client's side
                        s["inside_server"]["load_generator_cores"] = s["load_generator_cpu"]["cores"]
                    if n == alone_at and str(n) in ort:  # the scheduler alone, beside
                        alone, raw = raw_step.around(n, lambda: scheduler_alone(
                            bundle, n, cfg.seconds, "The ", cfg.max_new_tokens, mode, cfg.threads))
                        s["scheduler_alone"] = {"tokens_per_s": alone, "raw_ort_tokens_per_s": raw,
                                                "vs_ort": alone / raw}
                    runs.setdefault((mode, n), []).append(s)
        for mode in cfg.sampling:
            points = by_mode[mode] = {}
            for n in cfg.concurrency:
                tries = sorted(runs[(mode, n)], key=lambda x: x["tokens_per_s"])
                s = points[str(n)] = dict(tries[len(tries) // 2])  # the median run
                s["tokens_per_s_runs"] = [t["tokens_per_s"] for t in runs[(mode, n)]]
                pairs = [(t["tokens_per_s"], t["raw_ort_tokens_per_s"]) for t in runs[(mode, n)]
                         if t["raw_ort_tokens_per_s"]]
                s["vs_ort_runs"] = [v / r for v, r in pairs]
                pair = median_pair(pairs)  # (server, raw) of the median ratio, or None
                s["vs_ort_pair"] = list(pair) if pair else None
                s["vs_ort_same_batch"] = bounded(pair[0] / pair[1]) if pair else None  # None: disturbed
                s["vs_ceiling"] = bounded(s["tokens_per_s"] / ceiling)
                s["disturbed"] = [what for what, ok in ((f"raw ORT at B={n}", not pair or pair[0] <= pair[1]),
                                                        (CEILING, s["tokens_per_s"] <= ceiling)) if not ok]
                alone = [(t["scheduler_alone"]["tokens_per_s"], t["scheduler_alone"]["raw_ort_tokens_per_s"])
                         for t in runs[(mode, n)] if "scheduler_alone" in t]
                if alone:
                    a = median_pair(alone)
                    s["scheduler_alone_vs_ort_runs"] = [v / r for v, r in alone]
                    s["scheduler_alone_vs_ort"] = bounded(a[0] / a[1])
                beside = f"raw ORT at B={n} measured beside it"
                log(f"4. server [{mode}], {n} streams: {s['tokens_per_s']:,.0f} tok/s ("
                    + (f"{f'the median pair {pair[0]:,.0f} tok/s: ' if len(pairs) > 1 else ''}{share(*pair, beside)}; "
                       if pair else "")
                    + f"{share(s['tokens_per_s'], ceiling, CEILING)}), ITL p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, "
                    f"TTFT {s['ttft_ms']} ms, {s['tokens_per_message']} tok/msg, failed {s['failed']}"
                    + (f"; runs {', '.join(f'{x:,.0f}' for x in s['tokens_per_s_runs'])}" if cfg.repeats > 1 else "")
                    + (f" (against raw: {pair_runs(pairs)})" if cfg.repeats > 1 and pairs else "")
                    + (f"; in the server: {where_it_went(i)}" if (i := s["inside_server"]) else ""))
                if alone:
                    log(f"   the scheduler alone (no gRPC, no client process), {n} streams: "
                        f"{a[0]:,.0f} tok/s, {share(*a, beside)} (runs {pair_runs(alone)})")
        prefix = prefix_ttft(target, ckpt.vocab, cfg.prompt_chars, cfg.prompt_chars * 95 // 100)
        ttft_prompt = prefix["cold_ms"]
        log(f"5. TTFT with a {cfg.prompt_chars}-char prompt: cold {prefix['cold_ms']:.1f} ms; sharing its first "
            f"{prefix['shared_chars']} chars with the prompt before (prefix cache hit) {prefix['hit_ms']:.1f} ms "
            f"({prefix['speedup']:.1f}x faster)")
        state_cost = {}
        if cfg.state_every:
            n, mode = 64, cfg.sampling[0]
            variants = {"none": None, "return_state": {"return_state": True},
                        f"state_every_{cfg.state_every}": {"state_every": cfg.state_every}}
            tries: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(max(2, cfg.repeats)):  # interleaved, as above
                for k, extra in variants.items():
                    tries[k].append(load(target, n, cfg.seconds, "The ", cfg.max_new_tokens, mode, extra)["tokens_per_s"])
            base = _median(tries["none"])
            for k, runs_ in tries.items():
                med = _median(runs_)
                state_cost[k] = {"tokens_per_s": med, "vs_none": med / base, "runs": runs_}
            log(f"6. state hand-off [{mode}], {n} streams: " + ", ".join(
                f"{k} {v['tokens_per_s']:,.0f} tok/s ({v['vs_none']:.0%} of none's {base:,.0f})"
                for k, v in state_cost.items()))
    finally:
        proc.terminate()
        proc.wait(30)
    server = by_mode[cfg.sampling[0]]
    return {
        "ceiling_tokens_per_s": ceiling,
        "torch_eager_tokens_per_s": eager,
        "ort_step_tokens_per_s": ort,
        "ort_step_and_sampling": steps,
        "sampling_uniform_worst_case_ms": {"batch": worst_b, **worst},
        "server": server,  # the first sampling mode, as before
        "server_by_sampling": by_mode,
        "ttft_prompt_1000_ms": ttft_prompt,
        "prefix_cache_ttft": prefix,
        "state_cost_64_streams": state_cost,
        "logit_entropy_nats": entropy,
        "ratios": {  # None where the figure went over its ceiling (disturbed by other load) or was not measured
            "server_64_vs_ceiling": server.get("64", {}).get("vs_ceiling"),
            "server_1_vs_ort_batch_1": server.get("1", {}).get("vs_ort_same_batch"),
            "server_64_vs_torch_eager": server.get("64", {}).get("tokens_per_s", 0) / eager,
            "by_sampling": {m: {"server_64_vs_ort_batch_64": pts.get("64", {}).get("vs_ort_same_batch"),
                                "scheduler_alone_64_vs_ort_batch_64": pts.get("64", {}).get("scheduler_alone_vs_ort"),
                                "server_1_vs_ort_batch_1": pts.get("1", {}).get("vs_ort_same_batch"),
                                "sampling_vs_step_batch_64": (steps["64"]["sampling_ms"][m] / steps["64"]["step_ms"]
                                                              if "64" in steps else None),
                                "in_server_sampling_vs_step_64": _share(pts.get("64", {}).get("inside_server"))}
                            for m, pts in by_mode.items()},
        },
        "model": {**asdict(mc), "parameters": params, "flops_per_token": fpt, "quantization":
                  "int8-dynamic" if cfg.int8 else "fp32", "preset": cfg.preset, "checkpoint": cfg.checkpoint,
                  "level": ckpt.vocab.level},
        "machine": {"matmul_flops_per_s": rate, "matmul_flops_per_s_by_library": rates,
                    "cpus": os.cpu_count(), "processor": platform.processor(), "cpu_model": cpu_model(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "config": asdict(cfg),
    }


def _median(xs: list[float]) -> float:
    """The middle of an odd count, the upper middle of an even one: always a value measured."""
    return sorted(xs)[len(xs) // 2]


def _share(inside: dict | None) -> float | None:
    return inside["sampling_ms"] / inside["step_ms"] if inside else None


# -- ratios to ceilings, and what a figure above one means ------------------------------------------
CEILING = "the fp32 matmul ceiling"
DISTURBED = "disturbed by other load, not reported"


def bounded(ratio: float | None) -> float | None:
    """A ratio to a ceiling as reported: None above 1. Nothing runs faster than its ceiling (the
    matmul rate, or the bare ORT step at the same batch); a figure above it means one side of the
    ratio was measured while something else took the machine's cores."""
    return None if ratio is None or ratio > 1.0 else ratio


def share(value: float, ceiling: float, what: str) -> str:
    """`value` as a share of `ceiling`, printed with the figure it was divided by, e.g. "74% of
    2,494 tok/s, raw ORT at B=1 measured beside it"; above 100% flagged instead of reported."""
    if bounded(value / ceiling) is None:
        return f"over 100% of {ceiling:,.0f} tok/s, {what}: {DISTURBED}"
    return f"{value / ceiling:.0%} of {ceiling:,.0f} tok/s, {what}"


def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The (value, ceiling) pair whose ratio is the median (_median's choice), or None."""
    return sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2] if pairs else None


def pair_runs(pairs: list[tuple[float, float]]) -> str:
    """Every run's pair, e.g. "1,846/2,494 tok/s 74%, 2,010/1,900 tok/s over 100%"."""
    return ", ".join(f"{v:,.0f}/{r:,.0f} tok/s " + (f"{v / r:.0%}" if bounded(v / r) is not None else "over 100%")
                     for v, r in pairs)


def plot_series(result: dict) -> dict[str, tuple[list[int], list[float]]]:
    """The plot's points: the server's and the raw step's, each split into the figures drawn as
    data and those over a ceiling (disturbed), which are drawn at the ceiling as marks instead."""
    ceiling = result["ceiling_tokens_per_s"]
    series: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in
                                                        ("server", "server_disturbed", "ort", "ort_disturbed")}
    for x in sorted(int(k) for k in result["server"]):
        point = result["server"][str(x)]
        v = point["tokens_per_s"]
        pair = point.get("vs_ort_pair")
        over = v > ceiling or bool(point.get("disturbed")) or bool(pair and pair[0] > pair[1])
        xs, ys = series["server_disturbed" if over else "server"]
        xs.append(x)
        ys.append(min(v, ceiling))
    for b in sorted(int(k) for k in result["ort_step_tokens_per_s"]):
        v = result["ort_step_tokens_per_s"][str(b)]
        xs, ys = series["ort_disturbed" if v > ceiling else "ort"]
        xs.append(b)
        ys.append(min(v, ceiling))
    return series


def refuse_overwrite(paths: list[str | None], work_dir: str, overwrite: bool) -> str | None:
    """Why the run must not start, or None: an existing --json/--plot file (the published reports
    in docs/, copied from a command) is replaced only with --overwrite; bench's own work dir is its
    scratch space (`make bench` writes there run after run)."""
    work = Path(work_dir).resolve()
    taken = [p for p in paths if p and Path(p).exists() and not Path(p).resolve().is_relative_to(work)]
    if not taken or overwrite:
        return None
    return (f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; write the figures elsewhere "
            f"(e.g. {work_dir}/) or pass --overwrite to replace {'it' if len(taken) == 1 else 'them'}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(result)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(*series["server"], "o-", label="gRPC server (aggregate)")
    ax.plot(*series["ort"], "s--", label="raw ORT step at batch B")
    xs = series["server_disturbed"][0] + series["ort_disturbed"][0]
    if xs:  # marked on the ceiling, never drawn above it as data
        ax.plot(xs, series["server_disturbed"][1] + series["ort_disturbed"][1], "x", color="red", ms=9, ls="none",
                label="over 100% of a ceiling: disturbed by other load, not reported")
    ax.axhline(result["ceiling_tokens_per_s"], color="red", label="fp32 matmul ceiling")
    ax.axhline(result["torch_eager_tokens_per_s"], color="gray", ls=":", label="PyTorch eager, 1 request")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams (server) / batch size (ORT)")
    ax.set_ylabel("tokens/s")
    m = result["model"]
    ax.set_title(f"{m['num_layers']}x{m['hidden_size']} {m.get('level', 'char')} LSTM, V={m['vocab_size']}, "
                 f"{m['quantization']}, "
                 f"{result['machine']['cpus']} CPUs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--preset", default=d.preset, help="model shape for random weights")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint or run dir instead of random weights")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"vocabulary of the random-weight model; from {WORD_LEVEL_FROM} on a word-level one "
                        "(PTB: 10000, WikiText-2: 33278)")
    p.add_argument("--sampling", default=",".join(d.sampling),
                   help=f"comma-separated sampling modes, each measured in this run: {', '.join(SAMPLING_MODES)} "
                        "(temperature 0.8, top_k 40, top_p 0.9; mixed: rows with different settings)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="measure each server point this many times (modes interleaved) and report the median")
    p.add_argument("--entropy", type=float, default=None,
                   help="mean entropy (nats/token) the random model's logits are shaped to "
                        f"(default: {TARGET_ENTROPY['word']} word level, {TARGET_ENTROPY['char']} char level)")
    p.add_argument("--work-dir", default=d.work_dir, help="where the bundle is written")
    p.add_argument("--concurrency", default=",".join(map(str, d.concurrency)), help="server stream counts")
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="raw ORT batch sizes")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measurement window per server point")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per request")
    p.add_argument("--int8", action="store_true", help="benchmark the int8 (dynamic quantized) export")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="ONNX Runtime intra-op threads of the server and of the raw step it is paired with "
                        "(0: ORT's default, one per core)")
    p.add_argument("--state-every", type=int, default=0, metavar="N",
                   help="also measure the cost of return_state and of a state every N tokens at 64 streams")
    p.add_argument("--json", default=None, help="write the results here (an existing file only with --overwrite)")
    p.add_argument("--plot", default=None,
                   help="draw tokens/s against concurrency into this PNG (an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing --json/--plot files (outside --work-dir they are refused without it: "
                        "docs/ holds the published reports)")


def run(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in args.sampling.split(",") if m.strip())
    bad = [m for m in modes if m not in SAMPLING_MODES]
    if bad or not modes:
        print(f"lstmgen bench: --sampling: unknown mode(s) {bad}; choose from {', '.join(SAMPLING_MODES)}",
              file=sys.stderr)
        return 2
    refused = refuse_overwrite([args.json, args.plot], args.work_dir, args.overwrite)
    if refused:  # before the minute of measuring, not after it
        print(f"lstmgen bench: error: {refused}", file=sys.stderr)
        return 2
    cfg = BenchConfig(preset=args.preset, checkpoint=args.checkpoint, work_dir=args.work_dir,
                      vocab_size=args.vocab_size, sampling=modes, entropy=args.entropy, repeats=args.repeats,
                      concurrency=tuple(int(x) for x in args.concurrency.split(",")),
                      batches=tuple(int(x) for x in args.batches.split(",")), seconds=args.seconds,
                      max_new_tokens=args.max_new_tokens, int8=args.int8, threads=args.threads,
                      state_every=args.state_every)
    result = run_bench(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0
