"""Vision transformers for small images: a patch embedding, pre-norm encoder blocks, a class
token, trained from scratch.

Every encoder block is a stage (the first also embeds the patches), so exits see token states
``(tokens, width)``: the exit heads for those are ``linear`` (mean over tokens), ``token`` (class
token), ``lgvit_local`` and ``lgvit_global``. The defaults suit 28x28 grey and 32x32 RGB
images: 4x4 patches (49 or 64 of them plus the class token), width 64, 6 blocks of 4 heads.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..heads import TokenPool
from ._layers import check_width
from .base import Backbone, register_backbone

__all__ = ["EncoderBlock", "PatchEmbed", "vit"]


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches -> ``dim``-wide tokens, a class token in
    front (optional), learned position embeddings."""

    def __init__(self, in_channels: int, dim: int, patch: int, grid: tuple[int, int], class_token: bool) -> None:
        super().__init__()
        self.dim, self.num_patches = dim, grid[0] * grid[1]
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + int(class_token), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        # In ONNX a reshape to constant sizes is one node; flatten(2) computes its shape from the
        # input's at run time (five nodes, a sizeable share of a small ViT's time at batch 1).
        x = x.reshape(-1, self.dim, self.num_patches) if torch.onnx.is_in_onnx_export() else x.flatten(2)
        x = x.transpose(1, 2)  # [B, N, D]
        if self.cls is None:
            return x + self.pos
        # cat([class token, x]) + pos, written as a zero row in front plus (pos with the class
        # token added to its first row): the same sums, and in ONNX a Pad instead of the
        # Shape/Expand/Concat chain that expanding the class token to the batch takes.
        return F.pad(x, (0, 0, 1, 0)) + (self.pos + F.pad(self.cls, (0, 0, 0, self.num_patches)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))`` (GELU).
    Attention is ``scaled_dot_product_attention``, which picks the fused kernel it can."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit: the width {dim} must be a multiple of the head count {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # a constant: otherwise ONNX computes it from shapes per call
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        if torch.onnx.is_in_onnx_export():  # constant sizes: a Reshape each, not a shape computation per call
            b, n, d = -1, int(n), int(d)
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, H, N, D/H]
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_backbone("vit")
def vit(
    *,
    in_channels: int,
    num_classes: int,
    input_size: tuple[int, int],
    patch_size: int | None = None,
    dim: int = 64,
    depth: int = 6,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    class_token: bool = True,
    width: float = 1.0,
) -> Backbone:
    """A ViT: patch embedding, ``depth`` encoder blocks (each a stage, named ``block0``...),
    then LayerNorm and a linear classifier on the class token (or on the mean of the tokens when
    ``class_token=False``). ``patch_size`` defaults to 4 (2 for inputs under 16 px) and must
    divide the input size. ``width`` scales ``dim`` (kept a multiple of ``heads``), as for the
    other families."""
    check_width(width)
    h, w = input_size
    patch = int(patch_size or (4 if min(h, w) >= 16 else 2))
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"vit: patch_size {patch} must divide the input size {h}x{w}; pick one that does")
    if depth < 1 or dim < 1 or heads < 1 or mlp_ratio <= 0:
        raise ValueError(f"vit: need depth, dim, heads >= 1 and mlp_ratio > 0; got {depth}, {dim}, {heads}, {mlp_ratio}")
    if width != 1.0:  # a scaled width stays a multiple of the head count
        dim = max(heads, round(dim * width / heads) * heads)
    embed = PatchEmbed(in_channels, dim, patch, (h // patch, w // patch), class_token)
    blocks = [EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)]
    stages: list[nn.Module] = [nn.Sequential(embed, blocks[0]), *blocks[1:]]
    classifier = nn.Sequential(TokenPool(dim, 0 if class_token else None), nn.Linear(dim, num_classes))
    for m in (*stages, classifier):
        _init(m)
    return Backbone(stages, classifier, input_shape=(in_channels, h, w), stage_names=[f"block{i}" for i in range(depth)])

