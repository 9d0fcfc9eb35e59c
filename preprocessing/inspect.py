"""``python -m preprocessing.inspect DIR [--split val] [--docs N]``: what the model will see.

Prints the manifest's statistics (per split: shards, samples, sentences, tokens, mean sentence
length; documents read, written and skipped by reason) and ``N`` documents of a split decoded back
sentence by sentence with the tokenizer saved beside the shards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lang_jepa.shards import META_KEY, SENTS_KEY, TOKENIZER_DIR, TOKENS_KEY, load_manifest


def format_stats(manifest: dict[str, Any]) -> str:
    """The manifest's statistics as readable lines."""
    tok = manifest["tokenizer"]
    lines = [
        f"format {manifest['format']}; tokenizer {tok['name_or_path']} (vocab {tok['vocab_size']},"
        f" sha256 {tok['sha256'][:12]}); splitter {manifest['splitter']['name']} "
        f"{manifest['splitter'].get('version', '')}",
        f"{'split':6s} {'shards':>7s} {'samples':>9s} {'sentences':>11s} {'tokens':>13s}"
        f" {'tok/sent':>9s}",
    ]
    for split, info in manifest["splits"].items():
        mean = info["tokens"] / info["sentences"] if info["sentences"] else 0.0
        lines.append(
            f"{split:6s} {len(info['shards']):7d} {info['samples']:9d} {info['sentences']:11d}"
            f" {info['tokens']:13d} {mean:9.1f}"
        )
    docs = manifest["documents"]
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(docs["skipped"].items())) or "none"
    lines.append(f"documents: read {docs['read']}, written {docs['written']}, skipped: {skipped}")
    stats = manifest.get("stats", {})
    if stats:
        repaired = ", ".join(f"{k}={v}" for k, v in stats.get("repaired", {}).items()) or "none"
        lines.append(
            f"repaired: {repaired}; sentences cut: {stats.get('sentences_cut', 0)}; "
            f"chunked documents: {stats.get('chunked_documents', 0)}; "
            f"file errors: {len(stats.get('file_errors', []))}"
        )
    return "\n".join(lines)


def iter_samples(shard_dir: Path, split: str) -> Any:
    """Samples of a split read back with webdataset (decoded numpy arrays and json)."""
    import webdataset as wds

    from lang_jepa.shards import shard_urls

    urls = shard_urls(shard_dir, split)
    if not urls:
        return iter(())
    return iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())


def show_documents(shard_dir: Path, split: str, n: int, width: int = 100) -> str:
    """``n`` samples of ``split`` decoded sentence by sentence."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shard_dir / TOKENIZER_DIR))
    out = []
    for i, sample in enumerate(iter_samples(shard_dir, split)):
        if i >= n:
            break
        tokens, sents, meta = sample[TOKENS_KEY], sample[SENTS_KEY], sample[META_KEY]
        out.append(
            f"--- {split} sample {sample['__key__']}: id={meta['id']} source={meta['source']} "
            f"({len(sents) - 1} sentences, {len(tokens)} tokens)"
        )
        for j in range(len(sents) - 1):
            text = tok.decode(tokens[sents[j] : sents[j + 1]].tolist())
            if len(text) > width:
                text = text[: width - 3] + "..."
            out.append(f"  [{j:3d}] {int(sents[j + 1] - sents[j]):4d} tok | {text}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="python -m preprocessing.inspect", description=__doc__)
    p.add_argument("dir", help="a build_shards output directory")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--docs", type=int, default=2, help="documents to decode (0: statistics only)")
    args = p.parse_args(argv)
    shard_dir = Path(args.dir)
    print(format_stats(load_manifest(shard_dir)))
    if args.docs > 0:
        print(show_documents(shard_dir, args.split, args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
