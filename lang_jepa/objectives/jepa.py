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
from ..config import Config, LossConfig, TargetConfig
from ..ema import EmaSync, ema_update
from ..metrics import stream_flops
from ..models import Predictor, TextEncoder, build_encoder, pool_by_slot
from ..models.layers import compile_blocks, init_weights
from ..pretrained import load_pretrained
from .base import (
    Batch,
    Outputs,
    Runtime,
    autocast_context,
    batch_segments,
    gather_tokens,
    move_batch,
    parameter_count,
    window_rows,
)


class JEPA(nn.Module):
    """The trainable part (handed to DeepSpeed): context encoder + predictor.

    forward(batch) -> predicted target-sentence embeddings [B, S, D]. The context encoder receives
    only the context tokens (gathered by ``ctx_index``) with their true positions: target tokens
    are removed, never merely masked, so nothing of them can reach it.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        predictor: Predictor,
        level: str = "sentence",
        projector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        # target.projector: maps the pooled targets into the loss's space (None: the identity)
        self.projector = projector
        self.level = level  # sentence: [B, S, D] predictions; token: [B, Nt, D]
        self.return_context = False  # forward also returns the context features (loss.reg_on)
        self.target_cfg = TargetConfig()  # what the targets are (the view also sizes the FLOPs)
        # target.source=online: forward also runs this encoder over the window for the targets
        # (with gradient) and returns (predictions, context features or None, window features)
        self.online = False

    @staticmethod
    def context_inputs(batch: Batch, key: str = "input_ids") -> tuple[Tensor, Tensor]:
        """Context token ids (from ``batch[key]``) and their true positions [B, Nc]. Padding
        slots of ``ctx_index`` (index 0, which may be a target token) get the pad id and
        position 0, so not even a masked-out target id enters the context encoder."""
        pad = ~batch["ctx_valid"]
        ids = gather_tokens(batch[key], batch["ctx_index"]).masked_fill(pad, 0)
        if "ctx_pos" in batch:  # mask.queries: hidden sentences renumbered to K positions each
            return ids, batch["ctx_pos"].masked_fill(pad, 0)
        pos = gather_tokens(batch["position_ids"], batch["ctx_index"]).masked_fill(pad, 0)
        return ids, pos

    def encode_context(self, batch: Batch, key: str = "input_ids") -> Tensor:
        """Context features [B, Nc, D] (of the ids in ``batch[key]``)."""
        ids, pos = self.context_inputs(batch, key)
        return self.encoder(ids, pos, batch["ctx_valid"], batch_segments(batch, "ctx"))

    def forward(self, batch: Batch) -> Tensor | tuple[Tensor, ...]:
        ids, pos = self.context_inputs(batch)
        ctx = self.encoder(ids, pos, batch["ctx_valid"], batch_segments(batch, "ctx"))
        preds = self.predict_from(batch, ctx, pos, batch["ctx_valid"], self.level == "sentence")
        if self.online:
            feats = window_features(self.encoder, batch, None, self.target_cfg)
            return preds, (ctx if self.return_context else None), feats
        return (preds, ctx) if self.return_context else preds

    def project(self, x: Tensor) -> Tensor:
        """Target embeddings [..., D] in the loss's space: through ``target.projector``, if any.
        The predictor's outputs already live there."""
        return x if self.projector is None else self.projector(x)

    def predict(self, batch: Batch, ctx_ids: Tensor, ctx_pos: Tensor, ctx_valid: Tensor) -> Tensor:
        """Sentence predictions [B, S, D] for ``batch``'s target sentences from the given context
        tokens (ids, positions, validity [B, Nc]): the batch's own or another one (the
        shuffled-context control of the evaluation, on unpacked batches). A token-level model's
        sentence prediction is the mean of its token predictions."""
        ctx = self.encoder(ctx_ids, ctx_pos, ctx_valid, batch_segments(batch, "ctx"))
        return self.predict_from(batch, ctx, ctx_pos, ctx_valid, pool=True)

    def predict_from(
        self, batch: Batch, ctx: Tensor, ctx_pos: Tensor, ctx_valid: Tensor, pool: bool
    ) -> Tensor:
        """The predictor on context features: [B, S, D] (``pool``) or [B, Nt, D]. Its mask tokens
        sit at the target tokens' positions, or are ``mask.queries`` query tokens per hidden
        sentence (``qry_*``)."""
        packing = None
        if batch_segments(batch, "ctx") is not None:
            packing = (batch["pred_order"], batch["pred_tgt"], batch_segments(batch, "pred"))
        if "qry_pos" in batch:
            tgt_pos, tgt_valid, tgt_sent = batch["qry_pos"], batch["qry_valid"], batch["qry_sent"]
        else:
            tgt_pos = gather_tokens(batch["position_ids"], batch["tgt_index"])
            tgt_valid, tgt_sent = batch["tgt_valid"], batch["tgt_sent"]
        return self.predictor(
            ctx,
            ctx_pos=ctx_pos,
            ctx_valid=ctx_valid,
            tgt_pos=tgt_pos,
            tgt_valid=tgt_valid,
            tgt_sent=tgt_sent,
            n_slots=batch["tgt_sent_valid"].shape[1],
            packing=packing,
            pool=pool,
        )


