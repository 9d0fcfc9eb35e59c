"""The masked-language-model control (``objective=mlm``): the same encoder, data, windows and
compute budget as LANG-JEPA, but predicting masked *tokens* instead of sentence embeddings.

Without it nobody can tell whether predicting in concept space helped. BERT's recipe: 15% of the
valid tokens are chosen; 80% of those become [MASK], 10% a random token, 10% stay; the loss is
cross-entropy on the chosen positions. The output head is a separate linear layer (not tied to the
embedding: a tied head reads the embedding weight outside its module, which ZeRO-3 does not
gather), so the control has V x D more parameters in its head; its encoder is identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..data.windows import stable_hash63
from ..metrics import stream_flops
from ..models import TextEncoder
from .base import Batch, Outputs, Runtime, batch_segments, move_batch, parameter_count
from .jepa import build_models


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


def head_flops(model: nn.Module, batch: Batch) -> Tensor:
    """Forward FLOPs of a model's output head (``model.head``) at the batch's predicted positions."""
    return 2.0 * model.encoder.dim * model.head.out_features * batch["mlm_valid"].sum()


def mlm_step_flops(model: MLM, batch: Batch, recompute: bool) -> tuple[Tensor, Tensor]:
    """(model FLOPs, hardware FLOPs) of one MLM micro-batch: encoder forward and backward over the
    full window plus the output head at the predicted positions."""
    enc_fwd = stream_flops(model.encoder, batch, "full", batch["valid"].sum(1).float())
    model_flops = 3.0 * (enc_fwd + head_flops(model, batch))
    return model_flops, model_flops + enc_fwd if recompute else model_flops


def mask_token_id(shard_dir: str) -> int:
    """The [MASK] id of the shards' tokenizer (the MLM control needs one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(shard_dir) / "tokenizer"))
    if tok.mask_token_id is None:
        raise ConfigError(
            f"config key 'objective': mlm needs a tokenizer with a mask token; "
            f"{shard_dir}/tokenizer has none"
        )
    return int(tok.mask_token_id)


class MLMObjective:
    """``objective=mlm``: BERT's masked-token prediction on the JEPA encoder (the control)."""

    name: ClassVar[str] = "mlm"
    target = None

    def __init__(self, cfg: Config, vocab_size: int, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.mask_id = mask_token_id(cfg.data.shards)
        # the same encoder initialisation as the JEPA run of this seed (its predictor is dropped)
        jepa, _ = build_models(cfg, vocab_size)
        self.module = MLM(jepa.encoder, vocab_size, cfg.model.norm_eps)

    def prepare(self, batch: dict[str, Any], split: str, key: tuple[int, ...]) -> Batch:
        """The token corruption, seeded by (seed, split, key) so a resumed run draws the same."""
        gen = torch.Generator().manual_seed(
            stable_hash63(f"mlm-{split}", self.cfg.train.seed, *key)
        )
        masked = mlm_mask(
            batch, self.mask_id, self.cfg.model.vocab_size, self.cfg.loss.mlm_prob, gen
        )
        return move_batch(masked, self.rt.device)

    def loss(self, eng: Any, batch: Batch) -> tuple[Tensor, Outputs]:
        with self.rt.phase("forward"):  # 1-2. the encoder reads the corrupted window
            logits = eng(batch)
        with self.rt.phase("loss"):  # 3. token cross-entropy at the chosen positions
            loss = mlm_loss(logits, batch)
        return loss, Outputs(parts={"mlm_loss": loss.detach()})

    def flops(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return mlm_step_flops(self.module, batch, self.cfg.model.activation_checkpointing)

    def after_step(self, eng: Any, step: int) -> None:
        return None  # no target to follow

    def monitor(self, outputs: Outputs) -> dict[str, Tensor | float]:
        return {}  # no sentence embeddings to watch

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        return {}  # the predictor metrics do not apply; the offline suite scores the encoder

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing per rank beyond the engine

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def summary(self) -> str:
        n_enc = parameter_count(self.module.encoder)
        n_head = parameter_count(self.module) - n_enc
        return f"encoder {n_enc / 1e6:.1f}M params, MLM head {n_head / 1e6:.1f}M params"
