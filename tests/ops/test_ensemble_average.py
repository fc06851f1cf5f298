"""reuse_core.ops.ensemble_average / torch.ops.reuse_core.ensemble_average(_backward) against
the float64 reference and KERNEL_NOTES' closed-form gradients, gradcheck, opcheck,
torch.compile, hypothesis shapes, bad input and edge values (zero weights, -inf, +-1e4)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reuse_core.ops import ensemble_average
from reuse_core.ops.reference import ensemble_average_reference

from ..conftest import (
    CUDA_MARKS,
    HAS_CUDA, LOW_PRECISION, NO_CUDA_REASON, assert_all, assert_close_to_ref, assert_equal, device_params, dispatched,
    leaf, rand, randn, require_kernel, sum_scale, target_params, use_target,
)

OP = "ensemble_average"
BWD = "ensemble_average_backward"
MODES = ("logits", "probs", "log_probs")
MODE_CODE = {"logits": 0, "probs": 1, "log_probs": 2}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def weight_dtype_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_weights(K, gen, *, dtype=torch.float32, device="cpu", zero=()):
    w = rand((K,), gen, dtype=torch.float64, low=0.2, high=2.0)
    for k in zero:
        w[k] = 0.0
    return w.to(dtype).to(device)


def run(fn, z, w, g, *, mode, form="stacked", dtype=None, wdtype=None):
    """Forward + backward (y.backward(g)) on leaf copies. z: stacked (K, ..., C).
    Returns (y, grad of z as (K, ..., C), grad of w or None)."""
    zl = leaf(z, dtype)
    wl = None if w is None else leaf(w, wdtype)
    members = zl if form == "stacked" else list(zl.unbind(0))
    if form == "list":  # K separate leaves, as a user would pass them
        members = [m.detach().requires_grad_() for m in members]
    y = fn(members, wl, mode=mode)
    y.backward(g.to(y.dtype))
    gz = zl.grad if form == "stacked" else torch.stack([m.grad for m in members])
    return y.detach(), gz, (None if wl is None else wl.grad)


def formula64(z, w, g, mode):
    """KERNEL_NOTES' closed forms in float64 (independent of the reference): the output and the
    gradients for incoming gradient g. Zero weights: member excluded from y, dz_k = 0, dw_k
    from the formula. log_probs: shares are 0 where y = -inf. A term whose incoming gradient is
    0 contributes 0 (never 0 * inf)."""
    z = z.detach().double().cpu()
    K, C = z.shape[0], z.shape[-1]
    shape = z.shape[1:]
    z = z.reshape(K, -1, C)
    g = g.detach().double().cpu().reshape(-1, C)
    w = (torch.ones(K, dtype=torch.float64) if w is None else w.detach().double().cpu())
    S = w.sum()
    wn = w / S
    zero = torch.zeros((), dtype=torch.float64)

    def gdot(a):  # sum over all entries of g * a, 0 where g == 0
        return torch.where(g != 0, g * a, zero).sum()

    dz = torch.zeros_like(z)
    dw = torch.zeros(K, dtype=torch.float64)
    if mode == "logits":
        y = torch.zeros_like(z[0])
        for k in range(K):
            if wn[k] > 0:
                y = y + wn[k] * z[k]
        for k in range(K):
            dz[k] = wn[k] * g
            dw[k] = gdot(z[k] - y) / S
    elif mode == "probs":
        p = torch.softmax(z, -1)
        y = (wn[:, None, None] * p).sum(0)
        for k in range(K):
            gp = (g * p[k]).sum(-1, keepdim=True)
            dz[k] = wn[k] * p[k] * (g - gp)
            dw[k] = gdot(p[k] - y) / S
    else:
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        terms = torch.stack([logp[k] + math.log(wn[k]) if wn[k] > 0 else torch.full_like(logp[k], -math.inf)
                             for k in range(K)])
        y = torch.logsumexp(terms, 0)
        fin = torch.isfinite(y)
        for k in range(K):
            e = torch.where(fin, torch.exp(logp[k] - torch.where(fin, y, zero)), zero)  # p_k / exp(y)
            r = wn[k] * e
            rg = (r * g).sum(-1, keepdim=True)
            dz[k] = r * g - p[k] * rg
            dw[k] = gdot(e - 1) / S
    return y.reshape(shape), dz.reshape((K,) + tuple(shape)), dw


def dw_scale(z, w, g):
    """Size of the terms summed into a weight's gradient (its tolerance scale, which stays
    meaningful when the true value is 0 by cancellation, as for K = 1)."""
    zmax = max(1.0, float(torch.nan_to_num(z.detach().double().abs(), posinf=0.0).max())) if z.numel() else 1.0
    wsum = 1.0 * z.shape[0] if w is None else float(w.detach().double().sum())
    return sum_scale(g) * zmax / wsum


def members_input(z, form):
    return z if form == "stacked" else list(z.unbind(0))


# --------------------------------------------------------------------------------------------
# against the float64 reference
# --------------------------------------------------------------------------------------------

CONFIGS = {
    # name: (K, member shape, input form, weights: "rand" | None)
    "stacked-rand": (3, (4, 6, 257), "stacked", "rand"),
    "list-uniform": (5, (29, 1030), "list", None),
    "list-rand-K2": (2, (7, 33), "list", "rand"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("target,dtype", target_params())
def test_matches_reference(target, dtype, config, mode, gen, monkeypatch):
    device = use_target(target, monkeypatch)
    K, shape, form, wkind = CONFIGS[config]
    z = randn((K,) + shape, gen, dtype=dtype, device=device, scale=2.0)
    w = make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device) if wkind else None
    g = randn(shape, gen, dtype=dtype, device=device)

    with dispatched(OP, BWD, device=device):
        y, gz, gw = run(ensemble_average, z, w, g, mode=mode, form=form)
    ref = run(ensemble_average_reference, z, w, g, mode=mode, dtype=torch.float64, wdtype=torch.float64)
    same = run(ensemble_average_reference, z, w, g, mode=mode) if dtype in LOW_PRECISION else (None,) * 3

    assert y.dtype == dtype and y.shape == shape and gz.dtype == dtype, \
        f"output {tuple(y.shape)} {y.dtype}, grad members {gz.dtype}, expected {shape} {dtype}"
    assert_close_to_ref(y, ref[0], dtype=dtype, same_dtype_ref=same[0], name="output")
    assert_close_to_ref(gz, ref[1], dtype=dtype, same_dtype_ref=same[1], name="grad members")
    if w is not None:
        assert gw.dtype == w.dtype, f"grad weights {gw.dtype}, expected the weights' {w.dtype}"
        # the weights' gradient is a sum over every entry; in float32 it is held to the float32
        # tolerance, with 16-bit members to 2x the same-dtype reference
        assert_close_to_ref(gw, ref[2], dtype=dtype if dtype in LOW_PRECISION else w.dtype,
                            same_dtype_ref=same[2], name="grad weights", scale_floor=dw_scale(z, w, g))


MIXED = [
    pytest.param("cpu-avx512", torch.bfloat16, torch.float32, id="cpu-avx512-bf16-w_f32"),
    pytest.param("cpu-avx2", torch.bfloat16, torch.float32, id="cpu-avx2-bf16-w_f32"),
    pytest.param("cpu-portable", torch.bfloat16, torch.float32, id="cpu-portable-bf16-w_f32"),
    pytest.param("cpu-avx2", torch.float32, torch.float64, id="cpu-avx2-f32-w_f64"),
    pytest.param("cpu-default", torch.float64, torch.float32, id="cpu-f64-w_f32"),
    pytest.param("cuda", torch.float16, torch.float32, id="cuda-f16-w_f32",
                 marks=CUDA_MARKS),
    pytest.param("cuda", torch.bfloat16, torch.float32, id="cuda-bf16-w_f32",
                 marks=CUDA_MARKS),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target,dtype,wdtype", MIXED)
def test_weights_dtype(target, dtype, wdtype, mode, gen, monkeypatch):
    """Weights in another dtype than the members: output in the members' dtype, the weights'
    gradient in the weights' dtype."""
    device = use_target(target, monkeypatch)
    K, shape = 3, (11, 130)
    z = randn((K,) + shape, gen, dtype=dtype, device=device, scale=2.0)
    w = make_weights(K, gen, dtype=wdtype, device=device)
    g = randn(shape, gen, dtype=dtype, device=device)
    with dispatched(OP, BWD, device=device):
        y, gz, gw = run(ensemble_average, z, w, g, mode=mode)
    ref = run(ensemble_average_reference, z, w, g, mode=mode, dtype=torch.float64, wdtype=torch.float64)
    same = run(ensemble_average_reference, z, w, g, mode=mode)
    assert (y.dtype, gz.dtype, gw.dtype) == (dtype, dtype, wdtype), \
        f"(output, grad members, grad weights) dtypes {(y.dtype, gz.dtype, gw.dtype)}"
    order = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
    prec = max((dtype, wdtype), key=order.index)
    for name, x, r, t in zip(("output", "grad members", "grad weights"), (y, gz, gw), ref, same):
        assert_close_to_ref(x, r, dtype=max((prec, x.dtype), key=order.index), same_dtype_ref=t, name=name)


