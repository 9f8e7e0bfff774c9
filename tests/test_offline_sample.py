"""`lstmgen sample`: batch offline sampling through the real ONNX Runtime engine."""
from __future__ import annotations

import json

from lstmgen.cli import main
from lstmgen_client import Client


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_text_file_seeds_recorded_and_reproducible(bundles, tmp_path, char_server):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First Citizen:\n\nAll:\n")
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    args = ["sample", str(bundles["char"]), "--prompts", str(prompts), "--num-samples", "3", "--seed", "5",
            "--max-new-tokens", "20", "--temperature", "0.9", "--batch-size", "4"]
    assert main(args + ["--out", str(out1)]) == 0
    assert main(args + ["--out", str(out2)]) == 0
    rows = read(out1)
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(2) for j in range(3)]
    assert rows == read(out2)  # same base seed: same file
    assert len({r["seed"] for r in rows}) == 6 and all(r["generated_tokens"] == 20 for r in rows)
    assert len({r["text"] for r in rows}) == 6
    # The recorded seed reproduces a line through the server too: one generation core.
    with Client(char_server.target) as c:
        r = rows[4]
        assert c.generate(r["prompt"], max_new_tokens=20, temperature=0.9, seed=r["seed"]).text == r["text"]


def test_sample_jsonl_per_prompt_params_and_errors(bundles, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"id": "a", "prompt": "All", "greedy": True, "max_new_tokens": 7},
        {"id": "b", "prompt": "Speak", "seed": 42, "num_samples": 2, "stop": ["e"]},
        {"id": "c", "prompt": "\u4e2d"},  # not in the vocabulary: an error line, the rest go on
    ]) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["sample", str(bundles["char"]), "--prompts", str(prompts), "--out", str(out)]) == 1
    rows = read(out)
    assert [r["id"] for r in rows] == ["a", "b", "b", "c"]
    assert rows[0]["generated_tokens"] == 7 and rows[0]["finish_reason"] == "length"
    assert [r["seed"] for r in rows[1:3]] == [42, 43]
    assert all("e" not in r["text"] for r in rows[1:3])
    assert "error" in rows[3] and "prompt" in rows[3]["error"]


def test_sample_bad_prompts_file(bundles, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    assert main(["sample", str(bundles["char"]), "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
