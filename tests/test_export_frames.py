"""Frame models through `lstmgen export`: the step and sequence graphs (LSTM and GRU, with and without
the input layer), parity with PyTorch, the manifest's frame spec, int8, and the errors."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lstmgen.bundle import StateTensor, load_manifest
from lstmgen.cli import main
from lstmgen.errors import UsageError
from lstmgen.export import onnx_graph
from lstmgen.export.bundle import export_bundle
from lstmgen.export.parity import ParityError
from lstmgen.train.checkpoint import FrameCheckpoint, save_checkpoint
from lstmgen.train.config import FrameTrainConfig
from lstmgen.train.frame_model import FrameModel, FrameModelConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")
D_IN, H = 3, 8
GLOBAL = {"mode": "global", "applies_to": "inputs", "std_floor": 1e-6, "ddof": 0,
          "mean": [0.5, -1.0, 2.0], "std": [1.0, 0.25, 3.0]}
CASES = {  # name: (task, cell, projection_size, num_layers)
    "regression-lstm-proj": ("regression", "lstm", 5, 2),
    "regression-gru": ("regression", "gru", 0, 1),
    "classification-lstm": ("classification", "lstm", 0, 1),
    "classification-gru-proj": ("classification", "gru", 4, 3),
}


def frame_model(task: str, cell: str, proj: int, layers: int, seed: int = 0) -> FrameModel:
    out = 4 if task == "classification" else 2
    torch.manual_seed(seed)
    model = FrameModel(FrameModelConfig(task, D_IN, out, hidden_size=H, num_layers=layers, cell=cell,
                                        projection_size=proj)).eval()
    with torch.no_grad():  # larger than the default init, so outputs and states are not all ~0
        for p in model.parameters():
            p.uniform_(-0.6, 0.6)
    return model


def frame_run(run_dir, task="regression", cell="lstm", proj=0, layers=1):
    model = frame_model(task, cell, proj, layers)
    names = ["down", "up", "left", "right"] if task == "classification" else []
    ck = FrameCheckpoint(model.cfg, FrameTrainConfig(task=task, cell=cell, hidden_size=H, num_layers=layers,
                                                     projection_size=proj),
                         model.state_dict(), class_names=names, standardize=dict(GLOBAL),
                         data={"spec": "tests", "stream": False},
                         metrics={"val_mse": 0.5, "history": [{"epoch": 1}]})
    save_checkpoint(ck, run_dir / "best.pt")
    return run_dir


def ort_session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("case", list(CASES))
def test_frame_export_writes_a_verified_bundle(tmp_path, case):
    task, cell, proj, layers = CASES[case]
    run = frame_run(tmp_path / "run", task, cell, proj, layers)
    manifest, report = export_bundle(run, tmp_path / "b", verify_steps=40)
    bundle = tmp_path / "b"
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx", "sequence.onnx"]
    assert load_manifest(bundle) == manifest
    state = ("h", "c") if cell == "lstm" else ("h",)
    assert (manifest.kind, manifest.cell, manifest.vocab, manifest.vocab_size) == ("frames", cell, None, 0)
    assert manifest.state_tensors == tuple(StateTensor(n, (layers, H)) for n in state)
    assert manifest.inputs == ("x", *state) and manifest.outputs == ("y", *(f"{n}_out" for n in state))
    assert manifest.prompt_model_file is None and manifest.embedding_size == (proj or D_IN)
    f = manifest.frames
    assert (f.task, f.input_size, f.output_size) == (task, D_IN, 4 if task == "classification" else 2)
    assert f.class_names == (("down", "up", "left", "right") if task == "classification" else ())
    assert f.standardize == GLOBAL and f.sequence_model_file == "sequence.onnx"
    assert f.sequence_inputs == ("x", "lengths", *state)
    assert manifest.provenance["data"]["spec"] == "tests" and manifest.provenance["validation"] == {"val_mse": 0.5}
    for s in report.fp32.step:
        assert s.frames == 40 and s.max_output_diff < 1e-4 and s.max_state_diff < 1e-4
        assert (s.argmax_agreement == 1.0) if task == "classification" else s.argmax_agreement is None
    assert [s.batch for s in report.fp32.step] == [1, 7]
    seq = report.fp32.sequence
    assert seq.max_output_diff < 1e-4 and seq.torch_output_diff < 1e-4 and min(seq.lengths) == 1
    for name in ("model.onnx", "sequence.onnx"):
        graph = onnx.load(str(bundle / name))
        onnx.checker.check_model(graph, full_check=True)
        assert Counter(n.op_type for n in graph.graph.node)[cell.upper()] == layers


def test_graph_contract(tmp_path):
    run = frame_run(tmp_path / "run", "classification", "lstm", 4, 2)
    export_bundle(run, tmp_path / "b", verify=False)
    step = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
    assert [(i.name, dims(i)) for i in step.input] == [("x", ["batch", 3]), ("h", [2, "batch", 8]),
                                                       ("c", [2, "batch", 8])]
    assert [(o.name, dims(o)) for o in step.output] == [("y", ["batch", 4]), ("h_out", [2, "batch", 8]),
                                                        ("c_out", [2, "batch", 8])]
    seq = onnx.load(str(tmp_path / "b" / "sequence.onnx")).graph
    assert [(i.name, dims(i)) for i in seq.input] == [("x", ["batch", "time", 3]), ("lengths", ["batch"]),
                                                      ("h", [2, "batch", 8]), ("c", [2, "batch", 8])]
    assert seq.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert [(o.name, dims(o)) for o in seq.output][0] == ("y", ["batch", "time", 4])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bundle_graphs_match_pytorch_from_outside(tmp_path, cell):
    """Through ONNX Runtime alone, as a server would: random sequences of different lengths at batch
    1 and 5, stepped frame by frame and in one sequence call, against PyTorch's packed forward."""
    run = frame_run(tmp_path / "run", "regression", cell, 5, 2)
    export_bundle(run, tmp_path / "b", verify=False)
    step, seq = ort_session(tmp_path / "b" / "model.onnx"), ort_session(tmp_path / "b" / "sequence.onnx")
    model = frame_model("regression", cell, 5, 2)
    n_state = 2 if cell == "lstm" else 1
    rng = np.random.default_rng(1)
    for lengths in ([9], [12, 1, 7, 12, 3]):
        B, T = len(lengths), max(lengths)
        lens = np.array(lengths, np.int32)
        x = rng.standard_normal((B, T, D_IN)).astype(np.float32)  # [B, T, D_in]
        x[np.arange(T)[None] >= lens[:, None]] = 0.0
        with torch.inference_mode():
            ref, ref_state = model(torch.from_numpy(x.transpose(1, 0, 2).copy()), model.init_state(B),
                                   torch.from_numpy(lens.astype(np.int64)))  # [T, B, D_out]
        zeros = [np.zeros((2, B, H), np.float32)] * n_state
        y, *state = seq.run(None, {"x": x, "lengths": lens, **dict(zip(("h", "c"), zeros))})
        valid = np.arange(T)[:, None] < lens[None]  # [T, B]
        np.testing.assert_allclose(y.transpose(1, 0, 2)[valid], ref.numpy()[valid], atol=1e-5)
        for a, b in zip(state, ref_state):
            np.testing.assert_allclose(a, b.numpy(), atol=1e-5)
        for r, n in enumerate(lengths):  # each row alone through the step graph
            row = [np.zeros((2, 1, H), np.float32)] * n_state
            for t in range(n):
                out, *row = step.run(None, {"x": x[r, t:t + 1], **dict(zip(("h", "c"), row))})
                np.testing.assert_allclose(out[0], ref[t, r].numpy(), atol=1e-5)
            for a, b in zip(row, ref_state):
                np.testing.assert_allclose(a[:, 0], b[:, r].numpy(), atol=1e-5)


