"""`lstmgen sample`: batch offline sampling from a bundle, no server.

Prompts stream in from a text file (one per line), JSONL or Parquet, chosen by extension; samples
stream out to JSONL (default), tab-separated text (.txt/.tsv) or Parquet. Every output record
carries the prompt's index (and "id" when the input gives one), the sample number and the seed
that reproduces it. `--resume` continues a killed run exactly; `--ray` runs the job on Ray Data.
JSONL prompt fields are listed in docs/offline.md.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from dataclasses import asdict
from pathlib import Path

from lstmgen import config_args
from lstmgen.offline.jobs import CheckedInput, SampleConfig, check_input, iter_jobs
from lstmgen.offline.lock import OutputLock, lock_path
from lstmgen.offline.outputs import DurableAppender, dump_line, journal_path, journal_to_parquet, output_format
from lstmgen.offline.progress import Progress
from lstmgen.offline.prompts import INT_RANGES, Fingerprint, InputError, read_items, shown, span
from lstmgen.offline.resume import (ResumeError, check_same_run, extra_lines_warning, finished_keys, max_tokens_of,
                                    repair, run_file, skip_finished, write_run_file)
from lstmgen.serve.params import RequestLimits, SamplingParams


# Config fields without a flag of their own -> the flag that sets them (tests/test_config_args.py):
# --seed (unset: a random base seed) gives SampleConfig.seed, from which each sample's SamplingParams.seed
# derives; --logprobs N turns logprobs on with N alternatives.
SAMPLE_ELSEWHERE = {"seed": "--seed", "logprobs": "--logprobs", "top_logprobs": "--logprobs"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lstmgen.serve.engine import EngineConfig

    p.formatter_class = config_args.DefaultsFormatter
    add = config_args.add_dataclass_arguments
    p.add_argument("bundle", metavar="BUNDLE_DIR", help="bundle folder made by `lstmgen export`")
    p.add_argument("--prompts", required=True, help="prompts: .jsonl/.json (objects), .parquet, else text (one a line)")
    p.add_argument("--out", required=True, help="samples: .jsonl (default), .parquet, or .txt/.tsv (tab-separated)")
    g = p.add_argument_group("sampling (defaults; a JSONL prompt's own fields override them)")
    add(g, SampleConfig, only=("num_samples", "max_new_tokens"))
    add(g, SamplingParams, exclude=SAMPLE_ELSEWHERE)
    add(g, SampleConfig, only=("stop",))
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="record each token's log-probability and the N most likely alternatives (0: none)")
    g.add_argument("--seed", type=int, default=None, help="base seed; each sample's seed derives from it")
    add(g, SampleConfig, only=("skip_unknown",))
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=256, help="rows generated together")
    r.add_argument("--window", type=int, default=0,
                   help="samples in flight (and, with --ordered, held for reordering); 0: 4 x batch size")
    r.add_argument("--ordered", action="store_true", help="write samples in input order")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    add(r, EngineConfig, only=("device", "intra_op_threads"), helps={
        "intra_op_threads": "ONNX Runtime intra-op threads (0: ORT's default; with --ray: per actor, default 1)"})
    r.add_argument("--quiet", action="store_true", help="no progress display")
    r.add_argument("--progress-interval", type=float, default=None,
                   help="seconds between progress lines when stderr is not a terminal (default 10)")
    y = p.add_argument_group("Ray (needs the 'ray' extra)")
    y.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a new local instance, or the cluster at ADDRESS; --out becomes a folder")
    y.add_argument("--ray-actors", type=int, default=1, help="actors, each with one engine and scheduler")
    y.add_argument("--ray-cpus-per-actor", type=float, default=None,
                   help="CPUs each actor reserves from Ray (default: its thread count, or its share of the "
                        "cluster's CPUs less 0.5 for the write tasks when that is smaller)")
    y.add_argument("--verbose", action="store_true",
                   help="show Ray's own progress bars and logs (default: they go to OUT.ray.log)")


def sample_config(args: argparse.Namespace, seed: int) -> SampleConfig:
    return config_args.from_args(SampleConfig, args, exclude=SAMPLE_ELSEWHERE, seed=seed,
                                 logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0)


def _fail(message: str) -> int:
    print(f"lstmgen sample: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.window < 0 or args.num_samples < 1 or args.ray_actors < 1:
        return _fail("--batch-size, --num-samples and --ray-actors must be >= 1, --window >= 0")
    if (message := _flag_error(args)) is not None:
        return _fail(message)
    try:
        return _run_ray(args) if args.ray is not None else _run_local(args)
    except (InputError, ResumeError) as e:
        return _fail(str(e))


def _flag_error(args: argparse.Namespace) -> str | None:
    """A sampling flag outside what the kernels and the resume key accept, named (as a record's
    field would be), or None: checked before any record, so the message blames the flag."""
    values = {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens, "top_k": args.top_k,
              "top_logprobs": args.logprobs, "seed": args.seed}
    for name, v in values.items():
        lo, hi = INT_RANGES[name]
        if v is not None and not lo <= v <= hi:
            flag = "--logprobs" if name == "top_logprobs" else "--" + name.replace("_", "-")
            return f"{flag} is {shown(v)}; allowed {span(lo, hi)}"
    return None


def _written_files(out: str) -> tuple[Path, ...]:
    """Every file a run into `out` writes, replaces or removes."""
    out_path, meta = Path(out), run_file(out)
    return (out_path, journal_path(out), meta, out_path.with_name(out_path.name + ".tmp"),
            meta.with_name(meta.name + ".tmp"), lock_path(out))


def _check_not_an_input(args: argparse.Namespace) -> None:
    """Refuses an --out that is (by inode: through symlinks and hard links too) the --prompts file
    or a file of the bundle: --overwrite would delete it, a run append to it."""
    bundle = Path(args.bundle)
    inputs = [("the --prompts file", Path(args.prompts))]
    inputs += [("a file of the bundle", f) for f in (bundle.iterdir() if bundle.is_dir() else ())]
    for written in _written_files(args.out):
        for what, path in inputs:
            if _same_file(written, path):
                raise ResumeError(f"--out {args.out} would write over {what} ({path}"
                                  f"{'' if written == Path(args.out) else ', as ' + str(written)}): "
                                  "--overwrite or --resume would destroy the input; choose another --out")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _prepare_output(args: argparse.Namespace, settings: dict) -> tuple[dict, bool]:
    """Checks --out against --resume/--overwrite, makes its folder; returns the run's settings
    (the first run's when resuming) and whether a Parquet output is already complete."""
    out, journal, meta = Path(args.out), journal_path(args.out), run_file(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for f in (out, journal, meta):
            f.unlink(missing_ok=True)
    exists = journal.exists() or out.exists()
    if exists and not args.resume:
        raise ResumeError(f"{args.out} exists: pass --resume to continue it or --overwrite to start again")
    if args.resume and exists:
        first = check_same_run(meta, settings)
        if "input" not in first:
            print(f"lstmgen sample: warning: the first run did not record its input; cannot check that "
                  f"{args.prompts} is unchanged", file=sys.stderr)
            first["input"] = settings["input"]
        if args.seed is not None and args.seed != first["seed"]:
            raise ResumeError(f"--resume: --seed {args.seed} differs from the first run's {first['seed']}")
        return first, not journal.exists()  # Parquet: the journal is gone once the file is whole
    return settings, False


def _run_local(args: argparse.Namespace) -> int:
    _check_not_an_input(args)  # before the lock file is written: it must not be an input either
    # One writer per output, for the whole run: a second run into it (a wrapper killed while its
    # child runs on) fails here at once instead of appending every sample again.
    with OutputLock(args.out):
        return _run_locked(args)


def _run_locked(args: argparse.Namespace) -> int:
    from lstmgen.bundle import BundleError
    from lstmgen.offline.runner import offline_limits
    from lstmgen.serve.engine import Engine, EngineConfig

    fmt = output_format(args.out)
    window = args.window or 4 * args.batch_size
    cfg = sample_config(args, args.seed if args.seed is not None else secrets.randbits(32))
    settings = {"bundle": str(Path(args.bundle).resolve()), "prompts": str(Path(args.prompts).resolve()),
                "format": fmt, "seed": cfg.seed, "config": _jsonable({**asdict(cfg), "seed": None})}
    limits = offline_limits(args.batch_size, window, args.max_new_tokens)
    checked = check_input(args.prompts, cfg, limits, counts=args.resume)  # before anything is written
    total, settings["input"] = checked.samples, checked.identity
    settings, complete = _prepare_output(args, settings)
    if complete:
        print(f"lstmgen sample: {args.out} is already complete", file=sys.stderr)
        return 0
    cfg = sample_config(args, settings["seed"])
    try:
        engine = Engine(args.bundle, config_args.from_args(EngineConfig, args))
    except (ValueError, BundleError, RuntimeError) as e:
        return _fail(str(e))
    journal = journal_path(args.out)
    write_run_file(run_file(args.out), settings)
    done = _finished(journal, fmt, checked, total)
    reread = Fingerprint()  # the run's own read of the input, to catch an edit during the run
    jobs = iter_jobs(read_items(args.prompts, reread), cfg)
    if done is not None:
        jobs = skip_finished(jobs, done)
    budget = checked.tokens - (0 if done is None else max_tokens_of(done, checked.max_tokens))
    progress = Progress(total, 0 if done is None else len(done), interval=args.progress_interval,
                        enabled=not args.quiet, budget=budget)
    appender = DurableAppender(journal)
    try:
        errors, retries = _sample(engine, limits, jobs, window, args.ordered, appender, fmt, progress)
    except KeyboardInterrupt:
        appender.close()
        print(f"\nlstmgen sample: interrupted; rerun with --resume to continue into {args.out}", file=sys.stderr)
        return 130
    appender.close()
    progress.close()
    if reread.as_dict() != checked.identity:
        print(f"lstmgen sample: {args.prompts} changed during the run: {args.out} may mix samples of the old "
              "and the new prompts; rerun with --overwrite", file=sys.stderr)
        return 1
    if retries:
        print(f"lstmgen sample: {retries} sample(s) failed in the model and were not written; "
              "rerun with --resume to retry them", file=sys.stderr)
        return 1
    if fmt == "parquet":
        journal_to_parquet(journal, Path(args.out), checked.int_ids)
    print(f"lstmgen sample: {total:,} samples in {args.out} ({errors} with an error; base seed {cfg.seed})",
          file=sys.stderr)
    return 1 if errors else 0


def _finished(journal: Path, fmt: str, checked: CheckedInput, total: int):
    """The keys already written when resuming (None for a fresh run), after repairing a torn
    last line and reporting duplicated or foreign lines."""
    if not journal.exists():
        return None
    torn = repair(journal)
    finished = finished_keys(journal, fmt, checked.counts)
    if (warning := extra_lines_warning(journal, finished)) is not None:
        print(f"lstmgen sample: {warning}", file=sys.stderr)
    print(f"lstmgen sample: resuming: {len(finished.keys):,} of {total:,} samples already written"
          + (f"; cut a torn last line ({torn} bytes)" if torn else ""), file=sys.stderr)
    return finished.keys


def _sample(engine, limits: RequestLimits, jobs, window: int, ordered: bool, appender: DurableAppender, fmt: str,
            progress: Progress) -> tuple[int, int]:
    from lstmgen.offline.runner import results
    from lstmgen.serve.scheduler import Scheduler

    scheduler = Scheduler(engine, limits)
    scheduler.start()
    # A long sample finishes only at its end: the line is due on its interval all the same, with
    # the tokens unfinished samples have made so far.
    ticker = progress.follow(lambda: scheduler.stats().tokens_generated)
    errors = retries = 0
    try:
        for r in results(scheduler, jobs, window, ordered, ticker):
            unused = r.job.request.max_new_tokens - r.tokens  # stopped early or failed: no longer ahead
            if r.retry:
                retries += 1
                progress.update(0, r.tokens, unused)
                continue
            errors += "error" in r.row
            appender.write(dump_line(r.row, fmt))
            progress.update(1, r.tokens, unused)
    finally:
        scheduler.shutdown()
    return errors, retries


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else _jsonable(v) if isinstance(v, dict) else v) for k, v in d.items()}


