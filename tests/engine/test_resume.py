"""A real training process killed with SIGKILL mid-epoch and started again with resume ends with
the same weights, bit for bit, as one that was never interrupted."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from reuse_core.engine.checkpoint import load_checkpoint
from tests.engine import fit_script

SCRIPT = fit_script.__file__
ARGS = ["--epochs", "3", "--dropout", "0.2"]  # dropout: the resumed run must also restore the RNG


def start(run_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--out", str(out), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path):
    victim = start(tmp_path / "cut", tmp_path / "never.safetensors", "--pause", "0.05")
    seen = []
    for line in victim.stdout:
        seen.append(line.strip())
        if "epoch 1" in seen and seen[seen.index("epoch 1"):].count("step") == 3:
            victim.send_signal(signal.SIGKILL)
            break
    assert victim.wait(timeout=60) == -signal.SIGKILL, f"the run ended before it was killed: {seen} {victim.stderr.read()}"
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "never.safetensors").exists()
    stale = tmp_path / "cut" / ".checkpoint.pt.k1ll3d.tmp"  # as a kill during a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")

    resumed = subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(tmp_path / "cut"), "--out",
                              str(tmp_path / "resumed.safetensors"), *ARGS, "--resume"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "done resumed_from=1" in resumed.stdout and resumed.stdout.count("epoch ") == 2
    assert not stale.exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs: the same kernels, so the same bits
    try:
        whole, _ = fit_script.train(fit_script.parse(["--run-dir", str(tmp_path / "whole"), "--out", "-", *ARGS]))
    finally:
        torch.set_num_threads(threads)
    want, got = whole.state_dict(), load_file(tmp_path / "resumed.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs after resume"
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
