"""Frame data (train/frame_data.py, npyio.py, idx.py, frame_sources.py): readers on good and bad files,
standardisation, the IDX reader on files written here, the built-in sources and stream cutting."""
from __future__ import annotations

import gzip
import pickle
import sys
import types

import numpy as np
import pytest

from lstmgen.train.frame_data import FrameDataError, Standardizer, load_frames, make_sequences, to_streams
from lstmgen.train.idx import IdxError, read_idx, read_mnist_split, write_idx
from lstmgen.train.npyio import ArrayFileError, read_npz
from lstmgen.errors import UserError


def ragged(n: int, d: int, seed: int = 0, lo: int = 2, hi: int = 9) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(lo, hi)), d)).astype(np.float32) for _ in range(n)]


def objects(seqs: list[np.ndarray]) -> np.ndarray:
    a = np.empty(len(seqs), dtype=object)
    for i, x in enumerate(seqs):  # one by one: a slice assignment would broadcast equal shapes
        a[i] = x
    return a


# -- good files -----------------------------------------------------------------------------------
def test_npz_padded_regression_holds_out_validation(tmp_path):
    x = np.random.default_rng(1).normal(size=(20, 6, 3)).astype(np.float32)
    f = tmp_path / "reg.npz"
    np.savez(f, x=x, y=x[..., :2] * 2)
    d = load_frames(str(f), "regression", valid_fraction=0.25)
    assert (d.input_size, d.output_size, d.stream) == (3, 2, False)
    assert (len(d.train), len(d.valid), d.test) == (15, 5, None)
    np.testing.assert_array_equal(d.train.y, d.train.x[..., :2] * 2)
    assert d.source["files"][0]["sha256"] and d.source["sequences"] == {"train": 15, "valid": 5}


def test_npz_ragged_object_arrays_pad_and_keep_lengths(tmp_path):
    xs = ragged(6, 3)
    f = tmp_path / "ragged.npz"
    np.savez(f, x=objects(xs), y=objects([s[:, :1] + 1 for s in xs]),
             x_valid=objects(xs[:2]), y_valid=objects([s[:, :1] for s in xs[:2]]))
    d = load_frames(str(f), "regression")
    assert list(d.train.lengths) == [len(s) for s in xs] and len(d.valid) == 2
    for i, s in enumerate(xs):
        np.testing.assert_array_equal(d.train.x[i, :len(s)], s)
        assert not d.train.x[i, len(s):].any()  # padding is zeros, whatever it is, and never read


def test_npz_lengths_array_marks_padding(tmp_path):
    x = np.full((4, 5, 2), np.nan, dtype=np.float32)  # padding may hold anything, even NaN
    x[:, :3] = 1.0
    f = tmp_path / "lens.npz"
    np.savez(f, x=x, y=np.array([0, 1, 0, 1]), lengths=np.array([3, 2, 3, 1]))
    d = load_frames(str(f), "classification", valid_fraction=0.25)
    assert sorted(d.train.lengths.tolist() + d.valid.lengths.tolist()) == [1, 2, 3, 3]
    assert np.isfinite(d.train.x).all() and d.class_names == ("0", "1")


