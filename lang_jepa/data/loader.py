"""Train and validation loaders: shards -> windows -> masks -> batches.

Train stream (:class:`TrainLoader`)
    Infinite: every (rank, worker) slot loops over epochs (epoch counter per slot), so every rank
    yields as many batches as it is asked for and no rank can reach the end of its data while
    another still waits in a collective (WebDataset's epoch-end hang). Training is counted in
    steps, not epochs. Shards are split over ranks x workers with a per-epoch seeded shuffle (see
    :mod:`lang_jepa.data.reader`), windows are shuffled in a seeded buffer, and each window's mask
    comes from a generator hashed from (seed, epoch, document, window number).

    Packing (``data.packing``, the default): a batch is one row of ``micro_batch_size x seq_len``
    tokens filled with whole windows by best-fit (:func:`pack_windows`); the windows stay apart
    through block-diagonal attention (the batch's segment bounds), so padding is only what is
    left at the end of the row. Without packing a batch is ``micro_batch_size`` rows of one
    window each, padded to ``seq_len``.

    The stream is a deterministic function of (seed, rank, world size, num_workers). Each worker
    reports its position (epoch, batches yielded in that epoch) with every batch; ``state_dict()``
    holds those positions plus the batch count, and ``load_state_dict()`` makes the next batch
    exactly the one the uninterrupted run would have produced next (same world size and workers).
    Restoring replays the current epoch's reading, shuffling and packing up to the saved position;
    skipped batches are neither masked nor collated. A state saved by another rank (checkpoints
    that keep rank 0's client state only) still restores exactly: the batch count is the same on
    every rank, and each worker then replays its share from the start (slower, same result).
    ``take_over()`` continues a run saved with another number of ranks or workers: the old
    slots' streams are finished first, shared out over the new slots (:class:`Handover`).

Validation stream (:class:`ValLoader`)
    Exactly ``val_batches`` batches on every rank, deterministic (no shuffle, masks fixed by
    ``train.seed``), built once and cached, one window per row, with ``sent_id`` (each token's
    sentence number in its window) beside the batch contract. A rank takes every ``world``-th
    window of the val split and cycles them if it has too few (``cycle=False``, what the offline
    evaluation uses: each window once, at most ``n_batches`` batches).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lang_jepa.config import Config, MaskConfig
from lang_jepa.data.masking import collate, collate_arrays, mask_draws, mask_window, to_tensors
from lang_jepa.data.reader import (
    ShardInfo,
    check_tokenizer,
    document_windows,
    epoch_plan,
    shuffled,
    split_shards,
)
from lang_jepa.data.windows import Window, WindowCounters

Batch = dict[str, Tensor]
# the stream settings a saved position depends on, by the config key that sets each
SETTING_KEYS = {
    "position_unit": "",  # the state format
    "world_size": "the number of ranks",
    "num_workers": "data.num_workers",
    "seed": "train.seed",
    "seq_len": "model.seq_len",
    "micro_batch": "data.micro_batch_size",
    "min_sentences": "data.min_sentences",
    "shuffle_buffer": "data.shuffle_buffer",
    "packing": "data.packing",
    "pack_pool": "",  # derived from data.packing and data.micro_batch_size
}
PACK_POOL = 4  # packing: windows waiting for a batch, per window of micro_batch_size


@dataclass(frozen=True)
class StreamSpec:
    """Everything that determines a split's stream of batches (besides rank/world/workers)."""

    shards: tuple[ShardInfo, ...]
    seq_len: int
    micro_batch: int
    min_sentences: int
    shuffle_buffer: int
    seed: int
    mask: MaskConfig
    packing: bool = False
    split: str = "train"

    @classmethod
    def from_config(cls, cfg: Config, split: str) -> StreamSpec:
        return cls(
            shards=tuple(split_shards(cfg.data.shards, split, cfg.data.verify_shards)),
            seq_len=cfg.model.seq_len,
            micro_batch=cfg.data.micro_batch_size,
            min_sentences=cfg.data.min_sentences,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed,
            mask=cfg.mask,
            packing=cfg.data.packing and split == "train",
            split=split,
        )


