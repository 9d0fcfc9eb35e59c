"""The LANG-JEPA objective: targets from the EMA encoder, predictions from context + predictor, loss.

Batch contract (dict from :func:`lang_jepa.data.masking.collate_rows`; B rows of L tokens):
``input_ids``/``position_ids``/``valid`` [B, L]; ``ctx_index``/``ctx_valid`` [B, Nc] (context
tokens); ``tgt_index``/``tgt_valid``/``tgt_sent`` [B, Nt] (target tokens and their target-sentence
slot); ``tgt_sent_valid`` [B, S]. A packed batch (several windows per row) also carries the
segment bounds that keep its windows apart (``cu_*``/``max_*``, ``pred_order``, ``pred_tgt``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, LossConfig
from .models import Predictor, TextEncoder, pool_by_slot
from .models.layers import Segments, compile_blocks

Batch = dict[str, Tensor]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L] or [B, L, D], index [B, N] -> x at index, [B, N] or [B, N, D]."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def batch_segments(batch: Batch, stream: str) -> Segments | None:
    """The :class:`Segments` of a packed batch's ``full``, ``ctx`` or ``pred`` token stream, or
    None for a batch of one window per row."""
    if f"cu_{stream}" not in batch:
        return None
    shape = {"full": "input_ids", "ctx": "ctx_index", "pred": "pred_order"}[stream]
    return Segments(batch[f"cu_{stream}"], batch[f"max_{stream}"], batch[shape].numel())


class JEPA(nn.Module):
    """The trainable part (handed to DeepSpeed): context encoder + predictor.

    forward(batch) -> predicted target-sentence embeddings [B, S, D]. The context encoder receives
    only the context tokens (gathered by ``ctx_index``) with their true positions: target tokens
    are removed, never merely masked, so nothing of them can reach it.
    """

    def __init__(self, encoder: TextEncoder, predictor: Predictor) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    @staticmethod
    def context_inputs(batch: Batch) -> tuple[Tensor, Tensor]:
        """Context token ids and their true positions [B, Nc]. Padding slots of ``ctx_index``
        (index 0, which may be a target token) get the pad id and position 0, so not even a
        masked-out target id enters the context encoder."""
        pad = ~batch["ctx_valid"]
        ids = gather_tokens(batch["input_ids"], batch["ctx_index"]).masked_fill(pad, 0)
        pos = gather_tokens(batch["position_ids"], batch["ctx_index"]).masked_fill(pad, 0)
        return ids, pos

    def encode_context(self, batch: Batch) -> Tensor:
        """Context features [B, Nc, D]."""
        ids, pos = self.context_inputs(batch)
        return self.encoder(ids, pos, batch["ctx_valid"], batch_segments(batch, "ctx"))

    def forward(self, batch: Batch) -> Tensor:
        ids, pos = self.context_inputs(batch)
        ctx_segments = batch_segments(batch, "ctx")
        packing = None
        if ctx_segments is not None:
            packing = (batch["pred_order"], batch["pred_tgt"], batch_segments(batch, "pred"))
        return self.predictor(
            self.encoder(ids, pos, batch["ctx_valid"], ctx_segments),
            ctx_pos=pos,
            ctx_valid=batch["ctx_valid"],
            tgt_pos=gather_tokens(batch["position_ids"], batch["tgt_index"]),
            tgt_valid=batch["tgt_valid"],
            tgt_sent=batch["tgt_sent"],
            n_slots=batch["tgt_sent_valid"].shape[1],
            packing=packing,
        )


def build_models(cfg: Config, vocab_size: int) -> tuple[JEPA, TextEncoder]:
    """(trainable JEPA, fp32 target encoder initialised as an exact copy of the context encoder)."""
    m, p = cfg.model, cfg.predictor
    encoder = TextEncoder(
        vocab_size, m.dim, m.depth, m.heads, m.mlp_ratio, m.seq_len, m.pos, m.rope_theta,
        m.norm_eps, m.dropout, m.init_std,
    )  # fmt: skip
    predictor = Predictor(
        m.dim, p.dim, p.depth, p.heads, p.mlp_ratio, m.seq_len, m.pos, m.rope_theta, m.norm_eps,
        m.init_std,
    )  # fmt: skip
    encoder.activation_checkpointing = m.activation_checkpointing
    predictor.activation_checkpointing = m.activation_checkpointing
    target = copy.deepcopy(encoder).float().eval()
    target.activation_checkpointing = False
    for param in target.parameters():
        param.requires_grad_(False)
    if m.compile:
        for stack in (encoder.stack, predictor.stack, target.stack):
            compile_blocks(stack)
    return JEPA(encoder, predictor), target


@torch.no_grad()
def compute_targets(
    target_encoder: TextEncoder, batch: Batch, autocast: torch.dtype | None
) -> Tensor:
    """Target-sentence embeddings [B, S, D], fp32.

    The target encoder reads the full window; its final features are mean-pooled over each target
    sentence's tokens, then layer-normalised without affine parameters (I-JEPA).
    """
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
        feats = target_encoder(
            batch["input_ids"], batch["position_ids"], batch["valid"], batch_segments(batch, "full")
        )
    tokens = gather_tokens(feats.float(), batch["tgt_index"])
    pooled = pool_by_slot(
        tokens, batch["tgt_sent"], batch["tgt_valid"], batch["tgt_sent_valid"].shape[1]
    )
    return F.layer_norm(pooled, (pooled.shape[-1],))


def vicreg_term(z: Tensor, cov_weight: float) -> Tensor:
    """VICReg variance hinge (std >= 1 per dimension) + ``cov_weight`` x off-diagonal covariance.

    z [N, D] (the valid predicted sentence embeddings).
    """
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    variance = F.relu(1.0 - std).mean()
    n, d = z.shape
    cov = (z.T @ z) / max(n - 1, 1)
    off_diag = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
    return variance + cov_weight * off_diag / d


def sigreg_term(z: Tensor, generator: torch.Generator | None = None, n_dirs: int = 64) -> Tensor:
    """SIGReg (LeJEPA): Epps-Pulley test of random 1-D projections against a standard normal.

    z [N, D]. Compares the empirical characteristic function of each projection with exp(-t^2/2)
    on a grid of t, weighted by exp(-t^2/2).
    """
    dirs = torch.randn(z.shape[1], n_dirs, generator=generator, device="cpu").to(z.device, z.dtype)
    proj = z @ (dirs / dirs.norm(dim=0, keepdim=True))  # [N, n_dirs]
    t = torch.linspace(0.0, 3.0, 17, device=z.device, dtype=z.dtype)
    phase = proj[..., None] * t  # [N, n_dirs, T]
    ecf_re, ecf_im = phase.cos().mean(0), phase.sin().mean(0)
    target = torch.exp(-0.5 * t**2)
    err = (ecf_re - target).pow(2) + ecf_im.pow(2)
    weight = target * (t[1] - t[0])
    return (err * weight).sum(-1).mean() * z.shape[0]


def jepa_loss(
    pred: Tensor, target: Tensor, slot_valid: Tensor, cfg: LossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean per-sentence loss over valid target slots (+ optional regulariser on predictions).

    pred, target [B, S, D]; slot_valid [B, S]. Returns (loss, {"pred_loss", "reg"}), fp32.
    """
    pred, target = pred.float(), target.float()
    if cfg.type == "smooth_l1":
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=cfg.smooth_l1_beta).mean(-1)
    elif cfg.type == "l2":
        per = (pred - target).pow(2).mean(-1)
    else:  # cosine
        per = 1.0 - F.cosine_similarity(pred, target, dim=-1)
    weights = slot_valid.float()
    pred_loss = (per * weights).sum() / weights.sum().clamp(min=1.0)
    reg = pred_loss.new_zeros(())
    if cfg.reg != "none" and cfg.reg_weight > 0:
        z = pred[slot_valid]
        reg = vicreg_term(z, cfg.vicreg_cov_weight) if cfg.reg == "vicreg" else sigreg_term(z)
    return pred_loss + cfg.reg_weight * reg, {"pred_loss": pred_loss.detach(), "reg": reg.detach()}


