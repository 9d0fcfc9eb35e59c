"""Nothing lost, nothing silent, with the real engine: a run directory holding checkpoints is
never restarted silently, pruning deletes only this run's own older checkpoints, a refused start
leaves the run directory exactly as it was, and user errors are one ``error:`` line with exit 2.
CPU, fp32, one rank, ZeRO-2, the tiny preset on real shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import cpu_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]


def train(run_dir: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "--deepspeed_config", "ds_configs/zero2.json",
           "--config", "tiny", f"data.shards={shards}", f"train.run_dir={run_dir}",
           "train.max_steps=10", "train.log_interval=1", "train.val_interval=0",
           "train.save_interval=5", "train.precision=fp32", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)


def tree(run_dir: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``run_dir``: size, mtime and the first bytes (what a write would change).
    The lock file is left out: every start takes the lock and records its host and pid there."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:64])
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shards) -> Path:
    """A run directory holding step 5 and step 10 (10 steps, a checkpoint every 5)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = train(run_dir, tiny_shards)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert tags(run_dir) == ["step00000005", "step00000010"]
    return run_dir


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.mark.parametrize("damage", ["empty", "missing", "garbage"])
def test_a_damaged_latest_is_refused_naming_the_way_on(copy, tiny_shards, damage):
    latest = copy / "checkpoints" / "latest"
    if damage == "missing":
        latest.unlink()
    else:
        latest.write_bytes(b"" if damage == "empty" else b"\x00\xff junk")
    before = tree(copy)
    proc = train(copy, tiny_shards, "train.max_steps=20")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    newest = copy / "checkpoints" / "step00000010"
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: {copy / 'checkpoints'} holds ")
    assert f"newest complete checkpoint is {newest}" in line
    assert f"train.resume={newest}" in line and "train.resume=none" in line
    # nothing started, nothing written, nothing pruned
    assert tree(copy) == before
    # the way on it names works: resume from that checkpoint, exactly where it was
    on = train(copy, tiny_shards, "train.max_steps=12", f"train.resume={newest}")
    assert on.returncode == 0, on.stderr[-3000:]
    assert "resumed from" in on.stdout and "(step 10)" in on.stdout
    assert steps_logged(copy)[-2:] == [11, 12]


def test_a_fresh_start_on_purpose_keeps_the_earlier_run(copy, tiny_shards):
    old = {t: (copy / "checkpoints" / t / "meta.json").read_text() for t in tags(copy)}
    proc = train(copy, tiny_shards, "train.resume=none", "train.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (moved,) = (copy / "superseded").iterdir()
    assert f"the earlier run's state was moved to {moved}" in proc.stdout
    # the earlier run whole: its checkpoints (never overwritten nor pruned) and its logs
    assert {t: (moved / "checkpoints" / t / "meta.json").read_text() for t in old} == old
    assert steps_logged(moved) == list(range(1, 11))
    # the new run: its own checkpoints and one record per step
    assert tags(copy) == ["step00000005"] and steps_logged(copy) == list(range(1, 6))


def test_pruning_keeps_newer_checkpoints(copy, tiny_shards):
    """Resuming from step 5 while step 10 exists: the run saves step 8 with keep 2; step 10 is
    newer than the checkpoint being written and stays, and so does step 5 (one of the two)."""
    step5 = copy / "checkpoints" / "step00000005"
    proc = train(copy, tiny_shards, f"train.resume={step5}", "train.max_steps=8",
                 "train.save_interval=8", "train.keep_checkpoints=2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tags(copy) == ["step00000005", "step00000008", "step00000010"]
    assert (copy / "checkpoints" / "latest").read_text() == "step00000008"


def test_pruning_never_deletes_another_runs_checkpoints(copy, trained, tiny_shards, tmp_path):
    """A run directory continued from another run's checkpoint: its own earlier checkpoints are
    of another sequence and are never pruned; the new sequence's older ones are."""
    other = tmp_path / "other"
    first = train(other, tiny_shards, "train.max_steps=5", "train.seed=3")
    assert first.returncode == 0, first.stderr[-3000:]
    source = copy / "checkpoints" / "step00000005"
    proc = train(other, tiny_shards, f"train.resume={source}", "train.max_steps=15",
                 "train.keep_checkpoints=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # step 5 is the other run's own (seed 3); step 10 of the new sequence was pruned at step 15
    assert tags(other) == ["step00000005", "step00000015"]
    meta = json.loads((other / "checkpoints" / "step00000005" / "meta.json").read_text())
    assert meta["config"]["train"]["seed"] == 3


def test_a_resume_refused_for_changed_settings_changes_nothing(copy, tiny_shards):
    before = tree(copy)
    proc = train(copy, tiny_shards, "train.max_steps=20", "data.micro_batch_size=3", "train.seed=9")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "step00000010" in err
    assert "data.micro_batch_size=" in err and "train.seed=0, this run has 9" in err
    assert "micro_batch=" not in err.replace("data.micro_batch_size=", "")
    assert "resumed from" not in proc.stdout  # it was not
    assert tree(copy) == before  # config.yaml, run_info.json, logs: as they were


def test_a_missing_deepspeed_file_is_named(copy, tiny_shards):
    tag_dir = copy / "checkpoints" / "step00000010"
    (optim,) = tag_dir.glob("*optim_states.pt")
    optim.unlink()
    before = tree(copy)
    proc = train(copy, tiny_shards, "train.max_steps=20")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tag_dir}: damaged checkpoint: {optim.name} is missing"
    )
    assert "Traceback" not in proc.stderr and tree(copy) == before
    # export and evaluation read the same checkpoints and refuse them the same way
    for module in ("lang_jepa.export", "lang_jepa.eval"):
        args = [str(copy), "--out", str(copy.parent / "out")]
        out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cpu_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 2, out.stderr[-3000:]
        assert out.stderr.strip().splitlines()[-1].startswith(f"error: {tag_dir}: damaged")


def test_eval_of_a_directory_that_is_no_run_is_one_error_line(tmp_path):
    (tmp_path / "somewhere").mkdir()
    proc = subprocess.run([sys.executable, "-m", "lang_jepa.eval", str(tmp_path / "somewhere")],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'somewhere'}: neither a run directory (config.yaml + checkpoints/) "
        "nor an export (config.json)"
    )


def test_a_shard_missing_at_start_up_is_named(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    (victim,) = list(shards.glob("train-*.tar"))[:1]
    victim.unlink()
    proc = train(tmp_path / "run", shards)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"{victim} is missing" in line
    assert not (tmp_path / "run" / "logs").exists()  # refused before anything was written
