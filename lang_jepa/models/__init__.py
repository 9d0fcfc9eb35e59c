"""Model code: plain torch.nn, no DeepSpeed, no torch.distributed, no file I/O."""

from .encoder import Predictor, TextEncoder, pool_by_slot

__all__ = ["Predictor", "TextEncoder", "pool_by_slot"]
