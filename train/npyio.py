"""Reading .npy and .npz files without running code from them (torch-free).

A list of variable-length arrays saved with np.save / np.savez becomes an object array, which numpy
stores as a pickle; `np.load(allow_pickle=True)` would run whatever a crafted file holds, the hole
that `torch.load(weights_only=True)` closes for checkpoints. Here such a pickle is read by an
unpickler that can build numpy arrays and dtypes and nothing else, so a ragged dataset loads and
a file that wants anything more is refused, naming the file.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from lstmgen.errors import UserError

# What numpy's own pickles of (object) arrays need: numpy 2 writes numpy._core, numpy 1 numpy.core.
_ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
            ("numpy", "ndarray"), ("numpy", "dtype")}


class ArrayFileError(UserError):
    """A .npy/.npz file that cannot be read; the message names the file and the problem."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it pickles {module}.{name}, not only numpy arrays")
        return super().find_class(module, name)


def _read_npy(f: io.BufferedIOBase, where: str) -> np.ndarray:
    try:
        version = np.lib.format.read_magic(f)
        header = {(1, 0): np.lib.format.read_array_header_1_0,
                  (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if header is None:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
        shape, _, dtype = header(f)
        if not dtype.hasobject:
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
        a = _ArraysOnly(f).load()
    except (ValueError, EOFError, OSError, pickle.UnpicklingError, TypeError, AttributeError) as e:
        raise ArrayFileError(f"{where}: cannot be read as a numpy array: {e}") from e
    if not isinstance(a, np.ndarray) or a.shape != shape:
        raise ArrayFileError(f"{where}: its object array does not match its own header")
    return a


def read_npy(path: str | os.PathLike) -> np.ndarray:
    p = _existing(path)
    with open(p, "rb") as f:
        return _read_npy(f, str(p))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a .npz archive by name (np.savez's keyword names)."""
    p = _existing(path)
    if not zipfile.is_zipfile(p):
        raise ArrayFileError(f"{p}: not a .npz archive (np.savez writes a zip file)")
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(p) as z:
            for name in z.namelist():
                if name.endswith(".npy"):
                    out[name[:-4]] = _read_npy(io.BytesIO(z.read(name)), f"{p} [{name[:-4]}]")
    except (zipfile.BadZipFile, OSError) as e:
        raise ArrayFileError(f"{p}: damaged .npz archive: {e}") from e
    if not out:
        raise ArrayFileError(f"{p}: the archive holds no arrays")
    return out


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ArrayFileError(f"{p}: file not found" if not p.exists() else f"{p}: not a regular file")
    return p
