"""The concept decoder: a small causal transformer that turns a frozen sentence embedding back into
the sentence's tokens.

Conditioning is by **prefix**: the embedding (layer-normed, so encoders of any scale fit) is
projected to ``prefix`` vectors that sit before the tokens, and every token attends to them
through ordinary causal self-attention. A prefix keeps the decoder one pre-LN block stack (the
encoder's own :class:`~lang_jepa.models.layers.BlockStack`, RoPE positions over prefix + tokens)
with no cross-attention modules, and the sentence embedding is a single vector, for which
cross-attention would attend over one key only.

Sequences are ``[prefix x P] [BOS] t_1 .. t_n``; the logits at ``BOS, t_1 .. t_n`` predict
``t_1 .. t_n, EOS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .layers import BlockStack, init_weights, rope_cos_sin

DECODER_FIELDS = ("concept_dim", "vocab_size", "dim", "depth", "heads", "mlp_ratio", "prefix",
                  "max_len", "norm_eps", "rope_theta")  # fmt: skip


class ConceptDecoder(nn.Module):
    """forward(concept [N, Dc], input_ids [N, T], valid [N, T]) -> logits [N, T, V].

    ``input_ids`` start with BOS; ``valid`` masks the padding at each row's end.
    """

    def __init__(
        self,
        concept_dim: int,
        vocab_size: int,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        prefix: int = 4,
        max_len: int = 64,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder dim {dim} is not a multiple of its heads {heads}")
        self.concept_dim, self.vocab_size, self.dim = concept_dim, vocab_size, dim
        self.depth, self.heads, self.mlp_ratio = depth, heads, mlp_ratio
        self.prefix, self.max_len, self.norm_eps, self.rope_theta = (
            prefix,
            max_len,
            norm_eps,
            rope_theta,
        )
        self.to_prefix = nn.Linear(concept_dim, prefix * dim)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.stack = BlockStack(dim, depth, heads, mlp_ratio, norm_eps)
        self.head = nn.Linear(dim, vocab_size)  # untied: ZeRO-3 gathers a module's own weights only
        init_weights(self, init_std)
        # after init_weights, which fills every LayerNorm's affine weights
        self.concept_norm = nn.LayerNorm(concept_dim, eps=norm_eps, elementwise_affine=False)

    def config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in DECODER_FIELDS}

    def forward(self, concept: Tensor, input_ids: Tensor, valid: Tensor) -> Tensor:
        n, t = input_ids.shape
        p = self.prefix
        x = torch.cat(
            (self.to_prefix(self.concept_norm(concept.float()).to(self.to_prefix.weight.dtype))
             .view(n, p, self.dim),
             self.tok_emb(input_ids)), dim=1,
        )  # fmt: skip
        positions = torch.arange(p + t, device=x.device)[None].expand(n, -1)
        rope = rope_cos_sin(positions, self.dim // self.heads, self.rope_theta)
        keys = torch.cat((valid.new_ones(n, p), valid), dim=1)  # [N, P + T]
        causal = torch.ones(p + t, p + t, dtype=torch.bool, device=x.device).tril()
        h = self.stack(x, rope, causal[None] & keys[:, None, :])
        return self.head(h[:, p:])


def build_decoder(fields: Mapping[str, Any]) -> ConceptDecoder:
    """A decoder from its :meth:`ConceptDecoder.config` (an export's ``decoder`` section)."""
    return ConceptDecoder(**{k: fields[k] for k in DECODER_FIELDS})


def sentence_rows(
    input_ids: Tensor, tgt_index: Tensor, tgt_sent: Tensor, tgt_valid: Tensor, max_tokens: int
) -> tuple[Tensor, Tensor, int]:
    """The batch's target sentences as rows: (ids [N, Lmax] 0-padded, lengths [N], truncated).

    A sentence is the tokens of one ``tgt_sent`` number in one row, in window order; the first
    ``max_tokens`` are kept (``truncated`` counts the sentences that were longer)."""
    rows, lengths, truncated = [], [], 0
    for i in range(input_ids.shape[0]):
        idx, sent = tgt_index[i][tgt_valid[i]], tgt_sent[i][tgt_valid[i]]
        if idx.numel() == 0:
            continue
        ids = input_ids[i, idx]
        bounds = torch.nonzero(torch.diff(sent), as_tuple=False).flatten() + 1
        for piece in torch.tensor_split(ids, bounds.tolist()):
            truncated += int(piece.numel() > max_tokens)
            rows.append(piece[:max_tokens])
            lengths.append(min(piece.numel(), max_tokens))
    if not rows:
        return input_ids.new_zeros(0, 1), input_ids.new_zeros(0), 0
    out = input_ids.new_zeros(len(rows), max(lengths))
    for r, piece in enumerate(rows):
        out[r, : piece.numel()] = piece
    return out, torch.tensor(lengths, dtype=torch.long), truncated


def teacher_forcing(ids: Tensor, lengths: Tensor, bos: int, eos: int) -> dict[str, Tensor]:
    """Decoder inputs ``[BOS] t_1..t_n`` and labels ``t_1..t_n [EOS]`` (-100 on padding)."""
    n, lmax = ids.shape
    ar = torch.arange(lmax + 1)[None]
    valid = ar < (lengths[:, None] + 1)  # BOS + n tokens
    inputs = torch.cat((ids.new_full((n, 1), bos), ids), dim=1)
    labels = torch.cat((ids, ids.new_zeros(n, 1)), dim=1)
    labels = labels.scatter(1, lengths[:, None], eos)
    labels = torch.where(valid, labels, -100)
    inputs = torch.where(valid, inputs, 0)
    return {"dec_input_ids": inputs, "dec_labels": labels, "dec_valid": valid}
