"""reuse_core.ops.fused_linear_distill_loss / torch.ops.reuse_core.fused_linear_distill against the
float64 reference (dense and sparse teachers, both tails), gradcheck, opcheck, torch.compile,
bad input and edge values. "generic" runs the CUDA backend's device-generic chunk step on the CPU
(REUSE_CORE_FLD_GENERIC=1), which checks that composition where no GPU is lent."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reuse_core.ops import SparseTeacher, fused_linear_distill_loss
from reuse_core.ops.reference import fused_linear_distill_loss_reference

from ..conftest import assert_close_to_ref, dispatched, distill_terms, leaf, randn, use_target

OP = "fused_linear_distill"
TEACHERS = ("dense", "bucket", "renormalize")
PATHS = [
    pytest.param("cpu-avx512", torch.float32, id="avx512-f32"),
    pytest.param("cpu-avx2", torch.float32, id="avx2-f32"),
    pytest.param("cpu-portable", torch.float32, id="portable-f32"),
    pytest.param("cpu-default", torch.float64, id="f64"),
    pytest.param("generic", torch.float32, id="generic-f32"),
    pytest.param("generic", torch.float64, id="generic-f64"),
]


def select(path, monkeypatch):
    if path == "generic":
        monkeypatch.setenv("REUSE_CORE_FLD_GENERIC", "1")
        monkeypatch.delenv("REUSE_CORE_CPU_ISA", raising=False)
        return "cpu"
    monkeypatch.delenv("REUSE_CORE_FLD_GENERIC", raising=False)
    return use_target(path, monkeypatch)


def make_case(gen, *, lead=(3, 11), H=19, Ht=23, V=101, k=7, teacher="dense", T=2.0, ignore_frac=0.25,
              scale=1.0):
    """Float64 inputs: student (hidden, weight, bias), a teacher, labels with some rows ignored.
    The sparse teacher keeps the top-k of a random teacher's log-softmax at T (over the full vocabulary)."""
    h = randn((*lead, H), gen, dtype=torch.float64, scale=scale)
    W = randn((V, H), gen, dtype=torch.float64, scale=scale / math.sqrt(H) * 3)
    b = randn((V,), gen, dtype=torch.float64)
    labels = torch.randint(0, V, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < ignore_frac] = -100
    th = randn((*lead, Ht), gen, dtype=torch.float64)
    tw = randn((V, Ht), gen, dtype=torch.float64, scale=3 / math.sqrt(Ht))
    tb = randn((V,), gen, dtype=torch.float64)
    if teacher == "dense":
        return h, W, b, labels, (th, tw, tb)
    t_logp = F.log_softmax(F.linear(th, tw, tb) / T, -1)
    top = t_logp.topk(k, -1)
    perm = torch.rand(top.indices.shape, generator=gen).argsort(-1)  # kept ids in no particular order
    return h, W, b, labels, SparseTeacher(top.indices.gather(-1, perm), top.values.gather(-1, perm), teacher)


def cast_teacher(teacher, dtype):
    if isinstance(teacher, SparseTeacher):
        return SparseTeacher(teacher.indices, teacher.logprobs.to(dtype), teacher.tail)
    return tuple(x.to(dtype) for x in teacher)


def fwd_bwd(fn, h, W, b, teacher, labels, dtype, up=None, **kw):
    h_, W_, b_ = leaf(h, dtype), leaf(W, dtype), (None if b is None else leaf(b, dtype))
    loss = fn(h_, W_, cast_teacher(teacher, dtype), labels, student_bias=b_, **kw)
    loss.backward(torch.ones_like(loss) if up is None else up.to(loss.dtype))
    return loss, h_.grad, W_.grad, (None if b is None else b_.grad)


