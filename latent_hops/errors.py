"""The one distinction the CLI makes between failures: bad input versus our own bugs.

``InputError`` (and its subclasses: ``DatasetError``, ``ModelLoadError``, ``GGUFError``,
``UnsupportedArchitecture``) means the user can fix it: the CLI prints one line naming the
offending input and exits with code 2. Anything else is a bug in latent_hops: the CLI
prints the traceback and asks for a report (exit code 1). ``--debug`` (or
``LATENT_HOPS_DEBUG=1``) shows the traceback of input errors too. ``InputError`` is a
``ValueError``, so library callers may keep catching ``ValueError``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (a dataset, a model, a flag, a config file, a run directory), in words."""
