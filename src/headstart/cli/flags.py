"""Command-line flags generated from the config's declarations, and the config they resolve to.

Every field of :class:`~headstart.config.RunConfig` declared with ``setting(help=...)`` becomes a
flag here (its name, kind and help come from the declaration), so a new field needs no edit in
the CLI. A flag's ``dest`` is the field's dotted key (``train.lr``) and its argparse default is
None, which tells "not given" from "given the default".
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Collection
from typing import Any

from headstart.config import RunConfig, Setting, apply_overrides, load_yaml, settings
from headstart.errors import HeadstartError


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with each option's default appended where it means something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "(default" in text or d is None or d is False or d == [] or d == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (ours and those other layers add) show their defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        # One line, like every other user error: the usage of `train` alone is 30 lines of flags.
        print(f"{self.prog}: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def yes_no_auto(value: str) -> bool | None:
    v = value.strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    if v == "auto":
        return None
    raise argparse.ArgumentTypeError(f"expected yes, no or auto, got {value!r}")


def number_or(words: Collection[str], kind: type = float) -> Callable[[str], float | str]:
    """An argparse type taking a number (a ``kind``) or one of ``words`` (``--lr 0.01``, ``--epochs auto``)."""

    def parse(value: str) -> float | str:
        if value in words:
            return value
        try:
            return kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} or {' or '.join(words)}, got {value!r}") from None

    parse.__name__ = f"number or {'/'.join(words)}"
    return parse


def flag_options(s: Setting) -> dict[str, Any]:
    """The argparse options of the flag of setting ``s``, from its type and default."""
    union = typing.get_origin(s.type) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(s.type) if a is not type(None)] if union else [s.type]
    base = args[0] if len(args) == 1 else s.type
    metavar = s.key.rsplit(".", 1)[-1].upper()
    if base is bool:
        if type(None) in typing.get_args(s.type):
            return {"type": yes_no_auto, "metavar": "yes|no|auto"}
        return {"action": "store_const", "const": not s.default}
    if base in (int, float):
        return {"type": base, "metavar": "N" if base is int else "X"}
    if set(args) in ({float, str}, {int, str}):
        kind = int if int in args else float
        return {"type": number_or(s.choices, kind), "metavar": "|".join(["N" if kind is int else "X", *s.choices])}
    if base is str and s.choices:
        return {"choices": list(s.choices)}
    return {"metavar": metavar}  # text, and lists/mappings written as "a,b" / "k=v,k=v" (config parses them)


def flag_help(s: Setting) -> str:
    if isinstance(s.default, bool) and type(None) not in typing.get_args(s.type):  # a plain on/off flag
        text = f"{s.help}: on unless this flag is given" if s.default else f"{s.help} (off unless given)"
    else:
        text = f"{s.help} (default: {s.shown})"
    return f"{text} [{s.key}]".replace("%", "%%")


def add_config_flags(p: argparse.ArgumentParser, skip: Collection[str] = (), cls: type = RunConfig) -> None:
    """One flag per setting of config class ``cls`` that has a flag, grouped by config section.

    ``skip`` names the keys (``model.name``) a command takes otherwise or not at all.
    """
    groups: dict[str, Any] = {}  # section -> its argument group
    for s in settings(cls):
        if s.flag is None or s.key in skip:
            continue
        section = s.key.split(".")[0] if "." in s.key else "run"
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} config (each flag sets the key in brackets)")
        groups[section].add_argument(s.flag, dest=s.key, default=None, help=flag_help(s), **flag_options(s))
    p.set_defaults(config_class=cls)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given as flags, with their values."""
    cls = getattr(args, "config_class", RunConfig)
    return {s.key: getattr(args, s.key) for s in settings(cls) if getattr(args, s.key, None) is not None}


def set_overrides(items: list[str] | None) -> dict[str, str]:
    """``--set key=value`` items as a mapping (values stay text; the config converts them)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise HeadstartError(f"--set expects KEY=VALUE (train.lr=0.01), got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def resolve_config(args: argparse.Namespace) -> Any:
    """The run config: defaults, then ``--config``, then flags, then ``--set`` overrides, checked.

    Every value is checked here (types, words, bounds), before any command creates a file.
    """
    cls = getattr(args, "config_class", RunConfig)
    cfg = load_yaml(args.config, cls) if getattr(args, "config", None) else cls()
    return apply_overrides(cfg, given(args) | set_overrides(getattr(args, "set", None)))


def resumable_flags(cls: type = RunConfig) -> list[str]:
    """The flags that may change when a run resumes (declared with ``on_resume=True``)."""
    return [s.flag for s in settings(cls) if s.on_resume and s.flag]