class Projector(nn.Sequential):
    """``target.projector``: Linear(D, H), LayerNorm, GELU, Linear(H, D). The loss acts on its
    output, so the invariances the loss teaches can stay in it while the encoder's pooled
    embedding (the export) keeps more of its input (SimCLR's projection head)."""

    def __init__(self, dim: int, hidden: int, norm_eps: float = 1e-6, init_std: float = 0.02):
        super().__init__(
            nn.Linear(dim, hidden), nn.LayerNorm(hidden, eps=norm_eps), nn.GELU(),
            nn.Linear(hidden, dim),
        )  # fmt: skip
        init_weights(self, init_std)


def build_models(cfg: Config, vocab_size: int) -> tuple[JEPA, TextEncoder]:
    """(trainable JEPA, fp32 target encoder initialised as an exact copy of the context encoder)."""
    m, p = cfg.model, cfg.predictor
    encoder = build_encoder(m, vocab_size)  # activation checkpointing as the config says
    if m.init_from:  # a BERT-family checkpoint's weights (the architecture was taken from it)
        load_pretrained(encoder, m.init_from)
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
    projector = None
    if cfg.target.projector > 0:
        projector = Projector(m.dim, cfg.target.projector, m.norm_eps, m.init_std)
    model = JEPA(encoder, predictor, cfg.target.level, projector)
    model.target_cfg, model.online = cfg.target, cfg.target.source == "online"
    return model, target


@torch.no_grad()
def target_features(
    target_encoder: TextEncoder,
    batch: Batch,
    autocast: torch.dtype | None,
    tcfg: TargetConfig | None = None,
) -> Tensor:
    """The target encoder's per-token targets of the full window [B, L, D] ([B / M, L, D] under
    ``mask.draws=M``), fp32, no grad (see :func:`window_features`)."""
    return window_features(target_encoder, batch, autocast, tcfg)


def window_features(
    encoder: TextEncoder,
    batch: Batch,
    autocast: torch.dtype | None,
    tcfg: TargetConfig | None = None,
) -> Tensor:
    """Per-token targets of the full window [B, L, D], fp32, with gradient if ``encoder`` has it
    (``target.source=online``). Under ``mask.draws=M`` one row per window, [B / M, L, D]: the
    encoder reads one copy of each window (:func:`window_rows`) and :func:`pooled_targets` /
    :func:`token_targets` read row r // M for batch row r, so the features are never repeated.

    ``target.view=window`` (the default; ``tcfg`` None): every token attends to the window;
    ``sentence``: to its own sentence only (the ``sent`` segments), as when a sentence is embedded
    alone. ``target.tensor=final`` (the default): the encoder's output. ``block`` / ``ffn``: the
    top ``target.layers`` blocks' outputs, or their FFN outputs before the residual, each
    normalised (``target.norm``: layer norm without affine per token, instance norm per channel
    over the row's valid tokens, or none) and then averaged (data2vec)."""
    stream = "full"
    if tcfg is not None and tcfg.view == "sentence":
        if "cu_sent" not in batch:
            raise KeyError("target.view=sentence needs the batch's sentence segments (cu_sent)")
        stream = "sent"
    once = window_rows(batch)  # mask.draws: each window read once for all its draws
    args = (once["input_ids"], once["position_ids"], once["valid"], batch_segments(once, stream))
    with autocast_context(batch["input_ids"].device, autocast):
        if tcfg is None or tcfg.tensor == "final":
            feats = encoder(*args).float()
        else:
            layers = encoder.top_layers(*args, tcfg.layers, tcfg.tensor)
            feats = torch.stack([normalise(x.float(), tcfg.norm, once["valid"]) for x in layers])
            feats = feats.mean(0)
    return feats


