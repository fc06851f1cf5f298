"""transfer-curve on tiny digits: a source per seed (or a stored one at its split seed), a
fine-tuning per mode and a scratch model per budget, the JSON, Markdown and PNG, and resuming."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reuse_core import run as reuse_run
from reuse_core.strategy import OptionError

TINY = dict(classes=["5-9"], budgets=[1, 2], epochs=1)


@pytest.fixture(scope="module")
def curve(store, tmp_path_factory):
    return reuse_run.run("transfer-curve", store=store, run_dir=tmp_path_factory.mktemp("curve"), quiet=True,
                         seeds=[0, 1], modes=["full", "linear"], name="tc",
                         source_options=["epochs=1", 'classes=["0-4"]', "batch_size=128"], **TINY)


def test_every_point_is_a_stored_model_with_its_lineage(store, curve):
    m = curve.metrics
    assert m["seeds"] == [0, 1] and m["budgets"] == [1, 2] and m["modes"] == ["full", "linear"]
    sources = m["sources"]
    assert curve.models[:2] == sources and len(curve.models) == 2 + 2 * 2 * 3
    for seed, source in enumerate(sources):
        manifest = store.manifest(source)
        assert manifest["lineage"]["strategy"] == "selfsup" and manifest["name"] == "tc.source"
        assert manifest["metrics"]["training_data"][0]["seed"] == seed
        for k in ("1", "2"):
            for mode in ("full", "linear"):
                tuned = store.manifest(m["models"][mode][k][seed])
                assert tuned["lineage"]["parents"] == [source] and tuned["name"] == f"tc.{mode}-{k}"
                assert tuned["lineage"]["options"]["mode"] == mode and tuned["lineage"]["options"]["seed"] == seed
                assert tuned["metrics"]["train_examples"] == 5 * int(k)
            scratch = store.manifest(m["models"]["scratch"][k][seed])
            assert scratch["lineage"]["parents"] == [] and scratch["backbone"] == "small-cnn"
    for method in ("full", "linear", "scratch"):
        for k in ("1", "2"):
            point = m["methods"][method][k]
            assert len(point["accuracy"]) == 2 and 0 <= point["mean"] <= 1 and m[f"{method}@{k}"] == point["mean"]
    assert m["gains"]["full"]["1"]["gain"] == pytest.approx(
        [a - b for a, b in zip(m["methods"]["full"]["1"]["accuracy"], m["methods"]["scratch"]["1"]["accuracy"])])


def test_it_writes_json_markdown_and_a_plot(curve):
    run_dir = Path(curve.run_dir)
    assert json.loads((run_dir / "transfer_curve.json").read_text())["sources"] == curve.metrics["sources"]
    table = (run_dir / "transfer_curve.md").read_text()
    assert "| labels per class | 1 | 2 |" in table and "| fine-tuned (linear) |" in table
    assert "| gain of fine-tuned (full) |" in table and "| from scratch |" in table
    assert (run_dir / "transfer_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_sweep_trains_and_stores_nothing_again(store, curve):
    run_dir = Path(curve.run_dir)
    (run_dir / "result.json").unlink()  # as if it had been stopped after its last part
    (run_dir / "seed-1" / "scratch-2" / "result.json").unlink()  # ... or that part had not recorded its result
    before = len(store.list())
    again = reuse_run.run("transfer-curve", store=store, run_dir=run_dir, resume=True, quiet=True)
    assert len(store.list()) == before and again.models == curve.models
    assert again.metrics["methods"] == curve.metrics["methods"]


def test_a_stored_source_is_swept_at_its_own_split_seed(store, curve):
    source = curve.metrics["sources"][1]
    result = reuse_run.run("transfer-curve", store=store, quiet=True, model=source, modes=["linear"], **TINY)
    assert result.metrics["seeds"] == [1] and result.metrics["sources"] == [source]
    assert len(result.models) == 2 * 2  # linear and scratch at two budgets; the source is not its product
    with pytest.raises(OptionError, match=f"option 'seeds': model {source} was trained on the split of seed 1"):
        reuse_run.run("transfer-curve", store=store, quiet=True, model=source, seeds=[0], **TINY)
    with pytest.raises(OptionError, match="option 'source_options': it configures --source"):
        reuse_run.run("transfer-curve", store=store, quiet=True, model=source, source_options=["epochs=2"], **TINY)


def test_bad_options_are_named():
    with pytest.raises(OptionError, match=r"option 'budgets': must be >= 1, got \['0'\]"):
        reuse_run.run("transfer-curve", quiet=True, budgets=[0])
    with pytest.raises(OptionError, match="option 'modes': expected fine-tune modes among full, linear, partial, lp-ft"):
        reuse_run.run("transfer-curve", quiet=True, modes=["half"])
