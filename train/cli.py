"""`lstmgen train`: a preset, overridden flag by flag, trained on a corpus into a run directory.

Imports no torch at module level (the `lstmgen` command builds every subparser's help); the trainer
is imported when the command runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from lstmgen import config_args, console
from lstmgen.train.config import PRESETS, FrameTrainConfig, RunConfig, TrainConfig, check_fields, for_task

DEFAULT_PRESET = "tiny"
# --sample-every when stdout is a terminal and the flag is not given (elsewhere: no samples)
TERMINAL_SAMPLE_EVERY = 500
# Without --preset a frame task starts from its seed's configuration: the tiny text preset's wider,
# deeper stack at lr 3e-3 never leaves MSE 0.5 on builtin:sin-cos (nor does a plain torch loop).
TASK_PRESETS = {"regression": "sin-cos", "classification": "row-digits"}

# The cell's help lives here: train/config.py's `cell` line carries only its type, whose Literal
# gives the choices (so a new cell shows up in --help by itself).
CELL_HELP = "the recurrent cell: lstm and gru are torch's nn.LSTM and nn.GRU, the others LSTM variants (train/cells.py)"


# each task's own settings, in field order (the rest, RunConfig's, every task has)
_OWN = {task: [f.name for f in dataclasses.fields(cls) if f.name not in RunConfig.__dataclass_fields__]
        for task, cls in (("lm", TrainConfig), ("regression", FrameTrainConfig))}


def _preset_table() -> str:
    lines = ["presets (flags override their values; E is the projection width P for frame tasks):",
             "  name        task            level  E     H     L  dropout  B    T    epochs  optimizer  lr      "
             "decay (after)"]
    for name, c in PRESETS.items():
        e = c.embedding_size if c.task == "lm" else c.projection_size
        lines.append(f"  {name:<11} {c.task:<15} {c.level if c.task == 'lm' else '-':<6} {e:<5} {c.hidden_size:<5} "
                     f"{c.num_layers:<2} "
                     f"{c.dropout:<8g} {c.batch_size:<4} {c.bptt:<4} {c.epochs:<7} {c.optimizer:<10} "
                     f"{c.lr:<7g} {c.lr_decay:.3g} ({c.decay_after})")
    return "\n".join(lines)


class _Formatter(config_args.DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows real defaults only (not None/False), and keeps the preset table's lines as written."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    parser.description = (
        "Train a stacked LSTM (--cell: GRU, peephole or CIFG LSTM) language model with truncated BPTT (Zaremba 2014).\n"
        "--data is a text file (the last --valid-fraction is held out), a directory or prefix with\n"
        "PTB (NAME.train.txt/.valid.txt/.test.txt) or WikiText (train.txt/valid.txt/test.txt) splits,\n"
        "an http(s) URL (downloaded into OUT/cache), or a corpus name such as tinyshakespeare or ptb\n"
        "(fetched once into a cache, see `lstmgen data`). Word level on ordinary text: --min-count or\n"
        "--max-vocab give the vocabulary an <unk> for the rarer words. OUT receives config.json, metrics.csv (per\n"
        "validation), steps.csv (per logged window), curves.png, best.pt (lowest validation loss)\n"
        "and last.pt (for --resume).\n"
        "Data-parallel: torchrun --standalone --nproc_per_node N -m lstmgen.cli train ... (gloo on CPU,\n"
        "nccl on CUDA; --batch-size is the global batch, split evenly over the N processes).\n"
        "\n"
        "Frame models (--task regression|classification, any --cell): --data builtin:sin-cos (the\n"
        "sine->cosine tutorial, one continuous stream), builtin:digits (scikit-learn's 8x8 digits, 8 rows\n"
        "of 8 pixels; needs scikit-learn), mnist:DIR (MNIST's IDX files in DIR), FILE.npz (arrays x, y\n"
        "[, lengths, x_valid, y_valid, x_test, y_test, class_names]) or FILE.npy with --targets FILE.npy.\n"
        "Regression logs the validation MSE, classification the accuracy; e.g. --preset sin-cos, --preset row-digits.")
    parser.epilog = _preset_table()
    parser.add_argument("--data", help="corpus: file, directory, split prefix, http(s) URL or a standard corpus's "
                                       "name (`lstmgen data list`: fetched once into a cache) "
                                       "(with --resume: defaults to the run's own corpus)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help=f"starting configuration (default: {DEFAULT_PRESET}; "
                             + ", ".join(f"{p} for --task {t}" for t, p in TASK_PRESETS.items())
                             + "; with --resume: the run's saved config)")
    parser.add_argument("--targets", metavar="FILE.npy",
                        help="frame tasks with .npy inputs: the per-frame targets (regression) or labels "
                             "(classification)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in RUN_DIR from its last.pt (model, optimizer, epoch, step, RNG); "
                            "Ctrl-C or SIGTERM writes last.pt at the update under way")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in a RUN_DIR that already holds a run (its checkpoints and logs are "
                            "replaced; its cache/ is kept)")
    parser.add_argument("--sample-every", type=int, metavar="N",
                        help="print a short generated sample every N updates (0: never; default: every "
                             f"{TERMINAL_SAMPLE_EVERY} when stdout is a terminal, else never)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    console.add_arguments(parser, quiet_help="only the best checkpoint's path and warnings: no progress, "
                                             "no log lines")
    # SUPPRESS: an absent flag leaves no attribute, so the preset's value stands
    config_args.add_dataclass_arguments(
        parser, RunConfig, defaults=argparse.SUPPRESS, helps={"cell": CELL_HELP},
        group="training configuration, every task (each flag overrides the preset's value: the table below)")
    config_args.add_dataclass_arguments(parser, TrainConfig, defaults=argparse.SUPPRESS, only=_OWN["lm"],
                                        group="language models (--task lm)")
    config_args.add_dataclass_arguments(parser, FrameTrainConfig, defaults=argparse.SUPPRESS,
                                        only=_OWN["regression"], group="frame models (--task regression|classification)")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Preset (or, resuming without --preset, the run's saved config) plus the flags given. A time
    limit given without --epochs is the only limit on a preset: its epoch count is dropped."""
    from lstmgen.train.rundir import saved_config
    from lstmgen.train.setup import TrainError

    given = {**config_args.given(RunConfig, args), **config_args.given(TrainConfig, args, exclude=["task"]),
             **config_args.given(FrameTrainConfig, args, exclude=["task"])}
    if args.preset is None and args.resume:
        base = saved_config(args.out)  # the run's own plan, epochs included
    else:
        base = PRESETS[args.preset or TASK_PRESETS.get(given.get("task", "lm"), DEFAULT_PRESET)]
        if given.get("max_seconds", 0) > 0 and "epochs" not in given:
            given["epochs"] = 0
    task = given.pop("task", base.task)
    other = FrameTrainConfig if task == "lm" else TrainConfig
    try:
        check_fields(task, given, show=lambda k: config_args.flag_of(other, k))
    except ValueError as e:
        raise TrainError(str(e)) from None
    return for_task(base, task, **given)


