"""The collapse alarm on a real run: with the EMA switched off it trips and stops training (its unit
behaviour is in tests/unit/test_collapse_alarm.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cpu_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.processes


@pytest.mark.engine
def test_ema_off_run_trips_the_alarm_and_stops(tmp_path, tiny_shards):
    env = cpu_env()
    cmd = [sys.executable, "train.py", "--config", "tiny", f"data.shards={tiny_shards}",
           f"train.run_dir={tmp_path / 'run'}", "train.max_steps=200", "train.log_interval=5",
           "train.val_interval=0", "train.save_interval=0", "optim.ema_start=0", "optim.ema_end=0",
           "eval.collapse_stop=true"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "REPRESENTATION COLLAPSE" in proc.stdout
    assert "representation collapse at step" in proc.stderr
    step = int(proc.stderr.split("representation collapse at step ")[1].split()[0])
    # checks count after the warmup (5 steps): the earliest trip is 3 checks later, at step 20
    assert 20 <= step < 200
