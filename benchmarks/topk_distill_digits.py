"""The top-k teacher cache against the dense one on the embedded digits, run as a user runs them:

    python benchmarks/topk_distill_digits.py                  # seeds 0 1 2, top-3, test accuracy
    python benchmarks/topk_distill_digits.py --topk 1 --seeds 0 1 2 3 4

Per seed, in a fresh store: ``pretrain`` a small-cnn teacher on all ten digits (its defaults), then
``distill`` it into an MLP (hidden=[64], the strategy's defaults otherwise) twice, once from the
dense logits cache and once with ``--teacher-topk K``. Printed per seed and as means: the two
students' test accuracy, their difference, and the top-k cache's size ratio to the dense cache.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import reuse_core
from reuse_core.store import ModelStore

MLP = {"student_backbone": "mlp", "student_backbone_config": ["hidden=[64]"]}


def trial(seed: int, topk: int, root: Path) -> dict:
    store = ModelStore(root / "store")

    def run(strategy: str, step: str, **options):
        return reuse_core.run(strategy, store=store, run_dir=root / step, quiet=True, seed=seed, **options)

    teacher = run("pretrain", "teacher", backbone="small-cnn")
    dense = run("distill", "dense", teacher=teacher.model, **MLP)
    sparse = run("distill", "topk", teacher=teacher.model, teacher_topk=topk, **MLP)
    return {"seed": seed, "teacher": teacher.metrics["test_accuracy"], "dense": dense.metrics["test_accuracy"],
            "topk": sparse.metrics["test_accuracy"], "ratio": sparse.metrics["teacher_cache"]["ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--topk", type=int, default=3, help="K of the sparse cache (default: 3)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = []
    print(f"{'seed':>4}  {'teacher':>7}  {'dense':>6}  {'top-' + str(args.topk):>6}  {'diff':>6}  cache ratio")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            r = trial(seed, args.topk, Path(tmp))
        rows.append(r)
        print(f"{seed:>4}  {r['teacher'] * 100:7.2f}  {r['dense'] * 100:6.2f}  {r['topk'] * 100:6.2f}  "
              f"{(r['topk'] - r['dense']) * 100:+6.2f}  {r['ratio']:.1%}")

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows) * 100

    print(f"mean  {mean('teacher'):7.2f}  {mean('dense'):6.2f}  {mean('topk'):6.2f}  {mean('topk') - mean('dense'):+6.2f}")
    print(f"({len(rows)} seeds, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
