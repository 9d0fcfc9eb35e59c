"""EMA target encoder update, correct when the online fp32 weights are partitioned across ranks.

The target ``T`` (fp32, whole on every rank) follows the online encoder's fp32 master weights
``W``: ``T <- m T + (1 - m) W``, computed as ``T.lerp_(W, 1 - m)``.

- **Whole weights** (one rank, or ZeRO-0): every rank holds all of ``W``; :func:`ema_update` lerps
  each target tensor, with no buffer and no communication.
- **Partitioned weights** (ZeRO-1/2 optimizer partitions, ZeRO-3 parameter partitions, more than
  one rank): each rank holds fragments of ``W`` that tile every parameter exactly once across
  ranks. :class:`EmaSync` 1. lerps, on each rank, the target slices that rank owns; 2. packs them
  into one stream per rank; 3. all-gathers the streams (in rounds, padded to the longest stream);
  4. copies the other ranks' slices into place. Every element is lerped once, by its owner, then
  copied, so the result is bit-identical to the whole-weight lerp. Per step each rank sends
  (world - 1) x longest stream x 4 bytes (ring all-gather): about (world - 1) / world x 4 bytes per
  parameter, half of the all-reduce of ``W - T`` that this replaced (2 (world - 1) / world x 4).

This module knows nothing of DeepSpeed: :mod:`lang_jepa.engine` supplies the fragments and the
collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

# (start offset into the flattened parameter, fp32 values of that slice on this rank)
Fragment = tuple[int, Tensor]
# (parameter index, start offset into the flattened parameter, number of elements)
Span = tuple[int, int, int]
# (parameter index, start offset into the flattened parameter, offset in the chunk, elements)
Piece = tuple[int, int, int, int]


@torch.no_grad()
def ema_update(
    target_params: Sequence[Tensor], fragments: Sequence[Sequence[Fragment]], momentum: float
) -> None:
    """Lerp each fp32 target tensor towards its online weights, when this rank holds them whole.

    ``fragments[i]`` must be one fragment ``(0, values)`` covering target ``i`` (any shape with
    the same number of elements).
    """
    if len(target_params) != len(fragments):
        raise ValueError(f"{len(target_params)} target tensors but {len(fragments)} online ones")
    for target, frags in zip(target_params, fragments, strict=True):
        ((start, values),) = frags
        if start != 0 or values.numel() != target.numel():
            raise ValueError("unpartitioned EMA update: every fragment must cover its whole tensor")
        target.lerp_(values.view_as(target).to(target), 1.0 - momentum)


def local_spans(fragments: Sequence[Sequence[Fragment]]) -> list[Span]:
    """This rank's non-empty fragments as spans, sorted by (parameter, start): its stream order."""
    return sorted(
        (i, start, values.numel())
        for i, frags in enumerate(fragments)
        for start, values in frags
        if values.numel() > 0
    )


def check_tiling(spans_per_rank: Sequence[Sequence[Span]], numels: Sequence[int]) -> None:
    """Raise ValueError unless the spans of all ranks cover every parameter exactly once."""
    covered: list[list[tuple[int, int]]] = [[] for _ in numels]
    for spans in spans_per_rank:
        for i, start, n in spans:
            if not 0 <= i < len(numels):
                raise ValueError(f"fragment of parameter {i}, but there are {len(numels)}")
            covered[i].append((start, start + n))
    for i, intervals in enumerate(covered):
        end = 0
        for lo, hi in sorted(intervals):
            if lo != end:
                raise ValueError(
                    f"parameter {i}: fragments overlap or leave a gap at {min(lo, end)}"
                )
            end = hi
        if end != numels[i]:
            raise ValueError(f"parameter {i}: fragments cover {end} of {numels[i]} elements")


def cut_stream(spans: Sequence[Span], chunk: int) -> list[list[Piece]]:
    """Split one rank's stream (its spans end to end) into consecutive chunks of ``chunk`` elements.

    Returns the pieces of each chunk; a span that crosses a chunk boundary becomes two pieces. The
    last chunk may be shorter. Slice copies only: no per-element index tensors.
    """
    chunks: list[list[Piece]] = [[]]
    at = 0  # offset in the current chunk
    for i, start, n in spans:
        while n > 0:
            take = min(n, chunk - at)
            chunks[-1].append((i, start, at, take))
            start, n, at = start + take, n - take, at + take
            if at == chunk:
                chunks.append([])
                at = 0
    if not chunks[-1]:
        chunks.pop()
    return chunks


