"""One `lstmgen bench` run: every section in turn on the same model, and the JSON report."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path

from lstmgen.tools.bench.ceiling import cpu_model, flops_per_token, matmul_rates, torch_eager
from lstmgen.tools.bench.config import BenchConfig
from lstmgen.tools.bench.counters import sampling_share
from lstmgen.tools.bench.model import make_bundle
from lstmgen.tools.bench.report import CEILING, share
from lstmgen.tools.bench.server import point_lines, server_runs, start_server, state_cost, summarise_point
from lstmgen.tools.bench.step import RawStep, ort_steps, uniform_worst_case
from lstmgen.tools.bench.ttft import prefix_ttft


def run_bench(cfg: BenchConfig, log=print) -> dict:
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
    ceiling = max(rates.values()) / fpt
    log(f"1. fp32 matmul {max(rates.values()) / 1e9:.1f} GFLOP/s ("
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + f") -> ceiling {ceiling:,.0f} tokens/s")
    eager = torch_eager(ckpt, cfg.eager_tokens)
    log(f"2. PyTorch eager, one request: {eager:,.0f} tokens/s")
    raw_step, ort, steps, worst = raw_sections(cfg, bundle, mc.vocab_size, ceiling, log)
    by_mode, prefix, states = server_sections(cfg, bundle, ckpt.vocab, raw_step, ort, ceiling, log)
    return {
        "ceiling_tokens_per_s": ceiling,
        "torch_eager_tokens_per_s": eager,
        "ort_step_tokens_per_s": ort,
        "ort_step_and_sampling": steps,
        "sampling_uniform_worst_case_ms": worst,
        "server": by_mode[cfg.sampling[0]],  # the first sampling mode, as before
        "server_by_sampling": by_mode,
        "ttft_prompt_1000_ms": prefix["cold_ms"],
        "prefix_cache_ttft": prefix,
        "state_cost_64_streams": states,
        "logit_entropy_nats": entropy,
        "ratios": ratios(by_mode, steps, eager),
        "model": {**asdict(mc), "parameters": params, "flops_per_token": fpt, "quantization":
                  "int8-dynamic" if cfg.int8 else "fp32", "preset": cfg.preset, "checkpoint": cfg.checkpoint,
                  "level": ckpt.vocab.level},
        "machine": machine(rates),
        "config": asdict(cfg),
    }


def raw_sections(cfg: BenchConfig, bundle: Path, vocab_size: int, ceiling: float, log) -> tuple:
    """Section 3 -> (the raw step the server points are paired with, tokens/s by batch, step and
    sampler ms by batch, the sampler on uniform logits at the largest batch)."""
    from lstmgen.serve.engine import EngineConfig

    batches = sorted(set(cfg.batches) | {n for n in cfg.concurrency if n <= max(cfg.batches)})
    # the raw step with ORT's default session options, at the server's thread count: with --threads N
    # the server's N-thread step is paired with an N-thread raw step, not with one on every core
    raw_step = RawStep(bundle, EngineConfig(device="cpu", intra_op_threads=cfg.threads, spin="on"))  # ORT's own
    served = RawStep(bundle, EngineConfig(device="cpu", intra_op_threads=cfg.threads))  # the server's spin
    ort, steps = ort_steps(raw_step, batches, modes=cfg.sampling, served=served)
    del served  # its session's memory
    log("3. ORT step: " + ", ".join(f"B={b}: {v:,.0f} tok/s ({share(v, ceiling, CEILING)})" for b, v in ort.items()))
    for b, d in steps.items():
        log(f"   B={b}: step {d['step_ms']:.3f} ms; sampling " + ", ".join(
            f"{m} {ms:.3f} ms ({ms / d['step_ms']:.0%} of the step)" for m, ms in d["sampling_ms"].items()))
    worst_b = max(batches)
    worst = uniform_worst_case(vocab_size, worst_b, cfg.sampling)
    log(f"   uniform worst case (not targeted), B={worst_b}: " + ", ".join(
        f"{m} {ms:.3f} ms ({ms / steps[str(worst_b)]['step_ms']:.0%} of the step)" for m, ms in worst.items()))
    return raw_step, ort, steps, {"batch": worst_b, **worst}


def server_sections(cfg: BenchConfig, bundle: Path, vocab, raw_step: RawStep, ort: dict, ceiling: float,
                    log) -> tuple[dict, dict, dict]:
    """Sections 4-6 against the real server in its own process -> (points by mode and stream count,
    the prefix cache's TTFT, the state hand-off's cost)."""
    by_mode: dict[str, dict] = {}
    proc, target, metrics_url = start_server(bundle, cfg.threads, max(cfg.concurrency))
    try:
        runs = server_runs(cfg, bundle, target, metrics_url, raw_step, ort)
        for mode in cfg.sampling:
            points = by_mode[mode] = {}
            for n in cfg.concurrency:
                points[str(n)] = summarise_point(runs[(mode, n)], n, ceiling)
                for line in point_lines(points[str(n)], runs[(mode, n)], mode, n, ceiling, cfg.repeats):
                    log(line)
        prefix = prefix_ttft(target, vocab, cfg.prompt_chars, cfg.prompt_chars * 95 // 100)
        log(f"5. TTFT with a {cfg.prompt_chars}-char prompt: cold {prefix['cold_ms']:.1f} ms; sharing its first "
            f"{prefix['shared_chars']} chars with the prompt before (prefix cache hit) {prefix['hit_ms']:.1f} ms "
            f"({prefix['speedup']:.1f}x faster)")
        states = state_cost(cfg, target, log) if cfg.state_every else {}
    finally:
        proc.terminate()
        proc.wait(30)
    return by_mode, prefix, states


def ratios(by_mode: dict, steps: dict, eager: float) -> dict:
    """The report's ratios: None where the figure went over its ceiling (disturbed by other load)
    or was not measured."""
    server = next(iter(by_mode.values()))
    return {
        "server_64_vs_ceiling": server.get("64", {}).get("vs_ceiling"),
        "server_1_vs_ort_batch_1": server.get("1", {}).get("vs_ort_same_batch"),
        "server_64_vs_torch_eager": server.get("64", {}).get("tokens_per_s", 0) / eager,
        "by_sampling": {m: {"server_64_vs_ort_batch_64": pts.get("64", {}).get("vs_ort_same_batch"),
                            "scheduler_alone_64_vs_ort_batch_64": pts.get("64", {}).get("scheduler_alone_vs_ort"),
                            "server_1_vs_ort_batch_1": pts.get("1", {}).get("vs_ort_same_batch"),
                            "sampling_vs_step_batch_64": (steps["64"]["sampling_ms"][m] / steps["64"]["step_ms"]
                                                          if "64" in steps else None),
                            "in_server_sampling_vs_step_64": sampling_share(pts.get("64", {}).get("inside_server"))}
                        for m, pts in by_mode.items()},
    }


def machine(rates: dict[str, float]) -> dict:
    import onnxruntime
    import torch

    return {"matmul_flops_per_s": max(rates.values()), "matmul_flops_per_s_by_library": rates,
            "cpus": os.cpu_count(), "processor": platform.processor(), "cpu_model": cpu_model(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
