"""A frozen config dataclass onto argparse flags and back, so that each setting has one default: the
dataclass's. Every command that builds a config dataclass uses it (train, serve, export, sample,
eval, bench). Torch-free.

    @dataclass(frozen=True)
    class EngineConfig:
        intra_op_threads: int = option(0, "ONNX Runtime intra-op threads (0: its default)", flag="--threads")

    add_dataclass_arguments(parser, EngineConfig, group="ONNX Runtime")   # --threads, default 0 shown once
    cfg = from_args(EngineConfig, parser.parse_args())                    # EngineConfig(intra_op_threads=...)

A field becomes `--field-name` (a field without a default: a positional argument), typed from its
real annotation (`typing.get_type_hints`, so `int | None` works under `from __future__ import
annotations`): int, float, str; bool -> `--x/--no-x`; `Literal[...]` -> choices; `X | None` -> an
optional X whose default None means unset; `tuple[X, ...]` or `list[X]` -> several values. A field
holding another config dataclass gets no flag: add that class with its own call (its own help
group); `from_args` fills it from the same namespace, so field names are unique within a command.

The field's `metadata` (`option(default, help, **metadata)` writes it) says how it looks on the
command line:

    help     the help text, required
    hidden   True: the flag works but --help does not show it (a test hook)
    flag     its public name where that differs from --field-name ("--threads" for intra_op_threads);
             the namespace attribute follows the flag (args.threads)
    aliases  older names the flag still answers to (a renamed setting keeps its users' command lines)
    scale    flag value = field value x scale: "--min-message-interval-ms" with scale 1000 fills a
             field in seconds, and shows its default in milliseconds
    metavar, choices    as argparse's (choices for a field typed str)
    append   a tuple field as a repeatable flag (--stop A --stop B) instead of one taking several values
    sep      a tuple field as one comma-separated value ("--batches 1,8,64")

DefaultsFormatter shows each default once, and none where it is None or False (the help says what
unset means).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, Literal, Mapping, Union

SUPPRESS = argparse.SUPPRESS


def option(default: Any = dataclasses.MISSING, help: str | None = None, **metadata: Any) -> Any:
    """A dataclass field with its flag's metadata: `x: int = option(4, "what x does", metavar="N")`."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class _Flag:
    """How one field appears on the command line."""

    field: dataclasses.Field
    name: str  # "--field-name", or the field's positional name
    dest: str  # the namespace attribute
    kind: type  # the scalar type: int, float, str or bool
    choices: tuple | None
    many: type | None  # tuple or list: the field holds several values
    how: str  # "one", "nargs", "append" or "sep"
    scale: float | None

    @property
    def positional(self) -> bool:
        return not self.name.startswith("-")

    def to_flag(self, value):
        """A field value as the flag shows and parses it."""
        if value is None or value is dataclasses.MISSING:
            return None
        if self.how == "sep":
            return self.field.metadata.get("sep", ",").join(map(str, value))
        if self.many is not None:
            return list(value)
        if not self.scale:
            return value
        # 0.016 s x 1000 is 16.000000000000004 in binary floating point: show the 16 people write
        return float(f"{value * self.scale:.12g}")

    def to_field(self, value):
        """A parsed flag value as the field holds it."""
        if value is None:
            return None
        if self.many is not None:
            return self.many(value)
        return value / self.scale if self.scale else value


def _flags(cls, exclude: Iterable[str] = ()) -> list[_Flag]:
    """The flags of `cls`'s fields but `exclude`, nested config dataclasses left out."""
    hints = typing.get_type_hints(cls)
    return [_flag_of(cls, f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.name not in exclude and not dataclasses.is_dataclass(hints[f.name])]


def _flag_of(cls, f: dataclasses.Field, hint) -> _Flag:
    meta, where = f.metadata, f"{cls.__name__}.{f.name}"
    if typing.get_origin(hint) in (Union, types.UnionType):  # X | None: an optional X, None = unset
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) != 1 or len(rest) == len(typing.get_args(hint)):
            raise TypeError(f"{where}: no flag for the type {hint}")
        hint = rest[0]
    many, how = typing.get_origin(hint), "one"
    if many in (tuple, list):
        items = typing.get_args(hint)
        if many is tuple and (len(items) != 2 or items[1] is not Ellipsis):
            raise TypeError(f"{where}: only tuple[X, ...] takes a flag, not {hint}")
        hint, how = items[0], "append" if meta.get("append") else "sep" if "sep" in meta else "nargs"
    else:
        many = None
    choices = meta.get("choices")
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        hint = type(choices[0])
    if hint not in (int, float, str, bool) or (hint is bool and many):
        raise TypeError(f"{where}: no flag for the type {hint}")
    name = meta.get("flag") or ("--" + f.name.replace("_", "-") if _default_of(f) is not dataclasses.MISSING
                                else f.name)
    return _Flag(f, name, name.lstrip("-").replace("-", "_"), hint, tuple(choices) if choices else None,
                 many, how, meta.get("scale"))


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _selected(cls, only: Iterable[str] | None, exclude: Iterable[str]) -> list[_Flag]:
    names = [f.name for f in dataclasses.fields(cls)]
    if only is None:
        return _flags(cls, exclude)
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(unknown)}")
    flags = {fl.field.name: fl for fl in _flags(cls, exclude={*exclude, *(set(names) - set(only))})}
    return [flags[n] for n in only if n in flags]


