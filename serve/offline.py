"""`lstmgen sample`: batch offline sampling on the local ONNX Runtime engine, no server.

Uses the same scheduler as the server, so prompts and samples are batched into shared steps.
Prompts come from a text file (one per line) or JSONL (`{"prompt": ..., optional per-prompt
"max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_samples", "stop", "id"}`).
Every output line records the seed that reproduces it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lstmgen.serve.params import GenerationRequest, Limits, SamplingParams


@dataclass(frozen=True)
class Job:
    index: int  # prompt's position in the input
    sample: int  # sample number for that prompt
    request: GenerationRequest
    meta: dict  # e.g. the input's "id"


def read_prompts(path: Path) -> list[dict]:
    """Text: one prompt per non-empty line. JSONL (.jsonl/.json or lines starting with '{')."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read prompts: {e}") from e
    jsonl = path.suffix in (".jsonl", ".json") or (lines and lines[0].lstrip().startswith("{"))
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append({"prompt": line})
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{n}: expected an object with a string \"prompt\"")
        out.append(item)
    if not out:
        raise ValueError(f"{path}: no prompts found")
    return out


def sample_seed(base: int, index: int, sample: int) -> int:
    """Independent, reproducible seed per (prompt, sample)."""
    return int(np.random.SeedSequence([base, index, sample]).generate_state(1, np.uint64)[0] >> 1)


def make_jobs(items: list[dict], defaults: SamplingParams, num_samples: int, max_new_tokens: int | None,
              stop: tuple[str, ...], base_seed: int, skip_unknown: bool) -> list[Job]:
    jobs = []
    for i, item in enumerate(items):
        sampling = replace(defaults, **{k: item[k] for k in ("temperature", "top_k", "top_p", "greedy") if k in item})
        for j in range(int(item.get("num_samples", num_samples))):
            seed = int(item["seed"]) + j if "seed" in item else sample_seed(base_seed, i, j)
            req = GenerationRequest(prompt=item["prompt"], max_new_tokens=item.get("max_new_tokens", max_new_tokens),
                                    sampling=replace(sampling, seed=seed), seed_given=True,
                                    stop=tuple(item.get("stop", stop)), skip_unknown=skip_unknown)
            jobs.append(Job(i, j, req, {"id": item["id"]} if "id" in item else {}))
    return jobs


async def run_jobs(scheduler, jobs: list[Job], out, progress) -> int:
    """Runs every job through the scheduler; writes results in input order; returns failures."""
    from lstmgen.serve.errors import GenerationError

    results: dict[int, dict] = {}
    next_to_write = 0
    failures = 0

    async def one(k: int, job: Job) -> None:
        nonlocal next_to_write, failures
        row = {"index": job.index, "sample": job.sample, **job.meta, "prompt": job.request.prompt,
               "seed": job.request.sampling.seed}
        try:
            parts, fin = [], None
            async for chunk in scheduler.submit(job.request):
                parts.append(chunk.text)
                fin = chunk.finished or fin
            row.update(text="".join(parts), finish_reason=fin.reason.value,
                       prompt_tokens=fin.prompt_tokens, generated_tokens=fin.generated_tokens)
        except GenerationError as e:
            row["error"] = str(e)
            failures += 1
        results[k] = row
        progress.update(1)
        while next_to_write in results:
            out.write(json.dumps(results.pop(next_to_write), ensure_ascii=False) + "\n")
            next_to_write += 1

    window = asyncio.Semaphore(2 * scheduler.limits.max_concurrent_streams)  # bounded memory

    async def guarded(k: int, job: Job) -> None:
        async with window:
            await one(k, job)

    await asyncio.gather(*(guarded(k, job) for k, job in enumerate(jobs)))
    return failures


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE_DIR", help="bundle folder made by `lstmgen export`")
    p.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL")
    p.add_argument("--out", required=True, help="output JSONL, one line per sample")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="base seed; each sample's seed derives from it")
    p.add_argument("--batch-size", type=int, default=256, help="rows generated together")
    p.add_argument("--skip-unknown", action="store_true", help="drop prompt characters the model does not know")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="execution provider")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")


def run(args: argparse.Namespace) -> int:
    import secrets

    from tqdm import tqdm

    from lstmgen.bundle import BundleError
    from lstmgen.serve.engine import Engine, EngineConfig
    from lstmgen.serve.scheduler import Scheduler

    try:
        items = read_prompts(Path(args.prompts))
        engine = Engine(args.bundle, EngineConfig(device=args.device, intra_op_threads=args.threads))
    except (ValueError, BundleError, RuntimeError) as e:
        print(f"lstmgen sample: {e}", file=sys.stderr)
        return 2
    base_seed = args.seed if args.seed is not None else secrets.randbits(32)
    defaults = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)
    jobs = make_jobs(items, defaults, args.num_samples, args.max_new_tokens, tuple(args.stop), base_seed,
                     args.skip_unknown)
    limits = Limits(max_new_tokens=max(Limits().max_new_tokens, args.max_new_tokens),
                    max_concurrent_streams=args.batch_size, max_queued_streams=len(jobs) + 1)

    async def main() -> int:
        scheduler = Scheduler(engine, limits)
        scheduler.start()
        try:
            with open(args.out, "w", encoding="utf-8") as out, \
                    tqdm(total=len(jobs), unit="sample", file=sys.stderr) as progress:
                return await run_jobs(scheduler, jobs, out, progress)
        finally:
            await scheduler.close()

    failures = asyncio.run(main())
    print(f"lstmgen sample: {len(jobs) - failures}/{len(jobs)} samples written to {args.out} "
          f"(base seed {base_seed})", file=sys.stderr)
    return 1 if failures else 0
