"""The bundle: a folder with `model.onnx` (one recurrent step), optionally a whole-sequence graph
(`prompt.onnx` for text, `sequence.onnx` for frames), and `manifest.json` describing them. It is the
only thing serving knows about a model, so the manifest says everything a server must not assume:
what the model reads (`kind`), its cell, its state tensors and the graphs' input/output names.
Torch-free. The format is described here; lstmgen/manifest_schema.py checks a manifest against it.

manifest.json (format_version 1; fields added later have defaults, so older manifests still load):
  kind      "text": a language model over tokens (needs "vocab"); "frames": float frames in, one
            output per frame (needs "frames", has no vocab)
  cell      "lstm", "gru", "peephole" or "cifg"
  state     [{"name": "h", "shape": [L, H]}, {"name": "c", "shape": [L, H]}]: the state tensors, one
            row's shape [num_layers, hidden_size] each; in the graphs each is float32 [L, B, H],
            batch on axis 1. Absent (older manifests): derived from the cell, h and c for an LSTM.
            Read it as `Manifest.state_tensors`.
  frames    kind "frames" only: {"task": "regression"|"classification", "input_size": D_in,
            "output_size": D_out or the number of classes, "class_names": [...],
            "standardize": {"mode": "none"|"global"|"sequence", ...} (applied to the inputs before the
            graph, as train/frame_data.py Standardizer does), "sequence_model_file", "sequence_model_sha256",
            "sequence_inputs"}
  embedding_size  the width the recurrent stack reads: the token embedding (text), the input
            projection or else D_in (frames)
  validation_split  kind "text", optional (absent in bundles exported before it, and for checkpoints
            that do not record it): the text training validated on, {"file": name, "sha256": of the
            file, "level", "start", "end": chars [start, end) of its text, "fraction": the held-out
            share of a one-file corpus (absent: a validation file of its own), "path": where training
            read it, "corpus": a standard corpus name, "url"}; `lstmgen eval BUNDLE` with no --data
            scores it (lstmgen/text.py ValidationSplit)

Graph contracts (B and T dynamic). In every graph inputs[0] is the token/frame input, the last
inputs are the state tensors in `state_tensors` order; outputs[0] is the logits / y and outputs[1:]
the new state in the same order:
  text step      tokens int64 [B], *state -> logits [B, V], *state_out
  text prompt    tokens int64 [B, T] right-padded, lengths int32 [B] (1 <= lengths <= T), *state ->
                 logits at each row's last valid token [B, V], the state after it
  frames step    x float32 [B, D_in] (standardised), *state -> y [B, D_out] (regression values or
                 class logits), *state_out
  frames sequence  x float32 [B, T, D_in] right-padded, lengths int32 [B] (1 <= lengths <= T), *state
                 -> y [B, T, D_out] (every frame; padded frames' values are unspecified), the state
                 after each row's last valid frame
Names: state ("h", "c") for an LSTM, ("h",) for a GRU; outputs add "_out" ("h_out", "c_out").
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lstmgen.errors import UserError
# the schema's values live with its checks; imported here too, for the callers of lstmgen.bundle
from lstmgen.manifest_schema import CELLS, FORMAT_VERSION, KINDS, STATE_NAMES, SchemaError, check_fields, check_model
from lstmgen.onnx_wire import WireError, external_tensors
from lstmgen.text import ValidationSplit
from lstmgen.vocab import Vocab

MANIFEST = "manifest.json"
LENGTHS = "lengths"
SEQUENCE_MODEL = "sequence.onnx"

# The text LSTM's graphs (what every manifest written before `kind` and `cell` describes):
STEP_INPUTS = ("tokens", "h", "c")  # int64 [B], float32 [L, B, H], float32 [L, B, H]
STEP_OUTPUTS = ("logits", "h_out", "c_out")  # float32 [B, V], [L, B, H], [L, B, H]
PROMPT_INPUTS = ("tokens", "lengths", "h", "c")  # int64 [B, T], int32 [B], then the state


def graph_names(kind: str, cell: str) -> dict[str, tuple[str, ...]]:
    """The graphs' input/output names for a kind of model and a cell: inputs, outputs,
    prompt_inputs (text), sequence_inputs (frames); the sequence and prompt graphs' outputs are
    `outputs`."""
    if kind not in KINDS or cell not in CELLS:
        raise ValueError(f"kind must be one of {KINDS} and cell one of {CELLS} (got {kind!r}, {cell!r})")
    state = STATE_NAMES[cell]
    first, out = ("tokens", "logits") if kind == "text" else ("x", "y")
    return {"inputs": (first, *state), "outputs": (out, *(f"{s}_out" for s in state)),
            "prompt_inputs": (first, LENGTHS, *state) if kind == "text" else (),
            "sequence_inputs": (first, LENGTHS, *state) if kind == "frames" else ()}


class BundleError(UserError):
    """A bundle that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class StateTensor:
    name: str  # the step graph's input of this name; "<name>_out" is its output
    shape: tuple[int, int]  # one row's [num_layers, hidden_size]; [L, B, H] in the graphs


