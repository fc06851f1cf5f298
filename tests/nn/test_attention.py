"""reuse_core.nn.FusedMultiheadAttention against nn.MultiheadAttention with the same weights,
state_dict both ways, the documented slower path; the attention backbone (vit-tiny) built on it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reuse_core.nn import FusedMultiheadAttention

from ..conftest import assert_all, device_params, dispatched, randn


def pair(E=32, H=4, device="cpu", **kw):
    """A FusedMultiheadAttention and an nn.MultiheadAttention(batch_first=True) with equal weights."""
    torch.manual_seed(0)
    fused = FusedMultiheadAttention(E, H, batch_first=True, **kw).to(device)
    ref = nn.MultiheadAttention(E, H, batch_first=True, **kw).to(device)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def close(a, b, name, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def causal_mask(Lq, Lk, device):
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).triu(1)


CASES = {
    # name: (self attention?, key padding mask?, causal?, module kwargs)
    "self": (True, False, False, {}),
    "self-causal": (True, False, True, {}),
    "self-padding": (True, True, False, {}),
    "cross-padding": (False, True, False, {}),
    "cross-kdim-vdim": (False, False, False, dict(kdim=24, vdim=40)),
    "no-bias": (True, True, True, dict(bias=False)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", device_params())
def test_matches_multihead_attention(device, case, gen):
    self_attn, padded, causal, kw = CASES[case]
    fused, ref = pair(device=device, **kw)
    B, Lq, Lk = 3, 11, 11 if self_attn else 17
    q = randn((B, Lq, 32), gen, device=device)
    k = q if self_attn else randn((B, Lk, kw.get("kdim", 32)), gen, device=device)
    v = q if self_attn else randn((B, Lk, kw.get("vdim", 32)), gen, device=device)
    mask = None
    if padded:
        mask = torch.rand(B, Lk, generator=gen) < 0.3
        mask[:, 0] = False  # nn.MultiheadAttention gives NaN for a query with no key
        mask = mask.to(device)
    with dispatched("attention", "attention_backward", device=device):
        out, w = fused(q, k, v, key_padding_mask=mask, is_causal=causal)
        out.sum().backward()
    assert w is None
    want, _ = ref(q, k, v, key_padding_mask=mask, attn_mask=causal_mask(Lq, Lk, device) if causal else None,
                  need_weights=False)
    want.sum().backward()
    close(out, want, "output")
    for (name, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        close(p.grad, pr.grad, f"grad {name}", tol=1e-4)


def test_state_dict_both_ways():
    for kw in ({}, dict(kdim=8, vdim=12), dict(bias=False)):
        fused = FusedMultiheadAttention(16, 2, **kw)
        ref = nn.MultiheadAttention(16, 2, batch_first=True, **kw)
        assert list(fused.state_dict()) == list(ref.state_dict())
        ref.load_state_dict(fused.state_dict())  # fused -> torch
        for a, b in zip(fused.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)
        torch.nn.init.normal_(ref.out_proj.weight)
        fused.load_state_dict(ref.state_dict())  # torch -> fused
        assert torch.equal(fused.out_proj.weight, ref.out_proj.weight)


def test_slower_path_weights_and_masks(gen):
    """need_weights, an arbitrary attn_mask, a float key_padding_mask and dropout take
    nn.MultiheadAttention's own path; the results match it."""
    fused, ref = pair()
    x = randn((2, 9, 32), gen)
    out, w = fused(x, x, x, need_weights=True)
    want, want_w = ref(x, x, x, need_weights=True)
    close(out, want, "output")
    close(w, want_w, "weights")
    out, w = fused(x, x, x, need_weights=True, average_attn_weights=False, is_causal=True)
    assert w.shape == (2, 4, 9, 9)
    assert_all(w[..., causal_mask(9, 9, "cpu")] == 0, "causal weights above the diagonal are 0")
    attn_mask = torch.randn(9, 9, generator=gen)
    close(fused(x, x, x, attn_mask=attn_mask)[0], ref(x, x, x, attn_mask=attn_mask)[0], "float attn_mask")
    fmask = torch.zeros(2, 9).masked_fill(torch.rand(2, 9, generator=gen) < 0.3, -torch.inf)
    fmask[:, 0] = 0
    close(fused(x, x, x, key_padding_mask=fmask)[0], ref(x, x, x, key_padding_mask=fmask)[0], "float padding mask")
    drop = FusedMultiheadAttention(32, 4, dropout=0.5, batch_first=True)
    torch.manual_seed(1)
    a = drop(x, x, x)[0]
    torch.manual_seed(1)
    b = nn.MultiheadAttention.forward(drop, x, x, x, need_weights=False)[0]
    close(a, b, "dropout in training")
    drop.eval()
    with dispatched("attention"):
        drop(x, x, x)  # no dropout in eval: the fused path


def test_unbatched_and_sequence_first(gen):
    fused, ref = pair()
    x = randn((7, 32), gen)
    close(fused(x, x, x)[0], ref(x, x, x, need_weights=False)[0], "unbatched")
    seq_first = FusedMultiheadAttention(32, 4)  # the parent's default: (L, B, E)
    assert seq_first.batch_first is False
    seq_first.load_state_dict(fused.state_dict())
    xs = randn((7, 3, 32), gen)
    with dispatched("attention"):
        out = seq_first(xs, xs, xs)[0]
    close(out, ref(xs.transpose(0, 1), xs.transpose(0, 1), xs.transpose(0, 1), need_weights=False)[0].transpose(0, 1),
          "batch_first=False")


def test_fully_masked_query_is_zero_not_nan(gen):
    fused, _ = pair()
    x = randn((2, 5, 32), gen)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    out, _ = fused(x, x, x, key_padding_mask=mask)
    assert_all(torch.isfinite(out), "finite output", out)
    torch.testing.assert_close(out[1], fused.out_proj.bias.expand(5, 32))  # attention 0, then the output bias


def test_compile_fullgraph(gen):
    fused, _ = pair()
    x = randn((2, 13, 32), gen)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: fused(t, t, t, is_causal=True)[0], fullgraph=True, backend="aot_eager")
    close(compiled(x), fused(x, x, x, is_causal=True)[0], "compiled")
    torch._dynamo.reset()
