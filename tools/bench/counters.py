"""Reading the server's counters around a point: where each iteration of its worker went.

The metric names are the server's (serve/metrics.py); lstmgen.tools.scrape reads them off /metrics.
"""
from __future__ import annotations

import os


def inside_server(deltas: dict, seconds: float | None = None) -> dict:
    """What the server's counters grew by (scrape.counter_deltas) -> its mean decode step and the
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


def sampling_share(inside: dict | None) -> float | None:
    """The sampler's time as a share of the model step's, inside the server (None: not read)."""
    return inside["sampling_ms"] / inside["step_ms"] if inside else None
