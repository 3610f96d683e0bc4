"""Errors that are the user's to fix (a missing file, a bad key), not bugs in qgait.

The ``qgait`` command prints such an error as one line on stderr,
``qgait <command>: error: <what, naming the file or key, and what to do>``, and exits with
status 2; ``--debug`` (or ``QGAIT_DEBUG=1``) shows the traceback instead. Any other exception
is a bug and keeps its traceback. See docs/model_files.md.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for; its message is one line naming the file or key
    and saying what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key or holds a bad value."""


class ConfigNotFoundError(UserError, FileNotFoundError):
    """A config name that is neither a packaged config nor a YAML file."""

    def __str__(self) -> str:   # FileNotFoundError would format (errno, strerror) otherwise
        return str(self.args[0]) if self.args else ""