def test_formula_helper_agrees_with_autograd(gen):
    """The closed forms used by the zero-weight and -inf tests equal float64 autograd of the
    reference where the reference is differentiable (positive weights, finite logits)."""
    K, shape = 3, (5, 9)
    z = randn((K,) + shape, gen, dtype=torch.float64, scale=2.0)
    w = make_weights(K, gen, dtype=torch.float64)
    g = randn(shape, gen, dtype=torch.float64)
    for mode in MODES:
        ref = run(ensemble_average_reference, z, w, g, mode=mode)
        got = formula64(z, w, g, mode)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------------------------
# zero weights
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target,dtype", target_params())
def test_zero_weight(target, dtype, mode, gen, monkeypatch):
    """A zero weight removes its member from the output and gives it a zero gradient, but the
    weight's own gradient is the true (generally non-zero) one, so learned weights can leave 0."""
    device = use_target(target, monkeypatch)
    K, shape = 4, (6, 77)
    z = randn((K,) + shape, gen, dtype=dtype, device=device, scale=2.0)
    w = make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device, zero=(1,))
    g = randn(shape, gen, dtype=dtype, device=device)
    with dispatched(OP, BWD, device=device):
        y, gz, gw = run(ensemble_average, z, w, g, mode=mode)
    y64, gz64, gw64 = formula64(z, w, g, mode)
    # the output does not depend on member 1 at all
    z_other = z.clone()
    z_other[1] = randn(shape, gen, dtype=dtype, device=device, scale=5.0)
    y_other = ensemble_average(z_other, w, mode=mode)
    assert_equal(y_other, y, "output with the zero-weight member's logits changed vs before")
    assert_all(gz[1] == 0, "grad of the zero-weight member == 0", gz[1])
    assert gw[1] != 0, f"grad weights {gw.tolist()}: the zero weight's (index 1) gradient is 0, expected {gw64[1]}"
    assert_all(torch.isfinite(gw), "grad weights finite", gw)
    # 16-bit: the PyTorch reference cannot give the zero weight's gradient (0 * log 0 / where
    # branches), so the closed form rounded to the dtype stands in for the same-dtype reference
    same = [x.to(dtype) for x in (y64, gz64)] + [gw64.to(w.dtype)]
    assert_close_to_ref(y, y64, dtype=dtype, same_dtype_ref=same[0], name="output")
    assert_close_to_ref(gz, gz64, dtype=dtype, same_dtype_ref=same[1], name="grad members")
    assert_close_to_ref(gw, gw64, dtype=dtype if dtype in LOW_PRECISION else w.dtype, same_dtype_ref=same[2],
                        name="grad weights")


