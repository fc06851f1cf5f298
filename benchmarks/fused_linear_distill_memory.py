"""Peak extra memory of the fused_linear_distill contenders at issue 14's memory shape, measured as
the process's resident set, each contender in a fresh process:

    python benchmarks/fused_linear_distill_memory.py                       # (2048, 2048, 128256)
    python benchmarks/fused_linear_distill_memory.py --shape 512 256 32000 # any (N, H, V)

The contenders are those of ``reuse bench`` (reuse_core/bench/fused_linear_distill.py), built by
the same code, plus this op at its default ``chunk_size`` (``fused-default``, ``sparse64-default``;
the bench's own cases use 256 rows). Per contender: one call to warm up (torch.compile compiles
there), then the inputs' resident set is read, the peak is reset (``/proc/self/clear_refs``) and
one more forward + backward runs. Extra = the peak resident set of that call minus the resident
set before it minus the returned gradients of student_hidden and student_weight, which every
contender must allocate. The resident set counts what the PyTorch profiler misses (memory that
kernels map themselves); the CPU block cache of the fused kernels is off
(REUSE_CORE_CPU_CACHE_MB=0), so a freed buffer is not counted as held.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONTENDERS = ("fused", "fused-default", "sparse64", "sparse64-default", "materialised", "eager", "compile", "liger")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str, shape: tuple[int, int, int]) -> dict:
    import gc

    import torch

    from reuse_core import bench
    from reuse_core.bench.measure import BENCHES, build_workload

    base, _, default = name.partition("-")
    case = bench.Case("fused_linear_distill", shape, "float32", "", "fwd+bwd")
    spec = BENCHES[case.op]
    if default:  # the op's own chunk_size, from its memory rule
        inputs = spec.make_inputs(case, "cpu")
        inputs["chunk"] = None
        contender = (spec.contender(spec.fused(), case, inputs) if base == "fused"
                     else spec.extra_contenders[base].build(case, inputs))
    else:
        workload = build_workload(case, "cpu", [base])
        if base not in workload.contenders:
            return {"name": name, "error": workload.setup_errors.get(base, "not available")}
        contender, inputs = workload.contenders[base], None
    contender.reset()
    contender.call()  # warm-up
    contender.reset()
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    out = contender.call()
    peak = _status_kb("VmHWM")
    grads = sum(x.untyped_storage().nbytes() for x in out[1:] if isinstance(x, torch.Tensor))
    return {"name": name, "extra_mb": ((peak - before) * 1024 - grads) / 2**20, "grads_mb": grads / 2**20,
            "loss": float(out[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[2048, 2048, 128256], metavar=("N", "H", "V"))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.child:
        print(json.dumps(child(args.child, shape)))
        return
    env = {**os.environ, "REUSE_CORE_CPU_CACHE_MB": "0"}
    rows = []
    print(f"(N, H, V) = {shape}, float32, forward + backward, peak resident set beyond the inputs and the "
          "returned gradients")
    for name in args.contenders:
        r = subprocess.run([sys.executable, __file__, "--child", name, "--shape", *map(str, shape)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            row = {"name": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
        else:
            row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {name:>17}: " + (f"{row['extra_mb']:8.0f} MB extra (loss {row['loss']:.6g})" if "extra_mb" in row
                                   else f"not measured: {row['error']}"), flush=True)
    extra = {r["name"]: r["extra_mb"] for r in rows if "extra_mb" in r}
    if "materialised" in extra:
        for name in ("fused", "fused-default", "sparse64", "sparse64-default"):
            if name in extra:
                vs = ", ".join(f"{extra[name] / extra[o]:.3f} of {o}" for o in ("materialised", "liger") if o in extra)
                print(f"  {name}: {vs}")


if __name__ == "__main__":
    main()
