"""lstmgen/manifest_schema.py: the manifest's field checks on their own (no files), and their home
re-exported where callers import them (lstmgen.bundle). The messages through load_manifest, with
the file's path: tests/test_export_manifest.py, tests/test_hardening_bundle.py."""
from __future__ import annotations

import pytest

from lstmgen import bundle, manifest_schema
from lstmgen.manifest_schema import SchemaError, check_fields

GOOD = {"format_version": 1, "kind": "frames", "cell": "gru", "num_layers": 1, "hidden_size": 8,
        "embedding_size": 3, "opset": 17,
        "frames": {"task": "regression", "input_size": 3, "output_size": 1, "standardize": {"mode": "none"}}}


def test_a_good_manifest_passes_and_builds():
    check_fields(GOOD)
    m = bundle.Manifest.from_dict(GOOD)
    manifest_schema.check_model(GOOD, m)
    assert m.sequence_inputs == ("x", "lengths", "h")


@pytest.mark.parametrize("change, message", [
    ({"format_version": 2}, "format_version 2 is not supported"),
    ({"num_layers": True}, "num_layers must be a positive integer, got bool True"),
    ({"colour": "red"}, "unknown field(s) 'colour'"),
    ({"frames": {"task": "regression", "input_size": 3}}, "field 'frames.output_size' is missing"),
    ({"frames": {**GOOD["frames"], "standardize": {"mode": "global", "mean": [0, 0, 0], "std": [1, 0, 1]}}},
     "frames.standardize.std must be positive"),
    ({"kind": "text"}, "field 'vocab' is missing"),
])
def test_each_problem_names_the_field(change, message):
    with pytest.raises(SchemaError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_fields({**GOOD, **change})


def test_the_fields_must_agree():
    raw = {**GOOD, "state": [{"name": "h", "shape": [2, 8]}]}
    check_fields(raw)  # each field is well typed; together they disagree
    with pytest.raises(SchemaError, match=r"state 'h' has shape \[2, 8\], but num_layers and hidden_size say \[1, 8\]"):
        manifest_schema.check_model(raw, bundle.Manifest.from_dict(raw))


def test_not_an_object():
    with pytest.raises(SchemaError, match="expected a JSON object"):
        check_fields([GOOD])


def test_the_values_live_here_and_the_bundle_still_offers_them():
    for name in ("FORMAT_VERSION", "KINDS", "CELLS", "STATE_NAMES"):
        assert getattr(bundle, name) is getattr(manifest_schema, name)
