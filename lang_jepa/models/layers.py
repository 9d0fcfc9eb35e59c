"""Transformer building blocks: pre-LN blocks over SDPA attention with rotary or learned positions.

Plain torch.nn only: nothing here knows about DeepSpeed, torch.distributed or checkpoint files.
Every module takes explicit position ids, so a gathered subset of a window (the context encoder's
input) keeps the true positions of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Flash attention over variable-length segments (CUDA, fp16/bf16; torch >= 2.9), imported on first
# use: the module pulls in torch._dynamo, 2-3 s of CPU at the start of every process (each rank,
# each tool) that would otherwise never touch it.
_UNRESOLVED = object()
varlen_attn: Any = _UNRESOLVED


def _varlen_attn() -> Any:
    """``torch.nn.attention.varlen.varlen_attn``, or None where this torch has none."""
    global varlen_attn
    if varlen_attn is _UNRESOLVED:
        try:
            from torch.nn.attention.varlen import varlen_attn as found
        except ImportError:  # pragma: no cover - older torch: the padded SDPA path is used
            found = None
        varlen_attn = found
    return varlen_attn


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


@dataclass(eq=False)
class Segments:
    """Block-diagonal attention over a packed batch: tokens attend only within their segment.

    ``cu_seqlens`` [n + 1] (int32, on the batch's device) are the segment boundaries over the
    ``total`` flattened ``B x N`` tokens of a stream: every token in exactly one segment (padding
    too: ``varlen_attn``'s backward returns NaN gradients for tokens past ``cu_seqlens[-1]``,
    pytorch/pytorch#176793), none empty; ``max_len`` is the longest segment. On CUDA in fp16/bf16, attention runs as one flash
    ``varlen_attn`` call over the unpadded tokens. Elsewhere (CPU, fp32) the segments are gathered
    into a ``[n, max_len]`` padded batch for SDPA and scattered back; the indices for that are
    built here once per forward, shared by every layer, without a host sync.
    """

    cu_seqlens: Tensor
    max_len: int
    total: int
    pad_index: Tensor = field(init=False)  # [n, max_len] flat token of each padded slot (0: pad)
    pad_valid: Tensor = field(init=False)  # [n, max_len] the slot holds a token
    flat_slot: Tensor = field(init=False)  # [total] padded slot (s * max_len + j) of each token

    def __post_init__(self) -> None:
        cu = self.cu_seqlens.long()
        slot = torch.arange(self.max_len, device=cu.device)
        self.pad_valid = slot[None, :] < (cu[1:] - cu[:-1])[:, None]
        self.pad_index = (cu[:-1, None] + slot[None, :]) * self.pad_valid
        token = torch.arange(self.total, device=cu.device)
        seg = torch.searchsorted(cu[1:], token, right=True)
        self.flat_slot = seg * self.max_len + (token - cu[seg])


Mask = Tensor | Segments | None


def use_varlen(q: Tensor, dropout: float) -> bool:
    """Whether :func:`segment_attention` takes flash ``varlen_attn``: CUDA, fp16/bf16, no dropout
    (varlen_attn has none: the padded path handles it)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return q.is_cuda and half and dropout == 0.0 and _varlen_attn() is not None


def segment_attention(q: Tensor, k: Tensor, v: Tensor, seg: Segments, dropout: float) -> Tensor:
    """Attention of q, k, v [T, H, hd] (flattened tokens) within each segment -> [T, H, hd]."""
    if use_varlen(q, dropout):
        cu = seg.cu_seqlens
        return _varlen_attn()(q, k, v, cu, cu, seg.max_len, seg.max_len)
    n, m = seg.pad_index.shape
    pad = [t[seg.pad_index].transpose(1, 2) for t in (q, k, v)]  # [n, H, m, hd]
    out = F.scaled_dot_product_attention(
        *pad, attn_mask=seg.pad_valid[:, None, None, :], dropout_p=dropout
    )
    return out.transpose(1, 2).reshape(n * m, *q.shape[1:])[seg.flat_slot]


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``mask`` is None (every token attends to every token of its row: SDPA may take the flash
    kernel on GPU), a key-padding mask [B, N] (True = may be attended; SDPA's memory-efficient
    kernel), a pair mask [B, N, N] (query i may attend key j), or :class:`Segments` for a packed
    batch (block-diagonal; flash varlen on GPU).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Mask) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, Segments):
            flat = [t.transpose(1, 2).reshape(b * n, self.heads, self.head_dim) for t in (q, k, v)]
            return self.proj(segment_attention(*flat, mask, dropout).reshape(b, n, d))
        # [B, N] keys that may be attended, or [B, N, N] (query, key) pairs (the decoder's causal mask)
        attn_mask = (
            None if mask is None else mask[:, None] if mask.dim() == 3 else mask[:, None, None, :]
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``: tanh-approximated GELU, or the exact (erf) one BERT uses."""

    def __init__(
        self, dim: int, hidden: int, dropout: float = 0.0, exact_gelu: bool = False
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.approximate = "none" if exact_gelu else "tanh"

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``; or post-LN
    (``post_ln``, BERT): ``ln(x + attn(x))``, then ``ln(x + mlp(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, dropout: float = 0.0,
                 post_ln: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.post_ln = post_ln
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout, exact_gelu=post_ln)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Mask) -> Tensor:
        return self.parts(x, rope, mask)[0]

    def parts(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Mask
    ) -> tuple[Tensor, Tensor]:
        """(block output, FFN output before the residual)."""
        if self.post_ln:
            h = self.norm1(x + self.attn(x, rope, mask))
            ffn = self.mlp(h)
            return self.norm2(h + ffn), ffn
        h = x + self.attn(self.norm1(x), rope, mask)
        ffn = self.mlp(self.norm2(h))
        return h + ffn, ffn


class BlockStack(nn.Module):
    """``depth`` blocks and a final LayerNorm (none after post-LN blocks, whose outputs are
    normed already), each block optionally recomputed in backward."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, eps: float,
                 dropout: float = 0.0, post_ln: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, eps, dropout, post_ln) for _ in range(depth)
        )
        self.norm = nn.Identity() if post_ln else nn.LayerNorm(dim, eps=eps)
        self.activation_checkpointing = False

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Mask, grad_from: int = 0
    ) -> Tensor:
        """``grad_from=k``: blocks below k run without grad (see ``TextEncoder.forward``)."""
        grad = torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            with torch.set_grad_enabled(grad and i >= grad_from):
                if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, rope, mask, use_reentrant=False)
                else:
                    x = block(x, rope, mask)
        return self.norm(x)

    def top_layers(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Mask, k: int, tensor: str
    ) -> list[Tensor]:
        """The last ``k`` blocks' outputs (``tensor="block"``) or their FFN outputs before the
        residual (``"ffn"``, data2vec's targets), oldest first; for targets (no recomputation)."""
        out = []
        first = len(self.blocks) - k
        for i, block in enumerate(self.blocks):
            if i < first:
                x = block(x, rope, mask)
                continue
            x, ffn = block.parts(x, rope, mask)
            out.append(ffn if tensor == "ffn" else x)
        return out


def compile_blocks(stack: BlockStack) -> None:
    """``torch.compile`` every block in place (dynamic shapes: window lengths vary by batch)."""
    for block in stack.blocks:
        block.compile(dynamic=True)


def matmul_params(dim: int, depth: int, mlp_ratio: float) -> int:
    """Weights that take part in a matmul per token, per block stack (biases and norms excluded):
    the one count FLOPs per token are derived from (2 FLOPs per weight and token, forward)."""
    return depth * (4 * dim * dim + 2 * dim * int(dim * mlp_ratio))


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
