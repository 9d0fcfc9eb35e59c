"""slurm/pretrain.sh without a cluster: syntax, --dry-run launch commands for simulated SLURM_*
variables, and the real launch path on this machine (one node, 2 CPU ranks) including the
SIGUSR1 -> checkpoint -> exit 75 -> `scontrol requeue` -> resume cycle.

A fake ``scontrol`` first on PATH expands node lists and records its arguments; everything else
(the deepspeed launcher, train.py, DeepSpeed on CPU) is real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "pretrain.sh"
pytestmark = pytest.mark.processes
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SCONTROL_LOG"
if [[ $1 == show && $2 == hostnames ]]; then
  case $3 in
    'node[01-02]') printf 'node01\\nnode02\\n' ;;
    *) echo localhost ;;
  esac
fi
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a batch job: fake scontrol first on PATH, SLURM_* as sbatch sets them."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    # OMP_NUM_THREADS too: `make test` exports one, and the script derives it from the allocation
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS", "NODES",
            "OMP_NUM_THREADS")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SCONTROL_LOG=str(tmp / "scontrol.log"),
               SLURM_SUBMIT_DIR=str(REPO), TOKENIZERS_PARALLELISM="false", **extra)  # fmt: skip
    return env


def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_prints_hostfile_and_launch_commands(tmp_path):
    evil = "train.seed=$(touch pwned); `id`"
    env = _env(tmp_path, SLURM_JOB_ID="1234", SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="32", CONFIG="large", RUN_DIR="/runs/big run",
               SHARDS="/data/shards", EXTRA="train.max_steps=100 optim.lr=3e-4")  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", evil], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "node01 slots=4\nnode02 slots=4\n" in out
    assert "MASTER_ADDR=node01 MASTER_PORT=21234 OMP_NUM_THREADS=8 NODES=2 GPUS=4" in out
    assert not (tmp_path / "pwned").exists() and not Path("/runs/big run").exists()
    lines = [line for line in out.splitlines() if not re.fullmatch(r"(#.*|\S+ slots=\d+)", line)]
    commands = [shlex.split(line) for line in lines]
    srun, node0, node1 = commands
    hostfile = "/runs/big run/slurm/hostfile-1234"
    train = ["train.py", "--deepspeed_config", "ds_configs/zero2.json", "--config", "large",
             "train.run_dir=/runs/big run", "data.shards=/data/shards", "train.max_steps=100",
             "optim.lr=3e-4", evil]  # fmt: skip
    launch = [
        "--hostfile",
        hostfile,
        "--no_ssh",
        "--master_addr",
        "node01",
        "--master_port",
        "21234",
    ]
    deepspeed = str(REPO / ".venv" / "bin" / "deepspeed")
    assert srun[:4] == ["srun", "--nodes", "2", "--ntasks-per-node"]
    assert srun[srun.index("--node-task") :] == ["--node-task", "--", deepspeed, *launch, *train]
    assert node0 == [deepspeed, "--node_rank", "0", *launch, *train]
    assert node1 == [deepspeed, "--node_rank", "1", *launch, *train]
    assert (tmp_path / "scontrol.log").read_text() == "show hostnames node[01-02]\n"


def test_dry_run_without_scontrol_expands_the_node_list_itself(tmp_path):
    """No SLURM on the machine (a laptop): slurm/hostlist.py gives scontrol's expansion."""
    env = _env(tmp_path, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="rack[1-2]-n[08-09]",
               SLURM_GPUS_ON_NODE="2", RUN_DIR=str(tmp_path / "run"))  # fmt: skip
    (tmp_path / "bin" / "scontrol").unlink()
    assert shutil.which("scontrol", path=env["PATH"]) is None
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    hosts = ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]
    assert "".join(f"{h} slots=2\n" for h in hosts) in proc.stdout
    assert "MASTER_ADDR=rack1-n08" in proc.stdout


def _one_node_env(
    tmp_path: Path, shards: Path, run_dir: Path, job_id: str, **extra: str
) -> dict[str, str]:
    return _env(tmp_path, SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", GPUS="2",
                DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CONFIG="tiny", SHARDS=str(shards),
                RUN_DIR=str(run_dir), MASTER_PORT=str(_port()), **extra)  # fmt: skip


@pytest.mark.engine
def test_real_path_one_node_two_cpu_ranks(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    env = _one_node_env(tmp_path, tiny_shards, run_dir, "555")
    proc = subprocess.run(["bash", str(SCRIPT), "train.max_steps=4", "train.val_interval=0"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "slurm" / "hostfile-555").read_text() == "localhost slots=2\n"
    assert json.loads((run_dir / "run_info.json").read_text())["world_size"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert "requeue" not in (tmp_path / "scontrol.log").read_text()


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text() if path.exists() else "")
        if match:
            return match
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {timeout} s:\n{path.read_text()[-3000:]}")


@pytest.mark.engine
def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, tiny_shards):
    """What SLURM does near the time limit (--signal=B:USR1): the batch shell gets SIGUSR1."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = _one_node_env(tmp_path, tiny_shards, run_dir, "4242")
    args = ["bash", str(SCRIPT), "train.max_steps=20", "train.val_interval=0", "train.log_interval=1",
            "train.save_interval=1000"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(log, r"step 3/20", proc, timeout=220)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "forwarding to" in text and "requeueing job 4242" in text
    assert (tmp_path / "scontrol.log").read_text().splitlines()[-1] == "requeue 4242"
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    assert 3 <= stopped < 20
    # The requeued job: same id, same RUN_DIR, SLURM_RESTART_COUNT=1 -> resumes from `latest`.
    env["SLURM_RESTART_COUNT"], env["MASTER_PORT"] = "1", str(_port())
    proc2 = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    assert f"(step {stopped})" in proc2.stdout and f"step {stopped + 1}/20" in proc2.stdout
    assert f"step {stopped}/20" not in proc2.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000020"
