"""reuse_core.nn.EnsembleAverage: softmax-parametrised weights, fixed or learnable."""
from __future__ import annotations

import pytest
import torch

from reuse_core.nn import EnsembleAverage
from reuse_core.ops import ensemble_average
from reuse_core.ops.reference import ensemble_average_reference

from ..conftest import assert_close_to_ref, assert_equal, device_params, dispatched, leaf, randn


def test_default_weights_are_uniform():
    m = EnsembleAverage(4)
    torch.testing.assert_close(m.weights, torch.full((4,), 0.25))
    assert isinstance(m.weight_logits, torch.nn.Parameter)
    assert m.num_members == 4 and m.mode == "probs"
    assert "num_members=4" in repr(m) and "mode='probs'" in repr(m)


def test_init_weights():
    m = EnsembleAverage(3, init_weights=[1.0, 3.0, 0.0])
    w = m.weights.detach()
    # a zero starts at 1e-3 of the total (a softmax weight's gradient scales with the weight)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75, 1e-3]) / 1.001, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    fixed = EnsembleAverage(3, learnable=False, init_weights=[1.0, 3.0, 0.0]).weights
    torch.testing.assert_close(fixed, torch.tensor([0.25, 0.75, 0.0]), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [[1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0]])
def test_bad_init_weights(bad):
    with pytest.raises(ValueError, match="init_weights"):
        EnsembleAverage(3, init_weights=bad)


def test_bad_num_members():
    with pytest.raises(ValueError, match="num_members"):
        EnsembleAverage(0)


def test_bad_mode_is_a_clear_error(gen):
    with pytest.raises(ValueError, match="mode"):
        EnsembleAverage(2, mode="softmax")(randn((2, 3, 5), gen))


def test_fixed_weights_are_a_buffer(gen):
    m = EnsembleAverage(2, learnable=False, init_weights=[0.3, 0.7])
    assert list(m.parameters()) == []
    assert "fixed_weights" in dict(m.named_buffers()) and "fixed_weights" in m.state_dict()
    z = randn((2, 4, 9), gen).requires_grad_()
    m(z).sum().backward()
    assert z.grad is not None and m.fixed_weights.grad is None


@pytest.mark.parametrize("mode", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("device", device_params())
def test_forward_and_grads_match_reference(device, mode, gen):
    """The module is ensemble_average with weights = softmax(weight_logits); gradients reach
    the members and the free parameters."""
    m = EnsembleAverage(3, mode=mode, init_weights=[0.2, 0.5, 0.3]).to(device)
    z = randn((3, 6, 41), gen, device=device, scale=2.0)
    members = [leaf(x) for x in z.unbind(0)]
    g = randn((6, 41), gen, device=device)
    with dispatched("ensemble_average", "ensemble_average_backward", device=device):
        y = m(members)
        y.backward(g)
    assert_equal(y.detach(), ensemble_average([x.detach() for x in members], m.weights.detach(), mode=mode),
                 "output, module vs functional")

    wl = m.weight_logits.detach().double().cpu().requires_grad_()
    rz = z.detach().double().cpu().requires_grad_()
    ry = ensemble_average_reference(rz, torch.softmax(wl, 0), mode=mode)
    ry.backward(g.double().cpu())
    assert_close_to_ref(y, ry, dtype=torch.float32, name="output")
    assert_close_to_ref(torch.stack([x.grad for x in members]), rz.grad, dtype=torch.float32, name="grad members")
    assert_close_to_ref(m.weight_logits.grad, wl.grad, dtype=torch.float32, name="grad weight_logits",
                        scale_floor=float(g.abs().sum()) * max(1.0, float(z.abs().max())))


@pytest.mark.parametrize("device", device_params())
def test_learns_to_trust_the_better_member(device, gen):
    """log_probs mode + NLL: member 0 predicts the labels, member 1 is noise. A few SGD steps
    on the weights alone move the weight of member 0 up, monotonically, well past uniform."""
    N, C = 64, 10
    labels = torch.randint(0, C, (N,), generator=gen)
    good = randn((N, C), gen) + 4.0 * torch.nn.functional.one_hot(labels, C)
    noise = randn((N, C), gen, scale=2.0)
    z = torch.stack([good, noise]).to(device)
    labels = labels.to(device)
    m = EnsembleAverage(2, mode="log_probs").to(device)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    history = [m.weights[0].item()]
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.nll_loss(m(z), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        history.append(m.weights[0].item())
    assert history[0] == pytest.approx(0.5)
    assert all(b > a for a, b in zip(history, history[1:])), history
    assert history[-1] > 0.8, history
    assert losses[-1] < losses[0]


def test_a_zero_initial_weight_can_grow(gen):
    """Initialised to zero (1e-3 of the total), the better member's weight gets a gradient that
    raises it, and plain SGD steps do raise it."""
    N, C = 64, 10
    labels = torch.randint(0, C, (N,), generator=gen)
    good = randn((N, C), gen) + 4.0 * torch.nn.functional.one_hot(labels, C)
    noise = randn((N, C), gen, scale=2.0)
    z = torch.stack([good, noise])
    m = EnsembleAverage(2, mode="log_probs", init_weights=[0.0, 1.0])
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    w0 = m.weights[0].item()
    assert 0 < w0 <= 1e-3
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.nll_loss(m(z), labels).backward()
        assert m.weight_logits.grad[0] < 0, "descent must raise the better member's logit"
        opt.step()
    assert m.weights[0].item() > w0


@pytest.mark.parametrize("device", device_params())
def test_module_under_compile(device, gen):
    m = EnsembleAverage(3, mode="log_probs").to(device)
    z = randn((3, 5, 21), gen, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out_c = compiled(z)
    out_c.sum().backward()
    gc = m.weight_logits.grad.clone()
    m.weight_logits.grad = None
    out_e = m(z)
    out_e.sum().backward()
    torch._dynamo.reset()
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-7, msg=lambda t: f"output, compiled vs eager: {t}")
    torch.testing.assert_close(gc, m.weight_logits.grad, rtol=1e-5, atol=1e-6,
                               msg=lambda t: f"grad weight_logits, compiled vs eager: {t}")
