"""The text encoder (context encoder; the EMA target encoder is a copy) and the predictor."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .layers import BlockStack, Segments, init_weights, rope_cos_sin

if TYPE_CHECKING:  # type only: the model code does not read configs
    from lang_jepa.config import ModelConfig

# The encoder's architecture, as ``ModelConfig`` fields (what an export's config.json records)
ENCODER_FIELDS = ("seq_len", "dim", "depth", "heads", "mlp_ratio", "pos", "rope_theta", "norm_eps",
                  "dropout", "init_std", "arch", "max_positions")  # fmt: skip
# fields added after the first export format, with the value every earlier export implies
ENCODER_DEFAULTS = {"arch": "pre_ln", "max_positions": 0}


def pool_by_slot(x: Tensor, slot: Tensor, valid: Tensor, n_slots: int) -> Tensor:
    """Mean of the token features of each slot.

    x [B, N, D], slot [B, N] (slot id in 0..n_slots-1), valid [B, N] -> [B, n_slots, D].
    A slot with no token gets zeros. Computed as a batched matmul with a one-hot pooling matrix.
    Pooling runs in fp32 whatever the input dtype (bf16 cannot count past 256 tokens exactly).
    """
    onehot = torch.nn.functional.one_hot(slot, n_slots).float() * valid[..., None].float()
    counts = onehot.sum(dim=1).clamp(min=1)  # [B, S]
    return (torch.bmm(onehot.transpose(1, 2), x.float()) / counts[..., None]).to(x.dtype)


def _rescale_residual_projections(stack: BlockStack) -> None:
    """Scale each block's output projections by 1/sqrt(2 * layer) (I-JEPA, GPT-2)."""
    for layer, block in enumerate(stack.blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))


class _Checkpointable(nn.Module):
    """``activation_checkpointing`` switches per-block recomputation of the module's ``stack``."""

    stack: BlockStack

    @property
    def activation_checkpointing(self) -> bool:
        return self.stack.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.stack.activation_checkpointing = on


