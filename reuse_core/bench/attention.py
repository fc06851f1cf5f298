"""The attention cases, shape (B, H, L, D), and its extra contender ``sdpa``.

Self-attention shapes (Lq = Lk = L, H = Hkv), mode "full" or "causal"; fwd+bwd backpropagates a
fixed random gradient of the output into q, k and v. ``sdpa`` is
``torch.nn.functional.scaled_dot_product_attention``, PyTorch's own fused attention (a flash
kernel on CPU and on CUDA); the row's ``speedup_vs_sdpa`` is its time over the fused op's.
GFLOP/s: forward 4·B·H·Lq·Lk·D FLOPs, half that when causal, the backward 2.5 times the forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .measure import DIRECTIONS, Case, Contender, Extra, OpBench, generator


def _contender(fn, case: Case, inputs: dict) -> Contender:
    """The call of ``fn(q, k, v, causal)`` on the case's inputs."""
    q, k, v, causal = inputs["q"], inputs["k"], inputs["v"], case.mode == "causal"
    if case.direction == "fwd":
        return Contender(lambda: (fn(q, k, v, causal),))
    dout = inputs["dout"]

    def call():
        out = fn(q, k, v, causal)
        out.backward(dout)
        return (out, q.grad, k.grad, v.grad)

    def reset():
        q.grad = k.grad = v.grad = None

    return Contender(call, reset)


def _sdpa(case: Case, inputs: dict) -> Contender:
    return _contender(lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal), case, inputs)


class AttentionBench(OpBench):
    name = "attention"
    modes = ("full", "causal")
    extra_contenders = {"sdpa": Extra(_sdpa, "speedup_vs_sdpa", "x sdpa")}

    def fused(self):
        from reuse_core.ops import attention

        return attention

    def reference(self):
        from reuse_core.ops.reference import attention_reference

        return attention_reference

    def cases(self, device, quick):
        if quick:
            shapes = [((1, 2, 64, 32), "float32")]
        elif device == "cuda":
            shapes = [((4, 16, 4096, 64), "bfloat16"), ((4, 8, 4096, 128), "bfloat16"), ((4, 8, 1024, 64), "float32")]
        else:
            shapes = [((4, 8, 1024, 64), "float32")]
        return [Case(self.name, s, dt, m, d) for s, dt in shapes for m in self.modes for d in DIRECTIONS]

    def make_inputs(self, case, device):
        g = generator(device)
        q, k, v, dout = (torch.randn(case.shape, generator=g, device=device, dtype=torch.float32).to(case.torch_dtype)
                         for _ in range(4))
        if case.direction == "fwd+bwd":
            for x in (q, k, v):
                x.requires_grad_(True)
        return {"q": q, "k": k, "v": v, "dout": dout}

    def contender(self, fn, case, inputs):
        return _contender(lambda q, k, v, causal: fn(q, k, v, causal=causal), case, inputs)

    def flops(self, case):
        B, H, L, D = case.shape
        fwd = 4 * B * H * L * L * D / (2 if case.mode == "causal" else 1)
        return fwd * (3.5 if case.direction == "fwd+bwd" else 1.0)

    def minimal_bytes(self, case):
        # fwd: read q, k, v, write out; fwd+bwd adds: read q, k, v, out, dout, write dq, dk, dv
        return (4 if case.direction == "fwd" else 12) * math.prod(case.shape) * case.torch_dtype.itemsize
