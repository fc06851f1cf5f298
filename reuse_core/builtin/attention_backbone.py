"""A small vision transformer on the fused attention layer, for images of any size and channel
count: the attention backbone of the built-in plugin (registered as ``vit-tiny``).

Images are cut into patch x patch squares (zero-padded at the right and bottom edges up to a
multiple of the patch), embedded by a strided convolution, given a class token and fixed 2-D
sine-cosine positions computed for the grid at hand (so no input size is baked into the
weights), then run through pre-norm transformer blocks. ``attention_maps(x)`` returns every
block's attention probabilities.
"""
from __future__ import annotations

import torch
from torch import nn

from reuse_core.backbone import BackboneError
from reuse_core.nn import FusedMultiheadAttention


def choose_patch_size(image_size: int | tuple[int, int] | None, grid: int = 8) -> int:
    """The patch size that cuts an image of ``image_size`` into about ``grid`` x ``grid``
    patches (1 for images up to that size); 4 when the size is not known."""
    if image_size is None:
        return 4
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return max(1, round(min(h, w) / grid))


def sincos_positions(gh: int, gw: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(gh * gw, dim) fixed 2-D sine-cosine position codes (a quarter of dim per sin/cos of y/x)."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    y, x = torch.meshgrid(torch.arange(gh, device=device, dtype=torch.float32),
                          torch.arange(gw, device=device, dtype=torch.float32), indexing="ij")
    ay, ax = y.reshape(-1, 1) * freq, x.reshape(-1, 1) * freq
    pos = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    pos = nn.functional.pad(pos, (0, dim - pos.shape[1]))  # dim not a multiple of 4: zero tail
    return pos.to(dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FusedMultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        h = self.norm1(x)
        a, weights = self.attn(h, h, h, need_weights=need_weights, average_attn_weights=False)
        x = x + a
        return x + self.mlp(self.norm2(x)), weights


class VisionTransformer(nn.Module):
    """ViT: patch embedding, class token, sine-cosine positions, ``depth`` blocks, norm, head.

    config: ``dim`` (64), ``depth`` (4), ``heads`` (4), ``mlp_ratio`` (2.0), ``dropout`` (0.0),
    ``patch_size`` (default: chosen from ``image_size`` for about an 8 x 8 grid, else 4),
    ``image_size`` (int or (h, w), only used to choose the patch size).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, *, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0, dropout: float = 0.0, patch_size: int | None = None,
                 image_size: int | tuple[int, int] | None = None):
        super().__init__()
        if dim % heads:
            raise BackboneError(f"vit: dim ({dim}) must be a multiple of heads ({heads})")
        if depth < 1:
            raise BackboneError(f"vit: depth must be >= 1, got {depth}")
        self.patch_size = int(patch_size) if patch_size is not None else choose_patch_size(image_size)
        if self.patch_size < 1:
            raise BackboneError(f"vit: patch_size must be >= 1, got {patch_size}")
        self.patch = nn.Conv2d(in_channels, dim, self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_name = "head"
        self.block_names = ("patch",) + tuple(f"blocks.{i}" for i in range(depth))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + gh * gw, dim): the class token, then the patches in row-major order."""
        if x.dim() != 4:
            raise BackboneError(f"vit takes images (B, C, H, W), got shape {tuple(x.shape)}")
        p = self.patch_size
        pad_h, pad_w = -x.shape[2] % p, -x.shape[3] % p
        if pad_h or pad_w:
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch(x)  # (B, dim, gh, gw)
        B, dim, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + sincos_positions(gh, gw, dim, x.device, x.dtype)
        return torch.cat([self.cls_token.expand(B, 1, dim).to(x.dtype), x], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        for blk in self.blocks:
            x, _ = blk(x)
        return self.head(self.norm(x[:, 0]))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each block's attention probabilities, (B, heads, L, L) with L = 1 + number of patches
        (token 0 is the class token; row i is where token i looks). Uses the slower path that
        forms the weights."""
        x = self.tokens(x)
        maps = []
        for blk in self.blocks:
            x, w = blk(x, need_weights=True)
            maps.append(w)
        return maps


def vit_tiny(num_classes: int, in_channels: int = 3, **config) -> VisionTransformer:
    """The registered factory: :class:`VisionTransformer` with its defaults."""
    return VisionTransformer(num_classes, in_channels, **config)


__all__ = ["VisionTransformer", "choose_patch_size", "sincos_positions", "vit_tiny"]
