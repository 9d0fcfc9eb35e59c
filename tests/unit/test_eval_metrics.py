"""Evaluation metrics on constructed inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lang_jepa.eval.metrics import (
    alignment,
    effective_rank,
    health,
    probe_accuracy,
    retrieval,
    retrieval_from_scores,
    spearman,
    uniformity,
)
from lang_jepa.eval.output import predictor_verdict
from lang_jepa.eval.predictor import _copy_neighbour


def _harmonic(n: int) -> float:
    return sum(1.0 / r for r in range(1, n + 1))


def test_perfect_predictor_retrieves_everything() -> None:
    z = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    r = retrieval(z * 3.0, z).summary()  # scale does not matter to cosine
    assert r["top1"] == r["top5"] == r["mrr"] == 1.0
    assert r["mean_rank"] == 1.0
    assert r["chance_top1"] == pytest.approx(1 / 20)


def test_identical_embeddings_give_exactly_chance() -> None:
    n = 12
    cands = torch.ones(n, 8)
    r = retrieval(torch.randn(n, 8), cands).summary()
    assert r["top1"] == pytest.approx(1 / n) == pytest.approx(r["chance_top1"])
    assert r["top5"] == pytest.approx(5 / n) == pytest.approx(r["chance_top5"])
    assert r["mrr"] == pytest.approx(_harmonic(n) / n) == pytest.approx(r["chance_mrr"])
    assert r["mean_rank"] == pytest.approx((n + 1) / 2)


def test_known_ranks_ties_and_masked_candidates() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.9, 0.5, 0.5, 0.0], [0.2, 0.3, 0.9, 0.1]])
    correct = torch.tensor([0, 1, 0])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    r = retrieval_from_scores(scores, correct, valid)
    # query 0: rank 1; query 1: one better, one tie -> rank 2 or 3; query 2: 0.9 is masked -> rank 2
    assert r.top1.tolist() == [1.0, 0.0, 0.0]
    assert r.rank.tolist() == [1.0, 2.5, 2.0]
    assert r.rr.tolist() == pytest.approx([1.0, (1 / 2 + 1 / 3) / 2, 0.5])
    assert r.n_candidates.tolist() == [4, 4, 3]
    assert r.chance_top1.tolist() == pytest.approx([0.25, 0.25, 1 / 3])


def test_effective_rank() -> None:
    assert effective_rank(torch.ones(50, 32)) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.eye(16)) == pytest.approx(16.0, rel=1e-4)
    low = torch.randn(200, 3) @ torch.randn(3, 64)  # rank-3 data
    assert effective_rank(low) <= 3.0 + 1e-3


def test_spearman_known_rankings() -> None:
    x = [1, 2, 3, 4, 5]
    assert spearman(x, [10, 20, 30, 40, 1000]) == pytest.approx(1.0)
    assert spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman(x, [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert math.isnan(spearman(x, [1, 1, 1, 1, 1]))


def test_probe_on_separable_and_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    feats = rng.normal(size=(400, 10)) + labels[:, None] * 6.0
    sep = probe_accuracy(feats, labels, seed=0)
    assert sep["accuracy"] == 1.0 and sep["chance"] == 0.5 and sep["n_test"] == 80
    noise = probe_accuracy(rng.normal(size=(400, 10)), rng.permutation(labels), seed=0)
    assert abs(noise["accuracy"] - 0.5) < 0.15
    again = probe_accuracy(feats, labels, seed=0)
    assert again == sep  # fixed seeded split


def test_alignment_uniformity_and_health_of_a_collapsed_set() -> None:
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    assert alignment(z, 2 * z) == pytest.approx(0.0, abs=1e-6)
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-5)
    assert uniformity(torch.ones(10, 4)) == pytest.approx(0.0, abs=1e-6)
    assert uniformity(z) < -1.0
    h = health(torch.ones(30, 8) + 1e-9 * torch.randn(30, 8))
    assert h["effective_rank"] == pytest.approx(1.0, abs=1e-2)
    assert h["dim_std_normalized"] < 1e-6


def test_copy_neighbour_takes_the_nearest_visible_sentence() -> None:
    emb = torch.arange(5, dtype=torch.float32)[None, :, None].expand(1, 5, 2)  # sentence j -> j
    sent_valid = torch.ones(1, 5, dtype=torch.bool)
    slot_sentence = torch.tensor([[0, 1, 3]])  # visible: 2, 4
    out = _copy_neighbour(emb, sent_valid, slot_sentence)
    assert out[0, :, 0].tolist() == [
        2.0,
        2.0,
        2.0,
    ]  # 0 and 1 -> next visible (2); 3 -> previous (2)


def test_verdict_needs_beating_the_copy_baselines_and_chance() -> None:
    def method(mrr: float) -> dict[str, float]:
        return {"within_doc_mrr": mrr, "within_doc_chance_mrr": 0.4}

    pred = {"methods": {"model": method(0.9), "copy_context": method(0.5), "copy_neighbour": method(0.6)},
            "shuffled_loss_ratio": 2.0}  # fmt: skip
    assert "-> beats them" in predictor_verdict(pred)
    assert "uses the context" in predictor_verdict(pred)
    pred["methods"]["model"] = method(0.55)
    pred["shuffled_loss_ratio"] = 1.0
    assert "does NOT beat" in predictor_verdict(pred)
    assert "IGNORES" in predictor_verdict(pred)
    # the length control is a rival too: a model at 0.9 does not beat a length alone at 0.95
    pred["methods"].update(model=method(0.9), length={"within_doc_mrr": 0.95})
    assert "does NOT beat" in predictor_verdict(pred) and "(length) 0.950" in predictor_verdict(
        pred
    )


def test_the_length_control_ranks_by_length_alone() -> None:
    """One window of five sentences of lengths 3, 9, 4, 20, 9; sentences 0 and 3 hidden. Length 3
    is nearest to itself (then 4): rank 1; length 20's own rank is 1 too. Two sentences of one
    length tie (the expected rank: 1.5)."""
    from lang_jepa.config import LossConfig
    from lang_jepa.eval.predictor import length_space, method_metrics

    lens = torch.tensor([[3, 9, 4, 20, 9]])
    out = {
        "targets": torch.zeros(1, 2, 4), "slot_valid": torch.ones(1, 2, dtype=torch.bool),
        "preds": {}, "sents": (torch.zeros(1, 5, 4), torch.ones(1, 5, dtype=torch.bool),
                               torch.tensor([[0, 3]])),
        "lengths": (torch.tensor([[3, 20]]), lens, 32),
    }  # fmt: skip
    space = length_space(out)
    cos = space["sents"][0][0] @ space["preds"]["length"][0].T  # [5 sentences, 2 queries]
    assert cos[:, 0].argsort(descending=True)[:2].tolist() == [0, 2]  # 3 then 4
    assert cos[:, 1].argmax().item() == 3
    m = method_metrics([space], "length", LossConfig())
    assert m["within_doc_mrr"] == pytest.approx(1.0)
    tie = dict(out, lengths=(torch.tensor([[9, 20]]), lens, 32),
               sents=(out["sents"][0], out["sents"][1], torch.tensor([[1, 3]])))  # fmt: skip
    m = method_metrics([length_space(tie)], "length", LossConfig())
    assert m["within_doc_mrr"] == pytest.approx((0.5 * (1 + 1 / 2) + 1.0) / 2)  # 9 ties with 9


def test_the_harness_keeps_each_space_of_the_predictor_table_apart() -> None:
    """The raw pool MRR is not overwritten by the centred or whitened one (their names say the
    space: ``centred_mrr``, ``within_doc_centred_mrr``)."""
    from lang_jepa.experiment.results import point_metrics

    row = {"mrr": 0.4, "within_doc_mrr": 0.9}
    point = {"encoders": {"target": {"lee_spearman": 0.1}},
             "predictor": {"methods": {"model": row},
                           "methods_centred": {"model": {"mrr": 0.2, "within_doc_mrr": 0.8}},
                           "methods_whitened": {"model": {"mrr": 0.1, "within_doc_mrr": 0.7}},
                           "shuffled_loss_ratio": 2.0}}  # fmt: skip
    m = point_metrics(point)
    assert m["predictor.model.mrr"] == 0.4 and m["predictor.model.within_doc_mrr"] == 0.9
    assert m["predictor.model.centred_mrr"] == 0.2 and m["predictor.model.whitened_mrr"] == 0.1
    assert m["predictor.model.within_doc_centred_mrr"] == 0.8
    assert m["predictor.model.within_doc_whitened_mrr"] == 0.7
