"""The sections of ``reuse demo``, in the order they run.

A section runs one recipe from ``recipes/`` per seed and names the steps that give the table's
rows and its comparisons "method beats baseline". A combination section also owns a goal of
issue 6: :meth:`Section.goals` reads what a table of test accuracies cannot show (an ensemble's
members, a cascade's sweep, a soup's ingredients) from its own steps' results and gives its lines
for the table and report.md, and its plots.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from reuse_core.recipe import RecipeResult


@dataclasses.dataclass(frozen=True)
class Goals:
    """What a section measures beyond its rows' test accuracies."""

    summary: dict                 # metrics.json's "combination" entry under the section's key
    lines: list[str]              # for the table; report.md lists them too
    plots: tuple[str, ...] = ()   # files the section drew in the demo's run directory


@dataclasses.dataclass(frozen=True)
class Section:
    key: str
    title: str
    recipe: str                           # file name under recipes/
    rows: tuple[tuple[str, str], ...]     # (row label, step name), in table order
    comparisons: tuple[tuple[str, str], ...] = ()  # (method step, baseline step): the method should win
    reuse: tuple[str, ...] = ()           # steps whose models earlier sections made

    def goals(self, runs: list[RecipeResult], run_dir: Path) -> Goals | None:
        """The section's goals from its recipe's run per seed; None: it only contributes rows."""
        return None


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def _pct(xs: list[float]) -> str:
    return ", ".join(f"{x * 100:.1f}" for x in xs)


class EnsembleSection(Section):
    def goals(self, runs, run_dir):
        ens = [r.steps["ensemble"].metrics for r in runs]
        acc = [m["test_accuracy"] for m in ens]
        best = [m["best_member_test_accuracy"] for m in ens]
        gains = [a - b for a, b in zip(acc, best)]
        s = {"ensemble": acc, "best_member": best, "gain": gains, "wins": sum(g > 0 for g in gains),
             "holds": statistics.fmean(gains) > 0}
        return Goals(s, [
            f"   ensemble beats its best member: {_verdict(s['holds'])} (mean gain "
            f"{statistics.fmean(gains) * 100:+.2f} points, ahead in {s['wins']} of {len(runs)} seeds; "
            f"ensemble {_pct(acc)} vs best member {_pct(best)} %)"])


# The cascade's goal, checked on the mean over seeds and reported per seed.
CASCADE_MIN_ACCURACY = 0.98   # of the most expensive model's test accuracy ...
CASCADE_MAX_COMPUTE = 0.60    # ... at most this fraction of its FLOPs per sample


class CascadeSection(Section):
    def goals(self, runs, run_dir):
        # the threshold sweep the cascade step wrote in its run directory
        sweeps = [json.loads((Path(r.steps["cascade"].run_dir) / "cascade.json").read_text()) for r in runs]
        acc_ratio = [c["accuracy_vs_expensive"] for c in sweeps]
        compute = [c["compute_vs_expensive"] for c in sweeps]
        s = {
            "accuracy_vs_expensive": acc_ratio, "compute_vs_expensive": compute,
            "time_vs_expensive": [c["time_vs_expensive"] for c in sweeps],
            "thresholds": [c["threshold"] for c in sweeps], "exits": [c["test_exits"] for c in sweeps],
            "ece": [[(c["val_ece_before"], c["val_ece_after"]) for c in sw["calibration"]] for sw in sweeps],
            "seeds_meeting_goal": sum(a >= CASCADE_MIN_ACCURACY and f <= CASCADE_MAX_COMPUTE
                                      for a, f in zip(acc_ratio, compute)),
            "holds": (statistics.fmean(acc_ratio) >= CASCADE_MIN_ACCURACY
                      and statistics.fmean(compute) <= CASCADE_MAX_COMPUTE),
        }
        _plot_cascade(sweeps, run_dir / "cascade.png")
        return Goals(s, [
            f"   cascade >= {CASCADE_MIN_ACCURACY:.0%} of its last model's accuracy at <= {CASCADE_MAX_COMPUTE:.0%} "
            f"of its FLOPs: {_verdict(s['holds'])} (accuracy {_pct(acc_ratio)} % of the last model's at "
            f"{_pct(compute)} % of its FLOPs and {_pct(s['time_vs_expensive'])} % of its measured time; "
            f"{s['seeds_meeting_goal']} of {len(runs)} seeds meet both)"], ("cascade.png",))


