"""The benchmark runner behind ``reuse bench``; ``benchmarks/`` runs the same cases under pytest-benchmark.

Every case is one op at one shape, dtype, mode and direction ("fwd" or "fwd+bwd"), and every case
pits contenders against each other in one process:

* ``fused``   the public op (``reuse_core.ops.*``): the compiled kernel, or the reference fallback
              when the extension has no kernel for the device (the table marks that with ``*``);
* ``eager``   the pure-PyTorch reference (``reuse_core.ops.reference``): same math, eager mode;
* ``compile`` ``torch.compile(reference, dynamic=False)`` (inductor, default mode): compiled once per
              case and warmed up (forward and backward graphs) before anything is timed;
* ``floor``   (where an op defines one) a memory-traffic floor: for distill_kl fwd+bwd,
              ``torch.add(s, t)`` reads both inputs and writes one freshly allocated tensor, the
              least traffic any implementation that returns a gradient can do;
* ``sdpa``    (attention only) ``torch.nn.functional.scaled_dot_product_attention``, PyTorch's own
              fused attention (a flash kernel on CPU and on CUDA).

Arithmetic rate (ops that define :meth:`OpBench.flops`, attention): ``gflops`` per contender =
the op's nominal FLOPs over its median time: forward 4·B·H·Lq·Lk·D, half that when causal, and
the backward 2.5 times the forward.

Timing, as a user calls the op: the timed region is ``out = op(...)`` for "fwd" (inputs do not
require grad) and ``loss = op(...); loss.backward()`` for "fwd+bwd" (the student / the members
require grad; the backward allocates ``.grad``). Gradients of the previous call are released
(``.grad = None``) before the timer starts. Default environment: default allocator, default thread
count, no tuning knobs. Each repeat runs every contender once, round-robin (the order rotates each
repeat), so slow drift on a shared machine hits every contender alike; the table shows medians.
On CUDA a call is timed with CUDA events around it (then synchronised).

Peak extra memory: the most memory the call has allocated at any moment beyond what was allocated
when it started, outputs and gradients included (they are alive at the end). CUDA:
``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call (allocated,
not reserved: cached blocks do not count). CPU: one extra call runs under
``torch.profiler.profile(profile_memory=True)``; the running sum of the allocator events (every
allocation and free of ATen's CPU allocator, which eager, compiled and extension code all use)
gives the peak, and tensors the call returned whose storage the profiler did not see (the fused
kernels map large outputs themselves, see csrc/common/cpu_alloc.cpp) are added on top. Blocks
such allocators keep cached count only while a tensor uses them, as on CUDA. RSS growth is not
used: glibc's and the kernels' caches make it depend on what ran before.

Bandwidth (CUDA): a device-to-device copy of 1 GiB is timed once; a fused call's fraction is its
minimal traffic over its time, divided by that copy's (read + written) bytes per second. Minimal
traffic, in elements of the input dtype: distill_kl fwd 2·N·V (read s, t), fwd+bwd 3·N·V (read s,
t; write the student gradient); ensemble_average fwd (K+1)·N·C (read K members, write the output),
fwd+bwd (3K+2)·N·C (the forward, then read the output gradient and the K members, write K member
gradients).

Adding an op: subclass :class:`OpBench`, add an instance to :data:`BENCHES`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

CONTENDERS = ("fused", "eager", "compile", "sdpa", "floor")
DIRECTIONS = ("fwd", "fwd+bwd")
DEFAULT_REPEATS = {"cpu": 5, "cuda": 20}
QUICK_REPEATS = 2
_FALLBACK_WARNING = r".*falls back to the pure-PyTorch reference.*"


# --------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark point. ``shape`` is the op's own notation: (N, V) for distill_kl,
    (K, N, C) for ensemble_average."""

    op: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    mode: str = ""
    direction: str = "fwd+bwd"

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @property
    def id(self) -> str:
        """A stable, readable id, e.g. ``distill_kl-1024x32000-float32-fwd+bwd``."""
        parts = [self.op, self.shape_str, self.dtype] + ([self.mode] if self.mode else []) + [self.direction]
        return "-".join(parts)

    @property
    def group(self) -> str:
        """The contenders of one case share a group (pytest-benchmark shows them side by side)."""
        return self.id

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Contender:
    """``call`` is the timed region and returns the tensors it produced (outputs, gradients);
    ``reset`` runs untimed before each call and releases the previous call's gradients."""

    call: Callable[[], tuple]
    reset: Callable[[], None] = lambda: None


