"""Which checkpoint a start resumes from (``train.resume``), and what pruning may delete, on
checkpoint directories laid out as ``checkpoint.save`` leaves them (meta.json written last)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lang_jepa.checkpoint import CheckpointError, _prune, complete_tags, resolve_resume, tag_for


def make(ckpt_dir: Path, step: int, sequence: str | None = "a", complete: bool = True) -> str:
    tag = tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    if complete:
        meta = {"step": step, "config": {}, "sequence": sequence}
        (ckpt_dir / tag / "meta.json").write_text(json.dumps(meta))
    return tag


def test_a_new_run_directory_starts_afresh(tmp_path):
    assert resolve_resume("auto", tmp_path / "checkpoints") is None
    (tmp_path / "checkpoints").mkdir()
    assert resolve_resume("auto", tmp_path / "checkpoints") is None


def test_latest_names_the_checkpoint(tmp_path):
    make(tmp_path, 5)
    (tmp_path / "latest").write_text("step00000005\n")
    assert resolve_resume("auto", tmp_path) == (tmp_path, "step00000005")
    assert resolve_resume("none", tmp_path) is None


@pytest.mark.parametrize("latest", [None, b"", b"  \n", b"\xff\xfe", b"../../etc", b"step00000099"])
def test_checkpoints_without_a_usable_latest_are_never_restarted(tmp_path, latest):
    make(tmp_path, 5)
    make(tmp_path, 10)
    make(tmp_path, 15, complete=False)  # died while writing: not the one to resume
    if latest is not None:
        (tmp_path / "latest").write_bytes(latest)
    with pytest.raises(CheckpointError) as err:
        resolve_resume("auto", tmp_path)
    msg = str(err.value)
    newest = tmp_path / "step00000010"
    assert msg.startswith(f"{tmp_path} holds ")
    assert (
        f"newest complete checkpoint is {newest}: resume from it with train.resume={newest}" in msg
    )
    assert "train.resume=none" in msg
    assert complete_tags(tmp_path) == ["step00000005", "step00000010"]


def test_no_complete_checkpoint_is_said(tmp_path):
    make(tmp_path, 5, complete=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint is there"):
        resolve_resume("auto", tmp_path)


def test_pruning_keeps_newer_foreign_and_unreadable_checkpoints(tmp_path):
    for step in (1, 2, 3):
        make(tmp_path, step)  # this run's sequence "a", older
    make(tmp_path, 4, sequence="b")  # another run's
    make(tmp_path, 5, complete=False)  # cannot be attributed
    make(tmp_path, 9)  # newer than the one being written
    current = make(tmp_path, 6)
    _prune(tmp_path, 2, current, "a")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [tag_for(s) for s in (3, 4, 5, 6, 9)]
    _prune(tmp_path, 1, current, "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(s) for s in (4, 5, 6, 9)]
    _prune(tmp_path, 0, current, "a")  # keep 0: keep everything
    assert len(list(tmp_path.iterdir())) == 4
