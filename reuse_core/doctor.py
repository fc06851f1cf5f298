"""``reuse doctor``: which kernels this installation runs, and whether they compute the right thing.

Per op (``reuse_core.ops._ext.OPS``) and backend (CPU, CUDA) the status is exactly one of:

* ``"verified"``: the compiled kernel ran here, forward and backward on small random inputs,
  and matched the float64 reference;
* ``"failed: <why>"``: it ran and did not match, or raised;
* ``"compiled, not run here"``: a CUDA kernel is compiled in but there is no GPU to run it on;
* ``"reference fallback"``: no kernel for that backend; the op runs the pure-PyTorch reference.

The exit status is non-zero when the extension did not load or any check failed.
Adding an op: add its check to :data:`CHECKS` (an op without one is reported as failed).
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from collections.abc import Callable

import torch

VERIFIED = "verified"
NOT_RUN = "compiled, not run here"
FALLBACK = "reference fallback"

# Float32 kernels against the float64 reference; TF32 and fast-math exp stay well inside these.
_TOL = {torch.float32: (2e-4, 2e-5), torch.float64: (1e-9, 1e-11)}


class CheckFailed(AssertionError):
    pass


def _close(name: str, got: torch.Tensor | None, want: torch.Tensor | None) -> None:
    if want is None and got is None:
        return
    if got is None or want is None:
        raise CheckFailed(f"{name}: {'missing' if got is None else 'unexpected'} gradient")
    if got.shape != want.shape:
        raise CheckFailed(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(g).all():
        raise CheckFailed(f"{name}: non-finite values")
    rtol, atol = _TOL.get(got.dtype, (2e-2, 2e-3))
    atol = atol * max(1.0, float(w.abs().max()) if w.numel() else 1.0)
    err = (g - w).abs()
    bad = err > atol + rtol * w.abs()
    if bad.any():
        i = int(err.flatten().argmax())
        raise CheckFailed(
            f"{name}: max abs error {float(err.max()):.3g} (got {float(g.flatten()[i]):.6g}, "
            f"want {float(w.flatten()[i]):.6g}; {int(bad.sum())} of {bad.numel()} out of tolerance)"
        )


def _leaf(x: torch.Tensor, device: str, dtype=torch.float32) -> torch.Tensor:
    return x.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True)


def check_distill_kl(device: str) -> None:
    """Mutual learning (student and teacher gradients), CE with ignored rows, two reductions."""
    from reuse_core.ops import distill_kl_loss
    from reuse_core.ops.reference import distill_kl_loss_reference

    g = torch.Generator().manual_seed(1234)
    N, V = 13, 301  # odd sizes: vector tails
    s0, t0 = torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 7]] = -100
    configs = [
        dict(labels=labels, temperature=2.0, kd_weight=0.7, ce_weight=0.3, reduction="batchmean"),
        dict(labels=None, temperature=0.5, kd_weight=1.0, ce_weight=0.0, reduction="none"),
    ]
    for cfg in configs:
        cfg = dict(cfg)
        lab = cfg.pop("labels")
        up = torch.randn(N, generator=g) if cfg["reduction"] == "none" else torch.tensor(1.7)
        results = []
        for fn, dt, dev in ((distill_kl_loss, torch.float32, device), (distill_kl_loss_reference, torch.float64, "cpu")):
            s, t = _leaf(s0, dev, dt), _leaf(t0, dev, dt)
            loss = fn(s, t, None if lab is None else lab.to(dev), **cfg)
            loss.backward(up.to(dev, dt))
            results.append((loss, s.grad, t.grad))
        where = f"reduction={cfg['reduction']}"
        for what, got, want in zip(("loss", "student grad", "teacher grad"), *results):
            _close(f"{what} ({where})", got, want)


def check_ensemble_average(device: str) -> None:
    """Every mode, stacked members, learned weights; a list of members in "probs" mode."""
    from reuse_core.ops import ensemble_average
    from reuse_core.ops.reference import ensemble_average_reference

    g = torch.Generator().manual_seed(4321)
    K, N, C = 3, 5, 37
    z0 = torch.randn(K, N, C, generator=g) * 3
    w0 = torch.tensor([0.5, 1.0, 1.5])
    up = torch.randn(N, C, generator=g)
    for mode, as_list in (("probs", False), ("log_probs", False), ("logits", False), ("probs", True)):
        results = []
        for fn, dt, dev in ((ensemble_average, torch.float32, device), (ensemble_average_reference, torch.float64, "cpu")):
            z, w = _leaf(z0, dev, dt), _leaf(w0, dev, dt)
            members = list(z.unbind(0)) if as_list else z
            y = fn(members, w, mode=mode)
            y.backward(up.to(dev, dt))
            results.append((y, z.grad, w.grad))
        where = f"mode={mode}{', list' if as_list else ''}"
        for what, got, want in zip(("output", "member grads", "weight grads"), *results):
            _close(f"{what} ({where})", got, want)


def check_attention(device: str) -> None:
    """Grouped-query heads, odd lengths, causal with Lq != Lk, a key padding mask with one batch
    entry fully masked (zero output and gradients); output, dq, dk, dv."""
    from reuse_core.ops import attention
    from reuse_core.ops.reference import attention_reference

    g = torch.Generator().manual_seed(2468)
    B, H, Hkv, Lq, Lk, D = 2, 4, 2, 37, 70, 32
    q0, k0, v0 = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    up = torch.randn(B, H, Lq, D, generator=g)
    mask = torch.rand(B, Lk, generator=g) < 0.3
    mask[1] = True
    for causal, m in ((True, None), (False, mask)):
        results = []
        for fn, dt, dev in ((attention, torch.float32, device), (attention_reference, torch.float64, "cpu")):
            q, k, v = _leaf(q0, dev, dt), _leaf(k0, dev, dt), _leaf(v0, dev, dt)
            y = fn(q, k, v, causal=causal, key_padding_mask=None if m is None else m.to(dev))
            y.backward(up.to(dev, dt))
            results.append((y, q.grad, k.grad, v.grad))
        where = "causal" if causal else "key_padding_mask"
        for what, got, want in zip(("output", "dq", "dk", "dv"), *results):
            _close(f"{what} ({where})", got, want)


def check_fused_linear_distill(device: str) -> None:
    """Dense and sparse ("bucket", "renormalize") teachers, bias, CE with ignored rows, several
    chunks: loss and the gradients of hidden, weight and bias."""
    from reuse_core.ops import SparseTeacher, fused_linear_distill_loss
    from reuse_core.ops.reference import fused_linear_distill_loss_reference

    g = torch.Generator().manual_seed(8642)
    N, H, Ht, V, k = 13, 24, 20, 301, 16
    h0, w0, b0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g)
    th, tw = torch.randn(N, Ht, generator=g), torch.randn(V, Ht, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[3, 8]] = -100
    top = torch.log_softmax(th @ tw.T / 2.0, -1).topk(k, -1)
    teachers = {"dense": (th, tw), "bucket": SparseTeacher(top.indices, top.values, "bucket"),
                "renormalize": SparseTeacher(top.indices, top.values, "renormalize")}
    for name, teacher in teachers.items():
        results = []
        for fn, dt, dev in ((fused_linear_distill_loss, torch.float32, device),
                            (fused_linear_distill_loss_reference, torch.float64, "cpu")):
            h, w, b = _leaf(h0, dev, dt), _leaf(w0, dev, dt), _leaf(b0, dev, dt)
            t = (tuple(x.to(dev, dt) for x in teacher) if name == "dense"
                 else SparseTeacher(teacher.indices.to(dev), teacher.logprobs.to(dev, dt), teacher.tail))
            kw = {"chunk_size": 4} if fn is fused_linear_distill_loss else {}
            loss = fn(h, w, t, labels.to(dev), student_bias=b, temperature=2.0, ce_weight=0.3, **kw)
            loss.backward()
            results.append((loss, h.grad, w.grad, b.grad))
        for what, got, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), *results):
            _close(f"{what} ({name} teacher)", got, want)


#: op stem -> check(device): raises on a mismatch.
CHECKS: dict[str, Callable[[str], None]] = {
    "distill_kl": check_distill_kl,
    "ensemble_average": check_ensemble_average,
    "attention": check_attention,
    "fused_linear_distill": check_fused_linear_distill,
}


def _run_check(op: str, device: str) -> str:
    check = CHECKS.get(op)
    if check is None:
        return "failed: reuse_core.doctor has no check for this op"
    try:
        with warnings.catch_warnings():
            # A fallback warning means the reference ran instead of the kernel.
            warnings.filterwarnings("error", message=".*falls back to the pure-PyTorch reference.*")
            check(device)
        if device == "cuda":
            torch.cuda.synchronize()
    except CheckFailed as exc:
        return f"failed: {exc}"
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"failed: {type(exc).__name__}: {msg}"
    return VERIFIED


def op_status(op: str, backend: str) -> str:
    from reuse_core.ops import _ext

    if not _ext.has_kernel(op, backend):
        return FALLBACK
    if backend == "CPU":
        return _run_check(op, "cpu")
    if not torch.cuda.is_available():
        return NOT_RUN
    return _run_check(op, "cuda")


def _thp() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return None


def collect() -> dict:
    """Everything ``reuse doctor --json`` prints."""
    from reuse_core import __version__
    from reuse_core.ops import _ext

    info = _ext.build_info()
    ext_path = getattr(_ext._C, "__file__", None) if _ext.available() else None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "reuse_core": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "extension": {
            "loaded": _ext.available(),
            "load_error": _ext.LOAD_ERROR,
            "path": ext_path,
            "cpu_isa": info.get("cpu_isa"),
            "cuda": bool(info.get("cuda")),
            "cuda_archs": info.get("cuda_archs") or "",
        },
        "cpu_threads": torch.get_num_threads(),
        "transparent_hugepage": _thp(),
        "cpu_cache_mb": os.environ.get("REUSE_CORE_CPU_CACHE_MB", "1024 (default)"),
        "ops": [{"op": op, "backend": b, "status": op_status(op, b)} for op in _ext.OPS for b in _ext.BACKENDS],
    }


def exit_code(report: dict) -> int:
    if not report["extension"]["loaded"]:
        return 1
    return 1 if any(o["status"].startswith("failed") for o in report["ops"]) else 0


def format_report(r: dict) -> str:
    ext = r["extension"]
    lines = [
        f"reuse-core   {r['reuse_core']} (python {r['python']})",
        f"torch        {r['torch']}" + (f", CUDA {r['cuda']}" if r["cuda"] else ", no CUDA"),
        f"GPU          {r['gpu'] or 'none visible'}",
    ]
    if ext["loaded"]:
        lines.append(f"extension    loaded: {ext['path']}")
    else:
        lines.append(f"extension    NOT LOADED: {ext['load_error']}")
        lines.append("             every op runs its pure-PyTorch reference; build it with `pip install -e .`")
    lines += [
        f"CPU path     {ext['cpu_isa'] or '-'} ({r['cpu_threads']} threads; transparent huge pages: "
        f"{r['transparent_hugepage'] or 'unknown'}; REUSE_CORE_CPU_CACHE_MB={r['cpu_cache_mb']})",
        f"CUDA archs   {ext['cuda_archs'] if ext['cuda'] else '(built without CUDA)'}",
        "",
    ]
    w = max([len(o["op"]) for o in r["ops"]] + [2])
    lines.append(f"{'op'.ljust(w)}  backend  status")
    lines += [f"{o['op'].ljust(w)}  {o['backend'].ljust(7)}  {o['status']}" for o in r["ops"]]
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    import json

    report = collect()
    if as_json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return exit_code(report)
