"""`lstmgen train`: a preset, overridden flag by flag, trained on a corpus into a run directory.

Imports no torch at module level (the `lstmgen` command builds every subparser's help); the trainer
is imported when the command runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from lstmgen import console
from lstmgen.train.config import PRESETS, TrainConfig

DEFAULT_PRESET = "tiny"

# TrainConfig field -> help. Each becomes an optional --flag that overrides the preset's value.
_OVERRIDES: dict[str, str] = {
    "epochs": "number of passes over the training text",
    "max_steps": "stop after this many updates in all (0: no limit); still validates and saves",
    "max_seconds": "stop after this much training wall time in this session (0: no limit)",
    "batch_size": "B: contiguous streams trained side by side",
    "bptt": "T: steps of truncated backpropagation through time per update",
    "eval_batch_size": "streams for the validation/test pass",
    "optimizer": "sgd (Zaremba) or adam (char-RNN tutorials)",
    "lr": "learning rate",
    "lr_decay": "multiply lr by this every epoch after --decay-after (Zaremba's schedule)",
    "decay_after": "epochs at the full learning rate before the decay starts",
    "weight_decay": "L2 penalty",
    "clip_norm": "clip the global gradient norm to this (0: no clipping)",
    "loss_sum_over_time": "gradient of the loss summed over the bptt steps (Zaremba, TF ptb_word_lm) "
                          "rather than averaged",
    "embedding_size": "embedding width E",
    "hidden_size": "LSTM width H",
    "num_layers": "stacked LSTM layers L",
    "dropout": "dropout on the non-recurrent connections (Zaremba)",
    "tie_weights": "share the embedding and output weights (needs E == H)",
    "init_scale": "uniform init in [-s, s] (Zaremba); 0: PyTorch's defaults",
    "level": "char or word tokens (word: whitespace split plus <eos> per line, PTB style)",
    "min_count": "word level: words seen fewer times in the training text become <unk>",
    "max_vocab": "word level: keep the most frequent words, the vocabulary (with <eos> and <unk>) "
                 "at most this size; the rest become <unk> (0: no limit)",
    "valid_fraction": "share of a single-file corpus held out (from its end) for validation",
    "seed": "random seed (torch.manual_seed)",
    "log_interval": "log the training loss, lr and tokens/s (steps.csv, progress) every this many updates",
    "save_every": "also write last.pt every this many updates (0: only at validations)",
    "device": "auto (cuda when available), cpu or cuda",
    "amp": "bf16: autocast the forward pass to bfloat16 on CUDA (ignored, with a message, on CPU)",
}


def _preset_table() -> str:
    lines = ["presets (flags override their values):",
             "  name        level  E     H     L  dropout  B    T    epochs  optimizer  lr      decay (after)"]
    for name, c in PRESETS.items():
        lines.append(f"  {name:<11} {c.level:<6} {c.embedding_size:<5} {c.hidden_size:<5} {c.num_layers:<2} "
                     f"{c.dropout:<8g} {c.batch_size:<4} {c.bptt:<4} {c.epochs:<7} {c.optimizer:<10} "
                     f"{c.lr:<7g} {c.lr_decay:.3g} ({c.decay_after})")
    return "\n".join(lines)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows real defaults only (not None/False), and keeps the preset table's lines as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    parser.description = (
        "Train a stacked LSTM language model with truncated BPTT (Zaremba et al. 2014).\n"
        "--data is a text file (the last --valid-fraction is held out), a directory or prefix with\n"
        "PTB (NAME.train.txt/.valid.txt/.test.txt) or WikiText (train.txt/valid.txt/test.txt) splits,\n"
        "an http(s) URL (downloaded into OUT/cache), or a corpus name such as tinyshakespeare or ptb\n"
        "(fetched once into a cache, see `lstmgen data`). Word level on ordinary text: --min-count or\n"
        "--max-vocab give the vocabulary an <unk> for the rarer words. OUT receives config.json, metrics.csv (per\n"
        "validation), steps.csv (per logged window), curves.png, best.pt (lowest validation loss)\n"
        "and last.pt (for --resume).\n"
        "Data-parallel: torchrun --standalone --nproc_per_node N -m lstmgen.cli train ... (gloo on CPU,\n"
        "nccl on CUDA; --batch-size is the global batch, split evenly over the N processes).")
    parser.epilog = _preset_table()
    parser.add_argument("--data", help="corpus: file, directory, split prefix, http(s) URL or a standard corpus's "
                                       "name (`lstmgen data list`: fetched once into a cache) "
                                       "(with --resume: defaults to the run's own corpus)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help=f"starting configuration (default: {DEFAULT_PRESET}; with --resume: "
                             "the run's saved config)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN_DIR from its last.pt (model, optimizer, epoch, step, RNG)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    console.add_arguments(parser, quiet_help="only the best checkpoint's path and warnings: no progress, "
                                             "no log lines")
    types = {f.name: f.type for f in fields(TrainConfig)}
    for name, help_ in _OVERRIDES.items():
        flag, typ = "--" + name.replace("_", "-"), types[name]
        # SUPPRESS: an absent flag leaves no attribute, so the preset's value stands
        kw: dict = {"default": argparse.SUPPRESS, "help": help_, "dest": name}
        if typ == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typ.startswith("Literal"):
            choices = [c.strip(" '\"") for c in typ[len("Literal["):-1].split(",")]
            parser.add_argument(flag, choices=choices, **kw)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}[typ], **kw)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Preset (or, resuming without --preset, the run's saved config) plus the flags given."""
    from lstmgen.train.trainer import saved_config

    if args.preset is None and args.resume:
        base = saved_config(args.out)
    else:
        base = PRESETS[args.preset or DEFAULT_PRESET]
    return replace(base, **{k: getattr(args, k) for k in _OVERRIDES if hasattr(args, k)})


def run(args: argparse.Namespace) -> int:
    from lstmgen.train.trainer import TrainError, train

    display = console.from_args(args)
    try:
        if args.data is None and not args.resume:
            raise TrainError("--data is required (a file, directory, split prefix, http(s) URL or corpus name)")
        cfg = resolve_config(args)
        best = train(cfg, args.data, args.out, resume=args.resume, console=display)
    except KeyboardInterrupt:  # a UserError or OSError (RUN_DIR not writable, disk full) exits 2 in lstmgen.cli
        last = Path(args.out) / "last.pt"
        print(f"lstmgen train: interrupted; {last} holds the last save - continue with --resume" if last.is_file()
              else "lstmgen train: interrupted before the first save; nothing was kept", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        display.result(f"best checkpoint: {best}", best_checkpoint=str(best))
    return 0
