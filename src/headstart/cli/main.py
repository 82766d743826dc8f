"""The ``headstart`` command line: ``build_parser()``, ``main(argv) -> int``, ``entrypoint()``.

Every training flag is a field of :class:`~headstart.config.RunConfig`, generated from its
declaration (:mod:`headstart.cli.flags`), so the CLI and the Python API share one config:
``--config run.yaml`` sets it, flags override it, and ``--set key=value`` reaches any field.
User mistakes exit with status 2 and a one-line message (a traceback only with ``--debug``).

Each command lives in a module of this package as two functions, ``add_X_parser(subparsers)``
and ``run_X(args) -> int``. Those modules import nothing heavy at the top (torch, the models,
the data): ``headstart --help`` must answer in well under a second, so the work is imported
inside ``run_X``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from headstart.cli import cache, evaluate, models, train
from headstart.cli.flags import Parser, resolve_config
from headstart.deploy import commands as deploy_commands
from headstart.deploy import serve_cli
from headstart.errors import HeadstartError
from headstart.version import __version__

__all__ = ["COMMANDS", "build_parser", "entrypoint", "main", "resolve_config"]

# (name, add_X_parser(subparsers) -> parser, run_X(args) -> exit status)
Command = tuple[str, Callable[[Any], argparse.ArgumentParser], Callable[[argparse.Namespace], int]]

# The commands, in the order `headstart --help` lists them.
# To add a command: write add_X_parser(subparsers) -> parser and run_X(args) -> int in a module of
# this package (or of the layer that owns the work), keep its top-level imports light, and add
# one line here.
COMMANDS: list[Command] = [
    ("models", models.add_models_parser, models.run_models),
    ("inspect", models.add_inspect_parser, models.run_inspect),
    ("train", train.add_train_parser, train.run_train),
    ("eval", evaluate.add_eval_parser, evaluate.run_eval),
    ("predict", evaluate.add_predict_parser, evaluate.run_predict),
    ("weights", models.add_weights_parser, models.run_weights),
    ("lr-find", train.add_lr_find_parser, train.run_lr_find),
    ("report", evaluate.add_report_parser, evaluate.run_report),
    ("cache", cache.add_cache_parser, cache.run_cache),
    # Commands defined beside what they run, in the layer that owns the work:
    ("export", deploy_commands.add_export_parser, deploy_commands.run_export),
    ("serve", serve_cli.add_serve_parser, serve_cli.run_serve),
]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="headstart", description="Transfer learning of image classifiers on PyTorch.")
    p.add_argument("--version", action="version", version=f"headstart {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for _, add_parser, _ in COMMANDS:
        add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s",
                        force=True)
    if args.command is None:  # `headstart` alone: the embedded demo
        args = parser.parse_args(["train", *(argv or [])])
    run = {name: run for name, _, run in COMMANDS}[args.command]
    try:
        return run(args)
    except HeadstartError as e:
        if args.debug:
            raise
        print(f"headstart: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\nheadstart: interrupted; `headstart train --resume RUN_DIR` continues a run", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())