def normalise(x: Tensor, kind: str, valid: Tensor) -> Tensor:
    """x [B, N, D]: ``layer`` (per token over D, no affine), ``instance`` (per row and channel
    over the valid tokens; a packed row's windows together) or ``none``."""
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],))
    if kind == "instance":
        w = valid[..., None].to(x.dtype)
        n = w.sum(1, keepdim=True).clamp(min=1.0)
        mean = (x * w).sum(1, keepdim=True) / n
        var = ((x - mean).pow(2) * w).sum(1, keepdim=True) / n
        return (x - mean) * torch.rsqrt(var + 1e-5)
    return x


def pooled_targets(feats: Tensor, batch: Batch) -> Tensor:
    """Target-sentence embeddings [B, S, D] from window features [B, L, D] (one row per window
    under ``mask.draws``): each target sentence's tokens mean-pooled, then layer-normalised
    without affine parameters (I-JEPA)."""
    pooled = pooled_features(feats, batch)
    return F.layer_norm(pooled, (pooled.shape[-1],))


def pooled_features(feats: Tensor, batch: Batch) -> Tensor:
    """Each target sentence's tokens mean-pooled [B, S, D], fp32, before the layer norm of
    :func:`pooled_targets` (what ``loss.reg_on=pooled`` regularises)."""
    tokens = gather_tokens(feats.float(), batch["tgt_index"], batch.get("draws", 1))
    return pool_by_slot(
        tokens, batch["tgt_sent"], batch["tgt_valid"], batch["tgt_sent_valid"].shape[1]
    )


def token_targets(feats: Tensor, batch: Batch) -> Tensor:
    """Per target token [B, Nt, D]: its feature, layer-normalised without affine parameters."""
    tokens = gather_tokens(feats.float(), batch["tgt_index"], batch.get("draws", 1))
    return F.layer_norm(tokens, (tokens.shape[-1],))


def compute_targets(
    target_encoder: TextEncoder,
    batch: Batch,
    autocast: torch.dtype | None,
    tcfg: TargetConfig | None = None,
) -> Tensor:
    """Target-sentence embeddings [B, S, D], fp32, no grad."""
    return pooled_targets(target_features(target_encoder, batch, autocast, tcfg), batch)


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


def infonce(
    pred: Tensor,
    target: Tensor,
    valid: Tensor,
    temperature: float,
    keep: Tensor | None = None,
    extra: Tensor | None = None,
) -> Tensor:
    """Contrastive prediction: each valid prediction is scored (cosine / ``temperature``) against
    every valid target of the micro-batch, its own being the right one; the same window's other
    targets are the hardest negatives. pred, target [B, X, D]; valid [B, X]. ``keep`` [N, N]
    (N = B x X, see :func:`candidates`) narrows the candidates of each prediction (row) to the
    targets (columns) it marks; its diagonal must be set. ``extra`` [Q, D]: negatives for every
    prediction beside the micro-batch's (``loss.queue``'s past targets). Mean cross-entropy over
    the valid predictions that have a negative (fp32); a mean prediction scores log(number of
    candidates)."""
    p = F.normalize(pred.float().flatten(0, 1), dim=-1)
    t = F.normalize(target.float().flatten(0, 1), dim=-1)
    v = valid.flatten()
    logits = (p @ t.T) / temperature
    allowed = v[None, :] if keep is None else v[None, :] & keep
    logits = logits.masked_fill(~allowed, -1e4)  # finite: no NaN when a row has no target
    n_extra = 0
    if extra is not None and len(extra) > 0:
        n_extra = len(extra)
        logits = torch.cat([logits, (p @ F.normalize(extra.float(), dim=-1).T) / temperature], 1)
    ce = F.cross_entropy(logits, torch.arange(len(v), device=v.device), reduction="none")
    w = (v & (allowed.sum(1) + n_extra > 1)).float()  # a prediction with no negative: nothing
    return (ce * w).sum() / w.sum().clamp(min=1.0)


