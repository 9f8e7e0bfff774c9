"""The IDX format of LeCun's MNIST files, read with numpy alone (torch-free).

An IDX file is: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32
sizes and the values, big-endian, row-major. MNIST ships four of them, usually gzipped:
train-images-idx3-ubyte (60000 x 28 x 28 uint8), train-labels-idx1-ubyte (60000 uint8),
t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (10000 each). Every check here names the file,
because the usual failures are a truncated download, a gzip that was not unpacked (or was unpacked
twice) and the images and labels of different splits side by side.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from lstmgen.errors import UserError

# type code -> big-endian dtype (the IDX spec's list)
DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CODES = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIMS = 8  # MNIST uses 1 and 3; anything far beyond is a file that is not IDX


class IdxError(UserError):
    """An IDX file that cannot be used; the message names the file and the problem."""


def _raw(path: Path) -> bytes:
    if not path.is_file():
        raise IdxError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    try:
        data = path.read_bytes()
        if data[:2] == _GZIP_MAGIC:  # by content, not by name: a .gz already unpacked still reads
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise IdxError(f"{path}: cannot be read: {e}") from e
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array an IDX file holds (gzipped or not), in native byte order."""
    p = Path(path)
    data = _raw(p)
    if len(data) < 4:
        raise IdxError(f"{p}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IdxError(f"{p}: not an IDX file (magic number {data[:4].hex()} does not start with 0000)")
    if code not in DTYPES:
        raise IdxError(f"{p}: unknown IDX type code 0x{code:02x} (known: "
                       + ", ".join(f"0x{c:02x}" for c in DTYPES) + ")")
    if not 1 <= ndim <= _MAX_DIMS:
        raise IdxError(f"{p}: IDX header gives {ndim} dimensions (want 1 to {_MAX_DIMS})")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise IdxError(f"{p}: truncated IDX header (needs {head} bytes for {ndim} dimensions, has {len(data)})")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    dtype = np.dtype(DTYPES[code])
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(data) - head
    if have != want:
        raise IdxError(f"{p}: dimensions {list(dims)} of {dtype.itemsize}-byte values need {want} bytes "
                       f"of data, the file has {have} ({'truncated' if have < want else 'trailing bytes'})")
    return np.frombuffer(data, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool = False) -> Path:
    """Write `array` as IDX (gzipped when `compress`): for tests and for users making small files."""
    a = np.asarray(array)
    code = CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise IdxError(f"{path}: IDX cannot hold {a.dtype} values (types: uint8, int8, int16, int32, "
                       "float32, float64)")
    payload = struct.pack(f">HBB{a.ndim}I", 0, code, a.ndim, *a.shape) + a.astype(DTYPES[code]).tobytes()
    p = Path(path)
    p.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return p


# -- MNIST ----------------------------------------------------------------------------------------
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(folder: Path, stem: str) -> Path | None:
    # the names as LeCun's site has them, and the dotted variant some mirrors use (train-images.idx3-ubyte)
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_mnist_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images [N, rows, cols] uint8, labels [N] int64) of MNIST's `train` or `test` split in
    `folder`; None when neither of the split's files is there."""
    folder = Path(folder)
    img_stem, lab_stem = MNIST_FILES[split]
    img_path, lab_path = _find(folder, img_stem), _find(folder, lab_stem)
    if img_path is None and lab_path is None:
        return None
    if img_path is None or lab_path is None:
        missing = img_stem if img_path is None else lab_stem
        raise IdxError(f"{folder}: has {(lab_path or img_path).name} but not {missing}[.gz]")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxError(f"{img_path}: MNIST images are a 3-dimensional uint8 IDX file "
                       f"(got {images.ndim} dimensions of {images.dtype})")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IdxError(f"{lab_path}: MNIST labels are a 1-dimensional uint8 IDX file "
                       f"(got {labels.ndim} dimensions of {labels.dtype})")
    if len(images) != len(labels):
        raise IdxError(f"{img_path}: {len(images)} images but {lab_path.name} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise IdxError(f"{lab_path}: label {int(labels.max())} is not a digit (0-9)")
    return images, labels.astype(np.int64)