@dataclass
class Workload:
    case: Case
    contenders: dict[str, Contender]
    minimal_bytes: int
    fused_is_kernel: bool
    setup_errors: dict[str, str] = field(default_factory=dict)


class OpBench:
    """How to benchmark one op. Subclasses set ``name`` (the op's stem, as in ``_ext.OPS``) and
    implement the methods below."""

    name: str = ""

    def fused(self) -> Callable:
        raise NotImplementedError

    def reference(self) -> Callable:
        raise NotImplementedError

    def cases(self, device: str, quick: bool) -> list[Case]:
        raise NotImplementedError

    def contender(self, fn: Callable, case: Case, inputs: dict) -> Contender:
        """How a user calls ``fn`` (the fused op, the reference, or the compiled reference)."""
        raise NotImplementedError

    def make_inputs(self, case: Case, device: str) -> dict:
        raise NotImplementedError

    def minimal_bytes(self, case: Case) -> int:
        raise NotImplementedError

    def floor(self, case: Case, inputs: dict) -> Contender | None:
        """A memory-traffic floor for ``case``, if the op defines one (see :meth:`has_floor`)."""
        return None

    def has_floor(self, case: Case) -> bool:
        return False

    def sdpa(self, case: Case, inputs: dict) -> Contender | None:
        """PyTorch's scaled_dot_product_attention on the case's inputs (attention only)."""
        return None

    def flops(self, case: Case) -> float | None:
        """Nominal floating-point operations of one call, for ops measured in GFLOP/s."""
        return None

    def contender_names(self, case: Case) -> list[str]:
        return [n for n in CONTENDERS if (n != "floor" or self.has_floor(case)) and (n != "sdpa" or self.flops(case))]


def _gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class DistillKLBench(OpBench):
    name = "distill_kl"
    temperature = 2.0

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
        g = _gen(device)
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

    def has_floor(self, case):
        return case.direction == "fwd+bwd"

    def floor(self, case, inputs):
        if not self.has_floor(case):
            return None
        s, t = inputs["s"].detach(), inputs["t"]
        return Contender(lambda: (torch.add(s, t),))


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
        g = _gen(device)
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


class AttentionBench(OpBench):
    """Shape (B, H, L, D): self-attention shapes (Lq = Lk = L, H = Hkv); mode "full" or "causal".
    fwd+bwd backpropagates a fixed random gradient of the output into q, k and v."""

    name = "attention"
    modes = ("full", "causal")

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
        g = _gen(device)
        q, k, v, dout = (torch.randn(case.shape, generator=g, device=device, dtype=torch.float32).to(case.torch_dtype)
                         for _ in range(4))
        if case.direction == "fwd+bwd":
            for x in (q, k, v):
                x.requires_grad_(True)
        return {"q": q, "k": k, "v": v, "dout": dout}

    def _contender(self, fn, case, inputs):
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

    def contender(self, fn, case, inputs):
        return self._contender(lambda q, k, v, causal: fn(q, k, v, causal=causal), case, inputs)

    def sdpa(self, case, inputs):
        import torch.nn.functional as F

        return self._contender(lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               case, inputs)

    def flops(self, case):
        B, H, L, D = case.shape
        fwd = 4 * B * H * L * L * D / (2 if case.mode == "causal" else 1)
        return fwd * (3.5 if case.direction == "fwd+bwd" else 1.0)

    def minimal_bytes(self, case):
        # fwd: read q, k, v, write out; fwd+bwd adds: read q, k, v, out, dout, write dq, dk, dv
        return (4 if case.direction == "fwd" else 12) * math.prod(case.shape) * case.torch_dtype.itemsize


