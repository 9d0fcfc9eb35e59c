"""experiments/copy_ceiling.py: the copy baselines in any export's space, on real val windows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lang_jepa.config import load_config
from lang_jepa.encoder_api import TOKENIZER_DIR
from lang_jepa.export import export_random_init
from lang_jepa.models import encoder_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import copy_ceiling  # noqa: E402


def test_copy_ceiling_of_a_random_export(tiny_shards, tmp_path, capsys):
    cfg = load_config("tiny", [f"data.shards={tiny_shards}"])
    export = export_random_init(encoder_config(cfg.model, 30522), 30522,
                                tiny_shards / TOKENIZER_DIR, tmp_path / "export", seed=0)  # fmt: skip
    out = tmp_path / "ceiling.json"
    assert copy_ceiling.main([str(export), "--shards", str(tiny_shards), "--batches", "2",
                              "--json", str(out)]) == 0  # fmt: skip
    (r,) = json.loads(out.read_text())
    assert 1 <= r["batches"] <= 2  # the tiny val split may hold fewer windows
    # in-document, the copied visible sentence is itself a candidate at cosine 1: the hidden
    # sentence can rank first only on a tie, so a copy scores at most 1/2
    assert r["copy_neighbour_in_doc_mrr"] <= 0.5 + 1e-6
    # the windows' hidden sentences mostly differ in length: length alone is far above chance
    assert r["length_in_window_mrr"] > r["chance_in_window_mrr"] + 0.1
    for key in ("copy_neighbour", "copy_context", "length", "chance"):
        assert 0 < r[f"{key}_in_window_mrr"] <= 1 and 0 < r[f"{key}_in_doc_mrr"] <= 1
    assert str(export) in capsys.readouterr().out  # the markdown table names the export
