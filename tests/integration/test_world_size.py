"""Resuming on another world size with the real engine (ZeRO-2, fp32, gloo): a 4-rank checkpoint
continues on 2 ranks, through DeepSpeed's universal checkpoint, with the same losses as the
uninterrupted 4-rank run while the old ranks' streams are finished; Adam's moments are carried,
not reset; and a 2-rank checkpoint continues on 4 ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lang_jepa import checkpoint
from tests.helpers import cpu_env, free_port, losses

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]
STEPS, AT = 12, 3
GLOBAL = 16  # tiny's micro-batch of 4: 4 ranks x 1, or 2 ranks x 2 accumulation


def command(run_dir: Path, shards: Path, ranks: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}", "train.py", "--deepspeed_config",
            "ds_configs/zero2.json", "--config", "tiny", f"data.shards={shards}",
            f"train.run_dir={run_dir}", f"train.max_steps={STEPS}", "train.log_interval=1",
            "train.val_interval=0", "train.save_interval=3", "train.keep_checkpoints=0",
            "train.precision=fp32", f"train.global_batch_size={GLOBAL}", *extra]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def rewind(src: Path, dest: Path, step: int) -> Path:
    """A copy of run ``src`` as it was when it had just saved ``step``."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".lock"))
    ckpts = dest / "checkpoints"
    for tag in checkpoint.step_tags(ckpts):
        if int(tag.removeprefix("step")) > step:
            shutil.rmtree(ckpts / tag)
    (ckpts / "latest").write_text(checkpoint.tag_for(step))
    metrics = dest / "logs" / "metrics.jsonl"
    kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step]
    metrics.write_text("".join(ln + "\n" for ln in kept))
    return dest


def moments(ckpt_dir: Path, tag: str) -> dict[str, dict[str, torch.Tensor]]:
    """Adam's state per parameter, read from the checkpoint's universal conversion."""
    root = checkpoint.to_universal(ckpt_dir, tag) / tag / "zero"

    def read(path: Path) -> torch.Tensor:
        obj = torch.load(path, weights_only=False)  # DeepSpeed's files: {"param": ...} or a tensor
        return obj["param"] if isinstance(obj, dict) else obj

    return {
        p.name: {k: read(p / f"{k}.pt") for k in ("exp_avg_sq", "step")}
        for p in root.iterdir()
        if p.is_dir()
    }


