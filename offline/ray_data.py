"""The same sampling job on a Ray cluster, through Ray Data.

    import ray
    from lstmgen.offline.jobs import SampleConfig
    from lstmgen.offline.ray_data import sample_dataset

    ds = ray.data.read_parquet("s3://bucket/prompts/")         # rows: "prompt", optional fields
    out = sample_dataset(ds, "bundle/", SampleConfig(seed=7, max_new_tokens=64), actors=4)
    out.write_parquet("s3://bucket/samples/")

`map_batches` runs over a pool of actors; each holds one ONNX Runtime engine behind the batching
scheduler and samples a block of rows per call. Seeds come from (base seed, row index, sample)
exactly as on the local path, so the same seeds give the same texts. Rows are numbered on the
driver as they are read (a local prompts file by the local path's own reader), so the sampling
stage has no read tasks beside it, only the write tasks: each actor's CPU request is sized to
leave them room (`actor_cpus`). Needs the `ray` extra.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from lstmgen.errors import UsageError
from lstmgen.offline.jobs import SampleConfig, jobs_for
from lstmgen.offline.outputs import dump_line, output_format, parquet_schema
from lstmgen.offline.prompts import decode_json, input_format, parse_item, read_records
from lstmgen.offline.runner import Sampler, offline_limits

TASK_CPUS = 0.25  # each Ray Data write task's request: it only encodes and writes lines
ROOM = 2 * TASK_CPUS  # CPUs the default sizing leaves beside the actors: two write tasks at a time


class RayResourceError(UsageError):
    """The actors' CPU request cannot be met by the cluster (the message names the numbers and the flag)."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("Ray is not installed: pip install 'lstmgen[ray]'") from e
    return ray


def actor_cpus(total: float, actors: int, threads: int, requested: float | None) -> float:
    """CPUs each actor reserves from Ray. `requested` (--ray-cpus-per-actor) is checked against the
    cluster's `total`; without it each actor takes its thread count, or less: its share of the
    cluster's CPUs once ROOM is kept for the write tasks (fractions are fine; a share above 1 is
    rounded down to whole CPUs, which every Ray version takes)."""
    if requested is not None:
        if actors * requested > total:
            fit = _floor(max(total - ROOM, total / 2) / actors)
            raise RayResourceError(
                f"--ray-actors {actors} x --ray-cpus-per-actor {requested:g} = {actors * requested:g} CPUs, but "
                f"the Ray cluster has {total:g}: lower --ray-cpus-per-actor (e.g. {fit:g} for {actors} actors) "
                "or --ray-actors, or leave --ray-cpus-per-actor out to size it from the cluster")
        return requested
    share = (total - ROOM) / actors
    if share < 0.01:
        raise RayResourceError(
            f"--ray-actors {actors} on the Ray cluster's {total:g} CPUs leaves each actor {max(share, 0):.3g} CPU once "
            f"{ROOM:g} is kept for Ray Data's write tasks: lower --ray-actors or set --ray-cpus-per-actor")
    cpus = min(float(threads), share)
    return float(math.floor(cpus)) if cpus >= 1 else _floor(cpus)


def _floor(x: float) -> float:
    return math.floor(x * 1000) / 1000  # Ray's resource grain is 1e-4; three places read better


class _Sampler:
    """One actor: an engine + scheduler, fed one block of prompt rows per call."""

    def __init__(self, bundle: str, cfg: dict, threads: int, device: str, batch_size: int, rows: str,
                 output: str = "table", int_ids: bool = False):
        from lstmgen.offline.jobs import SampleConfig as _Cfg
        from lstmgen.serve.engine import Engine, EngineConfig
        from lstmgen.serve.params import SamplingParams

        self.cfg = _Cfg(**{**cfg, "sampling": SamplingParams(**cfg["sampling"]), "stop": tuple(cfg["stop"])})
        self.rows, self.output, self.int_ids = rows, output, int_ids
        self.window = 4 * batch_size
        engine = Engine(bundle, EngineConfig(device=device, intra_op_threads=threads))
        self.runner = Sampler(engine, offline_limits(batch_size, self.window, self.cfg.max_new_tokens))

    def _item(self, row: dict):
        where = f"row {row['index']}"
        if self.rows == "records":
            return parse_item(row, where)
        if self.rows == "text":
            return parse_item({"prompt": row["text"]}, where)
        return parse_item(decode_json(row["text"], where), where)

    def __call__(self, batch):
        import pyarrow as pa

        jobs = [job for row in batch.to_pylist() for job in jobs_for(self._item(row), row["index"], self.cfg)]
        rows = [r.row for r in self.runner.run(jobs, self.window)]
        if self.output == "jsonl":  # the local path's own lines; a lone surrogate escaped as its appender does
            lines = [dump_line(r, "jsonl")[:-1].encode("utf-8", "backslashreplace").decode("utf-8") for r in rows]
            return pa.table({"index": pa.array([r["index"] for r in rows], pa.int64()),
                             "sample": pa.array([r["sample"] for r in rows], pa.int64()),
                             "line": pa.array(lines, pa.string())})
        for r in rows:  # the local Parquet output's columns (outputs.journal_to_parquet)
            if not self.int_ids and isinstance(r.get("id"), int):
                r["id"] = str(r["id"])
            if "logprobs" in r:
                r["logprobs"] = json.dumps(r["logprobs"])
        return pa.Table.from_pylist(rows, schema=parquet_schema({"id": 0} if self.int_ids else {}))


