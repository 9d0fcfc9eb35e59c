"""``python -m lang_jepa.experiment experiments/NAME.yaml [--only VARIANT[,VARIANT]] [--seeds 0,1]
[--dry-run] [--out runs/experiments] [--record DIR|none]``

Trains, exports and evaluates every variant x seed of the experiment file that has no
``result.json`` yet (a killed one resumes from its checkpoint), then writes ``results.json``,
``results.md`` and ``results.png`` into ``OUT/NAME/``. Each finished cell's ``result.json`` and the
results are also copied into the record (``--record``, default ``results/NAME/`` beside the
experiment file), which is small enough to commit: a cell recorded there is not re-run on a fresh
checkout whose ``OUT`` is empty. ``--dry-run`` checks the file, resolves
every variant's config and prints the steps and commands without running anything.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from err


def _interrupt(signum: int, frame: object) -> None:
    from .cell import Interrupted

    raise Interrupted(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lang_jepa.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("file", help="experiment YAML (experiments/NAME.yaml)")
    parser.add_argument("--only", default=None, help="comma-separated variants to run")
    parser.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--out", default="runs/experiments", help="root of the experiment dirs")
    parser.add_argument("--record", default="default",
                        help="where finished cells' result.json and the results are copied, to be "
                        "committed (default: results/NAME/ beside the file; 'none': nowhere)")  # fmt: skip
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--figure", default=None, metavar="PNG",
                        help="run nothing: draw the finished cells of the --only variants (every "
                        "variant without it), in that order, into PNG")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from .cell import CellFailed
    from .runner import plan, run_experiment
    from .spec import ExperimentError, load_experiment

    only = [s for s in args.only.split(",") if s] if args.only else None
    try:
        record = None if args.record == "none" else args.record
        exp = load_experiment(args.file, args.out, args.seeds, only, record)
        if args.figure:
            from .runner import figure

            print(figure(exp, only, args.figure))
            return 0
        print(plan(exp), flush=True)
        if args.dry_run:
            from .runner import check_data

            check_data(exp)
            return 0
        signal.signal(signal.SIGTERM, _interrupt)
        paths = run_experiment(exp, args.poll)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CellFailed as err:
        print(f"error: {err}; run the same command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
