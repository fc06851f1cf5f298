"""What a run reports: the environment it ran in, the table of its result rows (one column pair
per extra contender an op declares) with the summary around it, and the JSON file."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Sequence

import torch

from .measure import backend_of, extra_contenders, measured_copy_bandwidth


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

    bw = measured_copy_bandwidth(device)
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
        "copy_bandwidth_gbs": round(bw / 1e9, 1) if bw else None,
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


def ms_cell(row: dict, name: str) -> str:
    """The median time of contender ``name`` in ``row``, as the table shows it."""
    r = row["contenders"].get(name)
    if r is None:
        return "-"
    if "error" in r and "median_ms" not in r:
        return "ERR"
    return _fmt(r.get("median_ms"), ".2f")


def _mb(row, name):
    v = (row["contenders"].get(name) or {}).get("peak_extra_mb")
    return _fmt(v, ".1f" if v is not None and v < 10 else ".0f")


def table_columns() -> list[str]:
    extras = [h for n, e in extra_contenders().items() for h in (f"{n} ms", e.heading)]
    return [
        "op", "shape", "dtype", "mode", "dir", "fused ms", "eager ms", "compile ms", "x eager", "x compile",
        *extras, "GFLOP/s", "MB fused/eager/compile", "%copy BW",
    ]


def table_rows(results: Sequence[dict]) -> list[list[str]]:
    extras = extra_contenders()
    rows = []
    for r in results:
        star = "" if r["fused_backend"] == "kernel" else "*"
        rows.append([
            r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"] or "-", r["direction"],
            ms_cell(r, "fused") + star, ms_cell(r, "eager"), ms_cell(r, "compile"),
            _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
            *(cell for n, e in extras.items() for cell in (ms_cell(r, n), _fmt(r.get(e.ratio), ".2f"))),
            _fmt((r["contenders"].get("fused") or {}).get("gflops"), ".1f"),
            f"{_mb(r, 'fused')}/{_mb(r, 'eager')}/{_mb(r, 'compile')}",
            _fmt(None if r["bandwidth_fraction"] is None else 100 * r["bandwidth_fraction"], ".0f"),
        ])
    return rows


def format_table(results: Sequence[dict]) -> str:
    columns = table_columns()
    rows = [columns] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    if any(r["fused_backend"] != "kernel" for r in results):
        notes.append("* fused = the reference fallback (no compiled kernel for this device): not a kernel timing")
    errs = [(r["id"], n, c["error"]) for r in results for n, c in r["contenders"].items() if "error" in c]
    notes += [f"error: {i} [{n}]: {e}" for i, n, e in errs]
    return "\n".join(lines + notes)


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


def default_json_path() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(os.getcwd(), "bench-results", f"bench-{stamp}.json")


def write_json(report: dict, path: str) -> None:
    """Write ``report`` to ``path`` through a temporary file, so a reader never sees half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
