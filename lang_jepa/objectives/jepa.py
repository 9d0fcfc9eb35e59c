"""The LANG-JEPA objective: targets from the EMA encoder, predictions from context + predictor,
loss in embedding space, EMA update after each optimizer step.

Batch contract (dict from :func:`lang_jepa.data.masking.collate_rows`; B rows of L tokens):
``input_ids``/``position_ids``/``valid`` [B, L]; ``ctx_index``/``ctx_valid`` [B, Nc] (context
tokens); ``tgt_index``/``tgt_valid``/``tgt_sent`` [B, Nt] (target tokens and their target-sentence
slot); ``tgt_sent_valid`` [B, S]. A packed batch (several windows per row) also carries the
segment bounds that keep its windows apart (``cu_*``/``max_*``, ``pred_order``, ``pred_tgt``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import engine, schedules
from ..config import Config, LossConfig
from ..ema import EmaSync, ema_update
from ..metrics import stream_flops
from ..models import Predictor, TextEncoder, build_encoder, pool_by_slot
from ..models.layers import compile_blocks
from .base import (
    Batch,
    Outputs,
    Runtime,
    autocast_context,
    batch_segments,
    gather_tokens,
    move_batch,
    parameter_count,
)


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
        return self.predict(batch, ids, pos, batch["ctx_valid"])

    def predict(self, batch: Batch, ctx_ids: Tensor, ctx_pos: Tensor, ctx_valid: Tensor) -> Tensor:
        """Predictions [B, S, D] for ``batch``'s target sentences from the given context tokens
        (ids, positions, validity [B, Nc]): the batch's own (:meth:`forward`) or another one (the
        shuffled-context control of the evaluation, on unpacked batches)."""
        ctx_segments = batch_segments(batch, "ctx")
        packing = None
        if ctx_segments is not None:
            packing = (batch["pred_order"], batch["pred_tgt"], batch_segments(batch, "pred"))
        return self.predictor(
            self.encoder(ctx_ids, ctx_pos, ctx_valid, ctx_segments),
            ctx_pos=ctx_pos,
            ctx_valid=ctx_valid,
            tgt_pos=gather_tokens(batch["position_ids"], batch["tgt_index"]),
            tgt_valid=batch["tgt_valid"],
            tgt_sent=batch["tgt_sent"],
            n_slots=batch["tgt_sent_valid"].shape[1],
            packing=packing,
        )


def build_models(cfg: Config, vocab_size: int) -> tuple[JEPA, TextEncoder]:
    """(trainable JEPA, fp32 target encoder initialised as an exact copy of the context encoder)."""
    m, p = cfg.model, cfg.predictor
    encoder = build_encoder(m, vocab_size)  # activation checkpointing as the config says
    predictor = Predictor(
        m.dim, p.dim, p.depth, p.heads, p.mlp_ratio, m.seq_len, m.pos, m.rope_theta, m.norm_eps,
        m.init_std,
    )  # fmt: skip
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
def target_features(
    target_encoder: TextEncoder, batch: Batch, autocast: torch.dtype | None
) -> Tensor:
    """The target encoder's final features of the full window [B, L, D], fp32 (``autocast``:
    the compute dtype, None for fp32)."""
    with autocast_context(batch["input_ids"].device, autocast):
        feats = target_encoder(
            batch["input_ids"], batch["position_ids"], batch["valid"], batch_segments(batch, "full")
        )
    return feats.float()


def pooled_targets(feats: Tensor, batch: Batch) -> Tensor:
    """Target-sentence embeddings [B, S, D] from window features [B, L, D]: each target
    sentence's tokens mean-pooled, then layer-normalised without affine parameters (I-JEPA)."""
    tokens = gather_tokens(feats.float(), batch["tgt_index"])
    pooled = pool_by_slot(
        tokens, batch["tgt_sent"], batch["tgt_valid"], batch["tgt_sent_valid"].shape[1]
    )
    return F.layer_norm(pooled, (pooled.shape[-1],))


def compute_targets(
    target_encoder: TextEncoder, batch: Batch, autocast: torch.dtype | None
) -> Tensor:
    """Target-sentence embeddings [B, S, D], fp32, no grad."""
    return pooled_targets(target_features(target_encoder, batch, autocast), batch)


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


