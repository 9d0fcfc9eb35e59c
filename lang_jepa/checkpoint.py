"""Checkpoints: DeepSpeed's layout plus the state an exact resume needs.

``run_dir/checkpoints/<tag>/`` (tag ``step00000040``) holds:

- DeepSpeed's files: module and optimizer states, ZeRO partitions, fp32 masters (its own layout,
  readable by ``zero_to_fp32``);
- ``target_encoder.safetensors``: the EMA target encoder (fp32; identical on every rank, written
  by rank 0);
- ``trainer_state_rank{R}.pt``: that rank's global step, data-reader position and RNG states
  (tensors and plain Python values only: loadable with ``torch.load(weights_only=True)``);
- ``meta.json``: step, world size, ZeRO stage, resolved config, shard manifest hash.

``checkpoints/latest`` names the newest *complete* checkpoint: it is replaced atomically by rank 0
only after every rank has finished writing (DeepSpeed's own ``latest`` is written before the other
ranks are done, so it is switched off). A crash while writing leaves the previous checkpoint whole
and ``latest`` pointing at it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("lang_jepa")
TARGET_FILE = "target_encoder.safetensors"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    """torch / numpy / random states as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "random": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuples(state["random"]))


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``auto`` (the run's latest, if any), ``none``, or a path to a
    ``<tag>`` directory or to a checkpoints directory holding ``latest``."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, latest_tag(path) or ""
    if (path / META_FILE).is_file():
        return path.parent, path.name
    raise CheckpointError(
        f"train.resume={resume!r}: no checkpoint there (want a checkpoint directory with "
        f"{META_FILE}, or a checkpoints directory with a 'latest' file)"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    engine: Any,
    ckpt_dir: Path,
    state: dict[str, Any],
    target: torch.nn.Module | None,
    meta: dict[str, Any],
    keep: int,
    barrier: Any,
) -> Path:
    """Write one checkpoint on every rank (a collective), then publish it as ``latest``."""
    tag = tag_for(int(state["step"]))
    rank = engine.global_rank
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"step": int(state["step"])}, save_latest=False
    )
    out = ckpt_dir / tag
    torch.save(state, out / f"trainer_state_rank{rank}.pt")
    if rank == 0:
        if target is not None:
            weights = {k: v.detach().contiguous().cpu() for k, v in target.state_dict().items()}
            save_file(weights, str(out / TARGET_FILE))
        _write_atomic(out / META_FILE, json.dumps(meta, indent=2, default=str))
    barrier()  # every rank has written everything
    if rank == 0:
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep, tag)
    barrier()
    log.info("saved checkpoint %s", out)
    return out


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
    for old in tags[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    path = ckpt_dir / tag / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir / tag}: incomplete checkpoint ({META_FILE} missing)")
    return json.loads(path.read_text())


def load(engine: Any, ckpt_dir: Path, tag: str, target: torch.nn.Module | None) -> dict[str, Any]:
    """Load model, optimizer and target encoder; returns this rank's trainer state. A checkpoint
    that cannot be loaded is an error, never a silent fresh start."""
    meta = read_meta(ckpt_dir, tag)
    world = engine.world_size if hasattr(engine, "world_size") else None
    if meta.get("world_size") not in (None, world):
        raise CheckpointError(
            f"{ckpt_dir / tag} was written by {meta['world_size']} ranks, this run has {world}: "
            "resuming with another number of ranks is not supported for ZeRO-partitioned optimizer "
            "state (convert it with DeepSpeed's ds_to_universal.py and resume with "
            "checkpoint.load_universal in the DeepSpeed config)"
        )
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    if target is not None:
        device = str(next(target.parameters()).device)
        target.load_state_dict(load_file(str(ckpt_dir / tag / TARGET_FILE), device=device))
    state_file = ckpt_dir / tag / f"trainer_state_rank{engine.global_rank}.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing")
    state = torch.load(state_file, weights_only=True)
    log.info("resumed from %s (step %d)", ckpt_dir / tag, state["step"])
    return state
