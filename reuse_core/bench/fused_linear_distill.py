"""The fused_linear_distill cases, shape (N, H, V): N rows of hidden size H (student and teacher
alike) and a vocabulary of V; forward + backward only (the op's gradients are made in the forward).

Contenders besides fused (this op, dense teacher), eager (the pure-PyTorch reference: both
logits materialised, then the reference KL) and compile (``torch.compile`` of that):

* ``materialised``: the logits made with ``F.linear``, then the fused ``distill_kl_loss`` kernel
  (the best a user gets today without this op); ratio ``x materialised`` = its time / fused;
* ``sparse64``: this op with a sparse top-64 teacher (``SparseTeacher``, tail "bucket"; the top-k
  is taken once, untimed); ratio ``dense/sparse64`` = the dense op's time over it (it skips the
  teacher's GEMM: 4/3 is the ceiling);
* ``sgemm``: the four products alone, each one ``torch.mm`` over all N rows (h W^T, t_h t_W^T, then
  the logits-shaped result times W and its transpose times h): this machine's sgemm at the op's
  shapes, timed in the same rounds; ratio ``sgemm/fused`` = its time / fused, the fraction of the
  sgemm throughput the whole op reaches (its GEMMs alone reach more);
* ``liger``: liger-kernel's ``LigerFusedLinearJSDLoss`` (``pip install reuse-core[bench]``), set
  to the forward KL (beta=0), no hard loss, and ``weight_soft_loss = T**2`` so that its value equals
  this op's (it applies no T**2 of its own); only listed when liger-kernel imports.

Nominal work: 8·N·H·V FLOPs (two forward GEMMs, two backward GEMMs of 2·N·H·V each; the
sparse teacher skips one); minimal traffic: read the hidden states and weights of both models,
write the student's two gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .measure import Case, Contender, Extra, OpBench, generator

TEMPERATURE = 2.0
SPARSE_K = 64


def _liger_available() -> bool:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception:  # noqa: BLE001  (not installed, or it fails to import here)
        return False
    return True


def _student_call(inputs: dict, loss_fn) -> Contender:
    h, W = inputs["h"], inputs["W"]

    def call():
        loss = loss_fn(h, W)
        loss.backward()
        return (loss, h.grad, W.grad)

    def reset():
        h.grad = None
        W.grad = None

    return Contender(call, reset)


def _materialised(case: Case, inputs: dict) -> Contender:
    from reuse_core.ops import distill_kl_loss

    th, tw = inputs["th"], inputs["tw"]

    def loss_fn(h, W):
        with torch.no_grad():
            t = F.linear(th, tw)
        return distill_kl_loss(F.linear(h, W), t, temperature=TEMPERATURE)

    return _student_call(inputs, loss_fn)


def _sparse64(case: Case, inputs: dict) -> Contender:
    from reuse_core.ops import fused_linear_distill_loss

    teacher = inputs["sparse"]
    return _student_call(inputs, lambda h, W: fused_linear_distill_loss(h, W, teacher, temperature=TEMPERATURE,
                                                                          chunk_size=inputs["chunk"]))


def _sgemm(case: Case, inputs: dict) -> Contender:
    h, W, th, tw = (inputs[k].detach() for k in ("h", "W", "th", "tw"))

    def call():
        s = torch.mm(h, W.t())
        t = torch.mm(th, tw.t())
        return (s, t, torch.mm(s, W), torch.mm(s.t(), h))

    return Contender(call)


def _liger(case: Case, inputs: dict) -> Contender:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    th, tw, labels = inputs["th"], inputs["tw"], inputs["labels"]
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=TEMPERATURE**2, beta=0.0,
                                   temperature=TEMPERATURE, compiled=False, chunk_size=inputs["chunk"])
    return _student_call(inputs, lambda h, W: loss(h, W, th, tw, labels))


class FusedLinearDistillBench(OpBench):
    name = "fused_linear_distill"
    extra_contenders = {
        "materialised": Extra(_materialised, "speedup_vs_materialised", "x materialised", directions=("fwd+bwd",)),
        "sparse64": Extra(_sparse64, "fused_vs_sparse64", "dense/sparse64", fused_over=True, directions=("fwd+bwd",)),
        "sgemm": Extra(_sgemm, "speedup_vs_sgemm", "sgemm/fused", directions=("fwd+bwd",)),
        "liger": Extra(_liger, "speedup_vs_liger", "x liger", directions=("fwd+bwd",)),
    }

    def fused(self):
        from reuse_core.ops import fused_linear_distill_loss

        return fused_linear_distill_loss

    def reference(self):
        from reuse_core.ops.reference import fused_linear_distill_loss_reference

        return fused_linear_distill_loss_reference

    def cases(self, device, quick):
        if quick:
            shapes = [((128, 64, 2000), "float32")]
        else:
            # (1024, 1024, 32000) for time; (2048, 2048, 128256) for peak memory (slow on the CPU)
            dt = "bfloat16" if device == "cuda" else "float32"
            shapes = [((1024, 1024, 32000), dt), ((2048, 2048, 128256), dt)]
        return [Case(self.name, s, dt, "", "fwd+bwd") for s, dt in shapes]

    def contender_names(self, case):
        names = super().contender_names(case)
        return names if _liger_available() else [n for n in names if n != "liger"]

    def make_inputs(self, case, device):
        N, H, V = case.shape
        g = generator(device)
        dt = case.torch_dtype

        def rnd(*shape, scale=1.0):
            return torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dt)

        h, W = rnd(N, H), rnd(V, H, scale=3 / math.sqrt(H))
        th, tw = rnd(N, H), rnd(V, H, scale=3 / math.sqrt(H))
        h.requires_grad_(True)
        W.requires_grad_(True)
        from reuse_core.ops import SparseTeacher

        top = []
        with torch.no_grad():  # the teacher's top-k log-probs at T, row block by row block (untimed)
            for r0 in range(0, N, 256):
                lp = torch.log_softmax(F.linear(th[r0:r0 + 256], tw).float() / TEMPERATURE, -1)
                top.append(lp.topk(SPARSE_K, -1))
        sparse = SparseTeacher(torch.cat([t.indices for t in top]), torch.cat([t.values for t in top]).to(dt))
        labels = torch.zeros(N, dtype=torch.long, device=device)  # unused (no hard loss); liger wants them
        return {"h": h, "W": W, "th": th, "tw": tw, "sparse": sparse, "labels": labels, "chunk": min(256, N)}

    def contender(self, fn, case, inputs):
        teacher = (inputs["th"], inputs["tw"])
        kw = {"chunk_size": inputs["chunk"]} if fn is self.fused() else {}
        return _student_call(inputs, lambda h, W: fn(h, W, teacher, temperature=TEMPERATURE, **kw))

    def minimal_bytes(self, case):
        N, H, V = case.shape
        return (2 * (N * H + V * H) + (N * H + V * H)) * case.torch_dtype.itemsize

    def flops(self, case):
        N, H, V = case.shape
        return 8.0 * N * H * V
