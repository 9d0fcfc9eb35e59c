"""Windows: whole consecutive sentences of one document, <= seq_len, long sentences cut and
counted, short windows skipped and counted."""

from __future__ import annotations

import numpy as np

from lang_jepa.data.windows import WindowCounters, cut_windows, split_long_sentences, stable_hash63


def _doc(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    sents = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    return np.arange(int(sents[-1]), dtype=np.uint16), sents


def test_windows_hold_whole_consecutive_sentences_and_cover_the_document():
    rng = np.random.default_rng(0)
    for trial in range(50):
        lengths = rng.integers(1, 30, size=int(rng.integers(1, 80))).tolist()
        tokens, sents = _doc(lengths)
        counters = WindowCounters()
        seq_len = int(rng.integers(30, 120))
        windows = cut_windows(tokens, sents, seq_len, 1, f"d{trial}", counters=counters)
        boundaries = set(sents.tolist())
        pos = 0
        for i, w in enumerate(windows):
            assert w.index == i and w.n_tokens <= seq_len
            start = int(w.tokens[0])  # tokens are their own positions in the document
            assert start == pos and start in boundaries
            assert {start + o for o in w.offsets.tolist()} <= boundaries
            assert np.array_equal(w.tokens, tokens[start : start + w.n_tokens])
            pos += w.n_tokens
        assert pos == len(tokens) and counters.windows == len(windows)
        assert counters.short_windows == 0 and counters.window_tokens == len(tokens)


def test_greedy_windows_are_full_up_to_the_next_sentence():
    lengths = [10] * 25
    tokens, sents = _doc(lengths)
    windows = cut_windows(tokens, sents, 64, 1, "d")
    assert [w.n_sentences for w in windows] == [6, 6, 6, 6, 1]


def test_long_sentences_are_cut_into_pieces_and_counted():
    tokens, sents = _doc([5, 130, 7, 64, 65])
    offsets, n_long, n_pieces = split_long_sentences(sents, 64)
    assert offsets.tolist() == [0, 5, 69, 133, 135, 142, 206, 270, 271]
    assert (n_long, n_pieces) == (2, 5)
    counters = WindowCounters()
    windows = cut_windows(tokens, sents, 64, 1, "d", counters=counters)
    assert all(w.n_tokens <= 64 for w in windows)
    assert sum(w.n_tokens for w in windows) == len(tokens)
    assert counters.long_sentences == 2 and counters.long_sentence_pieces == 5


def test_short_windows_are_skipped_and_counted():
    tokens, sents = _doc([10, 10, 10, 60, 10])  # windows: [10,10,10] [60] [10]
    counters = WindowCounters()
    windows = cut_windows(tokens, sents, 64, 2, "d", counters=counters)
    assert [w.n_sentences for w in windows] == [3]
    assert counters.short_windows == 2 and counters.short_window_tokens == 70
    assert counters.windows == 1 and counters.docs == 1 and counters.sentences == 5


def test_document_hash_is_stable_and_63_bit():
    assert stable_hash63("SOTU-1790") == stable_hash63("SOTU-1790")
    assert stable_hash63("a") != stable_hash63("b")
    assert 0 <= stable_hash63("x", 1, 2) < 2**63
    tokens, sents = _doc([5, 5, 5])
    (w,) = cut_windows(tokens, sents, 64, 1, "SOTU-1790")
    assert w.doc_index == stable_hash63("SOTU-1790")
