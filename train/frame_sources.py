"""The seeds' own data: `builtin:sin-cos`, `builtin:digits` and `mnist:DIR` (numpy only).

sin-cos is the sine->cosine regression tutorial's: frame n has input sin(t) and target cos(t) with
t = n / (10*pi). The tutorial cuts one wave into batches whose rows continue from batch to batch and
feeds each batch's final state into the next; here each split is one long wave that the trainer
cuts into B contiguous streams and walks `bptt` frames at a time with the state carried, which is
the same thing (continuous-stream mode). Validation and test waves start far beyond the training
frames.

digits is scikit-learn's copy of the UCI 8x8 handwritten digits (1797 images, 0..16 per pixel):
one image row of 8 pixels per step, scaled to [0, 1]. MNIST is read from the standard IDX files
(idx.py): 28 steps of 28 pixels, scaled to [0, 1]. Held-out parts are fixed, not random: every
fifth-or-so image, spread evenly (frames.spread_indices), so every run and every machine holds out
the same images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lstmgen.train.frame_data import FrameDataError, Sequences, make_sequences, spread_indices

BUILTINS = ("sin-cos", "digits")
SIN_COS_STEP = 1 / (10 * np.pi)  # t advances this much per frame (the tutorial's xs / (10*pi))
SIN_COS_FRAMES = {"train": 100_000, "valid": 20_000, "test": 20_000}  # about 500 periods to train on
SIN_COS_START = {"train": 0, "valid": 1_000_000, "test": 2_000_000}  # frame index where each split starts
DIGITS_TEST_FRACTION = 0.2
DIGIT_NAMES = tuple(str(i) for i in range(10))


def sin_cos(start: int, frames: int) -> Sequences:
    """One wave of `frames` frames from frame index `start`: x = sin(t), y = cos(t)."""
    t = (start + np.arange(frames, dtype=np.float64)) * SIN_COS_STEP  # [F]
    x = np.sin(t).astype(np.float32)[None, :, None]  # [1, F, 1]
    y = np.cos(t).astype(np.float32)[None, :, None]
    return Sequences(x, np.array([frames], dtype=np.int64), y)


def _need(task: str, want: str, spec: str) -> None:
    if task != want:
        raise FrameDataError(f"{spec} is {want} data; train it with --task {want}")


def rows_as_frames(images: np.ndarray, labels: np.ndarray, scale: float, where: str) -> Sequences:
    """Images [N, rows, cols] -> sequences of `rows` frames of `cols` pixels, divided by `scale`."""
    x = np.asarray(images, dtype=np.float32) / np.float32(scale)  # [N, T=rows, D=cols]
    return make_sequences(x, labels, "classification", where)


def _split_off(seqs: Sequences, fraction: float) -> tuple[Sequences, Sequences]:
    held = spread_indices(len(seqs), fraction)
    return seqs.take(np.setdiff1d(np.arange(len(seqs)), held)), seqs.take(held)


def digits(valid_fraction: float) -> tuple[dict[str, Sequences], dict]:
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise FrameDataError("builtin:digits needs scikit-learn (pip install scikit-learn), which ships the "
                             "8x8 digits; or give MNIST's IDX files as mnist:DIR") from e
    d = load_digits()
    every = rows_as_frames(d.images, d.target, 16.0, "builtin:digits")
    rest, test = _split_off(every, DIGITS_TEST_FRACTION)
    train, valid = _split_off(rest, valid_fraction)
    desc = {"kind": "builtin", "name": "digits", "package": f"scikit-learn {sklearn.__version__}",
            "layout": "8 steps (image rows) of 8 pixels, pixel / 16",
            "split": f"test: {DIGITS_TEST_FRACTION:g} of the images spread evenly; valid: {valid_fraction:g} "
                     "of the rest, spread evenly", "valid_fraction": valid_fraction}
    return {"train": train, "valid": valid, "test": test}, desc


def mnist(folder: str, valid_fraction: float) -> tuple[dict[str, Sequences], dict]:
    from lstmgen.train.idx import read_mnist_split

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise FrameDataError(f"mnist:{folder}: {p} is not a directory (it should hold "
                             "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] and optionally "
                             "the t10k files)")
    train = read_mnist_split(p, "train")
    if train is None:
        raise FrameDataError(f"mnist:{folder}: no train-images-idx3-ubyte[.gz] / "
                             f"train-labels-idx1-ubyte[.gz] in {p}")
    test = read_mnist_split(p, "test")
    train_seqs, valid = _split_off(rows_as_frames(*train, 255.0, f"{p} [train]"), valid_fraction)
    splits = {"train": train_seqs, "valid": valid}
    if test is not None:
        splits["test"] = rows_as_frames(*test, 255.0, f"{p} [test]")
    rows, cols = train[0].shape[1:]
    desc = {"kind": "mnist", "name": "mnist", "path": str(p.resolve()),
            "layout": f"{rows} steps (image rows) of {cols} pixels, pixel / 255",
            "split": f"valid: {valid_fraction:g} of the training images spread evenly; test: the t10k files"
                     + ("" if test is not None else " (absent)"), "valid_fraction": valid_fraction}
    return splits, desc


def load(spec: str, task: str, valid_fraction: float, stream: bool) -> tuple[dict, dict, tuple, bool]:
    """({split: Sequences}, description, class names, stream) for builtin:NAME or mnist:DIR."""
    kind, _, arg = spec.partition(":")
    if kind == "mnist":
        _need(task, "classification", spec)
        splits, desc = mnist(arg, valid_fraction)
        return splits, desc, DIGIT_NAMES, False
    if arg == "sin-cos":
        _need(task, "regression", spec)
        splits = {k: sin_cos(SIN_COS_START[k], n) for k, n in SIN_COS_FRAMES.items()}
        desc = {"kind": "builtin", "name": "sin-cos", "generator": "x = sin(t), y = cos(t), t = n / (10*pi) "
                "at frame n", "start_frame": dict(SIN_COS_START)}
        return splits, desc, (), True  # a continuous wave: always streamed
    if arg == "digits":
        _need(task, "classification", spec)
        splits, desc = digits(valid_fraction)
        return splits, desc, DIGIT_NAMES, False
    raise FrameDataError(f"{spec}: unknown built-in data; choose one of "
                         + ", ".join(f"builtin:{b}" for b in BUILTINS) + " (or mnist:DIR)")