def add_dataclass_arguments(parser, cls, *, defaults: Any = None, only: Iterable[str] | None = None,
                            exclude: Iterable[str] = (), helps: Mapping[str, str] | None = None,
                            group: str | None = None, description: str | None = None) -> dict[str, argparse.Action]:
    """One flag per field of the dataclass `cls`, in field order. `only`: these fields, in this
    order. `exclude`: not these, the command sets them another way (other classes' field names are
    ignored, so that one exclude list serves a command's several configs). `defaults`: None, the
    dataclass's own; an instance of `cls` (a preset), its values; argparse.SUPPRESS, none at all:
    an absent flag leaves no attribute, so `from_args` keeps a base config's value. `helps`
    overrides a field's help text for this command. `group`: the flags go into a new help group of
    this title. Returns the actions by field name."""
    container = parser.add_argument_group(group, description) if group else parser
    actions = {}
    for fl in _selected(cls, only, exclude):
        meta, help_ = fl.field.metadata, (helps or {}).get(fl.field.name, fl.field.metadata.get("help"))
        if help_ is None:
            raise ValueError(f"{cls.__name__}.{fl.field.name} has no help (metadata={{'help': ...}})")
        if defaults is SUPPRESS:
            default = SUPPRESS
        else:
            value = getattr(defaults, fl.field.name) if defaults is not None else _default_of(fl.field)
            default = None if value is dataclasses.MISSING else fl.to_flag(value)
        kw: dict[str, Any] = {"help": SUPPRESS if meta.get("hidden") else help_}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if fl.positional:
            actions[fl.field.name] = container.add_argument(fl.name, type=fl.kind, **kw)
            continue
        kw |= {"dest": fl.dest, "default": default}
        if fl.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _item_parser(fl) if fl.how == "sep" else fl.kind
            if fl.choices and fl.how != "sep":
                kw["choices"] = fl.choices
            if fl.how == "nargs":
                kw["nargs"] = "*"
            elif fl.how == "append":
                # argparse appends to a given default list; None here, and an absent flag keeps the field's
                kw["action"], kw["default"] = "append", SUPPRESS if default is SUPPRESS else None
        aliases = meta.get("aliases", ())
        actions[fl.field.name] = container.add_argument(fl.name, *((aliases,) if isinstance(aliases, str) else aliases),
                                                        **kw)
    return actions


def _item_parser(fl: _Flag):
    """A comma-separated flag value -> the tuple of typed items (choices checked per item)."""
    sep = fl.field.metadata.get("sep", ",")

    def parse(text: str) -> tuple:
        items = tuple(fl.kind(x.strip()) for x in text.split(sep) if x.strip())
        bad = [x for x in items if fl.choices and x not in fl.choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected {sep}-separated " + (f"values of {', '.join(map(str, fl.choices))}"
                                                           if fl.choices else f"{fl.kind.__name__} values"))
        return items

    parse.__name__ = fl.kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def given(cls, namespace: argparse.Namespace, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of `cls` (not nested configs) that `namespace` holds, as the fields hold them."""
    out = {}
    for fl in _flags(cls, exclude):
        if not hasattr(namespace, fl.dest):
            continue
        value = getattr(namespace, fl.dest)
        if fl.how == "append" and value is None:
            continue  # not given: the field's default stands
        out[fl.field.name] = fl.to_field(value)
    return out


def from_args(cls, namespace: argparse.Namespace, base: Any = None, *, exclude: Iterable[str] = (), **fixed):
    """The frozen `cls` built back from parsed flags: `base` (default: the dataclass's defaults)
    with the fields the namespace holds; nested config fields are built the same way from the same
    namespace (`exclude` applies at every level). `fixed`: fields the command sets itself."""
    exclude = set(exclude)
    values = given(cls, namespace, exclude=exclude)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in fixed and f.name not in exclude and dataclasses.is_dataclass(hints[f.name]):
            inner = getattr(base, f.name) if base is not None else None
            values[f.name] = from_args(hints[f.name], namespace, inner, exclude=exclude)
    values |= fixed
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def flag_of(cls, name: str) -> str:
    """The public flag (or positional name) of field `name` of `cls`."""
    (flag,) = _selected(cls, [name], ())
    return flag.name


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """"(default: X)" once per flag, and only where X says something: not None (unset, which the help
    explains), False, an empty value or SUPPRESS."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d, help_ = action.default, action.help or ""
        if d is None or d is False or d is SUPPRESS or (isinstance(d, (tuple, list, str)) and not d):
            return help_.replace(" (default: %(default)s)", "")  # Python 3.10's BooleanOptionalAction adds it
        if isinstance(d, (tuple, list)):
            return f"{help_} (default: {' '.join(map(str, d))})"
        return super()._get_help_string(action)
