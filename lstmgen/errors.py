"""The one base class of failures a user can act on, so every entry point handles them alike.

The `lstmgen` command prints a UserError as one line and exits 2; the gRPC edge maps request
errors (serve/errors.py, subclasses of this) to statuses through the class hierarchy. Any other
exception is a bug in lstmgen and keeps its traceback: a blanket `except ValueError` would hide it.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input, file, flag or environment; the message names it and says what is wrong."""


class UsageError(UserError, ValueError):
    """A flag, setting or input file the command cannot use as given. Also a ValueError, so code
    that called these functions before the base class existed still catches it."""