def same_batch_steps(shards: Path, at: int, n_old: int, n_new: int) -> int:
    """How many steps after ``at`` the run resumed on ``n_new`` ranks is given the same set of
    micro-batches per step as the uninterrupted ``n_old``-rank run (with the loaders alone)."""
    from lang_jepa.config import load_config
    from lang_jepa.data import build_train_loader

    cfg = load_config("tiny", [f"data.shards={shards}"])
    old = [build_train_loader(cfg, rank, n_old) for rank in range(n_old)]
    for loader in old:
        for _ in range(at * GLOBAL // (4 * n_old)):
            next(loader)
    new = [build_train_loader(cfg, rank, n_new) for rank in range(n_new)]
    for loader in new:
        loader.take_over([o.state_dict() for o in old])

    def step(loaders: list) -> list[bytes]:
        micro = GLOBAL // (4 * len(loaders))
        return sorted(
            next(lo)["input_ids"].numpy().tobytes() for lo in loaders for _ in range(micro)
        )

    for n in range(STEPS - at):
        if step(old) != step(new):
            return n
    return STEPS - at


def check_resumed(run_dir: Path, reference: dict[int, float], same: int) -> None:
    """While the old ranks' streams last, a step holds the same micro-batches as in the
    uninterrupted run: the losses agree to the rounding of the other reduction order. Then the
    new layout's epochs begin: close, not equal."""
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert same >= 3
    for step in range(1, STEPS + 1):
        tol = 0.0 if step <= AT else 1e-3 if step <= AT + same else 0.05
        assert got[step] == pytest.approx(reference[step], rel=tol, abs=0.0), step


@pytest.fixture(scope="module")
def shards(demo_raw: Path, tmp_path_factory) -> Path:
    """80 demo documents in 16 shards: each of 4 ranks reads about 20 documents an epoch, so the
    old ranks' streams outlast the steps compared (tiny_shards' epochs are 1-4 batches a rank)."""
    from preprocessing.build_shards import main

    out = tmp_path_factory.mktemp("shards")
    files = sorted(demo_raw.glob("*.txt"))[:80]
    argv = ["--output", str(out), "--val-fraction", "0.0", "--shard-docs", "5", "--workers", "0",
            "--quiet", "--input", *map(str, files)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, shards) -> Path:
    run_dir = tmp_path_factory.mktemp("four") / "run"
    run(command(run_dir, shards, 4))
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def test_four_ranks_resume_on_two_with_the_same_losses_and_carried_moments(
    tmp_path, shards, four_ranks
):
    reference = losses(four_ranks)
    run_dir = rewind(four_ranks, tmp_path / "run", AT)
    out = run(command(run_dir, shards, 2))
    assert "written by 4 ranks x 0 data workers, on 2 x 0" in out.stdout + out.stderr
    assert (run_dir / "checkpoints" / "universal" / checkpoint.tag_for(AT) / "converted").is_file()
    check_resumed(run_dir, reference, same_batch_steps(shards, AT, 4, 2))
    meta = checkpoint.read_meta(run_dir / "checkpoints", checkpoint.tag_for(STEPS))
    assert meta["world_size"] == 2 and meta["config"]["train"]["grad_accum_steps"] == 2
    # Adam's moments came along: the step count goes on, and every second moment is at least its
    # old value decayed (a fresh optimizer would have only the new steps' squared gradients)
    before = moments(four_ranks / "checkpoints", checkpoint.tag_for(AT))
    after = moments(run_dir / "checkpoints", checkpoint.tag_for(AT + 3))
    assert before.keys() == after.keys() and len(before) > 10
    beta2 = meta["config"]["optim"]["betas"][1]
    for name, state in after.items():
        assert int(state["step"]) == AT + 3, name
        floor = before[name]["exp_avg_sq"] * beta2**3
        assert bool((state["exp_avg_sq"] >= floor * (1 - 1e-5)).all()), name


def test_two_ranks_resume_on_four(tmp_path, tmp_path_factory, shards):
    full = tmp_path_factory.mktemp("two") / "run"
    run(command(full, shards, 2))
    run_dir = rewind(full, tmp_path / "run", AT)
    out = run(command(run_dir, shards, 4))
    assert "written by 2 ranks x 0 data workers, on 4 x 0" in out.stdout + out.stderr
    check_resumed(run_dir, losses(full), same_batch_steps(shards, AT, 2, 4))
    meta = checkpoint.read_meta(run_dir / "checkpoints", checkpoint.tag_for(STEPS))
    assert meta["world_size"] == 4 and meta["config"]["train"]["grad_accum_steps"] == 1


def test_one_rank_resumes_with_more_data_workers(tmp_path, shards):
    """Another data.num_workers on the same ranks: the data position is taken over (the slots are
    ranks x workers) and the model and optimizer load as they are."""
    run_dir = tmp_path / "run"
    one = [c for c in command(run_dir, shards, 1) if c != "--nproc_per_node=1"]
    one = [sys.executable, *one[one.index("train.py") :]]
    run([*one, f"train.exit_at_step={AT}", "train.global_batch_size=0"])
    out = run([*one, "data.num_workers=2", "train.global_batch_size=0"])
    assert "written by 1 ranks x 0 data workers, on 1 x 2" in out.stdout + out.stderr
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert not (run_dir / "checkpoints" / "universal").exists()


def test_a_failed_conversion_names_the_checkpoint_and_leaves_nothing_finished(tmp_path):
    tag_dir = tmp_path / "checkpoints" / checkpoint.tag_for(5)
    tag_dir.mkdir(parents=True)
    (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="step00000005: ds_to_universal failed"):
        checkpoint.to_universal(tmp_path / "checkpoints", checkpoint.tag_for(5))
    universal = tmp_path / "checkpoints" / checkpoint.UNIVERSAL_DIR
    assert not (universal / checkpoint.tag_for(5) / checkpoint.CONVERTED).exists()
