"""Float-frame datasets for sequence regression and classification (numpy only, torch-free).

A dataset is N sequences of frames, each [T_i, D_in], with either per-frame targets [T_i, D_out]
(regression) or one integer label per sequence (classification). They are held padded to the
longest sequence with their lengths beside them, so padding can never reach a loss: the model packs
or masks by `lengths`.

Sources (`--data`):
  builtin:sin-cos   the sine->cosine tutorial's wave, trained as one continuous stream (builtins.py)
  builtin:digits    scikit-learn's 8x8 digits, one row of 8 pixels per step (needs scikit-learn)
  mnist:DIR         MNIST from the IDX files in DIR, one row of 28 pixels per step (idx.py)
  FILE.npz          arrays x and y (or inputs/targets/labels), optionally lengths, x_valid/y_valid,
                    x_test/y_test and class_names
  FILE.npy          the inputs; the targets or labels in the file given by --targets
Inputs are [N, T, D_in] or a list (object array) of [T, D_in] arrays; regression targets
[N, T, D_out] or a list of [T, D_out]; labels [N] integers. With a `lengths` array [N], frames past
a sequence's length are padding and are never read.

Standardisation (inputs only): "sequence" as the audio->articulation seed does (each sequence minus
its own per-feature mean, divided by its own per-feature std), "global" (the training frames' mean
and std, the same for every sequence), or "none". `Standardizer.describe()` is what a checkpoint
(and later a bundle manifest) records so that serving can repeat it exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lstmgen.errors import UserError

TASKS = ("regression", "classification")
STANDARDIZE = ("none", "global", "sequence")
STD_FLOOR = 1e-6  # a constant feature divides by this instead of 0 (saved beside the statistics)
_INPUT_KEYS, _TARGET_KEYS = ("x", "inputs"), ("y", "targets", "labels")


class FrameDataError(UserError):
    """Frame data that cannot be used; the message names the file (or source) and the problem."""


@dataclass(frozen=True, eq=False)
class Sequences:
    """N sequences padded to the longest, T = max(lengths)."""

    x: np.ndarray  # [N, T, D_in] float32, zero past each length
    lengths: np.ndarray  # [N] int64, each >= 1
    y: np.ndarray  # regression [N, T, D_out] float32; classification [N] int64

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, idx: np.ndarray) -> "Sequences":
        idx = np.asarray(idx, dtype=np.int64)
        t = int(self.lengths[idx].max()) if len(idx) else 1
        y = self.y[idx, :t] if self.y.ndim == 3 else self.y[idx]
        return Sequences(self.x[idx, :t], self.lengths[idx], y)

    def frames(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True, eq=False)
class FrameData:
    task: str  # "regression" | "classification"
    train: Sequences
    valid: Sequences
    test: Sequences | None
    input_size: int  # D_in
    output_size: int  # D_out (regression) or the number of classes
    class_names: tuple[str, ...] = ()  # classification: index -> name
    stream: bool = False  # one continuous stream (state carried across batches), as builtin:sin-cos
    source: dict = field(default_factory=dict)  # the data's description, kept in the checkpoint


# -- checks ---------------------------------------------------------------------------------------
def _as_list(a: np.ndarray, what: str, where: str, width: str) -> list[np.ndarray]:
    """A padded [N, T, D] array or an object array of [T, D] arrays -> a list of [T, D] arrays."""
    if a.dtype == object:
        items = list(a.reshape(-1)) if a.ndim == 1 else None
        if items is None:
            raise FrameDataError(f"{where}: {what} as an object array must be a flat list of arrays "
                                 f"(got shape {list(a.shape)})")
        out = []
        for i, s in enumerate(items):
            s = np.asarray(s)
            if s.ndim != 2:
                raise FrameDataError(f"{where}: {what} sequence {i} has rank {s.ndim}, want rank 2 "
                                     f"[T, {width}] (a series of scalars needs a feature axis: a[:, None])")
            out.append(_numeric(s, what, where))
        return out
    if a.ndim != 3:
        raise FrameDataError(f"{where}: {what} must have rank 3 [N, T, {width}] or be a list of rank-2 "
                             f"[T, {width}] arrays (got rank {a.ndim}, shape {list(a.shape)})")
    return list(_numeric(a, what, where))


def _numeric(a: np.ndarray, what: str, where: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise FrameDataError(f"{where}: {what} must be numbers (got {a.dtype})")
    return a


def _check_finite(seqs: list[np.ndarray], what: str, where: str) -> None:
    for i, s in enumerate(seqs):
        bad = ~np.isfinite(s)
        if bad.any():
            t, d = np.argwhere(bad)[0]
            raise FrameDataError(f"{where}: {what} hold a non-finite value ({s[t, d]} in sequence {i}, "
                                 f"frame {t}, feature {d})")


def _check_width(seqs: list[np.ndarray], what: str, where: str) -> int:
    widths = {s.shape[1] for s in seqs}
    if len(widths) > 1:
        first = seqs[0].shape[1]
        i = next(i for i, s in enumerate(seqs) if s.shape[1] != first)
        raise FrameDataError(f"{where}: {what} widths differ (sequence 0 has {first} features, "
                             f"sequence {i} has {seqs[i].shape[1]})")
    width = widths.pop()
    if width < 1:
        raise FrameDataError(f"{where}: {what} have no features (width 0)")
    return width


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise FrameDataError(f"{where}: classification labels must be one integer per sequence, "
                             f"shape [N] (got shape {list(y.shape)})")
    if y.dtype.kind == "f":  # 3.0 is a label, 3.5 is not
        frac = ~np.isfinite(y) | (y != np.round(y))
        if frac.any():
            i = int(np.argmax(frac))
            raise FrameDataError(f"{where}: labels must be integers (label {i} is {y[i]})")
    elif y.dtype.kind not in "biu":
        raise FrameDataError(f"{where}: labels must be integers (got {y.dtype})")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise FrameDataError(f"{where}: labels must be >= 0 (label {int(np.argmin(y))} is {int(y.min())})")
    return y


def make_sequences(x: np.ndarray, y: np.ndarray, task: str, where: str,
                   lengths: np.ndarray | None = None) -> Sequences:
    """Check inputs and targets (or labels) and pad them into Sequences; errors name `where`."""
    xs = _as_list(np.asarray(x), "inputs", where, "D_in")
    if not xs:
        raise FrameDataError(f"{where}: holds no sequences")
    if lengths is not None:
        xs = _cut(xs, np.asarray(lengths), where)
    if any(len(s) == 0 for s in xs):
        raise FrameDataError(f"{where}: sequence {next(i for i, s in enumerate(xs) if len(s) == 0)} has no frames")
    d_in = _check_width(xs, "input", where)
    _check_finite(xs, "inputs", where)
    lens = np.array([len(s) for s in xs], dtype=np.int64)
    if task == "classification":
        labels = _labels(np.asarray(y), where)
        if len(labels) != len(xs):
            raise FrameDataError(f"{where}: {len(xs)} input sequences but {len(labels)} labels")
        return Sequences(_pad(xs, d_in), lens, labels)
    ys = _as_list(np.asarray(y), "targets", where, "D_out")
    if len(ys) != len(xs):
        raise FrameDataError(f"{where}: {len(xs)} input sequences but {len(ys)} target sequences")
    if lengths is not None:
        ys = _cut(ys, np.asarray(lengths), where)
    for i, (a, b) in enumerate(zip(xs, ys)):
        if len(a) != len(b):
            raise FrameDataError(f"{where}: sequence {i} has {len(a)} input frames but {len(b)} target frames")
    d_out = _check_width(ys, "target", where)
    _check_finite(ys, "targets", where)
    return Sequences(_pad(xs, d_in), lens, _pad(ys, d_out))


def _cut(seqs: list[np.ndarray], lengths: np.ndarray, where: str) -> list[np.ndarray]:
    if lengths.ndim != 1 or len(lengths) != len(seqs) or lengths.dtype.kind not in "iu":
        raise FrameDataError(f"{where}: lengths must be {len(seqs)} integers, one per sequence "
                             f"(got {lengths.dtype} of shape {list(lengths.shape)})")
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        if not 0 < n <= len(s):
            raise FrameDataError(f"{where}: lengths[{i}] is {int(n)}, but sequence {i} has {len(s)} frames")
    return [s[:n] for s, n in zip(seqs, lengths)]


def _pad(seqs: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(seqs), max(len(s) for s in seqs), width), dtype=np.float32)  # [N, T, D]
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


# -- splits ---------------------------------------------------------------------------------------
def spread_indices(n: int, fraction: float) -> np.ndarray:
    """round(n * fraction) indices (at least 1) spread evenly over range(n): a held-out part that
    does not depend on a random generator and is not one end of a file sorted by class."""
    k = min(max(1, round(n * fraction)), n - 1)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def hold_out(seqs: Sequences, fraction: float, where: str) -> tuple[Sequences, Sequences]:
    if len(seqs) < 2:
        raise FrameDataError(f"{where}: {len(seqs)} sequence(s) are too few to hold some out for validation; "
                             "give x_valid/y_valid or more sequences")
    held = spread_indices(len(seqs), fraction)
    keep = np.setdiff1d(np.arange(len(seqs)), held)
    return seqs.take(keep), seqs.take(held)


# -- standardisation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Standardizer:
    mode: str = "none"  # none | global | sequence
    mean: tuple[float, ...] = ()  # global: per-feature mean of the training frames
    std: tuple[float, ...] = ()  # global: per-feature std, already floored at STD_FLOOR

    @classmethod
    def fit(cls, mode: str, train: Sequences) -> "Standardizer":
        if mode not in STANDARDIZE:
            raise FrameDataError(f"standardize must be one of {', '.join(STANDARDIZE)} (got {mode!r})")
        if mode != "global":
            return cls(mode)
        valid = _valid_frames(train)  # [F, D]
        mean, std = valid.mean(0, dtype=np.float64), valid.std(0, dtype=np.float64)
        return cls(mode, tuple(mean.tolist()), tuple(np.maximum(std, STD_FLOOR).tolist()))

    def apply(self, seqs: Sequences) -> Sequences:
        if self.mode == "none":
            return seqs
        x = seqs.x.astype(np.float64)  # [N, T, D]
        mask = np.arange(x.shape[1])[None, :] < seqs.lengths[:, None]  # [N, T]
        if self.mode == "global":
            mean, std = np.array(self.mean)[None, None], np.array(self.std)[None, None]  # [1, 1, D]
        else:  # each sequence by its own valid frames
            n = seqs.lengths[:, None, None].astype(np.float64)  # [N, 1, 1]
            xm = np.where(mask[..., None], x, 0.0)
            mean = xm.sum(1, keepdims=True) / n  # [N, 1, D]
            var = (np.where(mask[..., None], x - mean, 0.0) ** 2).sum(1, keepdims=True) / n
            std = np.maximum(np.sqrt(var), STD_FLOOR)
        out = np.where(mask[..., None], (x - mean) / std, 0.0).astype(np.float32)
        return replace(seqs, x=out)

    def describe(self) -> dict:
        """What a checkpoint and a bundle manifest record: enough to repeat it frame for frame."""
        d = {"mode": self.mode, "applies_to": "inputs", "std_floor": STD_FLOOR, "ddof": 0}
        if self.mode == "global":
            d.update(mean=list(self.mean), std=list(self.std))
        return d


def _valid_frames(seqs: Sequences) -> np.ndarray:
    mask = np.arange(seqs.x.shape[1])[None, :] < seqs.lengths[:, None]  # [N, T]
    return seqs.x[mask].astype(np.float64)  # [F, D]


# -- streams --------------------------------------------------------------------------------------
def to_streams(seqs: Sequences, batch_size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Continuous-stream mode: the sequences end to end as one stream, cut into `batch_size`
    contiguous streams (pytorch/examples batchify): x [N, B, D_in], y [N, B, D_out], time first,
    so row b of one batch continues row b of the previous one."""
    mask = np.arange(seqs.x.shape[1])[None, :] < seqs.lengths[:, None]  # [N, T]
    x, y = seqs.x[mask], seqs.y[mask]  # [F, D_in], [F, D_out]
    n = len(x) // batch_size
    if n < 2:
        raise FrameDataError(f"{where}: {len(x)} frames are too few for {batch_size} streams "
                             f"(need at least {2 * batch_size}); use a smaller batch size")
    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[: n * batch_size].reshape(batch_size, n, -1).transpose(1, 0, 2))
    return cut(x), cut(y)  # [N, B, D]


