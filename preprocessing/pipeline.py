"""The build: ordered input events -> worker processes (split + tokenize) -> ordered shard writes.

The parent process reads the inputs, decides what is skipped before any work (empty, duplicate,
unreadable) and groups documents into batches in input order; ``N`` worker processes split and
tokenize whole batches; the parent consumes the results strictly in submission order and writes the
shards. Batch boundaries and the order of writes do not depend on ``N``, so the output is the same
byte for byte for any number of workers. At most ``2N + 1`` batches are in flight, so memory stays
flat however large the corpus is.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blingfire
from tqdm import tqdm

from lang_jepa.shards import (
    MANIFEST_NAME,
    SPLITS,
    TOKENIZER_DIR,
    token_dtype,
    tokenizer_fingerprint,
    validate_manifest,
)

from .accounting import (
    PROGRESS_NAME,
    ProgressLog,
    ResumeState,
    Tally,
    build_manifest,
    load_progress,
    route_of,
)
from .readers import Event
from .textproc import DocOut, Processor, init_worker, process_batch
from .tokenizer import load_tokenizer, vocab_size
from .writer import SplitWriter


class Interrupted(RuntimeError):
    """Raised by ``stop_after_shards`` (a test hook that simulates a crash mid-run)."""


@dataclass
class BuildConfig:
    """Everything that decides the output (``workers``, ``quiet`` and the hook excepted)."""

    output: str
    tokenizer: str
    val_fraction: float = 0.02
    max_sentence_tokens: int = 256
    max_chunk_tokens: int = 65536
    shard_docs: int | None = None
    shard_tokens: int | None = 50_000_000
    dedup: bool = True
    key_prefix: str = ""
    inputs: list[str] = field(default_factory=list)
    workers: int = 1
    overwrite: bool = False
    quiet: bool = False
    batch_docs: int = 64
    batch_bytes: int = 1 << 18
    stop_after_shards: int | None = None

    def settings(self, tokenizer_sha: str) -> dict[str, Any]:
        keep = {"workers", "overwrite", "quiet", "stop_after_shards", "output", "tokenizer"}
        d = {k: v for k, v in asdict(self).items() if k not in keep}
        return {**d, "tokenizer_sha256": tokenizer_sha}


@dataclass(slots=True)
class Item:
    """One input event on its way through the pipeline."""

    index: int
    route: str
    event: Event
    nbytes: int
    skip: str | None = None


def prepare_output(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse a complete build unless ``overwrite`` (which removes our files only)."""
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        if (out / MANIFEST_NAME).exists():
            raise FileExistsError(
                f"{out}: already holds a complete build ({MANIFEST_NAME}); pass --overwrite to "
                "rebuild it, or choose another --output"
            )
        return
    for p in out.iterdir():
        if p.name in (MANIFEST_NAME, PROGRESS_NAME) or p.name.endswith((".tar", ".tar.tmp")):
            p.unlink()


class _Immediate:
    """Stands in for an AsyncResult when work runs in this process (``workers=0``)."""

    def __init__(self, value: list[DocOut]) -> None:
        self.value = value

    def get(self) -> list[DocOut]:
        return self.value


