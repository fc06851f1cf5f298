"""distill end to end on tiny digits: the fused loss from a stored teacher, the teacher-logit cache
(looked up by example index while the engine shuffles), label budgets, lineage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reuse_core import run as reuse_run
from reuse_core.builtin.strategies import distill
from reuse_core.strategy import OptionError

STUDENT = dict(student_backbone="mlp", student_backbone_config=["hidden=[16]"], epochs=2, lr=0.1, batch_size=32)


def test_distill_saves_a_student_under_its_teacher(store, teacher):
    result = reuse_run.run("distill", store=store, quiet=True, teacher=teacher.model, **STUDENT)
    manifest = store.manifest(result.model)
    assert manifest["backbone"] == "mlp" and manifest["config"] == {"in_channels": 1, "hidden": [16], "input_size": 8}
    assert manifest["classes"] == store.manifest(teacher.model)["classes"], "default: the teacher's classes"
    assert manifest["lineage"]["parents"] == [teacher.model] and manifest["lineage"]["strategy"] == "distill"
    cache = torch.load(Path(result.run_dir) / distill.CACHE_FILE, weights_only=True)
    assert cache["logits"].shape == (result.metrics["train_examples"], 5)


def test_cached_teacher_logits_train_the_student_as_the_live_teacher_does(store, teacher, tmp_path):
    """The cache is looked up by example index: a mix-up with the shuffled order would diverge."""
    runs = {c: reuse_run.run("distill", store=store, quiet=True, run_dir=tmp_path / str(c), teacher=teacher.model,
                             cache_teacher=c, **{**STUDENT, "epochs": 1}) for c in (True, False)}
    a, b = (store.load(runs[c].model)[0] for c in (True, False))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_with_a_label_budget_the_teacher_labels_the_rest(store, teacher, monkeypatch):
    """Cross entropy sees budget x classes examples; the distillation term sees every one."""
    seen = []
    real = distill.IndexedSplit.take

    def spy(self, targets):
        idx = real(self, targets)
        seen.extend(idx.tolist())
        return idx

    monkeypatch.setattr(distill.IndexedSplit, "take", spy)
    result = reuse_run.run("distill", store=store, quiet=True, teacher=teacher.model, label_budget=3,
                           **{**STUDENT, "epochs": 1})
    assert result.metrics["train_examples"] == len(set(seen)) > 5 * 3


def test_the_teacher_may_be_any_callable(store, teacher):
    from reuse_core import data
    from reuse_core.engine import predict_logits

    model = reuse_run.RunContext("distill", store, None, Path("."), torch.device("cpu")).load_model(teacher.model)[0]
    val = data.load("digits", split="val", classes=[0, 1, 2, 3, 4])
    want = predict_logits(model, val, "cpu")
    torch.testing.assert_close(distill.teacher_logits(lambda x: 2 * model.eval()(x), val, torch.device("cpu")), 2 * want)


def test_a_batch_out_of_step_with_the_loader_is_refused():
    from reuse_core import data

    split = distill.IndexedSplit(data.load("digits", split="val", classes=[0, 1]))
    split[0], split[1]
    with pytest.raises(RuntimeError, match="out of step"):
        split.take(torch.tensor([split.targets[1], split.targets[0] + 5]))


def test_augmentation_needs_the_teacher_online(store, teacher):
    with pytest.raises(OptionError, match="option 'augment': --augment light needs --no-cache-teacher"):
        reuse_run.run("distill", store=store, quiet=True, teacher=teacher.model, student_backbone="mlp", epochs=1,
                      augment="light")
    result = reuse_run.run("distill", store=store, quiet=True, teacher=teacher.model, student_backbone="mlp", epochs=1,
                           augment="light", cache_teacher=False, label_budget=3)
    records = result.metrics["training_data"]
    assert records[0]["labelled"] == 15 and records[1]["model"] == teacher.model
