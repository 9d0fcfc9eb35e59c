"""``python -m lang_jepa.eval RUN_DIR_OR_EXPORT [--out DIR] [--baselines random,tfidf,minilm]
[--max-val-batches N] [--quick]``

A run directory gets everything: the encoder tasks for its EMA target encoder (``model``) and
online encoder (``model_online``), and the predictor's masked-sentence retrieval against the
controls (copy-context, copy-neighbour, batch-mean, shuffled contexts). An export directory
(``python -m lang_jepa.export``) gets the encoder tasks only. Writes ``eval.json``, ``eval.md``
and PNG plots into ``--out`` (default ``RUN_DIR/eval``, or ``EXPORT/eval``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lang_jepa.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("path", help="run directory or export directory")
    parser.add_argument("--out", default=None, help="output directory (default PATH/eval)")
    parser.add_argument("--baselines", default="random,tfidf,minilm",
                        help="comma-separated subset of random,tfidf,minilm ('' for none)")  # fmt: skip
    parser.add_argument(
        "--max-val-batches", type=int, default=16, help="validation batches (default 16)"
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer val batches (4), 2000 RT snippets, no online-encoder row")  # fmt: skip
    parser.add_argument("--data-dir", default="data/eval", help="where fetch_data put the RT csv")
    parser.add_argument("--rt-limit", type=int, default=None, help="use a stratified RT subset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from .output import console_summary, write_all
    from .suite import BASELINES, evaluate

    baselines = [b for b in args.baselines.split(",") if b]
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        parser.error(
            f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}"
        )
    path = Path(args.path)
    if not path.exists():
        parser.error(f"{path} does not exist")
    max_val = min(args.max_val_batches, 4) if args.quick else args.max_val_batches
    from ..checkpoint import CheckpointError

    try:
        results = evaluate(
            path, baselines, max_val, args.quick, Path(args.data_dir), args.rt_limit, args.seed
        )
    except (CheckpointError, FileNotFoundError, ValueError) as err:  # names the path or key
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else path / "eval"
    paths = write_all(results, out)
    print(console_summary(results))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
