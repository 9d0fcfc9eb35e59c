"""EMA update under partitioned fp32 masters: bytes over the wire and time, all-reduce vs all-gather.

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/ema_bench.py [--preset small] [--stage 2]
        [--reps 10] [--json FILE] [key.sub=value ...]

The layout is real: the preset's JEPA model in a real DeepSpeed engine (ZeRO ``--stage``, fp32,
torch AdamW, no step taken), and its encoder's fp32 fragments from ``engine.fp32_fragments``.

Bytes (computed, per rank and step, fp32, ring algorithms as NCCL uses for buffers this large):

- before, all-reduce of ``W - T`` over the whole encoder (N elements): 2 (world - 1) / world x N x 4
  sent, as many received;
- after, all-gather of the owned slices (``EmaSync``): (world - 1) x longest stream x 4, where the
  longest stream is the most encoder elements one rank owns (>= N / world).

Time: the old update (kept here, as it was in lang_jepa/ema.py) and ``EmaSync.update`` alternate
(ABAB...), each between barriers on the same fragments and targets; the ratio is the median over
adjacent pairs of old / new, robust to load drifting on a shared machine. On CPU the collectives
are gloo's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common  # beside this script, which Python (and torchrun) put first on sys.path
import torch
import torch.distributed as dist
from torch import Tensor

REPO = common.REPO


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", help="config preset or YAML (default: small)")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage")
    p.add_argument("--reps", type=int, default=10, help="timed pairs (old, new)")
    p.add_argument("--json", help="write the figures here (rank 0)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p.parse_args(argv)


@torch.no_grad()
def allreduce_update(
    targets: list[Tensor],
    fragments: list[list[tuple[int, Tensor]]],
    momentum: float,
    bucket_numel: int = 1 << 26,
) -> None:
    """The update EmaSync replaced: ``W - T`` into a zero buffer, sum-reduce, ``T += (1-m) delta``,
    in buckets of whole parameters."""
    bucket: list[int] = []
    size = 0
    for i, target in enumerate(targets):
        bucket.append(i)
        size += target.numel()
        if size < bucket_numel and i < len(targets) - 1:
            continue
        delta = torch.zeros(size, dtype=torch.float32, device=target.device)
        offset = 0
        for j in bucket:
            flat = targets[j].view(-1)
            for start, values in fragments[j]:
                n = values.numel()
                delta[offset + start : offset + start + n] = values - flat[start : start + n]
            offset += targets[j].numel()
        dist.all_reduce(delta)
        offset = 0
        for j in bucket:
            targets[j].view(-1).add_(
                delta[offset : offset + targets[j].numel()], alpha=1 - momentum
            )
            offset += targets[j].numel()
        bucket, size = [], 0


def build_layout(args: argparse.Namespace) -> tuple[list[Tensor], list[list[tuple[int, Tensor]]]]:
    """The EMA targets and this rank's encoder fragments of a real ZeRO engine (no step taken)."""
    from lang_jepa import engine
    from lang_jepa.config import load_config
    from lang_jepa.objectives import build_models
    from lang_jepa.trainer import seed_everything

    cfg = load_config(
        args.preset, [f"model.vocab_size={common.SYNTHETIC_VOCAB}", "train.precision=fp32"]
        + args.overrides
    )  # fmt: skip
    world = dist.get_world_size()
    ds_path = Path(tempfile.mkdtemp()) / "ds.json"
    ds = json.loads((REPO / "ds_configs" / f"zero{max(args.stage, 2)}.json").read_text())
    ds["zero_optimization"]["stage"] = args.stage
    ds_path.write_text(json.dumps(ds))
    ds_config = engine.build_ds_config(ds_path, cfg, world)
    seed_everything(cfg.train.seed)
    model, target = build_models(cfg, cfg.model.vocab_size)
    optimizer = engine.build_optimizer(engine.param_groups(model), cfg, ds_config)
    eng = engine.initialize(model, optimizer, ds_config)
    fragments, partitioned = engine.fp32_fragments(eng.module.encoder.parameters(), eng.optimizer)
    assert partitioned, "the fp32 masters are not partitioned at this stage"
    return list(target.parameters()), fragments


def timed(fn: Callable[[], None]) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from lang_jepa import engine
    from lang_jepa.ema import EmaSync

    args = parse_args(argv)
    rank, _, world = engine.init_distributed()
    targets, fragments = build_layout(args)
    # 1. the layout exchange (once) and the computed bytes
    sync = EmaSync(
        targets,
        fragments,
        rank,
        world,
        engine.dp_all_gather_object,
        engine.dp_all_gather_into_tensor,
    )
    n = sum(t.numel() for t in targets)
    owned = engine.dp_all_gather_object(sum(v.numel() for f in fragments for _, v in f))
    old_bytes = 2 * (world - 1) / world * n * 4
    new_bytes = sync.wire_numel() * 4
    # 2. old and new alternate on the same targets (the values drift; the work does not)
    old_s, new_s = [], []
    for _ in range(args.reps + 1):  # the first pair warms up
        old_s.append(timed(lambda: allreduce_update(targets, fragments, 0.996)))
        new_s.append(timed(lambda: sync.update(targets, fragments, 0.996)))
    old_s, new_s = old_s[1:], new_s[1:]
    result = {
        "preset": args.preset,
        "zero_stage": args.stage,
        "world": world,
        "device": common.device_name(targets[0].device),
        "encoder_numel": n,
        "owned_numel_per_rank": owned,
        "longest_stream": sync.longest,
        "rounds": len(sync.rounds),
        "bytes_sent_per_rank_old": old_bytes,
        "bytes_sent_per_rank_new": new_bytes,
        "bytes_ratio_old_over_new": old_bytes / new_bytes,
        "old_ms_median": 1e3 * statistics.median(old_s),
        "new_ms_median": 1e3 * statistics.median(new_s),
        "time_ratio_old_over_new": statistics.median(
            o / w for o, w in zip(old_s, new_s, strict=True)
        ),
        "old_ms_all": [1e3 * t for t in old_s],
        "new_ms_all": [1e3 * t for t in new_s],
    }
    if rank == 0:
        mb = 2**20
        print(
            f"{args.preset} encoder, {n / 1e6:.1f}M fp32 elements, ZeRO-{args.stage}, {world} ranks, "
            f"{result['device']}\n"
            f"  owned per rank {owned}, longest stream {sync.longest} ({len(sync.rounds)} round(s))\n"
            f"  sent per rank and step: all-reduce {old_bytes / mb:.1f} MiB, "
            f"all-gather {new_bytes / mb:.1f} MiB (old / new {old_bytes / new_bytes:.2f})\n"
            f"  time (median of {args.reps}, interleaved): all-reduce "
            f"{result['old_ms_median']:.1f} ms, all-gather {result['new_ms_median']:.1f} ms, "
            f"old / new {result['time_ratio_old_over_new']:.2f}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