class Builder:
    """One build into one output directory (see the module docstring)."""

    def __init__(self, cfg: BuildConfig, events: Iterator[Event], argv: list[str]) -> None:
        self.cfg, self.events, self.argv = cfg, events, argv
        self.out = Path(cfg.output)
        prepare_output(self.out, cfg.overwrite)
        self.tok, self.tok_name = load_tokenizer(cfg.tokenizer)
        self.vocab = vocab_size(self.tok)
        self.tok_sha = tokenizer_fingerprint(self.tok)
        self.settings = cfg.settings(self.tok_sha)
        self.state: ResumeState = load_progress(self.out, self.settings)
        self.tallies: dict[str, Tally] = self.state.tallies
        self.records = self.state.records
        self.seen: set[bytes] = set()
        self.new_records = 0
        self.last_index = -1

    def run(self) -> dict[str, Any]:
        """Build the shards and the manifest; return the manifest."""
        self.tok.save_pretrained(str(self.out / TOKENIZER_DIR))
        self.writers = {
            s: SplitWriter(
                self.out,
                s,
                self.vocab,
                self.cfg.shard_docs,
                self.cfg.shard_tokens,
                self.cfg.key_prefix,
                next_index=len(self.records[s]),
                next_seq=sum(r["samples"] for r in self.records[s]),
            )
            for s in SPLITS
        }
        self.log = ProgressLog(self.out, self.settings, self.state)
        self.bar = tqdm(
            unit="doc", disable=self.cfg.quiet, file=sys.stderr, mininterval=1.0, smoothing=0.1
        )
        self._t0 = time.perf_counter()
        try:
            self._pump()
            for split in SPLITS:
                self._record(self.writers[split].finish(), self.last_index)
        finally:
            self.log.close()
            self.bar.close()
        return self._finish()

    def _pump(self) -> None:
        workers = self.cfg.workers
        initargs = (
            self.tok.backend_tokenizer.to_str(),
            token_dtype(self.vocab).name,
            self.cfg.max_sentence_tokens,
            self.cfg.max_chunk_tokens,
        )
        pool = None
        if workers > 0:
            # forkserver: workers forked from a clean single-threaded server, never from this
            # process (a fork of a process running other threads, e.g. a test runner or a
            # notebook that used torch, can deadlock on a lock one of them held)
            method = "forkserver" if sys.platform.startswith("linux") else "spawn"
            pool = mp.get_context(method).Pool(workers, init_worker, initargs)
        else:
            processor = Processor(*initargs)
        pending: deque[tuple[list[Item], Any]] = deque()
        try:
            for items, texts in self._batches():
                if pool is None:
                    pending.append((items, _Immediate(processor.process(texts))))
                else:
                    pending.append((items, pool.apply_async(process_batch, (texts,))))
                while len(pending) > 2 * workers:
                    self._consume(*pending.popleft())
            while pending:
                self._consume(*pending.popleft())
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    def _batches(self) -> Iterator[tuple[list[Item], list[str]]]:
        """Group events into batches in input order, deciding early skips on the way."""
        items: list[Item] = []
        texts: list[str] = []
        nbytes = 0
        for index, event in enumerate(self.events):
            item = self._admit(index, event)
            if item is None:
                continue
            items.append(item)
            if item.skip is None:
                texts.append(event.text or "")
                nbytes += item.nbytes
            full = len(texts) >= self.cfg.batch_docs or nbytes >= self.cfg.batch_bytes
            if full or len(items) >= 16 * self.cfg.batch_docs:
                yield items, texts
                items, texts, nbytes = [], [], 0
        if items:
            yield items, texts

    def _admit(self, index: int, event: Event) -> Item | None:
        """The event's item, or None when a resumed run has already accounted for it."""
        route = "none" if event.error is not None else route_of(event.id, self.cfg.val_fraction)
        text = event.text
        try:
            data = text.encode("utf-8") if text is not None else b""
        except (
            UnicodeEncodeError
        ):  # lone surrogates (JSON "\ud800" escapes): the tokenizer rejects them
            data = text.encode("utf-8", errors="replace")  # type: ignore[union-attr]
            event.text = text = data.decode("utf-8")
            event.repaired = "lone_surrogates"
        digest = None
        if text is not None and text.strip() and self.cfg.dedup:
            digest = hashlib.blake2b(data, digest_size=16).digest()
        if index <= self.state.done_through[route]:
            if digest is not None:
                self.seen.add(digest)
            return None
        item = Item(index, route, event, len(data))
        if text is None:
            item.skip = event.skip or "unreadable"
        elif not text.strip():
            item.skip = "empty"
        elif digest is not None:
            if digest in self.seen:
                item.skip = "duplicate"
            self.seen.add(digest)
        return item

    def _consume(self, items: list[Item], result: Any) -> None:
        outs = iter(result.get())
        nbytes = 0
        for item in items:
            self._account(item, None if item.skip else next(outs))
            nbytes += item.nbytes
        self.bar.update(len(items))
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self._bytes_done = getattr(self, "_bytes_done", 0) + nbytes
        self.bar.set_postfix_str(f"{self._bytes_done / 1e6 / elapsed:.2f} MB/s", refresh=False)

    def _account(self, item: Item, out: DocOut | None) -> None:
        """Count one event and write its document; all counting happens here, in input order."""
        t = self.tallies[item.route]
        self.last_index = item.index
        t.text_bytes += item.nbytes
        ev = item.event
        if ev.repaired:
            t.repaired[ev.repaired] = t.repaired.get(ev.repaired, 0) + 1
        if ev.error is not None:
            t.file_errors.append({"file": ev.source, "reason": ev.skip or "", "error": ev.error})
        if out is None:
            t.skip(item.skip or "unreadable")
            return
        t.sentences_cut += out.cut
        t.empty_sentences += out.empty
        if not out.chunks:
            t.skip("no_tokens")
            return
        t.read += 1
        t.written += 1
        t.chunked_documents += len(out.chunks) > 1
        meta = {"id": ev.id, "source": ev.source}
        self._record(self.writers[item.route].write_doc(out.chunks, meta), item.index)

    def _record(self, rec: dict[str, Any] | None, last_event: int) -> None:
        if rec is None:
            return
        rec["last_event"] = last_event
        rec["tallies"] = {r: t.to_dict() for r, t in self.tallies.items()}
        self.log.append(rec)
        self.records[rec["split"]].append(rec)
        self.new_records += 1
        stop = self.cfg.stop_after_shards
        if stop is not None and self.new_records >= stop:
            raise Interrupted(f"stopped after {stop} shard(s) (--stop-after-shards)")

    def _finish(self) -> dict[str, Any]:
        tokenizer = {
            "name_or_path": self.tok_name,
            "vocab_size": self.vocab,
            "sha256": self.tok_sha,
            "class": type(self.tok).__name__,
        }
        splitter = {"name": "blingfire", "version": blingfire_version()}
        manifest = build_manifest(
            tokenizer, splitter, self.records, self.tallies, self.argv, self.settings
        )
        validate_manifest(manifest, where=str(self.out / MANIFEST_NAME))
        tmp = self.out / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, self.out / MANIFEST_NAME)
        (self.out / PROGRESS_NAME).unlink(missing_ok=True)
        for stray in self.out.glob("*.tar.tmp"):
            stray.unlink()
        return manifest


def blingfire_version() -> str:
    """The installed blingfire distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blingfire")
    except PackageNotFoundError:
        return getattr(blingfire, "__version__", "unknown")
