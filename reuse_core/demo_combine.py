"""The combination results of ``reuse demo``: an ensemble against its best member, a cascade's
accuracy against compute, and a soup against its ingredients.

Their sections are recipes like the others (ensemble, cascade and soup in
:data:`reuse_core.demo.SECTIONS`); :func:`summarise` then reads what a table of test accuracies
cannot show (an ensemble's members, the cascade's sweep) from the store and the run directories,
checks the measured goals of issue 6 per seed, draws ``cascade.png`` and gives the lines for the
table and the report.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from reuse_core.store import ModelStore

# Measured goals (issue 6), checked on the mean over seeds and reported per seed.
CASCADE_MIN_ACCURACY = 0.98   # of the most expensive model's test accuracy ...
CASCADE_MAX_COMPUTE = 0.60    # ... at most this fraction of its FLOPs per sample
KEYS = ("ensemble", "cascade", "soup")
INGREDIENTS = ("transfer", "transfer-lr05", "transfer-lr02")


def _rows(metrics: dict) -> dict[str, dict]:
    return {r["step"]: r for sec in metrics["sections"] for r in sec["rows"]}


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def summarise(metrics: dict, run_dir: Path) -> dict:
    """The combination results of a finished demo run (None when it ran without the combination
    sections); also writes ``cascade.png`` in ``run_dir``."""
    if not set(KEYS) <= {s["key"] for s in metrics["sections"]}:
        return None
    store = ModelStore(metrics["store"])
    seeds = metrics["seeds"]
    rows = _rows(metrics)
    out: dict = {}

    ens = rows["ensemble"]
    best = [store.manifest(m)["metrics"]["best_member_test_accuracy"] for m in ens["models"]]
    gains = [a - b for a, b in zip(ens["test_accuracy"], best)]
    out["ensemble"] = {"ensemble": ens["test_accuracy"], "best_member": best, "gain": gains,
                       "wins": sum(g > 0 for g in gains), "holds": statistics.fmean(gains) > 0}

    sweeps = [json.loads((run_dir / f"seed-{s}" / "cascade" / "steps" / "cascade" / "cascade.json").read_text())
              for s in seeds]
    acc_ratio = [c["accuracy_vs_expensive"] for c in sweeps]
    compute = [c["compute_vs_expensive"] for c in sweeps]
    out["cascade"] = {
        "accuracy_vs_expensive": acc_ratio, "compute_vs_expensive": compute,
        "time_vs_expensive": [c["time_vs_expensive"] for c in sweeps],
        "thresholds": [c["threshold"] for c in sweeps], "exits": [c["test_exits"] for c in sweeps],
        "ece": [[(c["val_ece_before"], c["val_ece_after"]) for c in s["calibration"]] for s in sweeps],
        "seeds_meeting_goal": sum(a >= CASCADE_MIN_ACCURACY and f <= CASCADE_MAX_COMPUTE
                                  for a, f in zip(acc_ratio, compute)),
        "holds": (statistics.fmean(acc_ratio) >= CASCADE_MIN_ACCURACY
                  and statistics.fmean(compute) <= CASCADE_MAX_COMPUTE),
    }
    _plot_cascade(sweeps, run_dir / "cascade.png")

    best_ing = [max(rows[s]["test_accuracy"][i] for s in INGREDIENTS) for i in range(len(seeds))]
    greedy, uniform = rows["soup"]["test_accuracy"], rows["uniform-soup"]["test_accuracy"]
    out["soup"] = {
        "greedy": greedy, "uniform": uniform, "best_ingredient": best_ing,
        "ingredients_chosen": [len(store.manifest(m)["lineage"]["parents"]) for m in rows["soup"]["models"]],
        "greedy_gain": [a - b for a, b in zip(greedy, best_ing)],
        "uniform_gain": [a - b for a, b in zip(uniform, best_ing)],
    }
    out["lines"] = _lines(out)
    out["plots"] = ["cascade.png"]
    return out


def _lines(r: dict) -> list[str]:
    e, c, s = r["ensemble"], r["cascade"], r["soup"]
    n = len(e["gain"])
    pct = lambda xs: ", ".join(f"{x * 100:.1f}" for x in xs)  # noqa: E731
    return [
        "-- Combination goals",
        f"   ensemble beats its best member: {_verdict(e['holds'])} (mean gain "
        f"{statistics.fmean(e['gain']) * 100:+.2f} points, ahead in {e['wins']} of {n} seeds; "
        f"ensemble {pct(e['ensemble'])} vs best member {pct(e['best_member'])} %)",
        f"   cascade >= {CASCADE_MIN_ACCURACY:.0%} of its last model's accuracy at <= {CASCADE_MAX_COMPUTE:.0%} of "
        f"its FLOPs: {_verdict(c['holds'])} (accuracy {pct(c['accuracy_vs_expensive'])} % of the last model's at "
        f"{pct(c['compute_vs_expensive'])} % of its FLOPs and {pct(c['time_vs_expensive'])} % of its measured time; "
        f"{c['seeds_meeting_goal']} of {n} seeds meet both)",
        f"   greedy soup vs best ingredient: {statistics.fmean(s['greedy_gain']) * 100:+.2f} points "
        f"({'/'.join(map(str, s['ingredients_chosen']))} of 3 ingredients kept); uniform soup: "
        f"{statistics.fmean(s['uniform_gain']) * 100:+.2f} points",
    ]


def _plot_cascade(sweeps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, sw in enumerate(sweeps):
        big = sw["flops_per_sample"][-1]
        pts = sorted(sw["test"], key=lambda p: p["flops"])
        ax.plot([p["flops"] / big for p in pts], [p["accuracy"] for p in pts], "-", color=f"C{i}", lw=1,
                label=f"seed {i}: threshold sweep")
        ch = sw["chosen"]
        ax.plot([ch["flops"] / big], [ch["accuracy"]], "*", color=f"C{i}", ms=13, mec="k",
                label=f"seed {i}: chosen (t = {ch['threshold']:.3g})")
        ax.axhline(CASCADE_MIN_ACCURACY * sw["expensive_test_accuracy"], color=f"C{i}", ls=":", lw=0.8)
    ax.axvline(CASCADE_MAX_COMPUTE, color="grey", ls="--", lw=0.8,
               label=f"{CASCADE_MAX_COMPUTE:.0%} of the last model's FLOPs")
    ax.set(xscale="log", xlabel="mean FLOPs per sample / the last model's (log scale)", ylabel="test accuracy",
           title=f"cascade (dotted: {CASCADE_MIN_ACCURACY:.0%} of each seed's last-model accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_section(r: dict) -> list[str]:
    """Markdown for report.md."""
    return ["## Combination goals", "", *[f"- {line.strip()}" for line in r["lines"][1:]], "",
            "![cascade.png](cascade.png)", ""]
