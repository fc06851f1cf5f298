"""Runs ``reuse ARGS...`` and SIGKILLs itself right after the Nth model reaches the store (N from
$KILL_AFTER_SAVES): the store's directory rename has happened, nothing after it has."""
import os
import signal
import sys

from reuse_core.cli import main
from reuse_core.store import ModelStore

_write, _left = ModelStore._write, int(os.environ["KILL_AFTER_SAVES"])


def write_then_die(self, *args, **kwargs):
    global _left
    record = _write(self, *args, **kwargs)
    _left -= 1
    if _left == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return record


ModelStore._write = write_then_die
sys.exit(main(sys.argv[1:]))
