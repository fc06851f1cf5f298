"""``reuse bench``: time the fused kernels against eager PyTorch and torch.compile."""
from __future__ import annotations

import argparse

from reuse_core.cli.output import fail

BENCH_EPILOG = """\
contenders, per case:
  fused    the reuse_core op (compiled kernel; "*" in the table = reference fallback, no kernel)
  eager    the pure-PyTorch reference, same math (reuse_core.ops.reference)
  compile  torch.compile(reference, dynamic=False), compiled and warmed up before timing
  floor    distill_kl fwd+bwd only: torch.add(s, t), read two inputs and write one fresh tensor
  sdpa     attention only: torch.nn.functional.scaled_dot_product_attention (GFLOP/s and x sdpa)
  fused_linear_distill only (reuse_core/bench/fused_linear_distill.py):
    materialised  the logits with F.linear, then the fused distill_kl_loss
    sparse64      this op with a top-64 teacher (dense/sparse64 = the dense op's time over it)
    sgemm         the op's four products alone, torch.mm over all rows (sgemm/fused = the fraction of
                  sgemm throughput the op reaches)
    liger         liger-kernel's LigerFusedLinearJSDLoss, forward KL (pip install reuse-core[bench])

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
        return fail("--device cuda, but torch sees no CUDA device here")
    if args.repeats is not None and args.repeats < 1:
        return fail("--repeats must be >= 1")
    if args.ops:
        unknown = [o for o in args.ops if o not in bench.BENCHES]
        if unknown:
            return fail(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(bench.BENCHES)}")
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


VERBS = [("bench", "time the fused kernels against eager PyTorch and torch.compile", BENCH_EPILOG, _add_bench,
          _run_bench)]