# -- loading --------------------------------------------------------------------------------------
def _pick(arrays: dict[str, np.ndarray], names: tuple[str, ...], where: str, what: str,
          suffix: str = "") -> np.ndarray | None:
    found = [n + suffix for n in names if n + suffix in arrays]
    if len(found) > 1:
        raise FrameDataError(f"{where}: holds both {found[0]!r} and {found[1]!r}; keep one array of {what}")
    return arrays[found[0]] if found else None


def _from_arrays(arrays: dict[str, np.ndarray], task: str, where: str) -> dict[str, Sequences]:
    """{split: Sequences} from a .npz's arrays: x/y, and x_valid/y_valid, x_test/y_test when given."""
    splits = {}
    for split, suffix in (("train", ""), ("valid", "_valid"), ("test", "_test")):
        x = _pick(arrays, _INPUT_KEYS, where, "inputs", suffix)
        y = _pick(arrays, _TARGET_KEYS, where, "targets or labels", suffix)
        if x is None and y is None and split != "train":
            continue
        if x is None or y is None:
            missing = ("x" if x is None else "y") + suffix
            raise FrameDataError(f"{where}: no array {missing!r} "
                                 f"(the archive holds: {', '.join(sorted(arrays))})")
        lengths = arrays.get("lengths" + suffix)
        splits[split] = make_sequences(x, y, task, f"{where} [{'x' + suffix}]", lengths)
    return splits


