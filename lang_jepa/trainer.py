"""The training loop: set-up, the numbered train step, validation, logging, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import checkpoint, engine, schedules
from .config import Config, ConfigError, resolve_batch, to_dict
from .control import (
    EXIT_REQUEUE,
    FAULT_NAN_ENV,
    Accumulators,
    NonFiniteLoss,
    RepresentationCollapse,
    StopRequest,
)
from .data import build_train_loader, build_val_loader, check_tokenizer
from .data.windows import stable_hash63
from .ema import EmaSync, ema_update
from .metrics import (
    CollapseAlarm,
    RankWindow,
    ScalarWriter,
    console_line,
    mlm_step_flops,
    peak_flops,
    step_flops,
)
from .mlm import MLM, mlm_loss, mlm_mask
from .objective import (
    JEPA,
    build_models,
    compute_targets,
    jepa_loss,
    move_batch,
    representation_stats,
)
from .runinfo import run_info, setup_logging, write_run_dir
from .shards import load_manifest, manifest_hash


@dataclass
class Trainer:
    cfg: Config
    eng: Any  # the DeepSpeed engine wrapping JEPA
    target: torch.nn.Module | None  # EMA target encoder, fp32, outside the engine (None: MLM)
    dev: torch.device
    rank: int
    world: int
    run_dir: Path
    manifest_sha256: str
    step: int = 0
    autocast: torch.dtype | None = None
    writer: ScalarWriter | None = None
    ranks: RankWindow | None = None
    loader: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)
    stop_agreed: bool = False
    skipped_steps: int = 0
    fault_nan_step: int = -1
    mlm_mask_id: int | None = None  # set for objective=mlm
    alarm: CollapseAlarm | None = None
    ema_sync: EmaSync | None = None  # the partitioned EMA update's layout, built at the first step

    @property
    def model(self) -> JEPA | MLM:
        return self.eng.module

    def train_step(
        self, micro_batches: list[dict[str, Tensor]], acc: Accumulators
    ) -> dict[str, Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches (I-JEPA's train_step)."""
        cfg, max_steps = self.cfg, self.cfg.train.max_steps
        nonfinite = torch.zeros((), device=self.dev)
        lr = schedules.learning_rate(self.step, max_steps, cfg.optim)
        engine.apply_schedule(self.eng, lr, schedules.weight_decay(self.step, max_steps, cfg.optim))
        for batch in micro_batches:
            if self.mlm_mask_id is None:
                # 1. targets: EMA encoder on the full window, pooled per target sentence, no grad
                targets = compute_targets(self.target, batch, self.autocast)
                # 2. context encoder on context tokens only + predictor at the target positions
                preds = self.eng(batch)
                # 3. loss in embedding space
                loss, _ = jepa_loss(preds, targets, batch["tgt_sent_valid"], cfg.loss)
            else:  # the masked-LM control: steps 1-3 are token prediction instead
                preds, targets = None, None
                loss = mlm_loss(self.eng(batch), batch)
            if self.step == self.fault_nan_step:
                loss = loss * float("nan")
            nonfinite = nonfinite + (~torch.isfinite(loss.detach())).float()
            # 4. backward and step (DeepSpeed steps the optimizer at the accumulation boundary)
            self.eng.backward(loss)
            self.eng.step()
            finite = torch.isfinite(loss.detach())
            acc.loss += torch.where(finite, loss.detach(), 0.0)
            acc.finite += finite.float()
            acc.tokens += batch["valid"].sum()
            acc.samples += batch["doc_index"].shape[0]  # windows
            acc.slots += batch["valid"].numel()
            acc.micro_steps += 1
            if self.ranks is not None and targets is not None:
                self.ranks.add(targets, batch["tgt_sent_valid"])
        applied = self.agree_on_step(nonfinite)
        # 5. EMA update of the target encoder from the fp32 master weights
        if applied and self.target is not None:
            self.update_target(schedules.ema_momentum(self.step, max_steps, cfg.optim))
        self.step += 1
        if preds is None:
            return {}
        return {"preds": preds.detach(), "targets": targets, "slot_valid": batch["tgt_sent_valid"]}

    def prepare(self, batch: dict[str, Tensor], micro: int) -> dict[str, Tensor]:
        """Host-side per-batch work, then the copy to the device. For the MLM control: the token
        corruption, seeded by (seed, step, rank, micro-batch) so a resumed run draws the same."""
        if self.mlm_mask_id is not None:
            seed = stable_hash63("mlm", self.cfg.train.seed, self.step, self.rank, micro)
            gen = torch.Generator().manual_seed(seed)
            batch = mlm_mask(
                batch, self.mlm_mask_id, self.cfg.model.vocab_size, self.cfg.loss.mlm_prob, gen
            )
        return move_batch(batch, self.dev)

    def batch_flops(self, batch: dict[str, Tensor]) -> Tensor:
        recompute = self.cfg.model.activation_checkpointing
        if self.mlm_mask_id is not None:
            return mlm_step_flops(self.model, batch, recompute)[0]
        return step_flops(self.model, batch, recompute)[0]

    def agree_on_step(self, nonfinite: Tensor) -> bool:
        """One all-reduce per step: did any rank see a non-finite loss, or a stop signal?

        Returns whether the optimizer step was applied. Every rank takes the same decision.
        """
        flags = torch.stack(
            [nonfinite, torch.tensor(float(self.stop.signum is not None), device=self.dev)]
        )
        engine.dp_all_reduce(flags)
        bad, stop = (float(x) for x in flags.tolist())
        self.stop_agreed = self.stop_agreed or stop > 0
        if bad == 0:
            return True
        latest = checkpoint.latest_tag(self.run_dir / "checkpoints") or "none yet"
        if self.cfg.train.nonfinite == "stop":
            raise NonFiniteLoss(
                f"non-finite loss at step {self.step}; stopping. The last good "
                f"checkpoint is {latest} (train.nonfinite=skip skips such steps)"
            )
        if self.eng.was_step_applied():
            raise NonFiniteLoss(
                f"non-finite loss at step {self.step} and DeepSpeed applied the "
                "update anyway (no overflow check in this engine configuration)"
            )
        self.skipped_steps += 1
        self.log.warning(
            "non-finite loss at step %d: step skipped (%d so far)", self.step, self.skipped_steps
        )
        if self.skipped_steps > self.cfg.train.max_skipped_steps:
            raise NonFiniteLoss(
                f"{self.skipped_steps} steps skipped for non-finite losses (step {self.step})"
            )
        return False

    def update_target(self, momentum: float) -> None:
        fragments, partitioned = engine.fp32_fragments(
            self.model.encoder.parameters(), self.eng.optimizer
        )
        targets = list(self.target.parameters())
        if not partitioned or self.world == 1:
            # every fragment is a whole tensor: the per-tensor lerp, no buffer (11x faster on CPU)
            ema_update(targets, fragments, momentum)
            return
        if self.ema_sync is None:  # the fragment layout is fixed for the engine's life
            self.ema_sync = EmaSync(
                targets,
                fragments,
                self.rank,
                self.world,
                engine.dp_all_gather_object,
                engine.dp_all_gather_into_tensor,
            )
        self.ema_sync.update(targets, fragments, momentum)

    @torch.no_grad()
    def validate(self, val_loader: Any) -> float:
        """Mean loss over ``train.val_batches`` batches per rank (the same count on every rank)."""
        self.eng.eval()
        total = torch.zeros((), device=self.dev)
        n = 0
        for i, batch in enumerate(val_loader):
            if self.mlm_mask_id is not None:
                gen = torch.Generator().manual_seed(
                    stable_hash63("mlm-val", self.cfg.train.seed, self.rank, i)
                )
                batch = mlm_mask(
                    batch, self.mlm_mask_id, self.cfg.model.vocab_size, self.cfg.loss.mlm_prob, gen
                )
                batch = move_batch(batch, self.dev)
                loss = mlm_loss(self.eng(batch), batch)
            else:
                batch = move_batch(batch, self.dev)
                targets = compute_targets(self.target, batch, self.autocast)
                loss, _ = jepa_loss(
                    self.eng(batch), targets, batch["tgt_sent_valid"], self.cfg.loss
                )
            total += loss
            n += 1
        self.eng.train()
        return float(engine.all_reduce_mean(total / max(n, 1)))

    def log_step(self, acc: Accumulators, last: dict[str, Tensor]) -> dict[str, float | None]:
        """Scalars for TensorBoard and the console (the only host syncs of the loop)."""
        if last:
            stats = {
                k: float(v)
                for k, v in representation_stats(
                    last["preds"], last["targets"], last["slot_valid"]
                ).items()
            }
        else:  # MLM control: no sentence embeddings to watch
            stats = {"target_std": math.nan, "pred_std": math.nan, "pred_target_cos": math.nan}
        sums = torch.stack([acc.loss, acc.tokens, acc.finite])
        engine.dp_all_reduce(sums)
        elapsed = time.perf_counter() - acc.t0
        steps = max(acc.micro_steps // self.cfg.train.grad_accum_steps, 1)
        peak = peak_flops(self.dev)
        flops_per_s = float(acc.model_flops) * self.world / elapsed
        grad_norm = self.eng.get_global_grad_norm()
        max_steps, o = self.cfg.train.max_steps, self.cfg.optim
        scalars: dict[str, float | None] = {
            "train/loss": float(sums[0]) / max(float(sums[2]), 1.0),
            "train/lr": schedules.learning_rate(self.step - 1, max_steps, o),
            "train/wd": schedules.weight_decay(self.step - 1, max_steps, o),
            "train/ema_momentum": schedules.ema_momentum(self.step - 1, max_steps, o)
            if self.target is not None
            else None,
            "train/grad_norm": None if grad_norm is None else float(grad_norm),
            "perf/tokens_per_s": float(sums[1]) / elapsed,
            "perf/samples_per_s": acc.samples * self.world / elapsed,
            "perf/step_ms": 1000.0 * elapsed / steps,
            "perf/padding": 1.0 - float(sums[1]) / max(acc.slots * self.world, 1),
            "perf/tflops_per_gpu": flops_per_s / 1e12,
            "perf/mfu": None if peak is None else flops_per_s / peak,
            "mem/max_allocated_gb": engine.max_allocated_gb(self.dev),
            "repr/target_std": stats["target_std"],
            "repr/pred_std": stats["pred_std"],
            "repr/pred_target_cos": stats["pred_target_cos"],
            "repr/effective_rank": self.ranks.effective_rank() if self.ranks else math.nan,
        }
        return scalars

    def quick_eval(self, val_loader: Any) -> dict[str, float]:
        """The cheap subset of the eval suite on ``eval.batches`` validation batches -> eval/*.

        Every rank runs it (under ZeRO-3 a forward pass is a collective); rank 0 logs its own.
        """
        if self.target is None:  # MLM control: the predictor metrics do not apply
            return {}
        from .eval.predictor import quick_eval

        batches = [
            move_batch(b, self.dev)
            for b, _ in zip(val_loader, range(self.cfg.eval.batches), strict=False)
        ]
        out = quick_eval(
            self.model, self.target, batches, self.cfg.loss, self.autocast, seed=self.cfg.train.seed
        )
        return {f"eval/{k}": float(v) for k, v in out.items()}

    def watch_collapse(self, scalars: dict[str, float | None]) -> None:
        """Feed the collapse alarm; a trip on any rank is agreed by all (one all-reduce)."""
        tripped = self.alarm.check(scalars["repr/effective_rank"], scalars["repr/target_std"])
        flag = torch.tensor(float(tripped), device=self.dev)
        engine.dp_all_reduce(flag)
        scalars["repr/collapse_alarm"] = float(self.alarm.tripped or float(flag) > 0)
        if float(flag) == 0:
            return
        e = self.cfg.eval
        self.log.warning(
            "!" * 20 + " REPRESENTATION COLLAPSE at step %d: effective rank %.2f (alarm < %.2f), "
            "target std %.4f (alarm < %.4f) for %d checks " + "!" * 20,
            self.step,
            scalars["repr/effective_rank"],
            self.alarm.min_rank,
            scalars["repr/target_std"],
            e.collapse_min_target_std,
            e.collapse_patience,
        )
        if e.collapse_stop:
            raise RepresentationCollapse(
                f"representation collapse at step {self.step} (eval.collapse_stop)"
            )

    def save(self) -> None:
        state = {
            "step": self.step,
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "rng": checkpoint.rng_state(),
        }
        meta = {
            "step": self.step,
            "world_size": self.world,
            "zero_stage": self.eng.zero_optimization_stage(),
            "manifest_sha256": self.manifest_sha256,
            "config": to_dict(self.cfg),
        }
        checkpoint.save(
            self.eng,
            self.run_dir / "checkpoints",
            state,
            self.target,
            meta,
            self.cfg.train.keep_checkpoints,
            engine.barrier,
        )

    def restore(self, ckpt_dir: Path, tag: str) -> None:
        meta = checkpoint.read_meta(ckpt_dir, tag)
        if meta.get("manifest_sha256") != self.manifest_sha256:
            self.log.warning("checkpoint %s was made on other shards (manifest hash differs)", tag)
        state = checkpoint.load(self.eng, ckpt_dir, tag, self.target)
        self.step = int(state["step"])
        if self.loader is not None and state.get("loader") is not None:
            try:
                self.loader.load_state_dict(state["loader"])
            except ValueError as err:
                raise checkpoint.CheckpointError(
                    f"{ckpt_dir / tag}: {err} (or start afresh: train.resume=none)"
                ) from err
        checkpoint.set_rng_state(state["rng"])

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger("lang_jepa")


def mlm_token_id(shard_dir: str) -> int:
    """The [MASK] id of the shards' tokenizer (the MLM control needs one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(shard_dir) / "tokenizer"))
    if tok.mask_token_id is None:
        raise ConfigError(
            f"config key 'objective': mlm needs a tokenizer with a mask token; "
            f"{shard_dir}/tokenizer has none"
        )
    return int(tok.mask_token_id)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: Config, ds_config_path: str) -> Trainer:
    """Distributed start, run directory, models, engine, loaders; resume if asked."""
    rank, local_rank, world = engine.init_distributed()
    run_dir = Path(cfg.train.run_dir)
    log = setup_logging(rank, run_dir)
    dev = engine.device(local_rank)
    manifest = load_manifest(cfg.data.shards)
    check_tokenizer(cfg.data.shards, cfg.data.tokenizer)
    vocab = cfg.model.vocab_size or int(manifest["tokenizer"]["vocab_size"])
    if vocab < int(manifest["tokenizer"]["vocab_size"]):
        raise ValueError(
            f"model.vocab_size={vocab} < the shards' vocabulary ({manifest['tokenizer']['vocab_size']})"
        )
    cfg.model.vocab_size = vocab
    resolve_batch(cfg, world)
    ds_config = engine.build_ds_config(ds_config_path, cfg, world)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model, target = build_models(cfg, vocab)
    mask_id = None
    if cfg.objective == "mlm":
        mask_id = mlm_token_id(cfg.data.shards)
        model, target = MLM(model.encoder, vocab, cfg.model.norm_eps), None
    optimizer = engine.build_optimizer(engine.param_groups(model), cfg, ds_config)
    eng = engine.initialize(model, optimizer, ds_config)
    sha = manifest_hash(cfg.data.shards)
    info = run_info(cfg, sha, world, ds_config)
    if rank == 0:
        write_run_dir(run_dir, cfg, info)
    log.info(
        "run %s | git %s | world %d | %s | ds %s",
        run_dir,
        info["git_revision"],
        world,
        engine.accelerator_name(),
        ds_config_path,
    )
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_head = sum(p.numel() for p in model.parameters()) - n_enc
    log.info(
        "objective %s | encoder %.1fM params, %s %.1fM params",
        cfg.objective,
        n_enc / 1e6,
        "predictor" if target is not None else "MLM head",
        n_head / 1e6,
    )
    trainer = Trainer(
        cfg, eng, target.to(dev) if target is not None else None, dev, rank, world, run_dir, sha
    )
    trainer.mlm_mask_id = mask_id
    e = cfg.eval
    trainer.alarm = CollapseAlarm(
        e.collapse_min_rank_frac * cfg.model.dim, e.collapse_min_target_std, e.collapse_patience
    )
    trainer.autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
    trainer.ranks = RankWindow(cfg.log.rankme_window)
    trainer.writer = ScalarWriter(run_dir / "tb" if rank == 0 and cfg.log.tensorboard else None)
    trainer.loader = build_train_loader(cfg, rank, world)
    trainer.fault_nan_step = int(os.environ.get(FAULT_NAN_ENV, -1))
    where = checkpoint.resolve_resume(cfg.train.resume, run_dir / "checkpoints")
    if where is not None:
        trainer.restore(*where)
    return trainer


def run(trainer: Trainer) -> int:
    """Train to ``train.max_steps``. Returns 0, or :data:`EXIT_REQUEUE` after a stop signal
    (a checkpoint of the agreed step has been written)."""
    cfg, t = trainer.cfg, trainer.cfg.train
    trainer.stop.install()
    need_val = t.val_interval > 0 or cfg.eval.interval > 0
    val_loader = build_val_loader(cfg, trainer.rank, trainer.world) if need_val else None
    batches = iter(trainer.loader)
    acc = Accumulators.zeros(trainer.dev)
    while trainer.step < t.max_steps:
        micro = [trainer.prepare(next(batches), i) for i in range(t.grad_accum_steps)]
        for b in micro:
            acc.model_flops = acc.model_flops + trainer.batch_flops(b)
        last = trainer.train_step(micro, acc)
        step, last_step = trainer.step, trainer.step == t.max_steps
        eval_now = cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or last_step)
        if step % t.log_interval == 0 or last_step or eval_now:
            scalars = trainer.log_step(acc, last)
            trainer.watch_collapse(scalars)
            if t.val_interval > 0 and (step % t.val_interval == 0 or last_step):
                scalars["val/loss"] = trainer.validate(val_loader)
            if eval_now:
                scalars.update(trainer.quick_eval(val_loader))
            _report(trainer, scalars)
            acc = Accumulators.zeros(trainer.dev)
        if trainer.stop_agreed:
            trainer.log.warning(
                "stop signal: checkpointing step %d, exiting with %d for requeue",
                trainer.step,
                EXIT_REQUEUE,
            )
            trainer.save()
            return EXIT_REQUEUE
        if t.save_interval > 0 and (
            trainer.step % t.save_interval == 0 or trainer.step == t.max_steps
        ):
            trainer.save()
        if trainer.step == t.exit_at_step:
            if not (t.save_interval > 0 and trainer.step % t.save_interval == 0):
                trainer.save()
            trainer.log.info("train.exit_at_step=%d reached: exiting", t.exit_at_step)
            break
    if trainer.writer is not None:
        trainer.writer.close()
    return 0


def _report(trainer: Trainer, scalars: dict[str, float | None]) -> None:
    if trainer.rank != 0:
        return
    trainer.writer.write(trainer.step, scalars)
    record = {"step": trainer.step, **{k: v for k, v in scalars.items() if v is not None}}
    trainer.history.append(record)
    with open(trainer.run_dir / "logs" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    line = console_line(trainer.step, trainer.cfg.train.max_steps, scalars)
    if "val/loss" in scalars:
        line += f" | val {scalars['val/loss']:.4f}"
    trainer.log.info(line)