def test_swapped_gates_are_caught_and_leave_no_bundle(tmp_path, monkeypatch):
    run = frame_run(tmp_path / "run", "regression", "lstm", 0, 1)
    export_bundle(run, tmp_path / "b", verify_steps=10)
    before = (tmp_path / "b" / "model.onnx").read_bytes()
    monkeypatch.setattr(onnx_graph, "TORCH_TO_ONNX_GATES", (0, 1, 2, 3))
    with pytest.raises(ParityError, match=r"frame step graph, batch 1, frame \d+: y"):
        export_bundle(run, tmp_path / "b")
    assert (tmp_path / "b" / "model.onnx").read_bytes() == before
    with pytest.raises(ParityError):
        export_bundle(run, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "run"]


def test_no_sequence_graph(tmp_path):
    run = frame_run(tmp_path / "run", "classification", "gru", 0, 1)
    manifest, report = export_bundle(run, tmp_path / "b", prompt_graph=False, verify_steps=10)
    assert manifest.frames.sequence_model_file is None and report.fp32.sequence is None
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "model.onnx"]
    load_manifest(tmp_path / "b")


def test_int8_for_an_lstm_frame_model(tmp_path):
    run = frame_run(tmp_path / "run", "classification", "lstm", 4, 2)
    manifest, report = export_bundle(run, tmp_path / "b", int8=True, verify_steps=20)
    assert manifest.quantization == "int8-dynamic"
    load_manifest(tmp_path / "b")
    for name in ("model.onnx", "sequence.onnx"):
        ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "b" / name)).graph.node)
        assert ops["DynamicQuantizeLSTM"] == 2 and ops["LSTM"] == 0
    assert report.fp32.step[0].max_output_diff < 1e-4  # fp32 verified before quantizing
    assert report.int8.quantization == "int8-dynamic" and report.int8.sequence is not None
    for s in report.int8.step:
        assert 0 < s.max_output_diff < 0.2 and s.argmax_agreement >= 0.8


