"""``distill``: Hinton knowledge distillation from a stored teacher into a fresh student backbone,
through the fused :func:`reuse_core.ops.distill_kl_loss`.

The teacher runs in eval mode without grad. With ``cache_teacher`` its logits for the training set
are computed once, saved in the run directory and looked up by example index each batch (the
engine shuffles; no augmentation is applied to the cached inputs). ``teacher_topk`` K keeps only
the top-K ids (int32) and log-probabilities at the distillation temperature (float16) per example
(per position for sequence outputs), and the student trains from them through
:func:`reuse_core.ops.fused_linear_distill_loss`: its head (an ``nn.Linear``) is the fused linear
layer and the mass off the kept ids is one more outcome (the ``"bucket"`` tail). The cache's size
and its ratio to the dense cache are logged and recorded in the metrics (``teacher_cache``). With a ``label_budget`` only
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
from torch.utils.data import DataLoader, Dataset

from reuse_core.backbone import get_head
from reuse_core.engine.checkpoint import load_checkpoint, save_checkpoint
from reuse_core.nn import DistillationLoss
from reuse_core.ops import SparseTeacher, fused_linear_distill_loss
from reuse_core.strategy import (
    NAME_OPTION, TEACHER_OPTION, Option, OptionError, Strategy, StrategyResult, augment_option, backbone_options,
    data_options, non_negative, positive, train_options,
)
from reuse_core.strategy.blocks import (
    augmentation, budget_indices, build_model, check_unseen, finish, fit, load_splits, load_teacher, teacher_logits,
)

Teacher = Callable[[torch.Tensor], torch.Tensor]
CACHE_FILE = "teacher_logits.pt"
TOPK_FILE = "teacher_topk.pt"


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


def _cached(ctx, file: str, key: dict, compute: Callable[[], dict]) -> dict:
    """Compute once per run: a resumed run reads the tensors back from the run directory."""
    path = ctx.run_dir / file
    if path.exists():
        saved = load_checkpoint(path)
        if saved.pop("key") == key:
            return saved
    tensors = compute()
    save_checkpoint(path, {"key": key, **tensors})
    return tensors


def teacher_topk(teacher: Teacher, data: Dataset, device: torch.device, k: int, temperature: float,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of ``data`` (per position, for outputs with more dimensions than (N, classes)):
    the ids of ``teacher``'s top-``k`` classes (int32) and their log-probabilities at
    ``temperature`` over all classes (float16), as CPU tensors; batch by batch, so the dense
    logits of the whole set never exist."""
    ids, logprobs = [], []
    with torch.no_grad():
        for x, _ in DataLoader(data, batch_size=batch_size):
            lp = torch.log_softmax(teacher(x.to(device)).double() / temperature, -1)
            top, i = lp.topk(k, -1)
            ids.append(i.to(torch.int32).cpu())
            logprobs.append(top.to(torch.float16).cpu())
    return torch.cat(ids), torch.cat(logprobs)


def _cache_record(kind: str, stored: list[torch.Tensor], dense_shape: torch.Size, k: int | None = None) -> dict:
    """The cache's size against the dense float32 logits cache of the same examples."""
    size = sum(t.numel() * t.element_size() for t in stored)
    dense = dense_shape.numel() * 4
    return {"kind": kind, "k": k, "bytes": size, "dense_bytes": dense, "ratio": size / dense if dense else 0.0}


class HeadInput:
    """Records the input of the model's head (an ``nn.Linear``) on each forward pass, so the loss
    can fuse the head with the distillation loss; :meth:`remove` takes the hook off."""

    def __init__(self, model: torch.nn.Module):
        self.head = get_head(model)
        if not isinstance(self.head, torch.nn.Linear):
            raise OptionError(f"option 'teacher_topk': the student's head {model.head_name!r} is a "
                              f"{type(self.head).__name__}; the fused top-k loss needs an nn.Linear head")
        self.value: torch.Tensor | None = None
        self._handle = self.head.register_forward_pre_hook(self._record)

    def _record(self, module, args) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("distill: the student's forward pass did not call its head")
        return value

    def remove(self) -> None:
        self._handle.remove()


