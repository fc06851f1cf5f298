"""The merge section of ``reuse demo`` alone: recipes/digits-merge.toml for seeds 0..N-1 (one
parent fine-tuned to digits 0-4 and to 5-9, merged by linear averaging, task arithmetic and TIES
with stacked heads, against the ensemble of the two and joint training), then the int8 export of
the model best on validation.

    python benchmarks/merge_specialists.py [SEEDS] [OUT]

Prints the per-seed test accuracies, the table and the goals (gain over linear, gap to the
ensemble and to joint training, int8 size ratio and accuracy change); the run directory (default
runs/merge-<timestamp>) holds report.md and metrics.json.
"""
from __future__ import annotations

import sys

from reuse_core import demo
from reuse_core.run import new_run_dir


def main(seeds: int = 3, out: str | None = None) -> None:
    section = next(s for s in demo.SECTIONS if s.key == "merge")
    report = demo.run(seeds=seeds, sections=[section], out=out or new_run_dir("merge"))
    print(report.table)
    print(f"\nreport and metrics: {report.run_dir}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, sys.argv[2] if len(sys.argv) > 2 else None)
