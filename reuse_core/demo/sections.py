"""The sections of ``reuse demo``, in the order they run.

A section runs one recipe from ``recipes/`` per seed and names the steps that give the table's
rows and its comparisons "method beats baseline". A section may also own goals:
:meth:`Section.goals` reads what a table of test accuracies cannot show (the transfer curve over
the seeds, an ensemble's members, a cascade's sweep, a soup's ingredients) from its own steps'
results and gives its lines for the table and report.md, and its plots.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from reuse_core.recipe import RecipeResult

if TYPE_CHECKING:
    from reuse_core.store import ModelStore


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

    def goals(self, runs: list[RecipeResult], run_dir: Path, store: ModelStore) -> Goals | None:
        """The section's goals from its recipe's run per seed (its models are in ``store``); None: it
        only contributes rows."""
        return None


def _verdict(ok: bool) -> str:
    return "yes" if ok else "NO"


def _pct(xs: list[float]) -> str:
    return ", ".join(f"{x * 100:.1f}" for x in xs)


# The transfer section's curve: its "curve" step's budgets, plus 5 labels per class from its rows.
CURVE_FIVE = {"full": "transfer", "scratch": "scratch"}
CURVE_LABELS = {"full": "self-supervised, fine-tuned", "scratch": "from scratch"}


class TransferSection(Section):
    def goals(self, runs, run_dir, store):
        from reuse_core.strategy import curve

        points: dict[str, dict[int, list[float]]] = {m: {} for m in CURVE_FIVE}
        for r in runs:
            sweep = r.steps["curve"].metrics["methods"]
            for method, step in CURVE_FIVE.items():
                for k, p in [*sweep[method].items(), ("5", {"accuracy": [r.steps[step].metrics["test_accuracy"]]})]:
                    points[method].setdefault(int(k), []).extend(p["accuracy"])
        summary = curve.summarise(points, "scratch")
        curve.plot(summary, CURVE_LABELS, run_dir / "transfer_curve.png",
                   title=f"digits 5-9: self-supervised vs scratch, {len(runs)} seed{'s' if len(runs) > 1 else ''}")
        gains = summary["gains"]["full"]
        return Goals(summary, [
            f"   self-supervised fine-tuned vs from scratch at {k} label{'s' if k != '1' else ''} per class: "
            f"{g['mean_gain'] * 100:+.2f} points, ahead in {g['wins']} of {g['seeds']} seeds (fine-tuned "
            f"{_pct(summary['methods']['full'][k]['accuracy'])} vs scratch {_pct(summary['methods']['scratch'][k]['accuracy'])} %)"
            for k, g in gains.items()], ("transfer_curve.png",))


class EnsembleSection(Section):
    def goals(self, runs, run_dir, store):
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
    def goals(self, runs, run_dir, store):
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
    def goals(self, runs, run_dir, store):
        # each soup step measures its ingredients itself, on the same test split
        greedy = [r.steps["soup"].metrics for r in runs]
        uniform = [r.steps["uniform-soup"].metrics for r in runs]
        # the ingredient a user would pick without a soup: the best on validation
        best_on_val = [m["ingredients_test_accuracy"][max(range(len(m["ingredients_val_accuracy"])),
                                                          key=m["ingredients_val_accuracy"].__getitem__)] for m in greedy]
        mean = [statistics.fmean(m["ingredients_test_accuracy"]) for m in greedy]
        s = {
            "greedy": [m["test_accuracy"] for m in greedy], "uniform": [m["test_accuracy"] for m in uniform],
            "best_on_val_ingredient": best_on_val, "mean_ingredient": mean,
            "best_ingredient": [m["best_ingredient_test_accuracy"] for m in greedy],
            "ingredients_chosen": [len(m["chosen"]) for m in greedy],
        }
        s["greedy_gain"] = [a - b for a, b in zip(s["greedy"], best_on_val)]
        s["uniform_gain"] = [a - b for a, b in zip(s["uniform"], mean)]
        return Goals(s, [
            f"   greedy soup >= the ingredient best on validation: {_verdict(statistics.fmean(s['greedy_gain']) >= 0)} "
            f"(mean {statistics.fmean(s['greedy_gain']) * 100:+.2f} points: {_points(s['greedy_gain'])}; soup "
            f"{_pct(s['greedy'])} vs {_pct(best_on_val)} %; "
            f"{'/'.join(map(str, s['ingredients_chosen']))} of {len(greedy[0]['ingredients_test_accuracy'])} kept)",
            f"   uniform soup >= the mean ingredient: {_verdict(statistics.fmean(s['uniform_gain']) >= 0)} (mean "
            f"{statistics.fmean(s['uniform_gain']) * 100:+.2f} points: {_points(s['uniform_gain'])}; soup "
            f"{_pct(s['uniform'])} vs {_pct(mean)} %)"])


def _points(xs: list[float]) -> str:
    return ", ".join(f"{x * 100:+.1f}" for x in xs)


# The merge section's 10-class models; the int8 export takes the one best on validation.
MERGE_STEPS = ("merge-linear", "merge-task-arithmetic", "merge-ties")
MERGE_CANDIDATES = ("joint", *MERGE_STEPS)


class MergeSection(Section):
    def goals(self, runs, run_dir, store):
        from reuse_core.store import read_export
        from reuse_core.strategy.scoring import split_scorer

        steps = [{n: r.steps[n].metrics for n in ("joint", *MERGE_STEPS)} for r in runs]
        linear = [m["merge-linear"]["test_accuracy"] for m in steps]
        best = [max(m[n]["test_accuracy"] for n in MERGE_STEPS[1:]) for m in steps]  # TA or TIES
        s = {name: [m[name]["test_accuracy"] for m in steps] for name in ("joint", *MERGE_STEPS)}
        s["scale"] = {n: [m[n]["scale"] for m in steps] for n in MERGE_STEPS[1:]}
        s["ensemble"] = [m["merge-linear"]["ensemble_test_accuracy"] for m in steps]
        s["gain_over_linear"] = [b - a for a, b in zip(linear, best)]
        s["gap_to_ensemble"] = [b - e for b, e in zip(best, s["ensemble"])]
        s["gap_to_joint"] = [b - j for b, j in zip(best, s["joint"])]
        s["holds"] = all(g >= 0 for g in s["gain_over_linear"])
        exports = []
        for seed, (r, m) in enumerate(zip(runs, steps)):
            name = max(MERGE_CANDIDATES, key=lambda n: m[n]["val_accuracy"])
            mid = r.steps[name].model
            folder = run_dir / "exports" / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            path = store.export(mid, folder, quantize="int8", evaluate=split_scorer(store, mid)[0])
            state, manifest = read_export(path)  # what an importer gets: the int8 file, dequantised
            test = split_scorer(store, mid, split="test")[0]
            q = manifest["quantization"]
            exports.append({"model": name, "file": str(path), "size_ratio": q["size_ratio"],
                            "val_change": q["val_accuracy"]["change"],
                            "test_change": test(state) - test(store.load(mid)[0])})
        s["int8"] = exports
        wins = sum(g >= 0 for g in s["gain_over_linear"])
        return Goals(s, [
            f"   merged TA/TIES (λ on validation) >= linear on the 10-class test split: {_verdict(s['holds'])}, in "
            f"{wins} of {len(runs)} seeds (mean {statistics.fmean(s['gain_over_linear']) * 100:+.2f} points: "
            f"{_points(s['gain_over_linear'])}; linear {_pct(linear)} %, best of TA/TIES {_pct(best)} %)",
            f"   gap of that merge to the ensemble of the two specialists: {_points(s['gap_to_ensemble'])} points "
            f"(ensemble {_pct(s['ensemble'])} %); to joint training: {_points(s['gap_to_joint'])} points "
            f"(joint {_pct(s['joint'])} %)",
            "   int8 export of the model best on validation (" + ", ".join(e["model"] for e in exports) + "): "
            + ", ".join(f"{e['size_ratio']:.3f}" for e in exports) + " of the float32 export's size; accuracy "
            f"change {_points([e['val_change'] for e in exports])} points on validation, "
            f"{_points([e['test_change'] for e in exports])} on test"])


SECTIONS: list[Section] = [
    TransferSection(
        key="transfer",
        title="Transfer to digits 5-9 with 5 labels per class: self-supervised on all 10 digits' images "
              "(no labels), or supervised on 0-4",
        recipe="digits-transfer.toml",
        rows=(("self-supervised (SimCLR), fine-tuned (5-9)", "transfer"), ("from scratch (5-9, same labels)", "scratch"),
              ("supervised teacher (0-4, all labels)", "teacher"), ("supervised 0-4, fine-tuned (5-9)", "supervised")),
        comparisons=(("transfer", "scratch"), ("supervised", "scratch")),
    ),
    Section(
        key="distill",
        title="Distillation: the CNNs into a small MLP student with few labels",
        recipe="digits-distill.toml",
        rows=(("MLP distilled from the teacher (0-4)", "student"),
              ("MLP from scratch (0-4, same labels)", "student-scratch"),
              ("MLP distilled from the self-supervised fine-tuned (5-9)", "transfer-student"),
              ("MLP from scratch (5-9, same labels)", "transfer-student-scratch")),
        comparisons=(("student", "student-scratch"), ("transfer-student", "transfer-student-scratch")),
        reuse=("teacher", "selfsup", "transfer"),
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
        title="Soup: the self-supervised CNN fine-tuned to 5-9 three ways (lr 0.05, 0.025, 0.1), weights averaged",
        recipe="digits-soup.toml",
        rows=(("fine-tuned, lr 0.025", "transfer-lr025"), ("fine-tuned, lr 0.1", "transfer-lr1"),
              ("greedy soup", "soup"), ("uniform soup", "uniform-soup")),
        comparisons=(("soup", "transfer"),),
        reuse=("selfsup", "transfer"),
    ),
    MergeSection(
        key="merge",
        title="Merge: one parent fine-tuned to 0-4 and to 5-9, merged into one 10-digit model (stacked heads)",
        recipe="digits-merge.toml",
        rows=(("parent (all 10 digits, 10 labels each)", "parent"),
              ("specialist 0-4 (on its 5 digits)", "specialist-0-4"),
              ("specialist 5-9 (on its 5 digits)", "specialist-5-9"), ("joint fine-tuning on all 10", "joint"),
              ("merged: linear, equal weights", "merge-linear"),
              ("merged: task arithmetic, λ on validation", "merge-task-arithmetic"),
              ("merged: TIES, λ on validation", "merge-ties")),
        comparisons=(("merge-task-arithmetic", "merge-linear"), ("merge-ties", "merge-linear")),
    ),
]