@pytest.mark.parametrize("mode", MODES)
def test_reference_zero_weight_gradient(mode, gen):
    """The pure-PyTorch reference is also the fallback users get without the extension: its
    weight gradient at a zero weight should be the true one (the closed form) too."""
    K, shape = 3, (4, 10)
    z = randn((K,) + shape, gen, dtype=torch.float64, scale=2.0)
    w = make_weights(K, gen, dtype=torch.float64, zero=(2,))
    g = randn(shape, gen, dtype=torch.float64)
    _, _, gw = run(ensemble_average_reference, z, w, g, mode=mode)
    _, _, gw64 = formula64(z, w, g, mode)
    torch.testing.assert_close(gw, gw64, rtol=1e-10, atol=1e-12, equal_nan=False)


# --------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["stacked", "list"])
@pytest.mark.parametrize("mode", MODES)
# CPU only: it needs float64, and the CUDA kernels are float32/float16/bfloat16 (by design).
@pytest.mark.parametrize("device", ["cpu"])
def test_gradcheck(device, mode, form, gen):
    require_kernel(OP, device)
    require_kernel(BWD, device)
    K, shape = 3, (2, 5)
    z = randn((K,) + shape, gen, dtype=torch.float64, device=device, scale=1.5)
    w = make_weights(K, gen, dtype=torch.float64, device=device).requires_grad_()
    if form == "stacked":
        z.requires_grad_()
        fn, args = (lambda zz, ww: ensemble_average(zz, ww, mode=mode)), (z, w)
    else:
        ms = [m.clone().requires_grad_() for m in z.unbind(0)]
        fn, args = (lambda ww, *m: ensemble_average(list(m), ww, mode=mode)), (w, *ms)
    # check_undefined_grad is tested on its own (test_backward_with_undefined_grad), so that this
    # test isolates the numbers
    with dispatched(OP, BWD, device=device):
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5, check_undefined_grad=False)


# CPU only: it needs float64, and the CUDA kernels are float32/float16/bfloat16 (by design).
@pytest.mark.parametrize("device", ["cpu"])
def test_backward_with_undefined_grad(device, gen):
    """gradcheck's check_undefined_grad: autograd may hand the backward None for the output's
    gradient (meaning zeros); the inputs' gradients must then be zero (or None), not an error."""
    require_kernel(OP, device)
    z = randn((3, 2, 5), gen, dtype=torch.float64, device=device).requires_grad_()
    w = make_weights(3, gen, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda zz, ww: ensemble_average(zz, ww, mode="probs"), (z, w),
                                    check_undefined_grad=True)


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", device_params())
def test_opcheck(device, mode, stacked, gen):
    require_kernel(OP, device)
    K, shape = 3, (4, 7)
    z = randn((K,) + shape, gen, device=device)
    w = make_weights(K, gen, device=device).requires_grad_()
    members = [z.requires_grad_()] if stacked else [m.clone().requires_grad_() for m in z.unbind(0)]
    torch.library.opcheck(torch.ops.reuse_core.ensemble_average.default, (members, w, MODE_CODE[mode], stacked))


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("device", device_params())
def test_opcheck_backward_op(device, stacked, gen):
    """The backward kernel is a registered op of its own: schema and fake kernel."""
    require_kernel(BWD, device)
    K, shape = 3, (4, 7)
    z = randn((K,) + shape, gen, device=device)
    w = make_weights(K, gen, device=device)
    members = [z] if stacked else list(z.unbind(0))
    out, lse = torch.ops.reuse_core.ensemble_average(members, w, 2, stacked)
    g = randn(shape, gen, device=device)
    torch.library.opcheck(torch.ops.reuse_core.ensemble_average_backward.default,
                          (g, members, w, out, lse, 2, stacked),
                          test_utils=("test_schema", "test_faketensor"))  # no autograd of a backward


