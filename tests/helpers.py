"""Helpers shared by the tests that start real training processes."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, with DeepSpeed on the CPU and one thread per
    rank (so runs compared in a test use the same floating-point reduction order)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env
