"""Batched ensemble training (reuse_core.combine.BatchedMembers) against training the same K members
one after another, on the embedded digits data, side by side in one process.

Both contenders run the same loop: the training split as one tensor (1078 x 1 x 8 x 8), one seeded
permutation per epoch, batches of 64, SGD (lr 0.05, momentum 0.9); K = 4 members of one
architecture, each with its own initialisation. Sequential: K models, each trained alone for all
epochs (K x steps optimizer steps). Batched: one BatchedMembers of the K, trained with the sum of
their losses (steps optimizer steps; each member's update equals its separate one, see
tests/combine/test_batched.py). Cases:

* tiny-cnn: conv 1->8, max pool, conv 8->16, ReLUs, fc 256 -> 10 (LeNet-sized; the size of the
  issue's reference, 4 small CNNs x 10 epochs one after another in about 4.2 s), 10 epochs;
* small-cnn: the registered backbone (convs 32 and 64 with batch norm, fc 1024 -> 128), 2 epochs.

``test_time[...]`` times each contender once under pytest-benchmark; ``test_ratio[...]`` runs
them interleaved (REUSE_BENCH_REPEATS rounds, order alternating) and prints the median times and
their ratio. Goal (issue 6): batched at least 2x faster on the CPU for tiny-cnn, reported always,
enforced with REUSE_BENCH_ENFORCE=1. REUSE_BENCH_QUICK=1: 1 epoch, 1 round (a smoke run).

  pytest benchmarks/test_batched_ensemble.py -s -k ratio
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reuse_core.combine import BatchedMembers, member_loss

K, BATCH, LR = 4, 64, 0.05
QUICK = os.environ.get("REUSE_BENCH_QUICK", "0") not in ("", "0")
ENFORCE = os.environ.get("REUSE_BENCH_ENFORCE", "0") not in ("", "0")
REPEATS = 1 if QUICK else int(os.environ.get("REUSE_BENCH_REPEATS") or 3)
CASES = {"tiny-cnn": 10, "small-cnn": 2}  # case -> epochs
TARGET = {"tiny-cnn": 2.0}


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def build(case: str, k: int) -> nn.Module:
    from reuse_core import backbone

    torch.manual_seed(k)
    return tiny_cnn() if case == "tiny-cnn" else backbone.build("small-cnn", 10, 1)


@pytest.fixture(scope="module")
def digits():
    from reuse_core import data

    ds = data.load("digits", split="train")
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


def train(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def contender(name: str, case: str, data):
    """A callable that builds fresh members (untimed by the caller's setup) and trains them."""
    x, y = data
    epochs = 1 if QUICK else CASES[case]
    if name == "sequential":
        def run():
            for m in [build(case, k) for k in range(K)]:
                train(m, F.cross_entropy, x, y, epochs)
    else:
        def run():
            train(BatchedMembers([build(case, k) for k in range(K)]), member_loss, x, y, epochs)
    return run


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["sequential", "batched"])
def test_time(benchmark, digits, case, name):
    benchmark.group = f"batched-ensemble {case} K={K}"
    benchmark.extra_info.update(case=case, members=K, epochs=1 if QUICK else CASES[case], threads=torch.get_num_threads())
    benchmark.pedantic(contender(name, case, digits), rounds=REPEATS, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("case", list(CASES))
def test_ratio(digits, case):
    runs = {n: contender(n, case, digits) for n in ("sequential", "batched")}
    times: dict[str, list[float]] = {n: [] for n in runs}
    runs["batched"]()  # warm-up: vmap's first call traces its batching rules
    for r in range(REPEATS):
        for n in (("sequential", "batched") if r % 2 == 0 else ("batched", "sequential")):
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    seq, bat = statistics.median(times["sequential"]), statistics.median(times["batched"])
    ratio = seq / bat
    print(f"\nbatched-ensemble {case}: K={K}, {1 if QUICK else CASES[case]} epochs, digits train split "
          f"({len(digits[0])} x 1 x 8 x 8), batch {BATCH}, {torch.get_num_threads()} threads, {REPEATS} rounds: "
          f"sequential {seq:.2f} s, batched {bat:.2f} s, speed-up {ratio:.2f}x"
          + (f" (goal >= {TARGET[case]}x)" if case in TARGET else ""))
    if case in TARGET and not QUICK and ratio < TARGET[case] and ENFORCE:
        pytest.fail(f"{case}: batched is {ratio:.2f}x faster than sequential, goal {TARGET[case]}x")
