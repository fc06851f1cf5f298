"""Issue 13's comparisons on the embedded digits, measured as a user runs them: through
``reuse_core.run("selfsup" | "finetune" | "pretrain" | "distill" | "soup", ...)``.

    python benchmarks/transfer_measure.py                      # 5 seeds, test accuracy: the must-show numbers
    python benchmarks/transfer_measure.py --split val --seeds 0 1 2 --selfsup temperature=0.2

Each trial uses one seed for everything: the split, ``selfsup`` (its defaults, on the training
images of all 10 digits, labels unused), ``finetune`` to digits 5-9 (its defaults apart from
``classes``, ``label_budget`` and ``epochs``) and the scratch ``pretrain`` (small-cnn, same classes,
labels and epochs). Printed per seed, then as means:

- curve: fine-tuned from the selfsup model vs from scratch at each label budget;
- linear: ``finetune --mode linear`` vs scikit-learn's ``LogisticRegression(max_iter=5000)`` on the
  raw pixels (in [0, 1]) of the same labelled examples;
- soup: three fine-tunings at 5 labels per class (lr x1, x0.5, x2, as ``reuse demo`` does), greedy
  soup vs the ingredient best on validation, uniform soup vs the mean ingredient;
- distill: the fine-tuned model (5 labels per class) distilled into an MLP vs the MLP from scratch.

``--split val`` reports validation accuracies instead: the defaults were chosen on those, never on
the test split. ``--selfsup`` / ``--finetune`` KEY=VALUE try other options on every trial.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import reuse_core
from reuse_core import plugins
from reuse_core.store import ModelStore
from reuse_core.strategy import parse_config
from reuse_core.strategy.blocks import load_splits

TARGET = ["5-9"]
CHECKS = ("curve", "linear", "soup", "distill")
MLP = {"student_backbone": "mlp", "student_backbone_config": ["hidden=[64]"]}


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def pixels_logreg(seed: int, budget: int, split: str) -> float:
    """LogisticRegression (defaults, max_iter=5000) on the raw pixels of the labelled examples."""
    from sklearn.linear_model import LogisticRegression

    options = {"dataset": "digits", "classes": TARGET, "label_budget": budget, "seed": seed, "data_root": None,
               "dataset_config": None}
    train, val, test = load_splits(options)
    evaluate_on = val if split == "val" else test

    def arrays(data):
        return (torch.stack([data[i][0] for i in range(len(data))]).flatten(1).numpy(),
                [data[i][1] for i in range(len(data))])

    x, y = arrays(train)
    return float(LogisticRegression(max_iter=5000).fit(x, y).score(*arrays(evaluate_on)))


class Trial:
    """One seed's runs, in a fresh store."""

    def __init__(self, seed: int, args, root: Path):
        self.seed, self.args, self.root = seed, args, root
        self.store = ModelStore(root / "store")
        self.key = "val_accuracy" if args.split == "val" else "test_accuracy"
        self.runs = 0

    def run(self, strategy: str, **options):
        self.runs += 1
        return reuse_core.run(strategy, store=self.store, run_dir=self.root / f"run-{self.runs}", quiet=True,
                              seed=self.seed, **options)

    def finetune(self, parent: str, budget: int, **options):
        return self.run("finetune", model=parent, classes=TARGET, label_budget=budget, epochs=self.args.epochs,
                        **{**self.args.finetune, **options})

    def scratch(self, budget: int):
        return self.run("pretrain", backbone="small-cnn", classes=TARGET, label_budget=budget, epochs=self.args.epochs)


def trial(seed: int, args, root: Path) -> dict:
    t = Trial(seed, args, root)
    out: dict = {"seed": seed}
    t0 = time.perf_counter()
    parent = t.run("selfsup", **args.selfsup).model
    out["selfsup_s"] = time.perf_counter() - t0
    if "curve" in args.checks:
        out["curve"] = {k: {"finetune": t.finetune(parent, k).metrics[t.key], "scratch": t.scratch(k).metrics[t.key]}
                        for k in args.budgets}
    if "linear" in args.checks:
        out["linear"] = {k: {"probe": t.finetune(parent, k, mode="linear").metrics[t.key],
                             "logreg": pixels_logreg(seed, k, args.split)} for k in (1, 2)}
    if "soup" in args.checks or "distill" in args.checks:
        lr = float(args.finetune.get("lr", plugins.strategies().get("finetune").option("lr").default))
        tunings = [t.finetune(parent, 5, lr=lr * f) for f in (1.0, 0.5, 2.0)]
    if "soup" in args.checks:
        greedy = t.run("soup", models=[r.model for r in tunings], method="greedy").metrics
        uniform = t.run("soup", models=[r.model for r in tunings], method="uniform").metrics
        own = greedy["ingredients_val_accuracy"] if args.split == "val" else greedy["ingredients_test_accuracy"]
        best_on_val = own[max(range(len(own)), key=lambda i: greedy["ingredients_val_accuracy"][i])]
        out["soup"] = {"greedy": greedy[t.key], "best_on_val": best_on_val, "uniform": uniform[t.key],
                       "mean_ingredient": _mean(own)}
    if "distill" in args.checks:
        student = t.run("distill", teacher=tunings[0].model, label_budget=5, epochs=args.epochs, lr=0.1, **MLP)
        scratch = t.run("pretrain", backbone="mlp", backbone_config=["hidden=[64]"], classes=TARGET, label_budget=5,
                        epochs=args.epochs, lr=0.1)
        out["distill"] = {"distilled": student.metrics[t.key], "scratch": scratch.metrics[t.key],
                          "teacher": tunings[0].metrics[t.key]}
    out["total_s"] = time.perf_counter() - t0
    return out