#: Every benchmarked op, by stem. An op of ``_ext.OPS`` without an entry is skipped with a note.
BENCHES: dict[str, OpBench] = {b.name: b for b in (DistillKLBench(), EnsembleAverageBench(), AttentionBench())}


def all_cases(device: str = "cpu", quick: bool = False, ops: Sequence[str] | None = None) -> list[Case]:
    """The cases ``reuse bench`` runs for ``device``, in order (``ops`` filters by stem)."""
    names = list(BENCHES) if not ops else list(ops)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    return [c for n in names for c in BENCHES[n].cases(device, quick)]


# ------------------------------------------------------------------------------------ workloads

_compiled: dict[str, Callable] = {}


def _compiled_reference(op: str) -> Callable:
    """One ``torch.compile`` wrapper per op; dynamo compiles it once per case (static shapes, as
    for a training loop at a fixed shape) and keeps every case's graph."""
    if op not in _compiled:
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit"):  # one entry per case, across cases
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 256))
        _compiled[op] = torch.compile(BENCHES[op].reference(), dynamic=False)
    return _compiled[op]


def backend_of(device: str) -> str:
    return "CUDA" if device == "cuda" else "CPU"


def build_workload(case: Case, device: str, contenders: Sequence[str] = CONTENDERS) -> Workload:
    """Inputs and contenders of one case (nothing compiled or run yet)."""
    from reuse_core.ops import _ext

    spec = BENCHES[case.op]
    inputs = spec.make_inputs(case, device)
    out: dict[str, Contender] = {}
    errors: dict[str, str] = {}
    for name in contenders:
        try:
            if name == "fused":
                out[name] = spec.contender(spec.fused(), case, inputs)
            elif name == "eager":
                out[name] = spec.contender(spec.reference(), case, inputs)
            elif name == "compile":
                out[name] = spec.contender(_compiled_reference(case.op), case, inputs)
            elif name in ("floor", "sdpa"):
                c = getattr(spec, name)(case, inputs)
                if c is not None:
                    out[name] = c
            else:
                raise ValueError(f"unknown contender {name!r}")
        except Exception as exc:  # noqa: BLE001  (reported in the results, the run goes on)
            errors[name] = f"{type(exc).__name__}: {exc}"
    return Workload(
        case=case,
        contenders=out,
        minimal_bytes=spec.minimal_bytes(case),
        fused_is_kernel=_ext.has_kernel(case.op, backend_of(device)),
        setup_errors=errors,
    )


# ------------------------------------------------------------------------------ measurements


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(c: Contender, device: str) -> float:
    """Seconds for one call of ``c`` (its reset runs first, untimed)."""
    c.reset()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = c.call()
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = c.call()
    dt = time.perf_counter() - t0
    del out
    return dt


