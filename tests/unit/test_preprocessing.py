"""Preprocessing end to end: the real tokenizer, real shards read back with webdataset."""

from __future__ import annotations

import json
import os
import re
import time

import blingfire
import numpy as np
import pytest

from preprocessing.build_shards import main as build
from preprocessing.inspect import main as inspect_main
from preprocessing.textproc import SENTENCE_MARK, Processor, split_sentences
from tests.helpers import check_counts, read_back

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.mark.slow
def test_splitter_equals_blingfire_reference(demo_raw):
    texts = [p.read_text(encoding="utf-8") for p in sorted(demo_raw.glob("*.txt"))]
    texts += [
        "我们今天很高兴。这是一个测试！😀 Emoji here. 日本語の文章です。",
        "Ünïcödé ends é. Next 🎉.",
    ]
    for text in texts:
        _, spans = blingfire.text_to_sentences_and_offsets(text)
        assert split_sentences(text) == [text[a:b] for a, b in spans]


def test_one_encode_call_equals_sentence_by_sentence(demo_raw, tok):
    proc = Processor(tok.backend_tokenizer.to_str(), "uint16", 10**6, 10**7)
    texts = [p.read_text(encoding="utf-8") for p in sorted(demo_raw.glob("*.txt"))[:30]]
    texts += [f"A marker {SENTENCE_MARK} inside. Still fine.", "Ünïcödé 😀. 中文句子。"]
    for text, out in zip(texts, proc.process(texts), strict=True):
        ids, lengths = proc._encode_each(split_sentences(text))
        tokens, sents = out.chunks[0]
        assert np.array_equal(tokens, ids) and np.array_equal(np.diff(sents), lengths[lengths > 0])


def test_long_documents_are_chunked_at_sentence_boundaries(tiny_shards, demo_raw, tmp_path):
    files = sorted(demo_raw.glob("*.txt"))[:3]
    out = tmp_path / "chunks"
    argv = ["--input", *map(str, files), "--output", str(out), "--max-chunk-tokens", "500"]
    assert build([*argv, "--workers", "0", "--quiet", "--val-fraction", "0"]) == 0
    manifest = check_counts(out)
    samples = read_back(out)["train"]
    assert manifest["stats"]["chunked_documents"] == 3 and len(samples) > 6
    assert all(len(s["tokens.npy"]) <= 500 for s in samples)
    first = [s for s in samples if s["json"]["doc_id"] == files[0].name]
    assert [s["json"]["id"] for s in first] == [f"{files[0].name}#{k}" for k in range(len(first))]
    whole = read_back(tiny_shards)["train"][0]
    assert whole["json"]["id"] == files[0].name
    assert np.array_equal(np.concatenate([s["tokens.npy"] for s in first]), whole["tokens.npy"])


def test_tiny_shards_fixture_shape(tiny_shards):
    manifest = check_counts(tiny_shards)
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 4, 4, 2]
    assert manifest["splits"]["val"]["samples"] == 2
    assert manifest["tokenizer"]["vocab_size"] == 30522
    from transformers import AutoTokenizer

    from lang_jepa.shards import tokenizer_fingerprint

    saved = AutoTokenizer.from_pretrained(str(tiny_shards / "tokenizer"))
    assert tokenizer_fingerprint(saved) == manifest["tokenizer"]["sha256"]


def test_resume_refuses_other_settings(demo_raw, tmp_path):
    files = [str(p) for p in sorted(demo_raw.glob("*.txt"))[:10]]
    argv = ["--input", *files, "--output", str(tmp_path), "--shard-docs", "2", "--quiet"]
    assert build([*argv, "--workers", "0", "--stop-after-shards", "1"]) == 3
    assert build([*argv, "--workers", "0", "--max-sentence-tokens", "64"]) == 2


def test_hf_dataset_fails_fast_offline(tmp_path, monkeypatch, capsys):
    argv = ["--hf-dataset", "HuggingFaceFW/fineweb-edu", "--hf-name", "sample-10BT"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert build([*argv, "--output", str(tmp_path / "a")]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    t0 = time.monotonic()
    rc = build([*argv, "--output", str(tmp_path / "b")])
    err = capsys.readouterr().err
    if rc == 0:
        pytest.skip("this machine reaches the Hugging Face hub")
    assert rc == 2 and time.monotonic() - t0 < 15 and "--hf-dataset" in err
    assert not (tmp_path / "b").exists()


def test_inspect_prints_statistics_and_sentences(tiny_shards, capsys):
    assert inspect_main([str(tiny_shards), "--docs", "1", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "skipped: none" in out and "1800_john_adams_f.txt" in out
    assert re.search(r"\[  0\]\s+\d+ tok \| \w", out)
    json.loads((tiny_shards / "manifest.json").read_text())
