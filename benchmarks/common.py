"""Helpers shared by the training benchmarks: device names, synthetic shards, medians, tables.

Nothing here imports DeepSpeed; ``train_bench.py`` does.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lang_jepa.data.synthetic import Doc, write_shards  # noqa: E402

SYNTHETIC_VOCAB = 30522  # the BERT vocabulary the demo shards use


def cpu_name() -> str:
    """CPU model and the cores this process may use, e.g. 'AMD EPYC 9R14 x2 cores'."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{len(os.sched_getaffinity(0))} cores"


def device_name(dev: Any) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    import torch

    if getattr(dev, "type", "cpu") == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def synthetic_docs(n_docs: int, seed: int = 0, vocab_size: int = SYNTHETIC_VOCAB) -> list[Doc]:
    """Documents shaped like the demo corpus (State of the Union addresses): 150-450 sentences
    of lognormal length (median ~24 tokens, 3..200), uniformly random token ids."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(150, 450))
        lens = np.clip(rng.lognormal(np.log(24), 0.55, size=n), 3, 200).astype(np.int64)
        sents = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        tokens = rng.integers(1000, vocab_size, size=int(sents[-1]))
        docs.append((f"synthetic-{i}", tokens, sents))
    return docs


def write_synthetic_shards(out_dir: Path, tokens_needed: int, seed: int = 0) -> Path:
    """Shards (train + val) with at least ``tokens_needed`` train tokens, in the real format."""
    n_docs = max(8, -(-tokens_needed // 6500) + 2)  # ~7000 tokens per document
    docs = synthetic_docs(n_docs + 2, seed)
    train = [docs[i:n_docs:4] for i in range(4)]
    return write_shards(out_dir, {"train": train, "val": [docs[n_docs:]]}, SYNTHETIC_VOCAB)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: numbers formatted, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(rows: Iterable[tuple[str, Any]], title: str = "") -> str:
    """A two-column text table of (name, value)."""
    rows = list(rows)
    width = max((len(name) for name, _ in rows), default=0)
    lines = [title] if title else []
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
