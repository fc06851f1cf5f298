"""selfsup end to end on tiny digits: NT-Xent, a label-free lineage root that records its images,
and the refusals that keep its training images out of a test split."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reuse_core import data
from reuse_core import run as reuse_run
from reuse_core.builtin.strategies.selfsup import nt_xent
from reuse_core.strategy import OptionError


@pytest.fixture(scope="module")
def simclr(store, tmp_path_factory):
    """selfsup on the training images of digits 0-4, one epoch."""
    return reuse_run.run("selfsup", store=store, run_dir=tmp_path_factory.mktemp("selfsup"), quiet=True,
                         classes=["0-4"], epochs=1, batch_size=128)


def test_nt_xent_matches_its_definition():
    torch.manual_seed(0)
    z = torch.randn(6, 5)
    u = F.normalize(z, dim=1)
    sim = u @ u.T / 0.3
    expected = []
    for i in range(6):
        others = [j for j in range(6) if j != i]
        partner = (i + 3) % 6
        expected.append(-sim[i, partner] + torch.logsumexp(sim[i, others], 0))
    torch.testing.assert_close(nt_xent(z, 0.3), torch.stack(expected).mean())
    aligned = torch.cat([z[:3], z[:3]])
    assert nt_xent(aligned, 0.3) < nt_xent(z, 0.3)


def test_the_saved_model_is_a_label_free_root_without_the_projection_head(store, simclr):
    manifest = store.manifest(simclr.model)
    assert manifest["lineage"]["parents"] == [] and manifest["lineage"]["strategy"] == "selfsup"
    assert manifest["backbone"] == "small-cnn" and manifest["classes"] == ["0", "1", "2", "3", "4"]
    state, _ = store.load(simclr.model)
    assert not any("projector" in k for k in state) and "head.weight" in state
    metrics = manifest["metrics"]
    assert metrics["head_trained"] is False and metrics["val_contrastive_loss"] > 0
    [record] = metrics["training_data"]
    train = data.load("digits", split="train", seed=0, classes=[0, 1, 2, 3, 4])
    assert record["labelled"] == 0 and record["seed"] == 0 and record["split"] == "train"
    assert record["images"] == sorted(train.indices) and record["examples"] == len(train)
    held_out = {i for s in ("val", "test") for i in data.load("digits", split=s, seed=0).indices}
    assert not held_out & set(record["images"]), "selfsup must never train on the validation or test images"


def test_it_fine_tunes_and_refuses_a_split_whose_test_images_it_has_seen(store, simclr):
    tuned = reuse_run.run("finetune", store=store, quiet=True, model=simclr.model, classes=["0-4"], label_budget=2,
                          epochs=1)
    records = store.manifest(tuned.model)["metrics"]["training_data"]
    assert records[0]["labelled"] == 10 and records[1]["model"] == simclr.model
    with pytest.raises(OptionError, match=rf"option 'seed': model {simclr.model} was trained on 541 images of the "
                                          r"training split of 'digits' drawn with seed 0 \(their labels unused\), and "
                                          r"\d+ of them are in this run's test split \(seed 1\)"):
        reuse_run.run("finetune", store=store, quiet=True, model=simclr.model, classes=["0-4"], label_budget=2,
                      epochs=1, seed=1)
    # on classes it never saw, another seed's test split holds none of its images ...
    other = reuse_run.run("finetune", store=store, quiet=True, model=simclr.model, classes=["5-9"], label_budget=1,
                          epochs=1, seed=1)
    # ... but its descendants carry its record: seed 1's test images of 0-4 include some it saw
    with pytest.raises(OptionError, match=f"model {other.model}'s ancestor {simclr.model} was trained on 541 images"):
        reuse_run.run("distill", store=store, quiet=True, teacher=other.model, classes=["0-4"], student_backbone="mlp",
                      epochs=1, seed=1)


def test_its_untrained_head_is_no_teacher_or_member(store, simclr, teacher):
    with pytest.raises(OptionError, match=f"option 'teacher': model {simclr.model} was pretrained without labels "
                                          r"\(selfsup\): its head was never trained"):
        reuse_run.run("distill", store=store, quiet=True, teacher=simclr.model, student_backbone="mlp", epochs=1)
    with pytest.raises(OptionError, match="option 'members': model .* was pretrained without labels"):
        reuse_run.run("ensemble", store=store, quiet=True, members=[teacher.model, simclr.model])


def test_bad_options_are_named():
    with pytest.raises(OptionError, match="option 'augment': expected one of light, strong, got 'none'"):
        reuse_run.run("selfsup", quiet=True, augment="none")
    with pytest.raises(OptionError, match="unknown option 'label_budget'"):
        reuse_run.run("selfsup", quiet=True, label_budget=5)
    with pytest.raises(OptionError, match="option 'temperature': must be > 0"):
        reuse_run.run("selfsup", quiet=True, temperature=0)