class TextEncoder(_Checkpointable):
    """Pre-LN transformer over token ids with explicit position ids.

    forward(input_ids [B, N], position_ids [B, N], valid [B, N] | None, segments) -> [B, N, D].
    ``N`` may be any subset of a window (the context encoder sees context tokens only): positions
    are the tokens' true positions in the window, so nothing is lost by removing the targets.
    A row holds one window (``valid`` masks its padding) or, in a packed batch, several windows
    kept apart by ``segments`` (block-diagonal attention; ``valid`` is then not needed).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        max_len: int = 512,
        pos: str = "rope",
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        init_std: float = 0.02,
        arch: str = "pre_ln",
    ) -> None:
        super().__init__()
        if pos not in ("rope", "learned"):
            raise ValueError(f"pos must be 'rope' or 'learned', got {pos!r}")
        if arch not in ("pre_ln", "bert"):
            raise ValueError(f"arch must be 'pre_ln' or 'bert', got {arch!r}")
        if arch == "bert" and pos != "learned":
            raise ValueError("arch 'bert' has learned absolute positions: set pos=learned")
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        self.pos, self.rope_theta, self.max_len, self.arch = pos, rope_theta, max_len, arch
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim) if pos == "learned" else None
        # BERT: the token-type embedding (type 0 throughout: one segment) and the embedding norm
        self.type_emb = nn.Embedding(2, dim) if arch == "bert" else None
        self.emb_norm = nn.LayerNorm(dim, eps=norm_eps) if arch == "bert" else None
        self.stack = BlockStack(
            dim, depth, heads, mlp_ratio, norm_eps, dropout, post_ln=arch == "bert"
        )
        self.emb_drop = nn.Dropout(dropout) if arch == "bert" else None
        init_weights(self, init_std)
        _rescale_residual_projections(self.stack)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        valid: Tensor | None = None,
        segments: Segments | None = None,
        grad_from: int = 0,
    ) -> Tensor:
        """``grad_from=k``: the embeddings and blocks below k run without grad (their output is
        a constant to backward); blocks k.. as usual."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad_from == 0):
            x, rope = self._embed(input_ids, position_ids)
        # no `valid.all()` check to drop the mask: it would cost a host sync every forward
        return self.stack(x, rope, segments if segments is not None else valid, grad_from)

    def hidden_states(
        self, input_ids: Tensor, position_ids: Tensor, valid: Tensor | None = None
    ) -> list[Tensor]:
        """``depth + 2`` tensors [B, N, D]: the embedding output, each block's output, and the
        final (normed) output, which is :meth:`forward`'s. For layer-wise analysis (eval only)."""
        x, rope = self._embed(input_ids, position_ids)
        blocks = self.stack.top_layers(x, rope, valid, len(self.stack.blocks), "block")
        return [x, *blocks, self.stack.norm(blocks[-1])]

    def top_layers(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        valid: Tensor | None,
        segments: Segments | None,
        k: int,
        tensor: str,
    ) -> list[Tensor]:
        """The last ``k`` blocks' outputs or FFN outputs [B, N, D] each (see
        :meth:`BlockStack.top_layers`): the target encoder's multi-layer targets."""
        x, rope = self._embed(input_ids, position_ids)
        return self.stack.top_layers(
            x, rope, segments if segments is not None else valid, k, tensor
        )

    def _embed(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Any]:
        x = self.tok_emb(input_ids)
        if self.type_emb is not None:  # BERT: LayerNorm(token + position + type 0)
            x = x + self.pos_emb(position_ids) + self.type_emb.weight[0]
            return self.emb_drop(self.emb_norm(x)), None
        if self.pos_emb is not None:
            return x + self.pos_emb(position_ids), None
        return x, rope_cos_sin(position_ids, self.dim // self.heads, self.rope_theta)


def encoder_config(model_cfg: ModelConfig | Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """The encoder's architecture: :data:`ENCODER_FIELDS` of ``model_cfg`` (a ``ModelConfig``, a
    resolved config's ``model`` dict or an export's ``config.json`` ``model`` section) and
    ``vocab_size``. The export's ``model`` section is this dict."""
    fields = {**ENCODER_DEFAULTS, **_fields(model_cfg)}
    missing = [k for k in ENCODER_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"model config lacks the encoder field(s) {', '.join(missing)}")
    return {"vocab_size": int(vocab_size), **{k: fields[k] for k in ENCODER_FIELDS}}


def build_encoder(model_cfg: ModelConfig | Mapping[str, Any], vocab_size: int) -> TextEncoder:
    """A freshly initialised :class:`TextEncoder` (train mode) of the architecture ``model_cfg``
    describes (see :func:`encoder_config`), for ``vocab_size`` token ids; activation checkpointing
    as ``model_cfg.activation_checkpointing`` says (off where the field is absent).

    The one encoder builder: training, export, the Encoder API and the random-init baseline."""
    c = encoder_config(model_cfg, vocab_size)
    encoder = TextEncoder(
        c["vocab_size"], c["dim"], c["depth"], c["heads"], mlp_ratio=c["mlp_ratio"],
        max_len=c["max_positions"] or c["seq_len"], pos=c["pos"], rope_theta=c["rope_theta"],
        norm_eps=c["norm_eps"], dropout=c["dropout"], init_std=c["init_std"], arch=c["arch"],
    )  # fmt: skip
    encoder.activation_checkpointing = bool(_fields(model_cfg).get("activation_checkpointing"))
    return encoder


def _fields(model_cfg: ModelConfig | Mapping[str, Any]) -> Mapping[str, Any]:
    return dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else model_cfg


class Predictor(_Checkpointable):
    """Narrow transformer predicting target-sentence embeddings from context features.

    Input: context features [B, Nc, D] projected down to the predictor width, plus a learned mask
    token at every target token position (with that token's true position), attended jointly.
    Output: the mask-token outputs mean-pooled per target sentence and projected back up,
    [B, S, D]. In a packed batch, ``packing`` = (order [B, Nc + Nt], tgt_at [B, Nt], segments):
    ``order`` rearranges the concatenated (context, mask tokens) so each window's tokens are
    contiguous, ``tgt_at`` says where each mask token went, and ``segments`` keeps windows apart.
    """

    def __init__(
        self,
        enc_dim: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        max_len: int = 512,
        pos: str = "rope",
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        self.rope_theta = rope_theta
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.pos_emb = nn.Embedding(max_len, dim) if pos == "learned" else None
        self.stack = BlockStack(dim, depth, heads, mlp_ratio, norm_eps)
        self.out = nn.Linear(dim, enc_dim)
        init_weights(self, init_std)
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        _rescale_residual_projections(self.stack)

    def forward(
        self,
        ctx: Tensor,
        ctx_pos: Tensor,
        ctx_valid: Tensor,
        tgt_pos: Tensor,
        tgt_valid: Tensor,
        tgt_sent: Tensor,
        n_slots: int,
        packing: tuple[Tensor, Tensor, Segments] | None = None,
        pool: bool = True,
    ) -> Tensor:
        """ctx [B, Nc, D]; ctx_pos/ctx_valid [B, Nc]; tgt_pos/tgt_valid/tgt_sent [B, Nt] ->
        [B, S, D] (``pool``: per target sentence) or [B, Nt, D] (per target token)."""
        b, nt = tgt_pos.shape
        x = torch.cat((self.embed(ctx), self.mask_token.expand(b, nt, -1).to(ctx.dtype)), dim=1)
        pos = torch.cat((ctx_pos, tgt_pos), dim=1)
        mask: Tensor | Segments = torch.cat((ctx_valid, tgt_valid), dim=1)
        if packing is not None:
            order, tgt_at, mask = packing
            x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
            pos = pos.gather(1, order)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = rope_cos_sin(pos, self.dim // self.heads, self.rope_theta)
        x = self.stack(x, rope, mask)
        if packing is None:
            x = x[:, ctx.shape[1] :]
        else:
            x = x.gather(1, tgt_at[..., None].expand(-1, -1, x.shape[-1]))
        if not pool:
            return self.out(x)
        return self.out(pool_by_slot(x, tgt_sent, tgt_valid, n_slots))
