"""cascade end to end on tiny digits: a cheap MLP before the small CNN, calibration, the sweep
files, and the threshold chosen for an accuracy target or a compute budget."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reuse_core import run as reuse_run


@pytest.fixture(scope="module")
def cheap(store, tmp_path_factory):
    return reuse_run.run("pretrain", store=store, run_dir=tmp_path_factory.mktemp("cheap"), quiet=True,
                         backbone="mlp", backbone_config=["hidden=[16]"], classes=["0-4"], epochs=2, lr=0.1)


def test_cascade_for_an_accuracy_target(store, cheap, teacher):
    result = reuse_run.run("cascade", store=store, quiet=True, models=[cheap.model, teacher.model],
                           accuracy_target=0.95)
    m = result.metrics
    assert result.models == [] and m["models"] == [cheap.model, teacher.model]
    cheap_flops, big_flops = m["flops_per_sample"]
    assert 0 < cheap_flops < big_flops
    assert sum(m["test_exits"]) == pytest.approx(1.0)
    # mean compute: the cheap model always runs, the big one for those that go on
    assert m["test_mean_flops"] == pytest.approx(cheap_flops + m["test_exits"][1] * big_flops)
    assert m["compute_vs_expensive"] == pytest.approx(m["test_mean_flops"] / big_flops)
    if m["target_met_on_val"]:
        assert m["val_accuracy"] >= 0.95 * m["expensive_val_accuracy"] - 1e-12
    for c in m["calibration"]:  # (that calibration lowers ECE is tested on a constructed case in tests/combine)
        assert c["temperature"] > 0
        assert all(0 <= c[k] <= 1 for k in ("val_ece_before", "val_ece_after", "test_ece_before", "test_ece_after"))
    run_dir = Path(result.run_dir)
    assert (run_dir / "cascade.png").stat().st_size > 0
    sweep = json.loads((run_dir / "cascade.json").read_text())
    assert sweep["threshold"] == m["threshold"] and len(sweep["test"]) == len(sweep["val"]) >= 2
    assert sweep["test"][-1]["exits"] == [0.0, 1.0]  # the last threshold sends everything on


def test_cascade_for_a_compute_budget(store, cheap, teacher):
    result = reuse_run.run("cascade", store=store, quiet=True, models=[cheap.model, teacher.model],
                           compute_budget=0.5)
    m = result.metrics
    assert m["target_met_on_val"]
    sweep = json.loads((Path(result.run_dir) / "cascade.json").read_text())
    assert sweep["chosen"]["val"]["flops"] <= 0.5 * m["flops_per_sample"][1]
    within = [p for p in sweep["val"] if p["flops"] <= 0.5 * m["flops_per_sample"][1]]
    assert sweep["chosen"]["val"]["accuracy"] == max(p["accuracy"] for p in within)


def test_cascade_refusals(store, cheap, teacher):
    with pytest.raises(ValueError, match="at least 2 models"):
        reuse_run.run("cascade", store=store, quiet=True, models=[cheap.model])
    other = reuse_run.run("pretrain", store=store, quiet=True, backbone="mlp", backbone_config=["hidden=[8]"],
                          classes=["5-9"], epochs=1, label_budget=5)
    with pytest.raises(ValueError, match="models must share their classes"):
        reuse_run.run("cascade", store=store, quiet=True, models=[other.model, teacher.model])
