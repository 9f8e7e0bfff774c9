"""The bundle: a folder with `model.onnx` (one LSTM step), optionally `prompt.onnx` (a whole
prompt in one call), and `manifest.json` describing them. It is the only thing serving knows
about a model. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lstmgen.vocab import Vocab

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

# The step-graph contract (shapes in the comments; B is dynamic):
STEP_INPUTS = ("tokens", "h", "c")  # int64 [B], float32 [L, B, H], float32 [L, B, H]
STEP_OUTPUTS = ("logits", "h_out", "c_out")  # float32 [B, V], [L, B, H], [L, B, H]
# The prompt graph: tokens int64 [B, T], lengths int32 [B] (1 <= lengths <= T), h, c; same outputs,
# logits taken at each row's last valid position and (h_out, c_out) the state after it.
PROMPT_INPUTS = ("tokens", "lengths", "h", "c")


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Manifest:
    vocab: Vocab
    num_layers: int
    hidden_size: int
    embedding_size: int
    opset: int
    model_file: str = "model.onnx"
    model_sha256: str = ""
    prompt_model_file: str | None = None
    prompt_model_sha256: str | None = None
    quantization: str = "fp32"  # or "int8-dynamic"
    inputs: tuple[str, ...] = STEP_INPUTS
    outputs: tuple[str, ...] = STEP_OUTPUTS
    prompt_inputs: tuple[str, ...] = PROMPT_INPUTS
    provenance: dict = field(default_factory=dict)  # corpus, steps, validation figures, ...
    format_version: int = FORMAT_VERSION

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def level(self) -> str:
        return self.vocab.level

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocab"] = self.vocab.to_dict()
        d["vocab_size"] = self.vocab_size
        for k in ("inputs", "outputs", "prompt_inputs"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d.pop("vocab_size", None)
        d["vocab"] = Vocab.from_dict(d["vocab"])
        for k in ("inputs", "outputs", "prompt_inputs"):
            if k in d:
                d[k] = tuple(d[k])
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
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {raw.get('format_version')!r} is not supported (want {FORMAT_VERSION})")
    try:
        m = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed manifest: {e!r}") from e
    for name, value in (("num_layers", m.num_layers), ("hidden_size", m.hidden_size), ("embedding_size", m.embedding_size)):
        if not isinstance(value, int) or value <= 0:
            raise BundleError(f"{path}: {name} must be a positive integer, got {value!r}")
    if "vocab_size" in raw and raw["vocab_size"] != m.vocab_size:
        raise BundleError(f"{path}: vocab_size {raw['vocab_size']} disagrees with the {m.vocab_size} tokens listed")
    files = [(m.model_file, m.model_sha256)]
    if m.prompt_model_file:
        files.append((m.prompt_model_file, m.prompt_model_sha256 or ""))
    for fname, want in files:
        fpath = bundle / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise BundleError(f"{path}: model file {fname!r} must be a plain name inside the bundle")
        if not fpath.is_file():
            raise BundleError(f"{fpath}: model file named in the manifest is missing")
        if verify_checksums:
            got = sha256_file(fpath)
            if got != want:
                raise BundleError(f"{fpath}: sha256 {got[:16]}... does not match the manifest's {want[:16]}... (corrupt or replaced)")
    return m