def _plot_cascade(sweeps: list[dict], path: Path) -> None:
    """Each seed's test sweep, FLOPs relative to the last model's, against the goal's bounds."""
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


class SoupSection(Section):
    def goals(self, runs, run_dir):
        # each soup step measures its ingredients itself, on the same test split
        greedy = [r.steps["soup"].metrics for r in runs]
        uniform = [r.steps["uniform-soup"].metrics for r in runs]
        best = [m["best_ingredient_test_accuracy"] for m in greedy]
        s = {
            "greedy": [m["test_accuracy"] for m in greedy], "uniform": [m["test_accuracy"] for m in uniform],
            "best_ingredient": best, "ingredients_chosen": [len(m["chosen"]) for m in greedy],
        }
        s["greedy_gain"] = [a - b for a, b in zip(s["greedy"], best)]
        s["uniform_gain"] = [a - b for a, b in zip(s["uniform"], best)]
        return Goals(s, [
            f"   greedy soup vs best ingredient: {statistics.fmean(s['greedy_gain']) * 100:+.2f} points "
            f"({'/'.join(map(str, s['ingredients_chosen']))} of {len(greedy[0]['ingredients_test_accuracy'])} "
            f"ingredients kept); uniform soup: {statistics.fmean(s['uniform_gain']) * 100:+.2f} points"])


SECTIONS: list[Section] = [
    Section(
        key="transfer",
        title="Transfer: pretrain on digits 0-4, fine-tune to 5-9 with few labels",
        recipe="digits-transfer.toml",
        rows=(("teacher (0-4, all labels)", "teacher"), ("fine-tuned (5-9, few labels)", "transfer"),
              ("from scratch (5-9, same labels)", "scratch")),
        comparisons=(("transfer", "scratch"),),
    ),
    Section(
        key="distill",
        title="Distillation: the CNNs into a small MLP student with few labels",
        recipe="digits-distill.toml",
        rows=(("MLP distilled from the teacher (0-4)", "student"),
              ("MLP from scratch (0-4, same labels)", "student-scratch"),
              ("MLP distilled from the fine-tuned (5-9)", "transfer-student"),
              ("MLP from scratch (5-9, same labels)", "transfer-student-scratch")),
        comparisons=(("student", "student-scratch"), ("transfer-student", "transfer-student-scratch")),
        reuse=("teacher", "transfer"),
    ),
    EnsembleSection(
        key="ensemble",
        title="Ensemble: 4 small CNNs trained together (batched) on digits 5-9 with 5 labels per class",
        recipe="digits-ensemble.toml",
        rows=(("ensemble of 4 (probability average)", "ensemble"),),
        comparisons=(("ensemble", "scratch"),),  # the transfer section's baseline, same labels
    ),
    CascadeSection(
        key="cascade",
        title="Cascade: the distilled MLP before its CNN teacher (0-4), threshold for 99% of the teacher's accuracy",
        recipe="digits-cascade.toml",
        rows=(("cascade distilled MLP -> teacher CNN", "cascade"),),
        reuse=("teacher", "student"),
    ),
    SoupSection(
        key="soup",
        title="Soup: the fine-tuned CNN (5-9) three ways (lr 0.1, 0.05, 0.02), weights averaged",
        recipe="digits-soup.toml",
        rows=(("fine-tuned, lr 0.05, 30 epochs", "transfer-lr05"), ("fine-tuned, lr 0.02, 30 epochs", "transfer-lr02"),
              ("greedy soup", "soup"), ("uniform soup", "uniform-soup")),
        comparisons=(("soup", "transfer"),),
        reuse=("teacher", "transfer"),
    ),
]