def _compile_fn(z_list, w):
    a = ensemble_average(z_list, w, mode="logits")
    b = ensemble_average(torch.stack(z_list), w, mode="probs")
    c = ensemble_average(z_list, w, mode="log_probs")
    return (a * a).sum() + (b * b.detach()).sum() * 3.0 + c.mean()


def _eager_and_compiled(backend, gen, device):
    K, shape = 3, (5, 4, 97)
    z = randn((K,) + shape, gen, device=device, scale=2.0)
    w = make_weights(K, gen, device=device)
    out = {}
    # nothing cached from another test: in memory (reset) nor on disk (force_disable_caches)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(_compile_fn, backend=backend, fullgraph=True)
        compiled([leaf(m) for m in z.unbind(0)], leaf(w)).backward()  # compile outside the profiler
        for name, fn in (("eager", _compile_fn), ("compiled", compiled)):
            zs, wl = [leaf(m) for m in z.unbind(0)], leaf(w)
            with dispatched(OP, BWD, device=device):
                y = fn(zs, wl)
                y.backward()
            out[name] = [y.detach(), wl.grad] + [m.grad for m in zs]
    out["names"] = ["output", "grad weights"] + [f"grad member {k}" for k in range(K)]
    torch._dynamo.reset()
    return out


@pytest.mark.parametrize("device", device_params())
def test_compile_aot_eager(device, gen):
    out = _eager_and_compiled("aot_eager", gen, device)
    for name, e, c in zip(out["names"], out["eager"], out["compiled"]):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7, equal_nan=False,
                                   msg=lambda m, name=name: f"{name}, compiled vs eager: {m}")


@pytest.mark.parametrize("device", device_params())
def test_compile_inductor(device, gen):
    out = _eager_and_compiled("inductor", gen, device)
    for name, e, c in zip(out["names"], out["eager"], out["compiled"]):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7, equal_nan=False,
                                   msg=lambda m, name=name: f"{name}, compiled vs eager: {m}")


# --------------------------------------------------------------------------------------------
# hypothesis: shapes, layouts, list vs stacked, K = 1
# --------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def _layout(z64, layout, dtype, device, gen):
    """(leaf, view): a stacked leaf with z64's values (K, ..., C) in the layout, and the
    function that views such a leaf as (K, ..., C)."""
    shape = z64.shape
    if layout == "contiguous" or z64.numel() == 0 or z64.dim() < 3:
        return z64.to(dtype).to(device).requires_grad_(), lambda b: b
    if layout == "transposed":  # (C, ..., K)-ordered storage
        return (z64.movedim(-1, 0).contiguous().to(dtype).to(device).requires_grad_(),
                lambda b: b.movedim(0, -1))
    if layout == "sliced":
        wide = torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=torch.float64)
        wide[..., ::2] = z64
        return wide.to(dtype).to(device).requires_grad_(), lambda b: b[..., ::2]
    # expanded over the leading (row) dimensions of each member
    row = z64[:, :1].contiguous()
    return row.to(dtype).to(device).requires_grad_(), lambda b: b.expand(shape)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    K=st.integers(1, 4),
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    C=st.sampled_from([1, 2, 7, 33, 129]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    mode=st.sampled_from(MODES),
    layout=st.sampled_from(LAYOUTS),
    weights=st.sampled_from(["none", "rand"]),
    seed=st.integers(0, 2**32 - 1),
)
@pytest.mark.parametrize("device", device_params())
def test_hypothesis_shapes(device, K, lead, C, dtype, mode, layout, weights, seed):
    require_kernel(OP, device)
    if device == "cuda" and dtype == torch.float64:  # no float64 kernel on CUDA (by design)
        dtype = torch.float32
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(lead) + (C,)
    z64 = torch.randn((K,) + shape, generator=gen, dtype=torch.float64) * 2
    w = None if weights == "none" else make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    results = {}
    for form in ("stacked", "list"):
        base, view = _layout(z64, layout, dtype, device, gen)
        zin = view(base)
        wl = None if w is None else leaf(w)
        y = ensemble_average(zin if form == "stacked" else list(zin.unbind(0)), wl, mode=mode)
        y.backward(g)
        results[form] = (y.detach(), base.grad, None if wl is None else wl.grad)

    rb, rview = _layout(z64, layout, torch.float64, "cpu", gen)
    rw = None if w is None else leaf(w.cpu(), torch.float64)
    ry = ensemble_average_reference(rview(rb), rw, mode=mode)
    ry.backward(g.double().cpu())

    ys, gzs, gws = results["stacked"]
    assert ys.shape == shape and ys.dtype == dtype, f"output {tuple(ys.shape)} {ys.dtype}, expected {shape} {dtype}"
    # degenerate shapes (C = 1, K = 1) make true values exactly 0 by cancellation (log 1, p - p):
    # errors are then measured against the size of the terms, |f(z)| <= max(1, |z|) and |g|
    f_scale = 1.0 if mode != "logits" else float(z64.abs().max()) if z64.numel() else 1.0
    g_scale = float(g.abs().max()) if g.numel() else 1.0
    assert_close_to_ref(ys, ry, dtype=dtype, name="output", scale_floor=f_scale)
    assert_close_to_ref(gzs, rb.grad, dtype=dtype, name="grad members", scale_floor=g_scale)
    if w is not None:
        assert_close_to_ref(gws, rw.grad, dtype=w.dtype, name="grad weights", scale_floor=dw_scale(z64, w, g))
    # list and stacked input: the same numbers
    for name, a, b in zip(("output", "grad members", "grad weights"), results["list"], results["stacked"]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0, equal_nan=False,
                                       msg=lambda m, name=name: f"{name} ({dtype}), list vs stacked: {m}")


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _z(gen, K=3, shape=(4, 6), dtype=torch.float32):
    return randn((K,) + shape, gen, dtype=dtype)


