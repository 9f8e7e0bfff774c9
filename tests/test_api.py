"""The in-process API (lstmgen/api.py): the README's example runs as written, and Generator agrees
with the server's scheduler."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import CHAR_TEXT, ROOT

import lstmgen
from lstmgen.datasets import CORPORA


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- tests/test_api.py runs this block -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its tested API example"
    return m.group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path):
    """Offline: the corpus cache already holds a small 'tinyshakespeare', so nothing is downloaded."""
    cache = tmp_path / "cache" / "tinyshakespeare"
    cache.mkdir(parents=True)
    (cache / "input.txt").write_text(("ROMEO:\nJULIET:\n" + CHAR_TEXT) * 20)
    # stands in for the real corpus: marked as checked, as a verified download is (lstmgen/datasets.py)
    (cache / "input.txt.sha256").write_text(CORPORA["tinyshakespeare"].files[0].sha256)
    env = {**os.environ, "LSTMGEN_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # as a user runs it: twice in the same folder
        out = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    ends = re.findall(r"\[(?:length|end_of_text|stop_sequence), seed (\d+)\]", out.stdout)
    assert ends == ["1", "2"] and re.search("^ROMEO:", out.stdout, re.M) and (tmp_path / "bundles/ts/manifest.json").is_file(), out.stdout


def test_generator_matches_scheduler_semantics(bundles):
    with lstmgen.Generator(bundles["char"], device="cpu", threads=1) as g:
        assert g.info.level == "char"
        a, b = g.generate(["First", "All"], max_new_tokens=25, temperature=0.9, seed=5)
        assert isinstance(a, lstmgen.Completion) and a.seed == 5 and b.seed == 6
        assert a.generated_tokens == 25 and a.finish_reason == "length" and len(a.text) == 25
        again = g.generate("First", max_new_tokens=25, temperature=0.9, seed=5)
        assert again.text == a.text  # one prompt alone or in company: the same text
        lp = g.generate("First", max_new_tokens=5, logprobs=True, top_logprobs=2, greedy=True)
        assert len(lp.logprobs) == 5 and all(len(t.top) == 2 for t in lp.logprobs)
        from lstmgen.serve.errors import InvalidRequest
        with pytest.raises(InvalidRequest, match="top_p"):
            g.generate("First", top_p=2.0)


def test_import_lstmgen_stays_light():
    code = ("import sys, lstmgen; lstmgen.Generator; import lstmgen.train, lstmgen.export; "
            "assert callable(lstmgen.train) and callable(lstmgen.export); "
            "assert 'torch' not in sys.modules, 'lstmgen.Generator imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

