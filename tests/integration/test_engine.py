"""Real DeepSpeed engine tests on CPU (gloo): tiny preset, real shards, 1 and 2 ranks, ZeRO 0/2/3.

Each case runs tests/integration/engine_worker.py in fresh processes (python for one rank,
torchrun for two) and checks what it dumped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import cpu_env, free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "integration" / "engine_worker.py"
pytestmark = [pytest.mark.processes, pytest.mark.engine]


def run_worker(tmp: Path, shards: Path, stage: int, ranks: int, *overrides: str) -> list[dict]:
    out = tmp / f"out-z{stage}-r{ranks}-{abs(hash(overrides)) % 10**8}"
    out.mkdir()
    args = [
        str(out),
        str(stage),
        f"data.shards={shards}",
        f"train.run_dir={out / 'run'}",
        "train.max_steps=12",
        "train.save_interval=0",
        "train.val_interval=0",
        *overrides,
    ]
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}",
            str(WORKER),
            *args,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def ema_recurrence(result: dict) -> dict[str, torch.Tensor]:
    """T_0 = initial online weights; T_k+1 = m_k T_k + (1 - m_k) W_k+1, computed here."""
    target = {k: v.clone() for k, v in result["online"][0].items()}
    for m, online in zip(result["momenta"], result["online"][1:], strict=True):
        for k in target:
            target[k] = m * target[k] + (1 - m) * online[k]
    return target


def ema_lerp_recurrence(result: dict) -> dict[str, torch.Tensor]:
    """The same recurrence as ``T.lerp_(W_k+1, 1 - m_k)`` on whole tensors, the op the update
    applies (each element once, by the rank that owns it): the target must match it bit for bit."""
    target = {k: v.clone() for k, v in result["online"][0].items()}
    for m, online in zip(result["momenta"], result["online"][1:], strict=True):
        for k in target:
            target[k].lerp_(online[k], 1 - m)
    return target


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("stage,ranks", [(2, 1), (2, 2), (3, 2)])
def test_loss_falls_ema_and_ranks_agree(tmp_path, tiny_shards, stage, ranks):
    results = run_worker(
        tmp_path, tiny_shards, stage, ranks, "optim.ema_start=0.9", "optim.ema_end=0.95"
    )
    losses = results[0]["losses"]
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses
    for r in results:
        # the EMA target equals the momentum recurrence over the fp32 master weights
        for k, expected in ema_recurrence(r).items():
            torch.testing.assert_close(r["target"][k], expected, rtol=1e-5, atol=1e-6)
        assert_same(r["target"], ema_lerp_recurrence(r))
    if ranks == 2:
        assert results[0]["losses"] != [] and results[1]["world"] == 2
        assert_same(results[0]["target"], results[1]["target"])
        assert_same(results[0]["replica"], results[1]["replica"])
        assert_same(results[0]["online"][-1], results[1]["online"][-1])


def test_zero0_equals_zero2_fp32(tmp_path, tiny_shards):
    z0 = run_worker(tmp_path, tiny_shards, 0, 1)[0]["losses"]
    z2 = run_worker(tmp_path, tiny_shards, 2, 1)[0]["losses"]
    torch.testing.assert_close(torch.tensor(z0), torch.tensor(z2), rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_same_loss(tmp_path, tiny_shards):
    plain = run_worker(tmp_path, tiny_shards, 2, 1)[0]["losses"]
    ckpt = run_worker(tmp_path, tiny_shards, 2, 1, "model.activation_checkpointing=true")[0][
        "losses"
    ]
    torch.testing.assert_close(torch.tensor(plain), torch.tensor(ckpt), rtol=1e-6, atol=1e-7)


def test_bf16_runs_and_learns(tmp_path, tiny_shards):
    losses = run_worker(tmp_path, tiny_shards, 2, 1, "train.precision=bf16")[0]["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])


def test_global_batch_sets_accumulation_for_every_consumer(tmp_path, tiny_shards):
    """train.global_batch_size derives the accumulation once: DeepSpeed, the step count, the
    schedules and the EMA all see 4 micro-batches per optimizer step."""
    (r,) = run_worker(
        tmp_path, tiny_shards, 2, 1, "data.micro_batch_size=2", "train.global_batch_size=8",
        "optim.ema_start=0.9", "optim.ema_end=0.95",
    )  # fmt: skip
    assert r["grad_accum"] == 4
    assert r["global_steps"] == 12 and r["global_samples"] == 12 * 8  # DeepSpeed's own counters
    assert r["ema_updates"] == list(range(12)) and len(r["momenta"]) == 12  # once per update
    assert_same(r["target"], ema_lerp_recurrence(r))  # one lerp per optimizer step, no more


def test_online_targets_train_under_zero3_on_two_ranks(tmp_path, tiny_shards):
    """target.source=online runs the encoder twice in one forward (context, then the window for
    the targets, then the projector; the predictor reads K queries per hidden sentence, packed);
    ZeRO-3 gathers its partitioned weights for both and the
    gradient of both paths reaches them. With EMA momentum 0 the exported target is the online
    encoder itself."""
    results = run_worker(
        tmp_path, tiny_shards, 3, 2, "target.source=online", "target.view=sentence",
        "target.projector=64", "mask.queries=2", "loss.type=infonce", "loss.reg=sigreg", "loss.reg_on=targets", "loss.reg_weight=0.02",
        "optim.ema_start=0.0", "optim.ema_end=0.0",
    )  # fmt: skip
    losses = results[0]["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-4:]) < sum(losses[:4]), losses
    for r in results:
        assert_same(r["target"], r["online"][-1])
    assert_same(results[0]["online"][-1], results[1]["online"][-1])


def test_multi_mask_trains_on_two_ranks(tmp_path, tiny_shards):
    """mask.draws=3 with window negatives, packed, ZeRO-2 on two ranks: the engine trains on the
    three copies of every row (the EMA target reads one) and the loss falls."""
    results = run_worker(
        tmp_path, tiny_shards, 2, 2, "mask.draws=3", "loss.type=infonce", "loss.negatives=window",
    )  # fmt: skip
    losses = results[0]["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-4:]) < sum(losses[:4]), losses
    assert_same(results[0]["online"][-1], results[1]["online"][-1])