def _storage_ptr(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


_CHATTER = ("USDT:", "gpuGetDeviceCount", "SyncActivityProfilerHandler", "IpcFabricConfigClient")


@contextlib.contextmanager
def _kineto_chatter_filtered():
    """Kineto writes profiler_start/stop lines to fd 2 whatever its log level; drop those, pass
    anything else through."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    tmp = tempfile.TemporaryFile()
    os.dup2(tmp.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        keep = [ln for ln in tmp.read().decode(errors="replace").splitlines() if not any(c in ln for c in _CHATTER)]
        tmp.close()
        if keep:
            sys.stderr.write("\n".join(keep) + "\n")


def peak_extra_bytes(c: Contender, device: str) -> int:
    """Peak bytes the call allocates beyond what was allocated when it began (see module doc)."""
    c.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = c.call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _kineto_chatter_filtered():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = c.call()
        fd, path = tempfile.mkstemp(suffix=".json", prefix="reuse-bench-mem-")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        finally:
            os.unlink(path)
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and "Bytes" in e.get("args", {})),
        key=lambda e: e.get("ts", 0),
    )
    cur = peak = 0
    seen: set[int] = set()
    for e in mem:
        a = e["args"]
        if str(a.get("Device Type", 0)) not in ("0", "cpu", "CPU"):
            continue
        cur += int(a["Bytes"])
        peak = max(peak, cur)
        if int(a["Bytes"]) > 0:
            addr = a.get("Addr")
            seen.add(int(addr, 16) if isinstance(addr, str) else int(addr))
    external, counted = 0, set()
    for x in out:
        if isinstance(x, torch.Tensor) and x.device.type == "cpu":
            ptr = _storage_ptr(x)
            if ptr and ptr not in seen and ptr not in counted:
                counted.add(ptr)
                external += x.untyped_storage().nbytes()
    del out
    return int(peak + external)


_copy_bw: dict[str, float] = {}


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + written), CUDA only."""
    if device != "cuda":
        return None
    if device not in _copy_bw:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        _copy_bw[device] = 2 * nbytes / statistics.median(times)
        del src, dst
        torch.cuda.empty_cache()
    return _copy_bw[device]


def run_case(
    case: Case,
    device: str = "cpu",
    repeats: int = 5,
    contenders: Sequence[str] = CONTENDERS,
    measure_memory: bool = True,
) -> dict:
    """Warm up, measure memory, then time ``repeats`` interleaved rounds; returns one result row."""
    wl = build_workload(case, device, contenders)
    res: dict[str, dict[str, Any]] = {n: {"error": e} for n, e in wl.setup_errors.items()}
    live: dict[str, Contender] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FALLBACK_WARNING)
        for name, c in wl.contenders.items():
            r = res.setdefault(name, {})
            try:
                t0 = time.perf_counter()
                # compile builds its forward graph at the first call, its backward graph at the first
                # backward; a second call checks nothing recompiles. One call warms the others.
                for _ in range(2 if name == "compile" else 1):
                    c.reset()
                    out = c.call()
                    _sync(device)
                    del out
                r["warmup_s"] = round(time.perf_counter() - t0, 3)
                if measure_memory:
                    r["peak_extra_mb"] = round(peak_extra_bytes(c, device) / 2**20, 2)
                live[name] = c
            except Exception as exc:  # noqa: BLE001
                r["error"] = f"{type(exc).__name__}: {exc}"
        times: dict[str, list[float]] = {n: [] for n in live}
        order = list(live)
        for i in range(repeats):
            k = i % len(order) if order else 0
            for name in order[k:] + order[:k]:
                if name not in live:
                    continue
                try:
                    times[name].append(time_call(live[name], device))
                except Exception as exc:  # noqa: BLE001
                    res[name]["error"] = f"{type(exc).__name__}: {exc}"
                    live.pop(name)
        for c in wl.contenders.values():
            c.reset()
    for name, ts in times.items():
        if ts and name in live:
            res[name].update(
                median_ms=round(statistics.median(ts) * 1e3, 3),
                min_ms=round(min(ts) * 1e3, 3),
                times_ms=[round(t * 1e3, 3) for t in ts],
            )
    row: dict[str, Any] = {
        "id": case.id,
        "op": case.op,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "mode": case.mode,
        "direction": case.direction,
        "fused_backend": "kernel" if wl.fused_is_kernel else "reference fallback",
        "contenders": res,
        "minimal_bytes": wl.minimal_bytes,
    }
    flops = BENCHES[case.op].flops(case)
    if flops:
        for name, r in res.items():
            if r.get("median_ms"):
                r["gflops"] = round(flops / (r["median_ms"] / 1e3) / 1e9, 2)
    row.update(ratios(row, device))
    del wl, live
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _error_row(case: Case, device: str, error: str) -> dict:
    from reuse_core.ops import _ext

    row = {
        "id": case.id, "op": case.op, "shape": list(case.shape), "dtype": case.dtype, "mode": case.mode,
        "direction": case.direction,
        "fused_backend": "kernel" if _ext.has_kernel(case.op, backend_of(device)) else "reference fallback",
        "contenders": {"fused": {"error": error}}, "minimal_bytes": BENCHES[case.op].minimal_bytes(case),
    }
    row.update(ratios(row, device))
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _median(row: dict, name: str) -> float | None:
    return row["contenders"].get(name, {}).get("median_ms")


