"""Metrics in one place: FLOPs of a token stream, MFU against a per-device peak table, the
effective rank, the collapse alarm, and :class:`TrainMetrics`, the one owner of what a run logs
(device-side sums between logging steps, the RankMe window, TensorBoard, ``metrics.jsonl`` and
the console line)."""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import engine, schedules
from .config import Config
from .models.layers import matmul_params

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


def stream_flops(module: Any, batch: dict[str, Any], stream: str, lengths: Tensor) -> Tensor:
    """Forward FLOPs of a block stack over one token stream: matmuls for each valid token
    (``lengths`` [B]: valid tokens per row), attention over each sequence's own length: the rows,
    or in a packed batch the segments (whose padding-tail pieces add < 0.5% at demo fill)."""
    matmuls = 2.0 * matmul_params(module.dim, module.depth, module.mlp_ratio) * lengths.sum()
    if f"cu_{stream}" in batch:
        cu = batch[f"cu_{stream}"].long()
        squares = (cu[1:] - cu[:-1]).float().pow(2).sum()
    else:
        squares = lengths.pow(2).sum()
    return matmuls + 4.0 * module.depth * module.dim * squares


def effective_rank(z: Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of
    z [N, D]; NaN for fewer than two rows."""
    z = z.float()
    if z.shape[0] < 2:
        return math.nan
    # same singular values; torch's CPU SVD of a wide matrix (N < D) is ~50x slower
    s = torch.linalg.svdvals(z.T if z.shape[0] < z.shape[1] else z)
    p = s / s.sum().clamp(min=1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


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
    """Trips when the effective rank, the target std or the prediction std stay under their
    thresholds for ``patience`` consecutive checks. A falling loss proves nothing if embeddings
    collapse, and a predictor that regressed to the mean has a tiny prediction std while its
    targets look healthy (data2vec 2.0 stops at prediction std < 0.01 or target std < 0.1)."""

    def __init__(
        self, min_rank: float, min_std: float, patience: int, min_pred_std: float = 0.0
    ) -> None:
        self.min_rank, self.min_std, self.patience = min_rank, min_std, patience
        self.min_pred_std = min_pred_std
        self.strikes = 0
        self.tripped = False
        self.why = ""

    def check(self, effective_rank: float, target_std: float, pred_std: float = math.nan) -> bool:
        """Feed one logging step's monitors; returns True on the check that trips the alarm."""
        if math.isnan(effective_rank) and math.isnan(target_std) and math.isnan(pred_std):
            return False
        low = [
            f"{name} {value:.4g} < {limit:.4g}"
            for name, value, limit in (
                ("effective rank", effective_rank, self.min_rank),
                ("target std", target_std, self.min_std),
                ("prediction std", pred_std, self.min_pred_std),
            )
            if value < limit  # NaN compares False: a monitor the objective lacks never trips
        ]
        self.strikes = self.strikes + 1 if low else 0
        if low:
            self.why = ", ".join(low)
        if self.strikes >= self.patience and not self.tripped:
            self.tripped = True
            return True
        return False


class ScalarWriter:
    """TensorBoard on rank 0 (the names are the contract in docs/design.md); a no-op elsewhere."""

    def __init__(self, tb_dir: Path | None) -> None:
        self.tb_dir, self.writer = tb_dir, None  # opened at the first write, not at start-up

    def write(self, step: int, scalars: dict[str, float | None]) -> None:
        if self.tb_dir is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir))
        for name, value in scalars.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def console_line(step: int, max_steps: int, s: dict[str, float | None]) -> str:
    loss = "non-finite" if s["train/loss"] is None else f"{s['train/loss']:.4f}"
    parts = [f"step {step}/{max_steps}", f"loss {loss}", f"lr {s['train/lr']:.2e}"]
    if s.get("train/skipped_steps"):
        parts.append(f"skipped {s['train/skipped_steps']:.0f}")
    parts.append(f"tok/s {s['perf/tokens_per_s']:,.0f}")
    parts.append(f"step {s['perf/step_ms']:.0f} ms")
    if s.get("perf/mfu") is not None:
        parts.append(f"mfu {100 * s['perf/mfu']:.1f}%")
    if not math.isnan(s["repr/target_std"]):
        parts.append(f"tgt_std {s['repr/target_std']:.3f}")
        parts.append(f"pred_std {s['repr/pred_std']:.3f}")
        parts.append(f"rank {s['repr/effective_rank']:.1f}")
    if not math.isnan(s.get("repr/pred_top1", math.nan)):
        parts.append(f"top1 {s['repr/pred_top1']:.2f}/{s['repr/pred_top1_chance']:.2f}")
    return " | ".join(parts)