class EmaSync:
    """The EMA update for partitioned fp32 masters: lerp the owned slices, all-gather them.

    Built once, from the first step's fragments: the ranks exchange their layouts (one
    ``all_gather_object`` of ``[(param, start, numel), ...]``), check that they tile every
    parameter exactly once, and plan the rounds. The layout is fixed for the engine's life; every
    :meth:`update` checks this rank's layout against the plan and raises if it changed.

    Rounds: each rank's stream (its owned elements, in (parameter, start) order, ``s_r`` elements)
    is gathered ``chunk = bucket_numel // world`` elements at a time, every rank's chunk padded to
    the longest stream's, so the gathered buffer holds at most ``world x chunk <= bucket_numel``
    fp32 elements and the padding is ``world x max(s_r) - sum(s_r)`` elements over all rounds
    (ZeRO partitions are near-even: a few percent).

    Args:
        rank, world_size: this rank in the data-parallel group, and the group's size.
        all_gather_object: ``obj -> [obj of rank 0, obj of rank 1, ...]`` over the group.
        all_gather_tensor: ``(output [world * n], local [n])``: every rank's ``local`` into
            ``output`` in rank order; ``local`` is this rank's slice of ``output`` (in place).
    """

    def __init__(
        self,
        target_params: Sequence[Tensor],
        fragments: Sequence[Sequence[Fragment]],
        rank: int,
        world_size: int,
        all_gather_object: Callable[[Any], list[Any]],
        all_gather_tensor: Callable[[Tensor, Tensor], None],
        bucket_numel: int = 1 << 26,
    ) -> None:
        if len(target_params) != len(fragments):
            raise ValueError(
                f"{len(target_params)} target tensors but {len(fragments)} online ones"
            )
        self.rank, self.world = rank, world_size
        self.all_gather_tensor = all_gather_tensor
        self.numels = [t.numel() for t in target_params]
        # [world * chunk] fp32, allocated at the first update and kept: a fresh one per step
        # costs as much as the gather on CPU (page faults); on GPU the caching allocator keeps it
        self.gathered: Tensor | None = None
        # 1. exchange the static layout and check it: every element has exactly one owner
        self.spans = local_spans(fragments)
        spans_per_rank = all_gather_object(self.spans)
        check_tiling(spans_per_rank, self.numels)
        # 2. plan the rounds: round k gathers chunk k of every rank's stream
        self.longest = longest = max(sum(n for _, _, n in s) for s in spans_per_rank)
        self.chunk = max(1, min(bucket_numel // world_size, longest))
        per_rank = [cut_stream(spans, self.chunk) for spans in spans_per_rank]
        n_rounds = -(-longest // self.chunk)
        self.rounds: list[tuple[int, list[list[Piece]]]] = [
            (
                min(self.chunk, longest - k * self.chunk),
                [chunks[k] if k < len(chunks) else [] for chunks in per_rank],
            )
            for k in range(n_rounds)
        ]

    def wire_numel(self) -> int:
        """Elements each rank sends per update with a ring all-gather: (world - 1) x longest."""
        return (self.world - 1) * self.longest

    @torch.no_grad()
    def update(
        self,
        target_params: Sequence[Tensor],
        fragments: Sequence[Sequence[Fragment]],
        momentum: float,
    ) -> None:
        """``T <- T.lerp(W, 1 - momentum)`` for every target tensor, on every rank.

        ``target_params``: the fp32 targets (contiguous), whole on every rank; ``fragments``: this
        rank's fp32 slices of the online weights, in the layout this object was built with.
        """
        numels = [t.numel() for t in target_params]
        if numels != self.numels or local_spans(fragments) != self.spans:  # before any collective
            raise RuntimeError(
                "EMA update: the fp32 fragment layout changed since EmaSync was built "
                "(a new engine or optimizer needs a new EmaSync)"
            )
        flats = [t.view(-1) for t in target_params]
        # 1. lerp the slices this rank owns towards its fragments, in place
        for flat, frags in zip(flats, fragments, strict=True):
            for start, values in frags:
                n = values.numel()
                flat[start : start + n].lerp_(values.reshape(-1).to(flat), 1.0 - momentum)
        if self.gathered is None:
            self.gathered = flats[0].new_empty(self.world * self.chunk)
        for size, pieces in self.rounds:
            out = self.gathered[: self.world * size]
            mine = out[self.rank * size : (self.rank + 1) * size]
            # 2. pack this rank's chunk of its stream (the padding after it is never read)
            for i, start, at, n in pieces[self.rank]:
                mine[at : at + n].copy_(flats[i][start : start + n])
            # 3. gather every rank's chunk
            self.all_gather_tensor(out, mine)
            # 4. copy the other ranks' slices into place
            for r in range(self.world):
                if r == self.rank:
                    continue
                theirs = out[r * size : (r + 1) * size]
                for i, start, at, n in pieces[r]:
                    flats[i][start : start + n].copy_(theirs[at : at + n])
