"""Training benchmark: tokens/s, step time, MFU/HFU and peak memory of the real train step.

    .venv/bin/python benchmarks/train_bench.py --preset small [--steps N] [--warmup N]
        [--ds-config ds_configs/zero2.json] [--json FILE] [--shards DIR | --synthetic]
        [--compile | --no-compile] [--activation-checkpointing | --no-activation-checkpointing]
        [--precision bf16|fp32] [--plain | --no-plain] [--breakdown] [key.sub=value ...]
    .venv/bin/python benchmarks/train_bench.py --check-paths --preset base --synthetic --json F

What is timed: ``Trainer.train_step`` (lang_jepa.trainer) on an engine built by the real
``setup`` (DeepSpeed, our parameter groups and optimizer): the numbered steps 1-5 (target forward,
context encoder + predictor, loss, backward + engine step, EMA update) and the per-step
bookkeeping. Batches come from the real loader (masking, collate) and are pre-loaded onto the
device before timing, so data loading is excluded; they are cycled if fewer than the steps.

On CPU (or with ``--plain``) the same model (same initial weights) is also trained by a plain
PyTorch loop on the same batches: torch.optim.AdamW on the same parameter groups, gradient
clipping, the same numbered steps including the target forward and the EMA update. bf16 means the
DeepSpeed bf16 engine (bf16 weights, fp32 masters) versus ``torch.autocast(bfloat16)`` over fp32
weights for the plain loop; fp32 is fp32 in both. DeepSpeed and plain steps alternate (ABBA...)
on identical batches; ``deepspeed_over_plain_ratio`` is the median over adjacent pairs of
(DeepSpeed step time / plain step time), robust to load drifting on a shared machine.

FLOPs (the objective's ``flops``: lang_jepa.objectives.jepa.step_flops, valid tokens only): MFU counts context encoder + predictor
forward and backward plus the target encoder's forward; HFU adds the recomputed forward of
activation checkpointing. Peak FLOP/s come from lang_jepa.metrics.PEAK_BF16_FLOPS (GPU only).
Memory (GPU): ``peak_mem_gb`` is torch.cuda.max_memory_allocated over the timed steps;
``act_mem_gb`` is the peak during forward + backward of one extra step above what was allocated
before it (activations, recompute buffers and fresh gradients), ``fwd_act_mem_gb`` the same at the
end of forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# common and plain_loop: beside this script, which Python puts first on sys.path
import common
import torch
from plain_loop import PhaseTimer, PlainLoop
from torch import Tensor

REPO = common.REPO
DEMO_SHARDS = REPO / "data" / "demo" / "shards"
Batch = dict[str, Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", help="config preset or YAML (default: small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (CPU 8, GPU 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU 2, GPU 5)")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--shards", help="a shard directory (default: data/demo/shards if built)")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="random-token documents with demo-like sentence lengths, real collate",
    )
    p.add_argument("--batches", type=int, default=8, help="distinct batches pre-loaded (cycled)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model.compile (default: the preset's)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="model.activation_checkpointing (default: the preset's)",
    )
    p.add_argument("--precision", choices=("bf16", "fp32"), help="train.precision")
    p.add_argument(
        "--plain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time a plain PyTorch loop (default: on CPU only)",
    )
    p.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the phases of each step (default: CPU only; syncs the GPU)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="K",
        help="after timing, profile one step of each loop and print the top K ops",
    )
    p.add_argument(
        "--threads", type=int, help="torch.set_num_threads (CPU; 1 is steadier on a shared machine)"
    )
    p.add_argument(
        "--check-paths",
        action="store_true",
        help="check the fast paths (SDPA backend, bf16, optimizer, host syncs)",
    )
    p.add_argument(
        "--vs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also build a second engine with this override (repeatable) and time it "
        "against the first, interleaved: vs_over_base_ratio (e.g. model.compile=true)",
    )
    p.add_argument(
        "--summarize",
        metavar="DIR",
        help="print the table of a gpu_check.sh output directory (writes summary.json)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p.parse_args(argv)


def config_overrides(args: argparse.Namespace, shards: Path, run_dir: Path) -> list[str]:
    over = [
        f"data.shards={shards}", f"train.run_dir={run_dir}", "train.resume=none",
        "train.save_interval=0", "train.val_interval=0", "log.tensorboard=false",
        "data.num_workers=0",  # batches are pre-loaded: loading is not what is measured
    ]  # fmt: skip
    if args.precision:
        over.append(f"train.precision={args.precision}")
    if args.compile is not None:
        over.append(f"model.compile={str(args.compile).lower()}")
    if args.activation_checkpointing is not None:
        over.append(f"model.activation_checkpointing={str(args.activation_checkpointing).lower()}")
    return over + list(args.overrides)


def window_tokens(batch: dict) -> float:
    """Valid tokens of a micro-batch, each window once (``mask.draws`` lays it out M times)."""
    return float(batch["valid"].sum()) / batch.get("draws", 1)


def resolve_shards(args: argparse.Namespace, tmp: Path, tokens_needed: int) -> tuple[Path, str]:
    if args.shards:
        return Path(args.shards), f"shards {args.shards}"
    if not args.synthetic and (DEMO_SHARDS / "manifest.json").is_file():
        return DEMO_SHARDS, f"shards {DEMO_SHARDS}"
    shards = common.write_synthetic_shards(tmp / "shards", tokens_needed)
    return shards, "synthetic (random tokens, demo-like sentence lengths, real masking + collate)"


def make_sync(dev: torch.device) -> Callable[[], None]:
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def preload(trainer: Any, n_steps: int) -> list[list[Batch]]:
    """``n_steps`` steps' micro-batches from the trainer's real loader, prepared by its objective
    (on the device)."""
    accum = trainer.cfg.train.grad_accum_steps
    it = iter(trainer.loader)
    steps = [
        [trainer.objective.prepare(next(it), "train", (i, trainer.rank, k)) for k in range(accum)]
        for i in range(n_steps)
    ]
    if hasattr(trainer.loader, "close"):
        trainer.loader.close()
    return steps


def memory_probe(trainer: Any, micro: list[Batch]) -> dict[str, float]:
    """Activation memory of one extra step (GPU): peaks above what was allocated before it."""
    dev = trainer.dev
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    seen: dict[str, int] = {}
    backward = trainer.eng.backward

    def probe_backward(*args: Any, **kwargs: Any) -> Any:
        seen.setdefault("fwd", torch.cuda.max_memory_allocated(dev))
        out = backward(*args, **kwargs)
        seen.setdefault("bwd", torch.cuda.max_memory_allocated(dev))
        return out

    trainer.eng.backward = probe_backward
    try:
        trainer.train_step(micro)
    finally:
        trainer.eng.backward = backward
    torch.cuda.synchronize(dev)
    gb = 2.0**30
    return {
        "fwd_act_mem_gb": (seen["fwd"] - base) / gb,
        "act_mem_gb": (seen["bwd"] - base) / gb,
        "state_mem_gb": base / gb,
    }


def run_bench(
    args: argparse.Namespace, trainer: Any, timer: PhaseTimer, other: Any = None
) -> dict[str, Any]:
    """Time ``trainer`` (and the plain loop, or a second trainer ``other``) on the same batches;
    ``other`` gets batches from its own loader when its data settings differ (e.g. packing).
    ``timer`` is the phase hook ``trainer`` was built with; it is switched on for a breakdown."""
    from lang_jepa.metrics import peak_flops

    dev, cfg = trainer.dev, trainer.cfg
    on_gpu = dev.type == "cuda"
    steps = args.steps if args.steps is not None else (20 if on_gpu else 6)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    plain_on = other is None and (args.plain if args.plain is not None else not on_gpu)
    breakdown = other is None and (args.breakdown if args.breakdown is not None else not on_gpu)
    sync = make_sync(dev)
    timer.sync = sync
    timer.enabled = breakdown
    data = preload(trainer, min(args.batches, steps + warmup))
    plain = PlainLoop(cfg, dev, timer) if plain_on else None
    runners: list[tuple[str, Callable[[list[Batch]], None]]] = [("deepspeed", trainer.train_step)]
    if plain is not None:
        runners.append(("plain", plain.train_step))
    data_vs = data
    if other is not None:
        runners.append(("vs", other.train_step))
        if other.cfg.data != cfg.data:
            data_vs = preload(other, len(data))
    vs_tokens: list[float] = []
    times: dict[str, list[float]] = {name: [] for name, _ in runners}
    phases: dict[str, list[dict[str, float]]] = {name: [] for name, _ in runners}
    tokens: list[float] = []
    flops: list[tuple[float, float]] = []
    for i in range(warmup + steps):
        micro = data[i % len(data)]
        micro_vs = data_vs[i % len(data_vs)]
        if i == warmup and on_gpu:
            torch.cuda.reset_peak_memory_stats(dev)
        for name, fn in runners if i % 2 == 0 else runners[::-1]:  # ABBA: no side always first
            sync()
            t0 = time.perf_counter()
            fn(micro_vs if name == "vs" else micro)
            sync()
            dt = time.perf_counter() - t0
            split = timer.take() if breakdown else {}
            if i >= warmup:
                times[name].append(dt)
                phases[name].append(split)
        if i >= warmup:
            tokens.append(sum(window_tokens(b) for b in micro))
            vs_tokens.append(sum(window_tokens(b) for b in micro_vs))
            mf = [trainer.objective.flops(b) for b in micro]
            flops.append((sum(float(m) for m, _ in mf), sum(float(h) for _, h in mf)))
    result = summarize(trainer, times, phases, tokens, flops, peak_flops(dev))
    if other is not None:
        result["vs_tokens_per_s"] = sum(vs_tokens) / sum(times["vs"])
        result["vs_over_base_tokens_per_s"] = result["vs_tokens_per_s"] / result["tokens_per_s"]
    if args.profile:
        result["profile"] = {name: profile_step(fn, data[0], args.profile) for name, fn in runners}
    result.update(steps=steps, warmup=warmup, distinct_batches=len(data))
    if on_gpu:
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        result.update(memory_probe(trainer, data[0]))
    return result


def summarize(
    trainer: Any, times: dict[str, list[float]], phases: dict[str, list[dict[str, float]]],
    tokens: list[float], flops: list[tuple[float, float]], peak: float | None,
) -> dict[str, Any]:  # fmt: skip
    ds = times["deepspeed"]
    total = sum(ds)
    model_flops, hw_flops = sum(f for f, _ in flops), sum(h for _, h in flops)
    out: dict[str, Any] = {
        "tokens_per_s": sum(tokens) / total,
        "step_ms": 1000 * common.median(ds),
        "step_ms_all": [round(1000 * t, 2) for t in ds],
        "tokens_per_step": common.median(tokens),
        "tflops": model_flops / total / 1e12,
        "mfu": None if peak is None else model_flops / total / peak,
        "hfu": None if peak is None else hw_flops / total / peak,
        "peak_mem_gb": None,
        "deepspeed_over_plain_ratio": None,
    }
    if "plain" in times:
        plain = times["plain"]
        out["plain_step_ms"] = 1000 * common.median(plain)
        out["plain_step_ms_all"] = [round(1000 * t, 2) for t in plain]
        out["plain_tokens_per_s"] = sum(tokens) / sum(plain)
        ratios = [a / b for a, b in zip(ds, plain, strict=True)]
        out["deepspeed_over_plain_ratio"] = common.median(ratios)
        out["ratio_of_medians"] = common.median(ds) / common.median(plain)
    if "vs" in times:
        vs = times["vs"]
        out["vs_step_ms"] = 1000 * common.median(vs)
        out["vs_step_ms_all"] = [round(1000 * t, 2) for t in vs]
        out["vs_over_base_ratio"] = common.median([b / a for a, b in zip(ds, vs, strict=True)])
    breakdown = {}
    for name, rows in phases.items():
        if rows and rows[0]:
            keys = sorted({k for r in rows for k in r})
            med = {k: 1000 * common.median([r.get(k, 0.0) for r in rows]) for k in keys}
            other = [t - sum(r.values()) for t, r in zip(times[name], rows, strict=True)]
            med["other"] = 1000 * common.median(other)  # per step, then the median
            breakdown[name] = {k: round(v, 2) for k, v in med.items()}
    out["breakdown_ms"] = breakdown or None
    return out


def profile_step(fn: Callable[[list[Batch]], None], micro: list[Batch], top: int) -> list[dict]:
    """The ``top`` ops of one step by self CPU time (printed, and returned for the JSON)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn(micro)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top))
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
         "cpu_total_ms": e.cpu_time_total / 1000}
        for e in rows
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# fast-path checks