def _blocks_to_dataset(tables):
    """A dataset of the given pyarrow tables, put into the object store one at a time."""
    import pyarrow as pa

    ray = _ray()
    refs = [ray.put(t) for t in tables] or [ray.put(pa.table({"index": pa.array([], pa.int64())}))]
    return ray.data.from_arrow_refs(refs)


def number_rows(ds, rows_per_block: int = 1024):
    """Adds an "index" column, each row's position in `ds`: the driver reads `ds` once, in order
    (`preserve_order` is set for that read), and numbers the rows as they arrive. No other step
    runs beside that read, and nothing depends on Ray's block layout or a removed API."""
    import pyarrow as pa

    ctx = getattr(ds, "context", None)  # the dataset's own DataContext (a copy taken when it was made)
    before = ctx.execution_options.preserve_order if ctx is not None else None
    if ctx is not None:
        ctx.execution_options.preserve_order = True

    def numbered():
        n = 0
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=rows_per_block):
            if "index" in batch.column_names:  # a column of the input: the position is the index
                batch = batch.drop_columns(["index"])
            yield batch.append_column("index", pa.array(range(n, n + batch.num_rows), pa.int64()))
            n += batch.num_rows
    try:
        return _blocks_to_dataset(numbered())
    finally:
        if ctx is not None:
            ctx.execution_options.preserve_order = before


def sample_dataset(ds, bundle: str, cfg: SampleConfig = SampleConfig(), *, actors: int = 1,
                   threads_per_actor: int = 1, cpus_per_actor: float | None = None, batch_size: int = 256,
                   rows_per_call: int = 1024, device: str = "cpu", rows: str = "records", output: str = "table",
                   int_ids: bool = False):
    """Samples every row of `ds` (a `ray.data.Dataset`) and returns the dataset of output rows.

    Rows hold "prompt" and any per-prompt field of the JSONL input ("id", "seed", "num_samples",
    ...); with `rows="jsonl"` or `rows="text"` a "text" column holds a JSON object or a prompt.
    An "index" column is added when missing (see `number_rows`). `threads_per_actor` is each
    engine's ONNX Runtime thread count; `cpus_per_actor` is what each actor reserves from Ray
    (default: the thread count; `actor_cpus` sizes it from the cluster). `batch_size` rows step
    together inside each actor; `rows_per_call` prompts go to an actor at once.
    Output rows: `output="table"` gives the local Parquet output's columns (an absent field is
    null; "id" is an int64 column with `int_ids`, else strings); `output="jsonl"` gives columns
    "index", "sample" and "line", the JSON line the local path writes for that sample."""
    ray = _ray()
    if "index" not in (ds.columns() or []):
        ds = number_rows(ds, rows_per_call)
    return ds.map_batches(
        _Sampler, batch_format="pyarrow", batch_size=rows_per_call,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads_per_actor if cpus_per_actor is None else cpus_per_actor,
        fn_constructor_kwargs={"bundle": str(bundle), "cfg": asdict(cfg), "threads": threads_per_actor,
                               "device": device, "batch_size": batch_size, "rows": rows, "output": output,
                               "int_ids": int_ids})