def ratios(row: dict, device: str) -> dict:
    """speedup_vs_eager/compile/sdpa = their time / fused time; fused_vs_floor = fused / floor time;
    bandwidth_fraction = minimal bytes per fused second / measured copy bandwidth (CUDA)."""
    f, e, c, sd, fl = (_median(row, n) for n in ("fused", "eager", "compile", "sdpa", "floor"))
    out = {
        "speedup_vs_eager": round(e / f, 3) if f and e else None,
        "speedup_vs_compile": round(c / f, 3) if f and c else None,
        "speedup_vs_sdpa": round(sd / f, 3) if f and sd else None,
        "fused_vs_floor": round(f / fl, 3) if f and fl else None,
        "peak_vs_logits": None,
        "bandwidth_fraction": None,
    }
    # Peak extra memory of the fused op over one input tensor of the case's shape (for
    # distill_kl: one logits tensor; for ensemble_average: all K members).
    peak = (row["contenders"].get("fused") or {}).get("peak_extra_mb")
    numel = 1
    for d in row["shape"]:
        numel *= d
    one = numel * torch.empty((), dtype=getattr(torch, row["dtype"])).element_size() / 2**20
    if peak is not None and one:
        out["peak_vs_logits"] = round(peak / one, 3)
    bw = _copy_bw.get(device)
    if bw and f:
        out["bandwidth_fraction"] = round(row["minimal_bytes"] / (f / 1e3) / bw, 3)
    return out


# ------------------------------------------------------------------------------------- report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    from reuse_core import __version__
    from reuse_core.ops import _ext

    env = {
        "reuse_core": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "extension": _ext.available(),
        "build_info": _ext.build_info(),
        "fused_kernels": {op: _ext.has_kernel(op, backend_of(device)) for op in _ext.OPS},
        "copy_bandwidth_gbs": round(_copy_bw[device] / 1e9, 1) if device in _copy_bw else None,
        "memory_method": (
            "torch.cuda.max_memory_allocated delta"
            if device == "cuda"
            else "torch.profiler allocator events + outputs allocated outside ATen's allocator"
        ),
    }
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            env["transparent_hugepage"] = f.read().strip()
    except OSError:
        pass
    return env


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def _ms(row, name):
    r = row["contenders"].get(name)
    if r is None:
        return "-"
    if "error" in r and "median_ms" not in r:
        return "ERR"
    return _fmt(r.get("median_ms"), ".2f")


def _mb(row, name):
    v = (row["contenders"].get(name) or {}).get("peak_extra_mb")
    return _fmt(v, ".1f" if v is not None and v < 10 else ".0f")


TABLE_COLUMNS = (
    "op", "shape", "dtype", "mode", "dir", "fused ms", "eager ms", "compile ms", "x eager", "x compile",
    "sdpa ms", "x sdpa", "GFLOP/s", "MB fused/eager/compile", "floor ms", "fused/floor", "%copy BW",
)


