"""Bundle validation at load: a manifest that disagrees with its graphs, or files that do not match
their checksums, fail before serving with a message naming the file and the mismatch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lstmgen.bundle import BundleError
from lstmgen.serve.engine import Engine, EngineConfig


# Each edit mutates the manifest dict in place.
def _add_token(d):
    d["vocab"]["tokens"].append("\u00e9")
    d["vocab_size"] += 1


def _hidden(d):
    d["hidden_size"] = 32


def _layers(d):
    d["num_layers"] = 3


def _rename_input(d):
    d["inputs"] = ["tokens", "h", "state_c"]


def _rename_output(d):
    d["outputs"] = ["logits", "h_out", "c_next"]


def _rename_prompt_input(d):
    d["prompt_inputs"] = ["tokens", "lens", "h", "c"]


def _vocab_size_field(d):
    d["vocab_size"] = 40


def _missing_model(d):
    d["model_file"] = "gone.onnx"


def _escape(d):
    d["model_file"] = "../model.onnx"


def _bad_layers_type(d):
    d["num_layers"] = "2"


CASES = [  # (edit, file named, words in the message)
    (_add_token, "model.onnx", ["logits width 33", "vocabulary size 34"]),
    (_hidden, "model.onnx", ["input h", "[2, B, 32]", "hidden_size"]),
    (_layers, "model.onnx", ["input h", "[3, B, 16]"]),
    (_rename_input, "model.onnx", ["graph inputs", "state_c"]),
    (_rename_output, "model.onnx", ["outputs", "c_next"]),
    (_rename_prompt_input, "prompt.onnx", ["graph inputs", "lens"]),
    (_vocab_size_field, "manifest.json", ["vocab_size 40", "33 tokens"]),
    (_missing_model, "gone.onnx", ["missing"]),
    (_escape, "manifest.json", ["plain name inside the bundle"]),
    (_bad_layers_type, "manifest.json", ["num_layers", "positive integer"]),
]


def copy_bundle(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        path = dst / "manifest.json"
        d = json.loads(path.read_text())
        edit(d)
        path.write_text(json.dumps(d))
    return dst


@pytest.mark.parametrize("edit,fname,words", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_manifest_disagreeing_with_graph_fails_naming_file(bundles, tmp_path, edit, fname, words):
    bad = copy_bundle(bundles["char"], tmp_path / "b", edit)
    with pytest.raises(BundleError) as e:
        Engine(bad, EngineConfig(device="cpu"))
    msg = str(e.value)
    assert msg.startswith(str(bad / fname) + ":"), msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("fname", ["model.onnx", "prompt.onnx"])
def test_checksum_mismatch_names_the_file(bundles, tmp_path, fname):
    bad = copy_bundle(bundles["char"], tmp_path / "b")
    with open(bad / fname, "ab") as f:
        f.write(b"\x00")  # still a loadable file; only the checksum tells
    with pytest.raises(BundleError, match=rf"^{bad / fname}: sha256 .* does not match the manifest"):
        Engine(bad, EngineConfig(device="cpu"))


def test_swapped_graph_with_matching_checksum_is_caught(bundles, tmp_path):
    """A word model's graph under a char manifest, checksums updated: the shapes still tell."""
    from lstmgen.bundle import sha256_file

    bad = copy_bundle(bundles["char"], tmp_path / "b")
    for f in ("model.onnx", "prompt.onnx"):
        shutil.copy(bundles["word"] / f, bad / f)
    d = json.loads((bad / "manifest.json").read_text())
    d["model_sha256"], d["prompt_model_sha256"] = sha256_file(bad / "model.onnx"), sha256_file(bad / "prompt.onnx")
    (bad / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"model\.onnx: logits width \d+ differs from the vocabulary size 33"):
        Engine(bad, EngineConfig(device="cpu"))


def test_serve_refuses_bad_bundle_with_exit_2(bundles, tmp_path):
    bad = copy_bundle(bundles["char"], tmp_path / "b", _hidden)
    r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bad), "--port", "0", "--device", "cpu"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{bad / 'model.onnx'}: input h has shape" in r.stderr
