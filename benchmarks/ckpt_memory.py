"""Peak host memory of one forward + backward with and without activation checkpointing (CPU).

    python benchmarks/ckpt_memory.py [--preset small] [--shards data/demo/shards] [--json FILE]

Each variant runs in a fresh subprocess (peak RSS is per process); the figure is the rise of the
peak resident set over the state just before the step (weights, batch and optimizer-free model are
already resident), i.e. activations + gradients. On a GPU, benchmarks/gpu_check.sh measures the
same with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one(preset: str, shards: str, checkpointing: bool) -> float:
    sys.path.insert(0, str(REPO))
    import torch

    from lang_jepa.config import load_config
    from lang_jepa.data import build_train_loader, manifest_vocab_size
    from lang_jepa.objective import build_models, compute_targets, jepa_loss

    cfg = load_config(preset, [f"data.shards={shards}", "data.num_workers=0",
                               f"model.activation_checkpointing={str(checkpointing).lower()}"])  # fmt: skip
    torch.manual_seed(0)
    model, target = build_models(cfg, manifest_vocab_size(shards))
    batch = next(iter(build_train_loader(cfg, 0, 1)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    targets = compute_targets(target, batch, None)
    loss, _ = jepa_loss(model(batch), targets, batch["tgt_sent_valid"], cfg.loss)
    loss.backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--shards", default=str(REPO / "data" / "demo" / "shards"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(one(args.preset, args.shards, args.child == "on"))
        return
    out = {}
    for mode in ("off", "on"):
        cmd = [
            sys.executable,
            __file__,
            "--preset",
            args.preset,
            "--shards",
            args.shards,
            "--child",
            mode,
        ]
        out[mode] = float(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]
        )
    ratio = out["off"] / max(out["on"], 1e-9)
    print(f"{args.preset}: step memory without checkpointing {out['off']:.2f} GiB, "
          f"with {out['on']:.2f} GiB, ratio {ratio:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "no_ckpt_gb": out["off"],
                                               "ckpt_gb": out["on"], "ratio": ratio}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