def distill(ctx, options: dict, teacher: Teacher, *, teacher_ids: list[str], dataset: str,
            classes: list[int]) -> StrategyResult:
    """Train the options' student on ``dataset``/``classes`` from ``teacher`` (any callable from a
    batch of inputs to logits over ``classes``, in eval mode) and save it with ``teacher_ids`` as
    its parents."""
    if options["augment"] != "none" and options["cache_teacher"]:
        raise OptionError(f"option 'augment': --augment {options['augment']} needs --no-cache-teacher: cached teacher "
                          "logits come from the unaugmented images, so the teacher must see each augmented batch")
    topk = options["teacher_topk"]
    if topk is not None and not options["cache_teacher"]:
        raise OptionError("option 'teacher_topk': --teacher-topk keeps a cache of the teacher's outputs, so it needs "
                          "--cache-teacher (drop --no-cache-teacher)")
    if topk is not None and topk > len(classes):
        raise OptionError(f"option 'teacher_topk': K = {topk} is more than the teacher's {len(classes)} classes")
    train, val, test = load_splits({**options, "label_budget": None}, dataset=dataset, classes=classes)
    check_unseen(ctx, teacher_ids, test, options, dataset=dataset)
    indexed = IndexedSplit(train)
    labelled = torch.zeros(len(train), dtype=torch.bool)
    budget = options["label_budget"]
    labelled[budget_indices(train.targets, budget, options["seed"]) if budget else slice(None)] = True
    T, kd, ce = options["temperature"], options["kd_weight"], options["ce_weight"]
    key = {"teachers": teacher_ids, "dataset": dataset, "classes": classes, "seed": options["seed"], "n": len(train)}
    cached = sparse = record = None
    if topk is not None:
        saved = _cached(ctx, TOPK_FILE, {**key, "k": topk, "temperature": T},
                        lambda: dict(zip(("ids", "logprobs"), teacher_topk(teacher, train, ctx.device, topk, T))))
        sparse = saved["ids"].to(ctx.device), saved["logprobs"].to(ctx.device)
        record = _cache_record("topk", list(saved.values()), saved["ids"].shape[:-1] + (len(classes),), topk)
    elif options["cache_teacher"]:
        cached = _cached(ctx, CACHE_FILE, key, lambda: {"logits": teacher_logits(teacher, train, ctx.device)})["logits"]
        record = _cache_record("dense", [cached], cached.shape)
        cached = cached.to(ctx.device)
    if record is not None:
        ctx.log(f"distill: teacher cache ({'top-' + str(topk) if topk else 'dense logits'}): {record['bytes']:,} bytes, "
                f"{record['ratio']:.2%} of the dense cache ({record['dense_bytes']:,} bytes)")
    # built after the cache, as before the top-k cache existed: the cache's loader draws from the global RNG
    student, config = build_model(options, train, "student_")
    head_input = HeadInput(student) if topk is not None else None
    kd_ce = DistillationLoss(T, kd, ce)
    kd_only = DistillationLoss(T, kd)

    def topk_loss(hidden, idx, targets, ce_weight):
        dev_idx = idx.to(hidden.device)
        teacher_rows = SparseTeacher(sparse[0][dev_idx], sparse[1][dev_idx], tail="bucket")
        return fused_linear_distill_loss(hidden, head_input.head.weight, teacher_rows,
                                         targets if ce_weight > 0 else None, student_bias=head_input.head.bias,
                                         temperature=T, kd_weight=kd, ce_weight=ce_weight)

    def loss_fn(model, inputs, targets):
        idx = indexed.take(targets)
        outputs = model(inputs)
        mask = labelled[idx].to(inputs.device)
        if sparse is not None:
            hidden = head_input.take()
            if bool(mask.all()):
                return topk_loss(hidden, idx, targets, ce), outputs
            loss = topk_loss(hidden, idx, targets, 0.0)
        else:
            if cached is not None:
                t = cached[idx.to(ctx.device)]
            else:
                with torch.no_grad():
                    t = teacher(inputs).float()
            if bool(mask.all()):
                return kd_ce(outputs, t.to(outputs.dtype), targets), outputs
            loss = kd_only(outputs, t.to(outputs.dtype))
        if bool(mask.any()) and ce > 0:
            loss = loss + ce * F.cross_entropy(outputs[mask], targets[mask])
        return loss, outputs

    try:
        fitted = fit(ctx, student, indexed, val, options, loss_fn=loss_fn, augment=augmentation(options, train),
                     num_workers=0)
    finally:
        if head_input is not None:
            head_input.remove()
    return finish(ctx, student, fitted=fitted, test=test, backbone=options["student_backbone"], config=config,
                  dataset=dataset, classes=train.classes, parents=teacher_ids, options=options, train=train,
                  labelled=int(labelled.sum()), metrics={"teacher_cache": record} if record else None)


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
        Option("teacher_topk", int, None, "cache only the teacher's top K classes per example (int32 ids, float16 "
               "log-probabilities at the temperature) and train through the fused linear distillation loss, the "
               "student's head being its linear layer; the rest of the teacher's mass is one more outcome (default: "
               "the dense logits)", check=positive),
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
