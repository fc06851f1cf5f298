"""The same fit under `torchrun --nproc_per_node=2` (gloo, CPU, real processes) trains the same
model as one process: same global batches, same data order, metrics summed over both ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.engine import fit_script

TORCHRUN = Path(sys.executable).with_name("torchrun")
# 100 samples in steps of 16 x 2 micro-batches: the last step (4 samples) splits 2 + 2 across ranks
ARGS = ["--epochs", "2", "--samples", "100", "--batch-size", "16", "--grad-accum", "2"]


def test_two_torchrun_processes_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(fit_script.__file__),
                            "--run-dir", str(tmp_path / "ddp"), "--out", str(tmp_path / "ddp.safetensors"), *ARGS],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    model, single = fit_script.train(fit_script.parse(["--run-dir", str(tmp_path / "one"), "--out", "-", *ARGS]))
    out, err = ddp.communicate(timeout=120)
    assert ddp.returncode == 0, f"torchrun failed:\n{out}\n{err}"
    assert out.count("done resumed_from=0") == 2, out  # both ranks ran to the end

    got = load_file(tmp_path / "ddp.safetensors")
    for k, want in model.state_dict().items():
        rel = float((got[k] - want).norm() / want.norm())
        assert rel < 1e-5, f"{k}: relative difference {rel:.2e} between 2 processes and 1"

    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2], "only rank 0 writes metrics, one line per epoch"
    for r, s in zip(rows, single.epochs):
        assert r["samples"] == s["samples"] == 100
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert abs(r[key] - s[key]) <= 1e-5 * max(abs(s[key]), 1e-3), (key, r[key], s[key])
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
