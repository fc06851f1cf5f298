"""``reuse demo``: the toolkit's main job on the embedded digits data, measured against baselines.

The demo is a list of sections (:data:`SECTIONS`, see :mod:`reuse_core.demo.sections`). Each runs
one recipe from ``recipes/`` (the same code path as ``reuse run RECIPE.toml``) once per seed, may
reuse models an earlier section made (its ``reuse`` steps are bound to them instead of running
again), and contributes rows to the results table, comparisons "method beats baseline" and, for the
combination sections, its goals. Adding a section is adding a recipe and an entry to
:data:`SECTIONS`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from reuse_core import recipe as recipes
from reuse_core.demo.sections import SECTIONS, Goals, Section
from reuse_core.run import default_store, new_run_dir

RECIPES = recipes.SHIPPED_DIR


@dataclasses.dataclass
class DemoReport:
    run_dir: Path
    table: str
    metrics: dict


def scale_epochs(r: recipes.Recipe, factor: float) -> recipes.Recipe:
    """Every training step's epochs times ``factor``, at least 1."""
    from reuse_core import plugins

    registry = plugins.strategies()
    steps = []
    for step in r.steps:
        strat = registry.get(step.strategy)
        if any(o.name == "epochs" for o in strat.options):
            epochs = int(r.step_options(step, strat).get("epochs", strat.option("epochs").default))
            step = dataclasses.replace(step, options={**step.options, "epochs": max(1, round(epochs * factor))})
        steps.append(step)
    return dataclasses.replace(r, steps=tuple(steps))


def _curve(step_dir: Path) -> list[float]:
    path = step_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line).get("val_accuracy") for line in path.read_text().splitlines() if line.strip()]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(*, seeds: int = 3, epochs_scale: float = 1.0, out=None, store=None, device=None, quiet: bool = False,
        sections: list[Section] | None = None) -> DemoReport:
    """Run every section's recipe for seeds 0..seeds-1 and write report.md, metrics.json and the plots."""
    from reuse_core import plugins

    sections = SECTIONS if sections is None else sections
    plugins.get_plugin_manager()  # set-up (imports, plugins) is not part of the measured wall time
    threads = torch.get_num_threads()
    # The digits models are tiny: a second intra-op thread costs more than it gives (10x slower
    # steps measured on a busy 2-core machine, where the threads wait for each other).
    torch.set_num_threads(1)
    try:
        return _run(sections, seeds=seeds, epochs_scale=epochs_scale, out=out, store=store, device=device, quiet=quiet)
    finally:
        torch.set_num_threads(threads)


def _run(sections, *, seeds, epochs_scale, out, store, device, quiet) -> DemoReport:
    run_dir = new_run_dir("demo") if out is None else Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = default_store(store if store is not None else run_dir / "store")
    t0 = time.perf_counter()
    runs: dict[str, list[recipes.RecipeResult]] = {sec.key: [] for sec in sections}  # per seed
    made: dict[str, list] = {}  # step -> its StrategyResult per seed, from the section that ran it
    for seed in range(seeds):
        for sec in sections:
            r = scale_epochs(recipes.load(RECIPES / sec.recipe).override("seed", seed), epochs_scale)
            t = time.perf_counter()
            res = recipes.run(r, store=store, run_dir=run_dir / f"seed-{seed}" / sec.key, device=device, quiet=True,
                              models={s: made[s][seed].model for s in sec.reuse})
            runs[sec.key].append(res)
            for name, result in res.steps.items():
                if name not in sec.reuse:
                    made.setdefault(name, []).append(result)
            if not quiet:
                line = ", ".join(f"{n} {res.steps[n].metrics['test_accuracy']:.3f}" for _, n in sec.rows)
                print(f"seed {seed} {sec.key:<10} {time.perf_counter() - t:5.1f} s  test accuracy: {line}", flush=True)
    wall = time.perf_counter() - t0
    metrics = _summarise(sections, made, seeds=seeds, epochs_scale=epochs_scale, wall=wall, store=str(store.root))
    goals = {sec.key: g for sec in sections if (g := sec.goals(runs[sec.key], run_dir, store)) is not None}
    metrics["combination"] = _combination(goals)
    table = format_table(metrics)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plots = write_plots(metrics, run_dir)
    (run_dir / "report.md").write_text(format_report(metrics, table, plots))
    return DemoReport(run_dir, table, metrics)


def _summarise(sections, made, *, seeds, epochs_scale, wall, store) -> dict:
    acc = {step: [r.metrics.get("test_accuracy") for r in results] for step, results in made.items()}  # None: no classifier (selfsup, the curve)
    out = {"seeds": list(range(seeds)), "epochs_scale": epochs_scale, "wall_s": round(wall, 1), "store": store,
           "created": datetime.datetime.now().isoformat(timespec="seconds"), "sections": []}
    for sec in sections:
        rows = []
        for label, step in sec.rows:
            mean, sd = _mean_sd(acc[step])
            rows.append({"label": label, "step": step, "test_accuracy": acc[step], "mean": mean, "sd": sd,
                         "models": [r.model for r in made[step]],
                         "val_curves": [_curve(Path(r.run_dir)) for r in made[step]]})
        comps = []
        for method, base in sec.comparisons:
            diffs = [a - b for a, b in zip(acc[method], acc[base])]
            comps.append({"method": method, "baseline": base, "mean_gain": statistics.fmean(diffs),
                          "wins": sum(d > 0 for d in diffs), "seeds": len(diffs),
                          "holds": statistics.fmean(diffs) > 0})
        out["sections"].append({"key": sec.key, "title": sec.title, "recipe": f"recipes/{sec.recipe}",
                                "rows": rows, "comparisons": comps})
    return out


