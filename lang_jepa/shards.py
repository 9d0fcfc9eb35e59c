"""The shard format: the one contract between offline preprocessing (writer) and training (reader).

A shard is a WebDataset tar named ``{split}-{index:06d}.tar``. One sample is one document (a very
long one may be cut into chunks at sentence boundaries) with the fields:

- ``tokens.npy``: 1-D token ids of all sentences concatenated, no special tokens; uint16 when the
  vocabulary fits, else uint32.
- ``sents.npy``: 1-D int32 sentence offsets of length ``n_sentences + 1``; sentence ``i`` is
  ``tokens[sents[i]:sents[i + 1]]``.
- ``json``: at least ``{"id": ..., "source": ...}``.

``manifest.json`` beside the shards describes them (see :func:`validate_manifest`) and the
tokenizer's files are saved in ``tokenizer/``. This module imports numpy only (plus hashlib/json),
so the preprocessing side depends on nothing else of the training code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "lang-jepa-shards/1"
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
TOKENS_KEY = "tokens.npy"
SENTS_KEY = "sents.npy"
META_KEY = "json"


class ShardFormatError(ValueError):
    """A shard, sample or manifest does not follow the format; the message names where."""


def shard_name(split: str, index: int) -> str:
    """``train-000003.tar`` for (``"train"``, 3)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"{split}-{index:06d}.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def make_sample(
    key: str, tokens: np.ndarray, sents: np.ndarray, meta: dict[str, Any], vocab_size: int
) -> dict[str, Any]:
    """Build one WebDataset sample dict (for ``webdataset.TarWriter.write``), validated."""
    if "." in key:
        raise ShardFormatError(f"sample key {key!r} must not contain '.' (WebDataset splits on it)")
    tokens = np.asarray(tokens).astype(token_dtype(vocab_size), copy=False)
    sents = np.asarray(sents, dtype=np.int32)
    for field in ("id", "source"):
        if field not in meta:
            raise ShardFormatError(f"sample {key!r}: json field {field!r} is missing")
    check_sample(tokens, sents, where=f"sample {key!r}")
    return {"__key__": key, TOKENS_KEY: tokens, SENTS_KEY: sents, META_KEY: meta}


def check_sample(tokens: np.ndarray, sents: np.ndarray, where: str) -> None:
    """Raise :class:`ShardFormatError` naming ``where`` unless the arrays follow the format."""
    if tokens.ndim != 1 or sents.ndim != 1:
        raise ShardFormatError(f"{where}: tokens and sents must be 1-D")
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ShardFormatError(f"{where}: tokens dtype {tokens.dtype} is not uint16/uint32")
    if sents.dtype != np.int32:
        raise ShardFormatError(f"{where}: sents dtype {sents.dtype} is not int32")
    if len(sents) < 2:
        raise ShardFormatError(f"{where}: a sample needs at least one sentence")
    if sents[0] != 0 or sents[-1] != len(tokens):
        raise ShardFormatError(
            f"{where}: sentence offsets must start at 0 and end at len(tokens)={len(tokens)}, "
            f"got {int(sents[0])}..{int(sents[-1])}"
        )
    if np.any(np.diff(sents) <= 0):
        raise ShardFormatError(f"{where}: sentence offsets must strictly increase")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's full serialisation (vocab, normaliser, pre-tokeniser, model).

    Two tokenizers with the same fingerprint produce the same ids for every text, wherever their
    files came from (hub name, local copy, the copy saved beside the shards).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a Hugging Face *fast* tokenizer")
    canonical = json.dumps(json.loads(backend.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_REQUIRED = {
    "format": str,
    "tokenizer": dict,
    "splitter": dict,
    "splits": dict,
    "documents": dict,
    "split_rule": str,
    "args": list,
}


def validate_manifest(manifest: dict[str, Any], where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check the manifest's shape and its accounting identity; return it unchanged."""
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise ShardFormatError(f"{where}: key {key!r} is missing")
        if not isinstance(manifest[key], typ):
            raise ShardFormatError(f"{where}: key {key!r} should be a {typ.__name__}")
    if manifest["format"] != FORMAT:
        raise ShardFormatError(
            f"{where}: format {manifest['format']!r}, this code reads {FORMAT!r}"
        )
    for key in ("name_or_path", "vocab_size", "sha256"):
        if key not in manifest["tokenizer"]:
            raise ShardFormatError(f"{where}: key 'tokenizer.{key}' is missing")
    docs = manifest["documents"]
    for key in ("read", "written", "skipped"):
        if key not in docs:
            raise ShardFormatError(f"{where}: key 'documents.{key}' is missing")
    if docs["read"] != docs["written"] + sum(docs["skipped"].values()):
        raise ShardFormatError(
            f"{where}: documents.read ({docs['read']}) != written ({docs['written']}) + "
            f"skipped ({sum(docs['skipped'].values())})"
        )
    for split, info in manifest["splits"].items():
        if split not in SPLITS:
            raise ShardFormatError(f"{where}: unknown split 'splits.{split}'")
        for key in ("samples", "sentences", "tokens", "shards"):
            if key not in info:
                raise ShardFormatError(f"{where}: key 'splits.{split}.{key}' is missing")
        for i, shard in enumerate(info["shards"]):
            for key in ("url", "samples", "sentences", "tokens", "sha256"):
                if key not in shard:
                    raise ShardFormatError(
                        f"{where}: key 'splits.{split}.shards[{i}].{key}' is missing"
                    )
    return manifest


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``DIR/manifest.json``; errors name the file and the key."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no shard manifest (is {shard_dir} a build_shards output?)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardFormatError(f"{path}: not valid JSON ({err})") from err
    return validate_manifest(manifest, where=str(path))


def manifest_hash(shard_dir: str | Path) -> str:
    """sha256 of ``manifest.json``: identifies exactly which shards a run trained on."""
    return sha256_file(Path(shard_dir) / MANIFEST_NAME)


def check_shard_files(shard_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> None:
    """At start-up: every shard the manifest lists exists, with the listed size where the
    manifest records one (``bytes``). Raises :class:`ShardFormatError` naming the shards."""
    manifest = load_manifest(shard_dir)
    bad = []
    for split in splits:
        for entry in manifest["splits"].get(split, {}).get("shards", []):
            path = Path(shard_dir) / entry["url"]
            if not path.is_file():
                bad.append(f"{path} is missing")
            elif "bytes" in entry and path.stat().st_size != int(entry["bytes"]):
                bad.append(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
                )
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ShardFormatError(
            f"{Path(shard_dir) / MANIFEST_NAME} lists shards that cannot be read: "
            + "; ".join(bad[:3])
            + more
        )


def verify_shard(url: str | Path, sha256: str) -> None:
    """The shard's content is what the manifest recorded (sha256), or ShardFormatError."""
    got = sha256_file(url)
    if got != sha256:
        raise ShardFormatError(
            f"shard {url}: sha256 {got[:16]}... differs from the manifest's {sha256[:16]}... "
            "(damaged or replaced after preprocessing; rebuild it, or set data.verify_shards=false "
            "to read it unchecked)"
        )


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Every id < ``vocab_size`` (the tokenizer's), or ShardFormatError naming ``where``."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        bad = int((tokens >= vocab_size).sum())
        raise ShardFormatError(
            f"{where}: {bad} token ids >= the vocabulary size {vocab_size} (max {int(tokens.max())})"
        )


def shard_urls(shard_dir: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, in manifest order."""
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardFormatError(f"{Path(shard_dir) / MANIFEST_NAME}: no split {split!r}")
    return [str(Path(shard_dir) / s["url"]) for s in manifest["splits"][split]["shards"]]
