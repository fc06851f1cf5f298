"""``merge``: one model from the weights of several, by the methods of
:func:`reuse_core.combine.merge` (linear, task arithmetic, TIES, DARE-linear, DARE-TIES, SLERP),
saved with the merged models and the base as its parents.

The models must share the base (it is among each one's ancestors) and its architecture (backbone,
config, parameter names and shapes); the first that does not is named. ``--select-scale`` picks λ
from :data:`~reuse_core.combine.SCALE_GRID` (0.1, 0.2, ..., 2.0) by validation accuracy (ties:
the lower validation loss); the test split is only reported.

Models trained on different classes (a parent fine-tuned once to digits 0-4 and once to 5-9) are
merged with stacked heads: every layer but the heads is merged by the method, and the heads are
stacked into one head over the union of the classes (:func:`~reuse_core.combine.stack_heads`).
The merged model's classes are the first model's, then each next model's new ones, in their
order; a class's head row is the mean of the rows of the models that predict it, so a class that
only one model knows keeps that model's row. The heads are merged like any other layer only when
every model predicts the base's classes (or, without a base, the first model's).

Besides the merged model's validation and test accuracy, the result reports each model on its own
classes' test examples and the ensemble of the models (their logits side by side over the union
of the classes, a class's logit the mean over the models that predict it): what merging the
weights costs against running every model.
"""
from __future__ import annotations

import torch

from reuse_core import backbone
from reuse_core.combine import MERGE_METHODS, SCALE_GRID, MergeError, merge, stack_heads, stack_logits, union_classes
from reuse_core.combine.merge import DEFAULT_DENSITY, DEFAULT_DROP, DEFAULT_T, TASK_VECTOR_METHODS
from reuse_core.strategy import (
    NAME_OPTION, Option, OptionError, Strategy, StrategyResult, data_options, parse_classes, parses,
)
from reuse_core.strategy.blocks import class_indices, evaluate, load_splits, teacher_logits

# Which methods each method-specific option belongs to, and its default there.
OWNERS = {"density": ("ties",), "drop": ("dare-linear", "dare-ties"), "t": ("slerp",)}
DEFAULTS = {"density": DEFAULT_DENSITY, "drop": DEFAULT_DROP, "t": DEFAULT_T}


def _in(low: float, high: float, *, open_low: bool = False, open_high: bool = False):
    def check(v) -> str | None:
        ok = (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
        return None if ok else f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}, got {v}"
    return check


def check_options(options: dict) -> None:
    """OptionError for an option the method does not take, or a missing one it needs."""
    method = options["method"]
    for name, owners in OWNERS.items():
        if options[name] is not None and method not in owners:
            raise OptionError(f"option {name!r} belongs to {' and '.join(owners)}, not to method {method!r}")
    n = len(options["models"])
    if n < 2 or (method == "slerp" and n != 2):
        raise OptionError(f"option 'models': {method} merges {'exactly' if method == 'slerp' else 'at least'} 2 "
                          f"models, got {n}")
    if method in TASK_VECTOR_METHODS and not options["base"]:
        raise OptionError(f"option 'base' is required by method {method!r}: its task vectors are model - base")
    if method == "slerp" and options["base"]:
        raise OptionError("option 'base': slerp takes no base, it interpolates the two models themselves")
    if method == "slerp" and options["weights"]:
        raise OptionError("option 'weights': slerp takes --t, not weights")
    if options["weights"] and len(options["weights"]) != n:
        raise OptionError(f"option 'weights': {len(options['weights'])} given for {n} models")
    if method not in TASK_VECTOR_METHODS and (options["scale"] != 1.0 or options["select_scale"]):
        which = "select_scale" if options["select_scale"] else "scale"
        raise OptionError(f"option {which!r}: λ scales task vectors ({', '.join(TASK_VECTOR_METHODS)}), "
                          f"not a {method} merge")
    if options["select_scale"] and options["scale"] != 1.0:
        raise OptionError("option 'scale': --select-scale chooses λ itself; give one or the other")


def _ancestors(manifest: dict) -> set[str]:
    lineage = manifest["lineage"]
    return {*lineage.get("parents", []), *(lineage.get("ancestry") or {})}


