"""Masking as pure functions: target sentences, context/target index tensors, and the collate.

The three steps, each testable with plain tensors:

1. :func:`sample_target_sentences` (sentence lengths, MaskConfig, torch.Generator) -> target blocks,
   each a run of whole consecutive sentences; or, with ``mask.unit=span``,
   :func:`sample_target_spans` (sentence offsets, ...) -> token spans inside sentences.
2. :func:`mask_indices` (sentence offsets, blocks) or :func:`span_indices` (window length, spans)
   -> context token indices, target token indices and the target slot of every target token (a
   hidden sentence, or a hidden span). Context and targets are disjoint and cover the window;
   the context encoder receives only ``ctx_index`` tokens, never a target token.
3. :func:`collate_rows` lays masked windows out as the batch contract (see
   :func:`collate_arrays`): one window per row, or several per row with their segment bounds.

:func:`window_generator` derives each window's generator from (seed, epoch, document, window
number) by hashing, so a window's mask does not depend on worker count or on what came before it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from lang_jepa.config import MaskConfig
from lang_jepa.data.windows import Window, stable_hash63

PAD_MULTIPLE = 8  # ctx / tgt lengths are rounded up to this (friendlier kernel shapes)


def window_generator(seed: int, epoch: int | str, doc_key: str, window: int) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, epoch, document key, window number)."""
    return torch.Generator().manual_seed(stable_hash63(seed, epoch, doc_key, window))


