"""Start-up of the listing commands and --help against a bare ``import torch``, in one run.

    python benchmarks/startup.py [REPEATS]

Each command runs REPEATS times (default 7), interleaved round-robin so load changes hit all of
them alike; prints the median wall time of each and its excess over ``import torch``.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "reuse strategies": [sys.executable, "-m", "reuse_core", "strategies"],
    "reuse backbones": [sys.executable, "-m", "reuse_core", "backbones"],
    "reuse datasets": [sys.executable, "-m", "reuse_core", "datasets"],
    "reuse run pretrain --help": [sys.executable, "-m", "reuse_core", "run", "pretrain", "--help"],
}


def main(repeats: int = 7) -> None:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times['python -c "import torch"'])
    print(f"{'command':<28} {'median s':>9} {'- import torch':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28} {med:>9.2f} {med - base:>+15.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
