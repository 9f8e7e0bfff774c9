"""Offline sampling figures for docs/offline.md, measured side by side in one run.

    python tools/bench_offline.py --json bench-out-offline/result.json

For the char-rnn shape (vocabulary 83) and a word model (ptb-small shape, vocabulary 10,000),
random weights as `lstmgen bench` builds them: raw ONNX Runtime steps at batch 256; the sampler
alone on that model's logits at batch 256, which gives the bound `step / (step + sampling)` no
sampling loop can pass; the in-process offline path (scheduler at batch 256) with plain sampling,
and with top_p 0.9 at temperature 0.8 and stop strings on a quarter of the prompts; and the Ray
Data path with 1 and 2 actors on a local Ray instance. Then peak RSS of `lstmgen sample` on 10,000 and 1,000,000 short prompts
(max_new_tokens 4). Needs the train extra (to build the bundles) and the ray extra.
"""
from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import time
from pathlib import Path

BATCH = 256


def build(work: Path, preset: str, vocab: int) -> Path:
    from lstmgen.tools.bench import BenchConfig, make_bundle

    work.mkdir(parents=True, exist_ok=True)
    return make_bundle(BenchConfig(preset=preset, vocab_size=vocab, work_dir=str(work)), work)[1]


TOP_P = dict(temperature=0.8, top_p=0.9)


def raw_ort(bundle: Path, threads: int, seconds: float = 3.0) -> float:
    """Tokens/s of bare model steps at batch 256 (no sampling, no scheduler): the ceiling."""
    import numpy as np

    from lstmgen.serve.engine import Engine, EngineConfig

    engine = Engine(bundle, EngineConfig(device="cpu", intra_op_threads=threads))
    tokens = np.random.default_rng(0).integers(0, engine.manifest.vocab_size, BATCH).astype(np.int64)
    state = engine.zeros(BATCH)  # each [L, B, H]
    for _ in range(5):
        _, state = engine.step(tokens, state)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, state = engine.step(tokens, state)
        n += 1
    return BATCH * n / (time.perf_counter() - t0)


def sampler_seconds(bundle: Path, threads: int, sampling: dict, seconds: float = 2.0) -> float:
    """Seconds the sampler takes per step at batch 256 on this model's own logits (the work no
    loop around it can avoid)."""
    import numpy as np

    from lstmgen.serve.engine import Engine, EngineConfig
    from lstmgen.serve.params import SamplingParams
    from lstmgen.serve.sampling import BatchSampling, choose_checked, warm_up

    warm_up()
    engine = Engine(bundle, EngineConfig(device="cpu", intra_op_threads=threads))
    rng = np.random.default_rng(0)
    state = engine.zeros(BATCH)
    for _ in range(8):  # a few steps in: logits as generation sees them
        logits, state = engine.step(rng.integers(0, engine.manifest.vocab_size, BATCH).astype(np.int64), state)
    sp = BatchSampling.from_params([SamplingParams(**sampling)] * BATCH)
    u = rng.random(BATCH)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        choose_checked(logits.copy(), sp, u, overwrite=True)  # the loop's step output is its own copy too
        n += 1
    return (time.perf_counter() - t0) / n


def in_process(bundle: Path, n: int, new_tokens: int, threads: int, stop_every: int = 0, **sampling) -> float:
    """Generated tokens/s of the offline runner over n prompts (engine load excluded); with
    `stop_every`, every stop_every-th prompt has stop strings (matched on every token)."""
    from lstmgen.offline.jobs import SampleConfig, iter_jobs
    from lstmgen.offline.prompts import PromptItem
    from lstmgen.offline.runner import offline_limits, results
    from lstmgen.serve.engine import Engine, EngineConfig
    from lstmgen.serve.params import SamplingParams
    from lstmgen.serve.scheduler import Scheduler

    engine = Engine(bundle, EngineConfig(device="cpu", intra_op_threads=threads))
    prompt = prompt_for(engine.manifest.vocab)
    cfg = SampleConfig(max_new_tokens=new_tokens, seed=1, sampling=SamplingParams(**sampling))
    limits = offline_limits(BATCH, 4 * BATCH, new_tokens)
    s = Scheduler(engine, limits)
    s.start()
    t0, tokens = time.perf_counter(), 0
    items = (PromptItem(prompt, stop=("\n\n", "zzz") if stop_every and i % stop_every == 0 else None)
             for i in range(n))
    for r in results(s, iter_jobs(items, cfg), 4 * BATCH, False):
        tokens += r.tokens
    dt = time.perf_counter() - t0
    s.shutdown()
    return tokens / dt


def prompt_for(vocab) -> str:
    return "the" if vocab.level == "word" and "the" in vocab.tokens else vocab.tokens[min(5, len(vocab) - 1)]


