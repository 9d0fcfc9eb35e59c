"""Helpers shared by tests/unit and tests/integration (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from lang_jepa.config import Config, load_config
from lang_jepa.data import build_train_loader, manifest_vocab_size
from lang_jepa.data.synthetic import random_docs
from lang_jepa.objectives import build_models
from lang_jepa.shards import load_manifest, shard_urls
from preprocessing.build_shards import main as build

REPO = Path(__file__).resolve().parent.parent


# --- processes ---------------------------------------------------------------------------------


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


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a machine that stops would. A signal to the
    launcher's process group is not enough: torch.distributed.run starts every rank in a session
    of its own, and ranks whose launcher died go on training."""
    import signal
    import subprocess

    def descendants(p: int) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout
        kids = [int(k) for k in out.split()]
        return kids + [d for k in kids for d in descendants(k)]

    for victim in [pid, *descendants(pid)]:  # the launcher first: it cannot restart a rank
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def losses(run_dir: Path) -> dict[int, float]:
    """The loss logged at each step of a run (``logs/metrics.jsonl``); a step logged again after
    a restart keeps its last value, a record without a finite loss is left out."""
    out = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out


def wait_for_run_dir_release(run_dir: Path, timeout: float = 60.0) -> None:
    """Block until no process holds ``run_dir``'s training lock. A SIGKILLed rank keeps the lock
    until the kernel has finished tearing it down, which can be after its launcher was reaped; a
    test that restarts at once must wait for that, as a requeued job does."""
    import time

    from lang_jepa.runinfo import RunDirBusy, RunDirLock

    deadline = time.monotonic() + timeout
    while True:
        try:
            RunDirLock(run_dir).release()
            return
        except RunDirBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# --- preprocessing: shards read back -----------------------------------------------------------


def read_back(shard_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every sample of every split, in manifest order, read with webdataset."""
    out = {}
    for split in ("train", "val"):
        urls = shard_urls(shard_dir, split)
        samples = []
        for url in urls:
            for s in wds.WebDataset(url, shardshuffle=False, empty_check=False).decode():
                samples.append({"url": Path(url).name, **s})
        out[split] = samples
    return out


def check_counts(shard_dir: Path) -> dict[str, Any]:
    """The manifest's per-shard and per-split counts equal what the tars hold; return it."""
    manifest = load_manifest(shard_dir)
    samples = read_back(shard_dir)
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            held = [s for s in samples[split] if s["url"] == shard["url"]]
            assert shard["samples"] == len(held), shard["url"]
            assert shard["sentences"] == sum(len(s["sents.npy"]) - 1 for s in held)
            assert shard["tokens"] == sum(len(s["tokens.npy"]) for s in held)
        assert info["samples"] == len(samples[split])
        assert info["tokens"] == sum(len(s["tokens.npy"]) for s in samples[split])
    docs = manifest["documents"]
    assert docs["read"] == docs["written"] + sum(docs["skipped"].values())
    return manifest


def build_and_read(tmp_path: Path, files: list[Path], *extra: str) -> dict:
    """Build ``files`` in-process (no val split) into ``tmp_path/out``, check every sample's
    sentence offsets, and return the manifest with the samples under ``_samples``."""
    out = tmp_path / "out"
    argv = ["--input", *map(str, files), "--output", str(out), "--workers", "0", "--quiet"]
    assert build([*argv, "--val-fraction", "0", *extra]) == 0
    manifest = load_manifest(out)
    docs = manifest["documents"]
    assert docs["read"] == docs["written"] + sum(docs["skipped"].values())
    samples = list(wds.WebDataset(shard_urls(out, "train"), shardshuffle=False).decode())
    assert len(samples) == manifest["splits"]["train"]["samples"]
    for s in samples:
        sents = s["sents.npy"]
        assert sents[0] == 0 and sents[-1] == len(s["tokens.npy"]) and np.all(np.diff(sents) > 0)
    manifest["_samples"] = samples
    return manifest


# --- loader: synthetic shards (the ``synthetic_shards`` fixture) --------------------------------

SYNTHETIC_DOCS = random_docs(14, seed=0, sentences=(4, 30), lengths=(3, 20))


def loader_cfg(shard_dir: Path, *overrides: str) -> Config:
    return load_config("tiny", [f"data.shards={shard_dir}", "data.min_sentences=2", *overrides])


def same_batch(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def check_resume_gives_exactly_the_next_batches(
    shard_dir: Path, workers: int, own_state: bool, packing: bool
) -> None:
    """Rank 1 of 2, resumed after 7 batches from a JSON round trip of a loader state, yields
    exactly the reference stream's batches 8-12 (``workers`` DataLoader workers per rank)."""
    cfg = loader_cfg(
        shard_dir,
        f"data.num_workers={workers}",
        "data.prefetch_factor=2",
        f"data.packing={packing}",
    )
    reference = build_train_loader(cfg, rank=1, world_size=2)
    expected = [next(reference) for _ in range(12)]
    assert reference.epoch >= 1 or workers == 2  # batches 7-12 cross an epoch end (and a drain)
    reference.close()
    first = build_train_loader(cfg, rank=1 if own_state else 0, world_size=2)
    for _ in range(7):
        next(first)
    # own_state: the saved positions; else rank 0's state (checkpoints that keep one client
    # state): rank 1 must replay from the batch count and still land on the same batch.
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    first.close()
    resumed = build_train_loader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(5)]
    resumed.close()
    assert state["batches"] == 7
    assert all(same_batch(g, e) for g, e in zip(got, expected[7:], strict=True))
    assert not same_batch(got[0], expected[6])


# --- model: a real batch -----------------------------------------------------------------------


def setup_batch(tiny_shards: Path, *overrides: str) -> tuple:
    """(cfg, context model, target encoder, first train batch, vocab) of the tiny preset on
    ``tiny_shards``, weights seeded with 0."""
    cfg = load_config("tiny", [f"data.shards={tiny_shards}", *overrides])
    vocab = manifest_vocab_size(tiny_shards)
    torch.manual_seed(0)
    model, target = build_models(cfg, vocab)
    batch = next(iter(build_train_loader(cfg, 0, 1)))
    return cfg, model, target, batch, vocab
