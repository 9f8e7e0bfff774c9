"""What a long command (`train`, `eval`) shows while it runs, so its output reads well anywhere.

Progress goes to stderr: a bar redrawn in place on a terminal; anywhere else (a log file, a pipe,
CI, a service's journal) one plain line every `interval` seconds with rate, loss and ETA, so a
log of a day-long run stays small and holds no `\\r` frames. Events (the config, each validation)
and the result go to stdout. `quiet`: the result and warnings only. `fmt="json"`: every line is
one JSON object on stdout (time, level, message, and the figures of a progress line).

Torch-free; tqdm draws the bar.
"""
from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime, timezone
from typing import TextIO

FORMATS = ("text", "json")
LINE_INTERVAL_S = 10.0  # between plain progress lines when stderr is not a terminal


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Console:
    def __init__(self, fmt: str = "text", *, quiet: bool = False, progress: bool = True,
                 interval: float | None = None, out: TextIO | None = None, err: TextIO | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fmt, self.quiet = fmt, quiet
        self.out, self.err = out or sys.stdout, err or sys.stderr
        shown = progress and not quiet
        # a bar only for people at a terminal; JSON readers are programs
        self.bar = shown and fmt == "text" and hasattr(self.err, "isatty") and self.err.isatty()
        self.lines = shown and not self.bar
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self._last = -math.inf  # the first progress report is shown at once

    def _emit(self, stream: TextIO, level: str, message: str, fields: dict) -> None:
        if self.fmt == "json":
            record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                      "level": level, "message": message, **fields}
            line = json.dumps(record, ensure_ascii=False, default=str)
            stream = self.out
        else:
            line = message
        if self.bar:
            from tqdm import tqdm
            tqdm.write(line, file=stream)  # clears and redraws the bar around the line
        else:
            stream.write(line + "\n")
        stream.flush()

    def event(self, message: str, **fields) -> None:
        """Something worth a line in a log (not shown with quiet)."""
        if not self.quiet:
            self._emit(self.out, "info", message, fields)

    def warning(self, message: str, **fields) -> None:
        self._emit(self.err, "warning", message, fields)

    def result(self, message: str, **fields) -> None:
        """What the command produced: always shown."""
        self._emit(self.out, "info", message, fields)

    def progress(self, message: str, **fields) -> None:
        """A progress report; shown as a line (not on a terminal) at most once per interval."""
        now = time.monotonic()
        if not self.lines or now - self._last < self.interval:
            return
        self._last = now
        self._emit(self.err, "info", message, {"event": "progress", **fields})

    def progress_bar(self, **tqdm_kwargs):
        """A tqdm bar on stderr, disabled unless stderr is a terminal."""
        from tqdm import tqdm
        return tqdm(disable=not self.bar, file=self.err, dynamic_ncols=True, leave=False, **tqdm_kwargs)


def add_arguments(parser, *, quiet_help: str = "only the result and warnings: no progress, no log lines") -> None:
    """--quiet, --log-format and --progress-interval, the same for every command that takes them."""
    parser.add_argument("--quiet", "-q", action="store_true", help=quiet_help)
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="json: every line on stdout is one JSON object (time, level, message, figures)")
    parser.add_argument("--progress-interval", type=float, default=LINE_INTERVAL_S, metavar="SECONDS",
                        help="seconds between progress lines when stderr is not a terminal "
                             "(on a terminal a bar is redrawn instead)")


def from_args(args, progress: bool = True) -> Console:
    return Console(args.log_format, quiet=args.quiet, progress=progress and not getattr(args, "no_progress", False),
                   interval=args.progress_interval)