def table_rows(results: Sequence[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        star = "" if r["fused_backend"] == "kernel" else "*"
        rows.append([
            r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"] or "-", r["direction"],
            _ms(r, "fused") + star, _ms(r, "eager"), _ms(r, "compile"),
            _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
            _ms(r, "sdpa"), _fmt(r.get("speedup_vs_sdpa"), ".2f"),
            _fmt((r["contenders"].get("fused") or {}).get("gflops"), ".1f"),
            f"{_mb(r, 'fused')}/{_mb(r, 'eager')}/{_mb(r, 'compile')}",
            _ms(r, "floor"), _fmt(r["fused_vs_floor"], ".2f"),
            _fmt(None if r["bandwidth_fraction"] is None else 100 * r["bandwidth_fraction"], ".0f"),
        ])
    return rows


def format_table(results: Sequence[dict]) -> str:
    rows = [list(TABLE_COLUMNS)] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    if any(r["fused_backend"] != "kernel" for r in results):
        notes.append("* fused = the reference fallback (no compiled kernel for this device): not a kernel timing")
    errs = [(r["id"], n, c["error"]) for r in results for n, c in r["contenders"].items() if "error" in c]
    notes += [f"error: {i} [{n}]: {e}" for i, n, e in errs]
    return "\n".join(lines + notes)


def default_json_path() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(os.getcwd(), "bench-results", f"bench-{stamp}.json")


def run(
    device: str = "cpu",
    ops: Sequence[str] | None = None,
    quick: bool = False,
    repeats: int | None = None,
    contenders: Sequence[str] = CONTENDERS,
    json_path: str | None = None,
    log: Callable[[str], None] | None = print,
    budget_s: float | None = None,
) -> dict:
    """Run every case (``reuse bench``); returns ``{"meta": ..., "results": [...]}``.

    The report is written to ``json_path`` (default :func:`default_json_path`; ``""`` writes
    nothing) after every case, so a run cut short still leaves its rows. Once ``budget_s``
    seconds have passed no new case starts (``meta["skipped"]`` lists the rest); Ctrl-C (or
    SIGTERM, through the CLI) stops after the current contender with the rows so far.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here")
    if repeats is None:
        repeats = QUICK_REPEATS if quick else DEFAULT_REPEATS.get(device, 5)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cases = all_cases(device, quick, ops)
    t_start = time.perf_counter()
    path = None if json_path == "" else (json_path or default_json_path())
    from reuse_core.ops import _ext

    if log:
        missing = [op for op in _ext.OPS if op not in BENCHES]
        if missing:
            log(f"note: no benchmark defined for {', '.join(missing)}")
        log(f"reuse bench: {len(cases)} cases on {device}, {repeats} interleaved repeats each")
    if device == "cuda":
        copy_bandwidth(device)
    meta = environment(device)
    meta.update(
        started=_dt.datetime.now().isoformat(timespec="seconds"), quick=quick, repeats=repeats,
        contenders=list(contenders), argv=sys.argv, budget_s=budget_s, skipped=[], interrupted=False,
    )
    report = {"meta": meta, "results": []}

    def save():
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, path)
            meta["json_path"] = path

    for i, case in enumerate(cases, 1):
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            meta["skipped"] = [c.id for c in cases[i - 1:]]
            if log:
                log(f"time budget of {budget_s:.0f} s spent: {len(meta['skipped'])} case(s) skipped")
            break
        t0 = time.perf_counter()
        try:
            row = run_case(case, device, repeats, contenders)
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory making the inputs): report, go on
            row = _error_row(case, device, f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            meta["interrupted"] = True
            meta["skipped"] = [c.id for c in cases[i - 1:]]
            if log:
                log(f"interrupted: {len(meta['skipped'])} case(s) not run")
            break
        row["case_wall_s"] = round(time.perf_counter() - t0, 2)
        report["results"].append(row)
        save()
        if log:
            fused = row["contenders"].get("fused", {})
            log(
                f"[{i}/{len(cases)}] {case.id}: fused {_ms(row, 'fused')} ms"
                f"{'' if row['fused_backend'] == 'kernel' else ' (reference fallback)'}, eager {_ms(row, 'eager')},"
                f" compile {_ms(row, 'compile')} ({row['case_wall_s']:.1f} s)"
                + (f"  error: {fused['error']}" if "error" in fused else "")
            )
    save()
    return report


def summary(report: dict) -> str:
    m = report["meta"]
    head = (
        f"reuse bench on {m['device']} ({m['device_name']}, {m['cpu_threads']} CPU threads), torch {m['torch']}, "
        f"{m['repeats']} interleaved repeats, medians"
        + (f", copy bandwidth {m['copy_bandwidth_gbs']} GB/s" if m.get("copy_bandwidth_gbs") else "")
    )
    tail = f"total wall time {m['wall_s']} s" + (f"; results: {m['json_path']}" if m.get("json_path") else "")
    if m.get("skipped"):
        why = "interrupted" if m.get("interrupted") else f"time budget {m.get('budget_s')} s spent"
        tail += f"\nnot run ({why}): " + ", ".join(m["skipped"])
    return "\n".join([head, format_table(report["results"]), tail])
