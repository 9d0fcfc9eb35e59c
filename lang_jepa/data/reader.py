"""Reading shards: tokenizer check, per-epoch split of shards over ranks x workers, window streams.

The read side of the shard format (:mod:`lang_jepa.shards`). A *slot* is one (rank, worker) pair:
``slot = rank * workers + worker`` of ``n_slots = world_size * workers``. Each epoch the shard list
is shuffled with ``(seed, epoch)`` and shard ``i`` goes to slot ``i % n_slots``. With fewer shards
than slots every slot reads every shard and keeps every ``n_slots``-th document instead, so no
document is dropped or read twice in an epoch either way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from lang_jepa import shards as fmt
from lang_jepa.data.windows import Window, WindowCounters, cut_windows


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split: its path, the number of samples the manifest promises, its sha256
    (checked when a process first opens it; "" skips the check) and the vocabulary size every
    token id must stay under (0: unchecked)."""

    url: str
    samples: int
    sha256: str = ""
    vocab_size: int = 0


_VERIFIED: set[str] = set()  # shards whose sha256 this process has checked


def split_shards(shard_dir: str | Path, split: str, verify: bool = True) -> list[ShardInfo]:
    """The split's shards, in manifest order, with their sample counts; ``verify``: with the
    sha256 and vocabulary checks on."""
    manifest = fmt.load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise fmt.ShardFormatError(f"{Path(shard_dir) / fmt.MANIFEST_NAME}: no split {split!r}")
    entries = manifest["splits"][split]["shards"]
    vocab = int(manifest["tokenizer"]["vocab_size"]) if verify else 0
    return [
        ShardInfo(str(Path(shard_dir) / s["url"]), int(s["samples"]),
                  s["sha256"] if verify else "", vocab)
        for s in entries
    ]  # fmt: skip


def manifest_vocab_size(shard_dir: str | Path) -> int:
    """The tokenizer's vocabulary size recorded in the manifest (for ``model.vocab_size = 0``)."""
    return int(fmt.load_manifest(shard_dir)["tokenizer"]["vocab_size"])


def check_tokenizer(shard_dir: str | Path, tokenizer_name_or_path: str | None) -> str | None:
    """Refuse shards made with another tokenizer than the configured one.

    With ``tokenizer_name_or_path`` None nothing is checked (the shards' own tokenizer is used).
    Otherwise loads it with ``AutoTokenizer`` and compares its fingerprint with
    ``manifest['tokenizer']['sha256']``; a mismatch raises ValueError naming the shard directory
    and both tokenizers. Returns the fingerprint that was checked.
    """
    manifest = fmt.load_manifest(shard_dir)
    if tokenizer_name_or_path is None:
        return None
    from transformers import AutoTokenizer  # heavy import, only when a check is asked for

    tok = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    got = fmt.tokenizer_fingerprint(tok)
    want = manifest["tokenizer"]["sha256"]
    if got != want:
        raise ValueError(
            f"shards in {shard_dir} were tokenized with {manifest['tokenizer']['name_or_path']!r} "
            f"(sha256 {want[:16]}...), but data.tokenizer={tokenizer_name_or_path!r} has sha256 "
            f"{got[:16]}...: re-run preprocessing with this tokenizer or unset data.tokenizer"
        )
    return got


