"""The manifest's schema: the values manifest.json may hold (its format is described in
lstmgen/bundle.py) and the hand-written checks of them. Torch-free, and free of files: the bundle
reads the JSON and puts its path in front of a SchemaError's message.

Two passes, either side of building the Manifest: `check_fields` on the raw JSON (names and types,
so a hand-edited manifest fails naming the field instead of with a TypeError deep inside the
dataclasses), then `check_model` on the built Manifest (the fields must agree with each other).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation: lstmgen.bundle imports this module
    from lstmgen.bundle import Manifest

FORMAT_VERSION = 1
KINDS = ("text", "frames")
# peephole and cifg are LSTMs (the ONNX LSTM op, state h and c) that torch's nn.LSTM cannot train
# (train/cells.py); a server needs the cell to refuse a provider that lacks it (serve/engine.py)
CELLS = ("lstm", "gru", "peephole", "cifg")
TASKS = ("regression", "classification")
STANDARDIZE_MODES = ("none", "global", "sequence")
STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",), "peephole": ("h", "c"), "cifg": ("h", "c")}


class SchemaError(ValueError):
    """A manifest that breaks the schema; the message names the field (the bundle adds the file)."""


# field -> (accepted JSON type(s), as words for the message; _type_ok reads the same words)
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
    "validation_split": _OBJ,
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
# validation_split (optional, kind "text"): the text training validated on (lstmgen/text.py ValidationSplit)
_SPLIT_FIELDS: dict[str, str] = {
    "file": _STR, "sha256": _STR, "level": _STR, "start": "an integer", "end": "an integer",
    "fraction": "a number in (0, 1) or null", "path": "a string or null", "corpus": "a string or null",
    "url": "a string or null",
}
_SPLIT_REQUIRED = ("file", "sha256", "level", "start", "end")


def check_fields(raw) -> None:
    """The parsed JSON before it becomes a Manifest: a known format_version, only known fields, the
    required ones present, each of its JSON type, and what the kind needs (vocab or frames)."""
    if not isinstance(raw, dict):
        raise SchemaError("expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise SchemaError(f"format_version {raw.get('format_version')!r} is not supported (want {FORMAT_VERSION})")
    _check_object(raw, _FIELDS, _REQUIRED, "")
    kind = raw.get("kind", "text")
    if kind == "text" and raw.get("vocab") is None:
        raise SchemaError("field 'vocab' is missing (a text model needs its vocabulary)")
    if kind == "frames":
        if raw.get("vocab") is not None:
            raise SchemaError("vocab is for kind 'text'; a 'frames' model has none")
        if raw.get("frames") is None:
            raise SchemaError("field 'frames' is missing (kind 'frames' needs its task, sizes and standardisation)")
    if kind == "text" and raw.get("frames") is not None:
        raise SchemaError(f"frames is for kind 'frames', not '{kind}'")
    if raw.get("frames") is not None:
        _check_object(raw["frames"], _FRAME_FIELDS, _FRAME_REQUIRED, "frames.")
        _check_standardize(raw["frames"])
    if raw.get("validation_split") is not None:
        _check_validation_split(raw["validation_split"], kind, (raw.get("vocab") or {}).get("level"))


def check_model(raw: dict, m: Manifest) -> None:
    """The built Manifest's fields must agree with each other (and with the raw vocab_size): state
    against cell and shapes, the graphs' names against the state."""
    if "vocab_size" in raw and raw["vocab_size"] != m.vocab_size:
        raise SchemaError(f"vocab_size {raw['vocab_size']} disagrees with the {m.vocab_size} tokens listed")
    if m.kind == "frames":
        if m.prompt_model_file is not None:
            raise SchemaError("prompt_model_file is for text; a frames model's whole-sequence graph is "
                              "frames.sequence_model_file")
        f = m.frames
        if f.task == "regression" and f.class_names:
            raise SchemaError("frames.class_names is for classification, not regression")
        if f.class_names and len(f.class_names) != f.output_size:
            raise SchemaError(f"frames.class_names lists {len(f.class_names)} names for "
                              f"output_size {f.output_size} classes")
    n = len(STATE_NAMES[m.cell])
    if len(m.state) != n:
        raise SchemaError(f"state lists {len(m.state)} tensor(s); a {m.cell} has {n} "
                          f"({', '.join(STATE_NAMES[m.cell])})")
    want = (m.num_layers, m.hidden_size)
    for s in m.state:
        if s.shape != want:
            raise SchemaError(f"state {s.name!r} has shape {list(s.shape)}, but num_layers and "
                              f"hidden_size say {list(want)}")
    for key, names, extra in (("inputs", m.inputs, 1), ("outputs", m.outputs, 1),
                              ("prompt_inputs", m.prompt_inputs if m.prompt_model_file else None, 2),
                              ("frames.sequence_inputs",
                               m.sequence_inputs if m.frames and m.frames.sequence_model_file else None, 2)):
        if names is not None and len(names) != extra + n:
            raise SchemaError(f"{key} {list(names)} must name {extra + n} tensors "
                              f"({extra} then the {n} state tensor(s))")


def _check_object(raw: dict, fields: dict[str, str], required: tuple[str, ...], prefix: str) -> None:
    unknown = [prefix + k for k in raw if k not in fields]
    if unknown:
        raise SchemaError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    for name in required:
        if name not in raw:
            raise SchemaError(f"field {prefix + name!r} is missing")
    for name, value in raw.items():
        if not _type_ok(fields[name], value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise SchemaError(f"{prefix}{name} must be {fields[name]}, got {type(value).__name__} {shown}")


def _check_standardize(frames: dict) -> None:
    std = frames.get("standardize", {"mode": "none"})
    if std["mode"] != "global":
        return
    d_in = frames["input_size"]
    for key in ("mean", "std"):
        v = std.get(key)
        if not (isinstance(v, list) and len(v) == d_in and all(_is_number(x) for x in v)):
            raise SchemaError(f"frames.standardize.{key} must be {d_in} finite numbers (input_size) "
                              "for mode 'global'")
    if any(x <= 0 for x in std["std"]):
        raise SchemaError("frames.standardize.std must be positive (it divides the inputs)")


def _check_validation_split(split: dict, kind: str, level: str | None) -> None:
    _check_object(split, _SPLIT_FIELDS, _SPLIT_REQUIRED, "validation_split.")
    if kind != "text":
        raise SchemaError(f"validation_split is for kind 'text', not '{kind}'")
    if split["level"] != level:
        raise SchemaError(f"validation_split.level {split['level']!r} disagrees with the vocabulary's {level!r}")
    if not 0 <= split["start"] <= split["end"]:
        raise SchemaError(f"validation_split: chars {split['start']}..{split['end']} are not a span "
                          "(0 <= start <= end)")


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
    if want == "a number in (0, 1) or null":
        return v is None or (_is_number(v) and 0 < v < 1)
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
