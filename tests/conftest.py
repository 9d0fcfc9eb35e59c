"""Shared fixtures: the demo corpus and a tiny shard directory built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# DeepSpeed compiles its CPU ops once per checkout (as the Makefile does): a cache shared between
# two checkouts would be rebuilt each time the other one starts.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
DEMO_RAW = REPO / "data" / "demo" / "raw"
TINY_DOCS = 20


@pytest.fixture(scope="session")
def demo_raw() -> Path:
    """``data/demo/raw``: the 233 State of the Union .txt files (``make test`` fetches them)."""
    if not (DEMO_RAW / ".complete").is_file():
        pytest.fail(
            f"{DEMO_RAW} is missing or incomplete: run `make demo-data` "
            "(python -m preprocessing.fetch_demo --out data/demo/raw) first"
        )
    return DEMO_RAW


@pytest.fixture(scope="session")
def tiny_shards(demo_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real shard directory built once per session from the first 20 demo documents.

    Shape (deterministic; built in-process by ``preprocessing.build_shards`` with the default
    BERT-uncased tokenizer, vocab 30522, uint16 tokens): ``--val-fraction 0.1 --shard-docs 4``
    -> train: 18 samples (documents), 1060 sentences, 48478 tokens in 5 shards
    (``train-000000.tar`` .. ``train-000004.tar`` holding 4, 4, 4, 4, 2 samples); val: 2 samples
    (1800 Adams, 1802 Jefferson), 100 sentences, 4156 tokens in ``val-000000.tar``;
    ``tokenizer/`` and ``manifest.json`` beside them. Builds in ~3 s. Treat it as read-only: it
    is shared by every test of the session.
    """
    from preprocessing.build_shards import main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    files = sorted(demo_raw.glob("*.txt"))[:TINY_DOCS]
    out = tmp_path_factory.mktemp("tiny_shards")
    argv = ["--output", str(out), "--val-fraction", "0.1", "--shard-docs", "4", "--workers", "0"]
    argv += ["--quiet", "--input", *map(str, files)]
    if main(argv) != 0:
        pytest.fail("building the tiny_shards fixture failed (see stderr)")
    return out
