"""The figure: tokens/s against concurrency, the server beside the raw step, under the ceiling."""
from __future__ import annotations


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
