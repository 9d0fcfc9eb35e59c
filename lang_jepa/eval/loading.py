"""Load what the suite evaluates: a run directory (predictor + encoders) or an export directory.

A run directory (``config.yaml`` + ``checkpoints/``) gives the JEPA module (context encoder +
predictor, consolidated fp32 master weights) and the EMA target encoder
(``target_encoder.safetensors``). An export directory (``python -m lang_jepa.export``) gives
an encoder only. Either way the encoder-level tasks run on a :class:`lang_jepa.Encoder`, so a
run of any objective (``jepa`` or ``mlm``) is evaluated by the same code as soon as it has an
encoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lang_jepa import checkpoint
from lang_jepa.config import Config, load_config
from lang_jepa.encoder_api import FORMAT, TOKENIZER_DIR, Encoder, load_tokenizer
from lang_jepa.models import TextEncoder, build_encoder
from lang_jepa.objectives import JEPA, build_models

log = logging.getLogger("lang_jepa.eval")


@dataclass
class LoadedRun:
    """A run's models at one checkpoint (CPU, eval mode)."""

    cfg: Config
    step: int
    tag: str
    objective: str  # jepa | mlm (any objective other than jepa: no predictor metrics)
    jepa: JEPA | None  # context encoder + predictor (jepa runs)
    target: TextEncoder | None  # EMA target encoder, when the checkpoint has one
    online: TextEncoder | None  # the trained context / MLM encoder
    tokenizer_dir: Path
    vocab_size: int


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def run_objective(cfg: Config) -> str:
    """``jepa`` unless the config names another objective (``objective`` or ``train.objective``)."""
    for owner in (cfg, getattr(cfg, "train", None)):
        value = getattr(owner, "objective", None)
        if isinstance(value, str) and value:
            return value
    return "jepa"


def load_run(run_dir: str | Path, tag: str | None = None) -> LoadedRun:
    """Models of a run directory at ``tag`` (default: ``checkpoints/latest``)."""
    run = Path(run_dir)
    cfg = load_config(str(run / "config.yaml"))
    ckpt_dir, tag = checkpoint.locate(run, tag)
    meta = checkpoint.read_meta(ckpt_dir, tag)
    state = checkpoint.consolidated_state(ckpt_dir, tag)
    objective = run_objective(cfg)
    vocab = (
        int(state["encoder.tok_emb.weight"].shape[0])
        if "encoder.tok_emb.weight" in state
        else cfg.model.vocab_size
    )
    jepa, target = build_models(cfg, vocab)
    online: TextEncoder | None = None
    if objective.startswith("jepa"):  # jepa, jepa+mlm (its MLM head is not needed here)
        keep = ("encoder.", "predictor.", "projector.")  # not the hybrid's MLM head
        jepa.load_state_dict({k: v for k, v in state.items() if k.startswith(keep)}, strict=True)
        jepa.float().eval()
        online = jepa.encoder
    else:  # e.g. mlm: only the encoder's weights are shared with the JEPA layout
        jepa = None
        online = build_encoder(cfg.model, vocab).eval()
        online.load_state_dict(checkpoint.encoder_state(state), strict=True)
    if checkpoint.has_target(ckpt_dir, tag):
        target.load_state_dict(checkpoint.target_state(ckpt_dir, tag), strict=True)
    else:
        target = None
    tok = Path(cfg.data.shards) / TOKENIZER_DIR
    return LoadedRun(cfg, int(meta["step"]), tag, objective, jepa, target, online, tok, vocab)


def make_encoder(model: nn.Module, tokenizer_dir: Path, device: str = "cpu") -> Encoder:
    """Wrap a TextEncoder (any weights: target, online, random) in the public Encoder API."""
    hp = {"seq_len": int(model.max_len), "dim": int(model.dim)}
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {tokenizer_dir} not found (the run's data.shards)"
        )
    return Encoder(model.float().eval(), load_tokenizer(tokenizer_dir), {"format": FORMAT, "model": hp},
                   torch.device(device))  # fmt: skip


def random_encoder(cfg_model: dict[str, Any], vocab_size: int, tokenizer_dir: Path,
                   seed: int = 0) -> Encoder:  # fmt: skip
    """A freshly initialised encoder of the same architecture (the random-init baseline), seeded.

    ``cfg_model``: a run's ``model`` config or an export's ``model`` section (see
    :func:`lang_jepa.models.encoder_config`)."""
    torch.manual_seed(seed)
    return make_encoder(build_encoder(cfg_model, vocab_size), tokenizer_dir)