def cancel_floors(h, W, b, teacher, labels, *, temperature, kd_weight, ce_weight, chunk_size=None):
    """Per result (loss, grad_hidden, grad_weight, grad_bias), the size of the terms that cancel in
    it (conftest.distill_terms) under the batchmean reduction: a student near its teacher (V = 2),
    and gradients summed over rows or ids whose terms nearly cancel, are only as exact as those
    terms in float32, as PyTorch's float32 is too."""
    V, H, T = W.shape[0], W.shape[1], float(temperature)
    s = F.linear(h.double(), W.double(), None if b is None else b.double())
    if isinstance(teacher, SparseTeacher):
        logp = torch.full(s.shape, -math.inf, dtype=torch.float64).scatter(-1, teacher.indices.long(),
                                                                            teacher.logprobs.double())
        tail = teacher.tail
    else:
        th, tw, tb = (x.double() for x in teacher)
        logp, tail = torch.log_softmax(F.linear(th, tw, tb) / T, -1), None
    lt, gs, _ = distill_terms(s, logp, labels=labels, temperature=T, kd_weight=kd_weight, ce_weight=ce_weight,
                              tail=tail)
    n = max(1, lt.numel() if labels is None else int((labels != -100).sum()))
    G = gs / n
    terms = (G @ W.double().abs(), G.T @ h.double().abs().reshape(-1, H), G.sum(0))
    return (float(lt.sum()) / n, *(float(x.max()) if x.numel() else 0.0 for x in terms))


def check_all(got, want, dtype, same_dtype=None, what="", f32_as_torch=False, floors=(0.0,) * 4):
    for i, (name, g, w) in enumerate(zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want)):
        if w is None:
            assert g is None, name
            continue
        assert_close_to_ref(g, w, dtype=dtype, name=f"{name} {what}",
                            same_dtype_ref=None if same_dtype is None else same_dtype[i], roundings=2,
                            f32_as_torch=f32_as_torch, scale_floor=floors[i])


# --------------------------------------------------------------------------------------------
# against the float64 reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, dtype", PATHS)
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_reference(path, dtype, teacher, reduction, gen, monkeypatch):
    """3-D hidden states, bias, T != 1, CE with ignored rows, chunks with a remainder, odd sizes."""
    device = select(path, monkeypatch)
    h, W, b, labels, tch = make_case(gen, teacher=teacher)
    kw = dict(temperature=2.0, kd_weight=0.7, ce_weight=0.3, reduction=reduction)
    up = randn(labels.shape, gen, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    with dispatched(OP, device=device):
        got = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, dtype, up, chunk_size=4, **kw)
    want = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, tch, labels, torch.float64, up, **kw)
    check_all(got, want, dtype, what=f"({teacher}, {reduction})")


@pytest.mark.parametrize("teacher", TEACHERS)
def test_bfloat16(teacher, gen, monkeypatch):
    """bf16 storage, float32 math: at most twice the error of PyTorch on the same bf16 inputs."""
    monkeypatch.delenv("REUSE_CORE_FLD_GENERIC", raising=False)
    h, W, b, labels, tch = make_case(gen, teacher=teacher)
    h, W, b = (x.to(torch.bfloat16).double() for x in (h, W, b))  # the values bf16 can hold
    tch = cast_teacher(tch, torch.bfloat16)
    kw = dict(temperature=2.0, kd_weight=1.0, ce_weight=0.5)
    with dispatched(OP):
        got = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, torch.bfloat16, chunk_size=8, **kw)
    assert all(x.dtype == torch.bfloat16 for x in got)
    want = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, tch, labels, torch.float64, **kw)
    torch_bf16 = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, tch, labels, torch.bfloat16, **kw)
    check_all(got, want, torch.bfloat16, same_dtype=torch_bf16, what=f"({teacher})")


