"""The same sampling job on a Ray cluster, through Ray Data.

    import ray
    from lstmgen.offline.jobs import SampleConfig
    from lstmgen.offline.ray_data import sample_dataset

    ds = ray.data.read_parquet("s3://bucket/prompts/")         # rows: "prompt", optional fields
    out = sample_dataset(ds, "bundle/", SampleConfig(seed=7, max_new_tokens=64), actors=4)
    out.write_parquet("s3://bucket/samples/")

`map_batches` runs over a pool of actors; each holds one ONNX Runtime engine behind the batching
scheduler and samples a block of rows per call. Seeds come from (base seed, row index, sample)
exactly as on the local path, so the same seeds give the same texts. Needs the `ray` extra.
"""
from __future__ import annotations

import json
from dataclasses import asdict

from lstmgen.offline.jobs import SampleConfig, jobs_for
from lstmgen.offline.prompts import decode_json, parse_item
from lstmgen.offline.runner import LoopThread, offline_limits


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("Ray is not installed: pip install 'lstmgen[ray]'") from e
    return ray


class _Sampler:
    """One actor: an engine + scheduler, fed one block of prompt rows per call."""

    def __init__(self, bundle: str, cfg: dict, threads: int, device: str, batch_size: int, rows: str):
        from lstmgen.offline.jobs import SampleConfig as _Cfg
        from lstmgen.serve.engine import Engine, EngineConfig
        from lstmgen.serve.params import SamplingParams

        self.cfg = _Cfg(**{**cfg, "sampling": SamplingParams(**cfg["sampling"]), "stop": tuple(cfg["stop"])})
        self.rows = rows
        self.window = 4 * batch_size
        engine = Engine(bundle, EngineConfig(device=device, intra_op_threads=threads))
        self.runner = LoopThread(engine, offline_limits(batch_size, self.window, self.cfg.max_new_tokens))

    def _item(self, row: dict):
        where = f"row {row['index']}"
        if self.rows == "records":
            return parse_item(row, where)
        if self.rows == "text":
            return parse_item({"prompt": row["text"]}, where)
        return parse_item(decode_json(row["text"], where), where)

    def __call__(self, batch):
        import pyarrow as pa

        from lstmgen.offline.outputs import parquet_schema

        jobs = [job for row in batch.to_pylist() for job in jobs_for(self._item(row), row["index"], self.cfg)]
        rows = [r.row for r in self.runner.run(jobs, self.window)]
        for r in rows:
            if "logprobs" in r:
                r["logprobs"] = json.dumps(r["logprobs"])
        schema = parquet_schema(rows[0] if rows else {})
        return pa.Table.from_pylist(rows, schema=schema)


def number_rows(ds):
    """Adds an "index" column: each row's position (the dataset's order must be deterministic,
    as a file read is). Costs one extra pass to count the rows."""
    ray = _ray()
    return ds.zip(ray.data.range(ds.count()).rename_columns({"id": "index"}))


def sample_dataset(ds, bundle: str, cfg: SampleConfig = SampleConfig(), *, actors: int = 1,
                   threads_per_actor: int = 1, cpus_per_actor: float | None = None, batch_size: int = 256,
                   rows_per_call: int = 1024, device: str = "cpu", rows: str = "records"):
    """Samples every row of `ds` (a `ray.data.Dataset`) and returns the dataset of output rows.

    Rows hold "prompt" and any per-prompt field of the JSONL input ("id", "seed", "num_samples",
    ...); with `rows="jsonl"` or `rows="text"` a "text" column holds a JSON object or a prompt.
    An "index" column is added when missing (see `number_rows`). `threads_per_actor` is each
    engine's ONNX Runtime thread count; `cpus_per_actor` is what each actor reserves from Ray
    (default: the thread count; less lets Ray's readers run beside the actors on a small node).
    `batch_size` rows step together inside each actor; `rows_per_call` prompts go to an actor at once."""
    ray = _ray()
    if "index" not in (ds.columns() or []):
        ds = number_rows(ds)
    cfg_dict = asdict(cfg)
    return ds.map_batches(
        _Sampler, batch_format="pyarrow", batch_size=rows_per_call,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads_per_actor if cpus_per_actor is None else cpus_per_actor,
        fn_constructor_kwargs={"bundle": str(bundle), "cfg": cfg_dict, "threads": threads_per_actor,
                               "device": device, "batch_size": batch_size, "rows": rows})


def read_prompts(path: str):
    """A Ray dataset of the prompts file, by extension (as the local path reads it) and the
    `rows` argument for `sample_dataset`. JSONL is read as lines and decoded in the actors with
    the local path's checks (Ray's JSON reader would turn integer fields with gaps into floats)."""
    ray = _ray()
    from lstmgen.offline.prompts import input_format

    fmt = input_format(path)
    if fmt == "parquet":
        return ray.data.read_parquet(path), "records"
    ds = ray.data.read_text(path).filter(lambda r: bool(r["text"].strip()))
    return ds, ("jsonl" if fmt == "jsonl" else "text")


def run_on_ray(address: str | None, prompts: str, out: str, bundle: str, cfg: SampleConfig, *, actors: int,
               threads_per_actor: int, cpus_per_actor: float | None, batch_size: int, device: str) -> int:
    """`lstmgen sample --ray`: read, sample and write through Ray Data; returns the row count.
    `out` becomes a folder of JSONL files, or of Parquet files when it ends in .parquet."""
    ray = _ray()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local instance (or the cluster RAY_ADDRESS names)
        ray.init(log_to_driver=False, include_dashboard=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # output in input order
    ds, rows = read_prompts(prompts)
    result = sample_dataset(ds, bundle, cfg, actors=actors, threads_per_actor=threads_per_actor,
                            cpus_per_actor=cpus_per_actor, batch_size=batch_size, device=device, rows=rows)
    result = result.materialize()
    if out.endswith(".parquet"):
        result.write_parquet(out)
    else:
        result.write_json(out)
    return result.count()
