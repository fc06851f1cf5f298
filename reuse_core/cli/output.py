"""What every verb prints the same way: tables, warnings, and errors.

A user error is one line on stderr, ``reuse: error: <message>``, where the message names the option
or file and what was expected; the exit status is 2 for bad usage and 1 for a failure at run time.
:func:`main <reuse_core.cli.main>` turns any exception a verb raises into such a line
(:func:`describe`); ``REUSE_CORE_DEBUG=1`` lets it through with its traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

DEBUG_ENV = "REUSE_CORE_DEBUG"


def table(rows: list[list[str]]) -> str:
    """``rows[0]`` is the header; columns are padded to their widest cell, the last one not at all."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows)


def fail(message: str, status: int = 2) -> int:
    """Print ``reuse: error: <message>`` to stderr, a line per problem when ``message`` lists several
    (one per line), and return ``status`` (2: bad usage, 1: failed at run time)."""
    for line in str(message).splitlines() or [""]:
        if line.strip():
            print(f"reuse: error: {line.strip()}", file=sys.stderr)
    return status


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one ``reuse: error:`` line too (status 2); the
    parsers it makes for sub-commands are of this class as well."""

    def error(self, message: str):
        self.exit(2, f"reuse: error: {self.prog}: {message} (`{self.prog} --help` lists the options)\n")


def warn(message: str) -> None:
    print(f"reuse: warning: {message}", file=sys.stderr)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(error: Exception) -> tuple[str, int]:
    """(the one-line message, the exit status) for an exception a verb raised: the toolkit's own
    errors and ValueError (bad values) read as they are; anything else is named as an internal error."""
    from reuse_core.plugins import PluginError, PluginHookError
    from reuse_core.recipe import RecipeError
    from reuse_core.registry import RegistryError
    from reuse_core.run import RunError
    from reuse_core.store import StoreError
    from reuse_core.strategy import OptionError

    if isinstance(error, (OptionError, RecipeError, RegistryError)):
        return str(error), 2
    if isinstance(error, (StoreError, RunError, PluginError, PluginHookError, ValueError, OSError)):
        return str(error) or type(error).__name__, 1
    return (f"{type(error).__name__}: {error} (an internal error; {DEBUG_ENV}=1 shows the traceback, which a bug "
            "report should include)"), 1
