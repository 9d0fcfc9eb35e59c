"""The masked-language-model control (``objective=mlm``): the same encoder, data, windows and
compute budget as LANG-JEPA, but predicting masked *tokens* instead of sentence embeddings.

Without it nobody can tell whether predicting in concept space helped. BERT's recipe: 15% of the
valid tokens are chosen; 80% of those become [MASK], 10% a random token, 10% stay; the loss is
cross-entropy on the chosen positions. The output head is a separate linear layer (not tied to the
embedding: a tied head reads the embedding weight outside its module, which ZeRO-3 does not
gather), so the control has V x D more parameters in its head; its encoder is identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import TextEncoder
from .objective import batch_segments

Batch = dict[str, Tensor]


def mlm_mask(
    batch: Batch, mask_id: int, vocab_size: int, prob: float, generator: torch.Generator
) -> Batch:
    """A pure function: the batch plus ``mlm_input_ids`` [B, L], ``mlm_index``/``mlm_valid``/
    ``mlm_labels`` [B, K] (K = most chosen positions in a row; padding has valid False)."""
    ids, valid = batch["input_ids"], batch["valid"]
    b, n = ids.shape
    chosen = (torch.rand(b, n, generator=generator) < prob) & valid
    chosen[:, 0] |= valid[:, 0] & ~chosen.any(1)  # at least one position per non-empty row
    roll = torch.rand(b, n, generator=generator)
    random_ids = torch.randint(0, vocab_size, (b, n), generator=generator)
    corrupted = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    k = max(int(chosen.sum(1).max()), 1)
    # stable sort puts chosen positions first, in order
    order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices[:, :k]
    index_valid = torch.arange(k)[None] < chosen.sum(1, keepdim=True)
    out = dict(batch)
    out.update(
        mlm_input_ids=corrupted,
        mlm_index=torch.where(index_valid, order, 0),
        mlm_valid=index_valid,
        mlm_labels=torch.where(index_valid, ids.gather(1, order), -100),
    )
    return out


class MLM(nn.Module):
    """Encoder + token-prediction head. forward(batch) -> logits [B, K, V] at ``mlm_index``."""

    def __init__(self, encoder: TextEncoder, vocab_size: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.encoder = encoder
        self.head_norm = nn.LayerNorm(encoder.dim, eps=norm_eps)
        self.head = nn.Linear(encoder.dim, vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> Tensor:
        feats = self.encoder(
            batch["mlm_input_ids"], batch["position_ids"], batch["valid"],
            batch_segments(batch, "full"),
        )  # fmt: skip
        picked = feats.gather(1, batch["mlm_index"][..., None].expand(-1, -1, feats.shape[-1]))
        return self.head(self.head_norm(picked))


def mlm_loss(logits: Tensor, batch: Batch) -> Tensor:
    """Mean cross-entropy over the chosen positions (fp32)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100
    )
