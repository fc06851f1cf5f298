"""The trainer every strategy shares: :func:`fit`, :func:`evaluate`, :func:`predict_logits`.

Data order: each epoch is one permutation of the training set drawn from a generator seeded with
``config.seed``; it is cut into optimizer steps of ``batch_size * grad_accum`` samples, each step
into micro-batches of ``batch_size``, and under torchrun each process takes every N-th sample of a
micro-batch. The loss of each piece is weighted by its share of the step, so one step's gradient
is the mean over its samples whatever N, ``grad_accum`` or the size of the last step.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from reuse_core.engine import distributed
from reuse_core.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from reuse_core.engine.config import RESUME_FREE, FitResult, TrainConfig
from reuse_core.engine.hooks import NO_HOOKS, loss_terms
from reuse_core.engine.metrics import MetricsLog, correct_count
from reuse_core.engine.optim import build_optimizer, build_scheduler, lr_factor
from reuse_core.engine.seeding import rng_state, seed_everything, set_rng_state

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, Any]"]

EVAL_BATCH = 256


def cross_entropy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """The default ``loss_fn``: mean cross-entropy of the model's logits."""
    outputs = model(inputs)
    return F.cross_entropy(outputs, targets), outputs


def _show_progress(wanted: bool) -> bool:
    return wanted and sys.stderr.isatty()