def test_int8_gru_and_verify_prompt_are_refused(tmp_path):
    gru = frame_run(tmp_path / "gru", "regression", "gru", 0, 1)
    with pytest.raises(UsageError, match="--int8 is for LSTM models; this is a GRU"):
        export_bundle(gru, tmp_path / "b", int8=True)
    with pytest.raises(UsageError, match="--verify-prompt is for language models; this is a regression model"):
        export_bundle(gru, tmp_path / "b", verify_prompt="hello")
    assert not (tmp_path / "b").exists()


def test_cli_export_of_a_frame_model(tmp_path, capsys):
    run = frame_run(tmp_path / "run", "classification", "gru", 0, 1)
    assert main(["export", str(run), "--out", str(tmp_path / "b"), "--verify-steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx, sequence.onnx" in out and "gru 1 x 8, classification 3 -> 4 classes" in out
    assert "frame step graph vs PyTorch, batch 7, 20 frames" in out and "sequence graph, lengths" in out


def test_trained_checkpoint_exports_its_standardisation_and_classes(tmp_path):
    from lstmgen.train.config import preset
    from lstmgen.train.trainer import train

    x = np.random.default_rng(6).normal(10, 5, size=(30, 4, 2)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=np.arange(30) % 3, class_names=np.array(["a", "b", "c"]))
    cfg = preset("row-digits", standardize="global", epochs=1, hidden_size=4, projection_size=3, device="cpu")
    best = train(cfg, str(tmp_path / "c.npz"), tmp_path / "run", log=lambda line: None, progress_bar=False)
    manifest, _ = export_bundle(best, tmp_path / "b", verify_steps=10)
    f = manifest.frames
    assert f.class_names == ("a", "b", "c") and f.standardize["mode"] == "global"
    assert len(f.standardize["mean"]) == 2 and 8 < f.standardize["mean"][0] < 12
    assert manifest.provenance["data"]["spec"] == str(tmp_path / "c.npz")
