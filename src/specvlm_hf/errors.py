"""Errors that mean "the user asked for something we cannot do", as opposed to bugs.

The `specvlm` command line prints a `UserError` as one actionable line and exits with status 2; any other exception is
a bug and keeps its traceback. Library code raises a subclass of a standard exception (`ValueError`,
`FileNotFoundError`, ...) so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input (a bad file, flag, model, or a missing optional extra)."""


class UserValueError(UserError, ValueError):
    """A bad value: an unknown method, a malformed prompts file, an unusable draft."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A path the user named does not exist."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the `pip install` that adds it."""

    def __init__(self, module: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the optional package {module!r}, which is not installed: "
            f"pip install 'specvlm-hf[{extra}]' (from a clone: pip install -e '.[{extra}]')"
        )
        self.module, self.extra, self.feature = module, extra, feature


def require_extra(module: str, extra: str, feature: str) -> None:
    """Imports `module` or raises [`MissingExtraError`] with the install hint for `extra`."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(module, extra, feature) from error
