"""Bodies of the exit heads that read a transformer's token states ``[B, N, D]``: one token or
the mean (DeeBERT, PABEE), the LGViT pair (a convolution on the patch grid, attention pooling).

A transformer's residual stream is not normalised (pre-norm blocks), so every token body starts
with a LayerNorm, as the transformer's own classifier does. :mod:`eenn.heads` builds the heads
(``token``, ``lgvit_local``, ``lgvit_global``, and ``linear`` on tokens) from these.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AttentionPool", "TokenGridConv", "TokenPool", "token_grid"]


def token_grid(num_tokens: int) -> tuple[int, int, bool] | None:
    """``(height, width, has_class_token)`` when ``num_tokens`` tokens are a square patch grid,
    possibly after one class token (49 -> 7x7; 50 -> class token + 7x7); else None."""
    for extra in (0, 1):
        side = int(round((num_tokens - extra) ** 0.5))
        if side > 0 and side * side == num_tokens - extra:
            return side, side, bool(extra)
    return None


class TokenPool(nn.Module):
    """LayerNorm over the width, then one token (``index``; the class token at 0, as DeeBERT's
    and PABEE's heads read it) or, with ``index=None``, the mean over all tokens, or over the
    tokens ``keep`` marks (``[B, N]`` bool: not padding) when it is given."""

    takes_keep = True  # an exit head passes it the padding mask (attach_exits(pad_id=...))

    def __init__(self, dim: int, index: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.index = index

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        x = self.norm(x)
        if self.index is not None:
            return x[:, self.index]
        if keep is None:
            return x.mean(dim=1)
        w = keep.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)  # a row of padding only (bucket rows) gives 0


class TokenGridConv(nn.Module):
    """LGViT-style local perception [our reading of Xu et al. 2023]: the patch tokens laid back
    on their grid (a class token, if any, left out), a depthwise 3x3 convolution with a
    pointwise one, GELU, and global average pooling."""

    def __init__(self, dim: int, grid: tuple[int, int], skip: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.grid, self.skip = tuple(grid), int(skip)
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pointwise = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x[:, self.skip:])
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, *self.grid)
        x = self.act(self.pointwise(self.depthwise(x)))
        return x.mean(dim=(2, 3))


class AttentionPool(nn.Module):
    """LGViT-style global aggregation [ours in the details]: ``heads`` learned queries attend
    over all tokens, or those ``keep`` marks (one query per head, keys and values from a linear
    map of the normalised tokens); the heads' results are concatenated and projected."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"attention pooling needs a head count that divides the width {dim}, got {heads}")
        self.norm = nn.LayerNorm(dim)
        self.heads = heads
        self.query = nn.Parameter(torch.randn(heads, dim // heads) * (dim // heads) ** -0.5)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    takes_keep = True

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        h = self.heads
        k, v = self.kv(self.norm(x)).reshape(b, n, 2, h, d // h).unbind(2)  # [B, N, H, D/H] each
        scores = torch.einsum("bnhc,hc->bhn", k, self.query)  # the query carries the 1/sqrt scale
        if keep is not None:  # padded tokens get no weight (the lowest finite score: no NaN on a padding-only row)
            scores = scores.masked_fill(~keep.unsqueeze(1), torch.finfo(scores.dtype).min)
        out = torch.einsum("bhn,bnhc->bhc", scores.softmax(dim=-1), v)
        return self.proj(out.reshape(b, d))
