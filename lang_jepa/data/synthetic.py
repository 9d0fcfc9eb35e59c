"""Write small shard sets from in-memory documents (tests and benchmarks).

The real writer is ``preprocessing.build_shards``; this one writes the same format (through
:func:`lang_jepa.shards.make_sample` and a manifest that passes
:func:`lang_jepa.shards.validate_manifest`) without a tokenizer run, so data tests need nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds

from lang_jepa import shards as fmt

Doc = tuple[str, np.ndarray, np.ndarray]  # (id, tokens [T], sentence offsets [n + 1])


def random_docs(
    n_docs: int, seed: int = 0, sentences: tuple[int, int] = (5, 60), lengths: tuple[int, int] = (4, 40),
    vocab_size: int = 1000, prefix: str = "doc",
) -> list[Doc]:  # fmt: skip
    """``n_docs`` documents of random token ids with random sentence counts and lengths."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(*sentences, endpoint=True))
        lens = rng.integers(*lengths, size=n, endpoint=True)
        sents = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        tokens = rng.integers(1, vocab_size, size=int(sents[-1]))
        docs.append((f"{prefix}{i}", tokens, sents))
    return docs


def write_shards(
    out_dir: str | Path,
    splits: dict[str, Sequence[Sequence[Doc]]],
    vocab_size: int = 1000,
    tokenizer_sha256: str = "0" * 64,
    tokenizer_name: str = "synthetic",
) -> Path:
    """Write ``splits[split][i]`` (a list of documents) as shard ``{split}-{i:06d}.tar``, plus the
    manifest. Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_splits = {}
    n_docs = 0
    for split, shard_docs in splits.items():
        entries = []
        for i, docs in enumerate(shard_docs):
            name = fmt.shard_name(split, i)
            with wds.TarWriter(str(out / name)) as sink:
                for j, (doc_id, tokens, sents) in enumerate(docs):
                    meta = {"id": doc_id, "source": "synthetic"}
                    sink.write(fmt.make_sample(f"{i:06d}_{j:06d}", tokens, sents, meta, vocab_size))
            entries.append({
                "url": name, "samples": len(docs), "sentences": sum(len(s) - 1 for _, _, s in docs),
                "tokens": sum(len(t) for _, t, _ in docs), "sha256": fmt.sha256_file(out / name),
            })  # fmt: skip
            n_docs += len(docs)
        manifest_splits[split] = {
            "samples": sum(e["samples"] for e in entries),
            "sentences": sum(e["sentences"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "shards": entries,
        }
    manifest = {
        "format": fmt.FORMAT,
        "tokenizer": {"name_or_path": tokenizer_name, "vocab_size": vocab_size,
                      "sha256": tokenizer_sha256},
        "splitter": {"name": "synthetic", "version": "0"},
        "splits": manifest_splits,
        "documents": {"read": n_docs, "written": n_docs, "skipped": {}},
        "split_rule": "given", "args": ["lang_jepa.data.synthetic.write_shards"],
    }  # fmt: skip
    fmt.validate_manifest(manifest)
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out
