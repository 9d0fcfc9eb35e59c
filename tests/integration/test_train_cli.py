"""train.py as users launch it: python (no launcher), torchrun and deepspeed with two CPU ranks;
the run directory, TensorBoard scalars and start-up errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import cpu_env, free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]

SCALARS = [
    "train/loss", "train/lr", "train/wd", "train/ema_momentum", "train/grad_norm",
    "perf/tokens_per_s", "perf/samples_per_s", "perf/tflops_per_gpu", "perf/step_ms",
    "perf/padding", "repr/target_std", "repr/pred_std", "repr/effective_rank", "repr/pred_target_cos", "val/loss",
    "loss/pred_loss", "loss/reg",
]  # fmt: skip


def train(
    launcher: list[str], run_dir: Path, shards: Path, *extra: str
) -> subprocess.CompletedProcess:
    cmd = [*launcher, "train.py", "--deepspeed_config", "ds_configs/zero2.json", "--config", "tiny",
           f"data.shards={shards}", f"train.run_dir={run_dir}", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)


def read_scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_python_single_process_writes_run_dir_and_tensorboard(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    proc = train([sys.executable], run_dir, tiny_shards, "train.max_steps=10", "eval.interval=5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "step 10/10" in proc.stdout and "tok/s" in proc.stdout
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 10 and cfg["model"]["vocab_size"] > 0
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["packages"]["deepspeed"] and info["git_revision"] and info["manifest_sha256"]
    assert (run_dir / "logs" / "train.log").read_text().count("step ") >= 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000010"
    scalars = read_scalars(run_dir / "tb")
    missing = [s for s in SCALARS if s not in scalars]
    assert not missing, f"missing TensorBoard scalars: {missing}"
    assert all(v > 0 for v in scalars["perf/tokens_per_s"])
    assert all(0 <= v < 0.2 for v in scalars["perf/padding"])  # packed train batches
    evals = [s for s in scalars if s.startswith("eval/")]
    assert "eval/retrieval_top1" in evals and "eval/shuffled_loss_ratio" in evals
    assert len(scalars["eval/retrieval_top1"]) == 2  # steps 5 and 10


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_rank_launchers(tmp_path, tiny_shards, launcher):
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
        ]
    else:
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            port,
        ]
    proc = train(cmd, tmp_path / "run", tiny_shards, "train.max_steps=6", "train.val_interval=3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert info["deepspeed_config"]["train_batch_size"] == 2 * 4


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("model.dim=abc", "model.dim"),
        ("train.global_batch_size=7", "train.global_batch_size"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(tmp_path, tiny_shards, override, message):
    proc = train([sys.executable], tmp_path / "run", tiny_shards, override)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_conflicting_deepspeed_value_is_an_error(tmp_path, tiny_shards):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cmd = [sys.executable, "train.py", "--deepspeed_config", str(path), "--config", "tiny",
           f"data.shards={tiny_shards}", f"train.run_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (
        "train_micro_batch_size_per_gpu" in proc.stderr and "data.micro_batch_size" in proc.stderr
    )
