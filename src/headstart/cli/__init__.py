"""The ``headstart`` command line: ``main(argv) -> int`` (tested in-process), ``build_parser()``, ``entrypoint()``.

Layout: :mod:`~headstart.cli.main` builds the parser from the command table ``COMMANDS`` and runs
a command; :mod:`~headstart.cli.flags` generates the config flags from the config's declarations;
one module per group of commands (``models``, ``train``, ``evaluate``, ``cache``) holds each
command's ``add_X_parser`` and ``run_X``. A new command is a line in ``main.COMMANDS``.
"""

from headstart.cli.main import build_parser, entrypoint, main

__all__ = ["build_parser", "entrypoint", "main"]
