"""python -m lstmgen.train.throughput: both loops run on the same model and report tokens/s."""
from __future__ import annotations

import json

import torch

from lstmgen.train.throughput import main


def test_throughput_reports_both_and_the_ratio(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text("".join(f"the cat {i % 5} sat on mat {i % 3} .\n" for i in range(200)))
    n = torch.get_num_threads()
    try:
        rc = main(["--preset", "tiny", "--data", str(data), "--steps", "5", "--threads", "1",
                   "--json", str(tmp_path / "t.json")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    out = capsys.readouterr().out
    assert "lstmgen train:" in out and "plain PyTorch loop:" in out and "ratio" in out
    r = json.loads((tmp_path / "t.json").read_text())
    assert r["trainer_tok_s"] > 0 and r["plain_tok_s"] > 0 and r["steps"] == 5
    assert r["ratio"] == r["trainer_tok_s"] / r["plain_tok_s"]
