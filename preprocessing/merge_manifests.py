"""``python -m preprocessing.merge_manifests --output DIR PART [PART ...]``: join array-task builds.

Each SLURM array task of ``slurm/preprocess.sh`` builds a complete shard directory (``PART``) from
its block of the input files. This step puts all their shards into one directory, numbered in part
order (``train-000000.tar``...), and writes one manifest with the summed counts: the same documents,
sentences and tokens as one build over all the files (exact duplicates are only found within a
part). Shards are hard-linked (copied across file systems), or moved with ``--move``; every shard's
sha256 is checked against its part's manifest first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lang_jepa.shards import (
    MANIFEST_NAME,
    SPLITS,
    TOKENIZER_DIR,
    load_manifest,
    sha256_file,
    shard_name,
    validate_manifest,
)

# Settings that legitimately differ between the parts of one build.
PER_PART_SETTINGS = ("inputs", "key_prefix")


def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    settings = {k: v for k, v in manifest.get("settings", {}).items() if k not in PER_PART_SETTINGS}
    return {
        "tokenizer": manifest["tokenizer"]["sha256"],
        "splitter": manifest["splitter"],
        "split_rule": manifest["split_rule"],
        "settings": settings,
    }


def _place(src: Path, dst: Path, move: bool) -> None:
    dst.unlink(missing_ok=True)
    if move:
        shutil.move(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def merge_stats(manifests: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Summed ``documents`` and ``stats`` sections."""
    skipped: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    docs = {"read": 0, "written": 0}
    stats: dict[str, Any] = {
        "chunked_documents": 0,
        "sentences_cut": 0,
        "empty_sentences_dropped": 0,
        "text_bytes": 0,
        "file_errors": [],
    }
    for m in manifests:
        docs["read"] += m["documents"]["read"]
        docs["written"] += m["documents"]["written"]
        skipped.update(m["documents"]["skipped"])
        s = m.get("stats", {})
        repaired.update(s.get("repaired", {}))
        for key in ("chunked_documents", "sentences_cut", "empty_sentences_dropped", "text_bytes"):
            stats[key] += s.get(key, 0)
        stats["file_errors"] += s.get("file_errors", [])
    stats["repaired"] = dict(sorted(repaired.items()))
    return {**docs, "skipped": dict(sorted(skipped.items()))}, stats


def merge(
    parts: list[Path], out: Path, move: bool, verify: bool, argv: list[str]
) -> dict[str, Any]:
    """Merge the part directories into ``out``; return the new manifest."""
    manifests = [load_manifest(p) for p in parts]
    ref = _comparable(manifests[0])
    for part, m in zip(parts, manifests, strict=True):
        if _comparable(m) != ref:
            raise SystemExit(f"merge_manifests: {part}: built with other settings than {parts[0]}")
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = []
        for part, m in zip(parts, manifests, strict=True):
            for shard in m["splits"].get(split, {}).get("shards", []):
                src = part / shard["url"]
                if verify and sha256_file(src) != shard["sha256"]:
                    raise SystemExit(f"merge_manifests: {src}: sha256 differs from its manifest")
                name = shard_name(split, len(shards))
                _place(src, out / name, move)
                shards.append({**shard, "url": name})
        splits[split] = {
            key: sum(s[key] for s in shards) for key in ("samples", "sentences", "tokens")
        } | {"shards": shards}
    shutil.copytree(parts[0] / TOKENIZER_DIR, out / TOKENIZER_DIR, dirs_exist_ok=True)
    documents, stats = merge_stats(manifests)
    first = manifests[0]
    settings = dict(first.get("settings", {}))
    settings["inputs"] = [i for m in manifests for i in m.get("settings", {}).get("inputs", [])]
    manifest = {
        "format": first["format"],
        "tokenizer": first["tokenizer"],
        "splitter": first["splitter"],
        "splits": splits,
        "documents": documents,
        "stats": stats,
        "split_rule": first["split_rule"],
        "settings": settings,
        "args": argv,
        "parts": [
            {"dir": str(p), "args": m["args"]} for p, m in zip(parts, manifests, strict=True)
        ],
    }
    validate_manifest(manifest, where=str(out / MANIFEST_NAME))
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m preprocessing.merge_manifests", description=__doc__)
    p.add_argument("parts", nargs="+", help="part directories, in input order")
    p.add_argument("--output", required=True)
    p.add_argument("--move", action="store_true", help="move shards instead of hard-linking")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of shards")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged manifest")
    args = p.parse_args(argv)
    out = Path(args.output)
    if (out / MANIFEST_NAME).exists() and not args.overwrite:
        print(f"merge_manifests: {out / MANIFEST_NAME} exists; pass --overwrite", file=sys.stderr)
        return 2
    m = merge(
        [Path(x) for x in args.parts],
        out,
        args.move,
        not args.no_verify,
        ["python -m preprocessing.merge_manifests", *argv],
    )
    print(
        f"merged {len(args.parts)} parts into {out}: {m['documents']['written']} documents; "
        + "; ".join(
            f"{s}: {v['tokens']} tokens in {len(v['shards'])} shards"
            for s, v in m["splits"].items()
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
