"""Section 1: the machine's fp32 matmul rate, and the model's ceiling in tokens/s (FLOPs per token
from its shapes); section 2: PyTorch eager generation, one request at a time."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
