"""Model code: plain torch.nn, no DeepSpeed, no torch.distributed, no file I/O."""

from .encoder import (
    ENCODER_FIELDS,
    Predictor,
    TextEncoder,
    build_encoder,
    encoder_config,
    pool_by_slot,
)
from .layers import matmul_params

__all__ = [
    "ENCODER_FIELDS",
    "Predictor",
    "TextEncoder",
    "build_encoder",
    "encoder_config",
    "matmul_params",
    "pool_by_slot",
]
