"""ensemble end to end on tiny digits: members trained together (batched) or taken from the store,
each combination and weighting, the stored ensemble loading back as one module, distilling it, and
the same run under torchrun with 2 processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reuse_core import engine
from reuse_core import run as reuse_run
from reuse_core.strategy.blocks import load_splits
from reuse_core.combine import Ensemble
from reuse_core.run import RunContext
from reuse_core.store import ModelStore

TOGETHER = dict(backbone="mlp", backbone_config=["hidden=[16]"], num_members=3, classes=["0-4"], epochs=2,
                label_budget=15, lr=0.1)
TORCHRUN = Path(sys.executable).with_name("torchrun")


def context(store) -> RunContext:
    return RunContext(strategy="test", store=store, hooks=None, run_dir=Path("."), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def together(store, tmp_path_factory):
    return reuse_run.run("ensemble", store=store, run_dir=tmp_path_factory.mktemp("together"), quiet=True, **TOGETHER)


@pytest.fixture(scope="module")
def mlp(store, tmp_path_factory):
    """A second architecture on the teacher's classes (0-4)."""
    return reuse_run.run("pretrain", store=store, run_dir=tmp_path_factory.mktemp("mlp"), quiet=True,
                         backbone="mlp", backbone_config=["hidden=[32]"], classes=["0-4"], epochs=2, lr=0.1)


def test_members_trained_together_are_saved_with_the_ensemble(store, together):
    *member_ids, ens_id = together.models
    assert len(member_ids) == 3 and together.model == ens_id
    manifest = store.manifest(ens_id)
    assert manifest["backbone"] == "ensemble" and manifest["lineage"]["parents"] == member_ids
    assert [m["id"] for m in manifest["config"]["members"]] == member_ids
    assert manifest["classes"] == ["0", "1", "2", "3", "4"] and manifest["dataset"] == "digits"
    for mid in member_ids:
        assert store.manifest(mid)["backbone"] == "mlp"
    m = together.metrics
    assert len(m["members_test_accuracy"]) == 3 and m["best_member_test_accuracy"] == max(m["members_test_accuracy"])
    assert [store.manifest(i)["metrics"]["test_accuracy"] for i in member_ids] == m["members_test_accuracy"]
    assert m["weights"] == pytest.approx([1 / 3] * 3) and m["epochs"] == 2
    # the members differ (each its own initialisation) but saw the same batches
    states = [store.load(i)[0] for i in member_ids]
    assert not torch.equal(states[0]["head.weight"], states[1]["head.weight"])
    # per-epoch validation in the run directory measures the ensemble
    rows = (Path(together.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"val_accuracy"' in rows[-1]


def test_the_stored_ensemble_loads_as_one_module(store, together):
    model, manifest = context(store).load_model(together.model)
    assert isinstance(model, Ensemble) and len(model.members) == 3
    _, _, test = load_splits({"dataset": "digits", "classes": ["0-4"], "seed": 0}, classes=[0, 1, 2, 3, 4])
    assert engine.evaluate(model, test, "cpu")["accuracy"] == pytest.approx(together.metrics["test_accuracy"])
    # its members are the stored member models
    member, _ = context(store).load_model(together.models[0])
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.members[0](x), member(x))


@pytest.mark.parametrize(("combine", "weighting"), [("logits", "accuracy"), ("probs", "learned"),
                                                     ("log_probs", "uniform"), ("vote", "accuracy")])
def test_members_of_different_architectures_from_the_store(store, teacher, mlp, combine, weighting):
    result = reuse_run.run("ensemble", store=store, quiet=True, members=[teacher.model, mlp.model],
                           combine=combine, weighting=weighting)
    m = result.metrics
    assert result.models == [result.model]  # nothing trained: only the ensemble is new
    manifest = store.manifest(result.model)
    assert manifest["lineage"]["parents"] == [teacher.model, mlp.model]
    assert [s["backbone"] for s in manifest["config"]["members"]] == ["small-cnn", "mlp"]
    w = torch.tensor(m["weights"])
    assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0)
    if weighting == "accuracy":
        acc = torch.tensor(m["members_val_accuracy"])
        torch.testing.assert_close(w, acc / acc.sum())
    if combine == "vote":
        assert m["test_accuracy"] == pytest.approx(m["vote_test_accuracy"])
    model, _ = context(store).load_model(result.model)
    assert model.combine == combine


def test_refuses_members_with_other_classes_and_a_missing_source(store, teacher):
    other = reuse_run.run("pretrain", store=store, quiet=True, backbone="mlp", backbone_config=["hidden=[8]"],
                          classes=["0-2"], epochs=1, label_budget=5)
    with pytest.raises(ValueError, match="members must share their classes"):
        reuse_run.run("ensemble", store=store, quiet=True, members=[teacher.model, other.model])
    with pytest.raises(ValueError, match="give --members .* or --backbone"):
        reuse_run.run("ensemble", store=store, quiet=True)
    with pytest.raises(ValueError, match="at least 2 models"):
        reuse_run.run("ensemble", store=store, quiet=True, members=[teacher.model])
    with pytest.raises(ValueError, match="option 'augment': it augments the training of members trained here"):
        reuse_run.run("ensemble", store=store, quiet=True, members=[teacher.model, teacher.model], augment="light")


def test_distilling_an_ensemble_into_one_student(store, together):
    result = reuse_run.run("distill", store=store, quiet=True, teacher=together.model, student_backbone="mlp",
                           student_backbone_config=["hidden=[16]"], epochs=1, lr=0.1)
    manifest = store.manifest(result.model)
    assert manifest["lineage"]["parents"] == [together.model]
    assert manifest["classes"] == ["0", "1", "2", "3", "4"]
    assert 0 <= result.metrics["test_accuracy"] <= 1


TORCHRUN_SCRIPT = """
import sys
from reuse_core import run
from reuse_core.store import ModelStore
r = run.run("ensemble", store=ModelStore(sys.argv[1]), run_dir=sys.argv[2], quiet=True, **{opts!r})
print("models", r.models)
"""


def test_ensemble_under_torchrun_matches_one_process(tmp_path):
    script = tmp_path / "ens.py"
    script.write_text(TORCHRUN_SCRIPT.format(opts=dict(TOGETHER, epochs=1)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # both at once: the two processes of torchrun and the single one
    ddp = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script),
                            str(tmp_path / "ddp-store"), str(tmp_path / "ddp-run")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one-store"), str(tmp_path / "one-run")],
                            capture_output=True, text=True, env=env, timeout=180)
    out, err = ddp.communicate(timeout=180)
    assert ddp.returncode == 0, f"torchrun failed:\n{out}\n{err}"
    assert single.returncode == 0, single.stderr
    ddp_store, one_store = ModelStore(tmp_path / "ddp-store"), ModelStore(tmp_path / "one-store")
    # rank 0 alone saved: 3 members and the ensemble, once
    assert len(ddp_store.list()) == len(one_store.list()) == 4
    ddp_ens = next(m for m in ddp_store.list() if m["backbone"] == "ensemble")
    one_ens = next(m for m in one_store.list() if m["backbone"] == "ensemble")
    got, want = ddp_store.load(ddp_ens["id"])[0], one_store.load(one_ens["id"])[0]
    for k in want:
        rel = float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12))
        assert rel < 1e-5, f"{k}: relative difference {rel:.2e} between 2 processes and 1"
    assert ddp_ens["metrics"]["test_accuracy"] == pytest.approx(one_ens["metrics"]["test_accuracy"])