@pytest.mark.parametrize("path", ["cpu-default", "generic"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_k_equals_V_is_the_dense_loss(path, tail, gen, monkeypatch):
    """A sparse teacher that keeps every id (in shuffled order) gives the dense teacher's loss."""
    select(path, monkeypatch)
    T = 1.5
    h, W, b, labels, dense = make_case(gen, V=53)
    logp = F.log_softmax(F.linear(*dense) / T, -1)
    perm = torch.rand(logp.shape, generator=gen).argsort(-1)
    sparse = SparseTeacher(perm, logp.gather(-1, perm), tail)
    kw = dict(temperature=T, ce_weight=0.2, chunk_size=5)
    a = fwd_bwd(fused_linear_distill_loss, h, W, b, sparse, labels, torch.float64, **kw)
    d = fwd_bwd(fused_linear_distill_loss, h, W, b, dense, labels, torch.float64, **kw)
    r = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, dense, labels, torch.float64, **kw)
    check_all(a, r, torch.float64, what=f"{tail} at k = V vs the dense reference")
    check_all(d, r, torch.float64, what="dense")


@pytest.mark.parametrize("path, dtype", [("cpu-default", torch.float32), ("cpu-default", torch.float64),
                                         ("generic", torch.float64)])
def test_bucket_tail_is_exact_when_the_kept_mass_is_near_one(path, dtype, gen, monkeypatch):
    """The student's kept mass is 1 - 1e-20: log q_r from the tail's own log-sum-exp, so the loss
    and the tail gradient stay finite and exact (log(1 - sum q) would be log 0, even in float64).
    (The generic step's float32 math loses ~1e-6 to cancellation in the kept terms, which nearly
    cancel here; it is checked in float64.)"""
    select(path, monkeypatch)
    N, H, V, k = 6, 8, 40, 4
    h = randn((N, H), gen, dtype=torch.float64)
    W = randn((V, H), gen, dtype=torch.float64, scale=0.1)
    b = torch.zeros(V, dtype=torch.float64)
    idx = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(N)])
    b_rows = torch.zeros(N, V, dtype=torch.float64).scatter_(1, idx, 50.0)  # kept ids far above the rest
    # the bias is per id, so give every row the same kept ids
    idx = idx[:1].expand(N, k).contiguous()
    b = b_rows[0]
    lp = torch.log(torch.full((N, k), (1 - 1e-3) / k, dtype=torch.float64))  # teacher tail mass r = 1e-3
    tch = SparseTeacher(idx, lp, "bucket")
    got = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, None, dtype, reduction="none")
    want = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, tch, None, torch.float64, reduction="none")
    # the tail term r (log r - log q_r), with log q_r about -46, is most of the loss
    assert torch.isfinite(got[0]).all() and float(want[0].detach().min()) > 0.03
    # float32 logits of magnitude 50 carry rounding errors of ~2e-6 before the kept terms cancel to a
    # loss of ~0.05: float32 may meet the rule for extreme inputs (twice PyTorch's float32 error)
    torch_f32 = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, tch, None, dtype, reduction="none")
    check_all(got, want, dtype, same_dtype=torch_f32, what="(kept mass near 1)", f32_as_torch=True)


@pytest.mark.parametrize("path, dtype", PATHS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_masked_vocabulary_and_large_logits(path, dtype, tail, gen, monkeypatch):
    """A vocabulary padded with -inf bias entries that no row keeps (their probability and gradient
    are 0, the tail sums skip them) and logits in the thousands: finite, and within the float32
    tolerance of float64. The inputs are small integers, so every float32 logit is exact: a rounded
    logit of ~1e3 would be off by 1e-4, which near ties moves the gradients past 1e-5 in any
    float32 evaluation (PyTorch's own may be closer or farther by luck)."""
    device = select(path, monkeypatch)
    h, W, b, labels, tch = make_case(gen, lead=(5,), V=101, k=7, teacher=tail, scale=20.0, ignore_frac=0)
    h, W, b = h.round(), W.round(), b.round()  # integer products and sums far below 2^24: exact in float32
    free = sorted(set(range(101)) - set(tch.indices.flatten().tolist()))
    pad = torch.tensor(free[:: max(1, len(free) // 6)][:6])
    b = b.clone()
    b[pad] = -math.inf
    # a label on a padded id would make the cross entropy infinite: those rows learn a kept id;
    # one row is ignored (every row ignored would leave nothing to test)
    labels = torch.where(torch.isin(labels, pad), tch.indices[:, 0], labels)
    labels[0] = -100
    kw = dict(temperature=2.0, ce_weight=0.3)
    with dispatched(OP, device=device):
        got = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, dtype, chunk_size=2, **kw)
    want = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, tch, labels, torch.float64, **kw)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1:3])
    assert float(want[0].detach().abs()) > 10, "the logits are large"
    check_all(got, want, dtype, what=f"({tail}, -inf bias, large logits)")


