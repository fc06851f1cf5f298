"""The Ensemble module: combination through the fused op, voting, prediction over a loader."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reuse_core.combine import Ensemble, collect_logits, majority_vote
from reuse_core.ops.reference import ensemble_average_reference
from tests.conftest import dispatched


def members(gen, k=3, d=10, c=4):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    # different architectures, same classes
    return [nn.Linear(d, c), nn.Sequential(nn.Linear(d, 7), nn.Tanh(), nn.Linear(7, c)), nn.Linear(d, c)][:k]


@pytest.mark.parametrize("combine", ["logits", "probs", "log_probs", "vote"])
def test_combines_like_the_reference(gen, combine):
    ms = members(gen)
    w = torch.rand(3, generator=gen) + 0.1
    ens = Ensemble(ms, combine=combine, weights=w)
    x = torch.randn(9, 10, generator=gen)
    z = torch.stack([m(x) for m in ms]).detach()
    wn = w / w.sum()
    with torch.no_grad():
        if combine == "vote":
            expected = majority_vote(z, wn).clamp_min(1e-9).log()
            got = ens(x)
        else:
            with dispatched("ensemble_average"):
                got = ens(x)
            mode = "logits" if combine == "logits" else "log_probs"
            expected = ensemble_average_reference(z.double(), wn.double(), mode=mode).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    probs = ens.predict_proba(x).detach()
    torch.testing.assert_close(probs.sum(-1), torch.ones(9))
    assert torch.equal(probs.argmax(-1), got.argmax(-1))


def test_gradient_reaches_every_member(gen):
    ms = members(gen)
    ens = Ensemble(ms, combine="probs")
    ens(torch.randn(5, 10, generator=gen)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in ms for p in m.parameters())


def test_collect_logits_over_a_loader(gen):
    ms = members(gen)
    x, y = torch.randn(37, 10, generator=gen), torch.randint(0, 4, (37,), generator=gen)
    logits, targets = collect_logits(ms, DataLoader(TensorDataset(x, y), batch_size=8))
    assert logits.shape == (3, 37, 4) and torch.equal(targets, y)
    with torch.no_grad():
        torch.testing.assert_close(logits[1], ms[1](x))
    with pytest.raises(ValueError, match="empty"):
        collect_logits(ms, [])


def test_refuses_bad_weights_and_combines(gen):
    ms = members(gen)
    with pytest.raises(ValueError, match="3 non-negative numbers"):
        Ensemble(ms, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="3 non-negative numbers"):
        Ensemble(ms, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="combine must be one of"):
        Ensemble(ms, combine="max")