def test_members_differ(gen):
    z = _z(gen)
    with pytest.raises(ValueError, match=r"member_logits\[1\]"):
        ensemble_average([z[0], z[1][:, :5], z[2]])
    with pytest.raises(ValueError, match=r"member_logits\[2\]"):
        ensemble_average([z[0], z[1], z[2][:3]])
    with pytest.raises(TypeError, match=r"member_logits\[1\]"):
        ensemble_average([z[0], z[1].double(), z[2]])
    with pytest.raises(ValueError, match="member_logits"):
        ensemble_average([])
    with pytest.raises(ValueError, match="member_logits"):
        ensemble_average(z[0, 0])  # a stacked tensor needs (K, ..., C)
    with pytest.raises(ValueError, match="class dimension"):
        ensemble_average(torch.zeros(3, 4, 0))


@pytest.mark.parametrize("weights,match", [
    ([1.0, -0.5, 1.0], "non-negative"),
    ([0.0, 0.0, 0.0], "positive sum"),
    ([1.0, float("nan"), 1.0], "non-negative"),
    ([1.0, 1.0], r"shape \(3,\)"),
    ([1.0, 1.0, 1.0, 1.0], r"shape \(3,\)"),
    ([[1.0, 1.0, 1.0]], r"shape \(3,\)"),
])
@pytest.mark.parametrize("form", ["stacked", "list"])
def test_bad_weights(weights, match, form, gen):
    z = _z(gen)
    with pytest.raises(ValueError, match=f"weights.*{match}"):
        ensemble_average(members_input(z, form), torch.tensor(weights))


def test_integer_inputs(gen):
    z = _z(gen)
    with pytest.raises(TypeError, match="member_logits"):
        ensemble_average(z.to(torch.int64))
    with pytest.raises(TypeError, match=r"member_logits\[0\]"):
        ensemble_average([m.to(torch.int32) for m in z])
    with pytest.raises(TypeError, match="weights"):
        ensemble_average(z, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="member_logits"):
        ensemble_average(z.tolist())


def test_bad_mode(gen):
    with pytest.raises(ValueError, match="mode"):
        ensemble_average(_z(gen), mode="softmax")


def test_float16_on_cpu_is_a_clear_error(gen):
    z = _z(gen, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"float32, float64 or bfloat16.*Half"):
        ensemble_average(z)


def test_device_mismatch_meta(gen):
    """No second real device here: a meta tensor stands in for 'another device'."""
    z = _z(gen)
    with pytest.raises(ValueError, match=r"member_logits\[1\].*member_logits\[0\]"):
        ensemble_average([z[0], z[1].to("meta"), z[2]])
    with pytest.raises(ValueError, match="weights"):
        ensemble_average(z, torch.ones(3, device="meta"))


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.cuda
def test_device_mismatch_cuda(gen):
    z = _z(gen)
    with pytest.raises(ValueError, match=r"member_logits\[1\]"):
        ensemble_average([z[0].cuda(), z[1], z[2].cuda()])
    with pytest.raises(ValueError, match="weights"):
        ensemble_average(z.cuda(), torch.ones(3))


def test_raw_op_checks(gen):
    """The C++ checks guard direct torch.ops callers with errors naming the argument."""
    z = _z(gen)
    op = torch.ops.reuse_core.ensemble_average
    w = torch.ones(3)
    with pytest.raises(RuntimeError, match="weights must be non-negative"):
        op(list(z), torch.tensor([1.0, -1.0, 1.0]), 1, False)
    with pytest.raises(RuntimeError, match="positive"):
        op(list(z), torch.zeros(3), 1, False)
    with pytest.raises(RuntimeError, match="shape"):
        op([z[0], z[1][:, :5], z[2]], w, 1, False)
    with pytest.raises(RuntimeError, match="members but 2 weights"):
        op(list(z), torch.ones(2), 1, False)
    with pytest.raises(RuntimeError, match="stacked"):
        op([z], torch.ones(2), 1, True)
    with pytest.raises(RuntimeError, match="mode"):
        op(list(z), w, 3, False)


