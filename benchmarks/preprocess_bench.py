"""Preprocessing throughput on the demo corpus: splitter, tokenizer alone, end-to-end build.

    python benchmarks/preprocess_bench.py [--raw data/demo/raw] [--repeat 3] [--json out.json]

All figures are MB of UTF-8 text per second, best of ``--repeat`` runs, on the same text:

- ``blingfire_split_mb_s``: ``blingfire.text_to_sentences_and_offsets`` per document (the library
  call); ``splitter_mb_s``: the pipeline's splitter (the same blingfire function, offsets mapped
  without blingfire's per-byte Python loop).
- ``tokenizer_mb_s``: the tokenizer alone, ``encode_batch_fast`` of whole documents in batches of
  64, one thread (TOKENIZERS_PARALLELISM=false), no padding/truncation, no special tokens.
- ``e2e_1_worker_mb_s`` / ``e2e_2_workers_mb_s``: a whole ``build_shards`` run in this process
  (worker start-up, reading, splitting, tokenizing, packing, writing tars and the manifest).
- ``e2e_over_tokenizer_ratio`` = e2e(1 worker) / tokenizer; ``two_worker_speedup`` = e2e(2)/e2e(1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import blingfire  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from preprocessing.pipeline import BuildConfig, Builder  # noqa: E402
from preprocessing.readers import expand_inputs, iter_events  # noqa: E402
from preprocessing.textproc import split_sentences  # noqa: E402
from preprocessing.tokenizer import DEFAULT_TOKENIZER, load_tokenizer  # noqa: E402


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def e2e_seconds(raw: str, tokenizer: str, workers: int, repeat: int) -> float:
    """Best wall time of a full build of ``raw`` with ``workers`` workers."""

    def build() -> None:
        with tempfile.TemporaryDirectory() as out:
            cfg = BuildConfig(output=out, tokenizer=tokenizer, inputs=[raw], workers=workers)
            cfg.quiet = True
            events = iter_events(expand_inputs([raw]), "text", "id", False)
            Builder(cfg, events, ["bench"]).run()

    return best_seconds(build, repeat)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", default="data/demo/raw", help="directory of .txt documents")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()

    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(args.raw).glob("*.txt"))]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok, _ = load_tokenizer(args.tokenizer)
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()

    def encode_all() -> None:
        for i in range(0, len(texts), 64):
            backend.encode_batch_fast(texts[i : i + 64], add_special_tokens=False)

    figures = {
        "corpus_mb": round(mb, 3),
        "documents": len(texts),
        "blingfire_split_mb_s": mb
        / best_seconds(lambda: [blingfire.text_to_sentences_and_offsets(t) for t in texts], 1),
        "splitter_mb_s": mb
        / best_seconds(lambda: [split_sentences(t) for t in texts], args.repeat),
        "tokenizer_mb_s": mb / best_seconds(encode_all, args.repeat),
        "e2e_1_worker_mb_s": mb / e2e_seconds(args.raw, args.tokenizer, 1, args.repeat),
        "e2e_2_workers_mb_s": mb / e2e_seconds(args.raw, args.tokenizer, 2, args.repeat),
    }
    figures["e2e_over_tokenizer_ratio"] = figures["e2e_1_worker_mb_s"] / figures["tokenizer_mb_s"]
    figures["two_worker_speedup"] = figures["e2e_2_workers_mb_s"] / figures["e2e_1_worker_mb_s"]
    figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    figures["machine"] = f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    for key, value in figures.items():
        print(f"{key:28s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
