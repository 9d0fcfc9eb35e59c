"""EMA target encoder update, correct when the online fp32 weights are partitioned across ranks.

The online encoder's fp32 master weights may be whole on every rank (ZeRO-0 fp32) or split into
fragments, one per data-parallel rank (ZeRO-1/2 optimizer partitions, ZeRO-3 parameter
partitions). Each rank knows only its fragments, so every rank writes ``W - T`` into its part of
a zero buffer; one sum-reduce assembles the whole difference on every rank, and every rank applies
``T += (1 - m) (W - T)``, i.e. ``T <- m T + (1 - m) W``. Buffers are bucketed to bound memory.

This module knows nothing of DeepSpeed: :mod:`lang_jepa.engine` supplies the fragments and the
reduce function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# (start offset into the flattened parameter, fp32 values of that slice on this rank)
Fragment = tuple[int, Tensor]


@torch.no_grad()
def ema_update(
    target_params: Sequence[Tensor],
    fragments: Sequence[Sequence[Fragment]],
    momentum: float,
    all_reduce: Callable[[Tensor], None] | None,
    bucket_numel: int = 1 << 26,
) -> None:
    """Update each fp32 target tensor towards the online weights described by ``fragments``.

    ``fragments[i]`` lists this rank's slices of online parameter ``i``; over all ranks they tile
    it exactly once. ``all_reduce`` sums a tensor over the data-parallel group in place; ``None``
    means every rank already holds whole parameters (one fragment covering each tensor).
    """
    if len(target_params) != len(fragments):
        raise ValueError(f"{len(target_params)} target tensors but {len(fragments)} online ones")
    weight = 1.0 - momentum
    if all_reduce is None:
        for target, frags in zip(target_params, fragments, strict=True):
            ((start, values),) = frags
            if start != 0 or values.numel() != target.numel():
                raise ValueError("without a reduce, every fragment must cover its whole tensor")
            target.lerp_(values.view_as(target).to(target), weight)
        return
    bucket: list[int] = []
    size = 0
    for i, target in enumerate(target_params):
        bucket.append(i)
        size += target.numel()
        if size >= bucket_numel or i == len(target_params) - 1:
            _reduce_bucket(
                [target_params[j] for j in bucket],
                [fragments[j] for j in bucket],
                weight,
                all_reduce,
            )
            bucket, size = [], 0


def _reduce_bucket(
    targets: list[Tensor],
    fragments: list[Sequence[Fragment]],
    weight: float,
    all_reduce: Callable[[Tensor], None],
) -> None:
    total = sum(t.numel() for t in targets)
    delta = torch.zeros(total, dtype=torch.float32, device=targets[0].device)
    offset = 0
    for target, frags in zip(targets, fragments, strict=True):
        flat = target.view(-1)
        for start, values in frags:
            n = values.numel()
            delta[offset + start : offset + start + n] = (
                values.reshape(-1).to(delta) - flat[start : start + n]
            )
        offset += target.numel()
    all_reduce(delta)
    offset = 0
    for target in targets:
        target.view(-1).add_(delta[offset : offset + target.numel()], alpha=weight)
        offset += target.numel()
