"""Masking invariants, on plain tensors: whole-sentence targets in 2..4 blocks, disjoint context,
seeded determinism, and the padded batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lang_jepa.config import MaskConfig
from lang_jepa.data.masking import (
    collate,
    mask_indices,
    mask_window,
    sample_target_sentences,
    sample_target_spans,
    span_indices,
    window_generator,
)
from lang_jepa.data.windows import Window

CFG = MaskConfig()


def _offsets(lengths: list[int] | np.ndarray) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.as_tensor(lengths), 0)])


def _random_lengths(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(3, 40, size=int(rng.integers(3, 30)))


def _check_blocks(lengths: np.ndarray, blocks: list[list[int]], cfg: MaskConfig) -> None:
    total = int(lengths.sum())
    flat = [s for b in blocks for s in b]
    assert len(flat) == len(set(flat)), "blocks overlap"
    for block in blocks:
        assert block == list(range(block[0], block[0] + len(block))), "block not consecutive"
        assert len(block) >= 1
        size = int(lengths[block].sum())
        if len(block) > 1:  # dropping the last sentence would have been closer otherwise
            assert size <= cfg.max_block_frac * total + lengths[block[-1]] / 2 + 1e-9
    context = sorted(set(range(len(lengths))) - set(flat))
    assert context, "the context needs at least one sentence"
    assert lengths[context].sum() >= cfg.min_context_frac * total
    assert 1 <= len(blocks) <= cfg.max_blocks


def test_blocks_respect_the_config_on_many_windows():
    rng = np.random.default_rng(0)
    for i in range(300):
        lengths = _random_lengths(rng)
        blocks = sample_target_sentences(lengths, CFG, torch.Generator().manual_seed(i))
        _check_blocks(lengths, blocks, CFG)


def test_block_count_and_size_distribution_on_realistic_windows():
    # ~25-token sentences in a 256-token window: 2..4 blocks of ~15-25% each.
    rng = np.random.default_rng(1)
    counts, fracs = [], []
    for i in range(400):
        lengths = rng.integers(5, 30, size=14)
        blocks = sample_target_sentences(
            torch.as_tensor(lengths), CFG, window_generator(0, 0, "d", i)
        )
        _check_blocks(lengths, blocks, CFG)
        counts.append(len(blocks))
        fracs += [lengths[b].sum() / lengths.sum() for b in blocks]
    assert set(counts) == {2, 3, 4}
    fracs = np.asarray(fracs)
    assert CFG.min_block_frac - 0.02 <= np.median(fracs) <= CFG.max_block_frac + 0.02
    near = (fracs >= CFG.min_block_frac - 0.08) & (fracs <= CFG.max_block_frac + 0.08)
    assert near.mean() > 0.85


def test_tiny_windows_still_get_a_target_and_a_context():
    for lengths in ([5, 5], [1, 100], [100, 1, 1], [7, 7, 7]):
        arr = np.asarray(lengths)
        for seed in range(20):
            blocks = sample_target_sentences(arr, CFG, torch.Generator().manual_seed(seed))
            _check_blocks(arr, blocks, CFG)


def test_same_seed_same_masks_different_seed_different_masks():
    lengths = np.full(20, 12)
    masks = {
        s: sample_target_sentences(lengths, CFG, window_generator(s, 3, "doc", 7)) for s in range(8)
    }
    again = sample_target_sentences(lengths, CFG, window_generator(0, 3, "doc", 7))
    assert again == masks[0]
    assert len({str(m) for m in masks.values()}) > 4
    other_window = sample_target_sentences(lengths, CFG, window_generator(0, 3, "doc", 8))
    other_epoch = sample_target_sentences(lengths, CFG, window_generator(0, 4, "doc", 7))
    assert other_window != masks[0] or other_epoch != masks[0]


def test_mask_indices_partition_the_window_into_whole_sentences():
    lengths = [4, 7, 1, 9, 3, 5]
    offsets = _offsets(lengths)
    m = mask_indices(offsets, [[1, 2], [4]])
    assert m.n_tgt_sents == 3
    assert m.tgt_index.tolist() == list(range(4, 12)) + list(range(21, 24))
    assert m.tgt_sent.tolist() == [0] * 7 + [1] + [2] * 3
    assert m.ctx_index.tolist() == [0, 1, 2, 3] + list(range(12, 21)) + list(range(24, 29))
    assert all(t.dtype == torch.int64 for t in m[:3])


def _windows(rng: np.random.Generator, n: int) -> list[Window]:
    out = []
    for i in range(n):
        lengths = rng.integers(2, 20, size=int(rng.integers(3, 12)))
        offsets = np.asarray(_offsets(lengths))
        tokens = rng.integers(1, 500, size=int(offsets[-1])).astype(np.uint16)
        out.append(Window(f"doc{i}", 1000 + i, 0, tokens, offsets))
    return out


def test_collate_follows_the_batch_contract():
    rng = np.random.default_rng(2)
    windows = _windows(rng, 6)
    masks = [mask_window(w, CFG, seed=0, epoch=0) for w in windows]
    seq_len = 256
    batch = collate(windows, masks, seq_len)
    b = len(windows)
    assert batch["input_ids"].shape == (b, seq_len) and batch["input_ids"].dtype == torch.int64
    for key in ("ctx_index", "tgt_index"):
        assert batch[key].shape[1] % 8 == 0 and batch[key].shape[1] <= seq_len
    s = batch["tgt_sent_valid"].shape[1]
    assert s == max(m.n_tgt_sents for m in masks)
    for i, w in enumerate(windows):
        n = w.n_tokens
        valid = batch["valid"][i]
        assert valid[:n].all() and not valid[n:].any()
        assert torch.equal(batch["input_ids"][i, :n], torch.from_numpy(w.tokens.astype(np.int64)))
        assert (batch["input_ids"][i, n:] == 0).all()
        assert batch["position_ids"][i, :n].tolist() == list(range(n))
        assert (batch["position_ids"][i, n:] == 0).all()
        ctx = batch["ctx_index"][i][batch["ctx_valid"][i]]
        tgt = batch["tgt_index"][i][batch["tgt_valid"][i]]
        assert (batch["ctx_index"][i][~batch["ctx_valid"][i]] == 0).all()
        assert (batch["tgt_index"][i][~batch["tgt_valid"][i]] == 0).all()
        assert torch.all(ctx[1:] > ctx[:-1]) and torch.all(tgt[1:] > tgt[:-1])
        assert set(ctx.tolist()).isdisjoint(tgt.tolist())
        assert sorted(ctx.tolist() + tgt.tolist()) == list(range(n))
        # every target slot is exactly one whole sentence of the window
        slots = batch["tgt_sent"][i][batch["tgt_valid"][i]]
        starts = set(w.offsets[:-1].tolist())
        for slot in range(int(batch["tgt_sent_valid"][i].sum())):
            idx = tgt[slots == slot].tolist()
            assert idx and idx[0] in starts
            k = int(np.searchsorted(w.offsets, idx[0]))
            assert idx == list(range(int(w.offsets[k]), int(w.offsets[k + 1])))
        assert not batch["tgt_sent_valid"][i, masks[i].n_tgt_sents :].any()
    assert batch["doc_index"].tolist() == [1000 + i for i in range(b)]


def test_changing_target_tokens_never_changes_the_context_tokens():
    rng = np.random.default_rng(3)
    windows = _windows(rng, 4)
    masks = [mask_window(w, CFG, seed=1, epoch=0) for w in windows]
    batch = collate(windows, masks, 128)
    ids = batch["input_ids"].clone()
    ctx_before = ids.gather(1, batch["ctx_index"])
    ids.scatter_(1, batch["tgt_index"], 999)  # padding slots point at index 0, a context token
    ids[:, 0] = batch["input_ids"][:, 0]
    assert torch.equal(ids.gather(1, batch["ctx_index"]), ctx_before)


def test_too_short_window_is_refused():
    with pytest.raises(ValueError, match="at least 2 sentences"):
        sample_target_sentences(np.asarray([10]), CFG, torch.Generator())


def test_queries_renumber_every_hidden_sentence_to_k_positions():
    """Sentences of 3, 5, 2, 4 tokens, the second and the fourth hidden, K = 2: the spans are
    3, 2, 2, 2, so the visible tokens sit at 0-2 and 5-6 and the queries at 3-4 and 7-8; a window
    whose hidden sentences are of other lengths gives the predictor the same positions."""
    from lang_jepa.data.masking import collate_rows, renumbered

    def window(lengths: list[int]) -> Window:
        offsets = np.asarray(_offsets(lengths))
        return Window("d", 0, 0, np.arange(1, offsets[-1] + 1, dtype=np.uint16), offsets)

    a, b = window([3, 5, 2, 4]), window([3, 9, 2, 1])
    ma, mb = mask_indices(a.offsets, [[1], [3]]), mask_indices(b.offsets, [[1], [3]])
    ctx_pos, qry_pos = renumbered(a, ma, 2)
    assert ctx_pos.tolist() == [0, 1, 2, 5, 6] and qry_pos.tolist() == [3, 4, 7, 8]
    for packed in (False, True):
        rows = [[(a, ma)], [(b, mb)]] if not packed else [[(a, ma), (b, mb)]]
        batch = collate_rows(rows, 48, packed, queries=2)
        if not packed:
            assert torch.equal(batch["ctx_pos"][0], batch["ctx_pos"][1])
            assert torch.equal(batch["qry_pos"][0], batch["qry_pos"][1])
        v = batch["qry_valid"]
        assert batch["qry_sent"][v].tolist() == (
            [0, 0, 1, 1] * 2 if not packed else [0, 0, 1, 1, 2, 2, 3, 3]
        )
        assert batch["qry_pos"][v].tolist() == [3, 4, 7, 8] * 2
        # the targets are still the hidden sentences' own tokens at their true positions
        assert int(batch["tgt_valid"].sum()) == (5 + 4) + (9 + 1)
    without = collate_rows([[(a, ma)]], 48, False)
    assert "qry_pos" not in without and "ctx_pos" not in without


SPAN = MaskConfig(unit="span", span_min=3, span_max=10, span_frac=0.2)


def _check_spans(lengths: np.ndarray, spans: np.ndarray, cfg: MaskConfig) -> None:
    offsets = np.asarray(_offsets(lengths))
    total = int(offsets[-1])
    sent = np.repeat(np.arange(len(lengths)), lengths)
    hidden = np.zeros(total, dtype=bool)
    assert len(spans) >= 1 and (np.diff(spans[:, 0]) > 0).all(), "spans sorted"
    for start, end in spans.tolist():
        assert 1 <= end - start <= cfg.span_max
        assert sent[start] == sent[end - 1], "a span stays inside its sentence"
        if lengths[sent[start]] > 1:  # some of its sentence stays visible
            assert end - start < lengths[sent[start]]
        assert not hidden[max(start - 1, 0) : end + 1].any(), "spans apart by a visible token"
        hidden[start:end] = True
    budget = min(
        max(1, round(cfg.span_frac * total)), total - int(np.ceil(cfg.min_context_frac * total))
    )
    assert hidden.sum() <= max(budget, 1)
    # every span but the last drawn is at least span_min long (the last may be cut to fit)
    assert (np.sort(spans[:, 1] - spans[:, 0])[1:] >= cfg.span_min).all()


def test_spans_stay_inside_sentences_and_hide_their_share():
    rng = np.random.default_rng(2)
    shares = []
    for i in range(300):
        lengths = rng.integers(4, 40, size=int(rng.integers(2, 12)))
        spans = sample_target_spans(_offsets(lengths), SPAN, window_generator(0, 0, "d", i))
        _check_spans(lengths, spans, SPAN)
        shares.append((spans[:, 1] - spans[:, 0]).sum() / lengths.sum())
    # the windows have room: nearly every one hides its 20% (to the rounding of one token)
    assert np.mean(np.abs(np.asarray(shares) - 0.2) < 0.02) > 0.9


def test_tiny_windows_still_get_a_target_span():
    for lengths in ([1, 1], [2, 1], [1, 30], [3, 3, 3]):
        arr = np.asarray(lengths)
        for seed in range(20):
            spans = sample_target_spans(_offsets(arr), SPAN, torch.Generator().manual_seed(seed))
            _check_spans(arr, spans, SPAN)
            m = span_indices(int(arr.sum()), spans)
            assert len(m.ctx_index) >= 1 and m.n_tgt_sents == len(spans)


def test_span_indices_number_the_spans_as_target_slots():
    m = span_indices(12, np.array([[2, 5], [7, 8]]))
    assert m.n_tgt_sents == 2
    assert m.tgt_index.tolist() == [2, 3, 4, 7]
    assert m.tgt_sent.tolist() == [0, 0, 0, 1]
    assert m.ctx_index.tolist() == [0, 1, 5, 6, 8, 9, 10, 11]


def test_span_masks_are_the_windows_own_and_go_through_the_collate():
    rng = np.random.default_rng(3)
    windows = _windows(rng, 6)
    masks = [mask_window(w, SPAN, 0, 0) for w in windows]
    assert [mask_window(w, SPAN, 0, 0).tgt_index.tolist() for w in windows] == [
        m.tgt_index.tolist() for m in masks
    ]
    batch = collate(windows, masks, 256)
    for row, (w, m) in enumerate(zip(windows, masks, strict=True)):
        sent = np.repeat(np.arange(len(w.offsets) - 1), np.diff(w.offsets))
        n_tgt = len(m.tgt_index)
        slots = batch["tgt_sent"][row, :n_tgt].numpy()
        tokens = batch["tgt_index"][row, :n_tgt].numpy()
        for s in range(m.n_tgt_sents):  # each slot: one contiguous run inside one sentence
            run = tokens[slots == s]
            assert (np.diff(run) == 1).all() and len(set(sent[run])) == 1
        assert int(batch["tgt_sent_valid"][row].sum()) == m.n_tgt_sents
