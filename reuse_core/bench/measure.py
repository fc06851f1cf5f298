"""How one case is measured: what a case and a contender are, the base class an op module
subclasses (:class:`OpBench`), and :func:`run_case`, which warms a case's contenders up, measures
their memory, times them in interleaved repeats and returns one result row.

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
minimal traffic (:meth:`OpBench.minimal_bytes`) over its time, divided by that copy's (read +
written) bytes per second.

Arithmetic rate (ops that define :meth:`OpBench.flops`): ``gflops`` per contender = the op's
nominal FLOPs over its median time.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

BASE_CONTENDERS = ("fused", "eager", "compile")
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


@dataclass(frozen=True)
class Extra:
    """A contender of one op beyond :data:`BASE_CONTENDERS`, and the ratio its row and the table
    show next to its ``<name> ms`` column. A name means the same contender in every op that has it."""

    build: Callable[[Case, dict], Contender]  # (case, inputs) -> the call, as for the fused op
    ratio: str  # the row's field: "speedup_vs_<name>", or "fused_vs_<name>" with fused_over
    heading: str  # the ratio's table column: "x <name>", or "fused/<name>" with fused_over
    fused_over: bool = False  # ratio = fused time / its time (a bound to approach), else its time / fused time
    directions: tuple[str, ...] = DIRECTIONS  # the cases that have it


@dataclass
class Workload:
    case: Case
    contenders: dict[str, Contender]
    minimal_bytes: int
    fused_is_kernel: bool
    setup_errors: dict[str, str] = field(default_factory=dict)


class OpBench:
    """How to benchmark one op. Subclasses set ``name`` (the op's stem, as in ``_ext.OPS``) and
    ``extra_contenders``, and implement the methods below."""

    name: str = ""
    extra_contenders: dict[str, Extra] = {}

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
        """Bytes any implementation must move: inputs read once, outputs and gradients written once."""
        raise NotImplementedError

    def flops(self, case: Case) -> float | None:
        """Nominal floating-point operations of one call, for ops measured in GFLOP/s."""
        return None

    def contender_names(self, case: Case) -> list[str]:
        own = [n for n, e in self.extra_contenders.items() if case.direction in e.directions]
        return [*BASE_CONTENDERS, *own]


#: Every benchmarked op, by stem, in the order they run; the package fills it from the op modules.
BENCHES: dict[str, OpBench] = {}


def extra_contenders() -> dict[str, Extra]:
    """The extra contenders of every op, by name (each is a column pair of the table)."""
    return {n: e for b in BENCHES.values() for n, e in b.extra_contenders.items()}


def all_contenders() -> tuple[str, ...]:
    return (*BASE_CONTENDERS, *extra_contenders())


def generator(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


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


def _fused_is_kernel(case: Case, device: str) -> bool:
    from reuse_core.ops import _ext

    return _ext.has_kernel(case.op, backend_of(device))


def build_workload(case: Case, device: str, contenders: Sequence[str] | None = None) -> Workload:
    """Inputs and contenders of one case (nothing compiled or run yet): those of
    :meth:`OpBench.contender_names` that are in ``contenders`` (default: all of them)."""
    spec = BENCHES[case.op]
    inputs = spec.make_inputs(case, device)
    fns = {"fused": spec.fused, "eager": spec.reference, "compile": lambda: _compiled_reference(case.op)}
    out: dict[str, Contender] = {}
    errors: dict[str, str] = {}
    for name in spec.contender_names(case):
        if contenders is not None and name not in contenders:
            continue
        try:
            if name in fns:
                out[name] = spec.contender(fns[name](), case, inputs)
            else:
                out[name] = spec.extra_contenders[name].build(case, inputs)
        except Exception as exc:  # noqa: BLE001  (reported in the results, the run goes on)
            errors[name] = f"{type(exc).__name__}: {exc}"
    return Workload(
        case=case,
        contenders=out,
        minimal_bytes=spec.minimal_bytes(case),
        fused_is_kernel=_fused_is_kernel(case, device),
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


def measured_copy_bandwidth(device: str) -> float | None:
    """The copy bandwidth :func:`copy_bandwidth` measured for ``device`` so far, if any."""
    return _copy_bw.get(device)


# ------------------------------------------------------------------------------------- rows


def run_case(
    case: Case,
    device: str = "cpu",
    repeats: int = 5,
    contenders: Sequence[str] | None = None,
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
    flops = BENCHES[case.op].flops(case)
    if flops:
        for name, r in res.items():
            if r.get("median_ms"):
                r["gflops"] = round(flops / (r["median_ms"] / 1e3) / 1e9, 2)
    del wl, live
    return _row(case, device, res)


def error_row(case: Case, device: str, error: str) -> dict:
    """The row of a case that failed before any contender ran (e.g. out of memory for its inputs)."""
    return _row(case, device, {"fused": {"error": error}})


def _row(case: Case, device: str, results: dict[str, dict[str, Any]]) -> dict:
    row: dict[str, Any] = {
        "id": case.id,
        "op": case.op,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "mode": case.mode,
        "direction": case.direction,
        "fused_backend": "kernel" if _fused_is_kernel(case, device) else "reference fallback",
        "contenders": results,
        "minimal_bytes": BENCHES[case.op].minimal_bytes(case),
    }
    row.update(ratios(row, device))
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _median(row: dict, name: str) -> float | None:
    return row["contenders"].get(name, {}).get("median_ms")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(row: dict, device: str) -> dict:
    """speedup_vs_eager/compile = their time / fused time, and each extra contender's ratio
    (:class:`Extra`); bandwidth_fraction = minimal bytes per fused second / measured copy
    bandwidth (CUDA)."""
    f = _median(row, "fused")
    out = {f"speedup_vs_{n}": _ratio(_median(row, n), f) for n in ("eager", "compile")}
    for name, e in extra_contenders().items():
        t = _median(row, name)
        out[e.ratio] = _ratio(f, t) if e.fused_over else _ratio(t, f)
    out.update(peak_vs_logits=None, bandwidth_fraction=None)
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
