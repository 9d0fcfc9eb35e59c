"""slurm/pretrain.sh on two hosts: network namespaces joined by a veth pair (slurm/vhosts.py).

Each host runs its own processes and resolves the host names itself; ``srun`` and ``scontrol``
are stand-ins, everything else (the batch script, the DeepSpeed launcher on each host, train.py,
ZeRO-2 over gloo on the ``lj0`` link) is real. Skipped where network namespaces can't be made
(not root, no iproute2); every test is bounded in time and tears its hosts down, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "pretrain.sh"
sys.path.insert(0, str(REPO / "slurm"))
import vhosts  # noqa: E402

pytestmark = [pytest.mark.processes, pytest.mark.engine]
_WHY_NOT = vhosts.unavailable()
TINY = ["train.val_interval=0", "train.log_interval=1", "train.precision=fp32"]


STEPS = 15
JOB = [f"train.max_steps={STEPS}", "train.save_interval=1000"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if _WHY_NOT:
        pytest.skip(f"virtual hosts unavailable: {_WHY_NOT}")
    before = set(os.listdir("/sys/class/net"))
    with vhosts.VirtualCluster(2, tmp_path_factory.mktemp("vhosts")) as c:
        yield c
    assert not vhosts.leftovers(c.tag), "namespaces left behind"
    assert set(os.listdir("/sys/class/net")) == before, "interfaces left in the root namespace"


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, tiny_shards) -> tuple[Path, Path]:
    """An uninterrupted 2 hosts x 2 ranks run of the job every test compares with: (run, log)."""
    tmp = tmp_path_factory.mktemp("reference")
    run_dir, log = tmp / "run", tmp / "job.out"
    proc = _start(cluster, _env(cluster, tiny_shards, run_dir, "70"), log, *JOB)
    assert _finish(proc, log, 420) == 0, log.read_text()[-4000:]
    return run_dir, log


def _env(cluster: vhosts.VirtualCluster, shards: Path, run_dir: Path, job: str, **extra: str):
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODES")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    env = cluster.env(job, gpus=2, base=base)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CONFIG="tiny", SHARDS=str(shards),
               RUN_DIR=str(run_dir), SLURM_SUBMIT_DIR=str(REPO), TOKENIZERS_PARALLELISM="false",
               MASTER_PORT="29511", **extra)  # fmt: skip
    return env


def _start(cluster, env, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "a") as out:  # the child keeps its own descriptor
        return cluster.popen(0, ["bash", str(SCRIPT), *TINY, *args], env=env,
                             cwd=str(log.parent), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as err:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(
            f"job still running after {timeout} s:\n{log.read_text()[-4000:]}"
        ) from err


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text() if log.exists() else "")
        if match:
            return match
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {timeout} s:\n{log.read_text()[-4000:]}")


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]  # a resumed run's records replace the earlier
    return out


def _lj0_bytes(cluster: vhosts.VirtualCluster, k: int) -> int:
    r = subprocess.run(["ip", "-n", cluster.netns[k], "-j", "-s", "link", "show", vhosts.IFACE],
                       capture_output=True, text=True, check=True)  # fmt: skip
    return int(json.loads(r.stdout)[0]["stats64"]["rx"]["bytes"])


def test_two_hosts_train_and_match_a_four_rank_single_host_run(cluster, reference, tmp_path,
                                                               tiny_shards):  # fmt: skip
    # the hosts see only their loopback and the veth end
    for ns in cluster.netns:
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True)
        assert sorted(re.findall(r"^\d+: ([^:@]+)", links.stdout, re.M)) == ["lj0", "lo"]
    two, log2 = reference
    assert "'vnode1': [0, 1], 'vnode2': [2, 3]" in log2.read_text()  # ranks 2, 3 on host 2
    assert (two / "slurm" / "hostfile-70").read_text() == "vnode1 slots=2\nvnode2 slots=2\n"
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 4
    assert (two / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert min(_lj0_bytes(cluster, k) for k in range(2)) > 100_000  # the collectives crossed lj0

    one, log1 = tmp_path / "one", tmp_path / "one.out"
    env = _env(cluster, tiny_shards, one, "72", NODES="1", GPUS="4")
    proc = _start(cluster, env, log1, *JOB)
    assert _finish(proc, log1, 420) == 0, log1.read_text()[-4000:]
    assert "'vnode1': [0, 1, 2, 3]" in log1.read_text()
    # same ranks, same data order, the same gloo all-reduce over 4 ranks: the same fp32 sums
    assert _losses(two) == _losses(one) and sorted(_losses(two)) == list(range(1, STEPS + 1))


def test_sigterm_on_the_second_host_checkpoints_requeues_and_resumes(cluster, reference, tmp_path,
                                                                     tiny_shards):  # fmt: skip
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = _env(cluster, tiny_shards, run_dir, "73")
    proc = _start(cluster, env, log, *JOB)
    _wait_for(log, rf"step 3/{STEPS}", proc, timeout=300)
    # what SLURM does to a preempted node's step: SIGTERM to every one of its processes
    assert cluster.signal_host(1, signal.SIGTERM)
    assert _finish(proc, log, 180) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "requeueing job 73" in text, text[-4000:]
    assert (cluster.dir / "scontrol.log").read_text().splitlines()[-1] == "requeue 73"
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
    assert 3 <= stopped < STEPS
    assert sorted(_losses(run_dir)) == list(range(1, stopped + 1))  # all 4 ranks stopped there
    # the requeued job: same id and run directory, restart count 1, both hosts
    env["SLURM_RESTART_COUNT"] = "1"
    proc = _start(cluster, env, log, *JOB)
    assert _finish(proc, log, 420) == 0, log.read_text()[-4000:]
    assert f"(step {stopped})" in log.read_text()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert _losses(run_dir) == _losses(reference[0])  # exact, before and after the requeue


def _lose_host_two(cluster, reference, tmp_path, tiny_shards, job: str, lose, restore=None) -> str:
    """Start the job with checkpoints every 5 steps and a 20 s collective timeout, take host 2
    away with ``lose`` at step 7, check that host 1's batch step ends by itself with a requeue
    and ``latest`` on a complete checkpoint, bring host 2 back (``restore``), restart both
    hosts and compare with the uninterrupted run. Returns the first job's console."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = _env(cluster, tiny_shards, run_dir, job)
    args = [*JOB, "train.save_interval=5", "train.collective_timeout_s=20"]
    proc = _start(cluster, env, log, *args)
    _wait_for(log, rf"step 7/{STEPS}", proc, timeout=300)
    lost_at = time.monotonic()
    lose()
    assert _finish(proc, log, 200) == 0, log.read_text()[-4000:]
    took = time.monotonic() - lost_at
    text = log.read_text()
    assert f"requeueing job {job}" in text, text[-4000:]
    assert (cluster.dir / "scontrol.log").read_text().splitlines()[-1] == f"requeue {job}"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step"))
    assert step % 5 == 0 and 5 <= step < STEPS
    assert f"The last good checkpoint is {latest}" in text
    # bounded: the collective timeout, the census window (both 20 s) and the census's own bound
    # (15 s more, for a host whose store connection is cut), with slack for a loaded machine
    assert took < 130, f"{took:.0f} s to give up"
    if restore is not None:
        restore()
    env["SLURM_RESTART_COUNT"] = "1"
    proc = _start(cluster, env, log, *args)
    assert _finish(proc, log, 420) == 0, log.read_text()[-4000:]
    assert f"(step {step})" in log.read_text()
    assert _losses(run_dir) == _losses(reference[0])  # exact from `latest` on
    return text


def test_a_dead_host_does_not_hang_the_job(cluster, reference, tmp_path, tiny_shards):
    text = _lose_host_two(cluster, reference, tmp_path, tiny_shards, "74",
                          lambda: cluster.signal_host(1, signal.SIGKILL))  # fmt: skip
    assert "lost rank(s) 2, 3 on vnode2" in text, text[-4000:]


def test_a_network_partition_does_not_hang_the_job(cluster, reference, tmp_path, tiny_shards):
    try:
        text = _lose_host_two(cluster, reference, tmp_path, tiny_shards, "75",
                              lambda: cluster.cut(1), lambda: cluster.heal(1))  # fmt: skip
    finally:
        cluster.heal(1)  # the link is up for the tests after this one, whatever happened
    assert "lost rank(s) 2, 3 on vnode2" in text, text[-4000:]  # host 1's view
    assert "is out of reach from vnode2" in text, text[-4000:]  # host 2's view
