"""Shard writing: one :class:`SplitWriter` per split, rolling to a new tar when one is full.

Tars are written with ``webdataset.TarWriter`` with fixed mtime, owner and mode, so the same
samples give the same bytes on every run and machine. A shard is written to ``NAME.tmp`` and renamed
when complete: a file named ``train-NNNNNN.tar`` is always a finished shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from lang_jepa.shards import make_sample, sha256_file, shard_name

TAR_MTIME = 0.0
TAR_OWNER = "lang-jepa"


class SplitWriter:
    """Writes one split's documents into numbered shards, in the order they are given.

    A shard is closed after the document that makes it reach ``shard_docs`` samples or
    ``shard_tokens`` tokens (whichever is set), so a shard always holds whole documents.
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        vocab_size: int,
        shard_docs: int | None,
        shard_tokens: int | None,
        key_prefix: str = "",
        next_index: int = 0,
        next_seq: int = 0,
    ) -> None:
        self.out_dir, self.split, self.vocab_size = out_dir, split, vocab_size
        self.shard_docs, self.shard_tokens = shard_docs, shard_tokens
        self.key_prefix = key_prefix
        self.index, self.seq = next_index, next_seq
        self._writer: wds.TarWriter | None = None
        self._file: Any = None
        self._counts = {"samples": 0, "sentences": 0, "tokens": 0}

    def _open(self) -> None:
        path = self.out_dir / (shard_name(self.split, self.index) + ".tmp")
        self._file = open(path, "wb")  # noqa: SIM115 - closed in _close()
        self._writer = wds.TarWriter(
            self._file, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, mtime=TAR_MTIME
        )
        self._counts = {"samples": 0, "sentences": 0, "tokens": 0}

    def write_doc(
        self, chunks: list[tuple[np.ndarray, np.ndarray]], meta: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Write a document's chunks as samples; return the shard record if the shard closed."""
        if self._writer is None:
            self._open()
        assert self._writer is not None
        for k, (tokens, sents) in enumerate(chunks):
            sample_meta = dict(meta)
            if len(chunks) > 1:
                sample_meta.update(id=f"{meta['id']}#{k}", doc_id=meta["id"], chunk=k)
            key = f"{self.key_prefix}{self.seq:010d}"
            self._writer.write(make_sample(key, tokens, sents, sample_meta, self.vocab_size))
            self.seq += 1
            self._counts["samples"] += 1
            self._counts["sentences"] += len(sents) - 1
            self._counts["tokens"] += len(tokens)
        full = (self.shard_docs is not None and self._counts["samples"] >= self.shard_docs) or (
            self.shard_tokens is not None and self._counts["tokens"] >= self.shard_tokens
        )
        return self._close() if full else None

    def _close(self) -> dict[str, Any]:
        assert self._writer is not None
        self._writer.close()
        self._file.close()
        name = shard_name(self.split, self.index)
        tmp, final = self.out_dir / (name + ".tmp"), self.out_dir / name
        os.replace(tmp, final)
        record = {"split": self.split, "index": self.index, "url": name, **self._counts}
        record["sha256"] = sha256_file(final)
        record["bytes"] = final.stat().st_size
        self._writer, self._file = None, None
        self.index += 1
        return record

    def finish(self) -> dict[str, Any] | None:
        """Close the open shard, if any, and return its record."""
        return self._close() if self._writer is not None else None
