"""The ``headstart`` command line: ``main(argv) -> int`` (tested in-process) and ``entrypoint()``."""

from headstart.cli.main import build_parser, entrypoint, main

__all__ = ["build_parser", "entrypoint", "main"]
