"""pretrain end to end on tiny digits: the run directory, the stored model and its lineage, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reuse_core import plugins
from reuse_core import run as reuse_run
from reuse_core.run import RunError
from reuse_core.strategy import OptionError

TINY = dict(backbone="small-cnn", classes=["0-2"], epochs=2, label_budget=10, lr=0.1)


def test_pretrain_saves_a_root_model_with_its_lineage(store):
    result = reuse_run.run("pretrain", store=store, quiet=True, name="tiny", **TINY)
    manifest = store.manifest(result.model)
    assert manifest["backbone"] == "small-cnn" and manifest["name"] == "tiny"
    assert manifest["classes"] == ["0", "1", "2"] and manifest["dataset"] == "digits"
    assert manifest["config"] == {"in_channels": 1}
    assert manifest["lineage"]["parents"] == [] and manifest["lineage"]["strategy"] == "pretrain"
    assert manifest["lineage"]["options"]["label_budget"] == 10
    assert result.metrics["train_examples"] == 30 and result.metrics["epochs"] == 2
    assert 0 <= result.metrics["test_accuracy"] <= 1
    run_dir = result.run_dir
    assert run_dir.startswith("runs/pretrain-")
    for name in ("run.json", "result.json", "metrics.jsonl", "checkpoint.pt"):
        assert (Path(run_dir) / name).exists(), name
    run_id = json.loads((Path(run_dir) / "run.json").read_text())["id"]
    assert manifest["lineage"]["run"] == {"id": run_id, "key": "model-0"}, "the model names the run that saved it"
    assert json.loads((Path(run_dir) / "result.json").read_text())["models"] == [result.model]


def test_a_finished_run_resumes_to_its_recorded_result(store, tmp_path):
    first = reuse_run.run("pretrain", store=store, run_dir=tmp_path / "r", quiet=True, **TINY)
    n = len(store.list())
    again = reuse_run.run("pretrain", store=store, run_dir=tmp_path / "r", resume=True, quiet=True)
    assert again.models == first.models and again.metrics == first.metrics
    assert len(store.list()) == n


class _StopAfterEpoch:
    """A lifecycle relay that stops the run (as a kill would) once an epoch is checkpointed."""

    def __init__(self, epoch):
        self.epoch = epoch

    def reuse_run_start(self, **kw):
        pass

    def reuse_epoch_end(self, *, strategy, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt

    def reuse_run_end(self, **kw):
        pass

    def reuse_adjust_loss(self, **kw):
        return None


def test_an_interrupted_run_resumes_where_it_stopped(store, tmp_path, monkeypatch):
    straight = reuse_run.run("pretrain", store=store, run_dir=tmp_path / "straight", quiet=True, **TINY)
    with monkeypatch.context() as m:
        m.setattr(plugins, "lifecycle_relay", lambda: _StopAfterEpoch(1))
        with pytest.raises(KeyboardInterrupt):
            reuse_run.run("pretrain", store=store, run_dir=tmp_path / "cut", quiet=True, **TINY)
    assert not (tmp_path / "cut" / "result.json").exists()
    n = len(store.list())
    resumed = reuse_run.run("pretrain", store=store, resume=True, run_dir=tmp_path / "cut", quiet=True)
    assert len(store.list()) == n + 1
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    a, _ = store.load(straight.model)
    b, _ = store.load(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must end with the uninterrupted run's weights"


def test_resume_finds_the_newest_unfinished_run_and_refuses_other_options(store, monkeypatch, tmp_path):
    with monkeypatch.context() as m:
        m.setattr(plugins, "lifecycle_relay", lambda: _StopAfterEpoch(1))
        with pytest.raises(KeyboardInterrupt) as stopped:
            reuse_run.run("pretrain", store=store, quiet=True, **TINY)
    # newer unfinished runs that are not this one: other options (failed before its first epoch), another strategy
    with pytest.raises(OptionError, match="dataset 'digits' has no setting 'size'"):
        reuse_run.run("pretrain", store=store, quiet=True, **{**TINY, "dataset_config": ["size=3"]})
    other = Path("runs") / "pretrain-99999999-000000"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"strategy": "finetune", "options": {}}))
    with pytest.raises(RunError, match="no unfinished 'pretrain' run of this strategy with these options"):
        reuse_run.run("pretrain", store=store, resume=True, quiet=True, epochs=5)
    with pytest.raises(OptionError, match="other values of epochs"):
        reuse_run.run("pretrain", store=store, run_dir=stopped.value.run_dir, resume=True, quiet=True, epochs=5)
    resumed = reuse_run.run("pretrain", store=store, resume=True, quiet=True)
    assert resumed.run_dir == str(stopped.value.run_dir) and resumed.metrics["epochs"] == 2
    with pytest.raises(RunError, match="nothing to resume"):
        reuse_run.run("pretrain", store=store, resume=True, quiet=True, **TINY)


def test_a_run_directory_holds_one_run(store, tmp_path):
    reuse_run.run("pretrain", store=store, run_dir=tmp_path / "r", quiet=True, **{**TINY, "epochs": 1})
    with pytest.raises(RunError, match="already holds a run"):
        reuse_run.run("pretrain", store=store, run_dir=tmp_path / "r", quiet=True, **TINY)