@dataclass
class Accumulators:
    """Sums kept on the device between logging steps (no host sync in the hot loop)."""

    loss: Tensor  # sum of the finite micro-batch losses
    finite: Tensor  # how many micro-batch losses were finite
    tokens: Tensor  # valid (window) tokens
    model_flops: Tensor  # model FLOPs of the micro-batches
    samples: int = 0  # windows
    slots: int = 0  # token slots processed (valid + padding), from shapes: no sync
    micro_steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, dev: torch.device) -> Accumulators:
        zero = lambda: torch.zeros((), device=dev)  # noqa: E731
        return cls(loss=zero(), finite=zero(), tokens=zero(), model_flops=zero())

    def add(self, loss: Tensor, batch: dict[str, Tensor], flops: Tensor) -> None:
        """One micro-batch: its loss (a non-finite one counts as not finite), tokens and FLOPs."""
        finite = torch.isfinite(loss.detach())
        self.loss += torch.where(finite, loss.detach(), 0.0)
        self.finite += finite.float()
        draws = batch.get("draws", 1)  # mask.draws: each window counted once, not per draw
        self.tokens += batch["valid"].sum() // draws
        self.model_flops += flops
        self.samples += batch["doc_index"].shape[0] // draws  # windows
        self.slots += batch["valid"].numel() // draws
        self.micro_steps += 1


# Scalars every logging step reports, NaN when the objective has no sentence embeddings.
REPR_DEFAULTS = ("repr/target_std", "repr/pred_std", "repr/pred_target_cos", "repr/pred_top1",
                 "repr/pred_top1_chance")  # fmt: skip