@pytest.mark.parametrize("path, dtype", PATHS)
@pytest.mark.parametrize("teacher", TEACHERS)
def test_one_id_vocabulary_has_no_gradient(path, dtype, teacher, gen, monkeypatch):
    """V = 1: student and teacher both put all mass on the one id, so the loss and every gradient
    are exactly 0, with labels too (the label's q_y - 1 must not round q_y first)."""
    device = select(path, monkeypatch)
    h, W, b, labels, tch = make_case(gen, lead=(4,), H=3, Ht=2, V=1, k=1, teacher=teacher, ignore_frac=0)
    with dispatched(OP, device=device):
        got = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, dtype, temperature=0.5, kd_weight=0.8,
                      ce_weight=0.4)
    for name, x in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got):
        assert x.dtype == dtype and not x.any(), f"{name}: {x}"


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("path", ["cpu-default", "generic"])
def test_nan_rows_stay_in_their_rows(teacher, path, gen, monkeypatch):
    select(path, monkeypatch)
    h, W, b, labels, tch = make_case(gen, lead=(9,), teacher=teacher, ignore_frac=0)
    h = h.clone()
    h[2, 3] = math.nan
    if teacher != "dense":
        lp = tch.logprobs.clone()
        lp[5, 1] = math.nan
        tch = SparseTeacher(tch.indices, lp, tch.tail)
    loss, gh, _, _ = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, torch.float64, reduction="none",
                             chunk_size=4)
    loss = loss.detach()
    nan_rows = [2] + ([5] if teacher != "dense" else [])
    for r in range(9):
        assert math.isnan(float(loss[r])) == (r in nan_rows), (r, loss)
        assert bool(gh[r].isnan().all()) == (r in nan_rows), r
    mean = fused_linear_distill_loss(h, W, tch, labels, student_bias=b)
    assert math.isnan(float(mean))


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_empty_batch(teacher, reduction, gen):
    h, W, b, labels, tch = make_case(gen, lead=(4,), teacher=teacher)
    h, labels = h[:0], labels[:0]
    if teacher == "dense":
        tch = (tch[0][:0], tch[1], tch[2])
    else:
        tch = SparseTeacher(tch.indices[:0], tch.logprobs[:0], tch.tail)
    loss, gh, gW, gb = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, torch.float32, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert float(loss.detach()) == 0.0
    assert gh.shape == h.shape and gW.shape == W.shape and gb.shape == b.shape
    assert not gW.any() and not gb.any()


