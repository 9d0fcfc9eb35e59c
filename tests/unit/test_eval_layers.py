"""Layer-wise scores (python -m lang_jepa.eval.layers) and the all-layers encoding they rest on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lang_jepa.config import load_config
from lang_jepa.encoder_api import TOKENIZER_DIR, Encoder
from lang_jepa.eval import layers
from lang_jepa.eval.tasks import EncoderEmbedder, lee_scores, lee_similarity
from lang_jepa.export import export_random_init
from lang_jepa.models import encoder_config

TEXTS = ["The Congress met in December. Taxes were the first question.",
         "Peace with the western tribes was made. The treaty holds."]  # fmt: skip


@pytest.fixture(scope="module")
def export(tiny_shards, tmp_path_factory):
    cfg = load_config("tiny", [f"data.shards={tiny_shards}"])
    out = tmp_path_factory.mktemp("layers") / "export"
    return export_random_init(encoder_config(cfg.model, 30522), 30522,
                              tiny_shards / TOKENIZER_DIR, out, seed=3)  # fmt: skip


def test_all_layers_pool_every_hidden_state_and_end_with_the_embedding(export):
    enc = Encoder.from_pretrained(export, device="cpu")
    depth = len(enc.model.stack.blocks)
    for level in ("document", "sentence"):
        plain = enc.encode(TEXTS, level=level)
        every = enc.encode(TEXTS, level=level, all_layers=True)
        assert every.shape == (len(TEXTS), depth + 2, enc.dim)
        torch.testing.assert_close(every[:, -1], plain, rtol=0, atol=0)
    # the first state is the mean of the texts' word vectors (positions are rotary, so the
    # embedding output is the token embedding itself)
    ids, _ = enc.tokenize_document(TEXTS[0])
    bag = enc.model.tok_emb.weight[torch.from_numpy(ids)].mean(0)
    first = enc.encode(TEXTS[:1], level="document", all_layers=True)[0, 0]
    torch.testing.assert_close(first, bag.detach())


def test_layer_views_name_every_state_and_the_first_last_mean():
    pooled = torch.randn(5, 4, 8)  # depth 2
    views = layers.layer_views(pooled)
    assert list(views) == ["embeddings", "block1", "block2", "final", "first_last"]
    torch.testing.assert_close(views["block2"], pooled[:, 2])
    expected = (F.layer_norm(pooled[:, 0], (8,)) + pooled[:, 3]) / 2
    torch.testing.assert_close(views["first_last"], expected)
    with pytest.raises(ValueError, match="depth \\+ 2"):
        layers.layer_views(torch.randn(5, 8))


def test_cli_scores_each_view_and_its_final_row_is_the_suite_s(export, tmp_path, capsys):
    out = tmp_path / "out"
    assert layers.main([str(export), "--random", "3", "--rt-limit", "300", "--out", str(out)]) == 0
    result = json.loads((out / "layers.json").read_text())
    assert result["settings"]["rt_snippets"] == 300
    assert "AVX2" in result["settings"]["machine"] and result["settings"]["commit"]
    rows = result["encoders"]
    assert list(rows) == [str(export), "random-s3"]
    enc = Encoder.from_pretrained(export, device="cpu")
    suite = lee_similarity(EncoderEmbedder(enc, "model"))
    final = rows[str(export)]["final"]
    assert final["lee_spearman"] == pytest.approx(suite["spearman"], abs=1e-6)
    assert final["lee_spearman_whitened"] == pytest.approx(suite["spearman_whitened"], abs=1e-6)
    # the export is the seed-3 random init, so the two encoders score alike in every view
    for view, row in rows[str(export)].items():
        for key, value in row.items():
            assert rows["random-s3"][view][key] == pytest.approx(value, abs=1e-6), (view, key)
        assert 0.0 <= row["rt_accuracy"] <= 1.0
    table = (out / "layers.md").read_text()
    assert table == capsys.readouterr().out
    assert table.count("| random-s3 |") == 2 + len(enc.model.stack.blocks) + 1


def test_bad_inputs_get_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="50 Lee document embeddings, got 3"):
        lee_scores(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(SystemExit):
        layers.main([str(tmp_path), "--no-rt"])
    assert f"{tmp_path}: not an export directory (no config.json)" in capsys.readouterr().err
