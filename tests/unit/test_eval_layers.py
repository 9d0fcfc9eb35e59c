"""Layer-wise scores (python -m lang_jepa.eval.layers) and the all-layers encoding they rest on."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lang_jepa.config import load_config
from lang_jepa.encoder_api import TOKENIZER_DIR, Encoder
from lang_jepa.eval import layers
from lang_jepa.eval.tasks import (
    EncoderEmbedder,
    lee_scores,
    lee_similarity,
    rotten_tomatoes,
    sentiment_probe,
)
from lang_jepa.export import export_random_init
from lang_jepa.models import TextEncoder, encoder_config
from lang_jepa.runinfo import git_revision

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


@pytest.mark.parametrize(
    "arch, pos", [("pre_ln", "rope"), ("pre_ln", "learned"), ("bert", "learned")]
)
def test_hidden_states_are_the_blocks_outputs_and_end_with_forward(arch, pos):
    torch.manual_seed(0)
    model = TextEncoder(50, 16, 3, 2, max_len=12, pos=pos, arch=arch).eval()
    ids = torch.randint(0, 50, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 7:] = False  # a padded window
    with torch.no_grad():
        states = model.hidden_states(ids, positions, valid)
        blocks = model.top_layers(ids, positions, valid, None, 3, "block")
        out = model(ids, positions, valid)
    assert len(states) == 3 + 2
    for got, want in zip(states[1:-1], blocks, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(states[-1], out, rtol=0, atol=0)


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
    argv = [f"seed3={export}", "--random", "3", "--rt-limit", "300", "--out", str(out)]
    assert layers.main(argv) == 0
    result = json.loads((out / "layers.json").read_text())
    settings = result["settings"]
    assert settings["rt_snippets"] == 300 and settings["commit"] == git_revision()
    assert settings["date"] == time.strftime("%Y-%m-%d") and " cores, AVX2 " in settings["machine"]
    rows = result["encoders"]
    assert list(rows) == ["seed3", "random-s3"]
    enc = Encoder.from_pretrained(export, device="cpu")
    suite = lee_similarity(EncoderEmbedder(enc, "model"))
    final = rows["seed3"]["final"]
    assert final["lee_spearman"] == pytest.approx(suite["spearman"], abs=1e-6)
    assert final["lee_spearman_whitened"] == pytest.approx(suite["spearman_whitened"], abs=1e-6)
    rt = rotten_tomatoes(limit=300)
    assert final["rt_accuracy"] == sentiment_probe(EncoderEmbedder(enc, "model"), *rt)["accuracy"]
    # the export is the seed-3 random init, so the two encoders score alike in every view
    for view, row in rows["seed3"].items():
        for key, value in row.items():
            assert rows["random-s3"][view][key] == pytest.approx(value, abs=1e-6), (view, key)
        assert 0.0 <= row["rt_accuracy"] <= 1.0
    table = capsys.readouterr().out
    assert table.count("| random-s3 |") == 2 + len(enc.model.stack.blocks) + 1
    assert (out / "layers.md").read_text().startswith(table)
    assert f"commit {git_revision()[:12]}" in (out / "layers.md").read_text()


def test_bad_inputs_get_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="50 Lee document embeddings, got 3"):
        lee_scores(np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(SystemExit):
        layers.main([str(tmp_path), "--no-rt"])
    assert f"{tmp_path}: not an export directory (no config.json)" in capsys.readouterr().err
