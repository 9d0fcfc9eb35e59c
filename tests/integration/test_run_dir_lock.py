"""The run-directory lock across processes: held by a live training, gone with a killed one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from lang_jepa.runinfo import RunDirBusy, RunDirLock
from tests.helpers import cpu_env

pytestmark = pytest.mark.processes

HOLD = "import sys, time; from lang_jepa.runinfo import RunDirLock; RunDirLock(__import__('pathlib').Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], env=cpu_env(),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
            RunDirLock(tmp_path / "run")
        proc.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
        proc.wait(timeout=30)
        time.sleep(0.1)
        RunDirLock(tmp_path / "run").release()  # the next start (a requeue) takes it
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.engine
def test_a_second_training_into_one_run_directory_fails_at_once(tmp_path, tiny_shards):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "tiny", f"data.shards={tiny_shards}",
           f"train.run_dir={run_dir}", "train.max_steps=100000", "train.log_interval=1",
           "train.save_interval=0", "train.val_interval=0"]  # fmt: skip
    first = subprocess.Popen(cmd, cwd=repo, env=cpu_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        metrics = run_dir / "logs" / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None and time.time() < deadline, first.stdout.read()
            time.sleep(0.1)
        before = metrics.read_text().count("\n")
        second = subprocess.run(cmd, cwd=repo, env=cpu_env(), capture_output=True, text=True,
                                timeout=300)  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by another training (host " in second.stderr
        assert f"pid {first.pid})" in second.stderr
        assert metrics.read_text().count("\n") >= before  # the first one's log untouched by it
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