def same_window(groups: Tensor) -> Tensor:
    """[N, N]: slot pairs of one window, from each slot's window [B, X] (``loss.negatives``)."""
    g = groups.flatten()
    return g[:, None] == g[None, :]


def candidates(batch: Batch, cfg: LossConfig, level: str) -> Tensor | None:
    """Which targets each loss slot's InfoNCE scores it against [N, N] (N = the batch's slots,
    sentences or tokens), None for every valid target of the batch. ``loss.negatives=window``:
    the same window's only. ``mask.draws`` > 1: never the same sentence (token) of the same
    window hidden by another draw, whose target is the right one's own copy."""
    keep = None
    if cfg.negatives == "window":
        groups = batch["tgt_sent_win"]
        if level == "token":
            groups = torch.gather(groups, 1, batch["tgt_sent"])
        keep = same_window(groups)
    if batch.get("draws", 1) > 1:
        key = target_keys(batch, level).flatten()
        eye = torch.eye(len(key), dtype=torch.bool, device=key.device)
        copy = (key[:, None] == key[None, :]) & ~eye
        keep = ~copy if keep is None else keep & ~copy
    return keep


def first_copies(batch: Batch, level: str) -> Tensor | None:
    """[B, X]: the loss slots that are their target's first copy under ``mask.draws`` (a
    sentence hidden by several draws of its window counts once in the regulariser on the
    targets and in the monitors); None with one draw."""
    if batch.get("draws", 1) == 1:
        return None
    key = target_keys(batch, level)
    flat = key.flatten()
    earlier = (flat[:, None] == flat[None, :]).tril(-1).any(1)  # an equal key in an earlier slot
    return ~earlier.view_as(key)


def target_keys(batch: Batch, level: str) -> Tensor:
    """One number per loss slot [B, X], equal across the draws of a window for the same target
    (sentence: its first token; token: the token)."""
    draws, length = batch.get("draws", 1), batch["input_ids"].shape[1]
    group = torch.arange(len(batch["input_ids"]), device=batch["input_ids"].device) // draws
    if level == "token":
        token = batch["tgt_index"]
    else:
        fill = torch.where(batch["tgt_valid"], batch["tgt_index"], length)
        token = torch.full(batch["tgt_sent_valid"].shape, length, device=fill.device)
        token = token.scatter_reduce(1, batch["tgt_sent"], fill, "amin")
    return group[:, None] * (length + 1) + token


def reg_sets(cfg: LossConfig) -> tuple[str, ...]:
    """What ``loss.reg`` acts on: ``loss.reg_on`` split at "+" (e.g. ``targets+context``)."""
    return tuple(cfg.reg_on.split("+"))


