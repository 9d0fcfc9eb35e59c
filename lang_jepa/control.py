"""Run control for the training loop: exit codes, failures, stop signals, device-side sums."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; pretrain.sh requeues
FAULT_NAN_ENV = "LANG_JEPA_FAULT_NAN_STEP"  # test-only fault injection: NaN loss at this step


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf (train.nonfinite=stop, or too many skipped steps)."""


class RepresentationCollapse(RuntimeError):
    """The collapse alarm tripped and eval.collapse_stop is set."""


class StopRequest:
    """Records SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit); the loop
    acts on it only at a step boundary that every rank agrees on."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum


@dataclass
class Accumulators:
    """Sums kept on the device between logging steps (no host sync in the hot loop)."""

    loss: Tensor  # sum of the finite micro-batch losses
    finite: Tensor  # how many micro-batch losses were finite
    tokens: Tensor  # valid (window) tokens
    samples: int = 0  # windows
    slots: int = 0  # token slots processed (valid + padding), from shapes: no sync
    micro_steps: int = 0
    model_flops: Tensor | float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, dev: torch.device) -> Accumulators:
        zero = lambda: torch.zeros((), device=dev)  # noqa: E731
        return cls(loss=zero(), finite=zero(), tokens=zero())
