"""fit / evaluate / predict_logits on tiny synthetic data: learning, metrics files, schedules,
gradient accumulation, seeding, parameter groups, hooks, and resume in one process."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from reuse_core.engine import TrainConfig, evaluate, fit, predict_logits
from reuse_core.engine.optim import lr_factor
from tests.engine.tiny import blobs, mlp


def quiet(**kw) -> TrainConfig:
    return TrainConfig(progress=False, **kw)


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_learns_and_writes_metrics_and_checkpoint(tmp_path):
    train, val = blobs(120, seed=0), blobs(60, seed=1)
    model = mlp()
    before = evaluate(model, val)
    r = fit(model, train, val, config=quiet(epochs=4, batch_size=16, lr=0.2), run_dir=tmp_path)
    assert [e["epoch"] for e in r.epochs] == [1, 2, 3, 4]
    assert r.last_val_accuracy >= 0.9 > before["accuracy"]
    assert r.best_val_accuracy == max(e["val_accuracy"] for e in r.epochs)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == r.epochs
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "time_s", "samples"):
        assert key in rows[0]
    assert rows[0]["samples"] == 120
    after = evaluate(model, val)
    assert after["accuracy"] == pytest.approx(r.last_val_accuracy) and after["count"] == 60
    assert (tmp_path / "checkpoint.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_evaluate_and_predict_logits_take_a_dataset_or_a_loader():
    data, model = blobs(50), mlp()
    logits = predict_logits(model, data, batch_size=7)
    assert logits.shape == (50, 3) and logits.dtype == torch.float32
    assert torch.allclose(logits, predict_logits(model, DataLoader(data, batch_size=16)))
    assert torch.allclose(logits, model(data.tensors[0]).detach(), atol=1e-6)
    acc = (logits.argmax(1) == data.tensors[1]).float().mean().item()
    got = evaluate(model, DataLoader(data, batch_size=9))
    assert got["accuracy"] == pytest.approx(acc)
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, data.tensors[1]).item(), rel=1e-5)
    model.train()
    evaluate(model, data)
    assert model.training, "evaluate must restore the model's mode"


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    cfg = quiet(epochs=4, lr=1.0, schedule=schedule, warmup_epochs=1, step_epochs=2, step_gamma=0.5)
    f = [lr_factor(s, 10, cfg) for s in range(40)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    if schedule == "constant":
        assert f[10:] == [1.0] * 30
    elif schedule == "step":
        assert f[10:20] == [1.0] * 10 and f[20:40] == [0.5] * 20
    else:
        assert f[10] == 1.0 and all(a > b for a, b in zip(f[10:], f[11:]))
        assert f[39] == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))


def test_the_optimizer_sees_the_scheduled_lr(tmp_path):
    model = mlp()
    r = fit(model, blobs(64), config=quiet(epochs=3, batch_size=16, lr=0.1, schedule="step", step_epochs=1,
                                           step_gamma=0.1), run_dir=tmp_path)
    assert [e["lr"] for e in r.epochs] == pytest.approx([0.1, 0.01, 0.001])


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_grad_accumulation_equals_the_large_batch(tmp_path, optimizer):
    data = blobs(100)  # 100 = 3 steps of 32 and one of 4: the short last step must be weighted right
    big, small = mlp(), mlp()
    fit(big, data, config=quiet(epochs=2, batch_size=32, lr=0.05, optimizer=optimizer), run_dir=tmp_path / "a")
    fit(small, data, config=quiet(epochs=2, batch_size=8, grad_accum=4, lr=0.05, optimizer=optimizer),
        run_dir=tmp_path / "b")
    torch.testing.assert_close(params(small), params(big), rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = []
    for i, seed in enumerate((3, 3, 4)):
        model = mlp(dropout=0.3)
        fit(model, blobs(64), config=quiet(epochs=2, batch_size=16, seed=seed), run_dir=tmp_path / str(i))
        runs.append(params(model))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_param_groups_scale_the_lr_and_frozen_parameters_stay(tmp_path):
    model = mlp()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    still = model[3].bias.detach().clone()
    cfg = quiet(epochs=1, batch_size=16, lr=0.1, schedule="constant", param_groups=[("0", 0.1), ([model[3].bias], 0.0)])
    fit(model, blobs(32), config=cfg, run_dir=tmp_path)
    assert torch.equal(model[0].bias, frozen) and torch.equal(model[3].bias, still)
    assert cfg.to_dict()["param_groups"] == [["0", 0.1], ["<1 params>", 0.0]]
    with pytest.raises(ValueError, match="no parameter of the model is under 'nope'"):
        fit(mlp(), blobs(32), config=quiet(epochs=1, param_groups=[("nope", 0.5)]), run_dir=tmp_path / "x")


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bars_on_a_terminal_unless_silenced(tmp_path, capsys, monkeypatch, progress):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    fit(mlp(), blobs(32), config=TrainConfig(epochs=1, batch_size=16, progress=progress), run_dir=tmp_path)
    err = capsys.readouterr().err
    assert ("epoch 1/1" in err) == progress
    if not progress:
        assert err == ""


def test_bad_config_and_bad_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="optimizer 'lbfgs'.*schedule 'linear'"):
        TrainConfig(optimizer="lbfgs", schedule="linear")
    with pytest.raises(ValueError, match="grad_accum must be an integer >= 1"):
        TrainConfig(grad_accum=0)
    with pytest.raises(TypeError, match="must be a Dataset, not a DataLoader"):
        fit(mlp(), DataLoader(blobs(8)), config=quiet(epochs=1), run_dir=tmp_path)


class Recorder:
    """A hook relay that records every call; reuse_adjust_loss returns a pluggy-style list."""

    def __init__(self, term=None):
        self.calls, self.term = [], term

    def reuse_run_start(self, **kw):
        self.calls.append(("run_start", kw))

    def reuse_epoch_end(self, **kw):
        self.calls.append(("epoch_end", kw))

    def reuse_run_end(self, **kw):
        self.calls.append(("run_end", kw))

    def reuse_adjust_loss(self, **kw):
        self.calls.append(("adjust_loss", kw))
        return [None] if self.term is None else [self.term(**kw), None]


def test_hooks_are_called_in_order_with_keyword_arguments(tmp_path):
    hooks, model = Recorder(), mlp()
    r = fit(model, blobs(40), blobs(20, seed=1), config=quiet(epochs=2, batch_size=16), run_dir=tmp_path,
            hooks=hooks, strategy="finetune", options={"mode": "full"})
    names = [n for n, _ in hooks.calls]
    assert names == ["run_start"] + (["adjust_loss"] * 3 + ["epoch_end"]) * 2 + ["run_end"]
    assert hooks.calls[0][1] == {"strategy": "finetune", "options": {"mode": "full"}, "run_dir": str(tmp_path)}
    adj = hooks.calls[1][1]
    assert set(adj) == {"strategy", "loss", "model", "inputs", "targets", "outputs"}
    assert adj["model"] is model and adj["strategy"] == "finetune"
    assert adj["inputs"].shape == (16, 6) and adj["targets"].shape == (16,) and adj["outputs"].shape == (16, 3)
    ends = [kw for n, kw in hooks.calls if n == "epoch_end"]
    assert [e["epoch"] for e in ends] == [1, 2] and ends[1]["metrics"] == r.epochs[1]
    assert hooks.calls[-1][1]["result"]["last_val_accuracy"] == r.last_val_accuracy


def test_an_adjust_loss_term_is_added_to_the_loss(tmp_path):
    # Adding the loss itself doubles every gradient: with plain SGD that is training at twice the lr.
    cfg = dict(epochs=2, batch_size=16, optimizer="sgd", momentum=0.0, schedule="constant")
    doubled, reference, plain = mlp(), mlp(), mlp()
    fit(doubled, blobs(48), config=quiet(lr=0.05, **cfg), run_dir=tmp_path / "a",
        hooks=Recorder(term=lambda loss, **_: loss))
    fit(reference, blobs(48), config=quiet(lr=0.1, **cfg), run_dir=tmp_path / "b")
    fit(plain, blobs(48), config=quiet(lr=0.05, **cfg), run_dir=tmp_path / "c", hooks=Recorder())
    torch.testing.assert_close(params(doubled), params(reference), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(params(doubled), params(plain))


def test_a_custom_loss_fn_drives_training(tmp_path):
    seen = []

    def smoothed(model, inputs, targets):
        seen.append(len(targets))
        out = model(inputs)
        return torch.nn.functional.cross_entropy(out, targets, label_smoothing=0.1), out

    r = fit(mlp(), blobs(40), config=quiet(epochs=1, batch_size=16), run_dir=tmp_path, loss_fn=smoothed)
    assert seen == [16, 16, 8] and r.epochs[0]["train_accuracy"] is not None


class Crash(Exception):
    pass


def test_resume_continues_after_the_last_finished_epoch(tmp_path):
    cfg = quiet(epochs=3, batch_size=16, lr=0.1, warmup_epochs=0.5)
    whole = mlp(dropout=0.2)
    fit(whole, blobs(64), blobs(16, seed=1), config=cfg, run_dir=tmp_path / "whole")

    class CrashInEpoch2(Recorder):
        def reuse_epoch_end(self, **kw):
            self.epoch = kw["epoch"]

        def reuse_adjust_loss(self, **kw):
            if getattr(self, "epoch", 0) == 1:
                raise Crash

    with pytest.raises(Crash):
        fit(mlp(dropout=0.2), blobs(64), blobs(16, seed=1), config=cfg, run_dir=tmp_path / "cut", hooks=CrashInEpoch2())
    resumed = mlp(dropout=0.2)
    r = fit(resumed, blobs(64), blobs(16, seed=1), config=cfg, run_dir=tmp_path / "cut", resume=True)
    assert r.resumed_from == 1 and [e["epoch"] for e in r.epochs] == [1, 2, 3]
    assert torch.equal(params(resumed), params(whole))
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match=r"config changed \(lr: 0.1 -> 0.2\)"):
        fit(mlp(), blobs(64), config=quiet(epochs=3, batch_size=16, lr=0.2, warmup_epochs=0.5),
            run_dir=tmp_path / "cut", resume=True)