def _class_names(arrays: dict, splits: dict[str, Sequences], where: str) -> tuple[str, ...]:
    top = max(int(s.y.max()) for s in splits.values()) + 1
    names = arrays.get("class_names")
    if names is None:
        return tuple(str(i) for i in range(top))
    names = tuple(str(n) for n in np.asarray(names).reshape(-1))
    if len(names) < top:
        raise FrameDataError(f"{where}: label {top - 1} has no name ({len(names)} class_names)")
    if len(set(names)) != len(names):
        raise FrameDataError(f"{where}: class_names repeat a name")
    return names


def load_file(path: str | os.PathLike, task: str,
              targets: str | os.PathLike | None = None) -> tuple[dict, dict, tuple]:
    """({split: Sequences}, description, class names) from FILE.npz, or FILE.npy plus `targets`."""
    from lstmgen.bundle import sha256_file
    from lstmgen.train.npyio import read_npy, read_npz

    p = Path(path)
    files = [p]
    if p.suffix == ".npz":
        if targets is not None:
            raise FrameDataError(f"{p}: --targets is for .npy inputs; a .npz holds its targets as 'y'")
        arrays = read_npz(p)
    elif p.suffix == ".npy":
        if targets is None:
            raise FrameDataError(f"{p}: .npy inputs need their targets (or labels) in a second file: "
                                 "--targets FILE.npy")
        files.append(Path(targets))
        arrays = {"x": read_npy(p), "y": read_npy(targets)}
    else:
        raise FrameDataError(f"{p}: frame data is a .npz or .npy file, builtin:sin-cos, builtin:digits "
                             "or mnist:DIR")
    splits = _from_arrays(arrays, task, str(p))
    names = _class_names(arrays, splits, str(p)) if task == "classification" else ()
    desc = {"kind": p.suffix[1:],
            "files": [{"path": str(f.resolve()), "sha256": sha256_file(f)} for f in files]}
    return splits, desc, names


