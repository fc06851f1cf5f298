"""The benchmark runner behind ``reuse bench``; ``benchmarks/`` runs the same cases under pytest-benchmark.

Every case is one op at one shape, dtype, mode and direction ("fwd" or "fwd+bwd"), and every case
pits contenders against each other in one process:

* ``fused``   the public op (``reuse_core.ops.*``): the compiled kernel, or the reference fallback
              when the extension has no kernel for the device (the table marks that with ``*``);
* ``eager``   the pure-PyTorch reference (``reuse_core.ops.reference``): same math, eager mode;
* ``compile`` ``torch.compile(reference, dynamic=False)`` (inductor, default mode): compiled once per
              case and warmed up (forward and backward graphs) before anything is timed;
* the op's own extra contenders, which its module declares with the ratio to show for each
  (:attr:`OpBench.extra_contenders`): ``floor`` in :mod:`.distill_kl`, ``sdpa`` in :mod:`.attention`.

:mod:`.measure` measures one case, :mod:`.report` formats and saves results, :mod:`.runner` runs
the cases; a module per op (the stems of ``reuse_core.ops``) declares that op's cases.
Adding an op: subclass :class:`OpBench` in a new module, add an instance to :data:`BENCHES` here.
"""
from __future__ import annotations

from .attention import AttentionBench
from .distill_kl import DistillKLBench
from .ensemble_average import EnsembleAverageBench
from .fused_linear_distill import FusedLinearDistillBench
from .measure import (  # the names the CLI, benchmarks/ and a new op module use
    _FALLBACK_WARNING, BENCHES, DEFAULT_REPEATS, QUICK_REPEATS, Case, Contender, Extra, OpBench, all_contenders,
    build_workload, copy_bandwidth, run_case,
)
from .report import environment, format_table, summary
from .runner import all_cases, run

BENCHES.update((b.name, b) for b in (
    DistillKLBench(), EnsembleAverageBench(), AttentionBench(), FusedLinearDistillBench(),
))
CONTENDERS = all_contenders()
