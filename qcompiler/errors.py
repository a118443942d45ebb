"""One error type for everything a user can get wrong.

The CLI turns a `QCError` into one line on stderr and exit code 2; anything else is a bug
in qcompiler and keeps its traceback.
"""
from __future__ import annotations


class QCError(Exception):
    """A problem with the user's input: model file, calibration data, options, paths."""

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None):
        where = ", ".join(p for p in (f"node '{node}'" if node else "", f"op '{op}'" if op else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.node = node
        self.op = op


class UnsupportedOpError(QCError):
    """The model uses an operator qcompiler cannot represent."""


class PassError(QCError):
    """A pass failed; the message names the pass and the passes that ran before it."""
