"""`make demo`: train a small char model, export it, serve it, stream text through the client.

With no --data it trains on a corpus every machine has: the Python standard library's own
source files (a char-RNN writing Python, as char-rnn did with the Linux source), files joined by
the end-of-text symbol so the model learns where a file ends.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

EOT = "\x03"


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
    lstmgen("train", "--data", data, "--preset", "tiny", "--out", str(work / "run"), "--epochs", "100",
            "--max-seconds", str(args.seconds))
    print(f"[demo] training took {time.monotonic() - t0:.0f}s", flush=True)
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
    print(f"\n[demo] done: run in {work / 'run'}, bundle in {work / 'bundle'}; "
          f"serve it yourself with `.venv/bin/lstmgen serve {work / 'bundle'}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
