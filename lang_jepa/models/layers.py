"""Transformer building blocks: pre-LN blocks over SDPA attention with rotary or learned positions.

Plain torch.nn only: nothing here knows about DeepSpeed, torch.distributed or checkpoint files.
Every module takes explicit position ids, so a gathered subset of a window (the context encoder's
input) keeps the true positions of its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Rotary tables for ``position_ids`` [B, N] -> cos, sin [B, 1, N, head_dim] (fp32)."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    angles = position_ids.float()[..., None] * inv_freq  # [B, N, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, N, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, H, N, hd] by the tables of :func:`rope_cos_sin` (computed in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    With no key mask SDPA can take the flash kernel on GPU; a key-padding mask [B, N] (True = may be
    attended) selects the memory-efficient kernel instead.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, key_mask: Tensor | None
    ) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, eps: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, key_mask: Tensor | None
    ) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, key_mask)
        return x + self.mlp(self.norm2(x))


class BlockStack(nn.Module):
    """``depth`` blocks and a final LayerNorm, each block optionally recomputed in backward."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_ratio: float, eps: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, eps, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.activation_checkpointing = False

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, key_mask: Tensor | None
    ) -> Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, key_mask, use_reentrant=False)
            else:
                x = block(x, rope, key_mask)
        return self.norm(x)


def compile_blocks(stack: BlockStack) -> None:
    """``torch.compile`` every block in place (dynamic shapes: window lengths vary by batch)."""
    for block in stack.blocks:
        block.compile(dynamic=True)


def matmul_params(dim: int, depth: int, mlp_ratio: float) -> int:
    """Weights that take part in a matmul per token, per block stack (biases and norms excluded)."""
    return depth * (4 * dim * dim + 2 * dim * int(dim * mlp_ratio))


def forward_flops_per_token(dim: int, depth: int, mlp_ratio: float, seq: int) -> float:
    """Forward FLOPs for one token of a block stack attending over ``seq`` tokens.

    2 FLOPs per multiply-add of every matmul weight, plus attention's QK^T and AV
    (2 * 2 * seq * dim per layer).
    """
    return 2.0 * matmul_params(dim, depth, mlp_ratio) + 4.0 * depth * seq * dim


def init_weights(module: nn.Module, std: float) -> None:
    """Truncated-normal linear/embedding weights, zero biases, unit LayerNorms (I-JEPA's init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
