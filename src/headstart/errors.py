"""User-facing errors.

Anything a user can cause by bad input (an unknown model, a missing file, an empty data folder)
raises :class:`HeadstartError`. The CLI prints its message and exits with status 2, without a
traceback unless ``--debug`` is given; Python callers get an ordinary exception to catch.
"""

from __future__ import annotations


class HeadstartError(Exception):
    """An error caused by the user's input, with a message that says what to do next."""


class OfflineError(HeadstartError):
    """Something had to be downloaded and the network could not be reached."""
