"""The ensemble_average cases, shape (K, N, C) in each mode; no extra contenders.

Minimal traffic, in elements of the input dtype: fwd (K+1)·N·C (read K members, write the
output), fwd+bwd (3K+2)·N·C (the forward, then read the output gradient and the K members, write
K member gradients).
"""
from __future__ import annotations

import math

import torch

from .measure import DIRECTIONS, Case, Contender, OpBench, generator


class EnsembleAverageBench(OpBench):
    name = "ensemble_average"
    modes = ("probs", "log_probs", "logits")

    def fused(self):
        from reuse_core.ops import ensemble_average

        return ensemble_average

    def reference(self):
        from reuse_core.ops.reference import ensemble_average_reference

        return ensemble_average_reference

    def cases(self, device, quick):
        if quick:
            shapes = [(4, 64, 100)]
        else:
            shapes = ([(8, 32768, 1000)] if device == "cuda" else []) + [(8, 4096, 1000)]
        return [Case(self.name, s, "float32", m, d) for s in shapes for m in self.modes for d in DIRECTIONS]

    def make_inputs(self, case, device):
        g = generator(device)
        z = torch.randn(case.shape, generator=g, device=device, dtype=torch.float32).mul_(3).to(case.torch_dtype)
        out = {"z": z}
        if case.direction == "fwd+bwd":
            z.requires_grad_(True)
            out["g"] = torch.randn(case.shape[1:], generator=g, device=device, dtype=torch.float32).to(case.torch_dtype)
        return out

    def contender(self, fn, case, inputs):
        z, mode = inputs["z"], case.mode
        if case.direction == "fwd":
            return Contender(lambda: (fn(z, mode=mode),))
        g = inputs["g"]

        def call():
            y = fn(z, mode=mode)
            y.backward(g)  # a fixed upstream gradient: the op's own cost, no loss around it
            return (y, z.grad)

        def reset():
            z.grad = None

        return Contender(call, reset)

    def minimal_bytes(self, case):
        K = case.shape[0]
        n_c = math.prod(case.shape[1:])
        elt = case.torch_dtype.itemsize
        return ((K + 1) if case.direction == "fwd" else (3 * K + 2)) * n_c * elt
