"""Damaged, missing and out-of-vocabulary shards are refused, naming the shard, before their
samples reach the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lang_jepa.data.reader import _VERIFIED, document_windows, split_shards
from lang_jepa.data.windows import WindowCounters
from lang_jepa.shards import MANIFEST_NAME, ShardFormatError, check_shard_files


@pytest.fixture
def shards(tiny_shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    _VERIFIED.clear()  # this process has not opened these copies yet
    return out


def windows(shard_dir: Path, verify: bool = True) -> list:
    return list(document_windows(split_shards(shard_dir, "train", verify), 64, 1, WindowCounters()))


def test_bytes_changed_inside_a_sample_are_caught_by_the_sha256(shards: Path) -> None:
    windows(shards)  # intact: reads
    _VERIFIED.clear()
    shard = shards / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[4096 : 4096 + 1024] = bytes(range(256)) * 4  # 1 KB inside a sample's tokens.npy
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=r"train-000002\.tar: sha256 .* differs"):
        windows(shards)


def test_ids_outside_the_vocabulary_are_caught_naming_the_sample(shards: Path) -> None:
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    manifest["tokenizer"]["vocab_size"] = 1000  # the real ids go up to ~30k
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(
        ShardFormatError, match=r"shard .*train-00000\d\.tar, sample .*>= the vocabulary size 1000"
    ):
        windows(shards)
    assert windows(shards, verify=False)  # data.verify_shards=false reads them unchecked


def test_a_missing_or_resized_shard_is_found_at_start_up(shards: Path) -> None:
    check_shard_files(shards)  # intact
    (shards / "val-000000.tar").unlink()
    with pytest.raises(ShardFormatError, match=r"val-000000\.tar is missing"):
        check_shard_files(shards)
    shutil.copy(shards / "train-000000.tar", shards / "val-000000.tar")
    with pytest.raises(ShardFormatError, match=r"val-000000\.tar has \d+ bytes, the manifest says"):
        check_shard_files(shards)
