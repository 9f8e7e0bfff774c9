"""The README, docs/ and Makefile hold commands that run on any machine, and agree with the code."""
from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_hold_no_path_or_wording_from_the_authors_machine():
    # paths that exist only where lstmgen was written, and the words of how the work was organised
    local = re.compile(r"/work/|\.\./shared|shared/data|not been lent|no GPU lent|working session|\bissue \d")
    found = [f"{p.name}:{i}: {line.strip()}" for p in DOCS
             for i, line in enumerate(p.read_text().splitlines(), 1) if local.search(line)]
    assert not found, "\n".join(found)


def test_the_reports_in_docs_hold_no_absolute_path():
    # a benchmark's JSON records its work dir as given: one run from a scratch folder put the
    # measuring machine's path in three committed reports
    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    absolute = re.compile(r"^(/|[A-Za-z]:\\)(tmp|work|home|root|Users|var|mnt|srv)\b")
    reports = sorted((ROOT / "docs").glob("*.json"))
    assert reports
    found = [f"{p.name}: {s}" for p in reports for s in strings(json.loads(p.read_text())) if absolute.match(s)]
    assert not found, "\n".join(found)


def test_the_torch_pin_agrees_everywhere():
    train = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    pin = next(re.fullmatch(r"torch==([\d.]+)", d).group(1) for d in train if d.startswith("torch"))
    readme = (ROOT / "README.md").read_text()
    assert f"pip install torch=={pin} --index-url https://download.pytorch.org/whl/cpu" in readme
    assert set(re.findall(r"torch==([\d.]+)", readme)) == {pin}
    assert set(re.findall(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())) == {pin}


def test_make_targets_have_recipes():
    def dry(target: str) -> str:
        r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert re.search(r"pytest .*-m \"not slow\"", dry("test-fast"))
    assert "lstmgen bench --seconds" in dry("bench")


def test_client_distribution_declares_its_command():
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())
    assert client["project"]["scripts"] == {"lstmgen-client": "lstmgen_client.cli:main"}
