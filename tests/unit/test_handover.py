"""Resuming the train stream on another number of slots (ranks x workers): every window of the
epochs in flight is yielded exactly once, old and new layouts together; a step keeps its batches;
the handover survives a checkpoint round trip, and a second change, in the new layout."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest

from lang_jepa.data.loader import (
    Handover,
    StreamSpec,
    TrainLoader,
    build_train_loader,
    slot_windows,
)
from lang_jepa.data.windows import WindowCounters
from tests.helpers import loader_cfg, same_batch


def _spec(shards, packing=True) -> StreamSpec:
    return StreamSpec.from_config(loader_cfg(shards, f"data.packing={packing}"), "train")


def _keys(windows) -> list[tuple[str, int]]:
    return [(w.doc_key, w.index) for w in windows]


def _run_old(spec, n_slots, taken, handover=None):
    """Old slot s yields taken[s] batches: (its positions, the (mask epoch, window) it yielded)."""
    positions, seen = [], []
    for slot, k in enumerate(taken):
        pos = (0, 0)
        stream = slot_windows(spec, slot, n_slots, WindowCounters(), 0, handover)
        offset, current = 0, None
        for pos_epoch, mask_epoch, windows in islice(stream, k):
            offset = offset + 1 if pos_epoch == current else 1
            current, pos = pos_epoch, (pos_epoch, offset)
            seen += [(mask_epoch, key) for key in _keys(windows)]
        positions.append(pos)
    return positions, seen


def _until_epoch(stream, epoch):
    for item in stream:
        if item[0] > epoch:
            return
        yield item


def _epoch_windows(spec, n_slots, epoch) -> Counter:
    out = Counter()
    for slot in range(n_slots):
        for e, _, windows in slot_windows(spec, slot, n_slots, WindowCounters(), epoch):
            if e != epoch:
                break
            out.update((epoch, key) for key in _keys(windows))
    return out


def _finish(spec, n_new, handover):
    """Every new slot's handover phase: the (mask epoch, window) it yields, and its first batch
    after the handover (position epoch)."""
    seen, after = [], []
    for slot in range(n_new):
        for pos_epoch, mask_epoch, windows in slot_windows(
            spec, slot, n_new, WindowCounters(), 0, handover
        ):
            if pos_epoch > handover.epoch:
                after.append(pos_epoch)
                break
            assert pos_epoch == handover.epoch
            seen += [(mask_epoch, key) for key in _keys(windows)]
    return seen, after


@pytest.mark.parametrize("n_new", [1, 3, 4])
@pytest.mark.parametrize("packing", [True, False])
def test_no_window_of_the_epochs_in_flight_is_repeated_or_skipped(synthetic_shards, n_new, packing):
    spec = _spec(synthetic_shards, packing)
    slot1_epoch = sum(1 for _ in _until_epoch(slot_windows(spec, 1, 2, WindowCounters()), 0))
    taken = [2, slot1_epoch + 2]  # slot 1 runs into its second epoch
    positions, before = _run_old(spec, 2, taken)
    handover = Handover(max(e for e, _ in positions), 2, tuple(positions))
    assert handover.epoch >= 1 and positions[0][0] == 0  # the old slots stopped in two epochs
    after, next_epochs = _finish(spec, n_new, handover)
    got = Counter(before) + Counter(after)
    want = sum((_epoch_windows(spec, 2, e) for e in range(handover.epoch + 1)), Counter())
    assert got == want  # each window of epochs 0..E once, with the epoch that seeds its mask
    assert max(got.values()) == 1
    assert next_epochs == [handover.epoch + 1] * n_new  # then the new layout's next epoch


def test_shrinking_with_accumulation_keeps_each_steps_batches(synthetic_shards):
    """4 slots -> 2 slots x 2 accumulation: rank k's two micro-batches of a step are old slots k
    and k + 2's next batches, as in the uninterrupted 4-slot run (until the epoch ends)."""
    spec = _spec(synthetic_shards)
    positions, _ = _run_old(spec, 4, [1, 1, 1, 1])
    handover = Handover(0, 4, tuple(positions))
    for k in range(2):
        new = slot_windows(spec, k, 2, WindowCounters(), 0, handover)
        olds = [islice(slot_windows(spec, s, 4, WindowCounters()), 1, None) for s in (k, k + 2)]
        for _ in range(2):
            for old in olds:
                want = next(old)
                if want[0] > 0:
                    break
                assert _keys(next(new)[2]) == _keys(want[2])


def test_growing_splits_an_old_stream_by_turns(synthetic_shards):
    spec = _spec(synthetic_shards)
    positions, _ = _run_old(spec, 1, [1])
    handover = Handover(0, 1, tuple(positions))
    rest = []
    for e, _, windows in islice(slot_windows(spec, 0, 1, WindowCounters()), 1, None):
        if e > 0:
            break
        rest.append(_keys(windows))
    assert len(rest) >= 3
    for k in range(2):
        mine = []
        for e, _, windows in slot_windows(spec, k, 2, WindowCounters(), 0, handover):
            if e > 0:
                break
            mine.append(_keys(windows))
        assert mine == rest[k::2]


def test_the_handover_survives_a_checkpoint_and_a_second_change(synthetic_shards):
    """Two ranks stop; one rank takes over and saves mid-handover; its state restores exactly;
    then three ranks take over from it: no window of the epochs in flight is lost or doubled."""
    cfg = loader_cfg(synthetic_shards)
    spec = StreamSpec.from_config(cfg, "train")
    taken = (2, 3)
    old = [build_train_loader(cfg, rank, 2) for rank in range(2)]
    for loader, n in zip(old, taken, strict=True):
        for _ in range(n):
            next(loader)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    h1 = Handover.from_states(states)
    one = build_train_loader(cfg, 0, 1)
    one.take_over(states)
    for _ in range(2):
        next(one)
    saved = json.loads(json.dumps(one.state_dict()))
    assert saved["world_size"] == 1 and Handover.from_dict(saved["handover"]) == h1
    again = build_train_loader(cfg, 0, 1)
    again.load_state_dict(saved)
    assert all(same_batch(next(one), next(again)) for _ in range(3))  # exact, mid-handover
    # the second change: three ranks take over the one-rank run, itself still in its handover
    h2 = Handover.from_states([saved])
    assert h2.before == h1 and h2.n_slots == 1 and h2.epoch == h1.epoch
    _, first = _run_old(spec, 2, list(taken))
    _, second = _run_old(spec, 1, [2], h1)
    third, _ = _finish(spec, 3, h2)
    got = Counter(first) + Counter(second) + Counter(third)
    want = sum((_epoch_windows(spec, 2, e) for e in range(h1.epoch + 1)), Counter())
    assert got == want and max(got.values()) == 1


def test_take_over_refuses_other_stream_settings(synthetic_shards):
    old = build_train_loader(loader_cfg(synthetic_shards), 0, 1)
    next(old)
    other = TrainLoader(
        StreamSpec.from_config(loader_cfg(synthetic_shards, "train.seed=7"), "train"), 0, 2
    )
    with pytest.raises(ValueError, match="train.seed=0, this run has 7"):
        other.take_over([old.state_dict()])
    with pytest.raises(ValueError, match="for ranks \\[0, 0\\]"):
        TrainLoader(old.spec, 0, 2).take_over([old.state_dict(), old.state_dict()])
