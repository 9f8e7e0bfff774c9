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

from lstmgen.errors import UserError
from lstmgen.onnx_wire import WireError, external_tensors
from lstmgen.vocab import Vocab

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

# The step-graph contract (shapes in the comments; B is dynamic):
STEP_INPUTS = ("tokens", "h", "c")  # int64 [B], float32 [L, B, H], float32 [L, B, H]
STEP_OUTPUTS = ("logits", "h_out", "c_out")  # float32 [B, V], [L, B, H], [L, B, H]
# The prompt graph: tokens int64 [B, T], lengths int32 [B] (1 <= lengths <= T), h, c; same outputs,
# logits taken at each row's last valid position and (h_out, c_out) the state after it.
PROMPT_INPUTS = ("tokens", "lengths", "h", "c")


class BundleError(UserError):
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
    files = [(m.model_file, m.model_sha256)]
    if m.prompt_model_file is not None:
        files.append((m.prompt_model_file, m.prompt_model_sha256 or ""))
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


# field -> (accepted JSON type(s), words for the message). Checked before building the Manifest, so a
# hand-edited manifest fails naming the field instead of with a TypeError deep inside.
_STR, _NAMES = "a string", "a list of strings"
_FIELDS: dict[str, str] = {
    "format_version": "an integer", "vocab": "an object with 'level' and 'tokens'", "vocab_size": "an integer",
    "num_layers": "a positive integer", "hidden_size": "a positive integer",
    "embedding_size": "a positive integer", "opset": "a positive integer",
    "model_file": _STR, "model_sha256": _STR, "prompt_model_file": "a string or null",
    "prompt_model_sha256": "a string or null", "quantization": _STR,
    "inputs": _NAMES, "outputs": _NAMES, "prompt_inputs": _NAMES, "provenance": "an object",
}
_REQUIRED = ("vocab", "num_layers", "hidden_size", "embedding_size", "opset")


def _check_fields(path: Path, raw: dict) -> None:
    unknown = [k for k in raw if k not in _FIELDS]
    if unknown:
        raise BundleError(f"{path}: unknown field(s) {', '.join(map(repr, unknown))}")
    for name in _REQUIRED:
        if name not in raw:
            raise BundleError(f"{path}: field {name!r} is missing")
    for name, value in raw.items():
        if not _type_ok(_FIELDS[name], value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise BundleError(f"{path}: {name} must be {_FIELDS[name]}, got {type(value).__name__} {shown}")


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
    if want == "an object":
        return isinstance(v, dict)
    return (isinstance(v, dict) and set(v) == {"level", "tokens"} and isinstance(v["level"], str)
            and _type_ok(_NAMES, v["tokens"]))
