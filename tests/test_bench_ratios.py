"""`lstmgen bench` prints every ratio with the figure it was divided by, flags a figure above its
ceiling as disturbed instead of reporting it (in the text, the JSON ratios and the plot), and does
not overwrite the published reports in docs/ when a documented command is copied."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lstmgen.cli import main
from lstmgen.tools.bench import (CEILING, bounded, median_pair, pair_runs, plot, plot_series, refuse_overwrite,
                                 share)

ROOT = Path(__file__).resolve().parents[1]


def test_a_ratio_names_the_figure_it_was_divided_by():
    beside = "raw ORT at B=1 measured beside it"
    assert share(1846, 2494, beside) == "74% of 2,494 tok/s, raw ORT at B=1 measured beside it"
    assert share(9_000, 12_000, CEILING) == "75% of 12,000 tok/s, the fp32 matmul ceiling"
    assert share(1000, 1000, CEILING).startswith("100% of 1,000 tok/s")  # at the ceiling: still a figure


def test_over_100_percent_of_a_ceiling_is_flagged_not_reported():
    text = share(1130, 1000, CEILING)
    assert text == "over 100% of 1,000 tok/s, the fp32 matmul ceiling: disturbed by other load, not reported"
    assert "113%" not in text
    assert bounded(1.13) is None and bounded(0.74) == 0.74 and bounded(None) is None


def test_the_median_pair_keeps_its_raw_figure():
    pairs = [(1846.0, 2494.0), (2100.0, 1900.0), (1500.0, 2500.0)]  # 74%, 111%, 60%
    assert median_pair(pairs) == (1846.0, 2494.0) and median_pair([]) is None
    assert pair_runs(pairs) == "1,846/2,494 tok/s 74%, 2,100/1,900 tok/s over 100%, 1,500/2,500 tok/s 60%"


def result(server: dict[int, float], ort: dict[int, float], ceiling: float = 10_000.0, pairs=None) -> dict:
    pairs = pairs or {}
    return {"ceiling_tokens_per_s": ceiling, "torch_eager_tokens_per_s": 500.0,
            "server": {str(n): {"tokens_per_s": v, "vs_ort_pair": pairs.get(n)} for n, v in server.items()},
            "ort_step_tokens_per_s": {str(b): v for b, v in ort.items()},
            "model": {"num_layers": 2, "hidden_size": 16, "level": "char", "vocab_size": 30,
                      "quantization": "fp32"}, "machine": {"cpus": 2}}


def test_the_plot_marks_a_point_over_the_ceiling_instead_of_drawing_it_above(tmp_path):
    r = result({1: 1846.0, 64: 9000.0, 256: 11_300.0}, {1: 2494.0, 256: 12_000.0},
               pairs={1: [1846.0, 2494.0], 64: [9000.0, 8800.0]})
    s = plot_series(r)
    assert s["server"] == ([1], [1846.0])
    assert s["server_disturbed"] == ([64, 256], [9000.0, 10_000.0])  # over the raw step beside it; over the ceiling
    assert s["ort"] == ([1], [2494.0]) and s["ort_disturbed"] == ([256], [10_000.0])
    assert max(s["server"][1] + s["ort"][1] + s["server_disturbed"][1] + s["ort_disturbed"][1]) <= 10_000.0
    pytest.importorskip("matplotlib")
    plot(r, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_an_existing_report_is_not_overwritten_without_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("docs").mkdir()
    Path("docs/bench.json").write_text("{}")
    msg = refuse_overwrite(["docs/bench.json", None], "bench-out", overwrite=False)
    assert msg and "docs/bench.json already exists" in msg and "--overwrite" in msg and "bench-out/" in msg
    assert refuse_overwrite(["docs/bench.json"], "bench-out", overwrite=True) is None
    assert refuse_overwrite(["docs/new.json", "docs/new.png"], "bench-out", overwrite=False) is None
    Path("bench-out").mkdir()
    Path("bench-out/bench.json").write_text("{}")  # bench's own scratch folder: `make bench` runs again
    assert refuse_overwrite(["bench-out/bench.json"], "bench-out", overwrite=False) is None
    # refused at once, before a minute of measuring
    assert main(["bench", "--json", "docs/bench.json"]) == 2
    assert "docs/bench.json already exists" in capsys.readouterr().err
    assert Path("docs/bench.json").read_text() == "{}"


def bench_commands() -> list[str]:
    """Every `lstmgen bench ...` command in docs/benchmark.md's code blocks, continuation lines joined."""
    text = (ROOT / "docs" / "benchmark.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)
    joined = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return [line.split("#")[0].strip() for line in joined if line.strip().startswith("lstmgen bench")]


def targets(command: str) -> list[str]:
    args = shlex.split(command)
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--json", "--plot")]


def test_the_documented_run_does_not_write_into_docs():
    commands = bench_commands()
    first = commands[0]  # the command under `make bench`: the one a reader copies
    assert targets(first) and not any(t.startswith("docs/") for t in targets(first)), first


def test_no_documented_command_can_replace_a_published_report(monkeypatch):
    monkeypatch.chdir(ROOT)
    for command in bench_commands():
        published = [t for t in targets(command) if t.startswith("docs/") and Path(t).exists()]
        if published and "--overwrite" not in command:
            assert refuse_overwrite(targets(command), "bench-out", overwrite=False), command