def check_paths(args: argparse.Namespace, trainer: Any) -> dict[str, Any]:
    eng, dev = trainer.eng, trainer.dev
    param = next(trainer.model.parameters())
    basic = type(eng.basic_optimizer)
    on_gpu = dev.type == "cuda"
    batch = preload(trainer, 2)
    trainer.train_step(batch[0])  # warm up (lazy initialisations)
    attn = common.attention_checks(trainer, batch[1][0])
    syncs = common.count_host_syncs(trainer, batch[1][0])
    result = {
        "bf16_engine": bool(eng.bfloat16_enabled()),
        "param_dtype": str(param.dtype).removeprefix("torch."),
        "optimizer": f"{basic.__module__}.{basic.__name__}",
        "optimizer_wrapper": type(eng.optimizer).__name__,
        "zero_stage": eng.zero_optimization_stage(),
        "fused_adam": basic.__name__ == "FusedAdam",
        "attention": attn,
        "host_syncs_per_step": syncs,
    }
    packed_tol = 0.05 if trainer.rt.autocast is not None else 1e-4  # bf16 vs fp32 rounding
    result["ok"] = {
        "flash_sdpa_no_mask": attn["flash_forced_no_mask"] == "ok",
        "packed_matches_windows": attn["packed_max_abs_diff"] < packed_tol,
        "flash_varlen_packed": (
            any("flash" in op or "varlen" in op for op in attn["packed_ops"]) if on_gpu else None
        ),
        "bf16_engine": result["bf16_engine"] and result["param_dtype"] == "bfloat16",
        "fused_adam": result["fused_adam"] if on_gpu else None,
    }
    return result


