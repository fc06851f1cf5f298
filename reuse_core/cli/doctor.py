"""``reuse doctor``: which kernels are compiled and active, each checked against the reference."""
from __future__ import annotations

import argparse

DOCTOR_EPILOG = """\
statuses, per op and backend:
  verified                 the compiled kernel ran here and matched the float64 reference
                           (forward and backward, small random inputs)
  failed: <why>            it ran and did not match, or raised
  compiled, not run here   a CUDA kernel is compiled in but no GPU is visible
  reference fallback       no kernel for this backend: the op runs the pure-PyTorch reference

exit status: 0 when the extension loaded and no check failed, 1 otherwise.
"""


def _add_doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON (torch, cuda, extension, ops)")


def _run_doctor(args: argparse.Namespace) -> int:
    from reuse_core import doctor

    return doctor.main(as_json=args.json)


VERBS = [("doctor", "show which kernels are compiled and active, and verify them against the reference",
          DOCTOR_EPILOG, _add_doctor, _run_doctor)]
