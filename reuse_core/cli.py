"""The ``reuse`` command.

A verb is a tuple (name, help, epilog, add_arguments, run). This module holds the kernel verbs
(:data:`VERBS`); each other area of the toolkit keeps its verbs in its own ``cli_*`` module, listed
in :data:`VERB_MODULES`, so a verb lives next to nothing but its own kind.

Heavy imports (torch, the kernels) happen inside the verbs, so ``reuse --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

BENCH_EPILOG = """\
contenders, per case:
  fused    the reuse_core op (compiled kernel; "*" in the table = reference fallback, no kernel)
  eager    the pure-PyTorch reference, same math (reuse_core.ops.reference)
  compile  torch.compile(reference, dynamic=False), compiled and warmed up before timing
  floor    distill_kl fwd+bwd only: torch.add(s, t), read two inputs and write one fresh tensor
  sdpa     attention only: torch.nn.functional.scaled_dot_product_attention (GFLOP/s and x sdpa)

Timed as a user calls the op: `loss = op(...); loss.backward()` (fwd+bwd) or `op(...)` (fwd),
gradients allocated by the call, default environment. Each repeat runs every contender once,
round-robin; the table shows medians and ratios (x eager = eager time / fused time). Peak extra
memory: the most bytes allocated during one call beyond what was allocated before it (CUDA: the
caching allocator's counters; CPU: torch.profiler allocator events plus outputs the kernels map
themselves). On CUDA, %copy BW = the fused op's minimal traffic per second over a measured
device-to-device copy. The whole report is also saved as JSON.

examples:
  reuse bench                       all ops on the default device
  reuse bench --quick               tiny shapes, 2 repeats (CI smoke)
  reuse bench --ops distill_kl --repeats 9 --json kl.json
  reuse bench --device cuda         adds GPU shapes (bf16 and float32)
"""

DOCTOR_EPILOG = """\
statuses, per op and backend:
  verified                 the compiled kernel ran here and matched the float64 reference
                           (forward and backward, small random inputs)
  failed: <why>            it ran and did not match, or raised
  compiled, not run here   a CUDA kernel is compiled in but no GPU is visible
  reference fallback       no kernel for this backend: the op runs the pure-PyTorch reference

exit status: 0 when the extension loaded and no check failed, 1 otherwise.
"""


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 repeats: checks the harness, not the speed")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=None,
        help="where to run (default: cuda when a GPU is visible, else cpu); cuda adds larger GPU shapes",
    )
    p.add_argument(
        "--ops", nargs="+", metavar="OP", default=None,
        help="only these ops, by stem (distill_kl, ensemble_average, ...); default: all",
    )
    p.add_argument(
        "--repeats", type=int, default=None, metavar="N",
        help="interleaved timed repeats per case (default: 5 on cpu, 20 on cuda, 2 with --quick)",
    )
    p.add_argument(
        "--json", dest="json_path", default=None, metavar="PATH",
        help="where to save the results (default: bench-results/bench-<timestamp>.json under the current folder)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender (no compiler, or in a hurry)")
    p.add_argument(
        "--budget", type=float, default=None, metavar="SECONDS",
        help="start no new case after this many seconds; the table and JSON keep the cases run so far",
    )


def _run_bench(args: argparse.Namespace) -> int:
    import signal
    import time

    import torch

    from reuse_core import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("reuse bench: --device cuda, but torch sees no CUDA device here", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print("reuse bench: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.ops:
        unknown = [o for o in args.ops if o not in bench.BENCHES]
        if unknown:
            print(f"reuse bench: unknown op(s) {', '.join(unknown)}; choose from {', '.join(bench.BENCHES)}", file=sys.stderr)
            return 2
    contenders = [c for c in bench.CONTENDERS if not (args.no_compile and c == "compile")]
    t0 = time.perf_counter()

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop like Ctrl-C, keep the rows so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    report = bench.run(
        device=device, ops=args.ops, quick=args.quick, repeats=args.repeats, contenders=contenders,
        json_path=args.json_path, log=lambda s: print(s, flush=True), budget_s=args.budget,
    )
    print()
    print(bench.summary(report))
    print(f"(reuse bench took {time.perf_counter() - t0:.1f} s)")
    failed = [r["id"] for r in report["results"] if any("error" in c for c in r["contenders"].values())]
    if report["meta"].get("interrupted"):
        return 130
    return 1 if failed else 0


def _add_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON (torch, cuda, extension, ops)")


def _run_doctor(args: argparse.Namespace) -> int:
    from reuse_core import doctor

    return doctor.main(as_json=args.json)


Verb = tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

VERBS: list[Verb] = [
    (
        "bench",
        "time the fused kernels against eager PyTorch and torch.compile",
        BENCH_EPILOG,
        _add_bench,
        _run_bench,
    ),
    (
        "doctor",
        "show which kernels are compiled and active, and verify them against the reference",
        DOCTOR_EPILOG,
        _add_doctor,
        _run_doctor,
    ),
]


# Modules that define a VERBS list of their own, in the order `reuse --help` lists them.
VERB_MODULES: tuple[str, ...] = ("reuse_core.cli_models", "reuse_core.cli_plugins", "reuse_core.cli_run")


def all_verbs() -> list[Verb]:
    import importlib

    verbs = list(VERBS)
    for name in VERB_MODULES:
        verbs.extend(importlib.import_module(name).VERBS)
    return verbs


def build_parser() -> argparse.ArgumentParser:
    from reuse_core import __version__

    parser = argparse.ArgumentParser(
        prog="reuse",
        description="reuse-core: reuse trained models and move knowledge between them "
        "(fused distillation, ensemble-averaging and attention kernels for PyTorch).",
        epilog="Run `reuse <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"reuse-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, help_, epilog, add, run in all_verbs():
        p = sub.add_parser(
            name, help=help_, description=help_[0].upper() + help_[1:] + ".", epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