def on_ray(bundle: Path, n: int, new_tokens: int, actors: int) -> float:
    """Generated tokens/s of sample_dataset with `actors` actors, 1 thread each (actor start
    and engine load included: what a job pays)."""
    import ray

    from lstmgen.bundle import load_manifest
    from lstmgen.offline.jobs import SampleConfig
    from lstmgen.offline.ray_data import sample_dataset

    prompt = prompt_for(load_manifest(bundle).vocab)
    ds = ray.data.from_items([{"prompt": prompt, "index": i} for i in range(n)])
    t0 = time.perf_counter()
    out = sample_dataset(ds, str(bundle), SampleConfig(max_new_tokens=new_tokens, seed=1), actors=actors,
                         threads_per_actor=1, cpus_per_actor=0.5, batch_size=BATCH,
                         rows_per_call=max(BATCH, n // (4 * actors))).materialize()
    dt = time.perf_counter() - t0
    return out.sum("generated_tokens") / dt


def peak_rss(bundle: Path, work: Path, n: int) -> dict:
    """Peak RSS (MiB) and wall time of `lstmgen sample` over n short prompts, max_new_tokens 4."""
    letters = string.ascii_letters
    prompts = work / f"prompts-{n}.txt"
    if not prompts.exists():
        with open(prompts, "w") as f:
            for i in range(n):
                f.write(f"{letters[i % 52]}{letters[i // 52 % 52]} b\n")
    out = work / f"samples-{n}.jsonl"
    # The child reports its own high-water mark (VmHWM): a forked child's ru_maxrss would count
    # this (large) process's pages from before the exec.
    code = ("import sys; from lstmgen.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
            "print('PEAK', hwm.split()[1], file=sys.stderr); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "sample", str(bundle), "--prompts", str(prompts), "--out", str(out),
           "--overwrite", "--max-new-tokens", "4", "--seed", "1", "--device", "cpu", "--quiet", "--skip-unknown"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"lstmgen sample failed: {r.stderr[-2000:]}")
    kib = int(r.stderr.split("PEAK")[-1].split()[0])
    return {"prompts": n, "peak_rss_mib": kib / 1024, "seconds": time.perf_counter() - t0}


def in_process_figures(name: str, bundle: Path, args) -> dict:
    """Per mode, `--pairs` pairs of (raw ORT, the in-process loop) measured back to back, and the
    sampler's bound: this shared 2-vCPU machine drifts by 10-15% between runs a minute apart, so a
    ratio is taken within each pair and the median pair is reported."""
    r: dict = {}
    for mode, sampling, stop_every in (("plain", {}, 0), ("top_p_stops", TOP_P, 4)):
        pairs = []
        for _ in range(args.pairs):
            ort = raw_ort(bundle, args.threads, 2.0)
            v = in_process(bundle, args.prompts, args.new_tokens, args.threads, stop_every, **sampling)
            sampler = sampler_seconds(bundle, args.threads, sampling, 1.0)
            step = BATCH / ort  # seconds per raw step
            pairs.append({"ort_tokens_per_s": ort, "tokens_per_s": v, "vs_ort": v / ort,
                          "bound": step / (step + sampler)})
        m = sorted(pairs, key=lambda x: x["vs_ort"])[len(pairs) // 2]
        r[mode] = {**m, "points_below_bound": 100 * (m["bound"] - m["vs_ort"]),
                   "pairs_vs_ort": [x["vs_ort"] for x in pairs]}
        print(f"{name} {mode}: in-process {m['tokens_per_s']:,.0f} tokens/s = {m['vs_ort']:.1%} of raw ORT "
              f"{m['ort_tokens_per_s']:,.0f} (median of {len(pairs)} pairs: "
              f"{', '.join(f'{x:.1%}' for x in r[mode]['pairs_vs_ort'])}); bound step / (step + sampling) "
              f"{m['bound']:.1%} ({r[mode]['points_below_bound']:.1f} points below)", flush=True)
    r["ort_batch_256_tokens_per_s"] = r["plain"]["ort_tokens_per_s"]
    r["in_process_tokens_per_s"] = r["plain"]["tokens_per_s"]
    r["in_process_vs_ort"] = r["plain"]["vs_ort"]
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="bench-out-offline")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--prompts", type=int, default=2048, help="prompts per throughput point")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per sample in the throughput points")
    p.add_argument("--threads", type=int, default=0, help="ORT threads in process (0: ORT's default)")
    p.add_argument("--memory-prompts", default="10000,1000000", help="prompt counts for the peak RSS runs")
    p.add_argument("--pairs", type=int, default=3, help="(raw ORT, in-process) pairs per mode; the median is reported")
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    work = Path(args.work_dir)
    result: dict = {"cpus": os.cpu_count(), "batch": BATCH, "prompts": args.prompts, "new_tokens": args.new_tokens}
    models = (("char-rnn", "char-rnn", 83), ("word-10k", "ptb-small", 10_000))
    bundles = {name: build(work / name, preset, vocab) for name, preset, vocab in models}
    for name, bundle in bundles.items():  # first, with nothing else running (Ray's idle workers take CPU)
        result[name] = r = in_process_figures(name, bundle, args)
        print(name, json.dumps(r, indent=1), flush=True)
    if not args.no_ray:
        import ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        for name, bundle in bundles.items():
            r = result[name]
            for actors in (1, 2):
                v = on_ray(bundle, args.prompts, args.new_tokens, actors)
                r[f"ray_{actors}_actor_tokens_per_s"] = v
                r[f"ray_{actors}_actor_vs_in_process"] = v / r["in_process_tokens_per_s"]
                print(f"{name} Ray, {actors} actor(s): {v:,.0f} tokens/s = {v / r['in_process_tokens_per_s']:.1%} "
                      "of in-process (actor start and engine load included)", flush=True)
        ray.shutdown()
    char_bundle = work / "char-rnn" / "bundle"
    result["memory"] = [peak_rss(char_bundle, work, int(n)) for n in args.memory_prompts.split(",") if n.strip()]
    print("memory", json.dumps(result["memory"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
