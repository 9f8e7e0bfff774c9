"""The bundle: a folder with `model.onnx` (one recurrent step), optionally a whole-sequence graph
(`prompt.onnx` for text, `sequence.onnx` for frames), and `manifest.json` describing them. It is the
only thing serving knows about a model, so the manifest says everything a server must not assume:
what the model reads (`kind`), its cell, its state tensors and the graphs' input/output names.
Torch-free.

manifest.json (format_version 1; fields added later have defaults, so older manifests still load):
  kind      "text": a language model over tokens (needs "vocab"); "frames": float frames in, one
            output per frame (needs "frames", has no vocab)
  cell      "lstm" or "gru"
  state     [{"name": "h", "shape": [L, H]}, {"name": "c", "shape": [L, H]}]: the state tensors, one
            row's shape [num_layers, hidden_size] each; in the graphs each is float32 [L, B, H],
            batch on axis 1. Absent (older manifests): derived from the cell, h and c for an LSTM.
            Read it as `Manifest.state_tensors`.
  frames    kind "frames" only: {"task": "regression"|"classification", "input_size": D_in,
            "output_size": D_out or the number of classes, "class_names": [...],
            "standardize": {"mode": "none"|"global"|"sequence", ...} (applied to the inputs before the
            graph, as train/frames.py Standardizer does), "sequence_model_file", "sequence_model_sha256",
            "sequence_inputs"}
  embedding_size  the width the recurrent stack reads: the token embedding (text), the input
            projection or else D_in (frames)

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
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from lstmgen.errors import UserError
from lstmgen.onnx_wire import WireError, external_tensors
from lstmgen.vocab import Vocab

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("text", "frames")
CELLS = ("lstm", "gru")
TASKS = ("regression", "classification")
STANDARDIZE_MODES = ("none", "global", "sequence")
STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",)}
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
    # the checkpoint's standardisation of the inputs, applied before the graphs (train/frames.py):
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
    cell: str = "lstm"  # or "gru"
    state: tuple[StateTensor, ...] = ()  # empty: derived from the cell, [num_layers, hidden_size] each
    frames: FrameSpec | None = None  # kind "frames" only

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
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {raw.get('format_version')!r} is not supported (want {FORMAT_VERSION})")
    _check_fields(path, raw)
    try:
        m = Manifest.from_dict(raw)
    except ValueError as e:  # the types are right by now: only Vocab's own checks are left
        raise BundleError(f"{path}: vocab: {e}") from e
    if "vocab_size" in raw and raw["vocab_size"] != m.vocab_size:
        raise BundleError(f"{path}: vocab_size {raw['vocab_size']} disagrees with the {m.vocab_size} tokens listed")
    _check_model(path, m)
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


# -- field checks -----------------------------------------------------------------------------------
# field -> (accepted JSON type(s), words for the message). Checked before building the Manifest, so a
# hand-edited manifest fails naming the field instead of with a TypeError deep inside.
_STR, _NAMES, _OBJ = "a string", "a list of strings", "an object"
_KIND, _CELL = f"one of {', '.join(map(repr, KINDS))}", f"one of {', '.join(map(repr, CELLS))}"
_STATE = 'a list of {"name": a string, "shape": [num_layers, hidden_size]} objects'
_FIELDS: dict[str, str] = {
    "format_version": "an integer", "vocab_size": "an integer",
    "vocab": "an object with 'level' and 'tokens' (null for frames)",
    "num_layers": "a positive integer", "hidden_size": "a positive integer",
    "embedding_size": "a positive integer", "opset": "a positive integer",
    "model_file": _STR, "model_sha256": _STR, "prompt_model_file": "a string or null",
    "prompt_model_sha256": "a string or null", "quantization": _STR,
    "inputs": _NAMES, "outputs": _NAMES, "prompt_inputs": _NAMES, "provenance": _OBJ,
    "kind": _KIND, "cell": _CELL, "state": _STATE, "frames": _OBJ,
}
_REQUIRED = ("num_layers", "hidden_size", "embedding_size", "opset")
_FRAME_FIELDS: dict[str, str] = {
    "task": f"one of {', '.join(map(repr, TASKS))}", "input_size": "a positive integer",
    "output_size": "a positive integer", "class_names": _NAMES,
    "standardize": 'an object with "mode" one of ' + ", ".join(map(repr, STANDARDIZE_MODES)),
    "sequence_model_file": "a string or null", "sequence_model_sha256": "a string or null",
    "sequence_inputs": _NAMES,
}
_FRAME_REQUIRED = ("task", "input_size", "output_size")


def _check_fields(path: Path, raw: dict) -> None:
    _check_object(path, raw, _FIELDS, _REQUIRED, "")
    kind = raw.get("kind", "text")
    if kind == "text" and raw.get("vocab") is None:
        raise BundleError(f"{path}: field 'vocab' is missing (a text model needs its vocabulary)")
    if kind == "frames":
        if raw.get("vocab") is not None:
            raise BundleError(f"{path}: vocab is for kind 'text'; a 'frames' model has none")
        if raw.get("frames") is None:
            raise BundleError(f"{path}: field 'frames' is missing (kind 'frames' needs its task, sizes and "
                              "standardisation)")
    if kind == "text" and raw.get("frames") is not None:
        raise BundleError(f"{path}: frames is for kind 'frames', not '{kind}'")
    if raw.get("frames") is not None:
        _check_object(path, raw["frames"], _FRAME_FIELDS, _FRAME_REQUIRED, "frames.")
        _check_standardize(path, raw["frames"])


def _check_object(path: Path, raw: dict, fields: dict[str, str], required: tuple[str, ...], prefix: str) -> None:
    unknown = [prefix + k for k in raw if k not in fields]
    if unknown:
        raise BundleError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))}")
    for name in required:
        if name not in raw:
            raise BundleError(f"{path}: field {prefix + name!r} is missing")
    for name, value in raw.items():
        if not _type_ok(fields[name], value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise BundleError(f"{path}: {prefix}{name} must be {fields[name]}, got {type(value).__name__} {shown}")


def _check_standardize(path: Path, frames: dict) -> None:
    std = frames.get("standardize", {"mode": "none"})
    if std["mode"] != "global":
        return
    d_in = frames["input_size"]
    for key in ("mean", "std"):
        v = std.get(key)
        if not (isinstance(v, list) and len(v) == d_in and all(_is_number(x) for x in v)):
            raise BundleError(f"{path}: frames.standardize.{key} must be {d_in} finite numbers (input_size) "
                              "for mode 'global'")
    if any(x <= 0 for x in std["std"]):
        raise BundleError(f"{path}: frames.standardize.std must be positive (it divides the inputs)")


def _check_model(path: Path, m: Manifest) -> None:
    """The fields must agree with each other: state against cell and shapes, names against state."""
    if m.kind == "frames":
        if m.prompt_model_file is not None:
            raise BundleError(f"{path}: prompt_model_file is for text; a frames model's whole-sequence "
                              "graph is frames.sequence_model_file")
        f = m.frames
        if f.task == "regression" and f.class_names:
            raise BundleError(f"{path}: frames.class_names is for classification, not regression")
        if f.class_names and len(f.class_names) != f.output_size:
            raise BundleError(f"{path}: frames.class_names lists {len(f.class_names)} names for "
                              f"output_size {f.output_size} classes")
    n = len(STATE_NAMES[m.cell])
    if len(m.state) != n:
        raise BundleError(f"{path}: state lists {len(m.state)} tensor(s); a {m.cell} has {n} "
                          f"({', '.join(STATE_NAMES[m.cell])})")
    want = (m.num_layers, m.hidden_size)
    for s in m.state:
        if s.shape != want:
            raise BundleError(f"{path}: state {s.name!r} has shape {list(s.shape)}, but num_layers and "
                              f"hidden_size say {list(want)}")
    for key, names, extra in (("inputs", m.inputs, 1), ("outputs", m.outputs, 1),
                              ("prompt_inputs", m.prompt_inputs if m.prompt_model_file else None, 2),
                              ("frames.sequence_inputs",
                               m.sequence_inputs if m.frames and m.frames.sequence_model_file else None, 2)):
        if names is not None and len(names) != extra + n:
            raise BundleError(f"{path}: {key} {list(names)} must name {extra + n} tensors "
                              f"({extra} then the {n} state tensor(s))")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _type_ok(want: str, v) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a layer count
    if want == "a positive integer":
        return is_int and v > 0
    if want == "an integer":
        return is_int
    if want == _STR:
        return isinstance(v, str)
    if want == "a string or null":
        return v is None or isinstance(v, str)
    if want == _NAMES:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if want == _OBJ:
        return isinstance(v, dict)
    if want == _KIND:
        return v in KINDS
    if want == _CELL:
        return v in CELLS
    if want == _STATE:
        return isinstance(v, list) and all(
            isinstance(s, dict) and set(s) == {"name", "shape"} and isinstance(s["name"], str)
            and isinstance(s["shape"], list) and len(s["shape"]) == 2
            and all(_type_ok("a positive integer", x) for x in s["shape"]) for s in v)
    if want == _FRAME_FIELDS["task"]:
        return v in TASKS
    if want == _FRAME_FIELDS["standardize"]:
        return isinstance(v, dict) and v.get("mode") in STANDARDIZE_MODES
    return v is None or (isinstance(v, dict) and set(v) == {"level", "tokens"} and isinstance(v["level"], str)
                         and _type_ok(_NAMES, v["tokens"]))  # the vocabulary; whether null is allowed: kind
