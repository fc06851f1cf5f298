"""Model soups: uniform and greedy averaging, and the refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reuse_core.combine import Ingredient, SoupError, check_ingredients, greedy_soup, uniform_soup

ARCH = {"backbone": "mlp", "config": {"hidden": [8]}}


def weights(gen, out=3):
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, out))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return m.state_dict()


def test_uniform_soup_averages_floats_and_keeps_counters(gen):
    sds = [weights(gen) for _ in range(3)]
    soup = uniform_soup(sds)
    for k, v in soup.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(sd[k] for sd in sds) / 3)
        else:
            assert torch.equal(v, sds[0][k])


def test_greedy_soup_adds_only_what_improves(gen):
    sds = [weights(gen) for _ in range(4)]
    # held-out "accuracy": how close the soup's first weight is to ingredient 2's (so adding 2 helps
    # when it is not in yet, and the others may or may not)
    target = sds[2]["0.weight"]
    score = lambda sd: -float((sd["0.weight"] - target).abs().mean())  # noqa: E731
    result = greedy_soup(sds, score)
    assert result.chosen[0] == 2  # the best on its own goes first
    assert result.history[0] == {"index": 2, "accuracy": 0.0, "added": True}
    assert result.chosen == [2]  # averaging anything into a perfect score makes it worse
    # a score that likes averages: every ingredient improves it
    mean = uniform_soup(sds)["0.weight"]
    result = greedy_soup(sds, lambda sd: -float((sd["0.weight"] - mean).abs().mean()))
    assert sorted(result.chosen) == [0, 1, 2, 3]
    assert all(h["added"] for h in result.history)
    torch.testing.assert_close(result.state_dict["0.weight"], mean)


def test_refuses_models_without_a_common_parent(gen):
    a = Ingredient("m1", ["p1"], ARCH, weights(gen))
    b = Ingredient("m2", ["p2"], ARCH, weights(gen))
    with pytest.raises(SoupError, match=r"do not share a parent \(m1 <- p1; m2 <- p2\)"):
        check_ingredients([a, b])
    with pytest.raises(SoupError, match="m3 has no parent"):
        check_ingredients([a, Ingredient("m3", [], ARCH, weights(gen))])
    with pytest.raises(SoupError, match="at least 2 models"):
        check_ingredients([a])
    assert check_ingredients([a, Ingredient("m4", ["p1"], ARCH, weights(gen))]) == "p1"


def test_refuses_models_of_other_architectures(gen):
    a = Ingredient("m1", ["p"], ARCH, weights(gen))
    other = Ingredient("m2", ["p"], {"backbone": "small-cnn", "config": {}}, weights(gen))
    with pytest.raises(SoupError, match="m2 has architecture .*small-cnn.* one architecture"):
        check_ingredients([a, other])
    wider_head = Ingredient("m3", ["p"], ARCH, weights(gen, out=5))
    with pytest.raises(SoupError, match="m3's weights differ .* at 2.bias, 2.weight"):
        check_ingredients([a, wider_head])
