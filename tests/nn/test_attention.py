"""reuse_core.nn.FusedMultiheadAttention against nn.MultiheadAttention with the same weights,
state_dict both ways, the documented slower path; the attention backbone (vit-tiny) built on it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reuse_core import backbone, plugins
from reuse_core.backbone import check_backbone, feature_blocks, replace_head
from reuse_core.builtin.attention_backbone import VisionTransformer, choose_patch_size, vit_tiny
from reuse_core.nn import FusedMultiheadAttention

from ..conftest import assert_all, device_params, dispatched, randn


def pair(E=32, H=4, device="cpu", **kw):
    """A FusedMultiheadAttention and an nn.MultiheadAttention(batch_first=True) with equal weights."""
    torch.manual_seed(0)
    fused = FusedMultiheadAttention(E, H, **kw).to(device)
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
    drop = FusedMultiheadAttention(32, 4, dropout=0.5)
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
    seq_first = FusedMultiheadAttention(32, 4, batch_first=False)
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


# --------------------------------------------------------------------------------------------
# the attention backbone
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,size", [(1, (8, 8)), (3, (32, 32)), (5, (13, 21)), (2, (1, 1))])
def test_vit_any_size_and_channels(channels, size, gen):
    model = vit_tiny(7, channels, image_size=size, dim=32, depth=2, heads=4)
    check_backbone(model)
    assert model.patch_size == choose_patch_size(size)
    x = randn((2, channels) + size, gen)
    with dispatched("attention", "attention_backward"):
        y = model(x)
        y.sum().backward()
    assert y.shape == (2, 7)
    assert all(p.grad is not None for p in model.parameters())
    # sizes other than the one the patch was chosen for work too (edge patches zero-padded)
    assert model(randn((1, channels, size[0] + 3, size[1] + 5), gen)).shape == (1, 7)


def test_vit_head_and_blocks():
    model = vit_tiny(10, 3, depth=3)
    assert model.head_name == "head" and model.block_names == ("patch", "blocks.0", "blocks.1", "blocks.2")
    assert len(feature_blocks(model)) == len(model.block_names)
    head = replace_head(model, 4)
    assert model.head is head and head.out_features == 4
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_vit_registered_and_fine_tunable():
    entry = plugins.backbones().entry("vit-tiny")
    assert entry.plugin == "reuse_core.builtin.backbones" and entry.meta["family"] == "vit"
    model = backbone.build("vit-tiny", num_classes=5, in_channels=1, image_size=8)
    backbone.freeze_features(model, trainable_last_blocks=1)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head", f"blocks.{len(model.blocks) - 1}"}


def test_vit_attention_maps(gen):
    model = vit_tiny(3, 1, image_size=8, dim=16, depth=2, heads=2).eval()
    x = randn((2, 1, 8, 8), gen)
    maps = model.attention_maps(x)
    L = 1 + 8 * 8  # class token + an 8 x 8 grid of 1 x 1 patches
    assert [m.shape for m in maps] == [(2, 2, L, L)] * 2
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, L))
    # the slower path that forms the maps computes what the fused forward computes
    h = model.tokens(x)
    for blk in model.blocks:
        h, _ = blk(h, need_weights=True)
    torch.testing.assert_close(model.head(model.norm(h[:, 0])), model(x), rtol=1e-5, atol=1e-5)


def test_vit_bad_config():
    with pytest.raises(ValueError, match="multiple of heads"):
        VisionTransformer(3, dim=30, heads=4)
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\)"):
        vit_tiny(3, 1)(torch.randn(2, 8))
