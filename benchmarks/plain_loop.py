"""The two things train_bench.py times besides the real trainer: a phase timer (the trainer's
phase hook: it times the named parts of each step without changing them), and the plain PyTorch
loop (same model, same numbered steps, no DeepSpeed) that the DeepSpeed step is compared against
on CPU."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from lang_jepa.config import Config

Batch = dict[str, Tensor]


class PhaseTimer:
    """Wall time of named phases within the current step (sums per phase). ``phase`` is the
    trainer's phase hook (``Trainer.build(..., phase=timer.phase)``): a no-op until ``enabled``."""

    def __init__(self, sync: Callable[[], None] | None = None, enabled: bool = False) -> None:
        self.sync = sync or (lambda: None)
        self.enabled = enabled
        self.current: dict[str, float] = defaultdict(float)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return self._timed(name) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.current[name] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


class PlainLoop:
    """The same model and numbered steps as ``Trainer.train_step``, without DeepSpeed."""

    def __init__(self, cfg: Config, dev: torch.device, timer: PhaseTimer) -> None:
        from lang_jepa import engine
        from lang_jepa.objectives import build_models
        from lang_jepa.trainer import seed_everything

        seed_everything(cfg.train.seed)  # the weights Trainer.build gave the DeepSpeed model
        self.model, self.target = build_models(cfg, cfg.model.vocab_size)
        self.model.to(dev).train()
        self.target.to(dev)
        o = cfg.optim
        self.opt = torch.optim.AdamW(engine.param_groups(self.model), lr=o.start_lr,
                                     betas=tuple(o.betas), eps=o.eps, weight_decay=0.0)  # fmt: skip
        self.cfg, self.dev, self.step = cfg, dev, 0
        self.autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
        self.timer = timer
        self.loss_sum = torch.zeros((), device=dev)

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer.phase(name)

    def train_step(self, micro_batches: list[Batch]) -> None:
        from lang_jepa import schedules
        from lang_jepa.ema import ema_update
        from lang_jepa.objectives import compute_targets, jepa_loss
        from lang_jepa.objectives.jepa import candidates

        cfg, max_steps = self.cfg, self.cfg.train.max_steps
        lr = schedules.learning_rate(self.step, max_steps, cfg.optim)
        wd = schedules.weight_decay(self.step, max_steps, cfg.optim)
        for group in self.opt.param_groups:
            group["lr"], group["weight_decay"] = lr, wd * group.get("wd_mult", 1.0)
        scale = 1.0 / len(micro_batches)
        for batch in micro_batches:
            with self._phase("targets"):  # 1. targets (EMA encoder, no grad)
                targets = compute_targets(self.target, batch, self.autocast)
            autocast = torch.autocast(
                self.dev.type,
                dtype=self.autocast or torch.float32,
                enabled=self.autocast is not None,
            )
            with self._phase("forward"), autocast:  # 2. context encoder + predictor
                preds = self.model(batch)
            with self._phase("loss"):  # 3. loss
                keep = candidates(batch, cfg.loss, "sentence")  # loss.negatives, mask.draws
                loss, _ = jepa_loss(preds, targets, batch["tgt_sent_valid"], cfg.loss, keep=keep)
            with self._phase("backward"):  # 4. backward
                (loss * scale).backward()
            finite = torch.isfinite(loss.detach())
            self.loss_sum += torch.where(finite, loss.detach(), 0.0)
        with self._phase("step"):  # 4. clip + optimizer step
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        with self._phase("ema"):  # 5. EMA update of the target encoder
            frags = [[(0, p.detach().reshape(-1))] for p in self.model.encoder.parameters()]
            momentum = schedules.ema_momentum(self.step, max_steps, cfg.optim)
            ema_update(list(self.target.parameters()), frags, momentum)
        self.step += 1