def step_flops(model: JEPA, batch: Batch, recompute: bool) -> tuple[Tensor, Tensor]:
    """(model FLOPs, hardware FLOPs) of one micro-batch, counting valid tokens only.

    Model FLOPs: context encoder + predictor forward and backward (3x forward) plus the target
    encoder's forward over the full window; attention over each window's actual length. Hardware
    FLOPs add the recomputed forward of activation checkpointing.
    """
    enc, pred = model.encoder, model.predictor
    n_win = batch["valid"].sum(1).float()
    n_ctx = batch["ctx_valid"].sum(1).float()
    n_tgt = batch["tgt_valid"].sum(1).float()
    enc_ctx = stream_flops(enc, batch, "ctx", n_ctx)
    enc_win = stream_flops(enc, batch, "full", n_win)
    pred_core = stream_flops(pred, batch, "pred", n_ctx + n_tgt)
    pred_io = 2.0 * enc.dim * pred.dim * (n_ctx.sum() + batch["tgt_sent_valid"].sum())
    forward_trainable = enc_ctx + pred_core + pred_io
    model_flops = 3.0 * forward_trainable + enc_win
    hardware_flops = model_flops + forward_trainable if recompute else model_flops
    return model_flops, hardware_flops  # 0-d tensors on the batch's device (no host sync)


class EmaTarget:
    """The EMA update of a target encoder from the online encoder's fp32 master weights, under
    ZeRO-0..3: a per-tensor lerp when this rank holds every weight whole (one rank, ZeRO-0),
    else :class:`lang_jepa.ema.EmaSync` (owned slices lerped, then all-gathered)."""

    def __init__(self, target: nn.Module, online: nn.Module, rt: Runtime) -> None:
        self.target, self.online, self.rt = target, online, rt
        self.sync: EmaSync | None = None  # the partitioned layout, fixed for the engine's life

    @torch.no_grad()
    def update(self, eng: Any, momentum: float) -> None:
        fragments, partitioned = engine.fp32_fragments(self.online.parameters(), eng.optimizer)
        targets = list(self.target.parameters())
        if not partitioned or self.rt.world == 1:
            ema_update(targets, fragments, momentum)  # no buffer (11x faster on CPU)
            return
        if self.sync is None:
            self.sync = EmaSync(
                targets,
                fragments,
                self.rt.rank,
                self.rt.world,
                engine.dp_all_gather_object,
                engine.dp_all_gather_into_tensor,
            )
        self.sync.update(targets, fragments, momentum)


class JEPAObjective:
    """``objective=jepa``: the I-JEPA recipe over sentences (see the module docstring)."""

    name: ClassVar[str] = "jepa"

    def __init__(self, cfg: Config, vocab_size: int, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.module, target = build_models(cfg, vocab_size)
        self.target: TextEncoder = target.to(rt.device)
        self.ema = EmaTarget(self.target, self.module.encoder, rt)
        self.momentum = math.nan  # of the last EMA update

    def prepare(self, batch: dict[str, Any], split: str, key: tuple[int, ...]) -> Batch:
        return move_batch(batch, self.rt.device)

    def loss(self, eng: Any, batch: Batch) -> tuple[Tensor, Outputs]:
        phase = self.rt.phase
        with phase("targets"):  # 1. targets: EMA encoder on the full window, pooled, no grad
            targets = compute_targets(self.target, batch, self.rt.autocast)
        with phase("forward"):  # 2. context encoder on context tokens only + predictor
            preds = eng(batch)
        with phase("loss"):  # 3. loss in embedding space
            loss, parts = jepa_loss(preds, targets, batch["tgt_sent_valid"], self.cfg.loss)
        return loss, Outputs(preds.detach(), targets, batch["tgt_sent_valid"], parts)

    def flops(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return step_flops(self.module, batch, self.cfg.model.activation_checkpointing)

    def after_step(self, eng: Any, step: int) -> None:
        # 5. EMA update of the target encoder from the fp32 master weights
        self.momentum = schedules.ema_momentum(step, self.cfg.train.max_steps, self.cfg.optim)
        with self.rt.phase("ema"):
            self.ema.update(eng, self.momentum)

    def monitor(self, outputs: Outputs) -> dict[str, Tensor | float]:
        stats = representation_stats(outputs.predictions, outputs.targets, outputs.valid)
        out: dict[str, Tensor | float] = {f"repr/{k}": v for k, v in stats.items()}
        out["train/ema_momentum"] = self.momentum
        return out

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        from ..eval.predictor import quick_eval

        return quick_eval(
            self.module, self.target, list(batches), self.cfg.loss, self.rt.autocast,
            seed=self.cfg.train.seed,
        )  # fmt: skip

    def summary(self) -> str:
        n_enc = parameter_count(self.module.encoder)
        n_pred = parameter_count(self.module) - n_enc
        return f"encoder {n_enc / 1e6:.1f}M params, predictor {n_pred / 1e6:.1f}M params"