@dataclass(frozen=True)
class FrameSpec:
    """What a frame model reads and gives, and how its inputs are prepared (kind "frames")."""

    task: str  # "regression" | "classification"
    input_size: int  # D_in
    output_size: int  # D_out (regression) or the number of classes
    class_names: tuple[str, ...] = ()  # classification: class index -> name
    # the checkpoint's standardisation of the inputs, applied before the graphs (train/frame_data.py):
    # {"mode": "none"} | {"mode": "global", "mean": [D_in], "std": [D_in], ...} |
    # {"mode": "sequence", "std_floor": ..., "ddof": 0, ...} (each sequence by its own statistics)
    standardize: dict = field(default_factory=lambda: {"mode": "none"})
    sequence_model_file: str | None = SEQUENCE_MODEL  # None: no whole-sequence graph
    sequence_model_sha256: str | None = None
    sequence_inputs: tuple[str, ...] = ()  # empty: derived, ("x", "lengths", *state names)


@dataclass(frozen=True)
class Manifest:
    vocab: Vocab | None  # None for kind "frames"
    num_layers: int
    hidden_size: int
    embedding_size: int
    opset: int
    model_file: str = "model.onnx"
    model_sha256: str = ""
    prompt_model_file: str | None = None
    prompt_model_sha256: str | None = None
    quantization: str = "fp32"  # or "int8-dynamic"
    inputs: tuple[str, ...] = ()  # empty: derived from kind and cell (graph_names)
    outputs: tuple[str, ...] = ()
    prompt_inputs: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)  # corpus or data, steps, validation figures, ...
    format_version: int = FORMAT_VERSION
    kind: str = "text"  # or "frames"
    cell: str = "lstm"  # or "gru", "peephole", "cifg"
    state: tuple[StateTensor, ...] = ()  # empty: derived from the cell, [num_layers, hidden_size] each
    frames: FrameSpec | None = None  # kind "frames" only
    validation_split: ValidationSplit | None = None  # kind "text": what training validated on, if recorded

    def __post_init__(self) -> None:
        # Fill what an older (or terser) manifest leaves out, so callers never special-case it
        names = graph_names(self.kind, self.cell)
        for key in ("inputs", "outputs", "prompt_inputs"):
            if not getattr(self, key):
                object.__setattr__(self, key, names[key])
        if not self.state:
            shape = (self.num_layers, self.hidden_size)
            object.__setattr__(self, "state", tuple(StateTensor(n, shape) for n in STATE_NAMES[self.cell]))
        if self.frames is not None and not self.frames.sequence_inputs:
            derived = (self.inputs[0], LENGTHS, *self.inputs[1:])
            object.__setattr__(self, "frames", replace(self.frames, sequence_inputs=derived))

    @property
    def state_tensors(self) -> tuple[StateTensor, ...]:
        """The state tensors in the graphs' order: inputs[1:] of the step graph, outputs[1:]."""
        return self.state

    @property
    def vocab_size(self) -> int:
        """The vocabulary's size; 0 for a frames model (it has none)."""
        return len(self.vocab) if self.vocab is not None else 0

    @property
    def level(self) -> str:
        """"char" or "word" for text; "frames" for a frames model."""
        return self.vocab.level if self.vocab is not None else "frames"

    @property
    def sequence_inputs(self) -> tuple[str, ...]:
        """The frames sequence graph's inputs ("x", "lengths", *state); () for text."""
        return self.frames.sequence_inputs if self.frames is not None else ()

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("inputs", "outputs", "prompt_inputs"):
            d[k] = list(d[k])
        d["state"] = [{"name": s.name, "shape": list(s.shape)} for s in self.state]
        if self.vocab is None:  # frames: no vocabulary, no vocab_size
            del d["vocab"]
        else:
            d["vocab"] = self.vocab.to_dict()
            d["vocab_size"] = self.vocab_size
        if self.frames is None:
            del d["frames"]
        else:
            d["frames"].update(class_names=list(self.frames.class_names),
                               sequence_inputs=list(self.frames.sequence_inputs))
        if self.validation_split is None:  # optional: a manifest without it reads as before
            del d["validation_split"]
        else:
            d["validation_split"] = self.validation_split.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d.pop("vocab_size", None)
        d["vocab"] = Vocab.from_dict(d["vocab"]) if d.get("vocab") is not None else None
        for k in ("inputs", "outputs", "prompt_inputs"):
            if k in d:
                d[k] = tuple(d[k])
        if "state" in d:
            d["state"] = tuple(StateTensor(s["name"], tuple(s["shape"])) for s in d["state"])
        if d.get("frames") is not None:
            f = dict(d["frames"])
            for k in ("class_names", "sequence_inputs"):
                if k in f:
                    f[k] = tuple(f[k])
            d["frames"] = FrameSpec(**f)
        if d.get("validation_split") is not None:
            d["validation_split"] = ValidationSplit.from_dict(d["validation_split"])
        return cls(**d)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Atomic write (temporary file + rename) so a reader never sees half a manifest."""
    path = Path(bundle_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(bundle_dir: str | os.PathLike, verify_checksums: bool = True) -> Manifest:
    """Read and check a bundle's manifest; every failure names the file and the problem."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: bundle folder not found")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: manifest not found (is {bundle} a bundle made by `lstmgen export`?)")
    bundle_file(bundle, MANIFEST)
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON: {e}") from e
    try:
        check_fields(raw)  # lstmgen/manifest_schema.py
        m = Manifest.from_dict(raw)
        check_model(raw, m)
    except SchemaError as e:
        raise BundleError(f"{path}: {e}") from e
    except ValueError as e:  # the types are right by now: only Vocab's own checks are left
        raise BundleError(f"{path}: vocab: {e}") from e
    files = [(m.model_file, m.model_sha256)]
    if m.prompt_model_file is not None:
        files.append((m.prompt_model_file, m.prompt_model_sha256 or ""))
    if m.frames is not None and m.frames.sequence_model_file is not None:
        files.append((m.frames.sequence_model_file, m.frames.sequence_model_sha256 or ""))
    for fname, want in files:
        fpath = bundle_file(bundle, fname)
        if verify_checksums:
            _check_sha256(bundle / fname, sha256_file(fpath), want)
    return m