# --------------------------------------------------------------------------------------------
# edge values
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target,dtype", target_params())
def test_huge_logits(target, dtype, mode, gen, monkeypatch):
    """Logits of +-1e4: finite, correct outputs and gradients in every mode."""
    device = use_target(target, monkeypatch)
    K, shape = 3, (9, 70)
    noise = randn((K,) + shape, gen, dtype=torch.float64, scale=3.0)
    sign = (torch.randint(0, 2, (K,) + shape, generator=gen) * 2 - 1).double()
    z = (noise + 1e4 * sign).to(dtype).to(device)
    w = make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device)
    g = randn(shape, gen, dtype=dtype, device=device)
    with dispatched(OP, BWD, device=device):
        out = run(ensemble_average, z, w, g, mode=mode)
    ref = run(ensemble_average_reference, z, w, g, mode=mode, dtype=torch.float64, wdtype=torch.float64)
    same = run(ensemble_average_reference, z, w, g, mode=mode)
    for name, x, r, t in zip(("output", "grad members", "grad weights"), out, ref, same):
        assert torch.isfinite(x).all(), f"{name} not finite"
        prec = dtype if dtype in LOW_PRECISION or name != "grad weights" else w.dtype
        assert_close_to_ref(x, r, dtype=prec, same_dtype_ref=t, name=name, f32_as_torch=True)


@pytest.mark.parametrize("target,dtype", target_params())
def test_neg_inf_logits_mode(target, dtype, gen, monkeypatch):
    """logits mode with a masked vocabulary, followed by cross entropy (so the incoming gradient
    is exactly 0 at the -inf outputs): a -inf logit with a positive weight makes that output -inf
    (the true value); a -inf logit of a zero-weight member does not change the output; member
    gradients are finite; the weights' gradient is the closed form (a term with gradient 0
    contributes 0, never 0 * inf = NaN), -inf/+inf only for the zero-weight member whose -inf
    logit meets a non-zero gradient."""
    device = use_target(target, monkeypatch)
    K, shape = 3, (5, 40)
    z = randn((K,) + shape, gen, dtype=torch.float64, scale=2.0)
    z[0, 1, 3] = -math.inf  # positive weight: y[1, 3] = -inf
    z[1, 4, 10:20] = -math.inf  # positive weight: y[4, 10:20] = -inf
    z[2, 2, 5] = -math.inf  # zero weight: no effect on y
    z = z.to(dtype).to(device)
    w = make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device, zero=(2,))
    labels = torch.tensor([0, 1, 2, 3, 4], device=device)
    zl, wl = leaf(z), leaf(w)
    seen = {}
    with dispatched(OP, BWD, device=device):
        y = ensemble_average(zl, wl, mode="logits")
        y.register_hook(lambda grad: seen.setdefault("g", grad.detach().clone()))
        torch.nn.functional.cross_entropy(y.float(), labels).backward()
    assert y[1, 3].item() == -math.inf and (y[4, 10:20] == -math.inf).all()
    assert torch.isfinite(y[2]).all()
    g = seen["g"]
    assert (g[torch.isinf(y)] == 0).all()
    y64, gz64, gw64 = formula64(z, w, g, "logits")
    same = [y64.to(dtype), gz64.to(dtype), gw64.to(w.dtype)]
    assert_close_to_ref(y, y64, dtype=dtype, same_dtype_ref=same[0], name="output")
    assert_close_to_ref(zl.grad, gz64, dtype=dtype, same_dtype_ref=same[1], name="grad members")
    assert_close_to_ref(wl.grad, gw64, dtype=dtype if dtype in LOW_PRECISION else w.dtype,
                        same_dtype_ref=same[2], name="grad weights")


@pytest.mark.parametrize("mode", ["probs", "log_probs"])
@pytest.mark.parametrize("target,dtype", target_params())
def test_neg_inf_entries_some_members(target, dtype, mode, gen, monkeypatch):
    """probs / log_probs: -inf logits in some members (probability 0 there, but another
    member has mass): finite outputs and gradients that match the reference."""
    device = use_target(target, monkeypatch)
    K, shape = 3, (6, 50)
    z = randn((K,) + shape, gen, dtype=torch.float64, scale=2.0)
    mask = torch.rand((K,) + shape, generator=gen) < 0.3
    mask[0] = False  # member 0 has mass everywhere
    z[mask] = -math.inf
    z = z.to(dtype).to(device)
    w = make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device)
    g = randn(shape, gen, dtype=dtype, device=device)
    with dispatched(OP, BWD, device=device):
        out = run(ensemble_average, z, w, g, mode=mode)
    ref = run(ensemble_average_reference, z, w, g, mode=mode, dtype=torch.float64, wdtype=torch.float64)
    same = run(ensemble_average_reference, z, w, g, mode=mode)
    for name, x, r, t in zip(("output", "grad members", "grad weights"), out, ref, same):
        assert_all(torch.isfinite(x), f"{name} finite", x)
        prec = dtype if dtype in LOW_PRECISION or name != "grad weights" else w.dtype
        assert_close_to_ref(x, r, dtype=prec, same_dtype_ref=t, name=name)


