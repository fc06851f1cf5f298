"""finetune end to end on tiny digits: what each mode trains, the new head, lineage, label budget."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reuse_core import run as reuse_run
from reuse_core.strategy import OptionError


def _finetune(store, teacher, **options):
    result = reuse_run.run("finetune", store=store, quiet=True, model=teacher.model, classes=["5-9"],
                           label_budget=4, epochs=1, lr=0.1, **options)
    return result, store.load(result.model)[0], store.load(teacher.model)[0]


def _changed(before, after, prefix):
    return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]


def test_full_fine_tuning_trains_every_layer_under_a_new_head(store, teacher):
    result, tuned, source = _finetune(store, teacher, mode="full")
    manifest = store.manifest(result.model)
    assert manifest["classes"] == ["5", "6", "7", "8", "9"] and manifest["backbone"] == "small-cnn"
    assert manifest["lineage"]["parents"] == [teacher.model] and manifest["lineage"]["strategy"] == "finetune"
    assert tuned["head.weight"].shape == (5, 128) and result.metrics["train_examples"] == 20
    assert _changed(source, tuned, "conv1.") and _changed(source, tuned, "fc.")


def test_a_linear_probe_leaves_the_features_alone(store, teacher):
    _, tuned, source = _finetune(store, teacher, mode="linear")
    changed = [k for k in source if not k.startswith("head.") and not torch.equal(source[k], tuned[k])]
    assert changed == [], "frozen features (batch-norm statistics included) must not change"


def test_partial_fine_tuning_trains_the_last_blocks_only(store, teacher):
    _, tuned, source = _finetune(store, teacher, mode="partial", trainable_blocks=1)
    assert _changed(source, tuned, "fc.")
    assert not _changed(source, tuned, "conv1.") and not _changed(source, tuned, "conv2.")


def test_reused_layers_train_at_the_scaled_learning_rate(store, teacher):
    result = reuse_run.run("finetune", store=store, quiet=True, model=teacher.model, classes=["5-9"], label_budget=4,
                           epochs=1, lr=0.1, reused_lr_scale=0.25, schedule="constant")
    ckpt = torch.load(Path(result.run_dir) / "checkpoint.pt", weights_only=True)
    assert sorted(g["lr"] for g in ckpt["optimizer"]["param_groups"]) == pytest.approx([0.025, 0.1])


def test_an_unknown_model_is_a_clear_error(store):
    from reuse_core.store import StoreError

    with pytest.raises(StoreError, match="no model 'nope'"):
        reuse_run.run("finetune", store=store, quiet=True, model="nope")
    with pytest.raises(OptionError, match="option 'mode': expected one of full, linear, partial, lp-ft"):
        reuse_run.run("finetune", store=store, quiet=True, model="x", mode="half")


def test_an_imported_model_fine_tunes_on_images_of_another_form(store, tmp_path, capsys):
    """An ImageNet-shaped model imported from a .pth (3 channels, at least 21x21) fine-tunes on 8x8
    grey digits: the run says how it adapted the inputs, the manifest records it, and the model
    loads back with the adaptation (here as a distillation teacher on the same digits)."""
    from torchvision.models import squeezenet1_1

    torch.save(squeezenet1_1(num_classes=1000).state_dict(), tmp_path / "sq.pth")
    imported = store.import_(tmp_path / "sq.pth", backbone="squeezenet1_1", classes=1000, name="imagenet-sq")
    with pytest.raises(OptionError, match=f"option 'dataset': model {imported.id} has no recorded dataset"):
        reuse_run.run("finetune", store=store, quiet=True, model="imagenet-sq", classes=["0-4"], epochs=1)
    tuned = reuse_run.run("finetune", store=store, model="imagenet-sq", dataset="digits", classes=["0-4"],
                          label_budget=3, epochs=1, lr=0.01)
    assert "grey images repeated to 3 channels; 8x8 images resized to 21x21 (bilinear)" in capsys.readouterr().out
    manifest = store.manifest(tuned.model)
    assert manifest["config"]["input_adapter"] == {"channels": 3, "size": [21, 21]}
    assert manifest["lineage"]["parents"] == [imported.id]
    student = reuse_run.run("distill", store=store, quiet=True, teacher=tuned.model, student_backbone="mlp",
                            label_budget=3, epochs=1)
    assert store.manifest(student.model)["lineage"]["parents"] == [tuned.model]


def test_lp_ft_trains_the_head_first_then_everything_at_the_reused_rate(store, teacher):
    result = reuse_run.run("finetune", store=store, quiet=True, model=teacher.model, classes=["5-9"], label_budget=4,
                           epochs=3, lr=0.1, reused_lr_scale=0.25, schedule="constant", mode="lp-ft")
    run_dir = Path(result.run_dir)
    probe = torch.load(run_dir / "linear-probe" / "checkpoint.pt", weights_only=True)
    tuned = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    source = store.load(teacher.model)[0]
    assert probe["epoch"] == 1 and tuned["epoch"] == 2 and result.metrics["epochs"] == 3
    assert not [k for k in source if not k.startswith("head.") and not torch.equal(source[k], probe["model"][k])], \
        "the first phase trains only the head (batch-norm statistics included)"
    assert _changed(source, tuned["model"], "conv1.") and _changed(probe["model"], tuned["model"], "head.")
    assert [g["lr"] for g in tuned["optimizer"]["param_groups"]] == pytest.approx([0.025]), \
        "the second phase trains every layer at lr * reused_lr_scale"


def test_lp_ft_needs_an_epoch_per_phase(store, teacher):
    with pytest.raises(OptionError, match="option 'mode': lp-ft needs --epochs of at least 2"):
        reuse_run.run("finetune", store=store, quiet=True, model=teacher.model, classes=["5-9"], epochs=1, mode="lp-ft")


def test_augmentation_is_drawn_anew_and_repeats_with_the_seed(store, teacher):
    tuned = [_finetune(store, teacher, augment=a)[1] for a in ("none", "light", "light")]
    assert _changed(tuned[0], tuned[1], "conv1.") and not _changed(tuned[1], tuned[2], "")
