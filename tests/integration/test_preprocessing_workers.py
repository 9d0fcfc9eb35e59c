"""Preprocessing with worker processes (the pool behind ``--workers N``, N >= 1) and the Slurm
array script; the in-process (``--workers 0``) tests are in tests/unit/test_preprocessing*.py."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lang_jepa.sentences import split_sentences
from lang_jepa.shards import load_manifest
from preprocessing.build_shards import main as build
from tests.helpers import REPO, build_and_read, check_counts, read_back

pytestmark = pytest.mark.processes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def test_unreadable_file_stops_the_run_unless_skipped(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip at all")
    good = tmp_path / "good.txt"
    good.write_text("A fine document. It has words.")
    out = tmp_path / "stop"
    assert build(["--input", str(bad), str(good), "--output", str(out), "--quiet"]) == 2
    assert str(bad) in capsys.readouterr().err
    m = build_and_read(tmp_path, [bad, good], "--skip-bad-files")
    assert m["documents"] == {"read": 2, "written": 1, "skipped": {"unreadable_file": 1}}