def test_all_rows_ignored_is_zero(gen):
    h, W, b, labels, tch = make_case(gen, lead=(5,))
    labels = torch.full_like(labels, -7)
    loss, gh, gW, gb = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, torch.float32, ignore_index=-7,
                               ce_weight=1.0)
    assert float(loss.detach()) == 0.0 and not gh.any() and not gW.any() and not gb.any()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    H=st.integers(1, 40),
    V=st.integers(1, 90),
    k_frac=st.floats(0.0, 1.0),
    teacher=st.sampled_from(TEACHERS),
    path=st.sampled_from(["cpu-avx512", "cpu-avx2", "cpu-portable", "generic"]),
    chunk=st.sampled_from([None, 1, 3, 16]),
    with_labels=st.booleans(),
    T=st.sampled_from([0.5, 1.0, 3.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_hypothesis_shapes(lead, H, V, k_frac, teacher, path, chunk, with_labels, T, seed, monkeypatch):
    """Any leading shape (empty ones too), hidden size, vocabulary, k in [1, V] and chunk size: float32
    against the float64 reference, on every code path."""
    select(path, monkeypatch)
    gen = torch.Generator().manual_seed(seed)
    k = max(1, round(k_frac * V))
    h, W, b, labels, tch = make_case(gen, lead=tuple(lead), H=H, Ht=max(1, H // 2), V=V, k=k, teacher=teacher, T=T)
    kw = dict(temperature=T, kd_weight=0.8, ce_weight=0.4 if with_labels else 0.0, chunk_size=chunk)
    labels = labels if with_labels else None
    with dispatched(OP):
        got = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, torch.float32, **kw)
    want = fwd_bwd(fused_linear_distill_loss_reference, h, W, b, tch, labels, torch.float64, **kw)
    check_all(got, want, torch.float32, what=f"({teacher}, lead {lead}, H {H}, V {V}, k {k}, chunk {chunk})",
              floors=cancel_floors(h, W, b, tch, labels, **kw))


@pytest.mark.parametrize("teacher", TEACHERS)
def test_teacher_dtypes_of_their_own(teacher, gen):
    """A teacher stored in another dtype than the student (a bf16 teacher head, the float16
    log-probs and int32 ids of a top-k cache) is computed as its float32 values: bit for bit the
    loss and gradients of the same values given in float32 (int64 ids)."""
    h, W, b, labels, tch = make_case(gen, teacher=teacher)
    h, W, b = (x.float() for x in (h, W, b))
    if teacher == "dense":
        mixed = tuple(x.to(torch.bfloat16) for x in tch)
        same = tuple(x.float() for x in mixed)
    else:
        mixed = SparseTeacher(tch.indices.to(torch.int32), tch.logprobs.to(torch.float16), teacher)
        same = SparseTeacher(tch.indices, mixed.logprobs.float(), teacher)
    a = fwd_bwd(fused_linear_distill_loss, h, W, b, mixed, labels, torch.float32, temperature=2.0, ce_weight=0.3)
    r = fwd_bwd(fused_linear_distill_loss, h, W, b, same, labels, torch.float32, temperature=2.0, ce_weight=0.3)
    for name, x, y in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), a, r):
        assert x.dtype == torch.float32, name
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("teacher", TEACHERS)
def test_chunk_size_does_not_change_the_result(teacher, gen):
    h, W, b, labels, tch = make_case(gen, lead=(2, 13), teacher=teacher)
    base = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, torch.float64, ce_weight=0.5, chunk_size=26)
    for chunk in (1, 7, None, 1000):
        got = fwd_bwd(fused_linear_distill_loss, h, W, b, tch, labels, torch.float64, ce_weight=0.5, chunk_size=chunk)
        check_all(got, base, torch.float64, what=f"(chunk_size={chunk})")


def test_teacher_gets_no_gradient(gen):
    h, W, b, labels, (th, tw, tb) = make_case(gen, lead=(6,))
    th, tw, tb = leaf(th), leaf(tw), leaf(tb)
    hs = leaf(h)
    fused_linear_distill_loss(hs, W, (th, tw, tb), labels).backward()
    assert hs.grad is not None and th.grad is None and tw.grad is None and tb.grad is None


