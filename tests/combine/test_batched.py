"""BatchedMembers: K members trained as one model end exactly where K separate trainings end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reuse_core.combine import BatchedMembers, member_loss


def small_cnn(seed: int, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6) if norm else nn.Identity(), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


def train(model, loss_fn, data, optimizer: str):
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2))
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()


# With batch norm, the bias of the convolution before it gets a gradient of pure rounding noise
# (the norm cancels it), which Adam scales up to full steps: that case runs with SGD only.
@pytest.mark.parametrize(("optimizer", "norm"), [("sgd", False), ("adamw", False), ("sgd", True)],
                         ids=["sgd", "adamw", "sgd-batchnorm"])
def test_batched_training_matches_separate_members(gen, optimizer, norm):
    data = [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(12)]
    seeds = torch.randint(0, 2**31, (3,), generator=gen).tolist()
    separate = [small_cnn(s, norm) for s in seeds]
    batched = BatchedMembers([small_cnn(s, norm) for s in seeds])
    for m in separate:
        train(m, F.cross_entropy, data, optimizer)
    train(batched, member_loss, data, optimizer)
    for k, (alone, together) in enumerate(zip(separate, batched.unstack())):
        a, t = alone.state_dict(), together.state_dict()
        assert a.keys() == t.keys()
        for name in a:
            torch.testing.assert_close(t[name], a[name], rtol=0, atol=1e-5, msg=lambda m: f"member {k} {name}: {m}")
        x = data[0][0]
        alone.eval(), together.eval()
        torch.testing.assert_close(together(x), alone(x), rtol=0, atol=1e-5)


def test_forward_stacks_member_outputs_and_unstack_round_trips(gen):
    members = [small_cnn(s) for s in range(4)]
    batched = BatchedMembers(members)
    x = torch.randn(7, 1, 8, 8, generator=gen)
    out = batched(x)
    assert out.shape == (4, 7, 5)
    for k, m in enumerate(members):
        torch.testing.assert_close(out[k], m(x), rtol=1e-5, atol=1e-6)
    copies = batched.unstack()
    assert all(type(c) is type(members[0]) for c in copies)
    assert all(p.device.type == "cpu" for c in copies for p in c.parameters())


def test_member_loss_gives_each_member_its_own_gradient(gen):
    members = [small_cnn(s) for s in range(2)]
    batched = BatchedMembers(members)
    x, y = torch.randn(9, 1, 8, 8, generator=gen), torch.randint(0, 5, (9,), generator=gen)
    member_loss(batched(x), y).backward()
    for k, m in enumerate(members):
        F.cross_entropy(m(x), y).backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(getattr(batched, name.replace(".", "__")).grad[k], p.grad, rtol=1e-5, atol=1e-6)


def test_refuses_members_of_different_architectures():
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(ValueError, match="member 1 .* architecture"):
        BatchedMembers([small_cnn(0), other])
    with pytest.raises(ValueError, match="at least one member"):
        BatchedMembers([])
