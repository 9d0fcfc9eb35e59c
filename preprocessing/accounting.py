"""Counting documents, the train/val split rule, the progress log used to resume, the manifest.

Every input event is routed: a document to ``train`` or ``val`` by a hash of its id, an event
without a usable id (a file-level error) to ``none``. Counts are kept per route so that a resumed
run can restore, for each split, exactly the counts that belong to its finished shards.

Progress log (``OUTPUT/.progress.jsonl``): a header line with the settings that determine the
output, then one line per finished shard with its counts, sha256, the index of the last input event
written into it and a snapshot of all route tallies at that moment.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lang_jepa.shards import FORMAT, SPLITS, sha256_file

ROUTES = (*SPLITS, "none")
PROGRESS_NAME = ".progress.jsonl"
SPLIT_RULE = (
    "val if int(blake2b(id.encode('utf-8'), digest_size=8).hexdigest(), 16) < val_fraction * 2**64"
    " else train; id is the document's id (the chunks of a document share its split)"
)


def route_of(doc_id: str, val_fraction: float) -> str:
    """``val`` or ``train`` for a document id: stable across runs, machines and worker counts."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


@dataclass
class Tally:
    """Counts for one route. ``read == written + sum(skipped)`` holds after every event."""

    read: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    chunked_documents: int = 0
    sentences_cut: int = 0
    empty_sentences: int = 0
    text_bytes: int = 0
    file_errors: list[dict[str, str]] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.read += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        return cls(**d)


def total_tally(tallies: dict[str, Tally]) -> Tally:
    """The sum of the route tallies."""
    out = Tally()
    skipped: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    for route in ROUTES:
        t = tallies[route]
        out.read += t.read
        out.written += t.written
        skipped.update(t.skipped)
        repaired.update(t.repaired)
        out.chunked_documents += t.chunked_documents
        out.sentences_cut += t.sentences_cut
        out.empty_sentences += t.empty_sentences
        out.text_bytes += t.text_bytes
        out.file_errors.extend(t.file_errors)
    out.skipped, out.repaired = dict(sorted(skipped.items())), dict(sorted(repaired.items()))
    return out


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class ResumeState:
    """What a previous, interrupted run finished: restored counts, shards and input positions.

    ``done_through[route]``: events of that route with index <= this value are already accounted
    for (written into finished shards or counted), so the new run must not count them again.
    """

    records: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {s: [] for s in SPLITS}
    )
    tallies: dict[str, Tally] = field(default_factory=lambda: {r: Tally() for r in ROUTES})
    done_through: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROUTES, -1))

    @property
    def resumed(self) -> bool:
        return any(self.records[s] for s in SPLITS)


def _verified(out_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading records of one split whose shard files exist with the recorded sha256."""
    good = []
    for rec in records:
        path = out_dir / rec["url"]
        if not path.is_file() or sha256_file(path) != rec["sha256"]:
            break
        good.append(rec)
    return good


def load_progress(out_dir: Path, settings: dict[str, Any]) -> ResumeState:
    """Read ``.progress.jsonl`` (if any) and verify the shards it lists; refuse other settings."""
    path = out_dir / PROGRESS_NAME
    state = ResumeState()
    if not path.is_file():
        return state
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or lines[0].get("settings_hash") != settings_hash(settings):
        raise RuntimeError(
            f"{out_dir}: holds a partial build made with other settings (see {path}); "
            "pass --overwrite to start again"
        )
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for rec in lines[1:]:
        by_split[rec["split"]].append(rec)
    state.records = {s: _verified(out_dir, recs) for s, recs in by_split.items()}
    latest = None
    for split in SPLITS:
        if state.records[split]:
            last = state.records[split][-1]
            state.tallies[split] = Tally.from_dict(last["tallies"][split])
            state.done_through[split] = last["last_event"]
            if latest is None or last["last_event"] > latest["last_event"]:
                latest = last
    if latest is not None:
        state.tallies["none"] = Tally.from_dict(latest["tallies"]["none"])
        state.done_through["none"] = latest["last_event"]
    return state


class ProgressLog:
    """Appends finished-shard records durably (fsync) to ``.progress.jsonl``."""

    def __init__(self, out_dir: Path, settings: dict[str, Any], state: ResumeState) -> None:
        self.path = out_dir / PROGRESS_NAME
        kept = [r for s in SPLITS for r in state.records[s]]
        kept.sort(key=lambda r: r["last_event"])
        header = {"settings_hash": settings_hash(settings), "settings": settings}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in [header, *kept]))
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def split_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A manifest ``splits.<name>`` entry from its shard records."""
    shards = [
        {k: r[k] for k in ("url", "samples", "sentences", "tokens", "sha256", "bytes") if k in r}
        for r in records
    ]
    return {
        "samples": sum(s["samples"] for s in shards),
        "sentences": sum(s["sentences"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }


def build_manifest(
    tokenizer: dict[str, Any],
    splitter: dict[str, Any],
    records: dict[str, list[dict[str, Any]]],
    tallies: dict[str, Tally],
    args: list[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The ``manifest.json`` document (see docs/design.md and :func:`lang_jepa.shards.validate_manifest`)."""
    total = total_tally(tallies)
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "splitter": splitter,
        "splits": {s: split_summary(records[s]) for s in SPLITS},
        "documents": {"read": total.read, "written": total.written, "skipped": total.skipped},
        "stats": {
            "repaired": total.repaired,
            "chunked_documents": total.chunked_documents,
            "sentences_cut": total.sentences_cut,
            "empty_sentences_dropped": total.empty_sentences,
            "text_bytes": total.text_bytes,
            "file_errors": total.file_errors,
        },
        "split_rule": SPLIT_RULE,
        "settings": settings,
        "args": args,
    }
