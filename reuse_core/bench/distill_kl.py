"""The distill_kl cases, shape (N, V), and its extra contender ``floor``.

``floor`` (fwd+bwd only) is ``torch.add(s, t)``: it reads both inputs and writes one freshly
allocated tensor, the least traffic any implementation that returns a gradient can do; the row's
``fused_vs_floor`` is the fused time over the floor's. Minimal traffic, in elements of the input
dtype: fwd 2·N·V (read s, t), fwd+bwd 3·N·V (read s, t; write the student gradient).
"""
from __future__ import annotations

import math

import torch

from .measure import DIRECTIONS, Case, Contender, Extra, OpBench, generator


def _floor(case: Case, inputs: dict) -> Contender:
    s, t = inputs["s"].detach(), inputs["t"]
    return Contender(lambda: (torch.add(s, t),))


class DistillKLBench(OpBench):
    name = "distill_kl"
    temperature = 2.0
    extra_contenders = {
        "floor": Extra(_floor, "fused_vs_floor", "fused/floor", fused_over=True, directions=("fwd+bwd",)),
    }

    def fused(self):
        from reuse_core.ops import distill_kl_loss

        return distill_kl_loss

    def reference(self):
        from reuse_core.ops.reference import distill_kl_loss_reference

        return distill_kl_loss_reference

    def cases(self, device, quick):
        if quick:
            shapes = [((64, 1000), "float32")]
        else:
            shapes = [((1024, 32000), "float32"), ((4096, 1000), "float32")]
            if device == "cuda":  # the GPU sizes first: a run with a time budget gets them
                shapes = [(s, dt) for s in ((8192, 32000), (4096, 128256)) for dt in ("bfloat16", "float32")] + shapes
        return [Case(self.name, s, dt, "", d) for s, dt in shapes for d in DIRECTIONS]

    def make_inputs(self, case, device):
        g = generator(device)
        s = torch.randn(case.shape, generator=g, device=device, dtype=torch.float32).mul_(3).to(case.torch_dtype)
        t = torch.randn(case.shape, generator=g, device=device, dtype=torch.float32).mul_(3).to(case.torch_dtype)
        if case.direction == "fwd+bwd":
            s.requires_grad_(True)  # the student learns; the teacher is frozen
        return {"s": s, "t": t}

    def contender(self, fn, case, inputs):
        s, t, T = inputs["s"], inputs["t"], self.temperature
        if case.direction == "fwd":
            return Contender(lambda: (fn(s, t, temperature=T),))

        def call():
            loss = fn(s, t, temperature=T)
            loss.backward()
            return (loss, s.grad)

        def reset():
            s.grad = None

        return Contender(call, reset)

    def minimal_bytes(self, case):
        n_v = math.prod(case.shape)
        elt = case.torch_dtype.itemsize
        return (2 if case.direction == "fwd" else 3) * n_v * elt
