"""The manifest describes the model (kind, cell, state tensors, frame spec): round trips, manifests
written before those fields existed, and bad manifests failing with the field named. Torch-free:
bundles here are written by hand (load_manifest checks files and checksums, not the graphs)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from lstmgen.bundle import (BundleError, FrameSpec, Manifest, StateTensor, graph_names, load_manifest,
                            write_manifest)
from lstmgen.vocab import Vocab

VOCAB = Vocab.build("char", ["abcdefgh \n"])
GLOBAL = {"mode": "global", "applies_to": "inputs", "std_floor": 1e-6, "ddof": 0,
          "mean": [0.5, -1.0, 2.0], "std": [1.0, 0.25, 3.0]}

# A manifest as `lstmgen export` wrote it before kind, cell, state and frames existed
OLD_MANIFEST = {
    "vocab": VOCAB.to_dict(), "num_layers": 2, "hidden_size": 16, "embedding_size": 8, "opset": 17,
    "model_file": "model.onnx", "model_sha256": "", "prompt_model_file": "prompt.onnx",
    "prompt_model_sha256": "", "quantization": "fp32", "inputs": ["tokens", "h", "c"],
    "outputs": ["logits", "h_out", "c_out"], "prompt_inputs": ["tokens", "lengths", "h", "c"],
    "provenance": {"corpus": {"path": "x.txt"}}, "format_version": 1, "vocab_size": len(VOCAB),
}


def text_manifest(cell: str = "lstm") -> Manifest:
    names = graph_names("text", cell)
    return Manifest(VOCAB, 2, 16, 8, 17, prompt_model_file="prompt.onnx", inputs=names["inputs"],
                    outputs=names["outputs"], prompt_inputs=names["prompt_inputs"], cell=cell,
                    state=tuple(StateTensor(n, (2, 16)) for n in names["inputs"][1:]))


def frames_manifest(cell: str = "gru", task: str = "classification") -> Manifest:
    names = graph_names("frames", cell)
    spec = FrameSpec(task, 3, 4 if task == "classification" else 2,
                     ("a", "b", "c", "d") if task == "classification" else (), dict(GLOBAL))
    return Manifest(None, 1, 12, 3, 17, inputs=names["inputs"], outputs=names["outputs"], kind="frames",
                    cell=cell, state=tuple(StateTensor(n, (1, 12)) for n in names["inputs"][1:]), frames=spec)


def write_bundle(folder, d: dict):
    """A bundle holding manifest `d` and placeholder graph files with their checksums filled in."""
    folder.mkdir(parents=True, exist_ok=True)
    d = json.loads(json.dumps(d))
    for key, sha_key, owner in (("model_file", "model_sha256", d), ("prompt_model_file", "prompt_model_sha256", d),
                                ("sequence_model_file", "sequence_model_sha256", d.get("frames") or {})):
        if owner.get(key):
            data = f"graph {owner[key]}".encode()
            (folder / owner[key]).write_bytes(data)
            owner[sha_key] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(d))
    return folder


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: text_manifest("lstm"), lambda: text_manifest("gru"),
                                  lambda: frames_manifest("gru"), lambda: frames_manifest("lstm", "regression")],
                         ids=["text-lstm", "text-gru", "frames-gru-classification", "frames-lstm-regression"])
def test_manifest_round_trips_through_dict_json_and_disk(tmp_path, make):
    m = make()
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    loaded = load_manifest(write_bundle(tmp_path / "b", m.to_dict()))
    shas = {"model_sha256": m.model_sha256, "prompt_model_sha256": m.prompt_model_sha256}
    if m.frames is not None:
        shas["frames"] = replace(loaded.frames, sequence_model_sha256=None)
    assert replace(loaded, **shas) == m  # equal but for the checksums write_bundle filled in


def test_json_layout_of_the_new_fields():
    d = text_manifest("lstm").to_dict()
    assert (d["kind"], d["cell"]) == ("text", "lstm")
    assert d["state"] == [{"name": "h", "shape": [2, 16]}, {"name": "c", "shape": [2, 16]}]
    assert "frames" not in d and d["vocab_size"] == len(VOCAB)
    f = frames_manifest("gru").to_dict()
    assert "vocab" not in f and "vocab_size" not in f
    assert f["state"] == [{"name": "h", "shape": [1, 12]}]
    assert (f["inputs"], f["outputs"], f["prompt_inputs"]) == (["x", "h"], ["y", "h_out"], [])
    assert f["frames"] == {"task": "classification", "input_size": 3, "output_size": 4,
                           "class_names": ["a", "b", "c", "d"], "standardize": GLOBAL,
                           "sequence_model_file": "sequence.onnx", "sequence_model_sha256": None,
                           "sequence_inputs": ["x", "lengths", "h"]}


def test_graph_names_per_kind_and_cell():
    assert graph_names("text", "lstm") == {"inputs": ("tokens", "h", "c"), "outputs": ("logits", "h_out", "c_out"),
                                           "prompt_inputs": ("tokens", "lengths", "h", "c"), "sequence_inputs": ()}
    assert graph_names("text", "gru")["prompt_inputs"] == ("tokens", "lengths", "h")
    assert graph_names("frames", "lstm") == {"inputs": ("x", "h", "c"), "outputs": ("y", "h_out", "c_out"),
                                             "prompt_inputs": (), "sequence_inputs": ("x", "lengths", "h", "c")}
    assert graph_names("frames", "gru")["outputs"] == ("y", "h_out")


def test_frames_manifest_has_no_vocabulary():
    m = frames_manifest()
    assert (m.vocab, m.vocab_size, m.level) == (None, 0, "frames")
    assert m.sequence_inputs == ("x", "lengths", "h") and text_manifest().sequence_inputs == ()


def test_names_and_state_are_derived_when_left_out():
    m = Manifest(None, 3, 7, 2, 17, kind="frames", cell="lstm", frames=FrameSpec("regression", 2, 1))
    assert m.inputs == ("x", "h", "c") and m.outputs == ("y", "h_out", "c_out") and m.prompt_inputs == ()
    assert m.state_tensors == (StateTensor("h", (3, 7)), StateTensor("c", (3, 7)))
    assert m.frames.sequence_inputs == ("x", "lengths", "h", "c")
    g = Manifest(VOCAB, 1, 4, 4, 17, cell="gru")
    assert g.inputs == ("tokens", "h") and g.prompt_inputs == ("tokens", "lengths", "h")
    assert g.state_tensors == (StateTensor("h", (1, 4)),)


# -- manifests from before the fields existed ------------------------------------------------------------
def test_old_manifest_loads_with_derived_state(tmp_path):
    m = load_manifest(write_bundle(tmp_path / "b", OLD_MANIFEST))
    assert (m.kind, m.cell, m.frames) == ("text", "lstm", None)
    assert m.state_tensors == (StateTensor("h", (2, 16)), StateTensor("c", (2, 16)))
    assert m.inputs == ("tokens", "h", "c") and m.outputs == ("logits", "h_out", "c_out")
    assert m.vocab == VOCAB and m.vocab_size == len(VOCAB) and m.level == "char"


def test_old_manifest_without_names_loads_too(tmp_path):
    d = {k: v for k, v in OLD_MANIFEST.items() if k not in ("inputs", "outputs", "prompt_inputs")}
    m = load_manifest(write_bundle(tmp_path / "b", d))
    assert m.prompt_inputs == ("tokens", "lengths", "h", "c") and [s.name for s in m.state_tensors] == ["h", "c"]


# -- bad manifests ------------------------------------------------------------------------------
def _frames_dict() -> dict:
    return frames_manifest("lstm").to_dict()


def _set(d: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


BAD = [  # (manifest, edit path, new value (KeyError: removed), words in the message)
    ("text", "kind", "audio", ["kind must be one of 'text', 'frames'", "'audio'"]),
    ("text", "cell", "rnn", ["cell must be one of 'lstm', 'gru'"]),
    ("text", "vocab", KeyError, ["field 'vocab' is missing", "text"]),
    ("text", "vocab", None, ["field 'vocab' is missing"]),
    ("text", "state", [{"name": "h", "shape": [2, 32]}, {"name": "c", "shape": [2, 32]}],
     ["state 'h' has shape [2, 32]", "num_layers and hidden_size say [2, 16]"]),
    ("text", "num_layers", 3, ["state 'h' has shape [2, 16]", "[3, 16]"]),
    ("text", "state", [{"name": "h", "shape": [2, 16]}], ["state lists 1 tensor(s); a lstm has 2"]),
    ("text", "state", [{"name": "h", "shape": [2]}], ["state must be a list of", "[num_layers, hidden_size]"]),
    ("text", "state", [{"name": "h", "size": [2, 16]}], ["state must be a list of"]),
    ("text", "inputs", ["tokens", "h"], ["inputs ['tokens', 'h'] must name 3 tensors"]),
    ("text", "frames", {"task": "regression", "input_size": 1, "output_size": 1}, ["frames is for kind 'frames'"]),
    ("frames", "frames", KeyError, ["field 'frames' is missing"]),
    ("frames", "vocab", VOCAB.to_dict(), ["vocab is for kind 'text'"]),
    ("frames", "frames.task", "ranking", ["frames.task must be one of 'regression', 'classification'"]),
    ("frames", "frames.input_size", 0, ["frames.input_size must be a positive integer"]),
    ("frames", "frames.output_size", KeyError, ["field 'frames.output_size' is missing"]),
    ("frames", "frames.colour", 1, ["unknown field(s) 'frames.colour'"]),
    ("frames", "frames.standardize", {"mode": "median"}, ["frames.standardize must be an object with \"mode\""]),
    ("frames", "frames.standardize.mean", [0.0], ["frames.standardize.mean must be 3 finite numbers"]),
    ("frames", "frames.standardize.std", [1.0, 0.0, 1.0], ["frames.standardize.std must be positive"]),
    ("frames", "frames.class_names", ["a", "b"], ["class_names lists 2 names for output_size 4"]),
    ("frames", "frames.sequence_inputs", ["x", "h", "c"], ["frames.sequence_inputs", "must name 4 tensors"]),
    ("frames", "prompt_model_file", "prompt.onnx", ["prompt_model_file is for text"]),
]


@pytest.mark.parametrize("base,path,value,words", BAD, ids=[f"{b}-{p}-{i}" for i, (b, p, *_) in enumerate(BAD)])
def test_bad_manifest_fails_naming_the_field(tmp_path, base, path, value, words):
    d = text_manifest().to_dict() if base == "text" else _frames_dict()
    write_bundle(tmp_path / "b", _set(d, path, value))
    with pytest.raises(BundleError) as e:
        load_manifest(tmp_path / "b")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "b" / "manifest.json") + ":"), msg
    for w in words:
        assert w in msg, msg


def test_sequence_graph_is_checked_like_the_others(tmp_path):
    b = write_bundle(tmp_path / "b", _frames_dict())
    load_manifest(b)
    (b / "sequence.onnx").write_bytes(b"replaced")
    with pytest.raises(BundleError, match=r"sequence\.onnx: sha256 .* does not match"):
        load_manifest(b)
    load_manifest(b, verify_checksums=False)
    (b / "sequence.onnx").unlink()
    with pytest.raises(BundleError, match=r"sequence\.onnx: file named in the manifest is missing"):
        load_manifest(b, verify_checksums=False)
    d = json.loads((b / "manifest.json").read_text())
    d["frames"]["sequence_model_file"] = "../sequence.onnx"
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="plain name inside the bundle"):
        load_manifest(b)


def test_frames_bundle_without_a_sequence_graph(tmp_path):
    d = _set(_frames_dict(), "frames.sequence_model_file", None)
    m = load_manifest(write_bundle(tmp_path / "b", d))
    assert m.frames.sequence_model_file is None and sorted(p.name for p in (tmp_path / "b").iterdir()) == \
        ["manifest.json", "model.onnx"]


def test_write_manifest_output_loads(tmp_path):
    m = frames_manifest()
    (tmp_path / "model.onnx").write_bytes(b"m")
    (tmp_path / "sequence.onnx").write_bytes(b"s")
    m = replace(m, model_sha256=hashlib.sha256(b"m").hexdigest(),
                frames=replace(m.frames, sequence_model_sha256=hashlib.sha256(b"s").hexdigest()))
    write_manifest(tmp_path, m)
    assert load_manifest(tmp_path) == m