def _loader(data: Dataset, batches: list[list[int]], *, num_workers: int, device: torch.device,
            seed: int) -> DataLoader:
    # Our own generator for the workers' seeds, so loading data draws nothing from the global RNG.
    return DataLoader(data, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def _batches(data: Dataset | DataLoader, batch_size: int, indices: list[int] | None = None) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    idx = list(range(len(data))) if indices is None else indices
    chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return _loader(data, chunks, num_workers=0, device=torch.device("cpu"), seed=0)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _eval_sums(model, data, device, *, ctx: distributed.DistContext | None = None, amp: bool = False,
               batch_size: int = EVAL_BATCH, progress: bool = False) -> dict[str, float]:
    """Cross-entropy and accuracy over ``data`` (this process's share of it under ``ctx``),
    summed over all processes."""
    indices = None
    if ctx is not None and ctx.enabled and not isinstance(data, DataLoader):
        indices = ctx.shard(list(range(len(data))))
    loss_sum = correct = count = 0.0
    with _eval_mode(model):
        for x, y in tqdm(_batches(data, batch_size, indices), desc="eval", leave=False,
                         disable=not _show_progress(progress)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += correct_count(logits, y)
            count += len(y)
    if ctx is not None:
        loss_sum, correct, count = ctx.sum([loss_sum, correct, count])
    if count == 0:
        raise ValueError("evaluate: the data is empty")
    return {"loss": loss_sum / count, "accuracy": correct / count, "count": int(count)}


def evaluate(model: torch.nn.Module, data: Dataset | DataLoader, device: str | torch.device | None = None, *,
             batch_size: int = EVAL_BATCH, progress: bool = False) -> dict[str, float]:
    """``{"loss": mean cross-entropy, "accuracy": top-1, "count": samples}`` of ``model`` on ``data``
    (a dataset of (input, label) pairs or a DataLoader of such batches). The model's train/eval
    mode is restored afterwards."""
    device = distributed.default_device(device)
    return _eval_sums(model.to(device), data, device, batch_size=batch_size, progress=progress)


def predict_logits(model: torch.nn.Module, data: Dataset | DataLoader, device: str | torch.device | None = None, *,
                   batch_size: int = EVAL_BATCH, progress: bool = False) -> torch.Tensor:
    """The model's outputs for every sample of ``data``, in order, as one float32 CPU tensor
    (labels, if the data has them, are ignored)."""
    device = distributed.default_device(device)
    model = model.to(device)
    out = []
    with _eval_mode(model):
        for batch in tqdm(_batches(data, batch_size), desc="predict", leave=False,
                          disable=not _show_progress(progress)):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            out.append(model(x.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def _epoch_plan(n: int, order: torch.Generator, config: TrainConfig, world: int) -> list[list[list[int]]]:
    """This epoch's optimizer steps, each a list of global micro-batches of sample indices. A last
    micro-batch too small to give every process a sample is dropped (only when world > 1)."""
    perm = torch.randperm(n, generator=order).tolist()
    per_step = config.batch_size * config.grad_accum
    steps = []
    for s in range(0, n, per_step):
        chunk = perm[s:s + per_step]
        micro = [chunk[i:i + config.batch_size] for i in range(0, len(chunk), config.batch_size)]
        micro = [m for m in micro if len(m) >= world]
        if micro:
            steps.append(micro)
    return steps


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if row.get("train_accuracy") is not None:
        parts.append(f"accuracy {row['train_accuracy']:.4f}")
    if "val_accuracy" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.4f}")
    return "  ".join(parts) + f"  ({row['time_s']:.1f} s)"


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    now = config.to_dict()
    changed = [k for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume from {path}: the training config changed ({diffs}); resuming would not "
                         "give the weights of an uninterrupted run. Use the same config or a fresh run directory.")


def fit(model: torch.nn.Module, train_data: Dataset, val_data: Dataset | DataLoader | None = None, *,
        loss_fn: LossFn = cross_entropy, config: TrainConfig, run_dir: str | os.PathLike, hooks: Any = None,
        strategy: str = "", resume: bool = False, device: str | torch.device | None = None,
        options: dict | None = None) -> FitResult:
    """Train ``model`` in place on ``train_data`` for ``config.epochs`` epochs.

    ``loss_fn(model, inputs, targets) -> (loss, outputs)``: the mean loss of a batch and the model's
    outputs (class scores give the training accuracy; anything else is passed on to the hooks).
    Every epoch ends with a checkpoint (``run_dir/checkpoint.pt``, written atomically) and a line
    in ``run_dir/metrics.jsonl``. ``resume=True`` continues after the last finished epoch of the
    checkpoint in ``run_dir`` (a fresh run when there is none) and ends with the weights of an
    uninterrupted run with the same seed: bit-identical on the CPU. It refuses a checkpoint made
    with another config (other epochs included: the schedule would differ). ``fit`` seeds Python,
    NumPy and torch with ``config.seed`` first, so build the model (its initial weights) before.

    ``hooks``: the lifecycle relay (reuse_run_start, reuse_epoch_end, reuse_run_end on the main
    process; reuse_adjust_loss on every batch, its non-None returns added to the loss), called
    with keyword arguments. ``options``: what reuse_run_start reports (default: the config).
    Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, metrics are
    summed over processes and only rank 0 writes files.
    """
    if isinstance(train_data, DataLoader):
        raise TypeError("fit: train_data must be a Dataset, not a DataLoader: the engine draws the data order "
                        "itself (seeded, resumable, sharded across processes)")
    device = distributed.default_device(device)
    ctx = distributed.setup(device)
    try:
        return _fit(model, train_data, val_data, loss_fn=loss_fn, config=config, run_dir=Path(run_dir),
                    hooks=hooks or NO_HOOKS, strategy=strategy, resume=resume, device=device, ctx=ctx,
                    options=config.to_dict() if options is None else options)
    finally:
        ctx.close()


def _fit(model, train_data, val_data, *, loss_fn, config, run_dir, hooks, strategy, resume, device, ctx, options):
    if config.batch_size < ctx.world_size:
        raise ValueError(f"batch_size {config.batch_size} is the global batch: it must be at least the number "
                         f"of processes ({ctx.world_size})")
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    seed_everything(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    n = len(train_data)
    steps_per_epoch = math.ceil(n / (config.batch_size * config.grad_accum))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, steps_per_epoch, config)
    amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    ckpt = run_dir / CHECKPOINT_NAME
    log = MetricsLog(run_dir)

    history: list[dict[str, Any]] = []
    start = 0
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        _check_resumable(state["config"], config, ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        order.set_state(state["data_order"])
        start, history = state["epoch"], state["metrics"]
    if ctx.is_main:
        for stale in run_dir.glob(".*.tmp"):  # half-written files of a run killed mid-write
            stale.unlink(missing_ok=True)
        log.rewrite(history)
        hooks.reuse_run_start(strategy=strategy, options=options, run_dir=str(run_dir))

    net = model
    if ctx.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    for epoch in range(start + 1, config.epochs + 1):
        t0 = time.perf_counter()
        plan = _epoch_plan(n, order, config, ctx.world_size)
        local = [ctx.shard(mb) for step in plan for mb in step]
        batches = iter(_loader(train_data, local, num_workers=config.num_workers, device=device,
                               seed=config.seed * 100_003 + epoch))
        model.train()
        loss_sum = correct = count = 0.0
        bar = tqdm(plan, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                   disable=not (ctx.is_main and _show_progress(config.progress)))
        for step in bar:
            step_size = sum(len(mb) for mb in step)
            optimizer.zero_grad(set_to_none=True)
            for j, mb in enumerate(step):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = j == len(step) - 1 or not ctx.enabled
                with contextlib.nullcontext() if sync else net.no_sync():
                    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                        loss, outputs = loss_fn(net, x, y)
                        terms = loss_terms(hooks.reuse_adjust_loss(
                            strategy=strategy, loss=loss, model=model, inputs=x, targets=y, outputs=outputs))
                        total = loss + sum(terms) if terms else loss
                    # DDP averages over processes: weighting by this piece's share of the step times
                    # the world size makes the sum the step's mean gradient.
                    scaler.scale(total * (len(y) * ctx.world_size / step_size)).backward()
                loss_sum += float(total.detach()) * len(y)
                hits = correct_count(outputs, y)
                correct += hits if hits is not None else math.nan
                count += len(y)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            bar.set_postfix(loss=f"{loss_sum / count:.4f}")
        loss_sum, correct, count = ctx.sum([loss_sum, correct, count])
        row: dict[str, Any] = {
            "epoch": epoch, "train_loss": loss_sum / count,
            "train_accuracy": None if math.isnan(correct) else correct / count,
            "lr": config.lr * lr_factor(scheduler.last_epoch - 1, steps_per_epoch, config),
            "samples": int(count),
        }
        if val_data is not None:
            val = _eval_sums(model, val_data, device, ctx=ctx, amp=amp)
            row["val_loss"], row["val_accuracy"] = val["loss"], val["accuracy"]
        row["time_s"] = time.perf_counter() - t0
        history.append(row)
        if ctx.is_main:
            save_checkpoint(ckpt, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "data_order": order.get_state(), "metrics": history, "config": config.to_dict(),
            })
            log.append(row)
            if config.progress:
                tqdm.write(_epoch_line(row, config.epochs), file=sys.stderr)
            hooks.reuse_epoch_end(strategy=strategy, epoch=epoch, metrics=dict(row))
        ctx.barrier()

    result = FitResult(epochs=history, run_dir=str(run_dir), checkpoint=str(ckpt), resumed_from=start)
    if ctx.is_main:
        hooks.reuse_run_end(strategy=strategy, result=result.to_dict())
    return result
