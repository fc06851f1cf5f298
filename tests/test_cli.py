"""The `reuse` command, run as a real subprocess (`python -m reuse_core`, as the console script does)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reuse_core.ops import _ext

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("verified", "compiled, not run here", "reference fallback")


def reuse(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "reuse_core", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def expected_status(op: str, backend: str) -> str:
    if not _ext.has_kernel(op, backend):
        return "reference fallback"
    if backend == "CUDA":
        import torch

        return "verified" if torch.cuda.is_available() else "compiled, not run here"
    return "verified"


def test_help_lists_every_verb():
    r = reuse("--help")
    assert r.returncode == 0, r.stderr
    for verb in ("bench", "doctor"):
        assert verb in r.stdout
    for verb, needle in (("bench", "--quick"), ("doctor", "reference fallback")):
        r = reuse(verb, "--help")
        assert r.returncode == 0, r.stderr
        assert needle in r.stdout


def test_no_verb_prints_help_and_fails():
    r = reuse()
    assert r.returncode == 2
    assert "usage: reuse" in r.stdout


@pytest.fixture(scope="module")
def doctor_json():
    r = reuse("doctor", "--json")
    assert r.returncode == 0, f"doctor failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


def test_doctor_json(doctor_json):
    rep = doctor_json
    assert {"torch", "cuda", "extension", "ops"} <= rep.keys()
    import torch

    assert rep["torch"] == torch.__version__
    ext = rep["extension"]
    assert ext["loaded"] is True, ext["load_error"]  # CI builds the extension
    assert ext["load_error"] is None
    info = _ext.build_info()
    assert ext["cpu_isa"] == info["cpu_isa"] in ("avx512", "avx2", "portable")
    assert ext["cuda"] == info["cuda"]
    pairs = [(o["op"], o["backend"]) for o in rep["ops"]]
    assert pairs == [(op, b) for op in _ext.OPS for b in ("CPU", "CUDA")]
    for o in rep["ops"]:
        assert o["status"] in STATUSES, o
        assert o["status"] == expected_status(o["op"], o["backend"]), o
        if o["backend"] == "CUDA" and not info["cuda"]:
            assert o["status"] == "reference fallback"
    # The CPU kernel CI builds first must be the one doctor verifies.
    assert {"op": "distill_kl", "backend": "CPU", "status": "verified"} in rep["ops"]


def test_doctor_text(doctor_json):
    r = reuse("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for needle in ("torch", "extension    loaded", "CPU path", "CUDA archs"):
        assert needle in out
    for o in doctor_json["ops"]:
        line = next(ln for ln in out.splitlines() if ln.split()[:2] == [o["op"], o["backend"]])
        assert line.rstrip().endswith(o["status"])


def test_bench_quick_writes_json(tmp_path):
    path = tmp_path / "out" / "bench.json"
    # distill_kl only keeps this quick (each torch.compile warm-up costs seconds on a small CPU).
    r = reuse("bench", "--quick", "--device", "cpu", "--ops", "distill_kl", "--json", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fused ms" in r.stdout and "x compile" in r.stdout
    rep = json.loads(path.read_text())
    assert {"meta", "results"} <= rep.keys()
    meta = rep["meta"]
    assert meta["device"] == "cpu" and meta["quick"] is True and meta["repeats"] == 2
    assert {"torch", "build_info", "wall_s", "memory_method"} <= meta.keys()
    rows = rep["results"]
    assert [r["direction"] for r in rows] == ["fwd", "fwd+bwd"]
    for row in rows:
        assert {
            "id", "op", "shape", "dtype", "mode", "direction", "fused_backend", "contenders",
            "speedup_vs_eager", "speedup_vs_compile", "fused_vs_floor", "bandwidth_fraction", "minimal_bytes",
        } <= row.keys()
        assert row["op"] == "distill_kl"
        assert row["fused_backend"] == "kernel"
        for name in ("fused", "eager", "compile"):
            c = row["contenders"][name]
            assert "error" not in c, c
            assert c["median_ms"] > 0 and len(c["times_ms"]) == 2 and c["peak_extra_mb"] >= 0
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_compile"] > 0
        assert row["bandwidth_fraction"] is None  # CPU: no copy bandwidth
    assert "floor" not in rows[0]["contenders"] and rows[1]["fused_vs_floor"] > 0


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    from reuse_core.cli import main  # in-process: these fail before anything runs

    out = tmp_path / "x.json"
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "nope", "--json", str(out)]) == 2
    assert "unknown op(s) nope" in capsys.readouterr().err
    assert main(["bench", "--quick", "--device", "cpu", "--repeats", "0", "--json", str(out)]) == 2
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "tpu"])
    assert exc.value.code == 2
