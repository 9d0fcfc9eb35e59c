"""The committed experiment files and their recorded cells agree with the code.

docs/experiments.md's tables are built from ``experiments/results/NAME/cells/*.json``; the harness
takes a recorded cell as done only while its fingerprint (the resolved config, defaults included)
is the one the code gives that variant now. A default changed without an inert value, a variant
renamed or an override that no longer validates would silently turn a committed table into one
the harness cannot reproduce: each of these fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lang_jepa.experiment.spec import load_experiment
from tests.helpers import REPO

EXPERIMENT_FILES = sorted((REPO / "experiments").glob("*.yaml"))


def test_there_are_experiment_files_with_records():
    assert EXPERIMENT_FILES, "no experiments/*.yaml"
    recorded = list((REPO / "experiments" / "results").glob("*/cells/*.json"))
    assert recorded, "no recorded cells under experiments/results"


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.name)
def test_every_recorded_cell_is_a_current_variant_with_its_fingerprint(path: Path):
    exp = load_experiment(path)  # every variant's config resolves and validates
    cells = {cell.name: cell for cell in exp.all_cells}
    assert exp.record_dir is not None
    for record in sorted((exp.record_dir / "cells").glob("*.json")):
        result = json.loads(record.read_text())
        cell = cells.get(record.stem)
        assert cell is not None, f"{record}: no variant x seed {record.stem} in {path.name}"
        assert (result["variant"], result["seed"]) == (cell.variant.name, cell.seed), record
        assert result["fingerprint"] == cell.fingerprint(exp.spec), (
            f"{record}: recorded with another config than {path.name} now gives "
            f"{cell.variant.name} (a changed default needs an entry in config.INERT_DEFAULTS, "
            "or the cell rerun)"
        )
