"""A training run driven from the command line, for the tests that need real processes: the one
killed with SIGKILL and resumed, and the torchrun one. Prints "epoch N" after each epoch and
"step" after each batch (flushed), and saves the final weights to --out (rank 0)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.engine.tiny

from reuse_core.engine import NoHooks, TrainConfig, fit  # noqa: E402
from tests.engine.tiny import blobs, mlp  # noqa: E402


class Progress(NoHooks):
    def __init__(self, pause: float):
        self.pause = pause

    def reuse_epoch_end(self, *, strategy, epoch, metrics):
        print(f"epoch {epoch}", flush=True)

    def reuse_adjust_loss(self, *, strategy, loss, model, inputs, targets, outputs):
        time.sleep(self.pause)  # room for the test to kill us mid-epoch
        print("step", flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--pause", type=float, default=0.0)
    return p.parse_args(argv)


def train(a: argparse.Namespace):
    """(model, FitResult) of the run the arguments describe."""
    model = mlp(dropout=a.dropout)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=0.1, optimizer="adamw",
                      warmup_epochs=1, weight_decay=0.01, seed=7, progress=False)
    r = fit(model, blobs(a.samples), blobs(32, seed=1), config=cfg, run_dir=a.run_dir, hooks=Progress(a.pause),
            resume=a.resume, device="cpu")
    return model, r


def main() -> None:
    torch.set_num_threads(1)
    a = parse()
    model, r = train(a)
    if int(os.environ.get("RANK", 0)) == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)
    print(f"done resumed_from={r.resumed_from}", flush=True)


if __name__ == "__main__":
    main()