@pytest.mark.parametrize("zero_grad_there", [True, False], ids=["g0-at-inf", "g-at-inf"])
@pytest.mark.parametrize("target,dtype", target_params())
def test_log_probs_class_with_no_mass(target, dtype, zero_grad_there, gen, monkeypatch):
    """log_probs: where every member gives a class probability 0, the output is -inf, the
    members' shares there are 0 (not NaN) and every gradient is finite; elsewhere all is
    as usual. Expected values: KERNEL_NOTES' closed forms (with shares 0 at y = -inf)."""
    device = use_target(target, monkeypatch)
    K, shape = 3, (4, 30)
    z = randn((K,) + shape, gen, dtype=torch.float64, scale=2.0)
    z[:, 0, 5] = -math.inf  # no member has mass at (0, 5)
    z[:, 2, :3] = -math.inf
    z[1, 3, 7] = -math.inf  # only one member: y finite
    z = z.to(dtype).to(device)
    w = make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device)
    g = randn(shape, gen, dtype=torch.float64)
    if zero_grad_there:
        g[0, 5] = 0
        g[2, :3] = 0
    g = g.to(dtype).to(device)
    with dispatched(OP, BWD, device=device):
        y, gz, gw = run(ensemble_average, z, w, g, mode="log_probs")
    y64, gz64, gw64 = formula64(z, w, g, "log_probs")
    assert y[0, 5].item() == -math.inf and (y[2, :3] == -math.inf).all(), \
        f"output at the classes without mass: y[0, 5] = {y[0, 5].item()}, y[2, :3] = {y[2, :3].tolist()}, expected -inf"
    assert torch.isfinite(y[3, 7]), f"output y[3, 7] = {y[3, 7].item()}, expected finite (two members have mass)"
    same = [y64.to(dtype), gz64.to(dtype), gw64.to(w.dtype)]
    assert_close_to_ref(y, y64, dtype=dtype, same_dtype_ref=same[0], name="output")
    assert_close_to_ref(gz, gz64, dtype=dtype, same_dtype_ref=same[1], name="grad members")
    assert_close_to_ref(gw, gw64, dtype=dtype if dtype in LOW_PRECISION else w.dtype, same_dtype_ref=same[2],
                        name="grad weights")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", device_params())
def test_empty_rows(device, mode, gen):
    """No rows at all: an empty output, empty member gradients, zero weight gradient."""
    require_kernel(OP, device)
    z = randn((3, 0, 5), gen, device=device).requires_grad_()
    w = make_weights(3, gen, device=device).requires_grad_()
    y = ensemble_average(z, w, mode=mode)
    assert y.shape == (0, 5), f"output shape {tuple(y.shape)}, expected (0, 5)"
    y.sum().backward()
    assert z.grad.shape == z.shape, f"grad members shape {tuple(z.grad.shape)}, expected {tuple(z.shape)}"
    assert_all(w.grad == 0, "grad weights == 0 with no rows", w.grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", device_params())
def test_k1_is_identity_of_f(device, mode, gen):
    """K = 1: the output is f(z) itself and the weight's gradient is 0 (its normalised weight
    is always 1)."""
    require_kernel(OP, device)
    z = randn((1, 5, 17), gen, device=device, scale=2.0).requires_grad_()
    w = torch.tensor([0.7], device=device, requires_grad=True)
    y = ensemble_average(z, w, mode=mode)
    f = {"logits": lambda x: x, "probs": lambda x: torch.softmax(x, -1),
         "log_probs": lambda x: torch.log_softmax(x, -1)}[mode]
    torch.testing.assert_close(y, f(z[0]).detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"output vs f(z): {m}")
    y.backward(randn((5, 17), gen, device=device))
    assert abs(w.grad.item()) < 1e-5, f"grad weight {w.grad.item():.3e}, expected 0 (|.| < 1e-5) with K = 1"
    assert_all(torch.isfinite(z.grad), "grad members finite", z.grad)


@pytest.mark.parametrize("device", device_params())
def test_repeated_backward(device, gen):
    """retain_graph: two backward passes give the same gradients (the saved tensors are intact)."""
    z = randn((3, 8, 100), gen, device=device).requires_grad_()
    w = make_weights(3, gen, device=device).requires_grad_()
    y = ensemble_average(z, w, mode="log_probs")
    g = randn(y.shape, gen, device=device)
    g1 = torch.autograd.grad(y, (z, w), g, retain_graph=True)
    g2 = torch.autograd.grad(y, (z, w), g)
    for name, a, b in zip(("grad members", "grad weights"), g2, g1):
        assert_equal(a, b, f"{name}, 2nd backward vs 1st")


NO_CACHING_SCRIPT = """
import torch
from reuse_core.ops import ensemble_average
from reuse_core.ops.reference import ensemble_average_reference
g = torch.Generator(device="cuda").manual_seed(0)
z = torch.randn(3, 64, 1000, device="cuda", generator=g).bfloat16()
w = torch.rand(3, device="cuda", generator=g) + 0.5
for mode in ("probs", "log_probs", "logits"):
    zk = z.clone().requires_grad_()
    gz, = torch.autograd.grad(ensemble_average(zk, w, mode=mode).float().sum(), zk)
    zr = z.double().requires_grad_()
    rz, = torch.autograd.grad(ensemble_average_reference(zr, w.double(), mode=mode).sum(), zr)
    torch.cuda.synchronize()
    err = (gz.double() - rz).abs().max().item()
    assert err <= 2e-2 * (1 + rz.abs().max().item()), (mode, err)
print("ok")
"""


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_MARKS)])
def test_bf16_backward_without_the_caching_allocator(device):
    """The 16-bit backward recomputes y into buffers it must hold: with PYTORCH_NO_CUDA_MEMORY_CACHING=1
    a freed temporary is handed back to the driver at once, so writing into it would be caught."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "CUDA_LAUNCH_BLOCKING": "1"}
    r = subprocess.run([sys.executable, "-c", NO_CACHING_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# --------------------------------------------------------------------------------------------
# NaN in, NaN out; a member row of -inf
# --------------------------------------------------------------------------------------------

# NaN at the first, a middle, the last class, inside and outside the first vector width (8 lanes
# for AVX2, 16 for AVX-512) and past the first L1 block of 1024
NAN_AT = [0, 5, 11, 16, 1500, -1]


@pytest.mark.parametrize("zero_weight", [False, True], ids=["weighted", "zero-weight"])
@pytest.mark.parametrize("at", NAN_AT)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target,dtype", target_params(cpu_dtypes=(torch.float32, torch.bfloat16),
                                                       cuda_dtypes=(torch.float32, torch.bfloat16)))
def test_a_nan_gives_nan_in_exactly_the_outputs_that_depend_on_it(target, dtype, mode, at, zero_weight, gen,
                                                                  monkeypatch):
    """Member 1 holds a NaN in row 2 (a zero weight does not hide it: 0 * NaN = NaN). logits: that
    output entry is NaN, member gradients stay finite. probs: the output row is NaN and so is the
    gradient row of member 1 only. log_probs: the output row and every member's gradient row are
    NaN. Every weight's gradient is NaN. As in the float64 reference; other rows are unchanged."""
    device = use_target(target, monkeypatch)
    K, rows, C = 3, 4, 1700
    z = randn((K, rows, C), gen, dtype=dtype, scale=2.0)
    z[1, 2, at] = float("nan")
    w = make_weights(K, gen, dtype=torch.float32, zero=(1,) if zero_weight else ())
    g = randn((rows, C), gen, dtype=dtype)
    z, w, g = z.to(device), w.to(device), g.to(device)
    with dispatched(OP, BWD, device=device):
        y, gz, gw = run(ensemble_average, z, w, g, mode=mode)
    ref = run(ensemble_average_reference, z, w, g, mode=mode, dtype=torch.float64, wdtype=torch.float64)
    nan_y = torch.zeros(rows, C, dtype=torch.bool)
    nan_gz = torch.zeros(K, rows, C, dtype=torch.bool)
    if mode == "logits":
        nan_y[2, at] = True
    else:
        nan_y[2] = True
        nan_gz[1 if mode == "probs" else slice(None), 2] = True
    for name, got, want, expected in zip(("output", "grad members", "grad weights"), (y, gz, gw), ref,
                                         (nan_y, nan_gz, torch.ones(K, dtype=torch.bool))):
        assert torch.equal(want.isnan().cpu(), expected), f"reference {name}: NaN pattern"
        assert torch.equal(got.isnan().cpu(), expected), \
            f"{name}: NaN at {got.isnan().nonzero().tolist()[:5]}..., expected {expected.nonzero().tolist()[:5]}..."
    others = [0, 1, 3]
    clean = run(ensemble_average, z[:, others], w, g[others], mode=mode)
    assert torch.equal(y[others], clean[0]), "output: the other rows are what they are without row 2"
    assert torch.equal(gz[:, others], clean[1]), "grad members: the other rows are what they are without row 2"