class _Uniforms:
    """Uniform [0, 1) draws from a torch.Generator, fetched 16 at a time (one call, not many)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.buf: list[float] = []

    def __call__(self) -> float:
        if not self.buf:
            self.buf = torch.rand(16, generator=self.generator, dtype=torch.float64).tolist()
        return self.buf.pop()


def _block_options(free: np.ndarray, cum: np.ndarray, start: int, gap: bool) -> np.ndarray:
    """Token counts of blocks starting at ``start`` with 1, 2, ... sentences (index k -> k + 1).

    A block runs over free sentences only; with ``gap`` it also stops one sentence short of an
    existing block, so that blocks stay separated by context.
    """
    n = len(free)
    end = start
    while end < n and free[end] and (not gap or end + 1 >= n or free[end + 1]):
        end += 1
    return cum[start + 1 : end + 1] - cum[start]


def _place_block(
    free: np.ndarray, cum: np.ndarray, want: float, budget: int, u: _Uniforms
) -> tuple[int, int] | None:
    """Pick a random start and the sentence count whose tokens are closest to ``want``.

    Respects ``budget`` (target tokens still allowed) and leaves at least one free sentence.
    Tries starts separated from existing blocks first, then adjacent ones. Returns (start, k).
    """
    for gap in (True, False):
        if gap:
            left_ok = np.concatenate(([True], free[:-1]))
            candidates = np.flatnonzero(free & left_ok)
        else:
            candidates = np.flatnonzero(free)
        order = torch.randperm(len(candidates), generator=u.generator).numpy()
        for start in candidates[order].tolist():
            sizes = _block_options(free, cum, start, gap)
            n_free = int(free.sum())
            ks = np.arange(1, len(sizes) + 1)
            ok = (sizes <= budget) & (ks <= n_free - 1)
            if not ok.any():
                continue
            cost = np.where(ok, np.abs(sizes - want), np.inf)
            return start, int(np.argmin(cost)) + 1
    return None


def sample_target_sentences(
    sent_lengths: np.ndarray | Tensor, cfg: MaskConfig, generator: torch.Generator
) -> list[list[int]]:
    """Choose target blocks: 1..max_blocks runs of whole consecutive sentences, disjoint.

    ``sent_lengths`` [n] are the window's sentence lengths in tokens. The number of blocks is drawn
    in [min_blocks, max_blocks]; each block's size is the run of sentences whose token count is
    closest to a fraction of the window drawn in [min_block_frac, max_block_frac] (at least one
    sentence). The context keeps >= min_context_frac of the tokens and at least one sentence, so
    a block that cannot fit is dropped; fewer than min_blocks blocks happen only when the window is
    too small for them. Blocks are returned sorted by first sentence.
    """
    lengths = np.asarray(sent_lengths, dtype=np.int64)
    n = len(lengths)
    if n < 2:
        raise ValueError(f"a window needs at least 2 sentences to mask, got {n}")
    cum = np.concatenate(([0], np.cumsum(lengths)))
    total = int(cum[-1])
    u = _Uniforms(generator)
    n_blocks = cfg.min_blocks + int(u() * (cfg.max_blocks - cfg.min_blocks + 1))  # u < 1
    budget = total - math.ceil(cfg.min_context_frac * total)
    free = np.ones(n, dtype=bool)
    blocks: list[list[int]] = []
    for _ in range(n_blocks):
        frac = cfg.min_block_frac + (cfg.max_block_frac - cfg.min_block_frac) * u()
        placed = _place_block(free, cum, frac * total, budget, u)
        if placed is None:
            break
        start, k = placed
        free[start : start + k] = False
        budget -= int(cum[start + k] - cum[start])
        blocks.append(list(range(start, start + k)))
    if not blocks:  # even the smallest sentence would break min_context_frac: keep one target
        smallest = int(np.argmin(lengths))
        blocks.append([smallest])
    return sorted(blocks)


def _span_starts(
    free: np.ndarray, to_end: np.ndarray, longest: np.ndarray, length: int
) -> np.ndarray:
    """Token indices where a span of ``length`` fits: inside its sentence (``to_end``), not the
    whole of it (``longest``), on free tokens with a free token either side (``free`` holds a
    guard either side of the window: index i + 1 is token i)."""
    total = len(to_end)
    padded = np.concatenate((free, np.ones(length, dtype=bool)))  # one row per token
    run = np.lib.stride_tricks.sliding_window_view(padded, length + 2)[:total]
    return np.flatnonzero((to_end >= length) & (longest >= length) & run.all(1))


def sample_target_spans(
    offsets: np.ndarray | Tensor, cfg: MaskConfig, generator: torch.Generator
) -> np.ndarray:
    """``mask.unit=span``: target spans [S, 2] (start, end token; sorted, end exclusive), each a
    run of tokens inside one sentence that leaves at least one token of its sentence visible,
    apart from the other spans by at least one visible token. Spans are drawn (a length in
    ``span_min..span_max``, then a start among the tokens where it fits) until ``span_frac`` of
    the window's tokens are hidden, within the ``min_context_frac`` budget. A span is shorter
    than drawn only where the window has no room for it: the last one, cut to the share, and
    any drawn where no free stretch of a sentence is that long (it takes the longest that
    fits). A window with no room for a span at all (every sentence one token long, or no token
    to spare for ``min_context_frac``) hides one token, the first of its longest sentence, as
    the sentence masks keep one target whatever the budget."""
    off = np.asarray(offsets, dtype=np.int64)
    total = int(off[-1])
    if len(off) < 3:
        raise ValueError(f"a window needs at least 2 sentences to mask, got {len(off) - 1}")
    u = _Uniforms(generator)
    want = max(1, round(cfg.span_frac * total))
    budget = min(want, total - math.ceil(cfg.min_context_frac * total))
    sent = np.repeat(np.arange(len(off) - 1), np.diff(off))
    to_end = off[sent + 1] - np.arange(total)  # tokens from here to the sentence's end
    longest = np.diff(off)[sent] - 1  # the longest span the token's sentence takes
    free = np.ones(total + 2, dtype=bool)
    spans: list[tuple[int, int]] = []
    hidden = 0
    while hidden < budget:
        length = cfg.span_min + int(u() * (cfg.span_max - cfg.span_min + 1))
        length = min(length, budget - hidden)
        starts = _span_starts(free, to_end, longest, length)
        while len(starts) == 0 and length > 1:  # no room that long: the longest that fits
            length -= 1
            starts = _span_starts(free, to_end, longest, length)
        if len(starts) == 0:  # the window is full
            break
        start = int(starts[min(int(u() * len(starts)), len(starts) - 1)])
        free[start + 1 : start + 1 + length] = False
        spans.append((start, start + length))
        hidden += length
    if not spans:
        first = int(off[np.argmax(np.diff(off))])
        spans.append((first, first + 1))
    return np.asarray(sorted(spans), dtype=np.int64).reshape(-1, 2)


class WindowMask(NamedTuple):
    """Index tensors of one window (all int64, token indices into the window)."""

    ctx_index: Tensor  # [n_ctx] increasing
    tgt_index: Tensor  # [n_tgt] increasing
    tgt_sent: Tensor  # [n_tgt] slot 0..S-1 of each target token's sentence
    n_tgt_sents: int  # S


def mask_indices(offsets: np.ndarray | Tensor, blocks: list[list[int]]) -> WindowMask:
    """Context / target token indices of a window from its sentence offsets and target blocks.

    ``offsets`` [s + 1] sentence boundaries of the window (starting at 0); ``blocks`` lists of
    sentence numbers. Target slots number the target sentences in order (0..S-1). Vectorised: one
    ``np.repeat`` gather, no loop per token (:func:`span_indices`, each sentence a span).
    """
    off = np.asarray(offsets, dtype=np.int64)
    tgt_sents = np.unique(np.asarray([s for b in blocks for s in b], dtype=np.int64))
    return span_indices(int(off[-1]), np.stack([off[tgt_sents], off[tgt_sents + 1]], 1))


def span_indices(n_tokens: int, spans: np.ndarray) -> WindowMask:
    """Context / target token indices of a window of ``n_tokens`` from its target spans [S, 2]
    (start, end exclusive; sorted, disjoint): span s is target slot s."""
    starts, ends = spans[:, 0], spans[:, 1]
    lens = ends - starts
    slot = np.repeat(np.arange(len(spans), dtype=np.int64), lens)
    first = np.repeat(np.cumsum(lens) - lens, lens)
    tgt = np.repeat(starts, lens) + (np.arange(len(slot), dtype=np.int64) - first)
    is_tgt = np.zeros(n_tokens, dtype=bool)
    is_tgt[tgt] = True
    ctx = np.flatnonzero(~is_tgt)
    return WindowMask(
        torch.from_numpy(ctx), torch.from_numpy(tgt), torch.from_numpy(slot), len(spans)
    )


def mask_window(window: Window, cfg: MaskConfig, seed: int, epoch: int | str) -> WindowMask:
    """Sample and index the mask of one window with its hash-derived generator."""
    return mask_draws(window, cfg, seed, epoch, 1)[0]


def mask_draws(
    window: Window, cfg: MaskConfig, seed: int, epoch: int | str, draws: int
) -> list[WindowMask]:
    """``draws`` masks of one window, drawn one after another from its hash-derived generator
    (the first is :func:`mask_window`'s)."""
    g = window_generator(seed, epoch, window.doc_key, window.index)
    if cfg.unit == "span":
        spans = [sample_target_spans(window.offsets, cfg, g) for _ in range(draws)]
        return [span_indices(window.n_tokens, sp) for sp in spans]
    lengths = np.diff(window.offsets)
    return [
        mask_indices(window.offsets, sample_target_sentences(lengths, cfg, g)) for _ in range(draws)
    ]


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(max(multiple, -(-n // multiple) * multiple), cap)


def collate(
    windows: list[Window], masks: list[WindowMask], seq_len: int, queries: int = 0
) -> dict[str, Tensor]:
    """One window per row, padded to ``seq_len`` (see :func:`collate_rows`, ``packed=False``)."""
    rows = [[(w, m)] for w, m in zip(windows, masks, strict=True)]
    return collate_rows(rows, seq_len, packed=False, queries=queries)


def renumbered(window: Window, mask: WindowMask, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``mask.queries=k``: (the positions of the context tokens, the positions of the k queries
    of each hidden sentence, in slot order [S x k]) when every hidden sentence spans k positions
    and every visible one its own length, in window order."""
    off = np.asarray(window.offsets, dtype=np.int64)
    lens = np.diff(off)
    tgt = mask.tgt_index.numpy()
    hidden = np.zeros(len(lens), dtype=bool)
    hidden[np.unique(np.searchsorted(off, tgt, side="right") - 1)] = True
    span = np.where(hidden, k, lens)
    start = np.cumsum(span) - span
    ctx = mask.ctx_index.numpy()
    sent = np.searchsorted(off, ctx, side="right") - 1
    ctx_pos = start[sent] + (ctx - off[sent])
    qry_pos = (start[hidden][:, None] + np.arange(k)[None, :]).reshape(-1)
    return ctx_pos, qry_pos


def _segment_bounds(lengths: list[list[int]], row_len: int) -> tuple[Tensor, int]:
    """cu_seqlens (int32) over the flattened rows and the longest segment. Each row's windows
    are segments; its padding tail is cut into segments no longer than the longest window, so a
    mostly empty row does not widen the padded attention batch of the CPU path."""
    cap = max(max((n for row in lengths for n in row), default=1), 1)
    sizes = []
    for row in lengths:
        tail = row_len - sum(row)
        sizes += row + [cap] * (tail // cap) + ([tail % cap] if tail % cap else [])
    cu = np.concatenate(([0], np.cumsum(sizes)))
    return cu.astype(np.int32), max(sizes)


def to_tensors(batch: dict[str, np.ndarray | int], pin: bool = False) -> dict[str, Tensor | int]:
    """numpy arrays -> torch tensors (zero-copy, or copied into pinned memory)."""
    out: dict[str, Tensor | int] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
            value = value.pin_memory() if pin else value
        out[key] = value
    return out


def collate_rows(
    rows: list[list[tuple[Window, WindowMask]]],
    row_len: int,
    packed: bool,
    queries: int = 0,
    draws: int = 1,
) -> dict[str, Tensor | int]:
    """:func:`collate_arrays` as torch tensors: the batch contract."""
    return to_tensors(collate_arrays(rows, row_len, packed, queries, draws))


def collate_arrays(
    rows: list[list[tuple[Window, WindowMask]]],
    row_len: int,
    packed: bool,
    queries: int = 0,
    draws: int = 1,
) -> dict[str, np.ndarray | int]:
    """Masked windows into the batch contract (as numpy): B rows of L = ``row_len`` tokens.

    A row holds its windows one after the other, then padding. Tensors (int64 / bool):
    ``input_ids`` [B, L] (0-padded), ``valid`` [B, L], ``position_ids`` [B, L] (0..n-1 within each
    window, 0 on padding), ``ctx_index`` / ``ctx_valid`` [B, Nc], ``tgt_index`` / ``tgt_sent`` /
    ``tgt_valid`` [B, Nt] (index paddings are 0; ``tgt_sent`` numbers the row's target sentences
    0..S-1 across its windows), ``tgt_sent_valid`` [B, S], ``tgt_sent_win`` [B, S] (the window of
    each target sentence, numbered 0..W-1 over the batch in row order; -1 on padding),
    ``doc_index`` [W] (one per window, in row order). Nc and Nt are the batch maxima rounded up to a multiple of 8 (at most L).

    ``packed`` (several windows per row) adds what keeps the windows apart, for three token
    streams: the window (``full``, B x L), the context (``ctx``, B x Nc) and the predictor's input
    (``pred``, B x (Nc + Nt): each window's context then its mask tokens): ``cu_{stream}``
    (int32 cu_seqlens over the flattened stream, see :class:`lang_jepa.models.layers.Segments`)
    and ``max_{stream}`` (int); plus ``pred_order`` [B, Nc + Nt] (index into the concatenation
    of context and mask tokens) and ``pred_tgt`` [B, Nt] (where each mask token lands).

    Always: ``cu_sent`` / ``max_sent``, the same for the ``sent`` stream (B x L, each sentence of
    each window its own segment): the target encoder's sentence view.

    ``queries`` = K > 0 (``mask.queries``) adds what the context encoder and the predictor read
    instead of the true positions and one mask token per target token: ``ctx_pos`` [B, Nc] (the
    context tokens renumbered so that every hidden sentence spans K positions, see
    :func:`renumbered`) and ``qry_pos`` / ``qry_sent`` / ``qry_valid`` [B, Nq] (K queries per
    hidden sentence, with their slot); the ``pred`` stream then holds each window's context and
    its queries.

    ``draws`` = M > 1 (``mask.draws``): the rows come in groups of M copies of the same windows,
    each with its own masks (rows r*M .. r*M + M - 1); the batch says so with ``draws`` = M (int),
    and the target encoder reads only the first row of each group, whose ``sent`` (and, packed,
    ``full``) segment bounds are ``once_cu_*`` / ``once_max_*``
    (:func:`lang_jepa.objectives.base.window_rows`). Each copy's windows are numbered on their
    own in ``tgt_sent_win``: a draw's hidden sentences are its window's candidates.
    """
    b = len(rows)
    if draws > 1:
        if b % draws:
            raise ValueError(f"{b} rows are not groups of mask.draws={draws} copies")
        for r in range(0, b, draws):
            first = [(w.doc_key, w.index) for w, _ in rows[r]]
            for copy in rows[r + 1 : r + draws]:
                if [(w.doc_key, w.index) for w, _ in copy] != first:
                    raise ValueError(f"rows {r}..{r + draws - 1} are not copies of one window set")
    win_lens = [[w.n_tokens for w, _ in row] for row in rows]
    ctx_lens = [[len(m.ctx_index) for _, m in row] for row in rows]
    tgt_lens = [[len(m.tgt_index) for _, m in row] for row in rows]
    n_ctx = np.array([sum(r) for r in ctx_lens], dtype=np.int64)
    n_tgt = np.array([sum(r) for r in tgt_lens], dtype=np.int64)
    n_sents = np.array([sum(m.n_tgt_sents for _, m in row) for row in rows], dtype=np.int64)
    if max(sum(r) for r in win_lens) > row_len:
        raise ValueError(f"a row holds {max(sum(r) for r in win_lens)} tokens > {row_len}")
    nc = _round_up(int(n_ctx.max()), PAD_MULTIPLE, row_len)
    nt = _round_up(int(n_tgt.max()), PAD_MULTIPLE, row_len)
    # what the predictor reads after the context: the target tokens, or K queries per sentence
    qry_lens = tgt_lens if not queries else [[queries * m.n_tgt_sents for _, m in r] for r in rows]
    n_qry = np.array([sum(r) for r in qry_lens], dtype=np.int64)
    nq = nt if not queries else _round_up(int(n_qry.max()), PAD_MULTIPLE, queries * row_len)
    input_ids = np.zeros((b, row_len), dtype=np.int64)
    position_ids = np.zeros((b, row_len), dtype=np.int64)
    ctx_index = np.zeros((b, nc), dtype=np.int64)
    tgt_index = np.zeros((b, nt), dtype=np.int64)
    tgt_sent = np.zeros((b, nt), dtype=np.int64)
    tgt_sent_win = np.full((b, int(n_sents.max())), -1, dtype=np.int64)
    ctx_pos = np.zeros((b, nc if queries else 0), dtype=np.int64)  # filled with queries only
    qry_pos = np.zeros((b, nq if queries else 0), dtype=np.int64)
    qry_sent = np.zeros_like(qry_pos)
    order = np.zeros((b, nc + nq), dtype=np.int64)
    n_win = 0  # windows laid out so far (rows before this one included)
    for i, row in enumerate(rows):
        at = c = t = q = p = s = 0  # running token, context, target, query, predictor, slot
        for w, m in row:
            n, k, j = w.n_tokens, len(m.ctx_index), len(m.tgt_index)
            tgt_sent_win[i, s : s + m.n_tgt_sents] = n_win
            n_win += 1
            input_ids[i, at : at + n] = w.tokens
            position_ids[i, at : at + n] = np.arange(n)
            ctx_index[i, c : c + k] = m.ctx_index.numpy() + at
            tgt_index[i, t : t + j] = m.tgt_index.numpy() + at
            tgt_sent[i, t : t + j] = m.tgt_sent.numpy() + s
            jq = j
            if queries:
                jq = queries * m.n_tgt_sents
                ctx_pos[i, c : c + k], qry_pos[i, q : q + jq] = renumbered(w, m, queries)
                qry_sent[i, q : q + jq] = np.repeat(np.arange(m.n_tgt_sents), queries) + s
            order[i, p : p + k] = np.arange(c, c + k)
            order[i, p + k : p + k + jq] = np.arange(nc + q, nc + q + jq)
            at, c, t, q, p, s = at + n, c + k, t + j, q + jq, p + k + jq, s + m.n_tgt_sents
        order[i, p:] = np.concatenate((np.arange(c, nc), np.arange(nc + q, nc + nq)))
    ar = np.arange(row_len, dtype=np.int64)
    lens = np.array([sum(r) for r in win_lens], dtype=np.int64)
    doc_index = np.array([w.doc_index for row in rows for w, _ in row], dtype=np.int64)
    batch: dict[str, np.ndarray | int] = {
        "input_ids": input_ids,
        "valid": ar[None, :] < lens[:, None],
        "position_ids": position_ids,
        "ctx_index": ctx_index,
        "ctx_valid": ar[None, :nc] < n_ctx[:, None],
        "tgt_index": tgt_index,
        "tgt_valid": ar[None, :nt] < n_tgt[:, None],
        "tgt_sent": tgt_sent,
        "tgt_sent_valid": np.arange(n_sents.max())[None, :] < n_sents[:, None],
        "tgt_sent_win": tgt_sent_win,
        "doc_index": doc_index,
    }
    if draws > 1:
        batch["draws"] = draws
    if queries:
        batch["ctx_pos"], batch["qry_pos"], batch["qry_sent"] = ctx_pos, qry_pos, qry_sent
        batch["qry_valid"] = np.arange(nq)[None, :] < n_qry[:, None]
    # each sentence of each window a segment of the full stream (``target.view=sentence``)
    sent_lens = [[int(n) for w, _ in row for n in np.diff(w.offsets)] for row in rows]
    batch["cu_sent"], batch["max_sent"] = _segment_bounds(sent_lens, row_len)
    if draws > 1:  # what the target encoder reads: the first copy of each group of draws
        batch["once_cu_sent"], batch["once_max_sent"] = _segment_bounds(sent_lens[::draws], row_len)
        if packed:
            once = _segment_bounds(win_lens[::draws], row_len)
            batch["once_cu_full"], batch["once_max_full"] = once
    if packed:
        pred_lens = [
            [k + j for k, j in zip(a, c, strict=True)]
            for a, c in zip(ctx_lens, qry_lens, strict=True)
        ]
        for name, lengths, size in (
            ("full", win_lens, row_len), ("ctx", ctx_lens, nc), ("pred", pred_lens, nc + nq)
        ):  # fmt: skip
            batch[f"cu_{name}"], batch[f"max_{name}"] = _segment_bounds(lengths, size)
        batch["pred_order"] = order
        batch["pred_tgt"] = np.argsort(order, axis=1, kind="stable")[:, nc:]
    return batch
