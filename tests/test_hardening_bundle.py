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


def _hidden(d):  # the manifest agrees with itself (state shapes too), not with the graph
    d["hidden_size"] = 32
    for t in d["state"]:
        t["shape"][1] = 32


def _layers(d):
    d["num_layers"] = 3
    for t in d["state"]:
        t["shape"][0] = 3


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


# -- every file the server opens resolves inside the bundle (issue 9, item 4) ----------------------
def _outside_copy(bundle, tmp_path, fname="model.onnx"):
    """A byte-identical copy of the bundle's file in a folder beside it: its checksum still matches."""
    outside = tmp_path / "elsewhere"
    outside.mkdir(exist_ok=True)
    shutil.copy(bundle / fname, outside / fname)
    return outside


def test_symlinked_model_outside_the_bundle_is_refused(bundles, tmp_path):
    bad = copy_bundle(bundles["char"], tmp_path / "b")
    outside = _outside_copy(bad, tmp_path)
    (bad / "model.onnx").unlink()
    (bad / "model.onnx").symlink_to(outside / "model.onnx")
    with pytest.raises(BundleError, match=rf"^{bad / 'model.onnx'}: resolves to .*elsewhere.*outside the bundle"):
        Engine(bad, EngineConfig(device="cpu"))


def test_model_file_through_a_linked_folder_is_refused(bundles, tmp_path):
    """`etc/passwd` beside `etc -> /etc` in the attack; here a folder link to a copy of the graph."""
    bad = copy_bundle(bundles["char"], tmp_path / "b", lambda d: d.update(model_file="etc/model.onnx"))
    (bad / "etc").symlink_to(_outside_copy(bad, tmp_path), target_is_directory=True)
    want = rf"^{bad / 'manifest.json'}: file name 'etc/model.onnx' must be a plain name"
    with pytest.raises(BundleError, match=want):
        Engine(bad, EngineConfig(device="cpu"))


def test_symlinked_manifest_outside_the_bundle_is_refused(bundles, tmp_path):
    bad = copy_bundle(bundles["char"], tmp_path / "b")
    outside = _outside_copy(bad, tmp_path, "manifest.json")
    (bad / "manifest.json").unlink()
    (bad / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(BundleError, match="outside the bundle folder"):
        Engine(bad, EngineConfig(device="cpu"))


def test_symlink_to_a_file_inside_the_bundle_still_loads(bundles, tmp_path):
    ok = copy_bundle(bundles["char"], tmp_path / "b")
    (ok / "model.onnx").rename(ok / "model-v2.onnx")
    (ok / "model.onnx").symlink_to("model-v2.onnx")
    assert Engine(ok, EngineConfig(device="cpu")).manifest.model_file == "model.onnx"


# -- integrity covers every byte the graphs load (issue 9, item 5) --------------------------------
def test_graph_with_external_data_is_refused_even_with_matching_checksum(bundles, tmp_path):
    """The attack: an initializer moved to an in-bundle weights.bin and overwritten with 1e30; the
    manifest's checksum of model.onnx updated. The server must not load it."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    from lstmgen.bundle import sha256_file

    bad = copy_bundle(bundles["char"], tmp_path / "b")
    model = onnx.load(bad / "model.onnx")
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, 1e30, np.float32)
                                           if t.data_type == onnx.TensorProto.FLOAT else numpy_helper.to_array(t),
                                           t.name))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin")  # the big ones
    onnx.save(model, bad / "model.onnx")
    assert (bad / "weights.bin").is_file()
    d = json.loads((bad / "manifest.json").read_text())
    d["model_sha256"] = sha256_file(bad / "model.onnx")
    (bad / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=rf"^{bad / 'model.onnx'}: the graph keeps tensor\(s\) .* in external data"):
        Engine(bad, EngineConfig(device="cpu"))


def test_export_refuses_a_graph_with_external_data(bundles, tmp_path):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from lstmgen.export.bundle import ExportError, _save

    model = onnx.load(bundles["char"] / "model.onnx")
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin")  # the big ones
    with pytest.raises(ExportError, match=r"model\.onnx: the graph keeps tensor\(s\) .* external data"):
        _save(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


TYPE_CASES = [  # (field, bad value, words in the message)
    ("model_file", 5, "model_file must be a string, got int 5"),
    ("model_file", ["model.onnx"], "model_file must be a string, got list"),
    ("prompt_model_file", 3, "prompt_model_file must be a string or null, got int 3"),
    ("model_sha256", None, "model_sha256 must be a string, got NoneType"),
    ("provenance", ["corpus"], "provenance must be an object, got list"),
    ("provenance", "tests", "provenance must be an object, got str"),
    ("inputs", "tokens", "inputs must be a list of strings, got str"),
    ("outputs", ["logits", 1, "c_out"], "outputs must be a list of strings, got list"),
    ("num_layers", True, "num_layers must be a positive integer, got bool"),
    ("opset", 17.0, "opset must be a positive integer, got float"),
    ("quantization", 8, "quantization must be a string, got int"),
    ("vocab", {"level": "char", "tokens": "abc"}, "vocab must be an object with 'level' and 'tokens'"),
    ("vocab", ["a", "b"], "vocab must be an object"),
    ("vocab_size", "33", "vocab_size must be an integer, got str"),
    ("colour", "blue", "unknown field(s) 'colour'"),
]


@pytest.mark.parametrize("field,value,words", TYPE_CASES, ids=[f"{c[0]}-{type(c[1]).__name__}" for c in TYPE_CASES])
def test_every_manifest_field_is_type_checked(bundles, tmp_path, field, value, words):
    bad = copy_bundle(bundles["char"], tmp_path / "b", lambda d: d.__setitem__(field, value))
    with pytest.raises(BundleError) as e:
        Engine(bad, EngineConfig(device="cpu"))
    assert str(e.value) == f"{bad / 'manifest.json'}: {words}" or str(e.value).startswith(
        f"{bad / 'manifest.json'}: {words}"), str(e.value)


def test_missing_field_is_named(bundles, tmp_path):
    bad = copy_bundle(bundles["char"], tmp_path / "b", lambda d: d.pop("hidden_size"))
    with pytest.raises(BundleError, match=rf"^{bad / 'manifest.json'}: field 'hidden_size' is missing$"):
        Engine(bad, EngineConfig(device="cpu"))


@pytest.mark.parametrize("field,value", [("model_file", 5), ("model_file", ["model.onnx"]), ("provenance", [])])
def test_serve_exits_2_naming_file_and_field_without_traceback(bundles, tmp_path, field, value):
    bad = copy_bundle(bundles["char"], tmp_path / "b", lambda d: d.__setitem__(field, value))
    r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bad), "--port", "0", "--device", "cpu"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"{bad / 'manifest.json'}: {field} must be" in r.stderr and "Traceback" not in r.stderr, r.stderr