@pytest.mark.parametrize("mode", ["probs", "log_probs"])
@pytest.mark.parametrize("target,dtype", target_params())
def test_a_member_row_of_neg_inf_has_the_uniform_softmax(target, dtype, mode, gen, monkeypatch):
    """softmax(z + c) = softmax(z) for every c, so a row of -inf (the limit of a constant row) has
    the uniform softmax 1/C: the output row is still a distribution (it summed to 1 - w_k once),
    and output and gradients match the float64 reference, where that row is a constant row."""
    device = use_target(target, monkeypatch)
    K, rows, C = 3, 5, 37
    z = randn((K, rows, C), gen, dtype=torch.float64, scale=2.0)
    z[1, 3] = -math.inf
    z[:, 4] = -math.inf  # every member
    z = z.to(dtype).to(device)
    w = make_weights(K, gen, dtype=weight_dtype_for(dtype), device=device)
    g = randn((rows, C), gen, dtype=dtype, device=device)
    with dispatched(OP, BWD, device=device):
        out = run(ensemble_average, z, w, g, mode=mode)
    constant = torch.where(torch.isinf(z), torch.zeros((), dtype=dtype, device=device), z)
    ref = run(ensemble_average_reference, constant, w, g, mode=mode, dtype=torch.float64, wdtype=torch.float64)
    same = run(ensemble_average_reference, z, w, g, mode=mode)
    total = out[0].double().exp().sum(-1) if mode == "log_probs" else out[0].double().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=2e-2 if dtype in LOW_PRECISION else 1e-5)
    assert torch.allclose(out[0][4].double().cpu(), torch.full((C,), 1 / C if mode == "probs" else -math.log(C),
                                                                 dtype=torch.float64), rtol=1e-2, atol=0)
    for name, x, r, t in zip(("output", "grad members", "grad weights"), out, ref, same):
        assert_all(torch.isfinite(x), f"{name} finite", x)
        prec = dtype if dtype in LOW_PRECISION or name != "grad weights" else w.dtype
        assert_close_to_ref(x, r, dtype=prec, same_dtype_ref=t, name=name, f32_as_torch=True)
