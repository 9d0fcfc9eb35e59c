"""Hugging Face model of a LANG-JEPA text encoder (shipped inside every ``--format hf`` export;
it imports only ``torch`` and ``transformers``).

The same computation as ``lang_jepa.models.TextEncoder``, with the same parameter names: token
embedding (plus learned positions, or rotary positions in attention), pre-LN blocks
(``x + attn(ln(x))``, ``x + mlp(ln(x))``, tanh-GELU MLP), a final LayerNorm. It runs ordinary
padded attention: ``attention_mask`` marks the real tokens of each row, the keys a query may
attend (the packed-batch attention of training is not needed to read one text per row).
``last_hidden_state`` is the final token features; a sentence embedding is their mean over the
real tokens (sentence-transformers' mean pooling), as LANG-JEPA pools its training targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_lang_jepa import LangJepaConfig


def _rope(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, keys: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        mask = None if keys is None else keys[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, keys: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, keys)
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    def __init__(self, c: LangJepaConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(c.hidden_size, c.num_attention_heads, c.mlp_ratio, c.layer_norm_eps)
            for _ in range(c.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class LangJepaPreTrainedModel(PreTrainedModel):
    config_class = LangJepaConfig
    base_model_prefix = "lang_jepa"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class LangJepaModel(LangJepaPreTrainedModel):
    """``forward(input_ids, attention_mask)`` -> ``BaseModelOutput(last_hidden_state [B, N, D])``.

    Rows are right- or left-padded; positions count the real tokens of each row from 0.
    """

    def __init__(self, config: LangJepaConfig) -> None:
        super().__init__(config)
        if config.position_embedding not in ("rope", "learned"):
            raise ValueError(
                f"position_embedding must be rope or learned, got {config.position_embedding!r}"
            )
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_emb = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding == "learned"
            else None
        )
        self.stack = Stack(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple[Tensor]:
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        if position_ids is None:
            position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        position_ids = torch.where(valid, position_ids, 0)
        x = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        else:
            head_dim = self.config.hidden_size // self.config.num_attention_heads
            rope = _rope(position_ids, head_dim, self.config.rope_theta)
        for block in self.stack.blocks:
            x = block(x, rope, valid)
        x = self.stack.norm(x)
        if return_dict is False:
            return (x,)
        return BaseModelOutput(last_hidden_state=x)
