"""Run a few real DeepSpeed train steps and dump what the engine tests check (one file per rank).

Launched by tests/integration/test_engine.py with ``python`` (one rank) or ``torchrun`` (two ranks):

    python tests/integration/engine_worker.py OUT_DIR STAGE [key.sub=value ...]

Uses the real setup (lang_jepa.trainer.setup), the real loader over real shards and the real
train step. The first ``N_FIXED`` batches are taken once and cycled, so the loss is measured on a
small fixed set. After every step it records the loss and the full fp32 online encoder weights
(gathered with DeepSpeed's safe_get_full_fp32_param at ZeRO-1..3), and at the end the target
encoder, so the test can recompute the EMA recurrence independently.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

N_FIXED = 4


def full_fp32(trainer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from deepspeed.utils import safe_get_full_fp32_param

    from lang_jepa.engine import _unfused_masters

    masters = _unfused_masters(trainer.eng.optimizer)
    out = {}
    for name, p in trainer.model.encoder.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = masters.get(id(p), p)
        out[name] = full.detach().float().cpu().clone()
    return out


def main() -> None:
    out_dir, stage, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    from lang_jepa import schedules
    from lang_jepa.config import load_config
    from lang_jepa.objectives import move_batch
    from lang_jepa.trainer import Trainer

    ds = json.loads((REPO / "ds_configs" / f"zero{max(stage, 1)}.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    if stage == 3:  # partition even the tiny parameters (DEEPSPEED-CPU.md: ZeRO-3 hides bugs)
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = Path(tempfile.mkdtemp()) / "ds.json"
    ds_path.write_text(json.dumps(ds))
    cfg = load_config("tiny", overrides)
    trainer = Trainer.build(cfg, str(ds_path))
    after_step, ema_updates = trainer.objective.after_step, []

    def counted(eng, step):  # how often, and at which steps, the EMA update runs
        ema_updates.append(step)
        after_step(eng, step)

    trainer.objective.after_step = counted
    it = iter(trainer.loader)
    fixed = [next(it) for _ in range(N_FIXED * cfg.train.grad_accum_steps)]
    losses, momenta, online = [], [], [full_fp32(trainer)]
    k = 0
    while trainer.step < cfg.train.max_steps:
        micro = []
        for _ in range(cfg.train.grad_accum_steps):
            micro.append(move_batch(fixed[k % len(fixed)], trainer.dev))
            k += 1
        before = float(trainer.metrics.acc.loss)
        momenta.append(schedules.ema_momentum(trainer.step, cfg.train.max_steps, cfg.optim))
        trainer.train_step(micro)
        losses.append((float(trainer.metrics.acc.loss) - before) / len(micro))
        online.append(full_fp32(trainer))
    result = {
        "losses": losses,
        "momenta": momenta,
        "online": online,
        "target": {
            k: v.detach().cpu().clone() for k, v in trainer.objective.target.state_dict().items()
        },
        # the rank's own replica of the (low-precision) weights; ZeRO-3 holds only a partition
        "replica": {
            k: v.detach().float().cpu().clone()
            for k, v in trainer.model.named_parameters()
            if not hasattr(v, "ds_id")
        },
        "world": trainer.world,
        "grad_accum": cfg.train.grad_accum_steps,
        "ema_updates": ema_updates,
        "global_steps": trainer.eng.global_steps,
        "global_samples": trainer.eng.global_samples,
    }
    torch.save(result, out_dir / f"rank{trainer.rank}.pt")


if __name__ == "__main__":
    main()