def test_no_bias_and_frozen_weight(gen):
    """Only the inputs that require grad get one (here: the hidden states, no bias)."""
    h, W, _, labels, tch = make_case(gen, lead=(7,), teacher="bucket")
    hs = leaf(h)
    loss = fused_linear_distill_loss(hs, W, tch, labels, temperature=3.0)
    loss.backward()
    ref_h = leaf(h)
    fused_linear_distill_loss_reference(ref_h, W, tch, labels, temperature=3.0).backward()
    assert_close_to_ref(hs.grad, ref_h.grad, dtype=torch.float64, name="grad_hidden")


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck(teacher, reduction, gen):
    h, W, b, labels, tch = make_case(gen, lead=(5,), H=4, Ht=3, V=9, k=3, teacher=teacher)
    h, W, b = leaf(h), leaf(W), leaf(b)

    def f(h_, W_, b_):
        return fused_linear_distill_loss(h_, W_, tch, labels, student_bias=b_, temperature=1.7, ce_weight=0.4,
                                         reduction=reduction, chunk_size=2)

    assert torch.autograd.gradcheck(f, (h, W, b))


def _raw_args(teacher, gen, *, reduction=2, grads=(True, True, True)):
    h, W, b, labels, tch = make_case(gen, lead=(6,), H=5, Ht=4, V=17, k=4, teacher=teacher)
    h, W, b = leaf(h, torch.float32), leaf(W, torch.float32), leaf(b, torch.float32)
    if teacher == "dense":
        dense = tuple(x.float() for x in tch)
        sparse, mode = (None, None), 0
    else:
        dense, sparse, mode = (None, None, None), (tch.indices, tch.logprobs.float()), 1 if teacher == "bucket" else 2
    return (h, W, b, *dense, *sparse, mode, labels, None, 2.0, 0.8, 0.3, -100, reduction, 4, *grads)


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("reduction", [2, 0])
def test_opcheck(teacher, reduction, gen):
    grads = (True, True, True) if reduction else (False, False, False)
    torch.library.opcheck(torch.ops.reuse_core.fused_linear_distill.default,
                          _raw_args(teacher, gen, reduction=reduction, grads=grads))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("teacher", ["dense", "bucket"])
def test_compile_fullgraph(backend, teacher, gen):
    h, W, b, labels, tch = make_case(gen, lead=(2, 5), teacher=teacher)
    h, W, b = h.float(), W.float(), b.float()
    tch = cast_teacher(tch, torch.float32)

    def f(h_, W_, b_):
        return fused_linear_distill_loss(h_, W_, tch, labels, student_bias=b_, temperature=2.0, ce_weight=0.3)

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    outs = []
    for fn in (f, compiled):
        h_, W_, b_ = leaf(h), leaf(W), leaf(b)
        loss = fn(h_, W_, b_)
        (loss * 2).backward()
        outs.append((loss, h_.grad, W_.grad, b_.grad))
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# bad input: clear errors that name the argument
# --------------------------------------------------------------------------------------------

def test_duplicate_ids_are_an_error(gen, monkeypatch):
    h, W, b, labels, tch = make_case(gen, lead=(4,), teacher="bucket")
    idx = tch.indices.clone()
    idx[2, 1] = idx[2, 0]
    for generic in ("0", "1"):
        monkeypatch.setenv("REUSE_CORE_FLD_GENERIC", generic)
        for tail in ("bucket", "renormalize"):
            with pytest.raises(RuntimeError, match="repeat"):
                fused_linear_distill_loss(h, W, SparseTeacher(idx, tch.logprobs, tail), labels)
    with pytest.raises(ValueError, match="repeat"):
        fused_linear_distill_loss_reference(h, W, SparseTeacher(idx, tch.logprobs), labels)
    monkeypatch.setenv("REUSE_CORE_FLD_GENERIC", "0")
    with pytest.raises(RuntimeError, match="row 2 repeat id"):  # the row over all chunks
        fused_linear_distill_loss(h, W, SparseTeacher(idx, tch.logprobs), labels, chunk_size=1)


def test_indices_out_of_range(gen, monkeypatch):
    h, W, b, labels, tch = make_case(gen, lead=(4,), teacher="bucket")
    idx = tch.indices.clone()
    idx[1, 2] = W.shape[0]
    for generic in ("0", "1"):
        monkeypatch.setenv("REUSE_CORE_FLD_GENERIC", generic)
        with pytest.raises(RuntimeError, match=r"teacher indices must be in \[0, 101\)"):
            fused_linear_distill_loss(h, W, SparseTeacher(idx, tch.logprobs), labels)


