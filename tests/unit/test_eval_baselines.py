"""Evaluation data and reference baselines: Lee50 with its human ratings, all-MiniLM-L6-v2's known
score, TF-IDF, and the Rotten Tomatoes csv from ``make eval-data``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lang_jepa.eval import fetch_data
from lang_jepa.eval.tasks import (
    MiniLMEmbedder,
    MissingData,
    TfidfEmbedder,
    encoder_health,
    lee_corpus,
    lee_similarity,
    rotten_tomatoes,
    sentiment_probe,
)

REPO = Path(__file__).resolve().parents[2]
EVAL_DATA = REPO / "data" / "eval"


def test_lee_corpus_and_human_ratings_ship_with_gensim() -> None:
    docs, sims = lee_corpus()
    assert len(docs) == 50 and sims.shape == (50, 50)
    assert np.allclose(np.diag(sims), 1.0)
    iu = np.triu_indices(50, k=1)
    assert len(iu[0]) == 1225 and sims[iu].min() >= 0.0 and sims[iu].max() <= 1.0


def test_minilm_scores_its_published_lee50_spearman() -> None:
    """all-MiniLM-L6-v2 (offline, from the gt package) gives rho ~ 0.51 on Lee50 when measured here."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rho = lee_similarity(MiniLMEmbedder())["spearman"]
    assert rho == pytest.approx(0.51, abs=0.02)


def test_tfidf_baseline_is_well_above_chance_on_lee50() -> None:
    emb = TfidfEmbedder()
    assert lee_similarity(emb)["spearman"] > 0.2
    h = encoder_health(emb)
    assert h["effective_rank_frac"] > 0.5 and 0.0 < h["alignment"] <= 4.0


def test_missing_rt_data_names_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(MissingData, match="make eval-data"):
        rotten_tomatoes(tmp_path)


@pytest.fixture(scope="module")
def rt_data() -> Path:
    if not (EVAL_DATA / fetch_data.FILENAME).is_file():
        pytest.skip(f"{EVAL_DATA / fetch_data.FILENAME} missing: run `make eval-data`")
    return EVAL_DATA


def test_rt_csv_is_the_pinned_file_with_12808_labelled_snippets(rt_data: Path) -> None:
    assert fetch_data.sha256_of(rt_data / fetch_data.FILENAME) == fetch_data.SHA256
    texts, labels = rotten_tomatoes(rt_data)
    assert len(texts) == 12808 and int(labels.sum()) == 7403  # 7403 fresh, 5405 rotten
    sub_texts, sub_labels = rotten_tomatoes(rt_data, limit=1000, seed=0)
    assert len(sub_texts) == 1000 and abs(sub_labels.mean() - labels.mean()) < 0.01


def test_tfidf_probe_on_rt_beats_the_majority_class(rt_data: Path) -> None:
    texts, labels = rotten_tomatoes(rt_data, limit=2000, seed=0)
    res = sentiment_probe(TfidfEmbedder(), texts, labels)
    assert res["accuracy"] > res["chance"] + 0.03