class TrainMetrics:
    """What a run logs, owned in one place: the device-side sums of the micro-batches since the
    last logging step, the last micro-batch's representation statistics, the RankMe window, the
    collapse alarm, and the outputs (TensorBoard on rank 0, ``logs/metrics.jsonl``, console).

    Per micro-batch the trainer calls :meth:`add`; on a logging step :meth:`scalars` (one
    all-reduce), :meth:`watch_collapse` (one all-reduce), :meth:`report` (rank 0 writes) and
    :meth:`reset`.
    """

    def __init__(self, cfg: Config, dev: torch.device, rank: int, world: int, run_dir: Path):
        self.cfg, self.dev, self.rank, self.world, self.run_dir = cfg, dev, rank, world, run_dir
        e = cfg.eval
        self.alarm = CollapseAlarm(
            e.collapse_min_rank_frac * cfg.model.dim,
            e.collapse_min_target_std,
            e.collapse_patience,
            e.collapse_min_pred_std,
        )
        self.ranks = RankWindow(cfg.log.rankme_window)
        self.writer = ScalarWriter(run_dir / "tb" if rank == 0 and cfg.log.tensorboard else None)
        self.acc = Accumulators.zeros(dev)
        self.monitors: dict[str, Tensor | float] = {}
        self.history: list[dict[str, float]] = []

    def add(self, loss: Tensor, batch: dict[str, Tensor], flops: Tensor, outputs: Any) -> None:
        """One micro-batch's loss, tokens and FLOPs; its sentence targets join the RankMe window."""
        self.acc.add(loss, batch, flops)
        if outputs.targets is not None:
            self.ranks.add(outputs.targets, outputs.valid)

    def observe(self, monitors: dict[str, Tensor | float]) -> None:
        """The objective's statistics of the step's last micro-batch (read on logging steps)."""
        self.monitors = monitors

    def scalars(self, step: int, eng: Any, skipped_steps: int) -> dict[str, float | None]:
        """Scalars for TensorBoard and the console after ``step`` optimizer steps (the only host
        syncs of the loop). ``train/loss`` is the mean of the finite micro-batch losses since the
        last logging step, None (absent from the logs) when there was none; ``skipped_steps`` is
        the run's count of steps skipped for non-finite losses."""
        acc, t, o = self.acc, self.cfg.train, self.cfg.optim
        sums = torch.stack([acc.loss, acc.tokens, acc.finite])
        engine.dp_all_reduce(sums)
        elapsed = time.perf_counter() - acc.t0
        steps = max(acc.micro_steps // t.grad_accum_steps, 1)
        peak = peak_flops(self.dev)
        flops_per_s = float(acc.model_flops) / elapsed  # this rank's: per device
        grad_norm = eng.get_global_grad_norm()
        out: dict[str, float | None] = {
            "train/loss": float(sums[0]) / float(sums[2]) if float(sums[2]) > 0 else None,
            "train/skipped_steps": float(skipped_steps),
            "train/lr": schedules.learning_rate(step - 1, t.max_steps, o),
            "train/wd": schedules.weight_decay(step - 1, t.max_steps, o),
            "train/grad_norm": None if grad_norm is None else float(grad_norm),
            "perf/tokens_per_s": float(sums[1]) / elapsed,
            "perf/samples_per_s": acc.samples * self.world / elapsed,
            "perf/step_ms": 1000.0 * elapsed / steps,
            "perf/padding": 1.0 - float(sums[1]) / max(acc.slots * self.world, 1),
            "perf/tflops_per_gpu": flops_per_s / 1e12,
            "perf/mfu": None if peak is None else flops_per_s / peak,
            "mem/max_allocated_gb": engine.max_allocated_gb(self.dev),
        }
        out.update(dict.fromkeys(REPR_DEFAULTS, math.nan))
        out.update({k: float(v) for k, v in self.monitors.items()})
        out["repr/effective_rank"] = self.ranks.effective_rank()
        return out

    def watch_collapse(self, step: int, scalars: dict[str, float | None]) -> bool:
        """Feed the collapse alarm; a trip on any rank is agreed by all (one all-reduce). Sets
        ``repr/collapse_alarm`` and returns True on the step the alarm trips. Checks up to
        ``eval.collapse_after_step`` (-1: the end of the warmup, or of ``loss.latent_start`` +
        ``loss.latent_ramp`` if later) do not count (the same on every
        rank: the step is global)."""
        after = self.cfg.eval.collapse_after_step
        if after < 0:  # auto: the end of the warmup, or of a delayed latent loss's ramp
            loss = self.cfg.loss
            after = max(self.cfg.optim.warmup_steps, loss.latent_start + loss.latent_ramp)
        if step <= after:
            scalars["repr/collapse_alarm"] = 0.0
            return False
        tripped = self.alarm.check(
            scalars["repr/effective_rank"],
            scalars["repr/target_std"],
            scalars.get("repr/pred_std", math.nan),
        )
        flag = torch.tensor(float(tripped), device=self.dev)
        engine.dp_all_reduce(flag)
        scalars["repr/collapse_alarm"] = float(self.alarm.tripped or float(flag) > 0)
        if float(flag) == 0:
            return False
        log.warning(
            "!" * 20 + " REPRESENTATION COLLAPSE at step %d: %s for %d checks " + "!" * 20,
            step,
            self.alarm.why or "another rank's monitors",
            self.cfg.eval.collapse_patience,
        )
        return True

    def report(self, step: int, scalars: dict[str, float | None]) -> None:
        """Rank 0: TensorBoard, one ``metrics.jsonl`` record and the console line."""
        if self.rank != 0:
            return
        self.writer.write(step, scalars)
        record = {"step": step, **{k: v for k, v in scalars.items() if v is not None}}
        self.history.append(record)
        with open(self.run_dir / "logs" / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        line = console_line(step, self.cfg.train.max_steps, scalars)
        if "val/loss" in scalars:
            line += f" | val {scalars['val/loss']:.4f}"
        log.info(line)

    def reset(self) -> None:
        """Start the next logging interval's sums (the RankMe window and the alarm carry on)."""
        self.acc = Accumulators.zeros(self.dev)

    def close(self) -> None:
        self.writer.close()