def test_npy_inputs_with_targets_file_and_class_names(tmp_path):
    x = np.random.default_rng(2).normal(size=(10, 4, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(10) % 3)
    d = load_frames(str(tmp_path / "x.npy"), "classification", targets=str(tmp_path / "y.npy"))
    assert d.output_size == 3 and d.class_names == ("0", "1", "2") and len(d.source["files"]) == 2
    f = tmp_path / "named.npz"
    np.savez(f, x=x, labels=np.arange(10) % 2, class_names=np.array(["cat", "dog"]))
    assert load_frames(str(f), "classification").class_names == ("cat", "dog")


# -- bad files: each error names the file and the problem -------------------------------------------
def _bad(tmp_path, name: str, **arrays):
    f = tmp_path / name
    np.savez(f, **arrays)
    return f


@pytest.mark.parametrize("task, arrays, problem", [
    ("regression", dict(x=np.zeros((4, 3)), y=np.zeros((4, 3, 1))), "inputs must have rank 3 [N, T, D_in]"),
    ("regression", dict(x=np.zeros((4, 3, 2)), y=np.zeros((4, 3))), "targets must have rank 3 [N, T, D_out]"),
    ("regression", dict(x=np.zeros((4, 3, 2)), y=np.zeros((5, 3, 1))), "4 input sequences but 5 target sequences"),
    ("regression", dict(x=objects([np.zeros((3, 2)), np.zeros((4, 2))]),
                        y=objects([np.zeros((3, 1)), np.zeros((5, 1))])),
     "sequence 1 has 4 input frames but 5 target frames"),
    ("regression", dict(x=objects([np.zeros((3, 2)), np.zeros((4, 3))]), y=objects([np.zeros((3, 1))] * 2)),
     "input widths differ (sequence 0 has 2 features, sequence 1 has 3)"),
    ("regression", dict(x=objects([np.zeros(3), np.zeros(3)]), y=objects([np.zeros((3, 1))] * 2)),
     "inputs sequence 0 has rank 1, want rank 2"),
    ("regression", dict(x=np.array([[[0.0], [np.inf]]] * 3), y=np.zeros((3, 2, 1))),
     "inputs hold a non-finite value (inf in sequence 0, frame 1, feature 0)"),
    ("regression", dict(x=np.zeros((3, 2, 1)), y=np.array([[[0.0], [np.nan]]] * 3)),
     "targets hold a non-finite value (nan in sequence 0, frame 1"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.array([0.0, 1.5, 2.0])),
     "labels must be integers (label 1 is 1.5)"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.array(["a", "b", "c"])),
     "labels must be integers (got <U1)"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.array([0, -1, 2])), "labels must be >= 0"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.array([0, 1])), "3 input sequences but 2 labels"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.zeros((3, 2))), "one integer per sequence"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.array([0, 1, 1]), lengths=np.array([2, 3, 1])),
     "lengths[1] is 3, but sequence 1 has 2 frames"),
    ("classification", dict(inputs=np.zeros((3, 2, 1))), "no array 'y' (the archive holds: inputs)"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.array([0, 1, 1]), labels=np.array([0, 1, 1])),
     "holds both 'y' and 'labels'"),
    ("classification", dict(x=np.zeros((3, 2, 1)), y=np.array([0, 1, 2]), class_names=np.array(["a", "b"])),
     "label 2 has no name"),
    ("classification", dict(x=np.zeros((2, 2, 1)), y=np.array([0, 1]), x_valid=np.zeros((2, 2, 3)),
                            y_valid=np.array([0, 1])), "valid inputs have 3 features, train has 1"),
])
def test_bad_npz_names_file_and_problem(tmp_path, task, arrays, problem):
    f = _bad(tmp_path, "bad.npz", **arrays)
    with pytest.raises(FrameDataError) as e:
        load_frames(str(f), task)
    assert str(f) in str(e.value) and problem in str(e.value), str(e.value)


@pytest.mark.parametrize("name, content, targets, problem", [
    ("notzip.npz", b"hello", None, "not a .npz archive"),
    ("notnpy.npy", b"hello", "t.npy", "cannot be read as a numpy array"),
    ("x.npy", None, None, "need their targets (or labels) in a second file: --targets"),
    ("data.csv", b"1,2", None, "frame data is a .npz or .npy file"),
    ("missing.npz", ..., None, "file not found"),
])
def test_bad_files_name_file_and_problem(tmp_path, name, content, targets, problem):
    f = tmp_path / name
    if content is None:
        np.save(f, np.zeros((2, 2, 1)))
    elif content is not ...:
        f.write_bytes(content)
    if targets:
        np.save(tmp_path / targets, np.zeros((2, 2, 1)))
        targets = str(tmp_path / targets)
    with pytest.raises(UserError) as e:
        load_frames(str(f), "regression", targets=targets)
    assert str(f) in str(e.value) and problem in str(e.value), str(e.value)


class _Boom:
    def __reduce__(self):
        return (print, ("this ran",))  # any callable: the reader must never call it


def test_object_array_with_foreign_pickle_is_refused_not_run(tmp_path, capsys):
    a = np.empty(2, dtype=object)
    a[0], a[1] = np.zeros((2, 1)), _Boom()
    f = tmp_path / "evil.npz"
    np.savez(f, x=a, y=objects([np.zeros((2, 1))] * 2))
    with pytest.raises(ArrayFileError) as e:
        read_npz(f)
    assert str(f) in str(e.value) and "builtins.print" in str(e.value) and "not only numpy arrays" in str(e.value)
    assert "this ran" not in capsys.readouterr().out
    assert isinstance(pickle.dumps(_Boom()), bytes)  # the file did hold the pickle


# -- standardisation --------------------------------------------------------------------------------
def test_sequence_standardisation_uses_each_sequences_valid_frames_only():
    rng = np.random.default_rng(3)
    xs = [rng.normal(5, 3, size=(n, 2)) for n in (4, 7, 2)]
    seqs = make_sequences(objects(xs), objects([s[:, :1] for s in xs]), "regression", "t")
    out = Standardizer.fit("sequence", seqs).apply(seqs)
    for i, s in enumerate(xs):
        z = out.x[i, :len(s)]
        np.testing.assert_allclose(z, (s - s.mean(0)) / s.std(0), rtol=1e-5, atol=1e-5)
        assert not out.x[i, len(s):].any()
    assert Standardizer.fit("sequence", seqs).describe() == {"mode": "sequence", "applies_to": "inputs",
                                                             "std_floor": 1e-6, "ddof": 0}


