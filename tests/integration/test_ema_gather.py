"""The partitioned EMA update (lang_jepa.ema.EmaSync) on two real gloo processes.

Each rank owns uneven fragments of the online weights that straddle parameters (and, in one
layout, several fragments of one parameter or none at all); after every update each rank's target
must be bit-identical to ``T.lerp(W, 1 - m)`` over whole tensors. A fragment layout that changes
after the first step, or fragments that do not tile the parameters, are errors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lang_jepa.ema import EmaSync, Fragment
from tests.helpers import free_port

pytestmark = pytest.mark.processes
SHAPES = [(5, 3), (7,), (4, 4), (1,), (11,)]  # 50 elements end to end
TOTAL = 50
# per layout: the [lo, hi) intervals of the concatenated parameters each rank owns
LAYOUTS = {
    # ZeRO-1/2-like: one contiguous cut, uneven (23 vs 27), inside parameter 2
    "cut": [[(0, 23)], [(23, 50)]],
    # two fragments of parameter 0 on rank 0, cuts inside parameters 0, 2 and 4
    "interleaved": [[(0, 4), (9, 30), (41, 42)], [(4, 9), (30, 41), (42, 50)]],
    # one rank owns everything, the other nothing (the longest padding)
    "lopsided": [[(0, 50)], []],
}
MOMENTA = [0.9, 0.996, 0.5]


def fragments_of(
    online: list[torch.Tensor], intervals: list[tuple[int, int]]
) -> list[list[Fragment]]:
    """The fragments of each parameter that a rank owning ``intervals`` (of the concatenation)
    holds: views into the online tensors, as DeepSpeed hands them out."""
    frags: list[list[Fragment]] = [[] for _ in online]
    offset = 0
    for i, w in enumerate(online):
        for lo, hi in intervals:
            start, end = max(lo - offset, 0), min(hi - offset, w.numel())
            if start < end:
                frags[i].append((start, w.reshape(-1)[start:end]))
        offset += w.numel()
    return frags


def random_params(gen: torch.Generator) -> list[torch.Tensor]:
    # magnitudes spread over decades, so rounding differences would show
    return [
        torch.randn(s, generator=gen) * 10.0 ** torch.randint(-3, 4, (), generator=gen)
        for s in SHAPES
    ]


def build(
    rank: int, target: list[torch.Tensor], frags: list[list[Fragment]], bucket: int
) -> EmaSync:
    def gather_object(obj: object) -> list[object]:
        out: list[object] = [None, None]
        dist.all_gather_object(out, obj)
        return out

    return EmaSync(target, frags, rank, 2, gather_object, dist.all_gather_single, bucket)


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _check_bit_identity(rank)
        _check_bad_layouts(rank)
    finally:
        dist.destroy_process_group()


def _check_bit_identity(rank: int) -> None:
    # bucket 4: chunks of 2 per rank, so fragments cross round boundaries; 1 << 26: one round
    for name, owned in LAYOUTS.items():
        for bucket in (1 << 26, 13, 4):
            gen = torch.Generator().manual_seed(0)  # the same weights on both ranks
            target = random_params(gen)
            expected = [t.clone() for t in target]
            sync = None
            for m in MOMENTA:
                online = random_params(gen)
                frags = fragments_of(online, owned[rank])
                if sync is None:
                    sync = build(rank, target, frags, bucket)
                sync.update(target, frags, m)
                for e, w in zip(expected, online, strict=True):
                    e.lerp_(w, 1 - m)
                for i, (t, e) in enumerate(zip(target, expected, strict=True)):
                    assert torch.equal(t, e), (name, bucket, m, i, (t - e).abs().max())
            longest = max(sum(hi - lo for lo, hi in iv) for iv in owned)
            assert sync.wire_numel() == longest  # (world - 1) x the longest stream
            assert sync.world * sync.chunk <= max(bucket, 2)


def _check_bad_layouts(rank: int) -> None:
    gen = torch.Generator().manual_seed(1)
    target, online = random_params(gen), random_params(gen)
    sync = build(rank, target, fragments_of(online, LAYOUTS["cut"][rank]), 1 << 26)
    before = [t.clone() for t in target]
    # the layout moved (on both ranks): an error before any element changes or any collective
    with pytest.raises(RuntimeError, match="layout changed"):
        sync.update(target, fragments_of(online, LAYOUTS["interleaved"][rank]), 0.9)
    with pytest.raises(RuntimeError, match="layout changed"):
        sync.update(target[:-1], fragments_of(online, LAYOUTS["cut"][rank])[:-1], 0.9)
    assert all(torch.equal(t, b) for t, b in zip(target, before, strict=True))
    # fragments that overlap, or leave a gap, are refused on every rank when the layouts meet
    for owned in ([[(0, 30)], [(20, 50)]], [[(0, 20)], [(23, 50)]]):
        with pytest.raises(ValueError, match="parameter 1|parameter 2"):
            build(rank, target, fragments_of(online, owned[rank]), 1 << 26)


def test_gather_is_bit_identical_to_lerp_and_detects_layout_changes() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)
