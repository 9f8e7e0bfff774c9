"""`lstmgen sample`: batch offline sampling through the real ONNX Runtime engine."""
from __future__ import annotations

import io
import json

import pytest

from lstmgen.cli import main
from lstmgen.offline.progress import Progress
from lstmgen_client import Client


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def sample(bundle, prompts, out, *extra):
    return main(["sample", str(bundle), "--prompts", str(prompts), "--out", str(out), "--quiet", *extra])


def test_sample_text_file_seeds_recorded_and_reproducible(bundles, tmp_path, char_server):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First Citizen:\n\nAll:\n")
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    args = ["--num-samples", "3", "--seed", "5", "--max-new-tokens", "20", "--temperature", "0.9", "--batch-size", "4"]
    assert sample(bundles["char"], prompts, out1, *args, "--ordered") == 0
    assert sample(bundles["char"], prompts, out2, *args) == 0  # completion order: same lines, any order
    rows = read(out1)
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(2) for j in range(3)]
    assert sorted(out1.read_text().splitlines()) == sorted(out2.read_text().splitlines())
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
        {"id": 4, "prompt": "Citizen", "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
         "repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.3, "max_new_tokens": 5,
         "logprobs": True, "top_logprobs": 2, "skip_unknown": True},
    ]) + "\n")
    out = tmp_path / "o.jsonl"
    assert sample(bundles["char"], prompts, out, "--ordered") == 1
    rows = read(out)
    assert [r["id"] for r in rows] == ["a", "b", "b", "c", 4]
    assert rows[0]["generated_tokens"] == 7 and rows[0]["finish_reason"] == "length"
    assert [r["seed"] for r in rows[1:3]] == [42, 43]
    assert all("e" not in r["text"] for r in rows[1:3])
    assert "error" in rows[3] and "prompt" in rows[3]["error"]
    assert rows[4]["generated_tokens"] == 5 and len(rows[4]["logprobs"]) == 5
    assert "logprobs" not in rows[0]


def test_sample_cli_sampling_flags(bundles, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("All\n")
    out = tmp_path / "o.jsonl"
    assert sample(bundles["char"], prompts, out, "--min-p", "0.05", "--repetition-penalty", "1.3",
                  "--frequency-penalty", "0.4", "--presence-penalty", "-0.2", "--top-k", "8", "--logprobs", "3",
                  "--max-new-tokens", "6", "--seed", "1") == 0
    (row,) = read(out)
    assert row["generated_tokens"] == 6 and len(row["logprobs"]) == 6


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "All", "max_new_tokens": "ten"}', 'field "max_new_tokens" must be an integer'),
    ('{"prompt": "All", "temperature": "hot"}', 'field "temperature" must be a number'),
    ('{"prompt": "All", "greedy": 1}', 'field "greedy" must be true or false'),
    ('{"prompt": "All", "stop": [1]}', 'field "stop" must be a string or a list of strings'),
    ('{"prompt": "All", "temprature": 0.5}', "unknown field(s) 'temprature'"),
    ('{"prompt": "All", "top_p": 1.5}', "top_p: is 1.5"),
    ('{"prompt": 3}', 'expected a string "prompt"'),
    ('{not json', "not valid JSON"),
])
def test_sample_bad_field_named_with_file_line_and_nothing_written(bundles, tmp_path, capsys, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n' + line + "\n")
    out = tmp_path / "o.jsonl"
    assert sample(bundles["char"], bad, out) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3" in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_sample_out_folder_created_and_existing_output_protected(bundles, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("All\n")
    out = tmp_path / "new" / "deeper" / "o.jsonl"
    assert sample(bundles["char"], prompts, out, "--max-new-tokens", "3") == 0
    assert len(read(out)) == 1
    assert sample(bundles["char"], prompts, out, "--max-new-tokens", "3") == 2
    assert "--resume" in capsys.readouterr().err
    assert sample(bundles["char"], prompts, out, "--max-new-tokens", "3", "--overwrite") == 0


def test_sample_parquet_in_and_out_and_tsv(bundles, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["x", "y", "z"], "prompt": ["All", "Speak", "You"],
                             "seed": pa.array([7, None, None], pa.int64())}), prompts)
    pout, jout, tout = tmp_path / "o.parquet", tmp_path / "o.jsonl", tmp_path / "o.tsv"
    args = ["--max-new-tokens", "8", "--seed", "3", "--ordered"]
    assert sample(bundles["char"], prompts, pout, *args) == 0
    assert sample(bundles["char"], prompts, jout, *args) == 0
    assert sample(bundles["char"], prompts, tout, *args) == 0
    table = pq.read_table(pout).to_pylist()
    rows = read(jout)
    assert [(r["id"], r["seed"], r["text"]) for r in table] == [(r["id"], r["seed"], r["text"]) for r in rows]
    assert rows[0]["seed"] == 7 and not (tmp_path / "o.parquet.journal.jsonl").exists()
    tsv = [line.split("\t") for line in tout.read_text().splitlines()]
    assert [(int(t[0]), t[2], int(t[3]), json.loads(f'"{t[5]}"')) for t in tsv] == \
        [(r["index"], r["id"], r["seed"], r["text"]) for r in rows]


def test_progress_plain_lines_off_a_terminal():
    buf = io.StringIO()
    p = Progress(total=10, already=2, stream=buf, interval=0.0)
    p.update(4, 40)
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in buf.getvalue()
    assert lines[-1].startswith("lstmgen sample: 6/10 samples (60.0%)")
    assert "samples/s" in lines[-1] and "tokens/s" in lines[-1] and "ETA" in lines[-1]