def test_global_standardisation_records_the_training_statistics():
    x = np.stack([np.linspace(0, 1, 5), np.full(5, 7.0)], axis=1)[None].repeat(3, 0)  # [3, 5, 2]
    seqs = make_sequences(x, x[..., :1], "regression", "t")
    std = Standardizer.fit("global", seqs)
    d = std.describe()
    assert d["mode"] == "global" and d["mean"] == pytest.approx([0.5, 7.0])
    assert d["std"][1] == 1e-6  # a constant feature: floored, not a division by zero
    assert np.isfinite(std.apply(seqs).x).all()
    with pytest.raises(FrameDataError, match="standardize must be one of"):
        Standardizer.fit("minmax", seqs)


# -- IDX --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_idx_round_trip_plain_and_gzip(tmp_path, compress, dtype):
    a = (np.arange(2 * 3 * 4) % 200).reshape(2, 3, 4).astype(dtype)
    f = write_idx(tmp_path / "a-idx3", a, compress=compress)
    assert (f.read_bytes()[:2] == b"\x1f\x8b") == compress
    b = read_idx(f)
    assert b.dtype == np.dtype(dtype) and b.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)


def test_idx_header_is_the_standard_one(tmp_path):
    f = write_idx(tmp_path / "lab", np.array([7, 2, 1], dtype=np.uint8))
    assert f.read_bytes() == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 2, 1])  # as LeCun's t10k-labels starts


@pytest.mark.parametrize("raw, problem", [
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "not an IDX file (magic number 01000801"),
    (bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 5]), "unknown IDX type code 0x0a"),
    (bytes([0, 0, 8, 0]), "gives 0 dimensions"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "truncated IDX header"),
    (bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]), "need 4 bytes of data, the file has 3 (truncated)"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 1, 1, 2]), "need 1 bytes of data, the file has 2 (trailing bytes)"),
    (b"\x00\x00", "too short for an IDX header"),
    (b"\x1f\x8b\x08\x00garbage", "cannot be read"),
])
def test_bad_idx_names_file_and_problem(tmp_path, raw, problem):
    f = tmp_path / "bad-idx"
    f.write_bytes(raw)
    with pytest.raises(IdxError) as e:
        read_idx(f)
    assert str(f) in str(e.value) and problem in str(e.value), str(e.value)