def read_prompts(path: str, rows_per_block: int = 1024, actors: int = 1):
    """A numbered Ray dataset of the prompts file, the `rows` argument for `sample_dataset` and
    the rows per block (each block is one actor call). A local file is read on the driver by the
    local path's reader (so its indexes, blank lines and decoding are the local path's), one JSON
    record a row; an input under `actors` x `rows_per_block` prompts is split evenly over the
    actors. Anything else (an `s3://` URI) is read with Ray Data's readers, by extension, then
    numbered by `number_rows`. JSONL is decoded in the actors with the local path's checks (Ray's
    JSON reader would turn integer fields with gaps into floats)."""
    ray = _ray()
    if Path(path).exists():
        records = ((n, json.dumps(raw)) for n, (_, raw) in enumerate(read_records(path)))
        head = list(itertools.islice(records, actors * rows_per_block))
        if len(head) < actors * rows_per_block:
            rows_per_block = max(1, -(-len(head) // actors))
        blocks = _local_blocks(itertools.chain(head, records), rows_per_block)
        return _blocks_to_dataset(blocks), "jsonl", rows_per_block
    fmt = input_format(path)
    if fmt == "parquet":
        return number_rows(ray.data.read_parquet(path), rows_per_block), "records", rows_per_block
    ds = ray.data.read_text(path).filter(lambda r: bool(r["text"].strip()))
    return number_rows(ds, rows_per_block), ("jsonl" if fmt == "jsonl" else "text"), rows_per_block


def _local_blocks(records, rows_per_block: int):
    import pyarrow as pa

    while chunk := list(itertools.islice(records, rows_per_block)):
        yield pa.table({"index": pa.array([n for n, _ in chunk], pa.int64()),
                        "text": pa.array([t for _, t in chunk], pa.string())})


def _sink(out: str, fmt: str):
    """A Ray Data file sink writing the sampler's blocks: JSONL lines or Parquet files. It keeps
    the row count Ray reports when the write completes."""
    from ray.data.datasource import BlockBasedFileDatasink

    class SampleSink(BlockBasedFileDatasink):
        rows: int | None = None

        def write_block_to_file(self, block, file) -> None:
            table = block.to_arrow()
            if fmt == "parquet":
                import pyarrow.parquet as pq

                pq.write_table(table, file)
            else:
                file.write("".join(line + "\n" for line in table.column("line").to_pylist()).encode("utf-8"))

        def on_write_complete(self, write_result) -> None:  # on the driver, once every block is written
            super().on_write_complete(write_result)
            self.rows = getattr(write_result, "num_rows", None)

    return SampleSink(out, file_format=fmt)


def ray_log_path(out: str) -> Path:
    """Where Ray's own output goes without --verbose: beside a local --out folder, else in the
    working directory."""
    if "://" in out:
        return Path("lstmgen-sample-ray.log").resolve()
    out_path = Path(out.rstrip("/\\") or ".").resolve()
    return out_path.with_name(out_path.name + ".ray.log")


@contextlib.contextmanager
def _output_to(log: Path | None):
    """Sends this process's stdout and stderr (file descriptors 1 and 2: Ray's Python logging,
    warnings and its C++ core alike) to `log` while the block runs; None leaves them alone.
    Yields `say(line)`, which still reaches the real stderr."""
    if log is None:
        yield lambda line: print(line, file=sys.stderr, flush=True)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield lambda line: os.write(saved[1], (line + "\n").encode("utf-8", "backslashreplace"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def _data_context(verbose: bool):
    """Output in input order, progress bars only when asked for; restored afterwards (datasets
    copy the context when they are made)."""
    ctx = _ray().data.DataContext.get_current()
    before = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = verbose
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = before


def run_on_ray(address: str | None, prompts: str, out: str, bundle: str, cfg: SampleConfig, *, actors: int,
               threads_per_actor: int, cpus_per_actor: float | None, batch_size: int, device: str,
               int_ids: bool = False, log: Path | None = None, verbose: bool = False) -> dict:
    """`lstmgen sample --ray`: read, sample and write through Ray Data. `out` becomes a folder of
    JSONL files, or of Parquet files when it ends in .parquet. Without `verbose`, Ray's own output
    goes to `log`. Returns {"rows": rows written (None if Ray did not say), "cpus": per actor,
    "cluster_cpus": the cluster's}; raises RayResourceError before anything runs when the actors'
    CPU request cannot be met."""
    ray = _ray()
    started = not ray.is_initialized()
    with _output_to(None if verbose else log) as say:
        try:
            if started and address:
                ray.init(address=address, log_to_driver=verbose)
            elif started:  # a local instance (or the cluster RAY_ADDRESS names)
                ray.init(log_to_driver=verbose, include_dashboard=False)
            total = ray.cluster_resources().get("CPU", 0.0)
            cpus = actor_cpus(total, actors, threads_per_actor, cpus_per_actor)
            free = ray.available_resources().get("CPU", 0.0)
            if actors * cpus > free:  # other jobs hold the rest: Ray starts the actors as CPUs free up
                say(f"lstmgen sample: warning: {free:g} of the Ray cluster's {total:g} CPUs are free; "
                    f"the {actors} actor(s) x {cpus:g} CPU wait for the rest")
            fmt = "parquet" if output_format(out) == "parquet" else "jsonl"
            with _data_context(verbose):
                ds, rows, per_call = read_prompts(prompts, 4 * batch_size, actors)
                result = sample_dataset(ds, bundle, cfg, actors=actors, threads_per_actor=threads_per_actor,
                                        cpus_per_actor=cpus, batch_size=batch_size, rows_per_call=per_call,
                                        device=device, rows=rows,
                                        output="table" if fmt == "parquet" else "jsonl", int_ids=int_ids)
                sink = _sink(out, fmt)
                result.write_datasink(sink, ray_remote_args={"num_cpus": TASK_CPUS})
        finally:
            if started:
                ray.shutdown()
    return {"rows": sink.rows, "cpus": cpus, "cluster_cpus": total}
