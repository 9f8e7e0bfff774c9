"""`lstmgen export`: checkpoint -> verified ONNX bundle. Heavy imports wait until `run`."""
from __future__ import annotations

import argparse
import sys

from lstmgen import config_args
from lstmgen.export.config import ExportConfig  # torch-free: the graphs and checks load in `run`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = config_args.DefaultsFormatter
    parser.description = (
        "Export a training checkpoint to a bundle folder (model.onnx: one LSTM or GRU step; prompt.onnx: "
        "a whole prompt batch, or sequence.onnx for a frame model: whole frame sequences; manifest.json: "
        "kind, cell, state tensors, vocabulary or frame task and standardisation, names, provenance), "
        "then verify it: ONNX Runtime against PyTorch at batch 1 and 7 (greedy decoding for a language "
        "model, random frames for a frame model), and the whole-sequence graph against the step graph. "
        "A failed check leaves no bundle behind.")
    parser.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a checkpoint file, or a run directory (its best.pt, else last.pt)")
    parser.add_argument("--out", required=True, metavar="BUNDLE_DIR", default=argparse.SUPPRESS,
                        help="bundle folder to create (an earlier bundle there is replaced)")
    config_args.add_dataclass_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    from lstmgen.export.bundle import export_bundle
    from lstmgen.export.parity import ParityError

    cfg = config_args.from_args(ExportConfig, args)
    checks = (f"verified over {cfg.verify_steps} steps" if cfg.verify else "not verified")
    print(f"exporting {args.checkpoint} -> {args.out} (opset {cfg.opset}, {'int8' if cfg.int8 else 'fp32'}, "
          f"{'with' if cfg.prompt_graph else 'without'} its whole-sequence graph, {checks})")
    try:
        manifest, report = export_bundle(args.checkpoint, args.out, cfg)
    except ParityError as e:  # other UserErrors exit 2 in lstmgen.cli; this one says no bundle was written
        print(f"lstmgen export: parity check failed, no bundle written: {e}", file=sys.stderr)
        return 2
    files = [manifest.model_file] + [f for f in (manifest.prompt_model_file, manifest.frames and
                                                  manifest.frames.sequence_model_file) if f]
    if manifest.frames is None:
        what = f"vocab {manifest.vocab_size} {manifest.level}"
    else:
        f = manifest.frames
        what = f"{f.task} {f.input_size} -> {f.output_size}{' classes' if f.task == 'classification' else ''}"
    print(f"bundle {args.out}: {', '.join(files)}, manifest.json ({manifest.quantization}, opset "
          f"{manifest.opset}, {manifest.cell} {manifest.num_layers} x {manifest.hidden_size}, {what})")
    if report is None:
        print("verification skipped (--no-verify)")
    else:
        for line in report.lines():
            print(line)
    return 0
