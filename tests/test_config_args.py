"""lstmgen/config_args.py: a frozen config dataclass onto argparse and back; and every command's config
fields reachable from its flags, with the dataclass's defaults shown once in --help."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest

from lstmgen.cli import build_parser
from lstmgen.config_args import DefaultsFormatter, add_dataclass_arguments, flag_of, from_args


def h(text: str, **more) -> dict:
    return {"help": text, **more}


@dataclass(frozen=True)
class Inner:
    depth: int = field(default=3, metadata=h("how deep"))


@dataclass(frozen=True)
class Demo:
    count: int = field(default=4, metadata=h("an int"))
    rate: float = field(default=0.5, metadata=h("a float"))
    name: str = field(default="x", metadata=h("a str"))
    on: bool = field(default=True, metadata=h("a bool"))
    off: bool = field(default=False, metadata=h("another bool"))
    mode: Literal["a", "b", "c"] = field(default="b", metadata=h("a choice"))
    limit: int | None = field(default=None, metadata=h("an optional int (unset: none)"))
    ratio: float | None = field(default=None, metadata=h("an optional float"))
    sizes: tuple[int, ...] = field(default=(1, 2), metadata=h("several ints"))
    words: tuple[str, ...] = field(default=(), metadata=h("repeatable", append=True))
    batches: tuple[int, ...] = field(default=(1, 8), metadata=h("comma-separated", sep=","))
    gap_s: float = field(default=0.016, metadata=h("in milliseconds", flag="--gap-ms", scale=1000))
    threads: int = field(default=0, metadata=h("renamed", flag="--workers", metavar="N"))
    inner: Inner = field(default_factory=Inner)


def demo_parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo", formatter_class=DefaultsFormatter)
    add_dataclass_arguments(p, Demo, **kw)
    add_dataclass_arguments(p, Inner, group="inner")
    return p


def test_defaults_round_trip():
    assert from_args(Demo, demo_parser().parse_args([])) == Demo()


@pytest.mark.parametrize("argv, expect", [
    (["--count", "7"], {"count": 7}),
    (["--rate", "1e-3"], {"rate": 1e-3}),
    (["--name", "y z"], {"name": "y z"}),
    (["--no-on"], {"on": False}),
    (["--off"], {"off": True}),
    (["--mode", "c"], {"mode": "c"}),
    (["--limit", "12"], {"limit": 12}),
    (["--ratio", "0.25"], {"ratio": 0.25}),
    (["--sizes", "3", "4", "5"], {"sizes": (3, 4, 5)}),
    (["--sizes"], {"sizes": ()}),
    (["--words", "a", "--words", "b c"], {"words": ("a", "b c")}),
    (["--batches", "2,4,64"], {"batches": (2, 4, 64)}),
    (["--gap-ms", "2.5"], {"gap_s": 0.0025}),
    (["--workers", "3"], {"threads": 3}),
    (["--depth", "9"], {"inner": Inner(9)}),
])
def test_each_flag_parses_into_its_field(argv, expect):
    args = demo_parser().parse_args(argv)
    assert from_args(Demo, args) == dataclasses.replace(Demo(), **expect)


@pytest.mark.parametrize("argv, flag", [(["--mode", "z"], "--mode"), (["--count", "x"], "--count"),
                                        (["--limit", "1.5"], "--limit"), (["--batches", "1,x"], "--batches")])
def test_a_bad_value_is_an_argparse_error_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        demo_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err


def test_suppressed_defaults_keep_the_base_and_fixed_fields_win():
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Demo, defaults=argparse.SUPPRESS)
    add_dataclass_arguments(p, Inner)
    base = Demo(count=9, mode="a", words=("w",))
    args = p.parse_args(["--rate", "2"])
    assert not hasattr(args, "count") and not hasattr(args, "words")
    assert from_args(Demo, args, base) == dataclasses.replace(base, rate=2.0)
    assert from_args(Demo, args, base, count=1).count == 1
    assert from_args(Demo, args, exclude=("inner",)).inner == Inner()


def test_defaults_from_an_instance_and_only_and_exclude():
    p = argparse.ArgumentParser()
    acts = add_dataclass_arguments(p, Demo, defaults=Demo(count=11, gap_s=0.5), only=("gap_s", "count"))
    assert list(acts) == ["gap_s", "count"] and p.parse_args([]).count == 11 and p.parse_args([]).gap_ms == 500.0
    with pytest.raises(ValueError, match="no field nope"):
        add_dataclass_arguments(argparse.ArgumentParser(), Demo, only=("count", "nope"))
    # one exclude list may name the fields of a command's other configs
    assert "count" not in add_dataclass_arguments(argparse.ArgumentParser(), Demo, exclude=("count", "other"))


def test_a_type_without_a_flag_is_refused_by_name():
    @dataclass(frozen=True)
    class Odd:
        key: bytes | None = field(default=None, metadata=h("raw bytes"))

    with pytest.raises(TypeError, match="Odd.key"):
        add_dataclass_arguments(argparse.ArgumentParser(), Odd)
    add_dataclass_arguments(argparse.ArgumentParser(), Odd, exclude=("key",))  # set another way


def test_help_shows_each_meaningful_default_once(monkeypatch):
    text = help_blocks(demo_parser())
    assert "(default: 4)" in text["--count"] and "(default: 16.0)" in text["--gap-ms"]
    assert "(default: 1,8)" in text["--batches"] and "(default: 1 2)" in text["--sizes"]
    assert "(default: True)" in text["--on"]
    for flag in ("--off", "--limit", "--ratio", "--words"):
        assert "default" not in text[flag], flag  # None, False, nothing: the help says what unset means
    assert "{a,b,c}" in text["--mode"] and "--workers N" in text["--workers"]


# -- every command: each config field has a flag, and --help shows the dataclass's default -------------

def command_parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def help_blocks(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as one line, by each of its option strings."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            current = [" ".join(line.split())]
            for piece in line.strip().split("  ")[0].split(", "):
                blocks[piece.split(" ")[0]] = current
        elif current is not None and line.startswith("      "):
            current.append(line.strip())
        else:
            current = None
    return {k: " ".join(v) for k, v in blocks.items()}


def configs() -> list[tuple[str, type, dict[str, str]]]:
    """(command, config class, its fields set by another flag -> that flag), for each command."""
    from lstmgen.evaluate import EVAL_ELSEWHERE, EvalConfig
    from lstmgen.export.config import ExportConfig
    from lstmgen.offline.cli import SAMPLE_ELSEWHERE
    from lstmgen.offline.jobs import SampleConfig
    from lstmgen.serve.cli import SERVE_ELSEWHERE
    from lstmgen.serve.engine import EngineConfig
    from lstmgen.serve.frame_stream import FrameLimits
    from lstmgen.serve.params import RequestLimits, SamplingParams
    from lstmgen.serve.scheduler import SchedulerConfig
    from lstmgen.serve.server import ServerConfig
    from lstmgen.serve.service import ServiceConfig
    from lstmgen.tools.bench.config import BenchConfig
    from lstmgen.tools.loadgen import LoadPlan
    from lstmgen.train.config import FrameTrainConfig, TrainConfig

    serving = [("serve", c, SERVE_ELSEWHERE) for c in (ServerConfig, EngineConfig, RequestLimits, SchedulerConfig,
                                                       ServiceConfig, FrameLimits)]
    return [("train", TrainConfig, {}), ("train", FrameTrainConfig, {}), *serving, ("export", ExportConfig, {}),
            ("sample", SampleConfig, SAMPLE_ELSEWHERE), ("sample", SamplingParams, SAMPLE_ELSEWHERE),
            ("eval", EvalConfig, EVAL_ELSEWHERE), ("bench", BenchConfig, {}),
            ("loadtest", LoadPlan, {"params": "--sampling-json"})]


@pytest.mark.parametrize("command, cls, elsewhere", configs(), ids=lambda v: getattr(v, "__name__", None))
def test_every_config_field_is_reachable_from_its_command(command, cls, elsewhere):
    parser = command_parser(command)
    dests = {a.dest: a for a in parser._actions}
    strings = {s for a in parser._actions for s in a.option_strings} | {a.metavar for a in parser._actions}
    missing = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            continue  # a nested config: checked as its own class
        if f.name in elsewhere:
            assert elsewhere[f.name] in strings, (f.name, elsewhere[f.name])  # the flag it is mapped to exists
            continue
        flag = flag_of(cls, f.name)
        if flag.lstrip("-").replace("-", "_") not in dests:
            missing.append(f.name)
    assert not missing, f"{cls.__name__} fields without a flag in `lstmgen {command}`: {missing}"


@pytest.mark.parametrize("command, cls, elsewhere", configs(), ids=lambda v: getattr(v, "__name__", None))
def test_help_shows_the_dataclass_defaults_once(command, cls, elsewhere, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = command_parser(command)
    blocks = help_blocks(parser)
    default = cls(bundle="b") if cls.__name__ == "ServerConfig" else cls()
    assert from_args(cls, parser.parse_args(required_args(command)), exclude=elsewhere) == default
    for f in dataclasses.fields(cls):
        if f.name in elsewhere or dataclasses.is_dataclass(getattr(default, f.name)):
            continue
        flag = flag_of(cls, f.name)
        if not flag.startswith("--"):
            continue  # positional
        action = next(a for a in parser._actions if flag in a.option_strings)
        text = blocks.get(flag, "")
        if action.help == argparse.SUPPRESS:
            continue  # a test hook
        if command == "train":  # the preset's values are the defaults: the table in the epilog shows them
            assert action.default is argparse.SUPPRESS and "(default:" not in text, flag
            continue
        value = getattr(default, f.name)
        assert text.count("(default:") <= 1, (flag, text)
        if value is None or value is False or value == ():
            assert "(default:" not in text, (flag, text)
            continue
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        assert f"(default: {shown})" in text, (flag, text)


def required_args(command: str) -> list[str]:
    return {"train": ["--out", "r"], "serve": ["b"], "export": ["ckpt", "--out", "o"],
            "sample": ["b", "--prompts", "p", "--out", "o"], "eval": ["b", "--data", "d"],
            "loadtest": ["--target", "t"]}.get(command, [])


def test_train_choices_come_from_the_literal_types():
    from lstmgen.train.config import FrameTrainConfig, RunConfig, TrainConfig

    actions = {a.dest: a for a in command_parser("train")._actions}
    for cls, names in ((RunConfig, ("task", "cell", "optimizer", "device", "amp")), (TrainConfig, ("level",)),
                       (FrameTrainConfig, ("standardize",))):
        hints = typing.get_type_hints(cls)
        for name in names:
            assert tuple(actions[name].choices) == typing.get_args(hints[name]), name


def test_spin_has_one_default():
    """The ONNX Runtime spin default is EngineConfig.spin, wherever an engine is configured: no
    other module names the serving default itself."""
    from pathlib import Path

    from lstmgen.serve.engine import EngineConfig
    from lstmgen.serve.server import ServerConfig

    assert ServerConfig(bundle="b").engine.spin == EngineConfig().spin
    assert command_parser("serve").parse_args(["b"]).spin == EngineConfig().spin
    root = Path(__file__).resolve().parents[1]
    files = [f for d in ("lstmgen", "serve", "offline", "tools", "train", "export", "clients")
             for f in (root / d).rglob("*.py")]
    named = [str(f.relative_to(root)) for f in files if f'spin="{EngineConfig().spin}"' in f.read_text()]
    assert not named


def test_a_renamed_flag_keeps_its_old_name():
    """Reading a prompt is "prefill" throughout; --prime-wait-steps, the setting's name before,
    still sets it."""
    from lstmgen.serve.scheduler import SchedulerConfig

    parser = command_parser("serve")
    for argv in (["--prefill-wait-steps", "3", "--prefill-together", "5"], ["--prime-wait-steps", "3", "--prefill-together", "5"]):
        cfg = from_args(SchedulerConfig, parser.parse_args(["b", *argv]), exclude=["state_key"])
        assert (cfg.prefill_wait_steps, cfg.prefill_together) == (3, 5)
