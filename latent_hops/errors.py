"""The one distinction the CLI makes between failures: bad input versus our own bugs.

``InputError`` (and its subclasses: ``DatasetError``, ``ModelLoadError``, ``GGUFError``,
``UnsupportedArchitecture``, ``RunDirError``) means the user can fix it: the CLI prints one
line naming the offending input and exits with code 2. Anything else is a bug in
latent_hops: the CLI prints the traceback and asks for a report (exit code 1). ``--debug``
(or ``LATENT_HOPS_DEBUG=1``) shows the traceback of input errors too. ``InputError`` is a
``ValueError``, so library callers may keep catching ``ValueError``.

Every input error carries a ``code`` (``"dataset"``, ``"model"``, ``"run-dir"``, ...): what
callers and tests match on, never the wording of the message.
"""

from __future__ import annotations

EXIT_INPUT_ERROR = 2
"""Exit status of a command that failed on its input (1 is an internal error)."""


class InputError(ValueError):
    """Bad input (a dataset, a model, a flag, a config file, a run directory), in words."""

    code: str = "input"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class RunDirError(InputError):
    """A run directory that cannot be used: not writable, made by an older latent_hops, or
    holding results made differently."""

    code = "run-dir"
