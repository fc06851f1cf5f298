"""reuse_core.nn.DistillationLoss: the module is the functional op with stored settings."""
from __future__ import annotations

import pytest
import torch

from reuse_core.nn import DistillationLoss
from reuse_core.ops import distill_kl_loss
from reuse_core.ops.reference import distill_kl_loss_reference

from ..conftest import assert_close_to_ref, assert_equal, device_params, dispatched, leaf, randn


def _inputs(gen, device, shape=(3, 7, 113)):
    s = randn(shape, gen, device=device, scale=2.0)
    t = randn(shape, gen, device=device, scale=2.0)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    labels[0, :2] = -1
    return s, t, labels.to(device)


SETTINGS = [
    dict(),
    dict(temperature=4.0, kd_weight=0.9, ce_weight=0.1, ignore_index=-1, reduction="batchmean"),
    dict(temperature=0.5, kd_weight=1.0, ce_weight=0.5, ignore_index=-1, reduction="none"),
    dict(temperature=2.0, kd_weight=0.3, reduction="sum"),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=["defaults", "hinton", "none", "sum"])
@pytest.mark.parametrize("device", device_params())
def test_module_matches_functional(device, kw, gen):
    s, t, labels = _inputs(gen, device)
    loss_fn = DistillationLoss(**kw)
    lab = labels if kw.get("ce_weight") or kw.get("ignore_index") is not None else None
    a1, a2 = leaf(s), leaf(s)
    with dispatched("distill_kl", device=device):
        out = loss_fn(a1, t, lab)
    ref = distill_kl_loss(a2, t, lab, **kw)
    assert_equal(out, ref, "loss, module vs functional")
    out.sum().backward()
    ref.sum().backward()
    assert_equal(a1.grad, a2.grad, "grad student, module vs functional")
    r64 = distill_kl_loss_reference(s.double(), t.double(), lab, **kw)
    assert_close_to_ref(out, r64, dtype=torch.float32, name="loss")


@pytest.mark.parametrize("device", device_params())
def test_mutual_learning(device, gen):
    """Both networks learn from each other: the teacher input gets a gradient too."""
    s, t, labels = _inputs(gen, device)
    loss_fn = DistillationLoss(temperature=3.0, kd_weight=1.0, ce_weight=0.2, ignore_index=-1)
    a, b = leaf(s), leaf(t)
    loss_fn(a, b, labels).backward()
    ra, rb = leaf(s, torch.float64), leaf(t, torch.float64)
    distill_kl_loss_reference(ra, rb, labels, temperature=3.0, ce_weight=0.2, ignore_index=-1).backward()
    assert_close_to_ref(a.grad, ra.grad, dtype=torch.float32, name="grad student")
    assert_close_to_ref(b.grad, rb.grad, dtype=torch.float32, name="grad teacher")


def test_module_has_no_state_and_reprs():
    m = DistillationLoss(temperature=4.0, kd_weight=0.9, ce_weight=0.1, ignore_index=-1, reduction="sum")
    assert list(m.parameters()) == [] and list(m.buffers()) == [] and m.state_dict() == {}
    r = repr(m)
    for part in ("temperature=4.0", "kd_weight=0.9", "ce_weight=0.1", "ignore_index=-1", "reduction='sum'"):
        assert part in r


def test_module_bad_settings_surface_clear_errors(gen):
    s, t, _ = _inputs(gen, "cpu")
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)(s, t)
    with pytest.raises(ValueError, match="reduction"):
        DistillationLoss(reduction="avg")(s, t)
    with pytest.raises(ValueError, match="labels"):
        DistillationLoss(ce_weight=0.5)(s, t)


def test_module_trains_student_toward_teacher(gen):
    """A few SGD steps on the module's loss move a student's logits toward the teacher's."""
    torch_gen = gen
    t = randn((16, 10), torch_gen, scale=2.0)
    s = torch.nn.Parameter(randn((16, 10), torch_gen, scale=2.0))
    loss_fn = DistillationLoss(temperature=2.0, reduction="sum")
    opt = torch.optim.SGD([s], lr=0.5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(s, t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("device", device_params())
def test_module_under_compile(device, gen):
    s, t, labels = _inputs(gen, device)
    loss_fn = DistillationLoss(temperature=2.0, ce_weight=0.3, ignore_index=-1)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    a1, a2 = leaf(s), leaf(s)
    out_c = compiled(a1, t, labels)
    out_e = loss_fn(a2, t, labels)
    out_c.backward()
    out_e.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-7, msg=lambda m: f"loss, compiled vs eager: {m}")
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-6, atol=1e-7,
                               msg=lambda m: f"grad student, compiled vs eager: {m}")