def _run_ray(args: argparse.Namespace) -> int:
    if args.resume or output_format(args.out) == "tsv":
        return _fail("--ray writes a folder of .jsonl or .parquet files and has no --resume")
    if "://" in args.out:  # a URI: the storage's own rules apply
        return _run_ray_into(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ResumeError(f"--out {out} is a file; --ray writes a folder of .jsonl or .parquet files")
    with OutputLock(args.out):  # one writer per output, as the local path; before anything is removed
        old = _ray_outputs(out, args.overwrite)
        kept = (set(out.iterdir()) if out.is_dir() else set()) - set(old)
        code = _run_ray_into(args, lambda: [f.unlink() for f in old])
        if out.is_dir():  # what this run wrote: the only files a later --overwrite removes
            ours = sorted(f.name for f in set(out.iterdir()) - kept if f.suffix in (".jsonl", ".parquet"))
            _ray_record(out).write_text("".join(name + "\n" for name in ours))
        return code


def _ray_record(out: Path) -> Path:
    """Beside a --ray output folder (as OUT.lock and OUT.ray.log): the files its last run wrote."""
    return Path(str(out) + ".files")


def _ray_outputs(out: Path, overwrite: bool) -> list[Path]:
    """An earlier --ray run's files in `out`, which --overwrite may remove; any other output file
    there refuses the run (Ray would write beside it, and the folder would mix two runs)."""
    if not out.is_dir():
        return []
    record = _ray_record(out)
    ours = set(record.read_text().split()) if record.is_file() else set()
    files = [f for f in out.iterdir() if f.suffix in (".jsonl", ".parquet")]
    foreign = [f.name for f in files if f.name not in ours]
    if foreign:
        raise ResumeError(f"{out} holds {len(foreign)} .jsonl/.parquet file(s) an earlier `lstmgen sample --ray` did "
                          f"not write (e.g. {foreign[0]!r}); --ray writes a folder of its own: choose another --out")
    if files and not overwrite:
        raise ResumeError(f"{out} already holds {len(files)} output file(s) of an earlier run: pass --overwrite to "
                          "replace them, or choose another --out")
    return files


def _run_ray_into(args: argparse.Namespace, clear=lambda: None) -> int:
    """The Ray run; `clear` removes an earlier run's files once the input and flags passed."""
    from lstmgen.offline.ray_data import RayResourceError, ray_log_path, run_on_ray

    if args.ray_cpus_per_actor is not None and not 0 < args.ray_cpus_per_actor < float("inf"):
        return _fail(f"--ray-cpus-per-actor is {args.ray_cpus_per_actor:g}; it must be a number of CPUs above 0 "
                     "(fractions are fine)")
    from lstmgen.offline.runner import offline_limits

    int_ids = False
    try:  # a local file: check every record first, as the local path does (a URI is checked by the actors)
        if "://" not in args.prompts:
            checked = check_input(args.prompts, sample_config(args, 0),
                                  offline_limits(args.batch_size, 1, args.max_new_tokens))
            int_ids = checked.int_ids
    except InputError as e:
        return _fail(str(e))
    clear()
    cfg = sample_config(args, args.seed if args.seed is not None else secrets.randbits(32))
    log = ray_log_path(args.out)
    if not args.verbose:
        print(f"lstmgen sample: Ray's progress and logs go to {log} (--verbose shows them here)", file=sys.stderr)
    try:
        done = run_on_ray(args.ray or None, args.prompts, args.out, args.bundle, cfg, actors=args.ray_actors,
                          threads_per_actor=args.threads or 1, cpus_per_actor=args.ray_cpus_per_actor,
                          batch_size=args.batch_size, device="cpu" if args.device == "auto" else args.device,
                          int_ids=int_ids, log=log, verbose=args.verbose)
    except RayResourceError as e:
        return _fail(str(e))
    except Exception:
        if not args.verbose:
            print(f"lstmgen sample: the Ray job failed; Ray's own log: {log}", file=sys.stderr)
        raise
    n = "?" if done["rows"] is None else f"{done['rows']:,}"
    errors = _errors_in(Path(args.out)) if "://" not in args.out else None
    said = "" if errors is None else f"{errors} with an error; "
    print(f"lstmgen sample: {n} samples written by Ray into {args.out} ({said}{args.ray_actors} actor(s) x "
          f"{done['cpus']:g} CPU of {done['cluster_cpus']:g}; base seed {cfg.seed})", file=sys.stderr)
    return 1 if errors else 0  # as the local path: a sample that failed is not a success


def _errors_in(out: Path) -> int:
    """Records of a Ray output folder that carry an "error" (one pass over what Ray wrote)."""
    n = 0
    for f in sorted(out.iterdir()):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as lines:
                n += sum('"error"' in line and "error" in json.loads(line) for line in lines)
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f, columns=None)
            if "error" in table.column_names:
                n += len(table) - table.column("error").null_count
    return n
