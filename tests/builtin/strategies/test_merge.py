"""merge end to end on tiny digits: specialists fine-tuned from one parent to digits 0-4 and 5-9,
merged with stacked heads into one 10-class model; lineage; λ selected on validation; the options
a method does not take, and models that do not share the base or the architecture."""
from __future__ import annotations

import pytest
import torch

from reuse_core import run as reuse_run
from reuse_core.combine import SCALE_GRID, MergeError, merge, stack_heads
from reuse_core.store import format_lineage
from reuse_core.strategy import OptionError

FT = dict(epochs=1, label_budget=10, seed=0)


@pytest.fixture(scope="module")
def family(store, tmp_path_factory):
    """(parent on all ten digits, its fine-tunings to 0-4 and to 5-9)."""
    def run(strategy, **kw):
        return reuse_run.run(strategy, store=store, run_dir=tmp_path_factory.mktemp(strategy), quiet=True, **kw).model

    parent = run("pretrain", backbone="small-cnn", epochs=1, label_budget=10, lr=0.1)
    return (parent, run("finetune", model=parent, classes=["0-4"], **FT),
            run("finetune", model=parent, classes=["5-9"], **FT))


def test_specialists_merge_into_one_model_over_the_union_of_their_classes(store, family):
    parent, low, high = family
    result = reuse_run.run("merge", store=store, quiet=True, base=parent, models=[low, high], method="ties",
                           density=0.5, select_scale=True, name="merged")
    m = result.metrics
    manifest = store.manifest(result.model)
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["backbone"] == "small-cnn"
    assert manifest["lineage"]["parents"] == [low, high, parent] and manifest["lineage"]["strategy"] == "merge"
    lineage = store.lineage(result.model)
    assert set(lineage["ancestors"]) == {low, high, parent}
    tree = format_lineage(lineage)
    assert all(i in tree for i in (low, high, parent)) and tree.count("merged") == 3  # under each parent
    assert m["stacked_heads"] and m["method"] == "ties" and m["density"] == 0.5
    assert [r["scale"] for r in m["scale_sweep"]] == list(SCALE_GRID) and m["scale"] in SCALE_GRID
    best = max(r["val_accuracy"] for r in m["scale_sweep"])
    assert m["val_accuracy"] == pytest.approx(best, abs=1e-9)
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["ensemble_test_accuracy"] <= 1
    assert len(m["models_test_accuracy"]) == 2
    # white box: the layers below the head are the combine.merge of the specialists, the head their stack
    states = {i: store.load(i)[0] for i in (parent, low, high)}
    body = {i: {k: v for k, v in s.items() if not k.startswith("head.")} for i, s in states.items()}
    want = merge(body[parent], [body[low], body[high]], "ties", density=0.5, scale=m["scale"])
    head, _ = stack_heads([{k[5:]: v for k, v in states[i].items() if k.startswith("head.")} for i in (low, high)],
                          [store.manifest(i)["classes"] for i in (low, high)])
    got = store.load(result.model)[0]
    for k, v in {**want, **{f"head.{k}": v for k, v in head.items()}}.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_models_with_the_base_s_classes_merge_their_heads_too(store, family):
    parent, _, _ = family
    a, b = (reuse_run.run("finetune", store=store, quiet=True, model=parent, lr=lr, **FT).model for lr in (0.05, 0.1))
    result = reuse_run.run("merge", store=store, quiet=True, base=parent, models=[a, b], method="task-arithmetic",
                           scale=0.7)
    assert not result.metrics["stacked_heads"] and result.metrics["scale"] == 0.7
    states = [store.load(i)[0] for i in (parent, a, b)]
    got = store.load(result.model)[0]
    torch.testing.assert_close(got["head.weight"], states[0]["head.weight"] + 0.7 * sum(
        s["head.weight"] - states[0]["head.weight"] for s in states[1:]))
    slerped = reuse_run.run("merge", store=store, quiet=True, models=[a, b], method="slerp", t=0.25)
    assert store.manifest(slerped.model)["lineage"]["parents"] == [a, b] and slerped.metrics["t"] == 0.25


@pytest.mark.parametrize(("options", "message"), [
    (dict(method="task-arithmetic", density=0.3), "option 'density' belongs to ties, not to method 'task-arithmetic'"),
    (dict(method="ties", drop=0.3), "option 'drop' belongs to dare-linear and dare-ties"),
    (dict(method="linear", select_scale=True), "option 'select_scale': λ scales task vectors"),
    (dict(method="ties", select_scale=True, scale=0.5), "--select-scale chooses λ itself"),
    (dict(method="dare-ties", base=None), "option 'base' is required by method 'dare-ties'"),
    (dict(method="slerp"), "slerp takes no base"),
    (dict(method="ties", weights=["1"]), "option 'weights': 1 given for 2 models"),
    (dict(method="ties", weights=["1", "x"]), "option 'weights': could not convert string to float: 'x'"),
    (dict(method="ties", density=0), r"option 'density': must be in \(0, 1\]"),
    (dict(method="mean"), "option 'method': expected one of linear"),
])
def test_bad_options_name_the_option(store, family, options, message):
    parent, low, high = family
    given = {"base": parent, "models": [low, high], **options}
    if given["base"] is None:
        del given["base"]
    with pytest.raises(OptionError, match=message):
        reuse_run.run("merge", store=store, quiet=True, **given)


def test_refuses_models_that_do_not_share_the_base_or_the_architecture(store, family):
    parent, low, high = family
    stranger = reuse_run.run("pretrain", store=store, quiet=True, backbone="small-cnn", classes=["5-9"], epochs=1,
                             label_budget=5).model
    with pytest.raises(MergeError, match=f"model {stranger} does not descend from the base {parent}"):
        reuse_run.run("merge", store=store, quiet=True, base=parent, models=[low, stranger], method="ties")
    mlp = reuse_run.run("pretrain", store=store, quiet=True, backbone="mlp", classes=["5-9"], epochs=1,
                        label_budget=5).model
    with pytest.raises(MergeError, match=f"model {mlp} is a mlp"):
        reuse_run.run("merge", store=store, quiet=True, models=[low, mlp], method="linear")