def jepa_loss(
    pred: Tensor,
    target: Tensor,
    valid: Tensor,
    cfg: LossConfig,
    context: tuple[Tensor, Tensor] | None = None,
    keep: Tensor | None = None,
    once: Tensor | None = None,
    pooled: tuple[Tensor, Tensor] | None = None,
    queue: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over the valid target slots (sentences [B, S] or tokens [B, Nt]), plus InfoNCE
    (``loss.infonce_weight``, or alone with ``loss.type=infonce``) and an optional regulariser on
    the predictions, the targets, the context features (``context``: features [B, Nc, D], valid)
    or the target sentences' pooled features before their layer norm (``pooled``: [B, S, D] and
    the sentences it reads [B, S], see :meth:`JEPAObjective.pooled_for_reg`).
    ``keep``: InfoNCE's candidates (:func:`candidates`), which ``loss.negatives=window`` needs;
    ``once`` [B, X]: the slots the regulariser on the targets reads (:func:`first_copies`);
    ``queue`` [Q, D]: InfoNCE's extra negatives (:class:`TargetQueue`).

    pred, target [B, X, D]; valid [B, X]. Returns (loss, {"pred_loss", "reg"[, "infonce"]}), fp32.
    """
    pred, target = pred.float(), target.float()
    parts: dict[str, Tensor] = {}
    if cfg.negatives == "window" and keep is None:
        raise ValueError("loss.negatives=window needs the candidates of each slot (keep)")
    if cfg.type == "infonce":
        pred_loss = infonce(pred, target, valid, cfg.temperature, keep, queue)
    else:
        if cfg.type == "smooth_l1":
            per = F.smooth_l1_loss(pred, target, reduction="none", beta=cfg.smooth_l1_beta).mean(-1)
        elif cfg.type == "l2":
            per = (pred - target).pow(2).mean(-1)
        else:  # cosine
            per = 1.0 - F.cosine_similarity(pred, target, dim=-1)
        weights = valid.float()
        pred_loss = (per * weights).sum() / weights.sum().clamp(min=1.0)
        if cfg.infonce_weight > 0:
            nce = infonce(pred, target, valid, cfg.temperature, keep, queue)
            parts["infonce"] = nce.detach()
            pred_loss = pred_loss + cfg.infonce_weight * nce
    reg = pred_loss.new_zeros(())
    if cfg.reg != "none" and cfg.reg_weight > 0:
        # each named set gets its own term, all at reg_weight
        for on in reg_sets(cfg):
            if on == "predictions":
                z = pred[valid]
            elif on == "targets":  # with gradient under target.source=online
                z = target[valid if once is None else valid & once]
            elif on == "pooled" and pooled is not None:
                z = pooled[0].float()[pooled[1]]
            elif on == "context" and context is not None:
                z = context[0].float()[context[1]]
            else:  # passed by training only (evaluation scores the term 0)
                continue
            if cfg.reg == "vicreg":
                reg = reg + vicreg_term(z, cfg.vicreg_cov_weight)
            else:
                reg = reg + sigreg_term(z, n_dirs=cfg.sigreg_slices)
    parts.update(pred_loss=pred_loss.detach(), reg=reg.detach())
    return pred_loss + cfg.reg_weight * reg, parts


@torch.no_grad()
def representation_stats(pred: Tensor, target: Tensor, slot_valid: Tensor) -> dict[str, Tensor]:
    """Collapse monitors on one batch of sentence predictions and targets [B, S, D]: the
    per-dimension std of targets and predictions (mean over dimensions), the mean
    prediction-target cosine, and in-batch retrieval: the share of predictions whose most
    similar target (cosine, among the batch's) is their own (``pred_top1``; a mean prediction
    scores about ``1 / n``, given as ``pred_top1_chance``). 0-d tensors (no host sync)."""
    p, t = pred[slot_valid].float(), target[slot_valid].float()
    if p.shape[0] < 2:
        nan = pred.new_tensor(math.nan, dtype=torch.float32)
        return dict.fromkeys(
            ("target_std", "pred_std", "pred_target_cos", "pred_top1", "pred_top1_chance"), nan
        )
    sim = F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).T
    hits = (sim.argmax(1) == torch.arange(len(p), device=p.device)).float().mean()
    return {
        "target_std": t.std(dim=0).mean(),
        "pred_std": p.std(dim=0).mean(),
        "pred_target_cos": F.cosine_similarity(p, t, dim=-1).mean(),
        "pred_top1": hits,
        "pred_top1_chance": p.new_tensor(1.0 / len(p)),
    }


def step_flops(model: JEPA, batch: Batch, recompute: bool) -> tuple[Tensor, Tensor]:
    """(model FLOPs, hardware FLOPs) of one micro-batch, counting valid tokens only.

    Model FLOPs: context encoder + predictor forward and backward (3x forward) plus the target
    encoder's forward over the full window (with ``target.source=online``, its forward and
    backward); attention over each window's actual length (each sentence's with
    ``target.view=sentence``). Hardware
    FLOPs add the recomputed forward of activation checkpointing.
    """
    enc, pred = model.encoder, model.predictor
    once = window_rows(batch)  # mask.draws: the target encoder reads each window once
    n_win = once["valid"].sum(1).float()
    n_ctx = batch["ctx_valid"].sum(1).float()
    n_tgt = batch["qry_valid" if "qry_valid" in batch else "tgt_valid"].sum(1).float()
    enc_ctx = stream_flops(enc, batch, "ctx", n_ctx)
    enc_win = stream_flops(
        enc, once, "sent" if model.target_cfg.view == "sentence" else "full", n_win
    )
    pred_core = stream_flops(pred, batch, "pred", n_ctx + n_tgt)
    n_out = n_tgt.sum() if model.level == "token" else batch["tgt_sent_valid"].sum()
    pred_io = 2.0 * enc.dim * pred.dim * (n_ctx.sum() + n_out)
    forward_trainable = enc_ctx + pred_core + pred_io
    target_forward = enc_win  # the EMA encoder: forward only
    if model.online:  # online targets: forward and backward, like the rest
        forward_trainable, target_forward = forward_trainable + enc_win, 0.0
    model_flops = 3.0 * forward_trainable + target_forward
    hardware_flops = model_flops + forward_trainable if recompute else model_flops
    return model_flops, hardware_flops  # 0-d tensors on the batch's device (no host sync)


class TargetQueue:
    """``loss.queue``: the last ``size`` loss targets of this rank's training micro-batches,
    detached and unit-normalised, as InfoNCE's extra negatives (MoCo's queue: far more candidates
    than a micro-batch holds, for the price of one [N, size] matmul). The oldest are replaced
    first. Each rank keeps its own; its state travels in the rank's trainer state, so a resumed
    run scores against the same negatives."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        self.bank = torch.zeros(size, dim, device=device)
        self.filled = 0  # entries written so far, up to size
        self.head = 0  # the next slot to write

    def negatives(self) -> Tensor | None:
        """[filled, D], or None while empty."""
        return self.bank[: self.filled] if self.filled else None

    @torch.no_grad()
    def push(self, z: Tensor) -> None:
        """Enqueue z [N, D] (the last ``size`` rows when N is larger). A non-finite row is left
        out: one would make every later InfoNCE row of this rank NaN, so that a step skipped
        under ``train.nonfinite=skip`` would spoil all the steps after it."""
        size = len(self.bank)
        z = z.detach().float()
        z = F.normalize(z[torch.isfinite(z).all(-1)], dim=-1)[-size:]
        slots = (self.head + torch.arange(len(z), device=self.bank.device)) % size
        self.bank[slots] = z.to(self.bank.device)
        self.head = (self.head + len(z)) % size
        self.filled = min(size, self.filled + len(z))

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.cpu().clone(), "filled": self.filled, "head": self.head}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bank = state["bank"]
        if bank.shape != self.bank.shape:
            raise ValueError(
                f"loss.queue: the checkpoint's queue is {tuple(bank.shape)}, this run's "
                f"{tuple(self.bank.shape)} (loss.queue x model.dim)"
            )
        self.bank.copy_(bank)
        self.filled, self.head = int(state["filled"]), int(state["head"])


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
        self.module.return_context = "context" in reg_sets(cfg.loss) and cfg.loss.reg != "none"
        self.target: TextEncoder = target.to(rt.device)
        self.ema = EmaTarget(self.target, self.module.encoder, rt)
        self.momentum = math.nan  # of the last EMA update
        self.queue: TargetQueue | None = None
        if cfg.loss.queue > 0:
            self.queue = TargetQueue(cfg.loss.queue, cfg.model.dim, rt.device)

    def state_dict(self) -> dict[str, Any]:
        """Per-rank state an exact resume needs beyond the engine and the target encoder: the
        ``loss.queue`` of negatives (empty without one)."""
        return {} if self.queue is None else {"queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.queue is not None and "queue" in state:
            self.queue.load_state_dict(state["queue"])

    def negatives(self) -> Tensor | None:
        """``loss.queue``'s negatives for this micro-batch's InfoNCE (None without a queue)."""
        return None if self.queue is None else self.queue.negatives()

    def enqueue(self, targets: Tensor, valid: Tensor, once: Tensor | None) -> None:
        """After a training micro-batch's loss: its valid targets (each once under
        ``mask.draws``) join the queue. Validation (module in eval mode) leaves it as it is."""
        if self.queue is not None and self.module.training:
            self.queue.push(targets[valid if once is None else valid & once])

    def prepare(self, batch: dict[str, Any], split: str, key: tuple[int, ...]) -> Batch:
        return move_batch(batch, self.rt.device)

    def targets(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(loss targets [B, X, D] with their validity [B, X], sentence targets [B, S, D]) from
        the EMA target encoder: see :meth:`targets_from`."""
        feats = target_features(self.target, batch, self.rt.autocast, self.cfg.target)
        return self.targets_from(feats, batch)

    def targets_from(self, feats: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The targets of window features [B, L, D] (one row per window under ``mask.draws``): X
        is the target sentences (``target.level=sentence``) or the target tokens (``token``)."""
        project = self.module.project  # target.projector (the identity without one)
        sentences = project(pooled_targets(feats, batch))
        if self.cfg.target.level == "token":
            return project(token_targets(feats, batch)), batch["tgt_valid"], sentences
        return sentences, batch["tgt_sent_valid"], sentences

    def loss(self, eng: Any, batch: Batch) -> tuple[Tensor, Outputs]:
        phase = self.rt.phase
        online = self.module.online
        if not online:
            with phase("targets"):  # 1. targets: EMA encoder on the full window, no grad
                targets, valid, sentences = self.targets(batch)
        with phase("forward"):  # 2. context encoder on context tokens only + predictor
            out = eng(batch)  # (target.source=online: + the window through the same encoder)
        if online:
            preds, ctx, feats = out
            targets, valid, sentences = self.targets_from(feats, batch)
        else:
            preds, ctx = out if self.module.return_context else (out, None)
        with phase("loss"):  # 3. loss in embedding space
            context = None if ctx is None else (ctx, batch["ctx_valid"])
            level = self.cfg.target.level
            keep, once = candidates(batch, self.cfg.loss, level), first_copies(batch, level)
            pooled = self.pooled_for_reg(feats if online else None, batch)
            loss, parts = jepa_loss(
                preds, targets, valid, self.cfg.loss, context, keep, once, pooled,
                self.negatives(),
            )  # fmt: skip
            self.enqueue(targets, valid, once)
        return loss, self.outputs(preds, sentences, batch, parts)

    def pooled_for_reg(self, feats: Tensor | None, batch: Batch) -> tuple[Tensor, Tensor] | None:
        """``loss.reg_on`` names ``pooled``: the target sentences' pooled features before the
        layer norm [B, S, D] (with gradient: online targets) and the sentences the regulariser
        reads [B, S] (each hidden sentence once under ``mask.draws``); else None."""
        if feats is None or "pooled" not in reg_sets(self.cfg.loss):
            return None
        mask = batch["tgt_sent_valid"]
        once = first_copies(batch, "sentence")
        return pooled_features(feats, batch), mask if once is None else mask & once

    def outputs(self, preds: Tensor, sentences: Tensor, batch: Batch, parts: dict) -> Outputs:
        """Sentence-level predictions and targets for the monitors (token predictions pooled)."""
        preds = preds.detach()
        if self.cfg.target.level == "token":
            preds = pool_by_slot(
                preds, batch["tgt_sent"], batch["tgt_valid"], batch["tgt_sent_valid"].shape[1]
            )
        valid, once = batch["tgt_sent_valid"], first_copies(batch, "sentence")
        return Outputs(preds, sentences.detach(), valid if once is None else valid & once, parts)

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
        # the loss's terms (pred_loss, reg[, infonce][, latent_loss, mlm_loss]): which one moves
        out.update({f"loss/{k}": v for k, v in outputs.parts.items()})
        return out

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        from ..eval.predictor import quick_eval

        return quick_eval(
            self.module, self.target, list(batches), self.cfg.loss, self.rt.autocast,
            seed=self.cfg.train.seed, target_cfg=self.cfg.target,
        )  # fmt: skip

    def summary(self) -> str:
        n_enc = parameter_count(self.module.encoder)
        n_pred = parameter_count(self.module) - n_enc
        return f"encoder {n_enc / 1e6:.1f}M params, predictor {n_pred / 1e6:.1f}M params"
