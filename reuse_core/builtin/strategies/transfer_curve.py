"""``transfer-curve``: test accuracy against labels per class, fine-tuned from a source model and
trained from scratch, over seeds.

For each seed, one seed for everything: the source, either pretrained here by a strategy
(``--source``, default ``selfsup``, with ``--source-options``) or a stored model (``--model``,
which has seen its own split's training images, so only its split seed is used); then at each
label budget a ``finetune`` of the source per mode and a ``pretrain`` of the source's backbone from
scratch, on the same classes, labelled examples and epochs, each with its other options at their
defaults. Every model is stored with its lineage. The run directory gets ``transfer_curve.json``
(every accuracy, per seed, and the models), ``transfer_curve.md`` (mean ± sd and the gains over
scratch) and ``transfer_curve.png`` (one line per mode and one for scratch).
"""
from __future__ import annotations

import json

from reuse_core.builtin.strategies.finetune import FINETUNE, MODES
from reuse_core.engine.distributed import is_main_process
from reuse_core.strategy import (
    NAME_OPTION, Option, OptionError, Strategy, StrategyResult, data_options, parse_config, parses, positive,
)
from reuse_core.strategy import curve as curves
from reuse_core.strategy.blocks import run_strategy

JSON, MARKDOWN, PLOT = "transfer_curve.json", "transfer_curve.md", "transfer_curve.png"
SCRATCH = "scratch"
# Build settings a backbone takes from the data, not from the source model.
_FROM_DATA = ("in_channels", "input_size", "input_adapter")


def _ints(values: list[str]) -> str | None:
    try:
        bad = [v for v in values if int(v) < 1]
    except ValueError:
        return f"expected whole numbers, got {values}"
    return f"must be >= 1, got {bad}" if bad else None


def _seed_ints(values: list[str]) -> str | None:
    try:
        [int(v) for v in values]
    except ValueError:
        return f"expected whole numbers, got {values}"
    return None


def _modes(values: list[str]) -> str | None:
    bad = [v for v in values if v not in MODES]
    return f"expected fine-tune modes among {', '.join(MODES)}, got {bad}" if bad else None


def label(method: str) -> str:
    return "from scratch" if method == SCRATCH else f"fine-tuned ({method})"


def _split_seed(ctx, model_id: str, dataset: str | None) -> int | None:
    records = ctx.store.manifest(model_id).get("metrics", {}).get("training_data") or []
    seeds = {r.get("seed") for r in records if dataset is None or r.get("dataset") == dataset}
    return seeds.pop() if len(seeds) == 1 else None


def _seeds(ctx, options: dict) -> list[int]:
    given = [int(s) for s in options["seeds"]] if options["seeds"] else None
    if not options["model"]:
        return given or [0, 1, 2]
    source = ctx.model_id(options["model"])
    recorded = _split_seed(ctx, source, options["dataset"] or ctx.store.manifest(source)["dataset"])
    if recorded is None:
        if given is None:
            raise OptionError(f"option 'seeds': model {source} records no single split seed; say which split to "
                              "use (the one it was trained on)")
        return given
    if given not in (None, [recorded]):
        raise OptionError(f"option 'seeds': model {source} was trained on the split of seed {recorded}, whose training "
                          f"images are test images of other seeds; with --model the sweep uses seed {recorded} only")
    return [recorded]


def _scratch_config(manifest: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in manifest["config"].items() if k not in _FROM_DATA]


