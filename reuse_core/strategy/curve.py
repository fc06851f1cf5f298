"""Label-budget curves: test accuracy against labelled examples per class, over seeds.

A curve is ``{method: {budget: [accuracy per seed]}}`` (budgets as ints, the seeds in one order for
every method). :func:`summarise` gives its means, sample standard deviations and each method's gain
over a baseline; :func:`markdown` a table of them; :func:`plot` the PNG (mean ± sd over the seeds,
one line per method). The ``transfer-curve`` strategy writes them, and ``reuse demo`` draws its
seeds' curves with them.
"""
from __future__ import annotations

import statistics
from pathlib import Path

Curve = dict[str, dict[int, list[float]]]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(curve: Curve, baseline: str) -> dict:
    """``{"methods": {method: {budget: {"accuracy", "mean", "sd"}}}, "gains": {method: {budget:
    {"gain" (per seed), "mean_gain", "wins", "seeds"}}}}`` with every method but ``baseline``
    measured against it, seed by seed; budgets become strings (JSON keys)."""
    methods = {m: {str(k): dict(zip(("mean", "sd"), _mean_sd(v)), accuracy=v) for k, v in sorted(points.items())}
               for m, points in curve.items()}
    gains = {}
    for m, points in curve.items():
        if m == baseline:
            continue
        gains[m] = {}
        for k, v in sorted(points.items()):
            g = [a - b for a, b in zip(v, curve[baseline][k])]
            gains[m][str(k)] = {"gain": g, "mean_gain": statistics.fmean(g), "wins": sum(x > 0 for x in g),
                                "seeds": len(g)}
    return {"methods": methods, "gains": gains}


def markdown(summary: dict, labels: dict[str, str], *, title: str = "") -> str:
    """A table: a row per method (``labels`` names them), a column per label budget, mean ± sd in
    percent; then each method's mean gain over the baseline, with the seeds it wins."""
    methods = summary["methods"]
    budgets = list(next(iter(methods.values())))
    head = f"| labels per class | {' | '.join(budgets)} |\n| --- |{' --- |' * len(budgets)}"
    rows = [f"| {labels.get(m, m)} | " + " | ".join(f"{p[k]['mean'] * 100:.1f} ± {p[k]['sd'] * 100:.1f} %" for k in budgets)
            + " |" for m, p in methods.items()]
    rows += [f"| gain of {labels.get(m, m)} | " + " | ".join(
        f"{g[k]['mean_gain'] * 100:+.1f} ({g[k]['wins']}/{g[k]['seeds']})" for k in budgets) + " |"
        for m, g in summary["gains"].items()]
    lines = [f"{title}\n" if title else "", head, *rows, "",
             "Test accuracy, mean ± sd over the seeds; a gain is in points over the baseline, with the number of "
             "seeds where the method is ahead.", ""]
    return "\n".join(lines).lstrip("\n")


def plot(summary: dict, labels: dict[str, str], path: str | Path, *, title: str) -> None:
    """Test accuracy against labels per class (log scale), mean ± sd over the seeds, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (m, points) in enumerate(summary["methods"].items()):
        ks = [int(k) for k in points]
        ax.errorbar(ks, [p["mean"] for p in points.values()], yerr=[p["sd"] for p in points.values()], marker="o",
                    ms=4, capsize=3, color=f"C{i}", label=labels.get(m, m))
    ks = sorted({int(k) for points in summary["methods"].values() for k in points})
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="labelled examples per class", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
