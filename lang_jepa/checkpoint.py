"""Checkpoints in DeepSpeed's layout: ``run_dir/checkpoints/<tag>/`` plus DeepSpeed's ``latest``.

DeepSpeed saves the model, optimizer and (partitioned) fp32 masters; ``client_state`` carries the
rest of what an exact resume needs: the global step, the EMA target encoder, the data reader's
position, RNG states, the resolved config and the shard manifest's hash.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("lang_jepa")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``auto`` (the run's latest, if any), ``none``, or a checkpoint path
    (a ``<tag>`` directory or a checkpoints directory with a ``latest`` file)."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, latest_tag(path) or ""
    if path.is_dir() and path.parent.is_dir():
        return path.parent, path.name
    raise FileNotFoundError(f"train.resume={resume!r}: no checkpoint there (want a tag directory "
                            f"or a directory with a 'latest' file)")


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int) -> None:
    """Save on every rank (DeepSpeed's collective), then prune to the newest ``keep`` tags."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag_for(step), client_state=client_state)
    if engine.global_rank == 0 and keep > 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", ckpt_dir / tag_for(step))


def load(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load a checkpoint into the engine; returns its client state. Failure is an error, never a
    silent fresh start."""
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    log.info("resumed from %s (step %d)", load_path, client_state["step"])
    return client_state
