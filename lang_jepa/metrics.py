"""Metrics in one place: FLOPs per step, MFU against a per-device peak table, TensorBoard writer,
the console line, and the effective-rank window."""

from __future__ import annotations

import collections
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .objective import JEPA, effective_rank

log = logging.getLogger("lang_jepa")

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets; no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # unlabelled H100: the SXM part
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` from :data:`PEAK_BF16_FLOPS`, or None (CPU, unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # most specific first
        if key.lower() in name.lower():
            return PEAK_BF16_FLOPS[key]
    log.warning("no peak FLOP/s known for %r: MFU not reported (add it to PEAK_BF16_FLOPS)", name)
    return None


def _stream_flops(module: Any, batch: dict[str, Any], stream: str, lengths: Tensor) -> Tensor:
    """Forward FLOPs of a block stack over one token stream: matmuls for each valid token
    (``lengths`` [B]: valid tokens per row), attention over each sequence's own length: the rows,
    or in a packed batch the segments (whose padding-tail pieces add < 0.5% at demo fill)."""
    matmuls = 2.0 * _matmuls(module) * lengths.sum()
    if f"cu_{stream}" in batch:
        cu = batch[f"cu_{stream}"].long()
        squares = (cu[1:] - cu[:-1]).float().pow(2).sum()
    else:
        squares = lengths.pow(2).sum()
    return matmuls + 4.0 * module.depth * module.dim * squares


def step_flops(model: JEPA, batch: dict[str, Any], recompute: bool) -> tuple[Tensor, Tensor]:
    """(model FLOPs, hardware FLOPs) of one micro-batch, counting valid tokens only.

    Model FLOPs: context encoder + predictor forward and backward (3x forward) plus the target
    encoder's forward over the full window; attention over each window's actual length. Hardware
    FLOPs add the recomputed forward of activation checkpointing.
    """
    enc, pred = model.encoder, model.predictor
    n_win = batch["valid"].sum(1).float()
    n_ctx = batch["ctx_valid"].sum(1).float()
    n_tgt = batch["tgt_valid"].sum(1).float()
    enc_ctx = _stream_flops(enc, batch, "ctx", n_ctx)
    enc_win = _stream_flops(enc, batch, "full", n_win)
    pred_core = _stream_flops(pred, batch, "pred", n_ctx + n_tgt)
    pred_io = 2.0 * enc.dim * pred.dim * (n_ctx.sum() + batch["tgt_sent_valid"].sum())
    forward_trainable = enc_ctx + pred_core + pred_io
    model_flops = 3.0 * forward_trainable + enc_win
    hardware_flops = model_flops + forward_trainable if recompute else model_flops
    return model_flops, hardware_flops  # 0-d tensors on the batch's device (no host sync)


def mlm_step_flops(model: Any, batch: dict[str, Any], recompute: bool) -> tuple[Tensor, Tensor]:
    """(model FLOPs, hardware FLOPs) of one MLM micro-batch: encoder forward and backward over the
    full window plus the output head at the predicted positions."""
    enc = model.encoder
    enc_fwd = _stream_flops(enc, batch, "full", batch["valid"].sum(1).float())
    head_fwd = 2.0 * enc.dim * model.head.out_features * batch["mlm_valid"].sum()
    model_flops = 3.0 * (enc_fwd + head_fwd)
    return model_flops, model_flops + enc_fwd if recompute else model_flops


def _matmuls(module: Any) -> float:
    hidden = int(module.dim * module.mlp_ratio)
    return module.depth * (4 * module.dim * module.dim + 2 * module.dim * hidden)


class RankWindow:
    """Pooled target embeddings of the last ``size`` batches, for RankMe."""

    def __init__(self, size: int) -> None:
        self.batches: collections.deque[Tensor] = collections.deque(maxlen=size)

    def add(self, z: Tensor, valid: Tensor) -> None:
        """z [B, S, D] with valid [B, S]: kept as is; the boolean selection (a host sync) waits
        for :meth:`effective_rank`, which runs on logging steps only."""
        self.batches.append((z.detach(), valid))

    def effective_rank(self) -> float:
        if not self.batches:
            return math.nan
        return effective_rank(torch.cat([z[v].float() for z, v in self.batches]))


class CollapseAlarm:
    """Trips when the effective rank or the target std stay under their thresholds for
    ``patience`` consecutive checks (a falling loss proves nothing if embeddings collapse)."""

    def __init__(self, min_rank: float, min_std: float, patience: int) -> None:
        self.min_rank, self.min_std, self.patience = min_rank, min_std, patience
        self.strikes = 0
        self.tripped = False

    def check(self, effective_rank: float, target_std: float) -> bool:
        """Feed one logging step's monitors; returns True on the check that trips the alarm."""
        if math.isnan(effective_rank) and math.isnan(target_std):
            return False
        low = effective_rank < self.min_rank or target_std < self.min_std
        self.strikes = self.strikes + 1 if low else 0
        if self.strikes >= self.patience and not self.tripped:
            self.tripped = True
            return True
        return False


class ScalarWriter:
    """TensorBoard on rank 0 (the names are DESIGN.md's contract); a no-op elsewhere."""

    def __init__(self, tb_dir: Path | None) -> None:
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir))

    def write(self, step: int, scalars: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def console_line(step: int, max_steps: int, s: dict[str, float | None]) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {s['train/loss']:.4f}", f"lr {s['train/lr']:.2e}"]
    parts.append(f"tok/s {s['perf/tokens_per_s']:,.0f}")
    parts.append(f"step {s['perf/step_ms']:.0f} ms")
    if s.get("perf/mfu") is not None:
        parts.append(f"mfu {100 * s['perf/mfu']:.1f}%")
    if not math.isnan(s["repr/target_std"]):
        parts.append(f"tgt_std {s['repr/target_std']:.3f}")
        parts.append(f"rank {s['repr/effective_rank']:.1f}")
    return " | ".join(parts)
