"""``cascade``: stored models from cheap to expensive; an input goes on to the next model only
while the current one's calibrated confidence is below a threshold chosen on the validation split,
for a target accuracy or a compute budget.

Each model is calibrated by temperature scaling on the validation split (expected calibration
error before and after is reported). The threshold sweep (accuracy against mean FLOPs and measured
time per sample) runs on the validation split to choose, and again on the test split to report;
the chosen cascade is also run as a module over the test split and timed. The sweep is written to
``cascade.json`` and drawn in ``cascade.png`` in the run directory. Nothing is saved to the store:
the cascade is a policy over stored models, and its result names them.
"""
from __future__ import annotations

import json

import torch
from torch.utils.data import DataLoader

from reuse_core.combine import (
    Cascade, choose, collect_logits, expected_calibration_error, fit_temperature, flops_per_sample,
    seconds_per_sample, sweep,
)
from reuse_core.combine.weights import accuracy
from reuse_core.engine.distributed import is_main_process
from reuse_core.strategy import Option, Strategy, StrategyResult, data_options, fraction, positive
from reuse_core.strategy.blocks import load_stored

PLOT = "cascade.png"
SWEEP = "cascade.json"


def _inputs(data) -> torch.Tensor:
    return torch.cat([x for x, _ in DataLoader(data, batch_size=512)])


def plot(test_points: list[dict], chosen: dict, path, *, title: str = "cascade") -> None:
    """Test accuracy against mean FLOPs per sample over the sweep, the chosen point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(test_points, key=lambda p: p["flops"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p["flops"] / 1e6 for p in pts], [p["accuracy"] for p in pts], ".-", ms=3, label="threshold sweep")
    ax.plot([chosen["flops"] / 1e6], [chosen["accuracy"]], "r*", ms=14,
            label=f"chosen (threshold {chosen['threshold']:.4g})")
    ax.set(xlabel="mean MFLOPs per sample", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx, options: dict) -> StrategyResult:
    if len(options["models"]) < 2:
        raise ValueError(f"cascade: --models needs at least 2 models, cheap to expensive, got {options['models']}")
    ids, models, _, dataset, val, test = load_stored(ctx, options["models"], options, "model")
    val_z, val_y = collect_logits(models, DataLoader(val, batch_size=256), ctx.device)
    test_z, test_y = collect_logits(models, DataLoader(test, batch_size=256), ctx.device)
    x_test = _inputs(test).to(ctx.device)
    flops = [flops_per_sample(m, x_test[:64]) for m in models]
    seconds = [seconds_per_sample(m, x_test) for m in models]
    if flops != sorted(flops):
        ctx.log(f"cascade: note: the models are not in order of FLOPs per sample ({[f'{f:.3g}' for f in flops]})")
    temps = [fit_temperature(z, val_y) if options["calibrate"] else 1.0 for z in val_z]
    calibration = [{"model": i, "temperature": t,
                    "val_ece_before": expected_calibration_error(vz, val_y),
                    "val_ece_after": expected_calibration_error(vz, val_y, temperature=t),
                    "test_ece_before": expected_calibration_error(tz, test_y),
                    "test_ece_after": expected_calibration_error(tz, test_y, temperature=t)}
                   for i, t, vz, tz in zip(ids, temps, val_z, test_z)]

    last_val, last_test = accuracy(val_z[-1], val_y), accuracy(test_z[-1], test_y)
    val_points = sweep(list(val_z), val_y, temperatures=temps, flops=flops, seconds=seconds)
    if options["compute_budget"] is not None:
        point, met = choose(val_points, max_flops=options["compute_budget"] * flops[-1])
    else:
        point, met = choose(val_points, min_accuracy=options["accuracy_target"] * last_val)
    test_points = sweep(list(test_z), test_y, temperatures=temps, flops=flops, seconds=seconds)
    at_test = sweep(list(test_z), test_y, temperatures=temps, flops=flops, seconds=seconds,
                    thresholds=torch.tensor([point.threshold]))[0]
    cascade = Cascade(models, temps, point.threshold)
    measured = seconds_per_sample(cascade, x_test)
    metrics = {
        "models": ids, "flops_per_sample": flops, "seconds_per_sample": seconds, "calibration": calibration,
        "threshold": point.threshold, "target_met_on_val": met,
        "val_accuracy": point.accuracy, "test_accuracy": at_test.accuracy,
        "test_mean_flops": at_test.flops, "test_mean_seconds": at_test.seconds,
        "test_measured_seconds": measured, "test_exits": at_test.exits,
        "expensive_test_accuracy": last_test, "expensive_val_accuracy": last_val,
        "accuracy_vs_expensive": at_test.accuracy / last_test if last_test else None,
        "compute_vs_expensive": at_test.flops / flops[-1], "time_vs_expensive": measured / seconds[-1],
    }
    if is_main_process():
        (ctx.run_dir / SWEEP).write_text(json.dumps({
            "val": [p.to_dict() for p in val_points], "test": [p.to_dict() for p in test_points],
            "chosen": {**at_test.to_dict(), "val": point.to_dict()}, **metrics}, indent=1) + "\n")
        plot([p.to_dict() for p in test_points], at_test.to_dict(), ctx.run_dir / PLOT,
             title=f"cascade of {len(models)} ({dataset}, test split)")
    ctx.log(f"cascade: threshold {point.threshold:.4g}: test accuracy {at_test.accuracy:.4f} "
            f"({metrics['accuracy_vs_expensive']:.3f} of the last model's) at {metrics['compute_vs_expensive']:.3f} "
            f"of its FLOPs")
    return StrategyResult(metrics=metrics)


CASCADE = Strategy(
    name="cascade",
    description="run stored models cheap to expensive, each input stopping at the first confident one; "
                "threshold chosen for a target accuracy or compute budget",
    options=(
        Option("models", list, help="stored models, cheap to expensive (recipe steps, store IDs, prefixes or names)",
               ref=True),
        Option("accuracy_target", float, 0.99, "the cheapest threshold whose validation accuracy reaches this "
               "fraction of the last (most expensive) model's", check=fraction),
        Option("compute_budget", float, None, "instead: the most accurate threshold whose mean FLOPs per sample "
               "stay within this fraction of the last model's (replaces --accuracy-target)", check=positive),
        Option("calibrate", bool, True, "temperature-scale each model on the validation split first"),
        *data_options(inherit_from="first model", label_budget=False, classes_help="the dataset's class indices for "
                      "the models' outputs, in order, e.g. 0-4 (default: the first model's classes)"),
        Option("seed", int, 0, "seed of the data split (use the models' own)"),
    ),
    run=run,
    examples=("reuse run cascade --models digits-student digits-0-4 --accuracy-target 0.99",),
)
