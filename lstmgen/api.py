"""The in-process Python API, beside the CLI (as vLLM's `LLM` and nanoGPT's scripts give):

    import lstmgen
    best = lstmgen.train("tinyshakespeare", "runs/ts", lstmgen.TrainConfig(max_seconds=60))   # needs torch
    bundle = lstmgen.export(best, "bundles/ts")                                                # needs torch, onnx
    with lstmgen.Generator(bundle) as g:                                                       # ONNX Runtime only
        for c in g.generate(["ROMEO:", "JULIET:"], max_new_tokens=100, temperature=0.8, seed=1):
            print(c.prompt, c.text, c.finish_reason)

`Generator` runs the server's own scheduler (continuous batching, the same sampler and limits) and
reads each prompt to its end as offline sampling does (serve/completion.py), so prompts given
together share each model step, and a seeded prompt
gives the same text here, over gRPC and over HTTP. It never imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from lstmgen.export.bundle import ExportConfig
    from lstmgen.serve.records import TokenLogprob
    from lstmgen.train.config import TrainConfig


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str
    finish_reason: str  # "length" | "stop_sequence" | "end_of_text"
    prompt_tokens: int
    generated_tokens: int
    seed: int  # replays this completion when passed back with the same parameters
    stop_sequence: str = ""  # the stop string that ended it, if one did
    logprobs: tuple["TokenLogprob", ...] = ()  # with logprobs=True: one per generated token


@dataclass(frozen=True)
class EngineInfo:
    """The model a Generator runs in this process (GetModelInfo's ModelInfo describes a server's)."""

    level: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    quantization: str
    execution_provider: str


ModelInfo = EngineInfo  # its earlier name, kept for existing code


class Generator:
    """Text from a bundle in this process. `generate` may be called from any thread; `close()` (or
    `with`) stops the worker."""

    def __init__(self, bundle: str | os.PathLike, *, device: str = "auto", threads: int = 0, limits=None):
        from lstmgen.serve.engine import Engine, EngineConfig
        from lstmgen.serve.params import RequestLimits
        from lstmgen.serve.scheduler import Scheduler

        engine = Engine(str(bundle), EngineConfig(device=device, intra_op_threads=threads))
        self._scheduler = Scheduler(engine, limits or RequestLimits())
        m = engine.manifest
        self.info = EngineInfo(m.level, m.vocab_size, m.num_layers, m.hidden_size, m.quantization, engine.provider)
        self._scheduler.start()

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 greedy: bool = False, seed: int | None = None, stop: Sequence[str] = (),
                 skip_unknown: bool = False, logprobs: bool = False, top_logprobs: int = 0,
                 ) -> list[Completion] | Completion:
        """One Completion per prompt (a list for a list, one for a string). With `seed`, prompt i
        samples with seed + i (serve/completion.py nth_seed: the rule of every front end); without,
        each gets a fresh seed (reported in Completion.seed). Raises
        lstmgen.serve.errors.InvalidRequest naming a bad parameter."""
        from lstmgen.serve.completion import completions, nth_seed
        from lstmgen.serve.params import GenerationRequest, SamplingParams

        single = isinstance(prompts, str)
        items = [prompts] if single else list(prompts)
        base = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                              presence_penalty=presence_penalty, greedy=greedy)
        reqs = [GenerationRequest(prompt=p, max_new_tokens=max_new_tokens, stop=tuple(stop),
                                  sampling=base if seed is None else replace(base, seed=nth_seed(seed, i)),
                                  seed_given=seed is not None, skip_unknown=skip_unknown, logprobs=logprobs,
                                  top_logprobs=top_logprobs) for i, p in enumerate(items)]
        # Admission is bounded (RequestLimits); more prompts than rows wait here, not in the queue.
        # As they end, not in order: a finished result held behind a long earlier prompt would
        # take a window slot and hold the rest back.
        window = self._scheduler.limits.max_concurrent_streams
        out: list = [None] * len(reqs)
        for i, done in completions(self._scheduler.submit_completion, enumerate(reqs), window, ordered=False):
            if isinstance(done, Exception):
                raise done
            fin = done.finished
            out[i] = Completion(reqs[i].prompt, done.text, fin.reason.value, fin.prompt_tokens, fin.generated_tokens,
                                fin.seed, fin.stop_sequence, done.logprobs)
        return out[0] if single else out

    def close(self) -> None:
        self._scheduler.shutdown()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train(data: str | None, out: str | os.PathLike, config: "TrainConfig | str" = "tiny", *,
          resume: bool = False, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Train on `data` (a path, URL or corpus name such as "tinyshakespeare") into the run folder
    `out`; `config` is a TrainConfig (a language model), a FrameTrainConfig or a preset name. Returns the best checkpoint's path. The same
    code path as `lstmgen train` (needs torch).

    A folder that already holds a run: `resume=True` continues it (data may then be None: the run's
    own), `overwrite=True` starts it over; without either, a TrainError says so. Ctrl-C saves the
    run's last.pt and raises KeyboardInterrupt; `resume=True` continues from there."""
    from lstmgen.train.config import PRESETS
    from lstmgen.train.trainer import train as run_training

    cfg = PRESETS[config] if isinstance(config, str) else config
    return run_training(cfg, data, out, resume=resume, overwrite=overwrite,
                        progress_bar=progress if progress is not None else True)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, config: "ExportConfig | None" = None) -> Path:
    """Export a checkpoint (or run folder) to a verified bundle folder; returns `out` as a Path,
    ready for Generator. The same code path as `lstmgen export` (needs torch and onnx)."""
    from lstmgen.export.bundle import ExportConfig, export_bundle

    export_bundle(checkpoint, out, config or ExportConfig())
    return Path(out)