def write_mnist(folder, n_train: int = 30, n_test: int = 10, compress: bool = True, seed: int = 0):
    """A tiny MNIST-shaped folder: digit d is an image whose row d is lit (learnable row by row)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    gz = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        images[np.arange(n), labels * 2 + 3] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte{gz}", images, compress=compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{gz}", labels, compress=compress)
    return folder


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_dir_reads_as_28_steps_of_28_pixels(tmp_path, compress):
    folder = write_mnist(tmp_path / "mnist", compress=compress)
    d = load_frames(f"mnist:{folder}", "classification", valid_fraction=0.2)
    assert (d.input_size, d.output_size, d.class_names) == (28, 10, tuple("0123456789"))
    assert d.train.x.shape[1:] == (28, 28) and (len(d.train), len(d.valid), len(d.test)) == (24, 6, 10)
    assert 0.0 <= d.train.x.min() and d.train.x.max() == 1.0
    lit = d.test.x[np.arange(10), d.test.y * 2 + 3]  # [10, 28]: the row each label lights
    assert (lit == 1.0).all()


def test_mnist_dir_errors(tmp_path):
    folder = write_mnist(tmp_path / "m")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(IdxError, match="has t10k-images-idx3-ubyte.gz but not t10k-labels-idx1-ubyte"):
        read_mnist_split(folder, "test")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8), compress=True)
    with pytest.raises(IdxError, match=r"10 images but t10k-labels-idx1-ubyte.gz holds 9 labels"):
        read_mnist_split(folder, "test")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros((10, 1), dtype=np.uint8), compress=True)
    with pytest.raises(IdxError, match="labels are a 1-dimensional uint8 IDX file"):
        read_mnist_split(folder, "test")
    with pytest.raises(FrameDataError, match="is not a directory"):
        load_frames(f"mnist:{tmp_path / 'nowhere'}", "classification")
    with pytest.raises(FrameDataError, match="no train-images-idx3-ubyte"):
        load_frames(f"mnist:{tmp_path}", "classification")
    with pytest.raises(FrameDataError, match="train it with --task classification"):
        load_frames(f"mnist:{folder}", "regression")


# -- built-in sources -------------------------------------------------------------------------------
def test_sin_cos_is_the_tutorials_wave_and_streams_continue_across_batches():
    d = load_frames("builtin:sin-cos", "regression")
    assert d.stream and (d.input_size, d.output_size) == (1, 1)
    n = np.arange(1000)
    np.testing.assert_allclose(d.train.x[0, :1000, 0], np.sin(n / (10 * np.pi)), atol=1e-6)
    np.testing.assert_allclose(d.train.y[0, :1000, 0], np.cos(n / (10 * np.pi)), atol=1e-6)
    x, y = to_streams(d.train, batch_size=5, where="t")  # [N, B, 1]
    per = x.shape[0]
    bptt = 20
    batches = [x[i:i + bptt] for i in range(0, per, bptt)]
    for k in range(3):  # row b of batch k+1 starts one frame after row b of batch k ends
        for b in range(5):
            t_end = (b * per + (k + 1) * bptt - 1) / (10 * np.pi)
            assert batches[k][-1, b, 0] == pytest.approx(np.sin(t_end), abs=1e-6)
            assert batches[k + 1][0, b, 0] == pytest.approx(np.sin(t_end + 1 / (10 * np.pi)), abs=1e-6)
    np.testing.assert_allclose(y[:, 2, 0], np.cos((2 * per + np.arange(per)) / (10 * np.pi)), atol=1e-5)
    v = d.valid.x[0, :3, 0]  # validation is another stretch of the same wave
    np.testing.assert_allclose(v, np.sin((1_000_000 + np.arange(3)) / (10 * np.pi)), atol=1e-5)
    with pytest.raises(FrameDataError, match="builtin:sin-cos is regression data; train it with --task regression"):
        load_frames("builtin:sin-cos", "classification")
    with pytest.raises(FrameDataError, match="unknown built-in data; choose one of builtin:sin-cos, builtin:digits"):
        load_frames("builtin:nope", "regression")


@pytest.fixture
def fake_sklearn(monkeypatch):
    """A stand-in scikit-learn whose load_digits has the real one's shapes: 1797 images of 8x8 in 0..16."""
    rng = np.random.default_rng(4)
    target = np.arange(1797) % 10
    images = rng.integers(0, 17, size=(1797, 8, 8)).astype(np.float64)
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: types.SimpleNamespace(images=images, target=target)
    sk = types.ModuleType("sklearn")
    sk.__version__, sk.datasets = "fake", datasets
    monkeypatch.setitem(sys.modules, "sklearn", sk)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)
    return images, target


def test_digits_rows_scaled_and_split_fixed(fake_sklearn):
    images, target = fake_sklearn
    d = load_frames("builtin:digits", "classification", valid_fraction=0.1)
    assert (d.input_size, d.output_size, d.class_names) == (8, 10, tuple("0123456789"))
    assert (len(d.train), len(d.valid), len(d.test)) == (1294, 144, 359)
    assert d.train.x.shape[1:] == (8, 8) and d.train.x.max() <= 1.0 and d.test.x.max() == 1.0
    again = load_frames("builtin:digits", "classification", valid_fraction=0.1)
    np.testing.assert_array_equal(d.test.x, again.test.x)  # the same held-out images every time
    index = {img.tobytes(): k for k, img in enumerate(images)}  # random images: all distinct
    placed = [index[(img * 16).astype(np.float64).tobytes()] for s in (d.train, d.valid, d.test) for img in s.x]
    assert sorted(placed) == list(range(1797))  # the splits are disjoint and cover every image
    labels = np.concatenate([d.train.y, d.valid.y, d.test.y])
    np.testing.assert_array_equal(labels, target[placed])  # each image keeps its own label


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(FrameDataError, match=r"builtin:digits needs scikit-learn \(pip install scikit-learn\)"):
        load_frames("builtin:digits", "classification")


def test_real_digits_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    d = load_frames("builtin:digits", "classification")
    assert len(d.train) + len(d.valid) + len(d.test) == 1797 and d.train.x.shape[1:] == (8, 8)
    assert 0.0 == d.train.x.min() and d.train.x.max() == 1.0
    assert d.source["name"] == "digits" and d.source["package"].startswith("scikit-learn")


def test_gzip_module_reads_what_write_idx_compresses(tmp_path):
    f = write_idx(tmp_path / "g.gz", np.arange(6, dtype=np.uint8).reshape(2, 3), compress=True)
    assert gzip.decompress(f.read_bytes())[:4] == bytes([0, 0, 8, 2])


def test_frame_data_modules_do_not_import_torch():
    import subprocess

    code = ("import sys, lstmgen.train.frame_data, lstmgen.train.frame_sources, lstmgen.train.idx, "
            "lstmgen.train.npyio; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
