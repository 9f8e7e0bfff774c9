"""`lstmgen bench`: one run, one model, every layer measured side by side.

1. the machine's fp32 matmul rate and the model's ceiling in tokens/s (FLOPs per token from its
   shapes); 2. PyTorch eager generation one request at a time (the seeds' sampling loop);
3. raw ONNX Runtime step throughput at several batch sizes; 4. the real gRPC server under 1..256
concurrent streams driven by a separate client process; 5. time to first token for a long prompt.
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
    vocab_size: int = 83  # for random weights (Anna Karenina has 83 symbols)
    work_dir: str = "bench-out"
    concurrency: tuple[int, ...] = (1, 8, 64, 256)
    batches: tuple[int, ...] = (1, 8, 32, 128)
    seconds: float = 8.0  # per server point
    max_new_tokens: int = 256
    prompt_chars: int = 1000
    eager_tokens: int = 400
    int8: bool = False
    threads: int = 0  # ORT intra-op threads in the server (0: default)


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


def make_bundle(cfg: BenchConfig, work: Path):
    import torch

    from lstmgen.export.bundle import export_bundle
    from lstmgen.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from lstmgen.train.config import preset
    from lstmgen.train.model import StackedLSTM
    from lstmgen.vocab import Vocab

    if cfg.checkpoint:
        ckpt = load_checkpoint(cfg.checkpoint)
    else:
        symbols = (" \n" + string.ascii_letters + string.punctuation + string.digits)[: cfg.vocab_size]
        vocab = Vocab("char", tuple(sorted(symbols)))
        tc = preset(cfg.preset)
        torch.manual_seed(0)
        model = StackedLSTM(tc.model_config(len(vocab)))
        ckpt = Checkpoint(tc.model_config(len(vocab)), tc, vocab, model.state_dict(),
                          corpus={"source": f"random weights, {cfg.preset} shape"})
        save_checkpoint(ckpt, work / "model.pt")
    path = cfg.checkpoint or work / "model.pt"
    export_bundle(path, work / "bundle", int8=cfg.int8)
    return ckpt, work / "bundle"


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


def ort_steps(bundle: Path, batches, seconds: float = 1.5) -> dict[str, float]:
    import numpy as np

    from lstmgen.serve.engine import Engine, EngineConfig

    engine = Engine(bundle, EngineConfig(device="cpu"))
    out = {}
    for b in batches:
        tokens = np.zeros(b, np.int64)
        h, c = engine.zeros(b)
        for _ in range(5):
            engine.step(tokens, h, c)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _, h, c = engine.step(tokens, h, c)
            n += 1
        out[str(b)] = b * n / (time.perf_counter() - t0)
    return out


def start_server(bundle: Path, threads: int, max_concurrent: int):
    cmd = [sys.executable, "-m", "lstmgen.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--threads", str(threads), "--log-level", "WARNING",
           "--max-concurrent", str(max_concurrent), "--max-prompt-chars", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    m = re.search(r"serving on ([\d.]+):(\d+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, f"{m.group(1)}:{m.group(2)}"


def load(target: str, streams: int, seconds: float, prompt: str, max_new_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "lstmgen_client.loadgen", "--target", target, "--streams", str(streams),
           "--seconds", str(seconds), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_bench(cfg: BenchConfig, log=print) -> dict:
    import torch

    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = make_bundle(cfg, work)
    mc = ckpt.model_config
    fpt = flops_per_token(mc)
    params = sum(v.numel() for k, v in ckpt.state_dict.items() if not (mc.tie_weights and k == "head.weight"))
    log(f"model: {mc.num_layers} x {mc.hidden_size}, embedding {mc.embedding_size}, vocab {mc.vocab_size}, "
        f"{params / 1e6:.2f}M parameters, {fpt / 1e6:.2f} MFLOP/token")
    rates = matmul_rates()
    rate = max(rates.values())
    ceiling = rate / fpt
    log(f"1. fp32 matmul {rate / 1e9:.1f} GFLOP/s ("
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + f") -> ceiling {ceiling:,.0f} tokens/s")
    eager = torch_eager(ckpt, cfg.eager_tokens)
    log(f"2. PyTorch eager, one request: {eager:,.0f} tokens/s")
    ort = ort_steps(bundle, cfg.batches)
    log("3. ORT step: " + ", ".join(f"B={b}: {v:,.0f} tok/s ({v / ceiling:.0%})" for b, v in ort.items()))
    server, ttft_prompt = {}, None
    proc, target = start_server(bundle, cfg.threads, max(cfg.concurrency))
    try:
        for n in cfg.concurrency:
            server[str(n)] = load(target, n, cfg.seconds, "The ", cfg.max_new_tokens)
            s = server[str(n)]
            log(f"4. server, {n} streams: {s['tokens_per_s']:,.0f} tok/s ({s['tokens_per_s'] / ceiling:.0%} of "
                f"ceiling), ITL p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms, TTFT {s['ttft_ms']} ms, "
                f"{s['tokens_per_message']} tok/msg, failed {s['failed']}")
        prompt = ("".join(ckpt.vocab.tokens) * (cfg.prompt_chars // len(ckpt.vocab) + 1))[: cfg.prompt_chars]
        prompt = prompt.replace("\x03", " ")
        long = load(target, 1, 5.0, prompt, 1)
        ttft_prompt = long["ttft_ms"]
        log(f"5. TTFT with a {cfg.prompt_chars}-char prompt: {ttft_prompt} ms (p99 {long['ttft_p99_ms']} ms)")
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "ceiling_tokens_per_s": ceiling,
        "torch_eager_tokens_per_s": eager,
        "ort_step_tokens_per_s": ort,
        "server": server,
        "ttft_prompt_1000_ms": ttft_prompt,
        "ratios": {
            "server_64_vs_ceiling": server.get("64", {}).get("tokens_per_s", 0) / ceiling,
            "server_1_vs_ort_batch_1": server.get("1", {}).get("tokens_per_s", 0) / ort.get("1", 1),
            "server_64_vs_torch_eager": server.get("64", {}).get("tokens_per_s", 0) / eager,
        },
        "model": {**asdict(mc), "parameters": params, "flops_per_token": fpt, "quantization":
                  "int8-dynamic" if cfg.int8 else "fp32", "preset": cfg.preset, "checkpoint": cfg.checkpoint},
        "machine": {"matmul_flops_per_s": rate, "matmul_flops_per_s_by_library": rates,
                    "cpus": os.cpu_count(), "processor": platform.processor(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "config": asdict(cfg),
    }


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(int(k) for k in result["server"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, [result["server"][str(x)]["tokens_per_s"] for x in xs], "o-", label="gRPC server (aggregate)")
    ob = sorted(int(k) for k in result["ort_step_tokens_per_s"])
    ax.plot(ob, [result["ort_step_tokens_per_s"][str(b)] for b in ob], "s--", label="raw ORT step at batch B")
    ax.axhline(result["ceiling_tokens_per_s"], color="red", label="fp32 matmul ceiling")
    ax.axhline(result["torch_eager_tokens_per_s"], color="gray", ls=":", label="PyTorch eager, 1 request")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams (server) / batch size (ORT)")
    ax.set_ylabel("tokens/s")
    m = result["model"]
    ax.set_title(f"{m['num_layers']}x{m['hidden_size']} char LSTM, {m['quantization']}, "
                 f"{result['machine']['cpus']} CPUs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--preset", default=d.preset, help="model shape for random weights")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint or run dir instead of random weights")
    p.add_argument("--work-dir", default=d.work_dir, help="where the bundle is written")
    p.add_argument("--concurrency", default=",".join(map(str, d.concurrency)), help="server stream counts")
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="raw ORT batch sizes")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measurement window per server point")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per request")
    p.add_argument("--int8", action="store_true", help="benchmark the int8 (dynamic quantized) export")
    p.add_argument("--threads", type=int, default=d.threads, help="server ORT intra-op threads (0: default)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="draw tokens/s against concurrency into this PNG")


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig(preset=args.preset, checkpoint=args.checkpoint, work_dir=args.work_dir,
                      concurrency=tuple(int(x) for x in args.concurrency.split(",")),
                      batches=tuple(int(x) for x in args.batches.split(",")), seconds=args.seconds,
                      max_new_tokens=args.max_new_tokens, int8=args.int8, threads=args.threads)
    result = run_bench(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0
