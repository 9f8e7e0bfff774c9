"""Sections 4 and 6: the real gRPC server in its own process under 1..256 concurrent streams, driven
by a separate load generator process (`lstmgen loadtest`), per sampling mode, each run paired with
the raw step at the same batch; and what returning the state costs at 64 streams."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from lstmgen.tools.bench.alone import scheduler_alone
from lstmgen.tools.bench.config import SAMPLING_MODES, BenchConfig
from lstmgen.tools.bench.counters import inside_server, where_it_went
from lstmgen.tools.bench.report import CEILING, bounded, median, median_pair, pair_runs, share
from lstmgen.tools.bench.step import RawStep

PROMPT = "The "  # every server point's prompt


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


def load(target: str, streams: int, seconds: float, prompt: str, max_new_tokens: int, mode: str = "plain",
         extra: dict | None = None, metrics_url: str | None = None) -> dict:
    """One run of the load generator in its own process -> its JSON summary."""
    settings = [{**d, **(extra or {})} for d in SAMPLING_MODES[mode]]
    cmd = [sys.executable, "-m", "lstmgen.tools.loadgen", "--target", target, "--streams", str(streams),
           "--seconds", str(seconds), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens),
           "--sampling-json", json.dumps(settings)] + (["--metrics", metrics_url] if metrics_url else [])
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def server_runs(cfg: BenchConfig, bundle: Path, target: str, metrics_url: str, raw_step: RawStep,
                ort: dict) -> dict[tuple[str, int], list[dict]]:
    """Every run of every point, {(mode, streams): [load summaries]}; modes interleaved, so a slow
    spell of the machine hits all."""
    runs: dict[tuple[str, int], list[dict]] = {}
    alone_at = 64 if 64 in cfg.concurrency else max(cfg.concurrency)  # the targets' stream count
    for _ in range(cfg.repeats):
        for mode in cfg.sampling:
            for n in cfg.concurrency:
                s = server_point(cfg, target, metrics_url, raw_step, mode, n, paired=str(n) in ort)
                if n == alone_at and str(n) in ort:  # the scheduler alone, beside
                    alone, raw = raw_step.around(n, lambda: scheduler_alone(
                        bundle, n, cfg.seconds, PROMPT, cfg.max_new_tokens, mode, cfg.threads))
                    s["scheduler_alone"] = {"tokens_per_s": alone, "raw_ort_tokens_per_s": raw,
                                            "vs_ort": alone / raw}
                runs.setdefault((mode, n), []).append(s)
    return runs


def server_point(cfg: BenchConfig, target: str, metrics_url: str, raw_step: RawStep, mode: str, n: int,
                 paired: bool) -> dict:
    """One run at `n` streams, between two readings of the raw step at batch n when `paired` (each
    run's ratio is a pair), with the server's counters over the window read as where it went."""
    point = lambda: load(target, n, cfg.seconds, PROMPT, cfg.max_new_tokens, mode,  # noqa: E731
                         metrics_url=metrics_url)
    s, raw = raw_step.around(n, point) if paired else (point(), None)
    s["raw_ort_tokens_per_s"] = raw
    window = s.get("server", {}).get("window")
    s["inside_server"] = inside_server(window["deltas"], window["seconds"]) if window else {}
    if s["inside_server"] and raw:  # the same step, bare, beside it
        s["inside_server"]["raw_step_ms"] = 1e3 * n / raw
    if s["inside_server"] and "load_generator_cpu" in s:  # the same window, the client's side
        s["inside_server"]["load_generator_cores"] = s["load_generator_cpu"]["cores"]
    return s


def _pairs(tries: list[dict]) -> list[tuple[float, float]]:
    return [(t["tokens_per_s"], t["raw_ort_tokens_per_s"]) for t in tries if t["raw_ort_tokens_per_s"]]


def _alone_pairs(tries: list[dict]) -> list[tuple[float, float]]:
    return [(t["scheduler_alone"]["tokens_per_s"], t["scheduler_alone"]["raw_ort_tokens_per_s"])
            for t in tries if "scheduler_alone" in t]


def summarise_point(tries: list[dict], n: int, ceiling: float) -> dict:
    """A point's runs -> the median run, with every run's figures and its ratios to the raw step
    beside it and to the ceiling (None where disturbed)."""
    s = dict(sorted(tries, key=lambda x: x["tokens_per_s"])[len(tries) // 2])  # the median run
    s["tokens_per_s_runs"] = [t["tokens_per_s"] for t in tries]
    pairs = _pairs(tries)
    s["vs_ort_runs"] = [v / r for v, r in pairs]
    pair = median_pair(pairs)  # (server, raw) of the median ratio, or None
    s["vs_ort_pair"] = list(pair) if pair else None
    s["vs_ort_same_batch"] = bounded(pair[0] / pair[1]) if pair else None  # None: disturbed
    s["vs_ceiling"] = bounded(s["tokens_per_s"] / ceiling)
    s["disturbed"] = [what for what, ok in ((f"raw ORT at B={n}", not pair or pair[0] <= pair[1]),
                                            (CEILING, s["tokens_per_s"] <= ceiling)) if not ok]
    alone = _alone_pairs(tries)
    if alone:
        a = median_pair(alone)
        s["scheduler_alone_vs_ort_runs"] = [v / r for v, r in alone]
        s["scheduler_alone_vs_ort"] = bounded(a[0] / a[1])
    return s


def point_lines(s: dict, tries: list[dict], mode: str, n: int, ceiling: float, repeats: int) -> list[str]:
    """summarise_point's figures as printed: every ratio with the figure it was divided by."""
    pairs, alone = _pairs(tries), _alone_pairs(tries)
    pair = median_pair(pairs)
    beside = f"raw ORT at B={n} measured beside it"
    lines = [f"4. server [{mode}], {n} streams: {s['tokens_per_s']:,.0f} tok/s ("
             + (f"{f'the median pair {pair[0]:,.0f} tok/s: ' if len(pairs) > 1 else ''}{share(*pair, beside)}; "
                if pair else "")
             + f"{share(s['tokens_per_s'], ceiling, CEILING)}), ITL p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, "
             f"TTFT {s['ttft_ms']} ms, {s['tokens_per_message']} tok/msg, failed {s['failed']}"
             + (f"; runs {', '.join(f'{x:,.0f}' for x in s['tokens_per_s_runs'])}" if repeats > 1 else "")
             + (f" (against raw: {pair_runs(pairs)})" if repeats > 1 and pairs else "")
             + (f"; in the server: {where_it_went(i)}" if (i := s["inside_server"]) else "")]
    if alone:
        a = median_pair(alone)
        lines.append(f"   the scheduler alone (no gRPC, no client process), {n} streams: "
                     f"{a[0]:,.0f} tok/s, {share(*a, beside)} (runs {pair_runs(alone)})")
    return lines


def state_cost(cfg: BenchConfig, target: str, log=print) -> dict:
    """Section 6: the server at 64 streams with return_state, and with a state every N tokens,
    against without; runs interleaved as the points'."""
    n, mode = 64, cfg.sampling[0]
    variants = {"none": None, "return_state": {"return_state": True},
                f"state_every_{cfg.state_every}": {"state_every": cfg.state_every}}
    tries: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(max(2, cfg.repeats)):
        for k, extra in variants.items():
            tries[k].append(load(target, n, cfg.seconds, PROMPT, cfg.max_new_tokens, mode, extra)["tokens_per_s"])
    base = median(tries["none"])
    out = {}
    for k, runs in tries.items():
        med = median(runs)
        out[k] = {"tokens_per_s": med, "vs_none": med / base, "runs": runs}
    log(f"6. state hand-off [{mode}], {n} streams: " + ", ".join(
        f"{k} {v['tokens_per_s']:,.0f} tok/s ({v['vs_none']:.0%} of none's {base:,.0f})" for k, v in out.items()))
    return out
