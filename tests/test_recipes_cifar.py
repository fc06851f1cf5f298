"""The reference programs as shipped recipes, end to end through `reuse run` on a small folder in
the official CIFAR-10 layout written on disk and read by the project's own CIFAR reader."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_cifar import write_c10_bin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """Five training batches and a test batch of 40 random 32x32 images, 4 of each class."""
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (40, 3072), dtype=np.uint8), rng.permutation(np.arange(40) % 10).tolist())
               for _ in range(6)]
    root = tmp_path_factory.mktemp("cifar10")
    write_c10_bin(root / "cifar-10-batches-bin", batches)
    return root


def reuse_run(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REUSE_CORE_CIFAR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-m", "reuse_core", "run", *args, "--store", str(cwd / "store")],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_seed_cnn_recipe_trains_as_the_reference_then_finetunes_and_distills(cifar_root, tmp_path):
    r = reuse_run(str(ROOT / "recipes/cifar10-seed-cnn.toml"), "--run-dir", "run", "--set", f"data_root={cifar_root}",
                  cwd=tmp_path)
    losses = re.findall(r"^epoch (\d+)/10  loss (\d+\.\d+)", r.stderr, re.M)
    assert [int(e) for e, _ in losses][:10] == list(range(1, 11)), "the loss is printed after each of the 10 epochs"
    steps = json.loads((tmp_path / "run" / "result.json").read_text())["steps"]
    assert list(steps) == ["seed-cnn", "finetuned", "student"]
    config = json.loads((tmp_path / "run" / "steps" / "seed-cnn" / "run.json").read_text())["options"]
    assert (config["optimizer"], config["lr"], config["momentum"], config["weight_decay"], config["batch_size"],
            config["epochs"], config["schedule"]) == ("sgd", 0.01, 0.0, 0.0, 64, 10, "constant")
    lineage = subprocess.run([sys.executable, "-m", "reuse_core", "models", "--store", str(tmp_path / "store"),
                              "lineage", steps["student"]["models"][-1]], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "cifar10-seed-cnn.seed-cnn" in lineage.stdout, lineage.stdout + lineage.stderr


def test_two_model_ensemble_recipe_reports_members_and_ensemble(cifar_root, tmp_path):
    r = reuse_run(str(ROOT / "recipes/cifar10-two-model-ensemble.toml"), "--run-dir", "run", cwd=tmp_path,
                  env_extra={"REUSE_CORE_CIFAR10": str(cifar_root)})
    step = json.loads((tmp_path / "run" / "result.json").read_text())["steps"]["ensemble"]
    metrics = step["metrics"]
    assert len(metrics["members_test_accuracy"]) == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert len(step["models"]) == 3, "both members and the ensemble are in the store"
    for k, acc in enumerate(metrics["members_test_accuracy"]):
        assert re.search(rf"member {k} \(\w+\) test accuracy {acc:.4f}", r.stdout), r.stdout
    assert f"test accuracy {metrics['test_accuracy']:.4f}" in r.stdout, r.stdout
