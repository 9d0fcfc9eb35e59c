"""``objective=jepa+mlm``: the latent prediction of LANG-JEPA and BERT's token loss on one encoder
(in the spirit of Predict-and-Reconstruct).

By default (``loss.mlm_on=context``) one context forward serves both: 15% (``loss.mlm_prob``) of
the *context* tokens are corrupted BERT-style (80% [MASK], 10% random, 10% kept) before the
context encoder reads them; the predictor predicts the hidden sentences' target embeddings from
those features as in ``jepa``, and an MLM head predicts the corrupted tokens' ids from the same
features. The token loss then never reads a hidden sentence: it predicts ``mlm_prob`` x the
context's share of the window's tokens. ``loss.mlm_on=window``: the context forward reads clean
tokens, and a second forward with gradient reads the whole window corrupted as ``objective=mlm``
corrupts it, the MLM head on its features: the control's token loss beside the latent loss. The
EMA target encoder reads the clean window. Loss: w x the JEPA loss + ``loss.mlm_weight`` x the
token cross-entropy, where w is 0 before step ``loss.latent_start``, rises linearly to 1 over
``loss.latent_ramp`` steps and is 1 after (and always 1 with both at 0, the default; validation
batches use 1). With ``mlm_on=window``, ``loss.latent_grad_from=k`` runs the context forward's
embeddings and blocks below k without grad: the latent loss trains blocks k.. and the predictor,
the token loss every block.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import Config
from ..data.windows import stable_hash63
from .base import Batch, Outputs, Runtime, batch_segments, move_batch, parameter_count
from .jepa import (
    JEPA,
    JEPAObjective,
    candidates,
    first_copies,
    jepa_loss,
    step_flops,
    window_features,
)
from .mlm import head_flops, mask_token_id, mlm_loss, mlm_mask, mlm_step_flops


class JEPAMLM(JEPA):
    """Context encoder + predictor + MLM head. forward(batch) -> (predictions, logits [B, K, V]
    at the corrupted context tokens[, context features]); with online targets (predictions,
    logits, context features or None, window features of the clean window)."""

    def __init__(self, jepa: JEPA, vocab_size: int, norm_eps: float = 1e-6,
                 mlm_on: str = "context", latent_grad_from: int = 0) -> None:  # fmt: skip
        super().__init__(jepa.encoder, jepa.predictor, jepa.level, jepa.projector)
        self.target_cfg, self.online, self.mlm_on = jepa.target_cfg, jepa.online, mlm_on
        self.latent_grad_from = latent_grad_from
        dim = jepa.encoder.dim
        self.head_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> tuple[Tensor, ...]:
        window = self.mlm_on == "window"
        ids, pos = self.context_inputs(batch, key="input_ids" if window else "mlm_input_ids")
        ctx = self.encoder(ids, pos, batch["ctx_valid"], batch_segments(batch, "ctx"),
                           self.latent_grad_from)  # fmt: skip
        preds = self.predict_from(batch, ctx, pos, batch["ctx_valid"], self.level == "sentence")
        if window:  # the corrupted whole window, as the masked-LM control reads it
            feats = self.encoder(batch["mlm_input_ids"], batch["position_ids"], batch["valid"],
                                 batch_segments(batch, "full"))  # fmt: skip
            index = batch["mlm_index"][..., None].expand(-1, -1, feats.shape[-1])
        else:
            feats, index = ctx, batch["mlm_ctx_index"][..., None].expand(-1, -1, ctx.shape[-1])
        logits = self.head(self.head_norm(feats.gather(1, index)))
        if self.online:  # the targets read the clean window
            feats = window_features(self.encoder, batch, None, self.target_cfg)
            return preds, logits, (ctx if self.return_context else None), feats
        return (preds, logits, ctx) if self.return_context else (preds, logits)


def context_mlm_mask(
    batch: Batch, mask_id: int, vocab_size: int, prob: float, generator: torch.Generator
) -> Batch:
    """BERT corruption of the context tokens only: the batch plus ``mlm_input_ids`` [B, L] (the
    window with its chosen context tokens corrupted), ``mlm_labels``/``mlm_valid`` [B, K] and
    ``mlm_ctx_index`` [B, K] (where each chosen token sits in the context stream)."""
    b, n = batch["input_ids"].shape
    ctx_index, ctx_valid = batch["ctx_index"], batch["ctx_valid"]
    in_ctx = torch.zeros(b, n, dtype=torch.int32).scatter_add_(1, ctx_index, ctx_valid.int()) > 0
    out = mlm_mask({**batch, "valid": in_ctx}, mask_id, vocab_size, prob, generator)
    out["valid"] = batch["valid"]
    # window position -> context slot (padding slots of ctx_index go to a dropped extra column)
    nc = ctx_index.shape[1]
    where = torch.where(ctx_valid, ctx_index, n)
    slot = torch.zeros(b, n + 1, dtype=torch.long)
    slot.scatter_(1, where, torch.arange(nc).expand(b, -1))
    out["mlm_ctx_index"] = slot[:, :n].gather(1, out["mlm_index"])
    return out


def latent_weight(step: int, start: int, ramp: int) -> float:
    """The latent loss's weight at optimizer step ``step`` (see the module docstring)."""
    if step < start:
        return 0.0
    return 1.0 if ramp == 0 else min(1.0, (step - start + 1) / ramp)