def read_shard(
    url: str, expected_samples: int | None = None, sha256: str = ""
) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__`` plus field bytes) of one shard, via webdataset's tar reader.

    With ``sha256`` the file's hash is checked the first time this process opens the shard, so a
    damaged shard is refused before any of its samples is read. Any read error (missing,
    truncated or corrupt tar) is re-raised as :class:`~lang_jepa.shards.ShardFormatError` naming
    the shard; a shard that ends cleanly but holds another number of samples than the manifest
    says is refused the same way.
    """
    if sha256 and url not in _VERIFIED:
        if not Path(url).is_file():
            raise fmt.ShardFormatError(f"shard {url} is missing (listed in the manifest)")
        fmt.verify_shard(url, sha256)
        _VERIFIED.add(url)
    n = 0
    try:
        for sample in wds.tarfile_samples([{"url": url}], handler=wds.reraise_exception):
            n += 1
            yield sample
    except fmt.ShardFormatError:
        raise
    except Exception as err:  # webdataset / tarfile / OS errors: name the shard
        first = err.args[0] if err.args else ""
        raise fmt.ShardFormatError(
            f"shard {url}: cannot read it after {n} samples ({type(err).__name__}: {first})"
        ) from err
    if expected_samples is not None and n != expected_samples:
        raise fmt.ShardFormatError(
            f"shard {url}: holds {n} samples but the manifest says {expected_samples} "
            "(truncated or replaced shard?)"
        )


def decode_sample(
    sample: dict[str, Any], url: str, vocab_size: int = 0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tokens [T], sents [n + 1] int32, json meta) of a raw sample; errors name shard and key.
    With ``vocab_size`` every token id must be below it."""
    where = f"shard {url}, sample {sample.get('__key__')!r}"
    try:
        tokens = np.load(io.BytesIO(sample[fmt.TOKENS_KEY]), allow_pickle=False)
        sents = np.load(io.BytesIO(sample[fmt.SENTS_KEY]), allow_pickle=False)
        meta = json.loads(sample[fmt.META_KEY])
    except (KeyError, ValueError, OSError) as err:
        raise fmt.ShardFormatError(f"{where}: cannot decode ({type(err).__name__}: {err})") from err
    fmt.check_sample(tokens, sents, where=where)
    if vocab_size:
        fmt.check_token_ids(tokens, vocab_size, where)
    return tokens, sents, meta


def epoch_plan(
    shards: list[ShardInfo], slot: int, n_slots: int, seed: int, epoch: int
) -> tuple[list[ShardInfo], int]:
    """This slot's shards for ``epoch`` and the document stride (1, or n_slots in fallback mode).

    Shards are permuted with ``(seed, epoch)``; shard ``i`` of the permutation goes to slot
    ``i % n_slots``. With fewer shards than slots the slot gets all of them and keeps documents
    ``j`` with ``j % n_slots == slot`` (stride ``n_slots``).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(shards)).tolist()
    permuted = [shards[i] for i in order]
    if len(shards) >= n_slots:
        return permuted[slot::n_slots], 1
    return permuted, n_slots


def document_windows(
    shards: Iterable[ShardInfo],
    seq_len: int,
    min_sentences: int,
    counters: WindowCounters,
    stride: int = 1,
    offset: int = 0,
) -> Iterator[Window]:
    """Windows of the documents ``j`` (counted over ``shards`` in order) with ``j % stride ==
    offset``, in document order. Skipped documents are not decoded."""
    j = 0
    for shard in shards:
        for sample in read_shard(shard.url, shard.samples, shard.sha256):
            keep = j % stride == offset
            j += 1
            if not keep:
                continue
            tokens, sents, meta = decode_sample(sample, shard.url, shard.vocab_size)
            doc_id = str(meta["id"])
            key = f"{doc_id}|{sample['__key__']}"
            yield from cut_windows(tokens, sents, seq_len, min_sentences, doc_id, key, counters)


def shuffled(items: Iterable[Any], buffer: int, rng: np.random.Generator) -> Iterator[Any]:
    """Buffer shuffle: hold ``buffer`` items, emit a random one as each new one arrives.

    Deterministic for a given ``rng`` state; at the end the remaining buffer is emitted in a random
    order. ``buffer <= 1`` passes items through unchanged.
    """
    if buffer <= 1:
        yield from items
        return
    held: list[Any] = []
    picks: list[int] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        if not picks:  # draw positions in chunks: one numpy call per 1024 items
            picks = rng.integers(0, buffer, size=1024).tolist()
        i = picks.pop()
        yield held[i]
        held[i] = item
    for i in rng.permutation(len(held)).tolist():
        yield held[i]
