"""Shared helpers for the fused-op tests: devices and dtypes, the CPU code path (ISA), fresh
random inputs, per-dtype tolerances against the float64 reference, and the assertion that the
compiled kernel (not the pure-PyTorch fallback) is what ran.

CI requires the compiled extension: every test in this tree fails (not skips) without it.
Reproduce a failure with the seed it printed: ``REUSE_TEST_SEED=<seed> pytest ...``.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from reuse_core.ops import _ext

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA device: torch.cuda.is_available() is False (these run on the GPU machine)"
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]

CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)

_SHORT = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def dtype_id(dtype: torch.dtype) -> str:
    return _SHORT[dtype]


# --------------------------------------------------------------------------------------------
# Devices, dtypes and the CPU code path
# --------------------------------------------------------------------------------------------

def device_params():
    """["cpu", "cuda"], the cuda one skipped with a clear reason when there is no GPU."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_MARKS)]


def target_params(cpu_dtypes=CPU_DTYPES, cuda_dtypes=CUDA_DTYPES):
    """(target, dtype) pairs. A target is "cpu-avx512", "cpu-avx2", "cpu-portable" or "cuda".
    float32 and bfloat16 run on every CPU code path (those the processor lacks are skipped);
    float64 always takes the portable path in the kernel, so it runs once (on the default path)."""
    out = []
    for dt in cpu_dtypes:
        isas = ("avx512", "avx2", "portable") if dt in (torch.float32, torch.bfloat16) else ("default",)
        for isa in isas:
            out.append(pytest.param(f"cpu-{isa}", dt, id=f"cpu-{isa}-{dtype_id(dt)}"))
    for dt in cuda_dtypes:
        out.append(pytest.param("cuda", dt, id=f"cuda-{dtype_id(dt)}", marks=CUDA_MARKS))
    return out


def use_target(target: str, monkeypatch) -> str:
    """Select the target's code path (REUSE_CORE_CPU_ISA is read on every call) and return its
    torch device string. Asserts the extension reports the path it was asked for, and skips a
    path this processor lacks."""
    if target == "cuda":
        if not HAS_CUDA:
            pytest.skip(NO_CUDA_REASON)
        return "cuda"
    isa = target.split("-", 1)[1]
    if isa == "default":
        monkeypatch.delenv("REUSE_CORE_CPU_ISA", raising=False)
        return "cpu"
    monkeypatch.setenv("REUSE_CORE_CPU_ISA", isa)
    got = _ext.build_info()["cpu_isa"]
    if got != isa:
        order = ("portable", "avx2", "avx512")
        assert order.index(got) < order.index(isa), f"REUSE_CORE_CPU_ISA={isa} was not honoured (got {got})"
        pytest.skip(f"this CPU has no {isa} (the extension picked {got})")
    return "cpu"


def backend_of(device) -> str:
    return "CUDA" if torch.device(device).type == "cuda" else "CPU"


# --------------------------------------------------------------------------------------------
# Fresh random inputs (a new seed for every test; printed so a failure can be replayed)
# --------------------------------------------------------------------------------------------

