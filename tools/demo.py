"""`make demo`: train a small char model, export it, serve it, stream text through the client.

With no --data it trains on a corpus every machine has: the Python standard library's own
source files (a char-RNN writing Python, as char-rnn did with the Linux source), files joined by
the end-of-text symbol so the model learns where a file ends.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

from lstmgen.train import runlog

EOT = "\x03"
# Below this share of the unigram loss (what knowing only the characters' frequencies gets) a char
# model's text starts to look like its corpus: on the stdlib corpus (unigram 3.14 nats/char) samples
# at 0.75 of it (2.4 nats, ~150 updates of `tiny`) are letter soup, at 0.55 (1.7) pseudo-Python with
# real keywords and names, at 0.5 (1.55, one epoch) plausible code. Without the text to measure, an
# update count stands in.
READABLE_SHARE, READABLE_STEPS = 0.6, 500


def stdlib_corpus(out: Path, max_bytes: int = 2_000_000) -> Path:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts, size = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = "".join(ch for ch in text if ch.isascii())  # a small, stable vocabulary
        parts.append(text.rstrip("\n") + "\n" + EOT)
        size += len(text)
        if size >= max_bytes:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(parts), encoding="utf-8")
    return out


def unigram_loss(path: str) -> float | None:
    """Nats per char of the text's own character frequencies; None unless `path` is a local file."""
    p = Path(path)
    if not p.is_file():
        return None
    text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    counts, n = Counter(text), len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else None


def training_note(val_loss: float, unigram_loss: float | None, steps: int) -> str | None:
    """A plain word when the model trained too briefly for its text to look like anything; None otherwise."""
    if unigram_loss is not None:
        share = val_loss / unigram_loss
        if share <= READABLE_SHARE:
            return None
        why = (f"its validation loss, {val_loss:.2f} nats/char, is still {share:.0%} of the {unigram_loss:.2f} "
               f"that knowing only how often each character occurs gives (below about {READABLE_SHARE:.0%} "
               "the text starts to look like the corpus)")
    else:
        if steps >= READABLE_STEPS:
            return None
        why = f"it made {steps} updates (a char model needs several hundred before words appear)"
    return (f"the model trained too briefly for its text to look like anything: {why}. Expect letter soup; "
            "train longer with `make demo DEMO_SECONDS=300` (or --seconds 300).")


def run_note(run: Path) -> str | None:
    """training_note for a run directory, from its metrics.csv and the text named in config.json."""
    rows = runlog.read_csv(run / runlog.METRICS_CSV)
    if not rows:
        return None
    data = json.loads((run / "config.json").read_text()).get("data", {})
    return training_note(float(rows[-1]["val_loss"]), unigram_loss(data.get("path", "")), int(rows[-1]["step"]))


def lstmgen(*args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lstmgen.cli", *args]
    print("$ lstmgen " + " ".join(shlex.quote(a) for a in args), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="your own corpus (path or URL); default: Python stdlib sources")
    p.add_argument("--seconds", type=float, default=90, help="training time budget")
    p.add_argument("--dir", default=".demo", help="working folder")
    p.add_argument("--prompt", default=None, help="prompt for the generated text")
    p.add_argument("--tokens", type=int, default=400, help="characters to stream")
    args = p.parse_args()

    work = Path(args.dir)
    data = args.data or str(stdlib_corpus(work / "stdlib.txt"))
    prompt = args.prompt or ("import os\n\ndef " if not args.data else "The ")
    t0 = time.monotonic()
    # --max-seconds alone: as many epochs as fit (the tiny preset's one epoch no longer applies)
    lstmgen("train", "--data", data, "--preset", "tiny", "--out", str(work / "run"), "--overwrite",
            "--max-seconds", str(args.seconds))
    print(f"[demo] training took {time.monotonic() - t0:.0f}s (with starting Python and reading the text)",
          flush=True)
    note = run_note(work / "run")
    lstmgen("export", str(work / "run"), "--out", str(work / "bundle"))
    server = subprocess.Popen([sys.executable, "-m", "lstmgen.cli", "serve", str(work / "bundle"),
                               "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"serving on ([\d.]+):(\d+)", line)
        if not m:
            print(f"[demo] server did not start: {line!r}", file=sys.stderr)
            return 1
        target = f"{m.group(1)}:{m.group(2)}"
        print(f"[demo] server up at {target}; streaming {args.tokens} characters\n", flush=True)
        lstmgen("generate", "--server", target, "--prompt", prompt, "--max-new-tokens", str(args.tokens),
                "--temperature", "0.8", "--seed", "1", "--skip-unknown")
    finally:
        server.terminate()
        server.wait(timeout=30)
    if note:
        print(f"\n[demo] note: {note}", flush=True)
    print(f"\n[demo] done: run in {work / 'run'}, bundle in {work / 'bundle'}; "
          f"serve it yourself with `.venv/bin/lstmgen serve {work / 'bundle'}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
