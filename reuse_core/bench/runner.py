"""A whole ``reuse bench`` run: the cases of the chosen ops, one after another, under a time
budget, with the report saved after every case."""
from __future__ import annotations

import datetime as _dt
import sys
import time
from collections.abc import Callable, Sequence

import torch

from .measure import (
    BENCHES, DEFAULT_REPEATS, QUICK_REPEATS, Case, all_contenders, copy_bandwidth, error_row, run_case,
)
from .report import default_json_path, environment, ms_cell, write_json


def all_cases(device: str = "cpu", quick: bool = False, ops: Sequence[str] | None = None) -> list[Case]:
    """The cases ``reuse bench`` runs for ``device``, in order (``ops`` filters by stem)."""
    names = list(BENCHES) if not ops else list(ops)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    return [c for n in names for c in BENCHES[n].cases(device, quick)]


def run(
    device: str = "cpu",
    ops: Sequence[str] | None = None,
    quick: bool = False,
    repeats: int | None = None,
    contenders: Sequence[str] | None = None,
    json_path: str | None = None,
    log: Callable[[str], None] | None = print,
    budget_s: float | None = None,
) -> dict:
    """Run every case (``reuse bench``); returns ``{"meta": ..., "results": [...]}``.

    ``contenders`` (default: all) names those to run, wherever a case has them. The report is
    written to ``json_path`` (default :func:`default_json_path`; ``""`` writes nothing) after
    every case, so a run cut short still leaves its rows. Once ``budget_s`` seconds have passed no
    new case starts (``meta["skipped"]`` lists the rest); Ctrl-C (or SIGTERM, through the CLI)
    stops after the current contender with the rows so far.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here")
    if repeats is None:
        repeats = QUICK_REPEATS if quick else DEFAULT_REPEATS.get(device, 5)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    known = all_contenders()
    contenders = known if contenders is None else tuple(contenders)
    unknown = [n for n in contenders if n not in known]
    if unknown:
        raise ValueError(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(known)}")
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
            write_json(report, path)
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
            row = error_row(case, device, f"{type(exc).__name__}: {exc}")
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
                f"[{i}/{len(cases)}] {case.id}: fused {ms_cell(row, 'fused')} ms"
                f"{'' if row['fused_backend'] == 'kernel' else ' (reference fallback)'}, eager {ms_cell(row, 'eager')},"
                f" compile {ms_cell(row, 'compile')} ({row['case_wall_s']:.1f} s)"
                + (f"  error: {fused['error']}" if "error" in fused else "")
            )
    save()
    return report