# ---------------------------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    s = result["settings"]
    rows = [
        ("device", result["device"]),
        ("preset", f"{s['preset']} (seq {s['seq_len']}, micro-batch {s['micro_batch']}, "
                   f"accum {s['grad_accum']}, {s['params_m']:.1f}M trainable)"),
        ("engine", f"{Path(s['ds_config']).name} (ZeRO-{s['zero_stage']}), {s['precision']}, "
                   f"compile={s['compile']}, act.ckpt={s['activation_checkpointing']}"),
        ("data", s["data"]),
    ]  # fmt: skip
    if "tokens_per_s" in result:
        rows += [
            ("tokens/s", common.fmt(result["tokens_per_s"], ",.0f")),
            ("step ms (median)", common.fmt(result["step_ms"], ".1f")),
            ("TFLOP/s", common.fmt(result["tflops"], ".3g")),
            (
                "MFU / HFU",
                f"{common.fmt(result['mfu'], '.1%')} / {common.fmt(result['hfu'], '.1%')}",
            ),
            ("peak memory GB", common.fmt(result["peak_mem_gb"], ".2f")),
            ("activation memory GB", common.fmt(result.get("act_mem_gb"), ".2f")),
        ]
        if result["deepspeed_over_plain_ratio"] is not None:
            rows += [
                ("plain step ms (median)", common.fmt(result["plain_step_ms"], ".1f")),
                ("deepspeed / plain", common.fmt(result["deepspeed_over_plain_ratio"], ".3f")
                 + f" (ratio of medians {result['ratio_of_medians']:.3f})"),
            ]  # fmt: skip
        if "vs_over_base_ratio" in result:
            rows += [
                (f"vs {' '.join(s['vs'])} step ms", common.fmt(result["vs_step_ms"], ".1f")),
                ("vs / base step time", common.fmt(result["vs_over_base_ratio"], ".3f")),
                ("vs tokens/s", common.fmt(result["vs_tokens_per_s"], ",.0f")),
                ("vs / base tokens/s", common.fmt(result["vs_over_base_tokens_per_s"], ".3f")),
            ]
        for name, parts in (result.get("breakdown_ms") or {}).items():
            rows.append((f"{name} phases ms", ", ".join(f"{k} {v:.1f}" for k, v in parts.items())))
    if "checks" in result:
        c = result["checks"]
        rows += [(f"check {k}", v) for k, v in c["ok"].items()]
        rows += [("optimizer", f"{c['optimizer']} in {c['optimizer_wrapper']}")]
        rows += [(f"sdpa {k}", v) for k, v in c["attention"].items()]
        rows += [("host syncs / step", c["host_syncs_per_step"])]
    print(common.table(rows, "train_bench"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        common.summarize_dir(Path(args.summarize))
        return 0
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lang_jepa.config import load_config
    from lang_jepa.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp_name:
        tmp = Path(tmp_name)
        probe = load_config(args.preset, [o for o in args.overrides])
        need = probe.model.seq_len * probe.data.micro_batch_size * args.batches * 2
        shards, source = resolve_shards(args, tmp, need)
        overrides = config_overrides(args, shards, tmp / "run")
        cfg = load_config(args.preset, overrides)
        timer = PhaseTimer()  # the phase hook, off unless a breakdown is asked for
        trainer = Trainer.build(cfg, args.ds_config, phase=timer.phase)
        dev = trainer.dev
        settings = {
            "preset": args.preset, "ds_config": args.ds_config,
            "zero_stage": trainer.eng.zero_optimization_stage(),
            "precision": cfg.train.precision, "compile": cfg.model.compile,
            "activation_checkpointing": cfg.model.activation_checkpointing,
            "seq_len": cfg.model.seq_len, "micro_batch": cfg.data.micro_batch_size,
            "grad_accum": cfg.train.grad_accum_steps, "world_size": trainer.world,
            "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "threads": torch.get_num_threads(), "data": source,
        }  # fmt: skip
        result: dict[str, Any] = {
            "benchmark": "train_bench",
            "device": common.device_name(dev),
            "device_type": dev.type,
            "settings": settings,
            "versions": {"torch": torch.__version__, "deepspeed": _version("deepspeed")},
        }
        if args.check_paths:
            result["checks"] = check_paths(args, trainer)
        elif args.vs:
            # its own run directory: one training per run directory (the run-dir lock)
            vs_overrides = [*overrides, *args.vs, f"train.run_dir={tmp / 'run_vs'}"]
            other = Trainer.build(load_config(args.preset, vs_overrides), args.ds_config)
            result["settings"]["vs"] = args.vs
            result.update(run_bench(args, trainer, timer, other))
        else:
            result.update(run_bench(args, trainer, timer))
    print_report(result)
    if args.json:
        common.write_json(args.json, result)
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