@pytest.mark.parametrize("change, error, message", [
    (dict(teacher="no"), TypeError, "teacher must be a"),
    (dict(teacher=("a",)), TypeError, "teacher must be a"),
    (dict(tail="top"), ValueError, "SparseTeacher.tail"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), TypeError, "chunk_size"),
    (dict(temperature=0), ValueError, "temperature"),
    (dict(kd_weight=-1), ValueError, "kd_weight"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(weight_shape=(101, 18)), ValueError, "student_weight"),
    (dict(bias_shape=(100,)), ValueError, "student_bias"),
    (dict(lp_shape=True), ValueError, "SparseTeacher.logprobs"),
    (dict(k=0), ValueError, "k in"),
    (dict(float_idx=True), TypeError, "SparseTeacher.indices"),
    (dict(teacher_lead=True), ValueError, "teacher_hidden"),
    (dict(teacher_weight_shape=True), ValueError, "teacher_weight"),
    (dict(labels_shape=True), ValueError, "labels"),
    (dict(no_labels_ce=True), ValueError, "ce_weight > 0 needs labels"),
])
def test_bad_arguments(change, error, message, gen):
    h, W, b, labels, dense = make_case(gen, lead=(4,))
    _, _, _, _, sparse = make_case(gen, lead=(4,), teacher="bucket")
    teacher = sparse if any(c in change for c in ("tail", "lp_shape", "k", "float_idx")) else dense
    kw = {}
    if "teacher" in change:
        teacher = change["teacher"]
    if "tail" in change:
        teacher = SparseTeacher(sparse.indices, sparse.logprobs, change["tail"])
    if "lp_shape" in change:
        teacher = SparseTeacher(sparse.indices, sparse.logprobs[:, :2], "bucket")
    if "k" in change:
        teacher = SparseTeacher(sparse.indices[:, :0], sparse.logprobs[:, :0], "bucket")
    if "float_idx" in change:
        teacher = SparseTeacher(sparse.indices.double(), sparse.logprobs, "bucket")
    if "teacher_lead" in change:
        teacher = (dense[0][:3], dense[1])
    if "teacher_weight_shape" in change:
        teacher = (dense[0], dense[1][:, :5])
    if "weight_shape" in change:
        W = torch.randn(change["weight_shape"], dtype=torch.float64)
    if "bias_shape" in change:
        b = torch.randn(change["bias_shape"], dtype=torch.float64)
    if "labels_shape" in change:
        labels = labels[:2]
    if "no_labels_ce" in change:
        labels = None
        kw["ce_weight"] = 1.0
    for key in ("chunk_size", "temperature", "kd_weight", "reduction"):
        if key in change:
            kw[key] = change[key]
    with pytest.raises(error, match=message):
        fused_linear_distill_loss(h, W, teacher, labels, student_bias=b, **kw)


def test_labels_out_of_range(gen):
    h, W, b, labels, tch = make_case(gen, lead=(4,))
    labels = labels.clone()
    labels[0] = W.shape[0]
    with pytest.raises(RuntimeError, match="labels must be in"):
        fused_linear_distill_loss(h, W, tch, labels, ce_weight=1.0)


def test_raw_op_checks(gen):
    args = list(_raw_args("dense", gen))
    bad = list(args)
    bad[4] = None  # a dense teacher without its weight
    with pytest.raises(RuntimeError, match="dense teacher needs teacher_hidden and teacher_weight"):
        torch.ops.reuse_core.fused_linear_distill(*bad)
    bad = list(args)
    bad[8] = 7
    with pytest.raises(RuntimeError, match="teacher mode"):
        torch.ops.reuse_core.fused_linear_distill(*bad)
