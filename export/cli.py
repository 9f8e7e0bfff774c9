"""`lstmgen export`: checkpoint -> verified ONNX bundle. Heavy imports wait until `run`."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a training checkpoint to a bundle folder (model.onnx: one LSTM or GRU step; prompt.onnx: "
        "a whole prompt batch, or sequence.onnx for a frame model: whole frame sequences; manifest.json: "
        "kind, cell, state tensors, vocabulary or frame task and standardisation, names, provenance), "
        "then verify it: ONNX Runtime against PyTorch at batch 1 and 7 (greedy decoding for a language "
        "model, random frames for a frame model), and the whole-sequence graph against the step graph. "
        "A failed check leaves no bundle behind.")
    parser.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a checkpoint file, or a run directory (its best.pt, else last.pt)")
    # SUPPRESS: no "(default: ...)" from the help formatter where it would only confuse
    quiet = argparse.SUPPRESS
    parser.add_argument("--out", required=True, metavar="BUNDLE_DIR", default=quiet,
                        help="bundle folder to create (an earlier bundle there is replaced)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset of the graphs (14 or newer)")
    parser.add_argument("--no-prompt-graph", dest="prompt_graph", action="store_false", default=quiet,
                        help="skip prompt.onnx / sequence.onnx (servers then feed prompts or "
                             "sequences through the step graph)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", default=quiet,
                        help="skip the ONNX Runtime vs PyTorch parity checks")
    parser.add_argument("--verify-steps", type=int, default=200, metavar="N",
                        help="greedy tokens generated per row (frames stepped, for a frame "
                             "model) during verification")
    parser.add_argument("--verify-prompt", default=quiet, metavar="TEXT",
                        help="prompt text for verification (default: fixed random token ids)")
    parser.add_argument("--int8", action="store_true", default=quiet,
                        help="ship int8 dynamically quantized graphs (ORT DynamicQuantizeLSTM; LSTM "
                             "models only); verified fp32 first, then int8 agreement is measured, not "
                             "enforced")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, fields

    from lstmgen.export.bundle import ExportConfig, export_bundle
    from lstmgen.export.parity import ParityError

    given = vars(args)
    cfg = ExportConfig(**{f.name: given[f.name] for f in fields(ExportConfig) if f.name in given})
    checks = (f"verified over {cfg.verify_steps} steps" if cfg.verify else "not verified")
    print(f"exporting {args.checkpoint} -> {args.out} (opset {cfg.opset}, {'int8' if cfg.int8 else 'fp32'}, "
          f"{'with' if cfg.prompt_graph else 'without'} its whole-sequence graph, {checks})")
    try:
        manifest, report = export_bundle(args.checkpoint, args.out, **asdict(cfg))
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