def load_frames(spec: str, task: str, *, targets: str | None = None, valid_fraction: float = 0.1,
                standardize: str = "none", stream: bool = False) -> FrameData:
    """Read, check, split and standardise the frame data that `spec` names (see the module doc)."""
    from lstmgen.train import frame_sources

    if task not in TASKS:
        raise FrameDataError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    if spec.startswith("builtin:") or spec.startswith("mnist:"):
        if targets is not None:
            raise FrameDataError(f"{spec}: --targets is only for .npy inputs")
        splits, desc, names, stream = frame_sources.load(spec, task, valid_fraction, stream)
    else:
        splits, desc, names = load_file(spec, task, targets)
    where = spec
    _check_dims(splits, task, where)
    if "valid" not in splits:
        splits["train"], splits["valid"] = hold_out(splits["train"], valid_fraction, where)
        desc["valid_fraction"] = valid_fraction
    if stream and task != "regression":
        raise FrameDataError(f"{where}: continuous-stream mode is for regression "
                             "(a label belongs to one sequence)")
    std = Standardizer.fit(standardize, splits["train"])
    splits = {k: std.apply(v) for k, v in splits.items()}
    first = splits["train"]
    out = len(names) if task == "classification" else first.y.shape[2]
    desc.update(spec=spec, task=task, input_size=first.x.shape[2], output_size=out, stream=stream,
                standardize=std.describe(), class_names=list(names),
                sequences={k: len(v) for k, v in splits.items()},
                frames={k: v.frames() for k, v in splits.items()})
    return FrameData(task, splits["train"], splits["valid"], splits.get("test"), first.x.shape[2], out,
                     names, stream, desc)


def _check_dims(splits: dict[str, Sequences], task: str, where: str) -> None:
    train = splits["train"]
    for name, s in splits.items():
        for what, a, b in (("inputs", s.x, train.x), ("targets", s.y, train.y)):
            if (what == "inputs" or task == "regression") and a.shape[2] != b.shape[2]:
                raise FrameDataError(f"{where}: {name} {what} have {a.shape[2]} features, train has {b.shape[2]}")
