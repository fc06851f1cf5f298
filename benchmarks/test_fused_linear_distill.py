"""Benchmarks of reuse_core.ops.fused_linear_distill; the cases are reuse_core.bench.BENCHES["fused_linear_distill"] (see conftest.py)."""
OP = "fused_linear_distill"


def test_time(case, contender, run_contender):
    """One contender of one case under pytest-benchmark; the contenders of a case share a group."""
    run_contender(case, contender)


def test_ratios(case, check_ratios):
    """All contenders of one case, interleaved, as `reuse bench` runs them: ratios and memory."""
    check_ratios(case)
