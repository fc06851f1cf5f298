"""Multi-head attention layer on the fused attention op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import attention


class FusedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` on the fused attention kernel (:func:`reuse_core.ops.attention`).

    Same constructor, forward signature, parameters and ``state_dict`` keys as
    ``nn.MultiheadAttention`` (it is a subclass), so weights load in both directions; the
    differences:

    * ``need_weights`` defaults to False (True needs the slower path); ``batch_first`` defaults to
      False, as in the parent, so (L, B, E) inputs mean what they mean there;
    * ``is_causal=True`` alone is enough for a causal mask (top-left: query i sees keys j <= i);
      given together with an ``attn_mask``, the mask is taken to be that causal mask, the hint's
      meaning in PyTorch;
    * the fused path serves self- and cross-attention with a bool ``key_padding_mask`` (True =
      ignore) and/or ``is_causal``. The slower path, ``nn.MultiheadAttention``'s own (an
      (Lq, Lk) matrix per head), is taken when the attention weights are asked for
      (``need_weights=True``, e.g. to look at attention maps), for an ``attn_mask`` without
      ``is_causal``, a float ``key_padding_mask``, ``dropout > 0`` while training, and
      ``add_bias_kv`` / ``add_zero_attn``.

    A query whose keys are all masked gets a zero output (``nn.MultiheadAttention`` gives NaN).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)

    def _fused_ok(self, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
        return (not need_weights and (attn_mask is None or is_causal)
                and (key_padding_mask is None or key_padding_mask.dtype == torch.bool)
                and not (self.training and self.dropout > 0)
                and self.bias_k is None and not self.add_zero_attn)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._fused_ok(key_padding_mask, need_weights, attn_mask, is_causal):
            if is_causal and attn_mask is None:  # PyTorch wants the mask itself with the hint
                seq = -2 if self.batch_first or query.dim() == 2 else 0
                attn_mask = torch.ones(query.shape[seq], key.shape[seq], dtype=torch.bool, device=query.device).triu(1)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        E, H = self.embed_dim, self.num_heads
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one projection for q, k and v
                q, k, v = F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            else:
                wq, wk, wv = self.in_proj_weight.chunk(3)
                q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        else:
            q = F.linear(query, self.q_proj_weight, bq)
            k = F.linear(key, self.k_proj_weight, bk)
            v = F.linear(value, self.v_proj_weight, bv)
        B, Lq = q.shape[0], q.shape[1]
        # (B, L, E) -> (B, H, L, E/H) views; the kernel takes them as they are
        q, k, v = (x.unflatten(-1, (H, E // H)).transpose(1, 2) for x in (q, k, v))
        out = attention(q, k, v, causal=is_causal, key_padding_mask=key_padding_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, E))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None