def pack_windows(windows: Iterator[Window], budget: int, pool: int) -> Iterator[list[Window]]:
    """Best-fit packing of a window stream into batches of at most ``budget`` tokens.

    Up to ``pool`` windows wait in arrival order. A batch starts with the oldest waiting window
    (so no window waits forever), then repeatedly takes the longest waiting window that still
    fits (the oldest among equals) until none does. Every window of the stream lands in exactly
    one batch; when the stream ends the pool is drained, so the last batch may be less full.
    """
    waiting: list[Window] = []
    lengths = np.zeros(0, dtype=np.int64)
    stream = iter(windows)
    while True:
        for window in islice(stream, pool - len(waiting)):
            waiting.append(window)
        if not waiting:
            return
        lengths = np.fromiter((w.n_tokens for w in waiting), dtype=np.int64, count=len(waiting))
        taken = [0]
        room = budget - int(lengths[0])
        lengths[0] = budget + 1  # taken
        while True:
            fits = np.flatnonzero(lengths <= room)
            if len(fits) == 0:
                break
            best = int(fits[np.argmax(lengths[fits])])  # argmax: first (oldest) of the longest
            taken.append(best)
            room -= int(lengths[best])
            lengths[best] = budget + 1
        yield [waiting[i] for i in taken]
        chosen = set(taken)
        waiting = [w for i, w in enumerate(waiting) if i not in chosen]


def window_batches(spec: StreamSpec, windows: Iterator[Window]) -> Iterator[list[Window]]:
    """One epoch's windows grouped into batches: packed to ``micro_batch x seq_len`` tokens, or
    ``micro_batch`` windows at a time (the last batch of an epoch may be smaller)."""
    if spec.packing:
        return pack_windows(windows, spec.micro_batch * spec.seq_len, PACK_POOL * spec.micro_batch)
    return iter(lambda: list(islice(windows, spec.micro_batch)), [])


def collate_batch(spec: StreamSpec, windows: list[Window], epoch: int) -> dict[str, Any]:
    """Mask each window (hash-seeded) and collate to numpy arrays: one packed row, or one row
    per window. With ``mask.draws`` = M > 1 (training only) every row is laid out M times, the
    m-th copy with each window's m-th mask draw, copies adjacent (rows r*M .. r*M + M - 1)."""
    draws = spec.mask.draws if spec.split == "train" else 1
    masks = [mask_draws(w, spec.mask, spec.seed, epoch, draws) for w in windows]
    if spec.packing:
        rows = [[(w, m[d]) for w, m in zip(windows, masks, strict=True)] for d in range(draws)]
        row_len = spec.micro_batch * spec.seq_len
    else:
        rows = [[(w, m[d])] for w, m in zip(windows, masks, strict=True) for d in range(draws)]
        row_len = spec.seq_len
    return collate_arrays(rows, row_len, spec.packing, spec.mask.queries, draws)


