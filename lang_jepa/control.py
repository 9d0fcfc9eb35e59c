"""Run control for the training loop: exit codes, failures, stop signals, and the one
all-reduce per step on which every rank agrees whether the step counts and whether to stop."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import torch
from torch import Tensor

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; pretrain.sh requeues
log = logging.getLogger("lang_jepa")


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


class StepAgreement:
    """Per optimizer step, one all-reduce of (non-finite losses seen, stop signal received) so
    that every rank takes the same decision: apply the step or not (``train.nonfinite``: stop
    raises :class:`NonFiniteLoss`, skip counts the step up to ``max_skipped``), and stop at this
    step boundary or not (:attr:`stop_agreed`)."""

    def __init__(
        self,
        policy: str,
        max_skipped: int,
        all_reduce: Callable[[Tensor], None],
        last_good: Callable[[], str],
        dev: torch.device,
    ) -> None:
        self.policy, self.max_skipped, self.all_reduce = policy, max_skipped, all_reduce
        self.last_good, self.dev = last_good, dev
        self.stop = StopRequest()
        self.stop_agreed = False
        self.skipped_steps = 0

    def agree(self, step: int, nonfinite: Tensor, step_was_applied: Callable[[], bool]) -> bool:
        """Returns whether optimizer step number ``step`` (1-based: the number the console shows
        once it is done) was applied; the same on every rank."""
        flags = torch.stack(
            [nonfinite, torch.tensor(float(self.stop.signum is not None), device=self.dev)]
        )
        self.all_reduce(flags)
        bad, stop = (float(x) for x in flags.tolist())
        self.stop_agreed = self.stop_agreed or stop > 0
        if bad == 0:
            return True
        if self.policy == "stop":
            raise NonFiniteLoss(
                f"non-finite loss at step {step}; stopping. The last good checkpoint is "
                f"{self.last_good()} (train.nonfinite=skip skips such steps)"
            )
        if step_was_applied():
            raise NonFiniteLoss(
                f"non-finite loss at step {step} and DeepSpeed applied the update anyway "
                "(no overflow check in this engine configuration)"
            )
        self.skipped_steps += 1
        log.warning(
            "non-finite loss at step %d: step skipped (%d so far)", step, self.skipped_steps
        )
        if self.skipped_steps > self.max_skipped:
            raise NonFiniteLoss(
                f"{self.skipped_steps} steps skipped for non-finite losses (step {step})"
            )
        return False
