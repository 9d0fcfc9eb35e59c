"""Every benchmark the docs list (preprocess_bench.py, loader_bench.py, train_bench.py,
ckpt_memory.py, ema_bench.py, gpu_check.sh) runs on CPU in its smallest mode and writes what checks
read. Each runs as ``python benchmarks/X.py`` from a directory other than the repository root, so
the library comes from the installed package (no sys.path edits). Not timings: the figures
themselves come from running the benchmarks (docs/performance.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
TRAIN_BENCH = REPO / "benchmarks" / "train_bench.py"
LOADER_BENCH = REPO / "benchmarks" / "loader_bench.py"
EMA_BENCH = REPO / "benchmarks" / "ema_bench.py"
PREPROCESS_BENCH = REPO / "benchmarks" / "preprocess_bench.py"
CKPT_MEMORY = REPO / "benchmarks" / "ckpt_memory.py"
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
pytestmark = [pytest.mark.processes, pytest.mark.engine]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    """Run a benchmark from ``cwd`` (not the repository root); fail with its output's tail."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _demo_subset(demo_raw: Path, dest: Path, n: int) -> Path:
    """The first ``n`` demo documents, copied into ``dest`` (a small --raw corpus)."""
    dest.mkdir()
    for path in sorted(demo_raw.glob("*.txt"))[:n]:
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def test_train_bench_json(tiny_shards: Path, tmp_path: Path) -> None:
    """The real engine and the plain loop on real shards, tiny preset: the keys and sane values."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(TRAIN_BENCH), "--preset", "tiny", "--shards", str(tiny_shards),
           "--steps", "2", "--warmup", "1", "--activation-checkpointing",
           "--json", str(out)]  # fmt: skip
    proc = _run(cmd, cwd=tmp_path)
    assert "deepspeed / plain" in proc.stdout
    r = json.loads(out.read_text())
    for key in ("tokens_per_s", "step_ms", "plain_step_ms", "deepspeed_over_plain_ratio"):
        assert _positive(r[key]), (key, r[key])
    assert 0.05 < r["deepspeed_over_plain_ratio"] < 20
    assert r["mfu"] is None and r["hfu"] is None and r["peak_mem_gb"] is None  # CPU
    assert r["device_type"] == "cpu" and r["device"]
    s = r["settings"]
    assert (s["preset"], s["zero_stage"], s["precision"], s["seq_len"]) == ("tiny", 2, "fp32", 64)
    assert s["activation_checkpointing"] is True
    assert len(r["step_ms_all"]) == len(r["plain_step_ms_all"]) == 2
    # tokens/s counts valid tokens of the timed steps: at most a full batch per step
    assert r["tokens_per_step"] <= s["micro_batch"] * s["seq_len"]
    for loop in ("deepspeed", "plain"):
        assert {"targets", "forward", "backward", "step", "ema"} <= set(r["breakdown_ms"][loop])


def test_loader_bench_json(tiny_shards: Path, tmp_path: Path) -> None:
    """Real shards through the real loader, packed and unpacked: packing removes most padding."""
    out = tmp_path / "loader.json"
    # a fixed count of batches, not a time: the padding figures then do not depend on load
    cmd = [sys.executable, str(LOADER_BENCH), "--shards", str(tiny_shards), "--preset", "tiny",
           "--seq-len", "64", "--seconds", "0", "--min-batches", "40",
           "--json", str(out)]  # fmt: skip
    _run(cmd, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert _positive(r["tokens_per_s_per_worker"]) and r["seq_len"] == 64
    assert [row["batches"] for row in r["rows"]] == [40, 40]
    packed, unpacked = r["rows"]
    assert packed["packing"] and not unpacked["packing"]
    assert r["padding_fraction"] == packed["padding_fraction"]
    assert 0 <= packed["padding_fraction"] < 0.1 < unpacked["padding_fraction"]


def test_loader_bench_tokenizes_raw_text(demo_raw: Path, tmp_path: Path) -> None:
    """``--raw DIR``: text split with blingfire and tokenized with the default (installed) tokenizer
    into temporary shards, then measured like real shards."""
    raw = _demo_subset(demo_raw, tmp_path / "raw", 16)
    out = tmp_path / "loader_raw.json"
    cmd = [sys.executable, str(LOADER_BENCH), "--raw", "raw", "--preset", "tiny", "--seq-len", "64",
           "--seconds", "0.5", "--no-unpacked", "--json", str(out)]  # fmt: skip
    _run(cmd, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r["source"].startswith("text raw") and r["source"].endswith(", 16 docs")
    assert _positive(r["tokens_per_s_per_worker"]) and [row["packing"] for row in r["rows"]] == [
        True
    ]
    assert 0 <= r["padding_fraction"] < 0.1 and raw.is_dir()


def test_preprocess_bench_json(demo_raw: Path, tmp_path: Path) -> None:
    """Splitter, tokenizer and end-to-end builds (1 and 2 workers) on a 12-document corpus."""
    _demo_subset(demo_raw, tmp_path / "raw", 12)
    out = tmp_path / "preprocess.json"
    cmd = [
        sys.executable,
        str(PREPROCESS_BENCH),
        "--raw",
        "raw",
        "--repeat",
        "1",
        "--json",
        str(out),
    ]
    _run(cmd, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r["documents"] == 12 and _positive(r["corpus_mb"])
    for key in ("blingfire_split_mb_s", "splitter_mb_s", "tokenizer_mb_s", "e2e_1_worker_mb_s",
                "e2e_2_workers_mb_s", "e2e_over_tokenizer_ratio", "two_worker_speedup"):  # fmt: skip
        assert _positive(r[key]), (key, r[key])
    assert "CPUs, Python 3." in r["machine"]


def test_ckpt_memory_json(tiny_shards: Path, tmp_path: Path) -> None:
    """Peak-RSS rise with and without activation checkpointing, each in a fresh child process."""
    out = tmp_path / "ckpt.json"
    cmd = [sys.executable, str(CKPT_MEMORY), "--preset", "tiny", "--shards", str(tiny_shards),
           "--json", str(out)]  # fmt: skip
    proc = _run(cmd, cwd=tmp_path)
    assert "peak RSS rise without / with checkpointing" in proc.stdout
    r = json.loads(out.read_text())
    assert (r["preset"], r["micro_batch"]) == ("tiny", 0)
    for key in ("no_ckpt_fwd_gb", "ckpt_fwd_gb", "no_ckpt_gb", "ckpt_gb", "fwd_ratio", "ratio"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (key, r[key])


def test_ema_bench_json(tmp_path: Path) -> None:
    """Two ranks, a real ZeRO-2 layout of the tiny encoder: the owned slices tile it, and the
    all-gather sends between 1/2 and 1/1 of the all-reduce's bytes."""
    out = tmp_path / "ema.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(EMA_BENCH), "--preset", "tiny", "--reps", "2",
           "--json", str(out)]  # fmt: skip
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    _run(cmd, cwd=tmp_path, env=env)
    r = json.loads(out.read_text())
    assert r["world"] == 2 and sum(r["owned_numel_per_rank"]) == r["encoder_numel"]
    assert r["longest_stream"] == max(r["owned_numel_per_rank"])
    assert 1.0 <= r["bytes_ratio_old_over_new"] <= 2.0
    assert _positive(r["old_ms_median"]) and _positive(r["new_ms_median"])