def _check_models(ids: list[str], manifests: list[dict], base_id: str | None, base: dict | None) -> None:
    """MergeError naming the first model whose backbone or config differs from the reference (the
    base, else the first model), or that does not descend from the base."""
    ref_id, ref = (base_id, base) if base is not None else (ids[0], manifests[0])
    for i, m in zip(ids, manifests):
        if (m["backbone"], m["config"]) != (ref["backbone"], ref["config"]):
            raise MergeError(f"merge: model {i} is a {m['backbone']} with config {m['config']}, but {ref_id} is a "
                             f"{ref['backbone']} with config {ref['config']}: merged models share an architecture")
        if base is not None and base_id not in _ancestors(m):
            raise MergeError(f"merge: model {i} does not descend from the base {base_id} (its parents: "
                             f"{', '.join(m['lineage'].get('parents') or []) or 'none'}): task vectors are "
                             "differences from the model the others were fine-tuned from")


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).float().mean())


def _own_accuracy(logits: torch.Tensor, columns: list[int], targets: torch.Tensor) -> float:
    """A model's accuracy on the examples of its own classes (``columns``: their indices in the union)."""
    columns = torch.tensor(columns)
    mine = torch.isin(targets, columns)
    return float((columns[logits[mine].argmax(-1)] == targets[mine]).float().mean())


