"""The figures behind the sampler's design (docs/benchmark.md, "Sampling"), side by side in one run.

    python tools/sampler_bench.py [--json FILE]

For a char vocabulary (83) and word vocabularies (10,000 and 33,278), at batch 1, 64 and 256, on
logits shaped like a trained model's (a Zipf head and tail, ~3.8 nats at temperature 0.8), it
times per call:
  sort      the previous sampler: top_k by np.partition, top_p by a full argsort of [B, V]
  kernel    serve/sampling.py: the numba kernels, logits to token (their own exp, weighted
            selection, no sort)
  exp       the weights exp((logits - max) / T) alone: the kernels' pass, numpy's, and the same
            in a small ONNX Runtime graph (the kernels' input before they took the exp in)
  ort_topk  the candidate-window step vLLM uses (TopK of 64 per row) in ONNX Runtime, alone
Needs the train extra (onnx) for the two ONNX Runtime graphs.

    python tools/sampler_bench.py --checkpoint RUN_DIR --text FILE

adds the same timings (B=64) on a trained model's logits: its next-token logits after 20 tokens
of each of 64 stretches of FILE (torch, the train extra), and how often the kernels' windows hold
the boundary there (serve/sampling_kernels.py, WINDOW and WIDE_WINDOW). A PTB model trained for
ten minutes is enough (`lstmgen data fetch ptb` prints where the corpus is):
    lstmgen train --data ptb --preset ptb-small --max-seconds 600 --out runs/ptb-small
    python tools/sampler_bench.py --checkpoint runs/ptb-small --text PTB_DIR/ptb.valid.txt
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lstmgen.serve.params import SamplingParams
from lstmgen.serve.sampling import BatchSampling, choose, unnormalised_probs
from lstmgen.serve.sampling_kernels import WIDE_WINDOW, WINDOW, weights

MODES = {"plain": SamplingParams(temperature=0.8), "top_k": SamplingParams(temperature=0.8, top_k=40),
         "top_p": SamplingParams(temperature=0.8, top_p=0.9)}


def sort_sampler(logits, inv_t, top_k, top_p, u):
    """The sampler before: what the issue measured (partition for top_k, full argsort for top_p)."""
    x = logits * inv_t
    if top_k:
        kth = -np.partition(-x, top_k - 1, axis=1)[:, top_k - 1 : top_k]
        x = np.where(x < kth, -np.inf, x)
    w = np.exp(x - x.max(axis=1, keepdims=True))
    if top_p < 1:
        p = w / w.sum(axis=1, keepdims=True)
        order = np.argsort(-p, axis=1, kind="stable")
        sp = np.take_along_axis(p, order, axis=1)
        drop_sorted = (np.cumsum(sp, axis=1) - sp) >= top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=1)
        w = np.where(drop, 0.0, p)
    cdf = np.cumsum(w, axis=1)
    return np.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(axis=1), x.shape[1] - 1)


def zipf_logits(b: int, v: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = -1.1 * np.log(np.arange(1, v + 1))
    return np.stack([rng.permutation(z + rng.normal(0, 0.3, v)) for _ in range(b)]).astype(np.float32)


def trained_logits(checkpoint: str, text_file: str, b: int = 64, steps: int = 20) -> np.ndarray:
    """float32 [b, V]: a trained model's next-token logits after `steps` tokens of each of b
    consecutive stretches of the text."""
    import torch

    from lstmgen.text import encode, read_text
    from lstmgen.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    ids = encode(ckpt.vocab, read_text(text_file), lines=True).ids[: b * steps].tolist()
    if len(ids) < b * steps:
        raise SystemExit(f"{text_file}: {len(ids)} tokens, need {b * steps}")
    tokens = torch.tensor(ids).view(b, steps).t().contiguous()  # [T, B]: the model is time-major
    with torch.no_grad():
        logits, _ = model(tokens, model.init_state(b))
    return np.ascontiguousarray(logits[-1].numpy(), np.float32)


def window_coverage(x: np.ndarray, temperature: float = 0.8) -> dict:
    """Of the rows of logits x [B, V] at this temperature: the median count of tokens within each
    window, and the share of rows whose 0.9 nucleus and top 40 each window holds."""
    w = np.empty_like(x)
    weights(x, np.full(len(x), 1 / temperature, np.float32), w, np.empty(len(x), bool))
    total = w.sum(axis=1, dtype=np.float64)
    out = {}
    for name, t in (("window", WINDOW), ("wide_window", WIDE_WINDOW)):
        inside = w >= t
        mass = np.where(inside, w, 0).sum(axis=1, dtype=np.float64)
        out[name] = {"median_tokens": float(np.median(inside.sum(axis=1))),
                     "holds_top_p_0.9": float((mass >= 0.9 * total).mean()),
                     "holds_top_k_40": float((inside.sum(axis=1) >= 40).mean())}
    return out


def time_row(x: np.ndarray, graphs) -> dict:
    """Every timing of one [B, V] batch of logits."""
    b, v = x.shape
    u = np.random.default_rng(1).random(b)
    inv_t = np.full((b, 1), 1 / 0.8, np.float32)
    w, ok = np.empty_like(x), np.empty(b, bool)
    r = {"vocab": v, "batch": b, "exp_kernel": best_ms(lambda: weights(x, inv_t[:, 0], w, ok)),
         "exp_numpy": best_ms(lambda: unnormalised_probs(x, inv_t[:, 0]))}
    if graphs:
        r["exp_ort"] = best_ms(lambda: graphs[0].run(None, {"x": x, "it": inv_t}))
        r["ort_topk64"] = best_ms(lambda: graphs[1].run(None, {"x": x, "k": np.array([min(64, v)])}))
    for name, sp in MODES.items():
        bs = BatchSampling.from_params([sp] * b)
        r[f"sort_{name}"] = best_ms(lambda: sort_sampler(x, inv_t, sp.top_k, sp.top_p, u), 5)
        r[f"kernel_{name}"] = best_ms(lambda: choose(x, bs, u))
    return r


def report(r: dict, graphs, label: str = "") -> None:
    print(f"V={r['vocab']:>6} B={r['batch']:>3}{label}: exp kernel {r['exp_kernel']:.3f} ms, numpy {r['exp_numpy']:.3f}"
          + (f", ORT {r['exp_ort']:.3f}, ORT TopK-64 {r['ort_topk64']:.3f}" if graphs else "") + "; "
          + ", ".join(f"{m} sort {r[f'sort_{m}']:.3f} -> kernel {r[f'kernel_{m}']:.3f} ms "
                      f"({r[f'sort_{m}'] / r[f'kernel_{m}']:.1f}x)" for m in MODES), flush=True)


def best_ms(f, n: int = 15) -> float:
    """Best of n: on a shared machine the best run is the closest to the code's own cost."""
    f()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def ort_graphs():
    """(exp graph, TopK graph) sessions, or None without the onnx package."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "V"])
    it = helper.make_tensor_value_info("it", TensorProto.FLOAT, ["B", 1])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    e = helper.make_tensor_value_info("e", TensorProto.FLOAT, ["B", "V"])
    vals = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", "K"])
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, ["B", "K"])
    exp = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["m"], axes=[1], keepdims=1),
                             helper.make_node("Sub", ["x", "m"], ["d"]), helper.make_node("Mul", ["d", "it"], ["z"]),
                             helper.make_node("Exp", ["z"], ["e"])], "exp", [x, it], [e])
    topk = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)], "topk", [x, k], [vals, idx])
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    make = lambda g: ort.InferenceSession(  # noqa: E731
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString(),
        opts, providers=["CPUExecutionProvider"])
    return make(exp), make(topk)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--checkpoint", default=None, help="also time a trained model's logits (with --text)")
    p.add_argument("--text", default=None, help="text the trained model reads (its validation split)")
    args = p.parse_args()
    if bool(args.checkpoint) != bool(args.text):
        p.error("--checkpoint and --text go together")
    graphs = ort_graphs()
    rows = []
    for v in (83, 10_000, 33_278):
        for b in (1, 64, 256):
            rows.append(time_row(zipf_logits(b, v), graphs))
            report(rows[-1], graphs)
    if args.checkpoint:
        x = trained_logits(args.checkpoint, args.text)
        rows.append({**time_row(x, graphs), "logits": "trained", "windows_at_t0.8": window_coverage(x)})
        report(rows[-1], graphs, " (trained)")
        for name, c in rows[-1]["windows_at_t0.8"].items():
            print(f"  {name}: median {c['median_tokens']:.0f} tokens; holds a 0.9 nucleus in "
                  f"{c['holds_top_p_0.9']:.0%} of rows, the top 40 in {c['holds_top_k_40']:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
