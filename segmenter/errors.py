"""Error types that the CLI maps to exit codes."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a missing or corrupt file, a geometry mismatch, an unknown config key.

    The message is one line that names the file (or key) and the problem. The CLI prints it
    without a traceback and exits with code 2.
    """
