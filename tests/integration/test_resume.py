"""Fault tolerance with the real engine: bit-exact resume (planned stop and SIGKILL), preemption
signals, non-finite losses, and resume errors. CPU, fp32, two ranks, ZeRO-2."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import cpu_env, free_port, kill_tree, losses, wait_for_run_dir_release

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]
STEPS = 40


def command(run_dir: Path, shards: Path, ranks: int, *extra: str) -> list[str]:
    launcher = [sys.executable]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                    f"--master_port={free_port()}"]  # fmt: skip
    return [*launcher, "train.py", "--deepspeed_config", "ds_configs/zero2.json", "--config", "tiny",
            f"data.shards={shards}", f"train.run_dir={run_dir}", f"train.max_steps={STEPS}",
            "train.log_interval=1", "train.val_interval=0", "train.save_interval=5",
            "train.precision=fp32", *extra]  # fmt: skip


def with_nan_at(steps: str, cmd: list[str]) -> list[str]:
    """``cmd`` (a train.py command) with every loss of the steps numbered ``steps`` ("8" or
    "3,12"; 1-based, as the logs number them) made NaN."""
    at = cmd.index("train.py")
    return [*cmd[:at], "-m", "tests.integration.nan_worker", steps, *cmd[at + 1 :]]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=900
    )
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards) -> dict[int, float]:
    """An uninterrupted 40-step run on two ranks."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = run(command(run_dir, tiny_shards, 2))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ref = losses(run_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


def test_resume_from_step_20_is_bit_exact(tmp_path, tiny_shards, reference):
    run_dir = tmp_path / "run"
    first = run(command(run_dir, tiny_shards, 2, "train.exit_at_step=20"))
    assert first.returncode == 0, first.stderr[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000020"
    second = run(command(run_dir, tiny_shards, 2))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stdout
    assert losses(run_dir) == reference  # identical floats at every step


def test_sigkill_at_random_step_then_restart_is_bit_exact(tmp_path, tiny_shards, reference):
    run_dir = tmp_path / "run"
    kill_at = random.Random().randint(7, 33)
    cmd = command(run_dir, tiny_shards, 2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    metrics = run_dir / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.05)
    kill_tree(proc.pid)  # the launcher and both ranks: nothing of the run goes on
    proc.wait()
    wait_for_run_dir_release(run_dir)
    assert max(losses(run_dir)) < STEPS, "the run finished before it could be killed"
    restart = run(cmd)
    assert restart.returncode == 0, restart.stderr[-4000:]
    assert losses(run_dir) == reference, f"killed at step ~{kill_at}"


def wait_for_records(proc: subprocess.Popen, metrics: Path, n: int) -> None:
    """Until the run has logged ``n`` metrics records (failing with its output if it exits)."""
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)