@torch.no_grad()
def representation_stats(pred: Tensor, target: Tensor, slot_valid: Tensor) -> dict[str, Tensor]:
    """Collapse monitors on one batch: per-dimension std of targets and predictions (mean over
    dimensions) and the mean prediction-target cosine. Returns 0-d tensors (no host sync)."""
    p, t = pred[slot_valid].float(), target[slot_valid].float()
    if p.shape[0] < 2:
        nan = pred.new_tensor(math.nan, dtype=torch.float32)
        return {"target_std": nan, "pred_std": nan, "pred_target_cos": nan}
    return {
        "target_std": t.std(dim=0).mean(),
        "pred_std": p.std(dim=0).mean(),
        "pred_target_cos": F.cosine_similarity(p, t, dim=-1).mean(),
    }


def effective_rank(z: Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of z [N, D]."""
    z = z.float()
    if z.shape[0] < 2:
        return math.nan
    # same singular values; torch's CPU SVD of a wide matrix (N < D) is ~50x slower
    s = torch.linalg.svdvals(z.T if z.shape[0] < z.shape[1] else z)
    p = s / s.sum().clamp(min=1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def move_batch(batch: dict[str, Any], device: torch.device) -> Batch:
    """Tensors to ``device`` (non-blocking: the loader pins memory)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
    }
