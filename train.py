"""LANG-JEPA pretraining entry point.

deepspeed train.py --deepspeed_config ds_configs/zero2.json [--config PRESET_OR_YAML] [key.sub=value ...]
torchrun --nproc_per_node 2 train.py ...   |   python train.py ...   (one process, no launcher)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--deepspeed_config", default="ds_configs/zero2.json", help="engine settings (JSON)"
    )
    parser.add_argument(
        "--config", default=None, help="preset name (tiny, small, base, large, xl) or a YAML file"
    )
    parser.add_argument(
        "--local_rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from lang_jepa.checkpoint import CheckpointError
    from lang_jepa.config import ConfigError, load_config
    from lang_jepa.runinfo import RunDirBusy
    from lang_jepa.shards import ShardFormatError
    from lang_jepa.trainer import (
        EXIT_REQUEUE,
        LostRanks,
        NonFiniteLoss,
        RepresentationCollapse,
        Trainer,
        run,
    )

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer.build(cfg, args.deepspeed_config)
    # a user error: one line naming the key, file or shard (ShardFormatError is a ValueError)
    except (ConfigError, CheckpointError, RunDirBusy, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return run(trainer)
    except ShardFormatError as err:  # a shard found damaged while training
        print(f"error: {err}", file=sys.stderr)
        return 1
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RepresentationCollapse as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except LostRanks as err:
        # the process group is broken: leave now, without the interpreter's teardown of it
        # (which can block on the lost peers)
        print(f"error: {err}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_REQUEUE)


if __name__ == "__main__":
    sys.exit(main())
