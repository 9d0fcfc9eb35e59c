"""Run control for the training loop: exit codes, failures, stop signals, the one all-reduce
per step on which every rank agrees whether the step counts and whether to stop, and what the
survivors do when a collective fails because ranks are gone (a node died, the network split)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

# EX_TEMPFAIL: a checkpoint was written after SIGTERM/SIGUSR1, or ranks were lost and `latest` is
# the last good checkpoint; slurm/pretrain.sh requeues the job on it
EXIT_REQUEUE = 75
log = logging.getLogger("lang_jepa")
# gloo raises plain RuntimeErrors whose text names its source file (".../gloo/transport/tcp/
# pair.cc: ... Connection reset by peer", "unbound_buffer.cc: Timed out waiting ..."), NCCL's
# name NCCL; store and network failures are DistErrors
_COLLECTIVE_MARKERS = ("gloo", "nccl")


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


class LostRanks(RuntimeError):
    """A collective failed and the census found ranks gone (or this host cut off); the run
    exits with :data:`EXIT_REQUEUE` and ``latest`` names the last complete checkpoint."""


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective or store operation rather than a bug."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _COLLECTIVE_MARKERS)


def census(rank: int, world: int, window_s: float) -> list[int] | None:
    """:func:`_census`, bounded: a store client behind a cut link can block past its own
    timeout, so the census runs in a thread and counts as "store out of reach" if it has not
    answered ``window_s + 15`` s later."""
    answer: dict[str, list[int] | None] = {}
    probe = threading.Thread(target=lambda: answer.update(lost=_census(rank, world, window_s)),
                             name="lang_jepa-census", daemon=True)  # fmt: skip
    probe.start()
    probe.join(window_s + 15.0)
    if probe.is_alive() or "lost" not in answer:
        log.error("census: no answer from the rendezvous store within %.0f s", window_s + 15.0)
        return None
    return answer["lost"]


def _census(rank: int, world: int, window_s: float) -> list[int] | None:
    """After a failed collective: every surviving rank checks in at the rendezvous store (the
    c10d store on rank 0's host) and waits for the others until a deadline shared through the
    store, ``window_s`` after the first check-in (a survivor still blocked in a collective with a
    lost rank fails within the collective timeout, so ``window_s`` is that timeout). Returns the
    ranks that never checked in, or None when the store itself is out of reach (this host is cut
    off, or rank 0's host is gone)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(1.0, min(10.0, window_s))))
        store.set(f"lang_jepa/alive/{rank}", "1")
        first = store.compare_set("lang_jepa/census_deadline", "", f"{time.time() + window_s:.3f}")
        deadline = float(first)
        present: list[int] = []
        while True:
            present = [r for r in range(world) if store.check([f"lang_jepa/alive/{r}"])]
            if len(present) == world or time.time() >= deadline:
                break
            time.sleep(0.25)
    except (RuntimeError, ValueError) as err:  # DistError is a RuntimeError
        log.error("census: the rendezvous store is out of reach (%s)", str(err).splitlines()[0])
        return None
    return [r for r in range(world) if r not in present]


def lost_ranks_error(err: BaseException, step: int, rank: int, world: int, hosts: list[str],
                     window_s: float, last_good: str) -> LostRanks:  # fmt: skip
    """Run the census and word what the survivors know: who is gone, where, and what to resume."""
    lost = census(rank, world, window_s)
    cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if lost is None:
        master = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        who = (f"the rendezvous store at {master} (rank 0's host {hosts[0]}) is out of reach from "
               f"{hosts[rank]}: this host is cut off from the job, or rank 0's host is lost")  # fmt: skip
    elif not lost:
        who = "every rank checked in after it: a transient network failure, not a lost node"
    else:
        where = sorted({hosts[r] for r in lost})
        who = (f"lost rank(s) {', '.join(map(str, lost))} on {', '.join(where)} "
               f"(no check-in within {window_s:g} s)")  # fmt: skip
    return LostRanks(
        f"collective failed during step {step + 1}: {who}. The last good checkpoint is "
        f"{last_good} (checkpoints/latest names it); exiting with {EXIT_REQUEUE} so the job is "
        f"requeued and resumes from it. Cause: {cause}"
    )


def requeue_record_path(run_dir: Path) -> Path | None:
    """``RUN_DIR/slurm/requeue-JOB-RESTART.json`` inside a SLURM job, else None."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return run_dir / "slurm" / f"requeue-{job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}.json"


def write_requeue_record(run_dir: Path, rank: int, step: int, reason: str, checkpoint: str) -> None:
    """Tell slurm/pretrain.sh that this job should be requeued on ``checkpoint``, whatever exit
    status reaches it: the DeepSpeed launcher on a node that got SIGTERM exits 1 after its ranks
    exit 75, and a dead node's task reports the signal that killed it."""
    path = requeue_record_path(run_dir)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{rank}")
    tmp.write_text(json.dumps({"rank": rank, "step": step, "reason": reason,
                               "checkpoint": checkpoint}) + "\n")  # fmt: skip
    os.replace(tmp, path)
