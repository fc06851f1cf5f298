"""reuse_core.ops._ext: the compiled extension loads, says what it was built with, and
(when it is missing) the ops fall back to the references with one warning per op."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from reuse_core.ops import _ext, distill_kl_loss
from reuse_core.ops.reference import distill_kl_loss_reference

from ..conftest import dispatched

REPO = Path(__file__).resolve().parents[2]


def test_extension_loaded():
    assert _ext.available(), _ext.LOAD_ERROR
    assert _ext.LOAD_ERROR is None


def test_build_info_keys(monkeypatch):
    monkeypatch.delenv("REUSE_CORE_CPU_ISA", raising=False)
    info = _ext.build_info()
    assert set(info) == {"cpu_isa", "cuda", "cuda_archs"}
    assert info["cpu_isa"] in ("avx512", "avx2", "portable")
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], str)
    if info["cuda"]:
        assert info["cuda_archs"], "built with CUDA but no architectures listed"
    else:
        assert info["cuda_archs"] == ""
    monkeypatch.setenv("REUSE_CORE_CPU_ISA", "portable")  # read on every call
    assert _ext.build_info()["cpu_isa"] == "portable"


@pytest.mark.parametrize("op", ["distill_kl", "ensemble_average", "ensemble_average_backward", "fused_linear_distill"])
def test_cpu_kernels_registered(op):
    assert _ext.has_kernel(op, "CPU")
    if _ext.has_kernel(op, "CUDA"):
        assert _ext.build_info()["cuda"], f"{op} has a CUDA kernel but build_info says cuda: false"


FALLBACK_SCRIPT = textwrap.dedent("""
    import sys, warnings, importlib.abc

    class HideExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "reuse_core._C":
                raise ImportError("hidden by the test")
            return None

    sys.meta_path.insert(0, HideExtension())
    import torch
    from reuse_core.ops import _ext, distill_kl_loss, ensemble_average
    from reuse_core.ops.reference import distill_kl_loss_reference, ensemble_average_reference

    assert not _ext.available()
    assert "hidden by the test" in _ext.LOAD_ERROR
    assert _ext.build_info() == {"cpu_isa": None, "cuda": False, "cuda_archs": ""}
    assert not _ext.has_kernel("distill_kl", "CPU")

    torch.manual_seed(0)
    s, t = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9)
    z, w = torch.randn(3, 4, 9), torch.rand(3) + 0.1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = distill_kl_loss(s, t, temperature=2.0)
        b = distill_kl_loss(s, t, temperature=2.0)
        c = ensemble_average(z, w, mode="log_probs")
        d = ensemble_average(z, w, mode="log_probs")
    msgs = [str(x.message) for x in caught if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 2, msgs  # one per op, not one per call
    assert "distill_kl" in msgs[0] and "falls back" in msgs[0] and "hidden by the test" in msgs[0], msgs
    assert "ensemble_average" in msgs[1] and "falls back" in msgs[1], msgs
    assert torch.equal(a, distill_kl_loss_reference(s, t, temperature=2.0)) and torch.equal(a, b)
    assert torch.equal(c, ensemble_average_reference(z, w, mode="log_probs")) and torch.equal(c, d)
    a.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    print("FALLBACK-OK")
""")


def test_fallback_without_extension():
    """In a subprocess with reuse_core._C hidden: one RuntimeWarning per op, reference results."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "FALLBACK-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_dispatch_helper_catches_a_fallback():
    """The conftest helper the suite relies on fails when the compiled kernel did not run, or
    when the fallback warning was emitted."""
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(AssertionError, match="did not run"):
        with dispatched("distill_kl"):
            distill_kl_loss_reference(s, t)
    with pytest.raises(AssertionError, match="fell back"):
        with dispatched("distill_kl"):
            distill_kl_loss(s, t)
            warnings.warn("reuse_core: distill_kl on CPU falls back to the pure-PyTorch reference", RuntimeWarning)
    with dispatched("distill_kl"):
        distill_kl_loss(s, t)


# ---------------------------------------------------------------- the CPU output cache

MIB = 1 << 20


def _grad_of(rows: int, cols: int = 1024) -> None:
    """One distill_kl forward+backward whose student gradient (rows x cols float32) is a large output."""
    s = torch.randn(rows, cols, requires_grad=True)
    distill_kl_loss(s, torch.randn(rows, cols)).backward()


def test_empty_cache_gives_the_blocks_back():
    from reuse_core.ops import empty_cache

    empty_cache()
    _grad_of(1024)  # 4 MiB: two huge pages
    assert empty_cache() == 4 * MIB
    assert empty_cache() == 0


def test_outputs_of_nearby_sizes_share_a_size_class():
    """17.2 MB and 19.5 MB gradients (9 and 10 huge pages) share the 10-page class: one block serves both."""
    from reuse_core.ops import empty_cache

    empty_cache()
    _grad_of(4400)
    _grad_of(5000)
    assert empty_cache() == 20 * MIB