def bundle_file(bundle_dir: str | os.PathLike, fname: str) -> Path:
    """The real path of the bundle's file `fname`, which must be a plain name (no folders) and, with
    every symlink resolved, a regular file directly inside the bundle folder: a manifest, or a link,
    must not make the server read a file from elsewhere."""
    bundle = Path(bundle_dir)
    shown = bundle / MANIFEST
    if not fname or fname in (".", "..") or Path(fname).name != fname or "\\" in fname or "\0" in fname:
        raise BundleError(f"{shown}: file name {fname!r} must be a plain name inside the bundle (no folders)")
    real = (bundle / fname).resolve()
    if real.parent != bundle.resolve():
        raise BundleError(f"{bundle / fname}: resolves to {real}, outside the bundle folder {bundle.resolve()}; "
                          "a bundle's files must be inside it")
    if not real.is_file():
        raise BundleError(f"{bundle / fname}: file named in the manifest is missing (or not a regular file)")
    return real


def read_graph(bundle_dir: str | os.PathLike, fname: str, sha256: str | None) -> bytes:
    """The bytes of one of the bundle's ONNX graphs, checked: inside the bundle, matching `sha256`
    (None: not checked), and self-contained. The caller loads these bytes, not the path, so what was
    checked is what runs even if the file is replaced meanwhile."""
    shown = Path(bundle_dir) / fname
    data = bundle_file(bundle_dir, fname).read_bytes()
    if sha256 is not None:
        _check_sha256(shown, hashlib.sha256(data).hexdigest(), sha256)
    try:
        external = external_tensors(data)
    except WireError as e:
        raise BundleError(f"{shown}: not an ONNX model: {e}") from e
    if external:
        more = f" and {len(external) - 3} more" if len(external) > 3 else ""
        raise BundleError(f"{shown}: the graph keeps tensor(s) {', '.join(map(repr, external[:3]))}{more} in "
                          "external data files, which the manifest's checksum does not cover; lstmgen bundles "
                          "hold self-contained graphs (export it again with `lstmgen export`)")
    return data


def _check_sha256(shown: Path, got: str, want: str) -> None:
    if got != want:
        raise BundleError(f"{shown}: sha256 {got[:16]}... does not match the manifest's {want[:16]}... "
                          "(corrupt or replaced)")
