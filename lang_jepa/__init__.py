"""LANG-JEPA: joint-embedding predictive pretraining of sentence concepts.

``from lang_jepa import Encoder`` loads :class:`lang_jepa.encoder_api.Encoder` on first use, so
``import lang_jepa`` itself stays light (no torch import).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Encoder", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Encoder":
        from .encoder_api import Encoder

        return Encoder
    raise AttributeError(f"module 'lang_jepa' has no attribute {name!r}")
