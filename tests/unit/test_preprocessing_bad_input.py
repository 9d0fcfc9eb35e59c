"""Bad input: every document is written or counted under a named reason, nothing crashes."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from preprocessing.build_shards import main as build
from tests.helpers import build_and_read

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "mountain",
    "quiet",
    "report",
    "budget",
    "nation",
]


def prose(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(n)]


def test_text_files_of_every_kind(tmp_path):
    files = {
        "empty.txt": b"",
        "blank.txt": b"  \n\t \r\n ",
        "bad_utf8.txt": b"Hello world. Some \xff\xfe bytes are broken here. Fine after that.",
        "binary.txt": bytes(range(256)) * 40,
        "cjk_emoji.txt": "我们今天很高兴。这是一个测试！😀 Emoji sentence. 日本語の文章です。".encode(),
        "dup_a.txt": b"The same text twice. Word for word.",
        "dup_b.txt": b"The same text twice. Word for word.",
        "controls.txt": "\u200b\u0007\u0001".encode(),
        "good.txt": " ".join(prose(5)).encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    m = build_and_read(tmp_path, [tmp_path / n for n in files])
    assert m["documents"]["read"] == 9
    assert m["documents"]["skipped"] == {
        "binary": 1, "duplicate": 1, "empty": 2, "no_tokens": 1,
    }  # fmt: skip
    assert m["stats"]["repaired"] == {"invalid_utf8": 1}
    ids = {s["json"]["id"] for s in m["_samples"]}
    assert ids == {"bad_utf8.txt", "cjk_emoji.txt", "dup_a.txt", "good.txt"}
    cjk = next(s for s in m["_samples"] if s["json"]["id"] == "cjk_emoji.txt")
    assert len(cjk["sents.npy"]) - 1 >= 3


def test_ten_megabyte_line_without_punctuation(tmp_path):
    rng = random.Random(1)
    line = " ".join(rng.choice(WORDS) for _ in range(1_700_000))[: 10 * 2**20]
    (tmp_path / "huge.txt").write_text(line)
    m = build_and_read(tmp_path, [tmp_path / "huge.txt"], "--max-sentence-tokens", "128")
    assert m["documents"]["written"] == 1 and m["stats"]["sentences_cut"] >= 10
    assert m["stats"]["chunked_documents"] == 1  # > 65536 tokens: cut into chunks
    for s in m["_samples"]:
        assert np.diff(s["sents.npy"]).max() <= 128
    assert sum(len(s["tokens.npy"]) for s in m["_samples"]) > 1_500_000


def write_jsonl(path: Path, records: list, opener=open) -> None:
    with opener(path, "wt") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_jsonl_records_ids_and_bad_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [
        {"text": "First doc. Two sentences.", "id": "own-1"},
        {"text": "No id here. Position is used."},
        {"content": "wrong key"},
        {"text": None},
        "{not json",
        "[1, 2]",
        {"text": "   "},
        {"text": "Lone \ud800 surrogate. Still written.", "id": 7},
    ])  # fmt: skip
    m = build_and_read(tmp_path, [path])
    assert m["documents"]["read"] == 8 and m["documents"]["written"] == 3
    assert m["documents"]["skipped"] == {"empty": 1, "invalid_json": 2, "missing_text": 2}
    assert m["stats"]["repaired"] == {"lone_surrogates": 1}
    assert [s["json"]["id"] for s in m["_samples"]] == ["own-1", "a.jsonl:2", "7"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_jsonl(tmp_path, suffix):
    records = [{"text": p, "id": i} for i, p in enumerate(prose(3000, seed=2))]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if suffix == ".jsonl.gz":
        packed = gzip.compress(data)
    else:
        packed = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(packed[: len(packed) // 2])
    m = build_and_read(tmp_path, [path])
    docs = m["documents"]
    assert docs["skipped"] == {"truncated_file": 1}
    assert 500 < docs["written"] < 3000 and docs["read"] == docs["written"] + 1
    assert [e["file"] for e in m["stats"]["file_errors"]] == [str(path)]
    assert [s["json"]["id"] for s in m["_samples"]] == [str(i) for i in range(docs["written"])]


def test_parquet_like_fineweb(tmp_path):
    texts = prose(40, seed=3)
    table = pa.table({
        "text": [*texts, None],
        "id": [f"<urn:uuid:{i}>" for i in range(41)],
        "url": ["https://example.org"] * 41,
        "score": [3.1] * 41,
    })  # fmt: skip
    path = tmp_path / "000_00000.parquet"
    pq.write_table(table, path, row_group_size=7)
    m = build_and_read(tmp_path, [path])
    assert m["documents"]["written"] == 40 and m["documents"]["skipped"] == {"missing_text": 1}
    assert m["_samples"][3]["json"]["id"] == "<urn:uuid:3>"


def test_missing_input_names_it(tmp_path, capsys):
    missing = tmp_path / "nope" / "*.jsonl"
    assert build(["--input", str(missing), "--output", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