class JEPAMLMObjective(JEPAObjective):
    """``objective=jepa+mlm``: see the module docstring."""

    name: ClassVar[str] = "jepa+mlm"

    def __init__(self, cfg: Config, vocab_size: int, rt: Runtime) -> None:
        super().__init__(cfg, vocab_size, rt)
        self.mask_id = mask_token_id(cfg.data.shards)
        jepa = self.module
        self.module = JEPAMLM(jepa, vocab_size, cfg.model.norm_eps, cfg.loss.mlm_on,
                              cfg.loss.latent_grad_from)  # fmt: skip
        self.module.return_context = jepa.return_context
        self.ema.online = self.module.encoder

    def prepare(self, batch: dict[str, Any], split: str, key: tuple[int, ...]) -> Batch:
        gen = torch.Generator().manual_seed(
            stable_hash63(f"jepa+mlm-{split}", self.cfg.train.seed, *key)
        )
        corrupt = mlm_mask if self.cfg.loss.mlm_on == "window" else context_mlm_mask
        masked = corrupt(
            batch, self.mask_id, self.cfg.model.vocab_size, self.cfg.loss.mlm_prob, gen
        )
        loss = self.cfg.loss
        w = latent_weight(key[0], loss.latent_start, loss.latent_ramp) if split == "train" else 1.0
        masked["latent_weight"] = torch.tensor(w)
        return move_batch(masked, self.rt.device)

    def loss(self, eng: Any, batch: Batch) -> tuple[Tensor, Outputs]:
        phase = self.rt.phase
        online = self.module.online
        if not online:
            with phase("targets"):
                targets, valid, sentences = self.targets(batch)
        with phase("forward"):
            out = eng(batch)
        preds, logits = out[0], out[1]
        if online:
            targets, valid, sentences = self.targets_from(out[3], batch)
        with phase("loss"):
            context = (out[2], batch["ctx_valid"]) if self.module.return_context else None
            level = self.cfg.target.level
            keep, once = candidates(batch, self.cfg.loss, level), first_copies(batch, level)
            pooled = self.pooled_for_reg(out[3] if online else None, batch)
            latent, parts = jepa_loss(
                preds, targets, valid, self.cfg.loss, context, keep, once, pooled,
                self.negatives(),
            )  # fmt: skip
            self.enqueue(targets, valid, once)
            tokens = mlm_loss(logits, batch)
            weight = batch.get("latent_weight", 1.0)
            loss = weight * latent + self.cfg.loss.mlm_weight * tokens
        parts = {
            **parts,
            "latent_loss": latent.detach(),
            "mlm_loss": tokens.detach(),
            "latent_weight": torch.as_tensor(weight, dtype=torch.float32),
        }
        return loss, self.outputs(preds, sentences, batch, parts)

    def flops(self, batch: Batch) -> tuple[Tensor, Tensor]:
        model_flops, hardware_flops = step_flops(
            self.module, batch, self.cfg.model.activation_checkpointing
        )
        if self.cfg.loss.mlm_on == "window":  # the control's forward, backward and head
            tok_model, tok_hardware = mlm_step_flops(
                self.module, batch, self.cfg.model.activation_checkpointing
            )
        else:  # the head only: the context forward is step_flops'
            tok_model = tok_hardware = 3.0 * head_flops(self.module, batch)
        return model_flops + tok_model, hardware_flops + tok_hardware

    def summary(self) -> str:
        n_enc = parameter_count(self.module.encoder)
        n_head = parameter_count(self.module.head) + parameter_count(self.module.head_norm)
        n_pred = parameter_count(self.module) - n_enc - n_head
        return (
            f"encoder {n_enc / 1e6:.1f}M params, predictor {n_pred / 1e6:.1f}M params, "
            f"MLM head {n_head / 1e6:.1f}M params (weight {self.cfg.loss.mlm_weight}, "
            f"on the {self.cfg.loss.mlm_on})"
        )
