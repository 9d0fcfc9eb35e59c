"""model.init_from with the offline all-MiniLM-L6-v2 weights: a JEPA run continues from them with
the real engine (the EMA target starts as their copy), and shards made with another tokenizer are
refused, naming both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lang_jepa import checkpoint
from lang_jepa.pretrained import bert_state
from preprocessing.tokenizer import default_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]
MINILM = default_tokenizer_dir()
pytestmark = [pytest.mark.processes, pytest.mark.engine]


def _train(run_dir: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "train.py", "--config", "tiny", f"data.shards={shards}",
           f"train.run_dir={run_dir}", f"model.init_from={MINILM}", "model.seq_len=64",
           "data.micro_batch_size=2", "train.val_interval=0", "train.log_interval=1",
           "train.precision=fp32", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_jepa_run_continues_from_minilm(tmp_path, tiny_shards):
    run = tmp_path / "run"
    proc = _train(run, tiny_shards, "train.max_steps=2", "train.save_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "model.init_from=" in proc.stdout + proc.stderr
        and "model.dim=384" in proc.stdout + proc.stderr
    )
    ckpt, tag = checkpoint.locate(run)
    meta = checkpoint.read_meta(ckpt, tag)
    assert meta["config"]["model"]["arch"] == "bert" and meta["config"]["model"]["depth"] == 6
    start = bert_state(MINILM, 6)
    target = checkpoint.target_state(ckpt, tag)
    online = checkpoint.encoder_state(checkpoint.consolidated_state(ckpt, tag))
    assert target.keys() == start.keys() == online.keys()
    # two EMA updates at momentum ~0.996 from MiniLM's weights: the target is still almost them,
    # the trained encoder has moved further
    moved = {k: (online[k] - start[k]).abs().max().item() for k in start}
    drift = {k: (target[k] - start[k]).abs().max().item() for k in start}
    assert max(moved.values()) > 0 and all(drift[k] <= 0.01 * moved[k] + 1e-6 for k in start)
    assert target["pos_emb.weight"].shape == start["pos_emb.weight"].shape == (512, 384)


def test_shards_of_another_tokenizer_are_refused_naming_both(tmp_path, demo_raw):
    from preprocessing.build_shards import main as build
    from preprocessing.train_tokenizer import train_tokenizer

    docs = sorted(demo_raw.glob("*.txt"))[:6]
    train_tokenizer([str(d) for d in docs], 400, tmp_path / "tok")
    shards = tmp_path / "shards"
    argv = ["--output", str(shards), "--tokenizer", str(tmp_path / "tok"), "--workers", "0",
            "--quiet", "--val-fraction", "0.2", "--input", *map(str, docs)]  # fmt: skip
    assert build(argv) == 0
    proc = _train(tmp_path / "run", shards, "train.max_steps=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: model.init_from=")
    assert str(tmp_path / "tok") in err and str(MINILM) in err and "not the checkpoint's" in err
