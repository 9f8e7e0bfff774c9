"""The run directory's logs: metrics.csv (one row per validation), steps.csv (one row per logged
training window: every `log_interval` updates, at each save and at each epoch end) and curves.png
(train and validation loss against updates, redrawn after every validation).

Torch-free. After a resume the rows past the restored step are dropped, so the logs of a run that
was killed and resumed read like those of a run that never stopped (only the timings differ).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from lstmgen.text import figure_text

METRICS_CSV, STEPS_CSV, CURVES_PNG = "metrics.csv", "steps.csv", "curves.png"


def _fmt(v, digits: int) -> str | object:
    return f"{v:.{digits}g}" if isinstance(v, float) else v


def append_csv(path: Path, row: dict, digits: int = 6) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: _fmt(v, digits) for k, v in row.items()})


def write_csv(path: Path, rows: list[dict], digits: int = 6) -> None:
    """Replace the file with `rows` (atomically); no rows: no file."""
    if not rows:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: _fmt(v, digits) for k, v in r.items()} for r in rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def truncate_after(path: Path, step: int) -> None:
    """Drop the rows logged after `step` (a killed session's work that the resumed one redoes)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        names, rows = reader.fieldnames, [r for r in reader if int(r["step"]) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names or ["step"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _floats(rows: list[dict[str, str]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(float(r[x]), float(r[y])) for r in rows if r.get(y) not in (None, "", "nan")]
    pts = [(a, b) for a, b in pts if math.isfinite(b)]
    return [a for a, _ in pts], [b for _, b in pts]


def _best_note(level: str, metrics: list[dict[str, str]], best: float) -> str:
    if level == "regression":
        return f"best val MSE {best:.4g}"
    if level == "classification":
        _, acc = _floats(metrics, "step", "val_accuracy")
        return f"best val loss {best:.4f}" + (f" (accuracy up to {max(acc):.2%})" if acc else "")
    return f"best val {best:.4f} ({figure_text(level, best)})"


def plot_curves(run_dir: Path, level: str, title: str = "") -> Path | None:
    """curves.png from steps.csv and metrics.csv; None when matplotlib is not installed.
    `level`: char or word for text; regression or classification for frame models."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg for PNG
    except ImportError:
        return None
    steps, metrics = read_csv(run_dir / STEPS_CSV), read_csv(run_dir / METRICS_CSV)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    xs, ys = _floats(steps, "step", "loss")
    ax.plot(xs, ys, lw=0.8, alpha=0.8, label="train (logged window)")
    xs, ys = _floats(metrics, "step", "val_loss")
    ax.plot(xs, ys, "o-", lw=1.5, label="validation")
    ax.set_xlabel("update")
    ax.set_ylabel({"regression": "mean squared error", "classification": "loss (cross-entropy)"}
                  .get(level, "loss (nats/token)"))
    if metrics and ys:
        title = f"{title}  {_best_note(level, metrics, min(ys))}".strip()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / CURVES_PNG
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)  # a reader never sees half an image
    return path
