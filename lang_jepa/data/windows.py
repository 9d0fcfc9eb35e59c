"""Documents to windows: runs of whole consecutive sentences of one document, <= seq_len tokens.

A window never crosses a document boundary and never cuts a sentence, with one exception: a
sentence longer than ``seq_len`` is cut into pieces of at most ``seq_len`` tokens first (counted as
``long_sentence_pieces``), and each piece then acts as a sentence. Windows are cut greedily from the
start of the document (greedy gives the fewest windows for an in-order, non-overlapping cover, so
it also gives the least padding). Windows with fewer than ``min_sentences`` sentences are skipped
and counted (``short_windows``). Everything here is vectorised per document or per window: no
Python loop runs per token.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class WindowCounters:
    """What the window cutter saw; kept per DataLoader worker and summed for logging."""

    docs: int = 0  # documents (shard samples) read
    sentences: int = 0  # sentences read (before long sentences are cut)
    windows: int = 0  # windows kept
    window_tokens: int = 0  # tokens in kept windows
    short_windows: int = 0  # windows skipped for having < min_sentences sentences
    short_window_tokens: int = 0  # tokens in those skipped windows
    long_sentences: int = 0  # sentences longer than seq_len
    long_sentence_pieces: int = 0  # pieces those sentences were cut into

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: WindowCounters) -> None:
        for key, value in other.as_dict().items():
            setattr(self, key, getattr(self, key) + value)


@dataclass(frozen=True, slots=True)
class Window:
    """One window: a run of whole consecutive sentences of one document.

    ``tokens`` [n] is a view into the document's token ids (uint16/uint32); ``offsets`` [s + 1]
    (int64) are the sentence boundaries local to the window, ``offsets[0] == 0`` and
    ``offsets[-1] == n``. ``doc_key`` and ``index`` (the window's number within its document) seed
    the window's masks; ``doc_index`` is the stable 63-bit hash of the document id.
    """

    doc_key: str
    doc_index: int
    index: int
    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_sentences(self) -> int:
        return len(self.offsets) - 1


def stable_hash63(*parts: object) -> int:
    """A 63-bit non-negative hash of ``parts`` that is the same in every process and run."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def split_long_sentences(sents: np.ndarray, seq_len: int) -> tuple[np.ndarray, int, int]:
    """Cut every sentence longer than ``seq_len`` into pieces of at most ``seq_len`` tokens.

    ``sents`` [n + 1] are sentence offsets. Returns (offsets [m + 1] int64, number of long
    sentences, number of pieces they became). Offsets are returned unchanged (as int64) when no
    sentence is too long.
    """
    offsets = np.asarray(sents, dtype=np.int64)
    lengths = np.diff(offsets)
    pieces = (lengths + seq_len - 1) // seq_len  # [n], >= 1
    long_mask = pieces > 1
    if not long_mask.any():
        return offsets, 0, 0
    # Each sentence i contributes pieces[i] starts: offsets[i] + k * seq_len, k < pieces[i].
    starts = np.repeat(offsets[:-1], pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(len(starts), dtype=np.int64) - first
    new = np.empty(len(starts) + 1, dtype=np.int64)
    new[:-1] = starts + k * seq_len
    new[-1] = offsets[-1]
    return new, int(long_mask.sum()), int(pieces[long_mask].sum())


def window_bounds(offsets: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy cover of sentences by windows of at most ``seq_len`` tokens.

    ``offsets`` [n + 1] must have every sentence <= seq_len tokens (see
    :func:`split_long_sentences`). Returns [w, 2] int64 (first sentence, end sentence exclusive).
    One ``searchsorted`` per window, so the cost is per window, not per sentence or token.
    """
    n = len(offsets) - 1
    bounds = []
    start = 0
    while start < n:
        end = int(np.searchsorted(offsets, offsets[start] + seq_len, side="right")) - 1
        end = max(end, start + 1)  # guards a sentence > seq_len (cannot happen after splitting)
        bounds.append((start, end))
        start = end
    return np.asarray(bounds, dtype=np.int64).reshape(-1, 2)


def cut_windows(
    tokens: np.ndarray,
    sents: np.ndarray,
    seq_len: int,
    min_sentences: int,
    doc_id: str,
    doc_key: str | None = None,
    counters: WindowCounters | None = None,
) -> list[Window]:
    """All windows of one document, in document order.

    ``tokens`` [T] token ids and ``sents`` [n + 1] sentence offsets (the shard fields); windows
    with fewer than ``min_sentences`` sentences are dropped (counted in ``counters``). ``doc_key``
    (default: ``doc_id``) must identify this sample uniquely; it seeds the masks.
    """
    c = counters if counters is not None else WindowCounters()
    offsets, n_long, n_pieces = split_long_sentences(sents, seq_len)
    c.docs += 1
    c.sentences += len(sents) - 1
    c.long_sentences += n_long
    c.long_sentence_pieces += n_pieces
    doc_index = stable_hash63(doc_id)
    key = doc_key if doc_key is not None else doc_id
    out: list[Window] = []
    for start, end in window_bounds(offsets, seq_len).tolist():
        a, b = int(offsets[start]), int(offsets[end])
        if end - start < min_sentences:
            c.short_windows += 1
            c.short_window_tokens += b - a
            continue
        out.append(Window(key, doc_index, len(out), tokens[a:b], offsets[start : end + 1] - a))
        c.windows += 1
        c.window_tokens += b - a
    return out