def _combination(goals: dict[str, Goals]) -> dict | None:
    """metrics.json's "combination": each section's goals under its key, their lines and plots
    (None when no section has goals)."""
    if not goals:
        return None
    return {**{key: g.summary for key, g in goals.items()},
            "lines": ["-- Goals", *(line for g in goals.values() for line in g.lines)],
            "plots": [p for g in goals.values() for p in g.plots]}


def format_table(metrics: dict) -> str:
    n = len(metrics["seeds"])
    lines = [f"{'model':<44} test accuracy (mean +- sd over {n} seed{'s' if n > 1 else ''})"]
    for sec in metrics["sections"]:
        lines.append(f"-- {sec['title']}")
        for row in sec["rows"]:
            lines.append(f"   {row['label']:<41} {row['mean'] * 100:6.2f} +- {row['sd'] * 100:5.2f} %")
        for c in sec["comparisons"]:
            verdict = "yes" if c["holds"] else "NO"
            lines.append(f"   {c['method']} beats {c['baseline']}: {verdict} (mean gain {c['mean_gain'] * 100:+.2f} points, "
                         f"ahead in {c['wins']} of {c['seeds']} seeds)")
    lines += (metrics.get("combination") or {}).get("lines", [])
    lines.append(f"wall time {metrics['wall_s']:.1f} s")
    return "\n".join(lines)


def write_plots(metrics: dict, run_dir: Path) -> list[str]:
    """curves.png (validation accuracy per epoch, mean over seeds) and accuracy.png (test accuracy
    with the seeds' spread). Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = metrics["sections"]
    fig, axes = plt.subplots(1, len(secs), figsize=(5.5 * len(secs), 4), squeeze=False)
    for ax, sec in zip(axes[0], secs):
        for row in sec["rows"]:
            runs = [c for c in row["val_curves"] if c]
            if not runs:
                continue
            length = min(len(c) for c in runs)
            mean = [statistics.fmean(c[i] for c in runs) for i in range(length)]
            ax.plot(range(1, length + 1), mean, label=row["label"])
        ax.set(title=sec["key"], xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.lines:  # a section that only combines stored models trains nothing
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)

    rows = [row for sec in secs for row in sec["rows"]][::-1]  # top to bottom in table order
    fig, ax = plt.subplots(figsize=(8, 1 + 0.4 * len(rows)))
    ax.barh(range(len(rows)), [r["mean"] for r in rows], xerr=[r["sd"] for r in rows], capsize=3,
            color=[f"C{i}" for i in range(len(rows))])
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
    ax.set(xlabel="test accuracy", xlim=(0, 1.05),
           title=f"test accuracy, mean and sd over {len(metrics['seeds'])} seed(s)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy.png", dpi=110)
    plt.close(fig)
    return ["curves.png", "accuracy.png"]


def format_report(metrics: dict, table: str, plots: list[str]) -> str:
    n = len(metrics["seeds"])
    lines = [
        "# reuse demo", "",
        f"Digits (scikit-learn's 8x8 images, embedded), seeds {', '.join(map(str, metrics['seeds']))}, "
        f"epochs x {metrics['epochs_scale']}, wall time {metrics['wall_s']:.1f} s. Test accuracy on each seed's "
        f"held-out split, mean and sample standard deviation over {n} seed(s).", "",
    ]
    for sec in metrics["sections"]:
        lines += [f"## {sec['title']}", "", f"Recipe: `{sec['recipe']}` (run it alone: `reuse run {sec['recipe']}`).", "",
                  "| model | test accuracy | per seed |", "| --- | --- | --- |"]
        for row in sec["rows"]:
            per_seed = ", ".join(f"{a * 100:.1f}" for a in row["test_accuracy"])
            lines.append(f"| {row['label']} | {row['mean'] * 100:.2f} ± {row['sd'] * 100:.2f} % | {per_seed} |")
        lines.append("")
        for c in sec["comparisons"]:
            verdict = "yes" if c["holds"] else "**no**"
            lines.append(f"- `{c['method']}` beats `{c['baseline']}`: {verdict}; mean gain {c['mean_gain'] * 100:+.2f} "
                         f"points, ahead in {c['wins']} of {c['seeds']} seeds.")
        lines.append("")
    if comb := metrics.get("combination"):
        lines += ["## Goals", "", *[f"- {line.strip()}" for line in comb["lines"][1:]], "",
                  *[f"![{p}]({p})" for p in comb["plots"]], ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Table", "", "```", table, "```", "",
              f"The models are in the store at `{metrics['store']}`: "
              f"`reuse models --store {metrics['store']} list`, then `lineage ID` shows how knowledge flowed.", ""]
    return "\n".join(lines)
