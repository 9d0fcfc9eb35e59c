"""The objective interface: what the training loop, validation, quick evaluation and the
benchmarks call, so that none of them asks which objective it runs.

An objective owns

- ``module``: the trainable ``nn.Module`` handed to DeepSpeed (it must have an ``encoder``: the
  encoder that export and evaluation read);
- ``target``: state outside the engine that checkpoints carry (JEPA: the EMA target encoder), or
  None;

and answers, per micro-batch and per step,

- :meth:`Objective.prepare`: host-side work on a loader batch (MLM: the token corruption), then
  the copy to the device;
- :meth:`Objective.loss`: ``(loss, outputs)`` for one prepared micro-batch through the engine;
- :meth:`Objective.flops`: (model FLOPs, hardware FLOPs) of one prepared micro-batch;
- :meth:`Objective.after_step`: what follows an applied optimizer step (JEPA: the EMA update);
- :meth:`Objective.monitor`: representation statistics of one micro-batch's outputs;
- :meth:`Objective.evaluate`: the cheap in-training evaluation (``eval/*`` scalars);
- :meth:`Objective.state_dict` / :meth:`Objective.load_state_dict`: per-rank state outside the
  engine that an exact resume needs (JEPA: ``loss.queue``'s negatives), carried in the rank's
  trainer state of each checkpoint.

Objectives are registered in :data:`lang_jepa.objectives.OBJECTIVES` by the config value
``objective``; adding one is a module with a class satisfying :class:`Objective` plus its entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ..models.layers import Segments

Batch = dict[str, Tensor]
# A phase hook: ``phase("targets")`` is a context manager around one named part of a step
# (benchmarks time them; training uses the no-op).
Phase = Callable[[str], contextlib.AbstractContextManager]


def no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def autocast_context(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; disabled for None (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class Runtime:
    """Where an objective runs: device, ranks, autocast dtype (None: fp32) and the phase hook."""

    device: torch.device
    rank: int = 0
    world: int = 1
    autocast: torch.dtype | None = None
    phase: Phase = no_phase


@dataclass
class Outputs:
    """What one micro-batch's loss leaves for the monitors (detached). Sentence-level objectives
    fill ``predictions`` / ``targets`` [B, S, D] with ``valid`` [B, S] (under ``mask.draws``,
    each hidden sentence's first copy only, so that the monitors count a sentence once);
    ``parts`` holds the loss terms (0-d tensors) by name."""

    predictions: Tensor | None = None
    targets: Tensor | None = None
    valid: Tensor | None = None
    parts: dict[str, Tensor] = field(default_factory=dict)


class Objective(Protocol):
    name: ClassVar[str]
    module: nn.Module
    target: nn.Module | None

    def prepare(self, batch: dict[str, Any], split: str, key: tuple[int, ...]) -> Batch:
        """A loader batch -> the batch this objective's loss reads, on the device. ``split`` is
        ``train`` or ``val``; ``key`` identifies the draw (train: (step, rank, micro-batch); val:
        (rank, batch number)), so a resumed run prepares the same batches."""
        ...

    def loss(self, engine: Any, batch: Batch) -> tuple[Tensor, Outputs]:
        """The scalar loss (fp32) of one prepared micro-batch through ``engine`` (the DeepSpeed
        engine wrapping ``module``; called under no_grad for validation)."""
        ...

    def flops(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(model FLOPs, hardware FLOPs) of one prepared micro-batch, 0-d tensors (no sync)."""
        ...

    def after_step(self, engine: Any, step: int) -> None:
        """Runs once after each applied optimizer step ``step`` (0-based)."""
        ...

    def monitor(self, outputs: Outputs) -> dict[str, Tensor | float]:
        """Scalars of the step's last micro-batch by TensorBoard name (``repr/target_std``, ...;
        0-d tensors or floats, read on logging steps only)."""
        ...

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """The cheap in-training evaluation on prepared validation batches (names without the
        ``eval/`` prefix; empty when the objective has none). Every rank calls it."""
        ...

    def summary(self) -> str:
        """One line for the start-up log (parameter counts)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's state outside the engine and ``target`` (tensors and plain values: the
        checkpoint is read with ``weights_only=True``); empty when there is none."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output on the same rank of a resumed run."""
        ...


def gather_tokens(x: Tensor, index: Tensor, draws: int = 1) -> Tensor:
    """x [B, L] or [B, L, D], index [B, N] -> x at index, [B, N] or [B, N, D].

    ``draws`` > 1 (``mask.draws``): x holds one row per window, [B / draws, L(, D)], and row r of
    ``index`` reads row r // draws of x (the draws of a window are adjacent rows of the batch), so
    the window features are never repeated."""
    if draws > 1:
        b, n = index.shape
        if x.shape[0] * draws != b:
            raise ValueError(
                f"gather_tokens: {x.shape[0]} feature rows x {draws} draws != {b} index rows"
            )
        rows = torch.arange(b, device=index.device) // draws
        flat = (rows[:, None] * x.shape[1] + index).flatten()
        return x.flatten(0, 1).index_select(0, flat).view(b, n, *x.shape[2:])
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


# the batch tensor whose B x N tokens each segment stream covers
STREAM_SHAPE = {"full": "input_ids", "ctx": "ctx_index", "pred": "pred_order", "sent": "input_ids"}


def batch_segments(batch: Batch, stream: str) -> Segments | None:
    """The :class:`Segments` of a packed batch's ``full``, ``ctx`` or ``pred`` token stream, or
    None for a batch of one window per row; ``sent``: every sentence of the window alone."""
    if f"cu_{stream}" not in batch:
        return None
    shape = STREAM_SHAPE[stream]
    return Segments(batch[f"cu_{stream}"], batch[f"max_{stream}"], batch[shape].numel())


def window_rows(batch: Batch) -> Batch:
    """What the target encoder reads: the window stream (``input_ids``, ``position_ids``,
    ``valid`` and the ``full`` and ``sent`` segments) of the first row of each group of
    ``mask.draws`` copies (row views and the collate's ``once_*`` bounds: no host sync), or the
    batch itself with one draw."""
    draws = batch.get("draws", 1)
    if draws == 1:
        return batch
    once: Batch = {k: batch[k][::draws] for k in ("input_ids", "position_ids", "valid")}
    for stream in ("full", "sent"):
        if f"once_cu_{stream}" in batch:
            once[f"cu_{stream}"] = batch[f"once_cu_{stream}"]
            once[f"max_{stream}"] = batch[f"once_max_{stream}"]
    return once


def move_batch(batch: dict[str, Any], device: torch.device) -> Batch:
    """Tensors to ``device`` (non-blocking: the loader pins memory)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
    }


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
