"""`lstmgen sample` against hostile input: every malformed record is refused up front (exit 2, the
file:line and the field named, nothing written), every record that fails while it is sampled gets
its own "error" line while the rest are written, and the command never ends in a traceback; the
output is never the input; `--resume` refuses an edited input and reports lines it did not write.
Real CLI, real tiny ONNX model, no mocks."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from lstmgen.cli import main
from lstmgen.offline.outputs import DurableAppender, dump_line

ARGS = ["--max-new-tokens", "4", "--seed", "3", "--batch-size", "8", "--threads", "1", "--device", "cpu", "--quiet"]
WORDS = ["All", "Speak", "First Citizen", "You are", "hear me"]  # in the char bundle's vocabulary


def cli(bundle, prompts, out, *extra) -> subprocess.CompletedProcess:
    """`python -m lstmgen.cli sample ...` in its own process: its exit status and its stderr."""
    cmd = [sys.executable, "-m", "lstmgen.cli", "sample", str(bundle), "--prompts", str(prompts), "--out", str(out),
           *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, errors="backslashreplace", timeout=300)


def sample(bundle, prompts, out, *extra) -> int:
    """The same command in this process (cheap where it is refused before the engine loads)."""
    return main(["sample", str(bundle), "--prompts", str(prompts), "--out", str(out), *ARGS, *extra])


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)  # ensure_ascii: "\ud800" stays an escape


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- 1. per-record failures -------------------------------------------------------------------------

@pytest.mark.parametrize("record, field", [
    ({"prompt": "The \ud800 x"}, "prompt"),
    ({"prompt": "All", "id": "a\udfffb"}, "id"),
    ({"prompt": "All", "stop": "\ud800"}, "stop"),
    ({"prompt": "All", "stop": ["e", "x\udc00"]}, "stop"),
])
def test_lone_surrogate_refused_up_front_naming_line_and_field(bundles, tmp_path, record, field):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text(jsonl({"prompt": "All"}, record, {"prompt": "Speak"}))
    r = cli(bundles["char"], prompts, out)
    assert r.returncode == 2, r.stderr
    assert f"p.jsonl:2: field \"{field}\"" in r.stderr and "surrogate" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("field, value", [
    ("top_k", 10**20), ("max_new_tokens", 10**20), ("seed", 2**64), ("top_logprobs", 10**20),
    ("num_samples", 10**20), ("top_k", -1), ("max_new_tokens", 0), ("seed", -1), ("num_samples", 0),
    ("id", 2**63), ("temperature", 10**400),  # no double holds 10**400
])
def test_out_of_range_integer_refused_before_it_reaches_a_shared_step(bundles, tmp_path, capsys, field, value):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    prompts.write_text(jsonl({"prompt": "All"}, {"prompt": "Speak", field: value}))
    assert sample(bundles["char"], prompts, out) == 2
    err = capsys.readouterr().err
    assert f"p.jsonl:2: field \"{field}\"" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [
    ("--top-k", str(10**20)), ("--max-new-tokens", str(10**20)), ("--seed", "-1"), ("--seed", str(2**64)),
    ("--num-samples", str(2**24)), ("--logprobs", str(10**20)),
])
def test_out_of_range_flag_refused_naming_the_flag(bundles, tmp_path, capsys, flag, value):
    prompts, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    prompts.write_text("All\n")
    assert sample(bundles["char"], prompts, out, flag, value) == 2
    err = capsys.readouterr().err
    assert f"{flag} is " in err and "p.txt:1" not in err
    assert not out.exists()


def test_output_line_with_lone_surrogate_in_id_and_error_is_written_and_reads_back(tmp_path):
    row = {"index": 0, "sample": 0, "id": "a\ud800b", "prompt": "x", "seed": 1, "error": "prompt: \udfff unknown"}
    for fmt in ("jsonl", "tsv"):
        path = tmp_path / f"o.{fmt}"
        appender = DurableAppender(path)
        appender.write(dump_line(row, fmt))
        appender.close()
        line = path.read_text(encoding="utf-8")
        if fmt == "jsonl":
            assert json.loads(line) == row
        else:
            fields = line.rstrip("\n").split("\t")
            assert json.loads(f'"{fields[2]}"') == row["id"] and json.loads(f'"{fields[5]}"') == row["error"]


# -- the fuzzed input --------------------------------------------------------------------------------

def valid(rng: random.Random) -> dict:
    r = {"prompt": rng.choice(WORDS), "num_samples": rng.randint(1, 2)}
    options = {"id": rng.choice([f"v{rng.randrange(100)}", rng.randrange(-5, 5)]), "max_new_tokens": rng.randint(1, 6),
               "temperature": rng.uniform(0, 1.5), "top_k": rng.randint(0, 2**31 - 1), "top_p": rng.uniform(0.3, 1),
               "seed": rng.randrange(2**64), "stop": rng.choice(["e", ["a", "p"]]), "greedy": rng.random() < 0.5,
               "repetition_penalty": rng.uniform(0.5, 2)}
    for k in rng.sample(sorted(options), rng.randint(0, 4)):
        r[k] = options[k]
    if rng.random() < 0.3:
        r.update(logprobs=True, top_logprobs=rng.randint(0, 3))
    return r


def fails_when_sampled(rng: random.Random) -> dict:
    """Well-formed, but the model cannot take it: one "error" line per sample, the run goes on."""
    return rng.choice([{"prompt": "Zebra \u4e2d"}, {"prompt": "\U0001F600", "id": "emoji"},
                       {"prompt": "###", "skip_unknown": True}, {"prompt": "All@", "num_samples": 2}])


DEEP = 100_000


def malformed(rng: random.Random) -> tuple[bytes, str]:
    """One malformed line and a fragment its refusal must name."""
    def dumps(record) -> bytes:
        return json.dumps(record).encode()

    cases = [
        (dumps({"prompt": "The \ud800 x"}), '"prompt"'), (dumps({"prompt": "All", "id": "\udbff"}), '"id"'),
        (dumps({"prompt": "All", "stop": ["\udc00"]}), '"stop"'),
        *[(dumps({"prompt": "All", f: 10**20}), f'"{f}"')
          for f in ("top_k", "max_new_tokens", "seed", "top_logprobs", "num_samples")],
        *[(dumps({"prompt": "All", f: -3}), f'"{f}"') for f in ("top_k", "max_new_tokens", "seed", "num_samples")],
        (dumps({"prompt": "All", "temperature": "NaN"}), '"temperature"'),
        (dumps({"prompt": "All", "top_p": "Infinity"}), '"top_p"'),
        (dumps({"prompt": "All", "top_k": "nan"}), '"top_k"'),
        (b'{"prompt": "All", "temperature": NaN}', "temperature"),  # JSON Python accepts: the range check refuses
        (dumps({"prompt": "All", "top_p": 1.5}), "top_p"),  # the server's own checks
        (dumps({"prompt": "All", "max_new_tokens": 5000}), "max_new_tokens"),
        (dumps({"prompt": "All", "stop": [""]}), "stop[0]"),
        (dumps({"prompt": 5}), '"prompt"'), (dumps({"prompt": None}), '"prompt"'),
        (dumps({"prompt": "All", "id": [1]}), '"id"'),
        (dumps({"prompt": "All", "greedy": "yes"}), '"greedy"'), (dumps({"prompt": "All", "stop": 7}), '"stop"'),
        (dumps({"prompt": "All", "num_samples": 2.0}), '"num_samples"'),
        (dumps({"prompt": "All", "stop": json.loads("[" * 50 + "]" * 50)}), '"stop"'),
        (b'{"prompt": "All", "stop": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
        (b'{"prompt": "All", "seed": ' + b"9" * 5000 + b"}", "4300 digits"),
        (dumps([1, 2]), "JSON object"), (dumps("All"), "JSON object"), (b"42", "JSON object"),
        (b'{"prompt": "All"', "not valid JSON"), (dumps({"prompt": "All", "temprature": 1}), "temprature"),
        (dumps({"prompt": "All", "\ud800": 1}), "unknown field"), (b'{"prompt": "\xff"}', "not UTF-8"),
    ]
    return rng.choice(cases)


def fuzzed_input(rng: random.Random, n: int) -> tuple[list[bytes], list[tuple[str, dict | None, str | None]]]:
    lines, kinds = [], []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.5:
            record = valid(rng)
            lines.append(json.dumps(record).encode())
            kinds.append(("valid", record, None))
        elif roll < 0.7:
            record = fails_when_sampled(rng)
            lines.append(json.dumps(record, ensure_ascii=rng.random() < 0.5).encode())
            kinds.append(("fails", record, None))
        else:
            line, fragment = malformed(rng)
            lines.append(line)
            kinds.append(("malformed", None, fragment))
    return lines, kinds


def refuse_until_clean(bundle, prompts, out, lines, kinds, capsys) -> int:
    """Runs the command until it accepts the input: each time it must refuse the first malformed
    line by file:line and problem, write nothing and leave no traceback; that line is then blanked
    (blank lines keep the others' line numbers and take no index). Returns the refusals."""
    refused = 0
    while True:
        prompts.write_bytes(b"\n".join(lines) + b"\n")
        bad = [i for i, (kind, _, _) in enumerate(kinds) if kind == "malformed"]
        if not bad:
            return refused
        assert sample(bundle, prompts, out) == 2
        err = capsys.readouterr().err
        first = bad[0]
        assert f"{prompts}:{first + 1}:" in err and kinds[first][2] in err and "Traceback" not in err, err
        assert not out.exists()
        lines[first], kinds[first] = b"", ("blank", None, None)
        refused += 1


@pytest.mark.parametrize("round_", [0, 1])
def test_fuzzed_input_every_valid_record_written_every_bad_one_named(bundles, tmp_path, capsys, round_):
    seed = round_ if round_ == 0 else int(os.environ.get("LSTMGEN_TEST_SEED", random.randrange(1 << 30)))
    print(f"fuzz seed {seed}")
    rng = random.Random(seed)
    lines, kinds = fuzzed_input(rng, 40)
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    assert refuse_until_clean(bundles["char"], prompts, out, lines, kinds, capsys) == \
        sum(kind == "blank" for kind, _, _ in kinds)
    r = cli(bundles["char"], prompts, out, "--ordered")
    kept = [(kind, record) for kind, record, _ in kinds if kind != "blank"]
    status = 1 if any(kind == "fails" for kind, _ in kept) else 0  # 1: some line carries an error
    assert r.returncode == status, r.stderr
    assert "Traceback" not in r.stderr
    rows = read(out)
    expected = [(i, j) for i, (_, record) in enumerate(kept) for j in range(record.get("num_samples", 1))]
    assert [(row["index"], row["sample"]) for row in rows] == expected  # each sample exactly once
    for row in rows:
        kind, record = kept[row["index"]]
        assert row["prompt"] == record["prompt"] and row.get("id") == record.get("id")
        if kind == "valid":
            assert "error" not in row and isinstance(row["text"], str) and row["generated_tokens"] >= 1
        else:
            assert row["error"].startswith("prompt: ") and "text" not in row
    # A run cut short (with a torn last line) resumes to the same file.
    whole = out.read_bytes()
    cut = whole.splitlines(keepends=True)
    out.write_bytes(b"".join(cut[:len(cut) // 2]) + cut[len(cut) // 2][:7])
    r = cli(bundles["char"], prompts, out, "--ordered", "--resume")
    assert r.returncode == status and "Traceback" not in r.stderr and out.read_bytes() == whole


def test_json_the_decoder_refuses_without_a_decode_error_is_named(bundles, tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    for line, problem in [(b'{"prompt": "All", "seed": ' + b"7" * 5000 + b"}", "4300 digits"),
                          (b'{"prompt": "All", "stop": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply")]:
        prompts.write_bytes(b'{"prompt": "All"}\n' + line + b"\n")
        r = cli(bundles["char"], prompts, out)
        assert r.returncode == 2 and "p.jsonl:2: not" in r.stderr and problem in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "sys.set_int_max_str_digits" not in r.stderr
        assert not out.exists()


def test_parquet_output_with_ids_of_mixed_types_or_missing(bundles, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    for name, ids, want in [("a", [None, 5], [None, 5]), ("b", [5, "x"], ["5", "x"])]:
        prompts, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.parquet"
        prompts.write_text(jsonl(*[{"prompt": "All", **({} if i is None else {"id": i})} for i in ids]))
        r = cli(bundles["char"], prompts, out, "--ordered")
        assert r.returncode == 0, r.stderr
        assert pq.read_table(out)["id"].to_pylist() == want


# -- 3. the output is never the input ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "run-record", "journal"])
@pytest.mark.parametrize("mode", ["--overwrite", "--resume"])
def test_out_that_is_the_prompts_file_refused(bundles, tmp_path, capsys, how, mode):
    text = jsonl({"prompt": "All"}, {"prompt": "Speak"})
    out = tmp_path / ("o.parquet" if how == "journal" else "o.jsonl")
    prompts = {"same": out, "symlink": tmp_path / "link.jsonl", "hardlink": tmp_path / "hard.jsonl",
               "run-record": tmp_path / "o.jsonl.run.json", "journal": tmp_path / "o.parquet.journal.jsonl"}[how]
    (prompts if how != "symlink" else out).write_text(text)
    if how == "symlink":
        prompts.symlink_to(out)  # --prompts names the link, --out the file it points to
    if how == "hardlink":
        os.link(prompts, out)
    assert sample(bundles["char"], prompts, out, mode) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--prompts" in err and "Traceback" not in err
    assert prompts.read_text() == text


# -- 4. --resume: a changed input, duplicated and foreign lines -----------------------------------

def whole_and_cut(bundle, tmp_path, keep: int):
    """An uninterrupted --ordered run, and a copy of it cut after `keep` lines (as a kill leaves it)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(jsonl(*[{"id": f"p{i}", "prompt": WORDS[i % 5], "num_samples": 2} for i in range(10)]))
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert sample(bundle, prompts, whole, "--ordered") == 0
    lines = whole.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:keep]))
    (tmp_path / "part.jsonl.run.json").write_text((tmp_path / "whole.jsonl.run.json").read_text())
    return prompts, whole, part, lines


@pytest.mark.parametrize("edit", ["same size", "appended"])
def test_resume_refuses_an_edited_input_and_continues_with_the_original(bundles, tmp_path, capsys, edit):
    prompts, whole, part, lines = whole_and_cut(bundles["char"], tmp_path, keep=7)
    original = prompts.read_text()
    prompts.write_text(original.replace("Speak", "kaepS") if edit == "same size"
                       else original + jsonl({"prompt": "All"}))
    capsys.readouterr()
    assert sample(bundles["char"], prompts, part, "--ordered", "--resume") == 2
    err = capsys.readouterr().err
    assert "changed since the first run" in err and "--overwrite" in err and "original" in err
    assert ("same size" in err) == (edit == "same size")
    assert part.read_text() == "".join(lines[:7])  # untouched
    prompts.write_text(original)
    assert sample(bundles["char"], prompts, part, "--ordered", "--resume") == 0
    assert part.read_bytes() == whole.read_bytes()


def test_resume_reports_duplicated_and_foreign_lines_and_counts_each_sample_once(bundles, tmp_path, capsys):
    prompts, whole, part, lines = whole_and_cut(bundles["char"], tmp_path, keep=10)
    foreign = [json.dumps({**json.loads(lines[0]), "index": 999}) + "\n",  # a prompt this input lacks
               json.dumps({**json.loads(lines[0]), "sample": 5}) + "\n"]  # a sample it does not ask for
    extras = [lines[3], lines[5], *foreign]
    part.write_text("".join(lines[:10] + extras))
    capsys.readouterr()
    assert sample(bundles["char"], prompts, part, "--ordered", "--resume") == 0
    err = capsys.readouterr().err
    assert "2 duplicated line(s)" in err and "2 line(s) of no sample this input asks for" in err
    assert "index 999 sample 0" in err and "index 0 sample 5" in err and "index 1 sample 1, 2 times" in err
    assert "resuming: 10 of 20 samples already written" in err
    assert part.read_text().splitlines(keepends=True) == lines[:10] + extras + lines[10:]


def test_resume_of_a_run_that_recorded_no_input_warns_and_continues(bundles, tmp_path, capsys):
    prompts, whole, part, lines = whole_and_cut(bundles["char"], tmp_path, keep=4)
    meta = tmp_path / "part.jsonl.run.json"
    settings = json.loads(meta.read_text())
    del settings["input"]  # as written before inputs were recorded
    meta.write_text(json.dumps(settings))
    capsys.readouterr()
    assert sample(bundles["char"], prompts, part, "--ordered", "--resume") == 0
    assert "did not record its input" in capsys.readouterr().err
    assert part.read_bytes() == whole.read_bytes()
    assert "input" in json.loads(meta.read_text())  # recorded from now on