def test_sigusr1_to_one_rank_checkpoints_the_agreed_step_and_exits_75(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    cmd = command(run_dir, tiny_shards, 2, "train.save_interval=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    metrics = run_dir / "logs" / "metrics.jsonl"
    wait_for_records(proc, metrics, 3)
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2
    os.kill(int(children[-1]), signal.SIGUSR1)  # one rank only: the others must agree
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75 or "exitcode  : 75" in out, out[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert 3 <= step < STEPS
    meta = json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text())
    assert meta["step"] == step and meta["world_size"] == 2
    for rank in range(2):
        assert (run_dir / "checkpoints" / tag / f"trainer_state_rank{rank}.pt").is_file()


def test_sigterm_single_process_exit_code(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        command(run_dir, tiny_shards, 1, "train.save_interval=0"),
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "logs" / "metrics.jsonl"
    wait_for_records(proc, metrics, 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "stop signal" in out
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_sigterm_to_the_whole_process_group_with_loader_workers(tmp_path, tiny_shards):
    """What SLURM and the experiment harness do: SIGTERM to every process of the run, the
    DataLoader workers included. The workers must outlive the signal until the checkpoint is
    written (a worker killed first aborts the save from the main process's SIGCHLD handler)."""
    run_dir = tmp_path / "run"
    cmd = command(run_dir, tiny_shards, 1, "train.save_interval=0", "data.num_workers=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    metrics = run_dir / "logs" / "metrics.jsonl"
    try:
        wait_for_records(proc, metrics, 2)
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert workers, "no DataLoader worker to signal"
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out[-3000:]
    assert "stop signal" in out and "killed by signal" not in out
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert (run_dir / "checkpoints" / tag / "meta.json").is_file()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    proc = run(with_nan_at("13", command(run_dir, tiny_shards, 1)))
    assert proc.returncode == 1
    # one numbering: the 13th step is "step 13" in the error, and step 12 was logged finite
    assert "non-finite loss at step 13" in proc.stderr and "step00000010" in proc.stderr
    assert 12 in losses(run_dir) and 13 not in losses(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000010"


def test_nonfinite_loss_skip_counts_and_continues(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    proc = run(with_nan_at("8", command(run_dir, tiny_shards, 1, "train.nonfinite=skip",
                                        "train.max_steps=16")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss at step 8: step skipped (1 so far)" in proc.stdout
    assert max(losses(run_dir)) == 16
    records = {r["step"]: r for r in map(json.loads, (run_dir / "logs" / "metrics.jsonl").open())}
    # the skipped step is reported as non-finite, never as a perfect loss of 0
    assert "train/loss" not in records[8] and records[8]["train/skipped_steps"] == 1
    assert records[7]["train/skipped_steps"] == 0 and records[16]["train/skipped_steps"] == 1
    assert "step 8/16 | loss non-finite" in proc.stdout


def test_skipped_steps_count_across_a_resume(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    skip = ["train.nonfinite=skip", "train.max_skipped_steps=1"]
    first = run(
        with_nan_at("3,12", command(run_dir, tiny_shards, 1, *skip, "train.exit_at_step=10"))
    )
    assert first.returncode == 0 and "step skipped (1 so far)" in first.stdout, first.stderr[-3000:]
    second = run(with_nan_at("3,12", command(run_dir, tiny_shards, 1, *skip)))
    # the count came back with the checkpoint: the second skip exceeds train.max_skipped_steps
    assert second.returncode == 1, second.stdout[-3000:]
    assert "2 steps skipped for non-finite losses (step 12)" in second.stderr


def test_resume_errors_are_loud(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    assert run(command(run_dir, tiny_shards, 2, "train.exit_at_step=5")).returncode == 0
    # another number of ranks resumes (test_world_size.py), but only with the same stream
    # settings: checked before anything is converted or loaded
    other = run(command(run_dir, tiny_shards, 1, "data.packing=false"))
    assert other.returncode != 0 and "packing=True, this run has False" in other.stderr
    assert not (run_dir / "checkpoints" / "universal").exists()
    # another batching: the saved data position cannot be restored exactly, said before training
    packing = run(command(run_dir, tiny_shards, 2, "data.packing=false"))
    assert packing.returncode != 0 and "packing=True, this run has False" in packing.stderr
    # a checkpoint path that is not one
    missing = run(command(run_dir, tiny_shards, 2, f"train.resume={tmp_path / 'nowhere'}"))
    assert missing.returncode != 0 and "no checkpoint there" in missing.stderr
    # an incomplete checkpoint (crash while writing): latest still names the whole one
    (run_dir / "checkpoints" / "step00000005" / "meta.json").unlink()
    broken = run(command(run_dir, tiny_shards, 2))
    assert broken.returncode != 0 and "incomplete checkpoint" in broken.stderr


QUEUE = ["target.source=online", "loss.type=infonce", "loss.queue=48", "optim.ema_start=0.0",
         "optim.ema_end=0.0", "train.max_steps=12",
         "train.val_interval=4"]  # validation reads the queue and must leave it as it is  # fmt: skip


def test_resume_with_a_queue_of_negatives_is_bit_exact(tmp_path, tiny_shards):
    """``loss.queue``'s negatives live outside the engine, one queue per rank: a resumed run
    scores against the queue each rank had at the checkpoint."""
    ref_dir, split_dir, plain_dir = tmp_path / "ref", tmp_path / "split", tmp_path / "plain"
    ref = run(command(ref_dir, tiny_shards, 2, *QUEUE))
    assert ref.returncode == 0, ref.stderr[-4000:]
    first = run(command(split_dir, tiny_shards, 2, *QUEUE, "train.exit_at_step=6"))
    assert first.returncode == 0, first.stderr[-4000:]
    for rank in range(2):  # each rank's queue is in its trainer state
        state = torch.load(split_dir / "checkpoints" / "step00000005" /
                           f"trainer_state_rank{rank}.pt", weights_only=True)  # fmt: skip
        assert state["objective"]["queue"]["filled"] > 0
    second = run(command(split_dir, tiny_shards, 2, *QUEUE))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-4000:]
    assert losses(split_dir) == losses(ref_dir)
    # the queue is in those losses: without it (or resumed with an empty one) they differ
    plain = run(command(plain_dir, tiny_shards, 2, *QUEUE, "loss.queue=0"))
    assert plain.returncode == 0, plain.stderr[-4000:]
    assert losses(plain_dir)[1] == losses(ref_dir)[1]  # step 1: the queue is still empty
    assert all(losses(plain_dir)[s] != losses(ref_dir)[s] for s in range(7, 13))


LATE = ["objective=jepa+mlm", "loss.type=infonce", "loss.latent_start=5", "loss.latent_ramp=4",
        "train.max_steps=12"]  # fmt: skip


def test_resume_inside_a_delayed_latent_losss_ramp_is_bit_exact(tmp_path, tiny_shards):
    """``loss.latent_start`` / ``latent_ramp`` weigh the hybrid's latent loss by the step: a run
    stopped inside the ramp resumes with the same weights."""
    ref_dir, split_dir = tmp_path / "ref", tmp_path / "split"
    ref = run(command(ref_dir, tiny_shards, 2, *LATE))
    assert ref.returncode == 0, ref.stderr[-4000:]
    first = run(command(split_dir, tiny_shards, 2, *LATE, "train.exit_at_step=7"))
    assert first.returncode == 0, first.stderr[-4000:]
    second = run(command(split_dir, tiny_shards, 2, *LATE))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-4000:]
    assert losses(split_dir) == losses(ref_dir)
    weights = {}
    for line in (split_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/latent_weight" in record:
            weights[record["step"]] = record["loss/latent_weight"]
    # logged steps are 1-based: step s trained at 0-based step s - 1
    assert [weights[s] for s in range(1, 13)] == [0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1]
