"""RunContext's rules: saving records lineage, happens on the main process only, and stores nothing
twice when a run killed after saving is resumed (real SIGKILLs of real runs)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reuse_core import run as reuse_run
from reuse_core.store import ModelStore
from reuse_core.strategy import RunContext, context, register_model_loader

KILLER = Path(__file__).with_name("kill_after_save.py")
TINY = ["--backbone", "mlp", "--backbone-config", "hidden=[16]", "--classes", "0-2", "--epochs", "2",
        "--label-budget", "10", "--quiet"]


def run_reuse(*args: str, kill_after: int | None = None, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "REUSE_CORE_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "reuse_core", *args]
    if kill_after is not None:
        env["KILL_AFTER_SAVES"] = str(kill_after)
        cmd = [sys.executable, str(KILLER), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_killed_right_after_saving_resumes_without_saving_again(tmp_path):
    store, run_dir = tmp_path / "store", tmp_path / "run"
    killed = run_reuse("run", "pretrain", "--store", str(store), "--run-dir", str(run_dir), "--name", "k1", *TINY,
                       kill_after=1, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [saved] = ModelStore(store).list()
    assert not (run_dir / "result.json").exists(), "the run died before it finished"
    resumed = run_reuse("run", "pretrain", "--store", str(store), "--run-dir", str(run_dir), "--resume", "--quiet",
                        cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [m["id"] for m in ModelStore(store).list()] == [saved["id"]], "the model is stored once"
    assert ModelStore(store).resolve("k1") == saved["id"], "its name stays unambiguous"
    assert json.loads((run_dir / "result.json").read_text())["models"] == [saved["id"]]


def test_a_run_killed_between_saves_stores_each_model_once(tmp_path):
    """The ensemble saves its members and then itself: killed after the second member, the resumed
    run saves the other two members and the ensemble, each once."""
    store, run_dir = tmp_path / "store", tmp_path / "run"
    args = ["run", "ensemble", "--store", str(store), "--run-dir", str(run_dir), "--num-members", "3",
            "--backbone", "mlp", "--classes", "0-2", "--epochs", "1", "--label-budget", "10", "--quiet"]
    killed = run_reuse(*args, kill_after=2, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = [m["id"] for m in ModelStore(store).list()]
    assert len(first) == 2
    resumed = run_reuse(*args[:6], "--resume", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    models = ModelStore(store).list()
    assert len(models) == 4 and [m["id"] for m in models[:2]] == first
    keys = sorted(m["lineage"]["run"]["key"] for m in models)
    assert keys == ["ensemble", "member-0", "member-1", "member-2"]
    ensemble = next(m for m in models if m["backbone"] == "ensemble")
    assert ensemble["lineage"]["parents"] == [m["id"] for m in models if m["backbone"] == "mlp"]


@pytest.fixture
def ctx(tmp_path):
    return RunContext(strategy="toy", store=ModelStore(tmp_path / "store"), hooks=None, run_dir=tmp_path / "run",
                      device=torch.device("cpu"), quiet=True, run_id="r1")


def _save(ctx, model, **kw):
    return ctx.save(model, backbone="mlp", config={"in_channels": 1, "input_size": 8, "hidden": [4]}, dataset="digits",
                    classes=["0", "1"], metrics={}, parents=[], options={}, **kw)


def test_save_records_lineage_and_loads_back(ctx):
    from reuse_core.backbone import build

    model = build("mlp", 2, in_channels=1, input_size=8, hidden=[4])
    parent = _save(ctx, model, name="p")
    child = _save(ctx, model, name="c", key="child")
    m = ctx.store.manifest(child)
    assert m["lineage"]["parents"] == [] and m["lineage"]["strategy"] == "toy"
    assert m["lineage"]["run"] == {"id": "r1", "key": "child"}
    assert ctx.store.manifest(parent)["lineage"]["run"] == {"id": "r1", "key": "model-0"}
    loaded, manifest = ctx.load_model("c")
    assert manifest["id"] == child
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_only_the_main_process_saves(ctx, monkeypatch):
    from reuse_core.backbone import build

    monkeypatch.setenv("RANK", "1")
    assert _save(ctx, build("mlp", 2, in_channels=1, input_size=8, hidden=[4])) is None
    assert ctx.store.list() == []


def test_a_fresh_run_saves_again_a_resumed_one_does_not(ctx):
    from reuse_core.backbone import build

    model = build("mlp", 2, in_channels=1, input_size=8, hidden=[4])
    first = _save(ctx, model)
    ctx_again = RunContext(strategy="toy", store=ctx.store, hooks=None, run_dir=ctx.run_dir, device=ctx.device,
                           quiet=True, run_id="r1", resume=True)
    assert _save(ctx_again, model) == first
    other_run = RunContext(strategy="toy", store=ctx.store, hooks=None, run_dir=ctx.run_dir, device=ctx.device,
                           quiet=True, run_id="r2", resume=True)
    assert _save(other_run, model) != first and len(ctx.store.list()) == 2


def test_a_registered_loader_rebuilds_composite_models(ctx, monkeypatch):
    class Doubler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    model = Doubler()
    model.w.data.fill_(2.0)
    monkeypatch.setattr(context, "_MODEL_LOADERS", {})  # this test's loader leaves with it
    register_model_loader("doubler", lambda manifest, state: _load_doubler(Doubler(), state))
    mid = ctx.save(model, backbone="doubler", config={}, dataset=None, classes=["a", "b"], metrics={},
                   parents=[], options={})
    loaded, _ = ctx.load_model(mid)
    assert torch.equal(loaded.w, torch.full((2,), 2.0))


def _load_doubler(module, state):
    module.load_state_dict(state)
    return module


def test_a_run_records_its_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = reuse_run.run("pretrain", store=tmp_path / "store", quiet=True, backbone="mlp", classes=["0-1"],
                           epochs=1, label_budget=5)
    recorded = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert ModelStore(tmp_path / "store").manifest(result.model)["lineage"]["run"]["id"] == recorded["id"]
