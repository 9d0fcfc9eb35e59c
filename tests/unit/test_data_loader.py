"""Loader behaviour: split over ranks x workers without loss or duplication, equal batch counts on
every rank, exact resume, deterministic validation, tokenizer and shard checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lang_jepa import shards as fmt
from lang_jepa.data.loader import (
    StreamSpec,
    TrainLoader,
    build_train_loader,
    build_val_loader,
    pack_windows,
)
from lang_jepa.data.reader import (
    check_tokenizer,
    document_windows,
    epoch_plan,
    manifest_vocab_size,
    read_shard,
    split_shards,
)
from lang_jepa.data.synthetic import write_shards
from lang_jepa.data.windows import WindowCounters, stable_hash63
from preprocessing.tokenizer import default_tokenizer_dir
from tests.helpers import SYNTHETIC_DOCS as DOCS
from tests.helpers import check_resume_gives_exactly_the_next_batches, loader_cfg, same_batch

TOKENIZER = default_tokenizer_dir()


def _doc_tokens() -> dict[int, np.ndarray]:
    return {stable_hash63(doc_id): tokens for doc_id, tokens, _ in DOCS}


@pytest.mark.parametrize("n_slots", [2, 4, 8])  # 5 shards: shard split for 2 and 4, doc split for 8
def test_each_epoch_reads_every_document_exactly_once(synthetic_shards: Path, n_slots: int):
    shards = split_shards(synthetic_shards, "train")
    for epoch in range(2):
        seen: list[str] = []
        for slot in range(n_slots):
            mine, stride = epoch_plan(shards, slot, n_slots, seed=0, epoch=epoch)
            offset = slot if stride > 1 else 0
            windows = document_windows(mine, 64, 1, WindowCounters(), stride, offset)
            seen += sorted({w.doc_key.split("|")[0] for w in windows})
        assert sorted(seen) == sorted(d[0] for d in DOCS[:13])


def _batch_windows(batch: dict) -> list[np.ndarray]:
    """The token ids of each window of a batch: its segments if packed, else its rows."""
    if "cu_full" not in batch:
        return [row[v].numpy() for row, v in zip(batch["input_ids"], batch["valid"], strict=True)]
    flat, cu = batch["input_ids"].flatten().numpy(), batch["cu_full"].tolist()
    return [flat[cu[i] : cu[i + 1]] for i in range(len(batch["doc_index"]))]


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_windows_of_one_document(synthetic_shards: Path, packing: bool):
    cfg = loader_cfg(synthetic_shards, f"data.packing={packing}")
    loader = build_train_loader(cfg, rank=0, world_size=1)
    docs = _doc_tokens()
    budget = cfg.data.micro_batch_size * cfg.model.seq_len
    for _ in range(10):
        batch = next(loader)
        windows = _batch_windows(batch)
        assert len(windows) == len(batch["doc_index"])
        assert batch["input_ids"].shape == ((1, budget) if packing else (4, cfg.model.seq_len))
        assert sum(map(len, windows)) == int(batch["valid"].sum())
        if packing:  # segments cover every token of each stream, none empty, max is the max
            for stream, key in (
                ("full", "input_ids"),
                ("ctx", "ctx_index"),
                ("pred", "pred_order"),
            ):
                lengths = batch[f"cu_{stream}"].diff()
                assert int(batch[f"cu_{stream}"][-1]) == batch[key].numel()
                assert int(lengths.min()) > 0 and int(lengths.max()) == batch[f"max_{stream}"]
        for ids, doc_index in zip(windows, batch["doc_index"].tolist(), strict=True):
            doc, n = docs[doc_index], len(ids)
            assert 0 < n <= cfg.model.seq_len
            starts = np.flatnonzero(doc[: len(doc) - n + 1] == ids[0])
            assert any(np.array_equal(doc[s : s + n], ids) for s in starts)


def test_every_rank_yields_the_same_number_of_batches_on_an_unequal_split(synthetic_shards: Path):
    # 5 shards over 2 ranks: one rank reads 3 shards per epoch, the other 2, of different sizes.
    cfg = loader_cfg(synthetic_shards)
    ranks = [build_train_loader(cfg, rank=r, world_size=2) for r in range(2)]
    counts = [0, 0]
    for _ in range(60):  # training is by steps: both ranks must deliver every step
        for r, loader in enumerate(ranks):
            next(loader)
            counts[r] += 1
    assert counts == [60, 60]
    windows = [ld.counters()["windows"] for ld in ranks]
    assert windows[0] != windows[1] or ranks[0].epoch != ranks[1].epoch
    assert min(ld.epoch for ld in ranks) >= 1  # the stream went past an epoch end


@pytest.mark.parametrize(("own_state", "packing"), [(True, True), (False, True)])
def test_resume_gives_exactly_the_next_batches(
    synthetic_shards: Path, own_state: bool, packing: bool
):
    """In-process loading (no DataLoader workers); tests/integration/test_data_loader_workers.py
    runs the same check with 2 workers per rank."""
    check_resume_gives_exactly_the_next_batches(synthetic_shards, 0, own_state, packing)


def test_packing_places_every_window_once_within_the_budget(tiny_shards: Path):
    windows = list(document_windows(split_shards(tiny_shards, "train"), 64, 2, WindowCounters()))
    assert len(windows) > 200
    budget, pool = 256, 16
    batches = list(pack_windows(iter(windows), budget, pool))
    placed = [(w.doc_key, w.index) for batch in batches for w in batch]
    assert sorted(placed) == sorted((w.doc_key, w.index) for w in windows)
    sizes = [sum(w.n_tokens for w in batch) for batch in batches]
    assert max(sizes) <= budget
    # best fit leaves room for no waiting window; only the drained tail may be emptier
    assert sum(sizes[:-4]) / (budget * len(sizes[:-4])) > 0.93
    # a batch starts with the oldest waiting window: no window waits behind more than the pool
    first_seen = {(w.doc_key, w.index): i for i, w in enumerate(windows)}
    lateness = [first_seen[(b[0].doc_key, b[0].index)] for b in batches]
    assert lateness == sorted(lateness)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.num_workers=2", "num_workers"),
        ("data.packing=false", "packing"),
        ("data.micro_batch_size=3", "micro_batch"),
        ("model.seq_len=32", "seq_len"),
        ("data.shuffle_buffer=7", "shuffle_buffer"),
    ],
)
def test_resume_refuses_other_stream_settings(synthetic_shards: Path, override: str, key: str):
    loader = build_train_loader(loader_cfg(synthetic_shards), rank=0, world_size=1)
    next(loader)
    other = build_train_loader(loader_cfg(synthetic_shards, override), rank=0, world_size=1)
    with pytest.raises(ValueError, match=key):
        other.load_state_dict(loader.state_dict())


def test_resume_refuses_a_state_counting_windows(synthetic_shards: Path):
    """States from before packing counted windows per worker, not batches: refused, not misread."""
    loader = build_train_loader(loader_cfg(synthetic_shards), rank=0, world_size=1)
    next(loader)
    old = {k: v for k, v in loader.state_dict().items() if k != "position_unit"}
    with pytest.raises(ValueError, match="position_unit=None"):
        build_train_loader(loader_cfg(synthetic_shards), rank=0, world_size=1).load_state_dict(old)


def test_masks_and_order_depend_on_the_seed(synthetic_shards: Path):
    a = [next(build_train_loader(loader_cfg(synthetic_shards), 0, 1)) for _ in range(1)][0]
    b = next(build_train_loader(loader_cfg(synthetic_shards), 0, 1))
    c = next(build_train_loader(loader_cfg(synthetic_shards, "train.seed=5"), 0, 1))
    assert same_batch(a, b) and not same_batch(a, c)


def test_validation_is_deterministic_and_equal_on_every_rank(synthetic_shards: Path):
    cfg = loader_cfg(synthetic_shards, "train.val_batches=5")
    ranks = [build_val_loader(cfg, rank=r, world_size=3) for r in range(3)]
    batches = [list(v) for v in ranks]
    assert [len(b) for b in batches] == [5, 5, 5]  # the one val document is cycled
    again = list(build_val_loader(cfg, rank=1, world_size=3))
    assert all(same_batch(x, y) for x, y in zip(again, batches[1], strict=True))
    assert not same_batch(batches[0][0], batches[1][0])
    assert all(same_batch(x, y) for x, y in zip(list(ranks[0]), batches[0], strict=True))


def test_too_few_documents_for_the_slots_is_refused(tmp_path: Path):
    d = write_shards(tmp_path, {"train": [DOCS[:2]]})
    with pytest.raises(ValueError, match="num_workers"):
        TrainLoader(
            StreamSpec.from_config(loader_cfg(d), "train"), rank=0, world_size=2, num_workers=2
        )


def test_empty_val_split_is_refused_at_start(tmp_path: Path):
    d = write_shards(tmp_path, {"train": [DOCS[:3]], "val": []})
    with pytest.raises(ValueError, match="val split is empty"):
        build_val_loader(loader_cfg(d), 0, 1)


def test_tokenizer_mismatch_is_refused_naming_the_shards(tmp_path: Path):
    from transformers import AutoTokenizer

    sha = fmt.tokenizer_fingerprint(AutoTokenizer.from_pretrained(TOKENIZER))
    good = write_shards(tmp_path / "good", {"train": [DOCS[:3]]}, tokenizer_sha256=sha)
    bad = write_shards(tmp_path / "bad", {"train": [DOCS[:3]]}, vocab_size=777)
    assert check_tokenizer(good, str(TOKENIZER)) == sha
    assert check_tokenizer(bad, None) is None
    with pytest.raises(ValueError, match=str(bad)):
        build_train_loader(loader_cfg(bad, f"data.tokenizer={TOKENIZER}"), 0, 1)
    assert manifest_vocab_size(bad) == 777


def test_truncated_shard_error_names_the_shard(tmp_path: Path):
    d = write_shards(tmp_path, {"train": [DOCS[:4], DOCS[4:8]]})
    url = split_shards(d, "train")[1].url
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 2 + 100])
    loader = build_train_loader(loader_cfg(d, "data.shuffle_buffer=1"), 0, 1)
    with pytest.raises(fmt.ShardFormatError, match="train-000001.tar"):
        for _ in range(50):
            next(loader)


def test_shard_with_missing_samples_is_refused(tmp_path: Path):
    d = write_shards(tmp_path, {"train": [DOCS[:4]]})
    other = write_shards(tmp_path / "x", {"train": [DOCS[:3]]})
    shutil.copy(other / "train-000000.tar", d / "train-000000.tar")
    with pytest.raises(fmt.ShardFormatError, match="train-000000.tar.*manifest says 4"):
        list(read_shard(str(d / "train-000000.tar"), expected_samples=4))