@dataclass(frozen=True)
class Handover:
    """Where every slot of an earlier layout (another world size or worker count) stopped.

    A run that resumes on a different number of slots first finishes the old slots' streams,
    each continued exactly where it stopped, through ``epoch`` (the newest epoch any old slot had
    reached), so that no window of those epochs is repeated or skipped; then every slot starts
    epoch ``epoch + 1`` of its own layout. Old slot ``s`` goes to new slot ``s % n_new`` when the
    layout shrinks (a new slot then takes turns over the old streams it inherits, one batch each);
    when it grows, new slot ``k`` takes every ``m``-th batch of old slot ``k % n_old`` (``m``: the
    new slots sharing that old slot). With accumulation making up the difference, a step then holds
    the same batches as it would have in the old layout. ``before`` is the old layout's own
    handover, when it had one.
    """

    epoch: int
    n_slots: int
    positions: tuple[tuple[int, int], ...]  # per old slot: (epoch, batches yielded in it)
    before: Handover | None = None

    @classmethod
    def from_states(cls, states: list[dict[str, Any]]) -> Handover:
        """The handover from every old rank's :meth:`TrainLoader.state_dict`, in rank order."""
        ranks = [int(s.get("rank", -1)) for s in states]
        if ranks != list(range(len(states))):
            raise ValueError(
                f"the old ranks' data positions are for ranks {ranks}, not 0..{len(states) - 1}"
            )
        workers = max(1, int(states[0]["num_workers"]))
        positions = []
        for state in states:
            saved = {int(w): (int(p[0]), int(p[1])) for w, p in state.get("positions", {}).items()}
            positions += [saved.get(w, (0, 0)) for w in range(workers)]  # (0, 0): the start
        before = states[0].get("handover")
        return cls(
            epoch=max(e for e, _ in positions),
            n_slots=len(states) * workers,
            positions=tuple(positions),
            before=None if before is None else cls.from_dict(before),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "n_slots": self.n_slots,
            "positions": [list(p) for p in self.positions],
            "before": None if self.before is None else self.before.to_dict(),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Handover:
        before = d.get("before")
        return cls(
            int(d["epoch"]), int(d["n_slots"]), tuple((int(e), int(o)) for e, o in d["positions"]),
            None if before is None else cls.from_dict(before),
        )  # fmt: skip

    def shares(self, slot: int, n_slots: int) -> list[tuple[int, int, int]]:
        """New slot ``slot`` of ``n_slots``: the (old slot, part, parts) it continues; it takes
        the old stream's batches j with j % parts == part."""
        if n_slots <= self.n_slots:
            return [(s, 0, 1) for s in range(slot % n_slots, self.n_slots, n_slots)]
        old = slot % self.n_slots
        sharers = list(range(old, n_slots, self.n_slots))
        return [(old, sharers.index(slot), len(sharers))]


def slot_windows(
    spec: StreamSpec,
    slot: int,
    n_slots: int,
    counters: WindowCounters,
    epoch: int = 0,
    handover: Handover | None = None,
) -> Iterator[tuple[int, int, list[Window]]]:
    """The endless stream of one slot's batches of windows, from the start of ``epoch``, as
    (position epoch, mask epoch, windows). The mask epoch is the epoch of the layout that read the
    windows (it seeds their masks); the position epoch is this layout's: while ``handover`` is
    being finished it is ``handover.epoch`` for every batch. ``counters`` sees every document
    read."""
    if handover is not None and epoch <= handover.epoch:
        yield from _handover_windows(spec, slot, n_slots, counters, handover)
        epoch = handover.epoch + 1
    empty_epochs = 0
    while True:
        shards, stride = epoch_plan(list(spec.shards), slot, n_slots, spec.seed, epoch)
        stream = document_windows(
            shards, spec.seq_len, spec.min_sentences, counters, stride, slot if stride > 1 else 0
        )
        rng = np.random.default_rng([spec.seed, epoch, slot, 0x5EED])
        offset = 0
        for windows in window_batches(spec, shuffled(stream, spec.shuffle_buffer, rng)):
            offset += 1
            yield epoch, epoch, windows
        empty_epochs = empty_epochs + 1 if offset == 0 else 0
        if empty_epochs >= 2:
            raise RuntimeError(
                f"slot {slot} of {n_slots} (rank x worker) got no windows in two epochs in a row: "
                "too few documents or all shorter than data.min_sentences sentences"
            )
        epoch += 1


def _handover_windows(
    spec: StreamSpec, slot: int, n_slots: int, counters: WindowCounters, h: Handover
) -> Iterator[tuple[int, int, list[Window]]]:
    """What is left of the old slots this slot continues, through ``h.epoch``, taking turns."""

    def rest(old: int, part: int, parts: int) -> Iterator[tuple[int, int, list[Window]]]:
        start_epoch, done = h.positions[old]
        stream = slot_windows(spec, old, h.n_slots, counters, start_epoch, h.before)
        for j, item in enumerate(islice(stream, done, None)):
            if item[0] > h.epoch:  # the old slot's next epoch belongs to this layout
                return
            if j % parts == part:
                yield h.epoch, item[1], item[2]

    streams = [rest(*share) for share in h.shares(slot, n_slots)]
    while streams:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            else:
                yield item


def slot_batches(
    spec: StreamSpec,
    slot: int,
    n_slots: int,
    worker: int,
    epoch: int = 0,
    skip: int = 0,
    handover: Handover | None = None,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """The endless (batch, position) stream of one slot, starting at ``epoch`` after ``skip``
    batches of that epoch (``skip`` may run past its end: replay continues into the next).
    Position = {worker, epoch, offset (batches yielded in that epoch), counters}. Skipped batches
    are read, shuffled and packed again (all cheap) but neither masked nor collated."""
    counters = WindowCounters()
    offset, current = 0, None
    for pos_epoch, mask_epoch, windows in slot_windows(
        spec, slot, n_slots, counters, epoch, handover
    ):
        if pos_epoch != current:
            offset, current = 0, pos_epoch
        offset += 1
        if skip > 0:
            skip -= 1
            continue
        pos = {"worker": worker, "epoch": pos_epoch, "offset": offset}
        yield collate_batch(spec, windows, mask_epoch), {**pos, "counters": counters.as_dict()}


@dataclass(frozen=True, slots=True)
class Packet:
    """A batch (numpy arrays) and its position, as one opaque object for the worker queue.

    The DataLoader turns arrays and tensors it can see into shared-memory tensors, one file and
    file-descriptor hand-off each (~0.6 ms apiece here: ~8 ms for a batch of ~15 arrays, more than
    building it). Wrapped, the batch is pickled into the queue as one message (~1 ms).
    """

    arrays: dict[str, Any]
    pos: dict[str, Any]


class TrainStream(IterableDataset):
    """One rank's train stream as a DataLoader dataset; each worker runs its own slot.

    ``start`` maps a logical worker to its (epoch, offset) position; ``rotation`` maps DataLoader
    worker ``i`` to logical worker ``(i + rotation) % workers``, so that after a restore the first
    batch fetched (from DataLoader worker 0) is the one the original round-robin would give next.
    """

    def __init__(
        self,
        spec: StreamSpec,
        rank: int,
        world_size: int,
        workers: int,
        start: dict[int, tuple[int, int]],
        rotation: int,
        handover: Handover | None = None,
    ) -> None:
        super().__init__()
        self.spec, self.rank, self.world_size, self.workers = spec, rank, world_size, workers
        self.start, self.rotation, self.handover = start, rotation, handover

    def __iter__(self) -> Iterator[Packet]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.workers
        epoch, skip = self.start.get(worker, (0, 0))
        slot = self.rank * self.workers + worker
        n_slots = self.world_size * self.workers
        stream = slot_batches(self.spec, slot, n_slots, worker, epoch, skip, self.handover)
        return (Packet(arrays, pos) for arrays, pos in stream)


def _ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker ignores the stop signals (as PyTorch's workers ignore SIGINT). SLURM
    and the experiment harness send SIGTERM to every process of a run; a worker that died of it
    would abort the main process's checkpoint from its SIGCHLD handler. The main process stops
    and saves; the workers end with it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class TrainLoader:
    """Endless iterator of train batches for one rank, with a resumable position.

    ``next(loader)`` gives a batch dict (see :func:`lang_jepa.data.masking.collate`);
    ``state_dict()`` / ``load_state_dict()`` save and restore the position; ``counters()`` sums the
    workers' window counters (since this loader was created or restored).
    """

    def __init__(
        self,
        spec: StreamSpec,
        rank: int,
        world_size: int,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.workers = max(1, num_workers)
        n_slots = world_size * self.workers
        n_docs = sum(s.samples for s in spec.shards)
        if len(spec.shards) < n_slots and n_docs < n_slots:
            raise ValueError(
                f"the train split has {n_docs} documents in {len(spec.shards)} shards, fewer than "
                f"world size x data.num_workers = {n_slots}: lower data.num_workers"
            )
        self._batches = 0
        self._positions: dict[int, tuple[int, int]] = {}
        self._counters: dict[int, dict[str, int]] = {}
        self._it: Iterator[Packet] | None = None
        self.handover: Handover | None = None  # an earlier layout's streams, finished first

    def _start(self) -> Iterator[Packet]:
        dataset = TrainStream(
            self.spec, self.rank, self.world_size, self.workers, dict(self._positions),
            self._batches % self.workers, self.handover,
        )  # fmt: skip
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {"persistent_workers": True, "prefetch_factor": self.prefetch_factor,
                     "worker_init_fn": _ignore_stop_signals}  # fmt: skip
        # packets are opaque to the DataLoader: __next__ makes the tensors (and pins them)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, **extra)
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._start()
        packet = next(self._it)
        arrays, pos = packet.arrays, packet.pos
        self._positions[pos["worker"]] = (pos["epoch"], pos["offset"])
        self._counters[pos["worker"]] = pos["counters"]
        self._batches += 1
        return to_tensors(arrays, pin=self.pin_memory)

    @property
    def epoch(self) -> int:
        """The oldest epoch any worker of this rank is still in."""
        return min((e for e, _ in self._positions.values()), default=0)

    def counters(self) -> dict[str, int]:
        """Window counters summed over this rank's workers (a flat dict for logging)."""
        total = WindowCounters()
        for c in self._counters.values():
            total.add(WindowCounters(**c))
        return {**total.as_dict(), "epoch": self.epoch, "batches": self._batches}

    def _stream_settings(self) -> dict[str, Any]:
        """What the saved positions depend on: the same values are needed to restore them."""
        spec = self.spec
        return {
            "position_unit": "batches",  # per worker: (epoch, batches yielded in that epoch)
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": spec.seed,
            "seq_len": spec.seq_len,
            "micro_batch": spec.micro_batch,
            "min_sentences": spec.min_sentences,
            "shuffle_buffer": spec.shuffle_buffer,
            "packing": spec.packing,
            "pack_pool": PACK_POOL * spec.micro_batch if spec.packing else 0,
        }

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able position: batch count, each worker's (epoch, offset) and the settings
        the positions depend on."""
        return {
            **self._stream_settings(),
            "batches": self._batches,
            "epoch": self.epoch,
            "rank": self.rank,
            "positions": {str(w): list(p) for w, p in sorted(self._positions.items())},
            "handover": None if self.handover is None else self.handover.to_dict(),
        }

    def check_state(self, state: dict[str, Any], layout: bool = True) -> None:
        """ValueError naming the config keys whose values differ from those a saved position
        (:meth:`state_dict`) was made with: that position cannot be restored exactly.
        ``layout=False``: the number of ranks and workers may differ (:meth:`take_over`)."""
        diffs: dict[str, str] = {}
        for key, value in self._stream_settings().items():
            if not layout and key in ("world_size", "num_workers"):
                continue
            if state.get(key) != value:
                name = SETTING_KEYS.get(key) or f"loader {key}"
                diffs.setdefault(name, f"{name}={state.get(key)}, this run has {value}")
        if len(diffs) > 1:
            diffs.pop("loader pack_pool", None)  # follows from the keys named
        if diffs:
            raise ValueError(
                "the checkpoint's data position was saved with "
                + "; ".join(diffs.values())
                + ": the exact data position can only be restored with the same value"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; ValueError, naming the config keys,
        if one the positions depend on differs (ranks, workers, seed, windows, batching)."""
        self.check_state(state)
        self.close()
        self._batches = int(state["batches"])
        self._counters = {}
        handover = state.get("handover")
        self.handover = None if handover is None else Handover.from_dict(handover)
        if state.get("rank") == self.rank and "positions" in state:
            saved = state["positions"].items()
            self._positions = {int(w): (int(p[0]), int(p[1])) for w, p in saved}
            return
        # Another rank's state: worker w produced batches j = w, w + W, ... < batches; replay.
        n = self._batches
        self._positions = {w: (0, len(range(w, n, self.workers))) for w in range(self.workers)}

    def take_over(self, states: list[dict[str, Any]]) -> None:
        """Continue a run saved with another number of ranks or workers: ``states`` are every old
        rank's :meth:`state_dict`, in rank order. The old slots' streams are finished first, each
        exactly where it stopped (see :class:`Handover`); ValueError, naming the config keys, if
        a setting other than the layout differs."""
        for state in states:
            self.check_state(state, layout=False)
        self.close()
        self.handover = Handover.from_states(states)
        self._batches, self._positions, self._counters = 0, {}, {}

    def close(self) -> None:
        """Stop the worker processes (a new iteration restarts them at the saved position)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class ValLoader:
    """``n_batches`` deterministic validation batches for one rank, built on first use, cached.

    The cached tensors are returned on every iteration: do not modify them in place.
    """

    def __init__(
        self, spec: StreamSpec, rank: int, world_size: int, n_batches: int, cycle: bool = True
    ) -> None:
        self.spec, self.rank, self.world_size, self.n_batches = spec, rank, world_size, n_batches
        self.cycle = cycle  # False: at most n_batches, no window twice (the last may be short)
        self._cache: list[Batch] | None = None

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches())

    def _batches(self) -> list[Batch]:
        if self._cache is None:
            self._cache = self._build()
        return self._cache

    def _windows(self, need: int) -> list[Window]:
        """Every ``world``-th window of the split for this rank (all windows if it gets none)."""
        spec, mine, first = self.spec, [], []
        counters = WindowCounters()
        stream = document_windows(spec.shards, spec.seq_len, spec.min_sentences, counters)
        for j, window in enumerate(stream):
            if j % self.world_size == self.rank:
                mine.append(window)
            if len(first) < need:
                first.append(window)
            if len(mine) >= need:
                break
        if not mine and not first:
            urls = ", ".join(s.url for s in spec.shards)
            raise ValueError(f"the val split ({urls}) holds no window of >= min_sentences")
        return mine or first

    def _build(self) -> list[Batch]:
        b = self.spec.micro_batch
        windows = self._windows(self.n_batches * b)
        if not self.cycle:
            n = min(self.n_batches, -(-len(windows) // b))
            groups = [windows[i * b : (i + 1) * b] for i in range(n)]
        else:
            groups = [
                [windows[(i * b + j) % len(windows)] for j in range(b)]
                for i in range(self.n_batches)
            ]
        return [val_batch(chosen, self.spec) for chosen in groups]


def val_batch(windows: list[Window], spec: StreamSpec) -> Batch:
    """One window per row with its validation mask (fixed by the seed), plus ``sent_id`` [B, L]:
    each token's sentence number in its window (-1 on padding). Not with ``mask.unit=span``:
    what reads ``sent_id`` (the in-document retrieval, copy-neighbour, the decoder's "predict,
    then say it") takes a target slot for a whole sentence, and a span is not one."""
    masks = [mask_window(w, spec.mask, spec.seed, "val") for w in windows]
    batch = collate(windows, masks, spec.seq_len, spec.mask.queries)
    if spec.mask.unit == "span":
        return batch
    sent_id = torch.full_like(batch["input_ids"], -1)
    for row, w in enumerate(windows):
        lens = torch.from_numpy(np.diff(w.offsets))
        sent_id[row, : w.n_tokens] = torch.repeat_interleave(torch.arange(len(lens)), lens)
    batch["sent_id"] = sent_id
    return batch


def build_train_loader(cfg: Config, rank: int, world_size: int) -> TrainLoader:
    """The rank's endless train loader (checks the shards' tokenizer against data.tokenizer)."""
    check_tokenizer(cfg.data.shards, cfg.data.tokenizer)
    spec = StreamSpec.from_config(cfg, "train")
    if not any(s.samples for s in spec.shards):
        raise ValueError(f"{cfg.data.shards}: the train split is empty")
    return TrainLoader(
        spec,
        rank,
        world_size,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        pin_memory=cfg.data.pin_memory,
    )


def build_val_loader(cfg: Config, rank: int, world_size: int) -> ValLoader:
    """The rank's ``train.val_batches`` validation batches (same count on every rank)."""
    check_tokenizer(cfg.data.shards, cfg.data.tokenizer)
    spec = StreamSpec.from_config(cfg, "val")
    if not any(s.samples for s in spec.shards):
        raise ValueError(
            f"{cfg.data.shards}: the val split is empty; rebuild the shards with a val split or "
            "set train.val_interval=0"
        )
    return ValLoader(spec, rank, world_size, cfg.train.val_batches)