def fresh_seed() -> int:
    env = os.environ.get("REUSE_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def gen() -> torch.Generator:
    seed = fresh_seed()
    print(f"REUSE_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def randn(shape, gen, *, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0) -> torch.Tensor:
    """Normal(shift, scale) values made in float64 on the CPU, then cast and moved: the float64
    reference later sees exactly the (rounded) values the kernel saw."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
    return x.to(dtype).to(device)


def rand(shape, gen, *, dtype=torch.float32, device="cpu", low=0.0, high=1.0) -> torch.Tensor:
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
    return x.to(dtype).to(device)


def leaf(x: torch.Tensor, dtype=None, requires_grad=True) -> torch.Tensor:
    """A detached copy (optionally cast), as a leaf that requires grad."""
    y = x.detach().clone() if dtype is None else x.detach().to(dtype)
    return y.requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------------

# (rtol, atol as a fraction of the reference's largest finite magnitude)
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


def sum_scale(*factors: torch.Tensor) -> float:
    """sum |a * b * ...| over all entries, in float64 (for scale_floor of a reduced gradient)."""
    prod = None
    for f in factors:
        f = f.detach().double().cpu().abs()
        f = torch.where(torch.isfinite(f), f, torch.zeros((), dtype=torch.float64))
        prod = f if prod is None else prod * f
    return float(prod.sum())


def distill_terms(s: torch.Tensor, logp: torch.Tensor, *, temperature: float, kd_weight: float, ce_weight: float,
                  labels: torch.Tensor | None = None, ignore_index: int = -100, tail: str | None = None):
    """The size of the terms that cancel in a distillation loss and its gradients, in float64 (for
    scale_floor). Where the student nearly matches the teacher (V = 2, small logits) the loss
    sum p (log p - log q) and the gradient q - p cancel to far below their terms, and no float32
    evaluation is more exact than eps times those terms.

    ``s``: student logits (..., V); ``logp``: the teacher's log-probabilities at T (..., V), -inf
    off the kept ids of a sparse teacher (``tail`` "bucket" or "renormalize"; None: dense).
    Returns, per row, sum |terms| of the loss (N,); per entry, of d loss / d s (N, V); and of
    d loss / d t for a dense teacher (N, V); before the reduction's factor. Infinite terms are
    dropped (an infinite loss is checked as such)."""
    V, T = s.shape[-1], float(temperature)
    s, logp = (x.detach().double().cpu().reshape(-1, V) for x in (s, logp))
    keep = logp > -math.inf
    zero = torch.zeros((), dtype=torch.float64)
    if tail == "renormalize":
        logq = torch.log_softmax((s / T).masked_fill(~keep, -math.inf), -1)
        logp = logp - torch.logsumexp(logp, -1, keepdim=True)
    else:
        logq = torch.log_softmax(s / T, -1)
    if tail == "bucket":
        mass = logp.exp().sum(-1, keepdim=True)
        logp = logp - torch.where(mass > 1, mass.log(), zero)
    p, q = logp.exp(), logq.exp()
    # each log-probability carries the rounding of a log-sum-exp, log Z with Z >= 1: 1 per term
    pa = torch.where(p > 0, p * (logp.abs() + logq.abs() + 2), zero)
    loss = kd_weight * T * T * pa.sum(-1)
    gs = kd_weight * T * (p + torch.where(keep | (tail != "renormalize"), q, zero))
    gt = kd_weight * T * (pa + p * pa.sum(-1, keepdim=True))
    if tail == "bucket":
        r = (1 - p.sum(-1)).clamp(min=0)
        q_r = torch.where(keep, zero, q).sum(-1)
        loss = loss + kd_weight * T * T * torch.where(r > 0, r * (r.log().abs() + q_r.log().abs() + 2), zero)
        gs = gs + kd_weight * T * torch.where(keep, zero, (r / q_r)[:, None] * q)
    if labels is not None:
        lab = labels.reshape(-1).long().cpu()
        counted = lab != ignore_index
        if ce_weight != 0:
            y = torch.where(counted, lab, 0)
            loss = loss + ce_weight * (torch.logsumexp(s, -1).abs() + s.gather(-1, y[:, None])[:, 0].abs() + 1)
            gs = gs + ce_weight * (torch.softmax(s, -1) + torch.nn.functional.one_hot(y, V))
        loss, gs, gt = loss * counted, gs * counted[:, None], gt * counted[:, None]
    return tuple(x.nan_to_num(0.0, posinf=0.0) for x in (loss, gs, gt))


def _finite_scale(ref: torch.Tensor, fin: torch.Tensor | None = None) -> float:
    fin = torch.isfinite(ref) if fin is None else fin
    vals = ref[fin]
    return float(vals.abs().max()) if vals.numel() else 0.0


def _as_stored(ref64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 reference as a result of ``dtype`` can hold it (on the CPU, in float64):
    values beyond the dtype's range are +-inf there, which is then the correctly rounded
    result (a float16 loss of 8e5 is +inf in float16: it tops out at 65504)."""
    r = ref64.detach().to(torch.float64).cpu()
    if dtype == torch.float64 or not dtype.is_floating_point:
        return r
    overflow = torch.isfinite(r) & torch.isinf(r.to(dtype))
    return torch.where(overflow, torch.sign(r) * math.inf, r)


def check_special_values(actual: torch.Tensor, ref64: torch.Tensor, name: str) -> None:
    """No NaN ever; finite exactly where the true value is finite in the result's dtype (not
    beyond its range); infinities match in sign."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    assert not torch.isnan(ref64.detach().cpu()).any(), f"{name}: the float64 reference itself has NaN (bad test input)"
    r = _as_stored(ref64, actual.dtype)
    nan = torch.isnan(a)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN value(s), first at {tuple(nan.nonzero()[0].tolist())}"
    fin = torch.isfinite(r)
    bad = fin & ~torch.isfinite(a)
    assert not bad.any(), (f"{name} ({actual.dtype}): {int(bad.sum())} value(s) not finite where the true value "
                           f"is finite, first at {tuple(bad.nonzero()[0].tolist())}: got {a[bad][0].item()}, "
                           f"expected {r[bad][0].item()}")
    inf_wrong = ~fin & (a != r)
    assert not inf_wrong.any(), (f"{name} ({actual.dtype}): {int(inf_wrong.sum())} infinite true value(s) "
                                 f"(beyond the dtype's range included) not matched, first at "
                                 f"{tuple(inf_wrong.nonzero()[0].tolist())}: got {a[inf_wrong][0].item()}, "
                                 f"expected {r[inf_wrong][0].item()} "
                                 f"(float64: {ref64.detach().cpu()[inf_wrong][0].item()})")


def assert_all(ok: torch.Tensor, what: str, values: torch.Tensor | None = None) -> None:
    """Assert every entry of the boolean tensor ``ok``; on failure say how many entries fail and
    where the first one is, with its value from ``values``."""
    ok = torch.as_tensor(ok).detach().cpu()
    if bool(ok.all()):
        return
    bad = ~ok
    first = tuple(int(i) for i in bad.nonzero()[0]) if ok.dim() else ()
    got = f", value {values.detach().cpu()[first].item()}" if values is not None else ""
    raise AssertionError(f"{what}: fails at {int(bad.sum())} of {ok.numel()} entries, first at {first}{got}")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Bitwise equality (NaN included), reporting the differing entries and the largest difference."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{name}: {tuple(actual.shape)} {actual.dtype} vs expected {tuple(expected.shape)} {expected.dtype}")
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if torch.equal(a, e):
        return
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if bool(same.all()):
        return
    d = (a.double() - e.double()).abs()
    d = torch.where(same, torch.zeros((), dtype=torch.float64), torch.nan_to_num(d, nan=math.inf))
    at = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape)) if d.dim() else ()
    first = tuple(int(i) for i in (~same).nonzero()[0]) if d.dim() else ()
    raise AssertionError(f"{name}: not bitwise equal at {int((~same).sum())} of {a.numel()} entries, first at "
                         f"{first}; largest difference {d.max().item():.3e} at {at}: got {a[at].item()!r}, "
                         f"expected {e[at].item()!r}")


def assert_close_to_ref(actual: torch.Tensor, ref64: torch.Tensor, *, dtype: torch.dtype,
                        same_dtype_ref: torch.Tensor | None = None, name: str = "value",
                        f32_as_torch: bool = False, scale_floor: float = 0.0, roundings: int = 1) -> None:
    """Compare a kernel result (computed in ``dtype``) with the float64 reference.

    float64 / float32: ``|a - r| <= rtol |r| + atol * max|r|`` (TOLERANCES).
    float16 / bfloat16: the largest error may be at most twice the largest error of the
    same-dtype PyTorch reference ``same_dtype_ref`` (both against float64), plus a floor of half
    an ulp of the largest value (the rounding of a correctly computed result).
    True values beyond the result dtype's range (a float16 loss over 65504) must come out as
    +-inf, their correctly rounded value; the errors are measured on the other entries.
    ``f32_as_torch``: for float32 at extreme inputs (|logits| ~ 1e4 at T = 0.1), where the
    1e-5 tolerance is out of reach of any float32 evaluation of the formula (PyTorch's own
    float32 misses it by orders of magnitude), float32 may instead meet the 16-bit rule.
    ``scale_floor``: a lower bound for "max|r|" where the true value can be 0 by cancellation
    (a weight gradient with K = 1): the size of the terms that cancel, not of the result.
    ``roundings``: how many times the op's contract rounds the result to ``dtype`` (the floor
    counts half an ulp for each): 2 for a distill_kl gradient scaled by a grad_output other than
    1, which the op saves in the input's dtype in the forward and scales in the backward.
    """
    check_special_values(actual, ref64, name)
    a = actual.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    # the entries the result's dtype can hold finite (check_special_values matched the rest)
    fin = torch.isfinite(_as_stored(r, actual.dtype))
    scale = max(_finite_scale(r, fin), scale_floor)

    def twice_torch(prec):
        assert same_dtype_ref is not None, "this comparison needs the same-dtype PyTorch reference"
        check_special_values(same_dtype_ref, ref64, f"{name} (same-dtype torch reference)")
        t = same_dtype_ref.detach().to(torch.float64).cpu()
        zero = torch.zeros((), dtype=torch.float64)
        diff = torch.where(fin, (a - r).abs(), zero)
        err = float(diff.max()) if fin.any() else 0.0
        err_torch = float(torch.where(fin, (t - r).abs(), zero).max()) if fin.any() else 0.0
        at = tuple(torch.unravel_index(diff.argmax(), diff.shape)) if fin.any() and diff.dim() else ()
        where = (f"; largest at {tuple(int(i) for i in at)}: got {a[at].item():.6e}, float64 {r[at].item():.6e}, "
                 f"same-dtype torch {t[at].item():.6e}") if fin.any() else ""
        # Writing the result in ``prec`` rounds it by up to half an ulp: at most 0.5 eps |x| for
        # a normal x (so at most 0.5 eps max|ref|), and half the subnormal step below the
        # smallest normal. The floor is that rounding bound, nothing more.
        fi = torch.finfo(prec)
        floor = roundings * max(0.5 * fi.eps * scale, 0.5 * fi.tiny * fi.eps)
        return err <= 2 * err_torch + floor, (
            f"{name} ({dtype}): max error {err:.3e} vs float64 exceeds 2 x the same-dtype torch "
            f"reference's {err_torch:.3e} + floor {floor:.3e} (max |ref| = {scale:.3e}){where}")

    if dtype in LOW_PRECISION:
        ok, msg = twice_torch(dtype)
        assert ok, msg
        return
    rtol, atol = TOLERANCES[dtype]
    try:
        torch.testing.assert_close(a[fin], r[fin], rtol=rtol, atol=atol * max(scale, 1e-30), equal_nan=False,
                                   msg=lambda m: f"{name} ({dtype}): {m}")
    except AssertionError as exc:
        if not (f32_as_torch and dtype == torch.float32):
            raise
        ok, msg = twice_torch(dtype)
        assert ok, f"{msg}\nand the float32 tolerance: {exc}"


# --------------------------------------------------------------------------------------------
# The compiled kernel must be what ran
# --------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="session")
def _require_extension():
    """CI runs on the compiled extension only: a missing _C fails every test loudly."""
    if not _ext.available():
        pytest.fail(f"reuse_core._C is not importable ({_ext.LOAD_ERROR}); the tests require the compiled "
                    "extension (the fallback is tested in tests/ops/test_ext.py in a subprocess)", pytrace=False)


def require_kernel(op: str, device) -> None:
    backend = backend_of(device)
    assert _ext.has_kernel(op, backend), (
        f"the extension has no {backend} kernel for reuse_core::{op} (build_info: {_ext.build_info()})")


@contextlib.contextmanager
def dispatched(*ops: str, device="cpu"):
    """Assert that the block ran each of ``ops`` (e.g. "distill_kl", "ensemble_average_backward")
    as the compiled kernel: the op has a kernel for the device's backend, its profiler event
    "reuse_core::<op>" appears, and no fallback RuntimeWarning was emitted."""
    for op in ops:
        require_kernel(op, device)
    saved_warned = set(_ext._warned)
    _ext._warned.clear()  # the fallback warns once per process: make it warn again in here
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                yield
    finally:
        _ext._warned.update(saved_warned)
    fallback = [str(w.message) for w in caught
                if issubclass(w.category, RuntimeWarning) and "falls back" in str(w.message)]
    assert not fallback, f"the op fell back to the reference: {fallback}"
    seen = {e.name for e in prof.events()}
    missing = [f"reuse_core::{op}" for op in ops if f"reuse_core::{op}" not in seen]
    assert not missing, f"compiled kernel(s) {missing} did not run; reuse_core events seen: " \
                        f"{sorted(n for n in seen if 'reuse_core' in n)}"