def test_gpu_check_syntax_and_dry_run(tmp_path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0
    env = _env(OUT=str(tmp_path / "dry"))
    proc = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = ("paths", "base", "large_ac", "large", "xl_offload", "base_ac", "pack_vs", "summary")
    for name in steps:
        assert f"[{name}]" in proc.stdout
    assert "--preset xl" in proc.stdout and "zero3_offload.json" in proc.stdout
    assert not (tmp_path / "dry").exists()  # a dry run runs and writes nothing
    bad = subprocess.run(["bash", str(GPU_CHECK), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    """The GPU script's entry points (path checks, benches, ZeRO-3, summary) on CPU, tiny preset."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU_CHECK), "--cpu-smoke"], cwd=tmp_path,
                          env=_env(OUT=str(out)), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rc=124" not in proc.stdout and "skipped: time budget" not in proc.stdout, proc.stdout
    paths = json.loads((out / "paths.json").read_text())["checks"]
    assert paths["ok"]["flash_sdpa_no_mask"] is True
    assert paths["attention"]["train_step"]  # the SDPA ops a real step ran
    assert paths["optimizer"].endswith("AdamW") and paths["zero_stage"] == 2
    for name, ckpt, stage in (("base", False, 2), ("xl_offload", False, 3)):
        r = json.loads((out / f"{name}.json").read_text())
        assert r["settings"]["activation_checkpointing"] is ckpt
        assert r["settings"]["zero_stage"] == stage
        assert _positive(r["tokens_per_s"]) and _positive(r["step_ms"])
    summary = json.loads((out / "summary.json").read_text())
    assert "base MFU >= 50%" in summary["targets"]
    assert summary["targets"]["packed attention = per-window attention"]["met"] is True
    assert summary["packed_over_unpacked_tokens_per_s"] > 0
    assert "target" in proc.stdout and "xl_offload" in proc.stdout
