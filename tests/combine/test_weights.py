"""Member weights (uniform, accuracy-proportional, learned through the fused op) and majority vote."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reuse_core.combine import accuracy_weights, choose_weights, learn_weights, majority_vote, member_accuracies


def two_members(gen, n=400, c=6):
    """Member 0 knows the answer (its logits point at the target), member 1 guesses."""
    y = torch.randint(0, c, (n,), generator=gen)
    good = torch.randn(n, c, generator=gen) + 3.0 * F.one_hot(y, c)
    noise = 3.0 * torch.randn(n, c, generator=gen)
    return torch.stack([good, noise]), y


@pytest.mark.parametrize("mode", ["probs", "log_probs", "logits"])
def test_learned_weights_move_toward_the_better_member(gen, mode):
    logits, y = two_members(gen)
    w = learn_weights(logits, y, mode=mode)
    assert w.shape == (2,) and bool((w >= 0).all())
    assert abs(float(w.sum()) - 1) < 1e-6
    assert w[0] > 0.8, f"weights {w.tolist()} did not move toward the better member (0)"
    # starting from a point that favours the worse member, they still move the right way
    w_bad_start = learn_weights(logits, y, mode=mode, init=torch.tensor([0.1, 0.9]))
    assert w_bad_start[0] > 0.5


def test_accuracy_weights_are_proportional(gen):
    logits, y = two_members(gen)
    acc = member_accuracies(logits, y)
    w = accuracy_weights(acc)
    torch.testing.assert_close(w, torch.tensor(acc) / sum(acc))
    with pytest.raises(ValueError, match="positive sum"):
        accuracy_weights([0.0, 0.0])
    torch.testing.assert_close(choose_weights("uniform", logits, y), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="weighting must be one of"):
        choose_weights("best", logits, y)


def test_majority_vote_counts_weighted_votes_and_breaks_ties_low(gen):
    c = 4
    # three members voting 2, 2, 1 on every row, with random logits otherwise
    logits = torch.randn(3, 5, c, generator=gen)
    for k, cls in enumerate([2, 2, 1]):
        logits[k, :, cls] = 10.0
    shares = majority_vote(logits)
    torch.testing.assert_close(shares[:, 2], torch.full((5,), 2 / 3))
    assert (shares.argmax(-1) == 2).all()
    # weight the lone member heavily: it wins
    assert (majority_vote(logits, torch.tensor([1.0, 1.0, 5.0])).argmax(-1) == 1).all()
    # a 1-1 tie goes to the lower class index
    assert (majority_vote(logits[1:]).argmax(-1) == 1).all()
