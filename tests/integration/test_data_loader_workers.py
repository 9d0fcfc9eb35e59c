"""Loader resume with DataLoader worker processes (2 per rank); the in-process cases are in
tests/unit/test_data_loader.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import check_resume_gives_exactly_the_next_batches

pytestmark = pytest.mark.processes


@pytest.mark.parametrize(("own_state", "packing"), [(True, True), (False, True), (False, False)])
def test_resume_with_two_workers_gives_exactly_the_next_batches(
    synthetic_shards: Path, own_state: bool, packing: bool
):
    check_resume_gives_exactly_the_next_batches(synthetic_shards, 2, own_state, packing)
