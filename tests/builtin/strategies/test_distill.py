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


def _teacher_logits(store, teacher, data):
    model = reuse_run.RunContext("distill", store, None, Path("."), torch.device("cpu")).load_model(teacher.model)[0]
    return distill.teacher_logits(model.eval(), data, torch.device("cpu"))


def test_the_topk_cache_keeps_the_top_ids_and_their_logprobs_at_the_temperature(store, teacher, tmp_path, capsys):
    from reuse_core.strategy.blocks import load_splits

    result = reuse_run.run("distill", store=store, run_dir=tmp_path / "run", teacher=teacher.model, teacher_topk=2,
                           temperature=3.0, **{**STUDENT, "epochs": 1})
    saved = torch.load(Path(result.run_dir) / distill.TOPK_FILE, weights_only=True)
    assert not (Path(result.run_dir) / distill.CACHE_FILE).exists(), "no dense cache is written"
    train = load_splits({"dataset": "digits", "classes": None, "seed": 0, "data_root": None, "dataset_config": None,
                         "label_budget": None}, dataset="digits", classes=[0, 1, 2, 3, 4])[0]
    want = torch.log_softmax(_teacher_logits(store, teacher, train).double() / 3.0, -1).topk(2, -1)
    assert saved["ids"].dtype == torch.int32 and saved["logprobs"].dtype == torch.float16
    assert saved["ids"].shape == (len(train), 2)
    torch.testing.assert_close(saved["ids"], want.indices.to(torch.int32), rtol=0, atol=0)
    torch.testing.assert_close(saved["logprobs"], want.values.to(torch.float16), rtol=0, atol=0)
    n = len(train)
    record = result.metrics["teacher_cache"]
    assert record == {"kind": "topk", "k": 2, "bytes": n * 2 * (4 + 2), "dense_bytes": n * 5 * 4,
                      "ratio": pytest.approx(12 / 20)}
    assert store.manifest(result.model)["metrics"]["teacher_cache"] == record
    assert f"teacher cache (top-2): {n * 12:,} bytes, 60.00% of the dense cache ({n * 20:,} bytes)" in capsys.readouterr().out


def test_topk_over_every_class_trains_the_student_as_the_dense_cache_does(store, teacher, tmp_path):
    """At K = classes the bucket tail is empty and the loss is the dense one: the two runs differ
    only by the float16 rounding of the cached log-probabilities."""
    runs = {k: reuse_run.run("distill", store=store, quiet=True, run_dir=tmp_path / str(k), teacher=teacher.model,
                             teacher_topk=k, **{**STUDENT, "epochs": 1}) for k in (5, None)}
    assert runs[None].metrics["teacher_cache"]["kind"] == "dense"
    a, b = (store.load(runs[k].model)[0] for k in (5, None))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-2, atol=2e-3)
    assert abs(runs[5].metrics["test_accuracy"] - runs[None].metrics["test_accuracy"]) < 0.02


def test_topk_trains_through_the_fused_op_on_the_students_head(store, teacher, monkeypatch):
    """The head's input and weight go into fused_linear_distill_loss; with a label budget the
    unlabelled rows get only the distillation term."""
    calls = []
    real = distill.fused_linear_distill_loss

    def spy(hidden, weight, teacher_rows, labels, **kw):
        calls.append((hidden.shape, weight.shape, teacher_rows.indices.shape, labels is None, kw["ce_weight"]))
        return real(hidden, weight, teacher_rows, labels, **kw)

    monkeypatch.setattr(distill, "fused_linear_distill_loss", spy)
    result = reuse_run.run("distill", store=store, quiet=True, teacher=teacher.model, teacher_topk=3, label_budget=3,
                           **{**STUDENT, "epochs": 1})
    assert calls and result.metrics["test_accuracy"] > 0.2
    hidden, weight, idx, no_labels, ce = calls[0]
    assert weight == (5, 16) and hidden[1:] == (16,) and idx == (hidden[0], 3) and no_labels and ce == 0.0


@pytest.mark.parametrize(("options", "message"), [
    (dict(teacher_topk=2, cache_teacher=False), "option 'teacher_topk': --teacher-topk keeps a cache"),
    (dict(teacher_topk=6), "option 'teacher_topk': K = 6 is more than the teacher's 5 classes"),
    (dict(teacher_topk=0), "teacher_topk"),
])
def test_bad_topk_options_are_refused(store, teacher, options, message):
    with pytest.raises(OptionError, match=message):
        reuse_run.run("distill", store=store, quiet=True, teacher=teacher.model, **{**STUDENT, **options})


def test_a_head_that_is_not_linear_is_refused_for_topk():
    class ConvHead(torch.nn.Module):
        head_name = "classifier.1"

        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(8, 5, 1))

    with pytest.raises(OptionError, match="head 'classifier.1' is a Conv2d; the fused top-k loss needs an nn.Linear"):
        distill.HeadInput(ConvHead())
