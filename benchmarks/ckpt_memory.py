"""Peak host memory of one forward + backward with and without activation checkpointing (CPU).

    python benchmarks/ckpt_memory.py [--preset small] [--micro-batch N] [--shards DIR] [--json F]

Each variant runs in a fresh subprocess (peak RSS is per process). Two figures, each the rise of
the peak resident set over the state just before the step (weights, target encoder and batch
already resident): ``fwd`` at the end of the forward (targets, context encoder, predictor, loss:
the activations kept for backward plus the largest transient), and ``step`` after the backward
(adds recompute and the gradients, which are the same in both variants). On a GPU,
benchmarks/gpu_check.sh measures the same with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one(preset: str, shards: str, checkpointing: bool, micro_batch: int) -> tuple[float, float]:
    import torch

    from lang_jepa.config import load_config
    from lang_jepa.data import build_train_loader, manifest_vocab_size
    from lang_jepa.objectives import build_models, compute_targets, jepa_loss
    from lang_jepa.objectives.jepa import candidates

    overrides = [f"data.shards={shards}", "data.num_workers=0",
                 f"model.activation_checkpointing={str(checkpointing).lower()}"]  # fmt: skip
    if micro_batch:
        overrides.append(f"data.micro_batch_size={micro_batch}")
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model, target = build_models(cfg, manifest_vocab_size(shards))
    batch = next(iter(build_train_loader(cfg, 0, 1)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    targets = compute_targets(target, batch, None)
    keep = candidates(batch, cfg.loss, "sentence")  # loss.negatives, mask.draws
    loss, _ = jepa_loss(model(batch), targets, batch["tgt_sent_valid"], cfg.loss, keep=keep)
    fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss.backward()
    step = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (fwd - before) / 2**20, (step - before) / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--micro-batch", type=int, default=0, help="0: the preset's")
    parser.add_argument("--shards", default=str(REPO / "data" / "demo" / "shards"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(*one(args.preset, args.shards, args.child == "on", args.micro_batch))
        return
    out = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--shards", args.shards,
               "--micro-batch", str(args.micro_batch), "--child", mode]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = [float(x) for x in proc.stdout.split()[-2:]]
    fwd_ratio = out["off"][0] / max(out["on"][0], 1e-9)
    step_ratio = out["off"][1] / max(out["on"][1], 1e-9)
    print(f"{args.preset} (micro-batch {args.micro_batch or 'preset'}): peak RSS rise without / "
          f"with checkpointing: forward {out['off'][0]:.2f} / {out['on'][0]:.2f} GiB "
          f"({fwd_ratio:.2f}x), forward + backward {out['off'][1]:.2f} / {out['on'][1]:.2f} GiB "
          f"({step_ratio:.2f}x)")  # fmt: skip
    if args.json:
        result = {"preset": args.preset, "micro_batch": args.micro_batch,
                  "no_ckpt_fwd_gb": out["off"][0], "ckpt_fwd_gb": out["on"][0],
                  "no_ckpt_gb": out["off"][1], "ckpt_gb": out["on"][1],
                  "fwd_ratio": fwd_ratio, "ratio": step_ratio}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