def pct(x: float) -> str:
    return f"{x * 100:5.1f}"


def report(trials: list[dict], args) -> None:
    n = len(trials)
    print(f"\n== {args.split} accuracy, {n} seeds ({', '.join(str(t['seed']) for t in trials)}), epochs {args.epochs}; "
          f"selfsup {args.selfsup or 'defaults'}, finetune {args.finetune or 'defaults'}")
    if "curve" in args.checks:
        print("-- curve: fine-tuned from selfsup vs from scratch (points)")
        for k in args.budgets:
            gains = [t["curve"][k]["finetune"] - t["curve"][k]["scratch"] for t in trials]
            rows = "  ".join(f"{pct(t['curve'][k]['finetune'])}/{pct(t['curve'][k]['scratch'])}" for t in trials)
            print(f"   {k:2d} labels/class: per seed ft/scratch {rows}  | mean {pct(_mean([t['curve'][k]['finetune'] for t in trials]))}"
                  f" vs {pct(_mean([t['curve'][k]['scratch'] for t in trials]))}: gain {_mean(gains) * 100:+.2f}, "
                  f"ahead in {sum(g > 0 for g in gains)} of {n}")
    if "linear" in args.checks:
        print("-- linear probe on the selfsup features vs LogisticRegression on raw pixels")
        for k in (1, 2):
            rows = "  ".join(f"{pct(t['linear'][k]['probe'])}/{pct(t['linear'][k]['logreg'])}" for t in trials)
            gain = _mean([t["linear"][k]["probe"] - t["linear"][k]["logreg"] for t in trials])
            print(f"   {k} labels/class: per seed probe/logreg {rows}  | mean gain {gain * 100:+.2f}")
    if "soup" in args.checks:
        print("-- soup of 3 fine-tunings (5 labels/class, lr x1, x0.5, x2)")
        rows = "  ".join(f"{pct(t['soup']['greedy'])}/{pct(t['soup']['best_on_val'])}" for t in trials)
        g = _mean([t["soup"]["greedy"] - t["soup"]["best_on_val"] for t in trials])
        print(f"   greedy vs the ingredient best on val: {rows}  | mean {g * 100:+.2f}")
        rows = "  ".join(f"{pct(t['soup']['uniform'])}/{pct(t['soup']['mean_ingredient'])}" for t in trials)
        g = _mean([t["soup"]["uniform"] - t["soup"]["mean_ingredient"] for t in trials])
        print(f"   uniform vs the mean ingredient:       {rows}  | mean {g * 100:+.2f}")
    if "distill" in args.checks:
        print("-- the fine-tuned model (5 labels/class) distilled into an MLP vs the MLP from scratch")
        rows = "  ".join(f"{pct(t['distill']['distilled'])}/{pct(t['distill']['scratch'])}" for t in trials)
        g = [t["distill"]["distilled"] - t["distill"]["scratch"] for t in trials]
        print(f"   distilled/scratch {rows}  | mean gain {_mean(g) * 100:+.2f}, ahead in {sum(x > 0 for x in g)} of {n}")
    print(f"-- time per seed: selfsup {_mean([t['selfsup_s'] for t in trials]):.1f} s, all "
          f"{_mean([t['total_s'] for t in trials]):.1f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--epochs", type=int, default=50, help="finetune and scratch epochs (the reviewer's 50)")
    p.add_argument("--selfsup", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--json", help="also write the per-seed numbers here")
    args = p.parse_args(argv)
    args.selfsup, args.finetune = parse_config(args.selfsup), parse_config(args.finetune)
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives on a busy machine
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            trials.append(trial(seed, args, Path(tmp) / f"seed-{seed}"))
            print(json.dumps(trials[-1]), flush=True)
    report(trials, args)
    if args.json:
        Path(args.json).write_text(json.dumps(trials, indent=1) + "\n")


if __name__ == "__main__":
    main()