def sample_every(args: argparse.Namespace, stdout=None) -> int:
    """--sample-every as given; unset: on at a terminal (plain text, not --quiet), off elsewhere."""
    if args.sample_every is not None:
        return args.sample_every
    stdout = stdout or sys.stdout
    at_terminal = hasattr(stdout, "isatty") and stdout.isatty()
    return TERMINAL_SAMPLE_EVERY if at_terminal and not args.quiet and args.log_format == "text" else 0


def interrupted_message(e: KeyboardInterrupt, out: Path) -> str:
    """What an interrupted `lstmgen train` says: where it saved, or why nothing was kept."""
    sig = getattr(e, "signal_name", "SIGINT")
    saved = getattr(e, "checkpoint", None)
    if saved is not None:
        return (f"lstmgen train: interrupted ({sig}) at step {e.step}; saved {saved} - continue with "
                f"`lstmgen train --out {out} --resume`")
    last = out / "last.pt"
    if last.is_file():
        return (f"lstmgen train: interrupted ({sig}); {last} holds the last save"
                + " - continue with --resume")
    return (f"lstmgen train: interrupted ({sig}) before the first update finished: there was nothing to "
            "save, so nothing was kept")


def run(args: argparse.Namespace) -> int:
    from lstmgen.train.interrupt import EXIT_CODES
    from lstmgen.train.trainer import RunExistsError, TrainError, train

    display = console.from_args(args)
    if args.sample_every is not None and args.sample_every < 0:
        raise TrainError(f"--sample-every must be >= 0 (got {args.sample_every})")
    try:
        if args.data is None and not args.resume:
            raise TrainError("--data is required (a file, directory, split prefix, http(s) URL or corpus name)")
        cfg = resolve_config(args)
        best = train(cfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite, console=display,
                     targets=args.targets, sample_every=sample_every(args))
    except RunExistsError as e:  # worded for the command: its flags, not the Python keywords
        raise RunExistsError(e.out, resumable=e.resumable, flags=True) from None
    except KeyboardInterrupt as e:  # a UserError or OSError (RUN_DIR not writable, disk full) exits 2 in lstmgen.cli
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_message(e, Path(args.out)), file=sys.stderr)
        return EXIT_CODES.get(getattr(e, "signal_name", "SIGINT"), 130)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        display.result(f"best checkpoint: {best}", best_checkpoint=str(best))
    return 0