def run(ctx, options: dict) -> StrategyResult:
    check_options(options)
    method = options["method"]
    ids = [ctx.model_id(r) for r in options["models"]]
    if len(set(ids)) != len(ids):
        raise OptionError(f"option 'models': a model is given twice ({', '.join(ids)})")
    loaded = [ctx.store.load(i) for i in ids]
    states, manifests = [s for s, _ in loaded], [m for _, m in loaded]
    base_id = ctx.model_id(options["base"]) if options["base"] else None
    base_state, base = ctx.store.load(base_id) if base_id else (None, None)
    _check_models(ids, manifests, base_id, base)

    model, first = ctx.load_model(ids[0])
    dataset = options["dataset"] or first["dataset"]
    if dataset is None:
        raise OptionError(f"option 'dataset': model {ids[0]} has no recorded dataset (it was imported); say which "
                          "dataset to evaluate on")
    model_classes = [m["classes"] for m in manifests]
    stacked = any(c != (base or first)["classes"] for c in model_classes)
    head = model.head_name + "."
    heads = [{k[len(head):]: v for k, v in s.items() if k.startswith(head)} for s in states]
    stacked_head = {}
    if stacked:  # the heads take no part in the merge; they are stacked after it
        states = [{k: v for k, v in s.items() if not k.startswith(head)} for s in states]
        if base_state is not None:
            base_state = {k: v for k, v in base_state.items() if not k.startswith(head)}
        rows, classes = stack_heads(heads, model_classes)
        stacked_head = {head + k: v for k, v in rows.items()}
        backbone.replace_head(model, len(classes))
    else:
        classes = first["classes"]
    indices = parse_classes(options["classes"]) or class_indices(dataset, classes, options)
    if len(indices) != len(classes):
        raise OptionError(f"option 'classes': the merged model has {len(classes)} outputs, got {len(indices)} classes")
    _, val, test = load_splits(options, dataset=dataset, classes=indices)
    buffers = {n for n, _ in model.named_buffers()}
    weights = [float(w) for w in options["weights"]] if options["weights"] else None
    settings = {k: DEFAULTS[k] if options[k] is None else options[k] for k, owners in OWNERS.items()
                if method in owners}

    def merged(scale: float) -> dict:
        # a fresh generator each call: the final DARE merge draws the masks the sweep saw
        return merge(base_state, {f"model {i}": sd for i, sd in zip(ids, states)}, method, weights=weights,
                     scale=scale, buffers=buffers, generator=torch.Generator().manual_seed(options["seed"]), **settings)

    def score(state: dict, data) -> dict:
        model.load_state_dict({**state, **stacked_head})
        return evaluate(model, data, ctx.device)

    sweep = []
    scale = options["scale"]
    if options["select_scale"]:
        unit = merged(1.0)  # base + τ: base + λ·τ is then task arithmetic on it alone, without merging again
        for lam in SCALE_GRID:
            m = score(merge(base_state, [unit], "task-arithmetic", scale=lam, buffers=buffers), val)
            sweep.append({"scale": lam, "val_accuracy": m["accuracy"], "val_loss": m["loss"]})
        scale = max(sweep, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["scale"]
    state = {**merged(scale), **stacked_head}
    val_m, test_m = score(state, val), score(state, test)

    # every model on its own, and side by side over the union of the classes
    members = [ctx.load_model(i)[0].eval() for i in ids]
    val_z, test_z = ([teacher_logits(m, data, ctx.device) for m in members] for data in (val, test))
    val_y, test_y = torch.as_tensor(val.targets), torch.as_tensor(test.targets)
    metrics = {"test_accuracy": test_m["accuracy"], "test_loss": test_m["loss"], "val_accuracy": val_m["accuracy"],
               "method": method, "scale": scale if method in TASK_VECTOR_METHODS else None, "scale_sweep": sweep,
               "stacked_heads": stacked, "weights": weights, "models": ids, "base": base_id, **settings,
               "ensemble_val_accuracy": _accuracy(stack_logits(val_z, model_classes), val_y),
               "ensemble_test_accuracy": _accuracy(stack_logits(test_z, model_classes), test_y),
               "models_test_accuracy": [_own_accuracy(z, cols, test_y)
                                        for z, cols in zip(test_z, union_classes(model_classes)[1])]}
    parents = ids + ([base_id] if base_id else [])
    model_id = ctx.save(state, backbone=first["backbone"], config=first["config"], dataset=dataset, classes=classes,
                        metrics=metrics, parents=parents, options=options, name=options["name"])
    if model_id is None:  # not the main process of a torchrun job: it saved nothing
        return StrategyResult(metrics=metrics)
    lam = (f" at λ = {scale:g}" + (" (selected on validation)" if sweep else "")) if method in TASK_VECTOR_METHODS \
        else ""
    ctx.log(f"merge: {method} of {len(ids)} models{lam}{', heads stacked' if stacked else ''}: test accuracy "
            f"{metrics['test_accuracy']:.4f} (ensemble of the models {metrics['ensemble_test_accuracy']:.4f})")
    return StrategyResult(metrics=metrics, models=[model_id])


MERGE = Strategy(
    name="merge",
    description="merge the weights of models fine-tuned from one base (task arithmetic, TIES, DARE, SLERP, linear); "
                "specialists with different classes get stacked heads",
    options=(
        Option("models", list, help="the models to merge (recipe steps, store IDs, prefixes or names), fine-tuned "
               "from --base; first model first in the merged model's classes", ref=True),
        Option("method", str, help="linear: weighted mean; task-arithmetic: base + λ·Σ w·τ; ties: trim, elect "
               "signs, disjoint mean; dare-linear / dare-ties: drop and rescale τ, then task arithmetic / TIES "
               "without trimming; slerp: spherical interpolation of 2 models", choices=MERGE_METHODS),
        Option("base", str, None, "the model the others were fine-tuned from (task vectors τ = model - base); "
               "required by task-arithmetic, ties and dare-*, refused by slerp", ref=True),
        Option("weights", list, None, "one weight per model (default: equal; linear normalises them, task "
               "arithmetic sums w·τ, ties weights the sign vote and the mean)",
               check=parses(lambda ws: [float(w) for w in ws])),
        Option("scale", float, 1.0, "λ: the result is base + λ·τ (task-vector methods)"),
        Option("select_scale", bool, False, "choose λ from 0.1, 0.2, ..., 2.0 by validation accuracy "
               "(task-vector methods)"),
        Option("density", float, None, f"ties: the fraction of each task vector kept, by magnitude (default "
               f"{DEFAULT_DENSITY})", check=_in(0, 1, open_low=True)),
        Option("drop", float, None, f"dare-*: the probability of dropping each task-vector entry (default "
               f"{DEFAULT_DROP})", check=_in(0, 1, open_high=True)),
        Option("t", float, None, f"slerp: where between the first (0) and the second model (1) (default {DEFAULT_T})",
               check=_in(0, 1)),
        *data_options(inherit_from="first model", label_budget=False, classes_help="the dataset's class indices for "
                      "the merged model's outputs, in order (default: the models' classes, by name)"),
        Option("seed", int, 0, "seed of the data split (use the models' own) and of DARE's masks"),
        NAME_OPTION,
    ),
    run=run,
    examples=("reuse run merge --base parent --models ft-0-4 ft-5-9 --method ties --select-scale",
              "reuse run merge --models ft-a ft-b --method slerp --t 0.3"),
)
