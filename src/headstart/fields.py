"""Config fields declared once: :func:`setting` (default, help, flag, accepted values), the list of
them (:func:`settings`), and converting and checking plain data against them (:func:`from_dict`,
:func:`validate`). :mod:`headstart.config` declares the run's tree with these.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from headstart.errors import HeadstartError


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = "",  # noqa: A002
            factory: Any = dataclasses.MISSING, choices: tuple[str, ...] = (), shown: str = "",
            at_least: float | None = None, above: float | None = None, at_most: float | None = None,
            below: float | None = None, on_resume: bool = False) -> Any:
    """A config field with everything the CLI, the YAML schema and :func:`validate` need.

    ``flag``: the command-line flag; ``""`` derives it from the field name (``batch_size`` ->
    ``--batch-size``; a boolean that defaults to true gets ``--no-...``); None gives no flag (the
    YAML key and ``--set`` still work). ``choices``: the words a text value may take (for a
    ``float | str`` field, the words allowed besides numbers, e.g. ``auto``). ``shown``: the
    default as ``--help`` words it (needed when the default is None). The bounds apply to numbers
    and to each number of a list or mapping; numbers must also be finite. ``on_resume``: may be
    changed when a run resumes.
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices), "shown": shown, "on_resume": on_resume,
            "bounds": (at_least, above, at_most, below)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One leaf field of a config tree, as :func:`settings` lists it."""

    key: str  # dotted path: train.lr
    type: Any  # the resolved type hint
    default: Any
    help: str
    flag: str | None
    choices: tuple[str, ...]
    shown: str  # the default in words
    on_resume: bool


@functools.cache  # the parser asks once per command that takes config flags
def settings(cls: type, prefix: str = "") -> tuple[Setting, ...]:
    """Every leaf field of the config tree ``cls``, depth first, in declaration order."""
    out: list[Setting] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += settings(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        m = f.metadata
        if "help" not in m:
            raise TypeError(f"config field {prefix}{f.name} has no help: declare it with setting(..., help=...)")
        out.append(Setting(f"{prefix}{f.name}", hints[f.name], default, m["help"], _flag(f, default),
                           m["choices"], m["shown"] or _shown(default), m["on_resume"]))
    return tuple(out)


def _flag(f: dataclasses.Field, default: Any) -> str | None:
    flag = f.metadata.get("flag")
    if flag != "":
        return flag
    return ("--no-" if default is True else "--") + f.name.replace("_", "-")


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, list | dict):
        return ",".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


# --------------------------------------------------------------------------- conversions


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain Python data (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking names, types and values as it goes."""
    data = data or {}
    if not isinstance(data, dict):
        raise HeadstartError(f"config{' ' + where.rstrip('.') if where else ''}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise HeadstartError(
            f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
            f"known keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(hints[k], v, f"{where}{k}")
        if fields[k].metadata:
            _check(fields[k], hints[k], kwargs[k], f"{where}{k}")
    return cls(**kwargs)


def validate(cfg: Any) -> Any:
    """Check a whole config tree (types, words and bounds) and return it converted, as loading does.

    The YAML file, the flags and ``--set`` are checked as they are read; a tree built or changed in
    Python is checked here. Example: ``cfg.train.lr = -1; validate(cfg)`` raises HeadstartError
    naming ``train.lr``.
    """
    return from_dict(type(cfg), to_dict(cfg))


def _check(f: dataclasses.Field, tp: Any, value: Any, key: str) -> None:
    """Raise a one-line HeadstartError when ``value`` is outside what field ``f`` declares."""
    flag = _flag(f, f.default)
    name = f"config {key}" + (f" ({flag})" if flag else "")
    choices = f.metadata.get("choices", ())
    bounds = f.metadata.get("bounds", (None,) * 4)
    has_default = f.default is not dataclasses.MISSING
    default = f" (default {f.metadata.get('shown') or _shown(f.default)})" if has_default else ""
    items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]
    for v in items:
        if isinstance(v, str) and choices and v not in choices:
            kinds = set(typing.get_args(tp))
            numbers = "a number or " if float in kinds else "a whole number or " if int in kinds else ""
            raise HeadstartError(f"{name} is {v!r}: give {numbers}one of: {', '.join(choices)}{default}")
        if isinstance(v, int | float) and not isinstance(v, bool) and not _in_bounds(v, *bounds):
            what = "" if math.isfinite(v) else ", not a finite number"
            want = f"that is {_bounds_text(*bounds) or 'finite'}"
            raise HeadstartError(f"{name} is {v!r}{what}: give a number {want}{default}")


def _in_bounds(v: float, at_least: float | None, above: float | None, at_most: float | None,
               below: float | None) -> bool:
    return (math.isfinite(v) and (at_least is None or v >= at_least) and (above is None or v > above)
            and (at_most is None or v <= at_most) and (below is None or v < below))


def _bounds_text(at_least: float | None, above: float | None, at_most: float | None, below: float | None) -> str:
    words = (("{:g} or more", at_least), ("above {:g}", above), ("{:g} or less", at_most), ("below {:g}", below))
    return " and ".join(w.format(b) for w, b in words if b is not None)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for tp_ in (a for a in args if a is not type(None)):  # the first type that takes the value wins
            if tp_ is str and errors and _numeric_text(value):
                break  # "2.5" for int | str: the number's complaint ("a whole number") is the useful one
            try:
                return _coerce(tp_, value, where)
            except HeadstartError as e:
                errors.append(e)
        raise errors[0]  # the first type's complaint: for float | str, "expected a number"
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise HeadstartError(f"config {where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):  # "a=1,b=2" from the command line
            pairs = [kv.split("=", 1) for kv in value.split(",") if kv.strip()]
            if any(len(p) != 2 for p in pairs):
                raise HeadstartError(f"config {where}: expected name=value pairs (head=2,layer4=0.5), got {value!r}")
            value = dict(pairs)
        if not isinstance(value, dict):
            raise HeadstartError(f"config {where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise HeadstartError(f"config {where}: expected true or false, got {value!r}")
    if tp in (int, float):
        return _number(tp, value, where)
    if tp is str:
        if isinstance(value, dict | list | bool):  # YAML reads yes/no/on/off as booleans
            quote = "; quote it in YAML ('no')" if isinstance(value, bool) else ""
            raise HeadstartError(f"config {where}: expected text, got {value!r}{quote}")
        return str(value)
    return value


def _numeric_text(value: Any) -> bool:
    try:
        float(value)
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def _number(tp: type, value: Any, where: str) -> int | float:
    """``value`` as an int or float; booleans are refused (YAML's ``epochs: true`` is no count)."""
    word = "a whole number" if tp is int else "a number"
    hint = " (YAML reads true/false/yes/no/on/off as booleans)" if isinstance(value, bool) else ""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, numbers.Real):  # numpy's numbers included
            raise TypeError
        if tp is int:
            if not isinstance(number, numbers.Integral) and not float(number).is_integer():
                raise ValueError
            return int(number)
        return float(number)
    except (TypeError, ValueError, OverflowError):
        raise HeadstartError(f"config {where}: expected {word}, got {value!r}{hint}") from None
