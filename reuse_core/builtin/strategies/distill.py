"""``distill``: Hinton knowledge distillation from a stored teacher into a fresh student backbone,
through the fused :func:`reuse_core.ops.distill_kl_loss`.

The teacher runs in eval mode without grad. With ``cache_teacher`` its logits for the training set
are computed once, saved in the run directory and looked up by example index each batch (the
engine shuffles; no augmentation is applied to the cached inputs). With a ``label_budget`` only
that many examples per class carry a label for the cross-entropy term; the distillation term uses
every training example, so the teacher labels the rest. ``augment`` (per-example random augmentation)
needs the teacher run online (``cache_teacher`` false), on the same augmented inputs as the student.
A teacher whose training images (its ancestors' included) overlap the test split is refused.

:func:`distill` takes the teacher as any callable from inputs to logits (a model, an ensemble), so
other strategies can distill from what they build.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from reuse_core.engine.checkpoint import load_checkpoint, save_checkpoint
from reuse_core.nn import DistillationLoss
from reuse_core.strategy import (
    NAME_OPTION, TEACHER_OPTION, Option, OptionError, Strategy, StrategyResult, augment_option, backbone_options,
    data_options, non_negative, positive, train_options,
)
from reuse_core.strategy.blocks import (
    augmentation, budget_indices, build_model, check_unseen, finish, fit, load_splits, load_teacher, teacher_logits,
)

Teacher = Callable[[torch.Tensor], torch.Tensor]
CACHE_FILE = "teacher_logits.pt"


class IndexedSplit(Dataset):
    """The training split, remembering which examples the engine's loader fetched, in order.

    The engine loads in this process (``num_workers=0``) one batch at a time, right before it calls
    the loss, so :meth:`take` hands the loss its batch's example indices.
    """

    def __init__(self, data: Dataset):
        self.data = data
        self.classes, self.in_channels, self.input_size = data.classes, data.in_channels, data.input_size
        self.targets = list(data.targets)
        self._fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        self._fetched.append(i)
        return self.data[i]

    def take(self, targets: torch.Tensor) -> torch.Tensor:
        """The indices of the batch with these ``targets``; refuses a batch out of step with them."""
        n = len(targets)
        idx, self._fetched = self._fetched[:n], self._fetched[n:]
        if len(idx) != n or [self.targets[i] for i in idx] != targets.tolist():
            raise RuntimeError("distill: the batch is out of step with the examples the loader fetched "
                               "(the teacher-logit cache needs the engine to load data with num_workers=0)")
        return torch.tensor(idx)


def _cached_logits(ctx, teacher: Teacher, data: Dataset, key: dict) -> torch.Tensor:
    """Compute once per run: a resumed run reads them back from the run directory."""
    path = ctx.run_dir / CACHE_FILE
    if path.exists():
        saved = load_checkpoint(path)
        if saved["key"] == key:
            return saved["logits"]
    logits = teacher_logits(teacher, data, ctx.device)
    save_checkpoint(path, {"key": key, "logits": logits})
    return logits


def distill(ctx, options: dict, teacher: Teacher, *, teacher_ids: list[str], dataset: str,
            classes: list[int]) -> StrategyResult:
    """Train the options' student on ``dataset``/``classes`` from ``teacher`` (any callable from a
    batch of inputs to logits over ``classes``, in eval mode) and save it with ``teacher_ids`` as
    its parents."""
    if options["augment"] != "none" and options["cache_teacher"]:
        raise OptionError(f"option 'augment': --augment {options['augment']} needs --no-cache-teacher: cached teacher "
                          "logits come from the unaugmented images, so the teacher must see each augmented batch")
    train, val, test = load_splits({**options, "label_budget": None}, dataset=dataset, classes=classes)
    check_unseen(ctx, teacher_ids, test, options, dataset=dataset)
    indexed = IndexedSplit(train)
    labelled = torch.zeros(len(train), dtype=torch.bool)
    budget = options["label_budget"]
    labelled[budget_indices(train.targets, budget, options["seed"]) if budget else slice(None)] = True
    cached = None
    if options["cache_teacher"]:
        key = {"teachers": teacher_ids, "dataset": dataset, "classes": classes, "seed": options["seed"], "n": len(train)}
        cached = _cached_logits(ctx, teacher, train, key).to(ctx.device)
    kd_ce = DistillationLoss(options["temperature"], options["kd_weight"], options["ce_weight"])
    kd_only = DistillationLoss(options["temperature"], options["kd_weight"])

    def loss_fn(model, inputs, targets):
        idx = indexed.take(targets)
        outputs = model(inputs)
        if cached is not None:
            t = cached[idx.to(ctx.device)]
        else:
            with torch.no_grad():
                t = teacher(inputs).float()
        mask = labelled[idx].to(inputs.device)
        if bool(mask.all()):
            return kd_ce(outputs, t.to(outputs.dtype), targets), outputs
        loss = kd_only(outputs, t.to(outputs.dtype))
        if bool(mask.any()) and options["ce_weight"] > 0:
            loss = loss + options["ce_weight"] * F.cross_entropy(outputs[mask], targets[mask])
        return loss, outputs

    student, config = build_model(options, train, "student_")
    fitted = fit(ctx, student, indexed, val, options, loss_fn=loss_fn, augment=augmentation(options, train),
                 num_workers=0)
    return finish(ctx, student, fitted=fitted, test=test, backbone=options["student_backbone"], config=config,
                  dataset=dataset, classes=train.classes, parents=teacher_ids, options=options, train=train,
                  labelled=int(labelled.sum()))


def run(ctx, options: dict) -> StrategyResult:
    teacher, teacher_id, dataset, classes = load_teacher(ctx, options)
    return distill(ctx, options, teacher, teacher_ids=[teacher_id], dataset=dataset, classes=classes)


def teacher_options() -> tuple[Option, ...]:
    """The distillation options every teacher->student strategy shares."""
    return (
        Option("temperature", float, 4.0, "softmax temperature of the distillation term", check=positive),
        Option("kd_weight", float, 0.9, "weight of the distillation (KL) term", check=non_negative),
        Option("ce_weight", float, 0.1, "weight of the cross-entropy term on the labelled examples", check=non_negative),
        Option("cache_teacher", bool, True, "run the teacher once over the training set and reuse its logits "
               "(saved in the run directory) instead of running it on every batch"),
        augment_option(extra=". Needs --no-cache-teacher: the teacher then sees each augmented batch too"),
        *backbone_options("student_", what="student"),
        *data_options(classes_help="the dataset's class indices for the teacher's outputs, in order (default: the teacher's classes)",
                      inherit_from="teacher",
                      budget_help="labelled training examples per class for the cross-entropy term; the "
                                  "distillation term uses every training example (default: all labelled)"),
    )


DISTILL = Strategy(
    name="distill",
    description="Hinton knowledge distillation of a stored teacher into a fresh (usually smaller) student",
    options=(
        TEACHER_OPTION,
        *teacher_options(),
        *train_options(),
        NAME_OPTION,
    ),
    run=run,
    examples=("reuse run distill --teacher digits-0-4 --student-backbone mlp "
              "--student-backbone-config 'hidden=[64]'",),
)
