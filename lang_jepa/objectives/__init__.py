"""Training objectives behind one interface (:class:`~lang_jepa.objectives.base.Objective`).

``objective=jepa`` is LANG-JEPA itself; ``objective=mlm`` is the same-encoder masked-LM control;
``objective=jepa+mlm`` trains both losses on one encoder; ``objective=decoder`` trains a concept
decoder on a frozen exported encoder.
:func:`build_objective` picks one by the config value; the training loop never asks which.
"""

from __future__ import annotations

from ..config import OBJECTIVE_NAMES, Config, ConfigError
from .base import (
    Batch,
    Objective,
    Outputs,
    Phase,
    Runtime,
    autocast_context,
    batch_segments,
    gather_tokens,
    move_batch,
    no_phase,
)
from .decoder import DecoderObjective
from .hybrid import JEPAMLM, JEPAMLMObjective
from .jepa import (
    JEPA,
    JEPAObjective,
    build_models,
    compute_targets,
    infonce,
    jepa_loss,
    pooled_features,
    pooled_targets,
    target_features,
    token_targets,
)
from .mlm import MLM, MLMObjective

OBJECTIVES: dict[str, type] = {
    "jepa": JEPAObjective,
    "mlm": MLMObjective,
    "jepa+mlm": JEPAMLMObjective,
    "decoder": DecoderObjective,
}
if tuple(OBJECTIVES) != OBJECTIVE_NAMES:
    raise ImportError(f"lang_jepa.config.OBJECTIVE_NAMES {OBJECTIVE_NAMES} != {tuple(OBJECTIVES)}")


def build_objective(cfg: Config, vocab_size: int, rt: Runtime) -> Objective:
    """The objective named by ``cfg.objective``, its modules built (seed the RNGs first)."""
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(
            f"config key 'objective': {cfg.objective!r} is not one of {', '.join(OBJECTIVES)}"
        )
    return OBJECTIVES[cfg.objective](cfg, vocab_size, rt)


__all__ = [
    "JEPA",
    "JEPAMLM",
    "JEPAMLMObjective",
    "MLM",
    "OBJECTIVES",
    "Batch",
    "DecoderObjective",
    "JEPAObjective",
    "MLMObjective",
    "Objective",
    "Outputs",
    "Phase",
    "Runtime",
    "autocast_context",
    "batch_segments",
    "build_models",
    "build_objective",
    "compute_targets",
    "gather_tokens",
    "infonce",
    "jepa_loss",
    "move_batch",
    "no_phase",
    "pooled_features",
    "pooled_targets",
    "target_features",
    "token_targets",
]
