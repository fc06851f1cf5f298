"""The building blocks of a strategy, as the built-in ones use them.

Each reads the resolved options by the names of the shared option groups
(:func:`~reuse_core.strategy.data_options`, :func:`~reuse_core.strategy.train_options`,
:func:`~reuse_core.strategy.backbone_options`):

- data: :func:`load_splits` (class subset, label budget, ``dataset_config``), :func:`class_indices`;
- models: :func:`build_model` (a fresh registered backbone sized for the data), :func:`load_teacher`,
  :func:`load_stored`, :func:`teacher_logits`, and :class:`FeatureTaps` with :func:`spatial_blocks`
  and :func:`pair_blocks` for losses on intermediate features;
- training: :func:`augmentation` (the ``augment`` option's pipeline, random per example) and
  :func:`fit` (the engine, in the run directory, with the run's hooks; resumes with the run);
- what a model has seen: :func:`training_data` (the record of its training images, its ancestors'
  included, kept in its metrics) and :func:`check_unseen` (refuses a model that has seen the run's
  test images);
- results: :func:`evaluate`, and :func:`finish`, which evaluates on the test split, saves through
  :meth:`RunContext.save <reuse_core.strategy.context.RunContext.save>` and returns the result;
- composition: :func:`run_strategy` runs another registered strategy as a part of this run.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from reuse_core import data, engine, plugins
from reuse_core.backbone import BackboneError
from reuse_core.backbone import build as build_backbone
from reuse_core.data.base import ClassesError
from reuse_core.engine import evaluate
from reuse_core.engine.distributed import is_main_process
from reuse_core.files import read_json, write_json
from reuse_core.strategy.context import RunContext
from reuse_core.strategy.options import TRAIN_KEYS, parse_classes, parse_config
from reuse_core.strategy.schema import OptionError, StrategyResult

if TYPE_CHECKING:
    from reuse_core.data.augment import Augment

__all__ = [
    "FeatureTaps", "Subset", "adapt_inputs", "augmentation", "budget_indices", "build_model", "check_unseen",
    "class_indices", "describe_adapter", "evaluate", "finish", "fit", "load_dataset", "load_splits", "load_stored",
    "load_teacher", "pair_blocks", "run_strategy", "spatial_blocks", "teacher_logits", "train_config", "training_data",
]

# The provider arguments every dataset takes; dataset_config may not set them.
_PROVIDER_ARGS = ("split", "seed", "classes", "root")
_PART_RESULT = "result.json"  # what a part of a run (run_strategy) returned, in its folder


class Subset(Dataset):
    """Some examples of a dataset, keeping the dataset contract's attributes."""

    def __init__(self, data: Dataset, positions: list[int]):
        self.data, self.positions = data, list(positions)
        self.classes, self.in_channels, self.input_size = data.classes, data.in_channels, data.input_size
        self.targets = [data.targets[i] for i in self.positions]
        whole = getattr(data, "indices", None)  # the dataset contract's image positions, where it has them
        self.indices = None if whole is None else [whole[i] for i in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.data[self.positions[i]]


def budget_indices(targets: list[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` examples of each class (all of a class that has fewer), drawn with ``seed``:
    the same draw for every strategy given the same data and seed, so baselines see the same labels."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    picked = []
    for c in sorted(by_class):
        members = by_class[c]
        order = torch.randperm(len(members), generator=g).tolist()
        picked.extend(members[j] for j in order[:per_class])
    return sorted(picked)


def load_dataset(name: str, options: dict, *, split: str, classes: list[int] | None = None):
    """One split of dataset ``name`` with the options' seed, ``data_root`` and ``dataset_config``;
    a setting the provider does not take is an :class:`OptionError` naming the ones it does."""
    config = parse_config(options.get("dataset_config"))
    if config:
        params = inspect.signature(plugins.datasets().get(name)).parameters.values()
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        known = [p.name for p in params if p.name not in _PROVIDER_ARGS and p.kind is p.KEYWORD_ONLY]
        bad = [k for k in config if k in _PROVIDER_ARGS or not (takes_any or k in known)]
        if bad:
            raise OptionError(f"option 'dataset_config': dataset {name!r} has no setting {', '.join(map(repr, bad))} "
                              f"(its settings: {', '.join(known) or 'none'})")
    kw = {"root": options["data_root"]} if options.get("data_root") else {}
    try:
        return data.load(name, split=split, seed=options["seed"], classes=classes, **kw, **config)
    except ClassesError as e:
        raise OptionError(f"option 'classes': dataset {name!r}: {e}") from None


def load_splits(options: dict, *, dataset: str | None = None,
                classes: list[int] | None = None) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, test) of the options' dataset and classes (or the ones given); the training split
    cut to ``label_budget`` examples per class when set."""
    name = dataset or options["dataset"]
    classes = classes if classes is not None else parse_classes(options["classes"])
    train, val, test = (load_dataset(name, options, split=s, classes=classes) for s in ("train", "val", "test"))
    if options.get("label_budget"):
        train = Subset(train, budget_indices(train.targets, options["label_budget"], options["seed"]))
    return train, val, test


def class_indices(dataset: str, names: list[str], options: dict) -> list[int]:
    """The dataset's indices of the classes a model was trained on (stored by name)."""
    every = load_dataset(dataset, options, split="val").classes
    missing = [n for n in names if n not in every]
    if missing:
        raise ValueError(f"the model's classes {missing} are not classes of dataset {dataset!r}")
    return [every.index(n) for n in names]


def build_model(options: dict, data: Dataset, prefix: str = "") -> tuple[nn.Module, dict]:
    """(a fresh ``{prefix}backbone`` for ``data``'s classes and channels, the config to store with it);
    the initial weights follow the options' seed."""
    name = options[f"{prefix}backbone"]
    given = parse_config(options[f"{prefix}backbone_config"])
    params = inspect.signature(plugins.backbones().get(name)).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        settings = [p for p in params if p not in ("num_classes", "in_channels")]
        bad = [k for k in given if k not in settings]
        if bad:
            raise OptionError(f"option '{prefix}backbone_config': backbone {name!r} has no setting "
                              f"{', '.join(map(repr, bad))} (its settings: {', '.join(settings) or 'none'})")
    config = {"in_channels": data.in_channels, **given}
    # Backbones sized for their input (seed-cnn, mlp) take it from the data unless the config says.
    height, width = data.input_size
    if height == width and "input_size" in params:
        config.setdefault("input_size", height)
    torch.manual_seed(options["seed"])
    try:
        return build_backbone(name, len(data.classes), **config), config
    except BackboneError:  # the backbone breaks its contract: not a matter of the settings
        raise
    except (TypeError, ValueError, RuntimeError) as e:  # a setting of the right name but a value it cannot take
        raise OptionError(f"option '{prefix}backbone_config': backbone {name!r} cannot be built with {given}: "
                          f"{type(e).__name__}: {e}") from None


def train_config(ctx, options: dict, **overrides) -> engine.TrainConfig:
    """The engine's TrainConfig from the training options; ``overrides`` set other fields."""
    return engine.TrainConfig(**{k: options[k] for k in TRAIN_KEYS}, progress=not ctx.quiet, **overrides)


def augmentation(options: dict, data: Dataset) -> Augment | None:
    """The pipeline of the options' ``augment`` strength (:func:`~reuse_core.strategy.augment_option`)
    for ``data``'s images: a callable from a batch (N, C, H, W) to a batch of the same shape, each
    example with its own random parameters; None for ``"none"``."""
    from reuse_core.data.augment import pipeline  # torchvision: only when a run augments

    return pipeline(options.get("augment") or "none", channels=data.in_channels, size=tuple(data.input_size))


def fit(ctx, model: nn.Module, train: Dataset, val: Dataset | None, options: dict, *, loss_fn=None,
        augment: Augment | None = None, run_dir: Path | None = None, **config) -> engine.FitResult:
    """Train through the engine in the run directory, with the run's hooks; resumes when the run does.
    ``loss_fn(model, inputs, targets) -> (loss, outputs)`` (default: cross-entropy); ``augment``: a
    batch augmentation (:func:`augmentation`) applied to the training inputs before ``loss_fn`` sees
    them; ``run_dir``: another folder for this training (one phase of several); ``config``:
    TrainConfig fields beyond the training options (``num_workers=0``, say)."""
    loss_fn = loss_fn or engine.cross_entropy
    if augment is not None:
        plain = loss_fn

        def loss_fn(model, inputs, targets):
            return plain(model, augment(inputs), targets)
    return engine.fit(model, train, val, config=train_config(ctx, options, **config), run_dir=run_dir or ctx.run_dir,
                      hooks=ctx.hooks, strategy=ctx.strategy, resume=ctx.resume, device=ctx.device,
                      options=options, loss_fn=loss_fn)


def training_data(ctx, options: dict, train: Dataset | None, *, dataset: str, labelled: int | None = None,
                  parents: list[str] = ()) -> list[dict]:
    """What a model is about to be trained on, for its metrics' ``training_data``: one record of
    ``train`` (dataset, ``data_root``, ``dataset_config``, split seed, classes, how many examples
    had their label used (``labelled``, None: all), and the images: the dataset's ``indices``, None
    where it has none; no record when ``train`` is None), then the records of the ``parents``
    (store IDs) and their ancestors, each naming the model that trained on them."""
    records = []
    if train is not None:
        records.append({
            "dataset": dataset, "data_root": options.get("data_root"), "dataset_config": options.get("dataset_config"),
            "split": "train", "seed": options["seed"], "classes": list(train.classes),
            "labelled": len(train) if labelled is None else labelled, "examples": len(train),
            "images": None if getattr(train, "indices", None) is None else sorted(train.indices)})
    for pid in parents:
        for rec in ctx.store.manifest(pid).get("metrics", {}).get("training_data") or []:
            rec = {**rec, "model": rec.get("model") or pid}
            if rec not in records:
                records.append(rec)
    return records


def check_unseen(ctx, model_ids: list[str], test: Dataset, options: dict, *, dataset: str) -> None:
    """Refuse, with an :class:`OptionError` naming ``seed``, models (store IDs) that were trained,
    or whose ancestors were, on images of this run's ``test`` split: their test accuracy would be
    measured on images they have seen (a model pretrained on one seed's training split has seen part
    of every other seed's test split). Runs only where the dataset gives ``indices``."""
    test_images = set(getattr(test, "indices", None) or ())
    for mid in model_ids:
        for rec in ctx.store.manifest(mid).get("metrics", {}).get("training_data") or []:
            same_data = (rec.get("dataset"), rec.get("data_root"), rec.get("dataset_config")) == \
                (dataset, options.get("data_root"), options.get("dataset_config"))
            seen = test_images.intersection(rec.get("images") or ()) if same_data else ()
            if seen:
                who = f"model {mid}" if rec.get("model", mid) == mid else f"model {mid}'s ancestor {rec['model']}"
                labels = "their labels unused" if rec.get("labelled") == 0 else "with labels"
                raise OptionError(
                    f"option 'seed': {who} was trained on {len(rec['images'])} images of the training split of "
                    f"{dataset!r} drawn with seed {rec.get('seed')} ({labels}), and {len(seen)} of them are in this "
                    f"run's test split (seed {options['seed']}): its test accuracy would be measured on images it "
                    f"has seen. Use seed {rec.get('seed')}, the split the model was trained on, or a model trained "
                    f"with seed {options['seed']}")


def finish(ctx, model: nn.Module, *, fitted: engine.FitResult, test: Dataset, backbone: str, config: dict,
           dataset: str, classes: list, parents: list[str], options: dict, train: Dataset | None = None,
           labelled: int | None = None, metrics: dict | None = None) -> StrategyResult:
    """Evaluate ``model`` on the test split, save it through ``ctx.save`` (named by the options'
    ``name``), and return the run's result: test and validation accuracy and loss, epochs,
    training examples, what it and its parents were trained on (:func:`training_data` of
    ``train``, of which ``labelled`` examples had their label used, None: all; give ``train`` so
    later runs can check it), the strategy's own ``metrics`` (JSON values), and the saved model's
    ID."""
    test_metrics = evaluate(model, test, ctx.device)
    metrics = {
        "test_accuracy": test_metrics["accuracy"], "test_loss": test_metrics["loss"],
        "val_accuracy": fitted.last_val_accuracy, "best_val_accuracy": fitted.best_val_accuracy,
        "epochs": len(fitted.epochs), "train_examples": fitted.epochs[-1]["samples"] if fitted.epochs else 0,
        "training_data": training_data(ctx, options, train, dataset=dataset, labelled=labelled, parents=parents),
        **(metrics or {}),
    }
    model_id = ctx.save(model, backbone=backbone, config=config, dataset=dataset, classes=classes, metrics=metrics,
                        parents=parents, options=options, name=options.get("name"))
    return StrategyResult(metrics=metrics, models=[model_id] if model_id else [])


def adapt_inputs(manifest: dict, data: Dataset) -> dict | None:
    """How inputs of ``data`` must be adapted for the stored model of ``manifest`` (an
    :class:`~reuse_core.backbone.InputAdapter` config), or None when they fit: the channels the
    model was built for (grey repeated, colour averaged to grey) and its input size (exactly the
    size it was built for, or up to its backbone's minimum). Raises OptionError when the channels
    cannot be matched."""
    config = manifest["config"]
    want_c = int(config.get("in_channels", 3))
    have_c = data.in_channels
    if have_c != want_c and 1 not in (have_c, want_c):
        raise OptionError(f"model {manifest['id']} takes {want_c}-channel images and the data has {have_c} channels; "
                          "only grey <-> colour can be adapted")
    meta = plugins.backbones().entry(manifest["backbone"]).meta if manifest["backbone"] in plugins.backbones() else {}
    h, w = data.input_size
    exact = config.get("input_size", config.get("image_size", 224 if meta.get("fixed_input_size") else None))
    if exact is not None:
        size = (int(exact), int(exact))
    else:
        low = meta.get("min_input_size") or 1
        size = (max(h, low), max(w, low))
    if have_c == want_c and size == (h, w):
        return None
    return {"channels": want_c, "size": list(size)}


def describe_adapter(adapter: dict, data: Dataset) -> str:
    """``adapt_inputs``'s result in words, for the run's log."""
    h, w = data.input_size
    c = adapter["channels"]
    steps = []
    if c != data.in_channels:
        steps.append(f"grey images repeated to {c} channels" if data.in_channels == 1 else "colour images averaged to grey")
    if tuple(adapter["size"]) != (h, w):
        steps.append(f"{h}x{w} images resized to {adapter['size'][0]}x{adapter['size'][1]} (bilinear)")
    return "; ".join(steps)


def _check_trained_head(manifest: dict, option: str) -> None:
    if manifest.get("metrics", {}).get("head_trained") is False:
        strategy = manifest.get("lineage", {}).get("strategy")
        raise OptionError(f"option {option!r}: model {manifest['id']} was pretrained without labels ({strategy}): its "
                          f"head was never trained, so its outputs predict nothing; fine-tune it first "
                          f"(reuse run finetune --model {manifest['id']} ...)")


def load_teacher(ctx, options: dict) -> tuple[nn.Module, str, str, list[int]]:
    """(the options' ``teacher`` in eval mode without grad, its store ID, the dataset and the class
    indices to train on): by default the teacher's own dataset and classes. A model whose head was
    never trained (``selfsup``'s) is refused."""
    teacher_id = ctx.model_id(options["teacher"])
    teacher, manifest = ctx.load_model(teacher_id)
    _check_trained_head(manifest, "teacher")
    teacher.eval().requires_grad_(False)
    dataset = options["dataset"] or manifest["dataset"]
    classes = parse_classes(options["classes"]) or class_indices(dataset, manifest["classes"], options)
    if len(classes) != len(manifest["classes"]):
        raise OptionError(f"strategy {ctx.strategy!r}: option 'classes': the teacher has {len(manifest['classes'])} "
                          f"outputs, got {len(classes)} classes")
    return teacher, teacher_id, dataset, classes


def load_stored(ctx, refs: list[str], options: dict, what: str = "model"):
    """(IDs, the stored models ``refs`` in eval mode, their manifests, the dataset, its validation and
    test splits for their classes); refuses models whose classes differ, and models whose head was
    never trained."""
    ids = [ctx.model_id(r) for r in refs]
    loaded = [ctx.load_model(i) for i in ids]
    manifests = [m for _, m in loaded]
    for m in manifests:
        _check_trained_head(m, f"{what}s")
    first = manifests[0]
    for i, m in zip(ids, manifests):
        if m["classes"] != first["classes"]:
            raise ValueError(f"{ctx.strategy}: {what} {i} predicts classes {m['classes']}, but {ids[0]} predicts "
                             f"{first['classes']}: {what}s must share their classes, in order")
    dataset = options["dataset"] or first["dataset"]
    classes = parse_classes(options["classes"]) or class_indices(dataset, first["classes"], options)
    _, val, test = load_splits(options, dataset=dataset, classes=classes)
    return ids, [model.eval() for model, _ in loaded], manifests, dataset, val, test


def teacher_logits(teacher, data: Dataset, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """``teacher``'s logits (any callable from a batch of inputs to logits) for every example of
    ``data``, in order, as a float32 CPU tensor."""
    out = []
    with torch.no_grad():
        for x, _ in DataLoader(data, batch_size=batch_size):
            out.append(teacher(x.to(device)).float().cpu())
    return torch.cat(out)


class FeatureTaps:
    """Records the outputs of some of a model's blocks (submodule names) on every forward pass, in
    ``outputs[name]``; :meth:`remove` (or leaving a ``with`` block) takes the hooks off."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(n).register_forward_hook(self._recorder(n)) for n in names]

    def _recorder(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def spatial_blocks(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The model's feature blocks (``block_names``) whose output on ``sample`` is a (N, C, H, W) map,
    in forward order."""
    was_training = model.training
    with FeatureTaps(model, list(model.block_names)) as taps, torch.no_grad():
        model.eval()(sample)
    model.train(was_training)
    return [n for n in model.block_names if taps.outputs[n].dim() == 4]


def pair_blocks(teacher: nn.Module, student: nn.Module, sample: torch.Tensor,
                given: list[str] | None = None, *, option: str = "pairs") -> list[tuple[str, str]]:
    """Which teacher block's features each student block learns from: ``given`` as
    ``"teacher_block:student_block"`` items (checked against both models' ``block_names``), else the
    last k spatial blocks of each, in order (k the smaller count)."""
    if given:
        pairs = [tuple(p.split(":", 1)) for p in given]
        for t, s in pairs:
            for model, name, who in ((teacher, t, "teacher"), (student, s, "student")):
                if name not in model.block_names:
                    raise OptionError(f"option {option!r}: the {who} has no block {name!r} "
                                      f"(its blocks: {', '.join(model.block_names)})")
        return pairs
    tb, sb = spatial_blocks(teacher, sample), spatial_blocks(student, sample)
    k = min(len(tb), len(sb))
    if k == 0:
        raise OptionError("the teacher or the student has no feature block with a spatial (N, C, H, W) output")
    return list(zip(tb[-k:], sb[-k:]))


def run_strategy(ctx, name: str, key: str, options: dict) -> StrategyResult:
    """Run the registered strategy ``name`` with ``options`` (raw values, as ``reuse_core.run`` takes
    them) as a part of this run: in ``run_dir/key``, with this run's store, hooks and device. Its
    models are saved with this run's identity and ``key``, so a resumed run stores nothing twice:
    a part that finished returns its recorded result, an interrupted one continues from its
    checkpoint."""
    strategy = plugins.strategies().get(name)
    resolved = strategy.resolve(options, where=f"strategy {ctx.strategy!r}, part {key!r} ({name})")
    part = RunContext(strategy=name, store=ctx.store, hooks=ctx.hooks, run_dir=ctx.run_dir / key, device=ctx.device,
                      resume=ctx.resume, quiet=ctx.quiet, refs=ctx.refs,
                      run_id=f"{ctx.run_id}/{key}" if ctx.run_id else None)
    done = read_json(part.run_dir / _PART_RESULT) if ctx.resume else None
    if done is not None:
        return StrategyResult(metrics=done["metrics"], models=done["models"], run_dir=str(part.run_dir))
    if is_main_process():
        part.run_dir.mkdir(parents=True, exist_ok=True)
    result = strategy.run(part, resolved)
    result.run_dir = str(part.run_dir)
    if is_main_process():
        write_json(part.run_dir / _PART_RESULT, {"strategy": name, "options": resolved, "metrics": result.metrics,
                                                 "models": result.models})
    return result