def run(ctx, options: dict) -> StrategyResult:
    seeds, budgets = _seeds(ctx, options), [int(b) for b in options["budgets"]]
    modes = list(dict.fromkeys(options["modes"]))
    given = parse_config(options["source_options"])
    if options["model"] and given:
        raise OptionError("option 'source_options': it configures --source, which a stored --model replaces")
    data = {k: options[k] for k in ("dataset", "data_root", "dataset_config") if options[k] is not None}
    name = options["name"]
    acc = {m: {k: [] for k in budgets} for m in [*modes, SCRATCH]}
    val = {m: {k: [] for k in budgets} for m in [*modes, SCRATCH]}
    models: dict = {m: {str(k): [] for k in budgets} for m in [*modes, SCRATCH]}
    sources = []
    for seed in seeds:
        if options["model"]:
            source = ctx.model_id(options["model"])
        else:
            named = {"name": f"{name}.source"} if name else {}
            source = run_strategy(ctx, options["source"], f"seed-{seed}/source", {**given, **named, "seed": seed}).model
            if source is None:  # a torchrun job's other processes save nothing
                raise RuntimeError(f"transfer-curve: the source strategy {options['source']!r} saved no model")
        sources.append(source)
        manifest = ctx.store.manifest(source)
        common = {**data, "classes": options["classes"], "epochs": options["epochs"], "seed": seed}
        for k in budgets:
            for method in [*modes, SCRATCH]:
                named = {"name": f"{name}.{method}-{k}"} if name else {}
                if method == SCRATCH:
                    result = run_strategy(ctx, "pretrain", f"seed-{seed}/scratch-{k}", {
                        "backbone": manifest["backbone"], "backbone_config": _scratch_config(manifest) or None,
                        "dataset": manifest["dataset"], **common, "label_budget": k, **named})
                else:
                    result = run_strategy(ctx, "finetune", f"seed-{seed}/{method}-{k}",
                                          {"model": source, "mode": method, **common, "label_budget": k, **named})
                acc[method][k].append(result.metrics["test_accuracy"])
                val[method][k].append(result.metrics["val_accuracy"])
                models[method][str(k)].append(result.model)
            ctx.log(f"transfer-curve: seed {seed}, {k} labels per class: " + ", ".join(
                f"{label(m)} {acc[m][k][-1]:.4f}" for m in [*modes, SCRATCH]))
    summary = curves.summarise(acc, SCRATCH)
    labels = {m: label(m) for m in acc}
    metrics = {
        "seeds": seeds, "budgets": budgets, "modes": modes, "sources": sources, **summary,
        "val_accuracy": {m: {str(k): v for k, v in points.items()} for m, points in val.items()}, "models": models,
        **{f"{m}@{k}": p["mean"] for m, points in summary["methods"].items() for k, p in points.items()},
    }
    if is_main_process():
        (ctx.run_dir / JSON).write_text(json.dumps(metrics, indent=1) + "\n")
        title = f"transfer curve over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
        (ctx.run_dir / MARKDOWN).write_text(curves.markdown(summary, labels, title=f"# {title}"))
        curves.plot(summary, labels, ctx.run_dir / PLOT, title=title)
    ctx.log(f"transfer-curve: {ctx.run_dir / MARKDOWN}")
    trained = [i for seed in range(len(seeds)) for m in models.values() for ids in m.values() if (i := ids[seed])]
    return StrategyResult(metrics=metrics, models=([] if options["model"] else sources) + trained)


TRANSFER_CURVE = Strategy(
    name="transfer-curve",
    description="test accuracy against labels per class: fine-tuned from a source model vs from scratch, over seeds",
    options=(
        Option("model", str, None, "a stored source model (a recipe step, store ID, prefix or name); the sweep then "
               "uses only the seed of the split it was trained on (default: pretrain one per seed with --source)",
               ref=True),
        Option("source", str, "selfsup", "without --model: the registered strategy that pretrains the source model, "
               "once per seed"),
        Option("source_options", list, None, "the source strategy's options as KEY=VALUE, e.g. epochs=20 or "
               "classes=[\"0-4\"] (values are read as JSON where they parse; the seed is the trial's)",
               check=parses(parse_config)),
        *data_options(label_budget=False, inherit_from="source model",
                      classes_help="target class indices to fine-tune to and train from scratch on, e.g. 5-9 "
                                   "(default: all)"),
        Option("budgets", list, ["1", "2", "5", "10"], "labelled training examples per class: a point of the "
               "curve each", check=_ints),
        Option("modes", list, [FINETUNE.option("mode").default], "fine-tune modes: a line of the curve each "
               f"({', '.join(MODES)})", check=_modes),
        Option("seeds", list, None, "trial seeds, each for everything: split, source, fine-tuning and scratch "
               "(default: 0 1 2; with --model, its split seed)", check=_seed_ints),
        Option("epochs", int, 50, "epochs of every fine-tuning and every training from scratch", check=positive),
        Option("name", str, None, "a name prefix for the stored models: NAME.source, NAME.MODE-BUDGET, "
               "NAME.scratch-BUDGET (default: none)", check=NAME_OPTION.check),
    ),
    run=run,
    examples=("reuse run transfer-curve --classes 5-9 --modes full linear --seeds 0 1 2",
              "reuse run transfer-curve --model digits-simclr --classes 5-9 --budgets 1 2 5"),
)
