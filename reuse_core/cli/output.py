"""What every verb prints the same way: tables, and a one-line error with an exit status."""
from __future__ import annotations

import sys


def table(rows: list[list[str]]) -> str:
    """``rows[0]`` is the header; columns are padded to their widest cell, the last one not at all."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows)


def fail(prog: str, message: str, status: int = 2) -> int:
    """Print ``<prog>: <message>`` to stderr and return ``status`` (2: bad usage, 1: failed at run time)."""
    print(f"{prog}: {message}", file=sys.stderr)
    return status
