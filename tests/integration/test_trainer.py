"""The trainer as a whole: accumulation derived from the global batch reaches DeepSpeed's own
checkpointed counters, and the precision choice is logged and recorded in run_info.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lang_jepa import engine
from tests.helpers import cpu_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]


def test_global_batch_reaches_deepspeeds_checkpointed_counters(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "tiny", f"data.shards={tiny_shards}",
           f"train.run_dir={run_dir}", "train.max_steps=6", "train.save_interval=6",
           "train.val_interval=0", "train.log_interval=3", "data.micro_batch_size=2",
           "train.global_batch_size=8", "train.precision=auto"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = torch.load(
        run_dir / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,  # DeepSpeed's own file (pickled engine state)
    )
    assert states["global_steps"] == 6 and states["global_samples"] == 6 * 8
    steps = [json.loads(x)["step"] for x in (run_dir / "logs" / "metrics.jsonl").open()]
    assert steps == [3, 6]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["precision"]["requested"] == "auto"
    assert info["precision"]["resolved"] == (
        "bf16" if any(engine.cpu_bf16_flags().values()) else "fp32"
    )
    assert info["deepspeed_config"]["gradient_accumulation_steps"] == 4
    assert "precision " + info["precision"]["resolved"] in proc.stdout
    assert "batch 2 x 1 ranks x 4 accumulation = 8 windows per step" in proc.stdout
