"""Evaluation metrics as pure functions on tensors / arrays (no model, no I/O).

- Retrieval: rank each query (a prediction) against candidate embeddings by cosine similarity.
  Ties are broken at random *in expectation* (exact expected top-k and reciprocal rank), so a
  constant or collapsed predictor scores exactly chance, never 1.0 by a lucky tie order.
- :func:`spearman`: rank correlation (scipy).
- :func:`probe_accuracy`: logistic regression on frozen features, fixed seeded stratified split.
- Health: :func:`effective_rank` (RankMe), :func:`per_dim_std`, :func:`alignment` and
  :func:`uniformity` (Wang & Isola 2020, on L2-normalised embeddings).
- :func:`fit_postprocess`: centring or whitening fitted on unlabelled embeddings, for the
  cosine-based tasks (a shared offset or a few dominant directions can hide what cosine sees).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lang_jepa.metrics import effective_rank

__all__ = [
    "RetrievalResult",
    "alignment",
    "effective_rank",
    "fit_postprocess",
    "health",
    "per_dim_std",
    "probe_accuracy",
    "retrieval",
    "retrieval_from_scores",
    "spearman",
    "uniformity",
]


@dataclass
class RetrievalResult:
    """Per-query expected top-1 / top-5 / reciprocal rank and their chance levels ([Q] each)."""

    top1: Tensor
    top5: Tensor
    rr: Tensor
    rank: Tensor  # expected rank (1 = best), for histograms
    n_candidates: Tensor
    chance_top1: Tensor
    chance_top5: Tensor
    chance_rr: Tensor

    @staticmethod
    def cat(results: list[RetrievalResult]) -> RetrievalResult:
        fields = RetrievalResult.__dataclass_fields__
        return RetrievalResult(**{k: torch.cat([getattr(r, k) for r in results]) for k in fields})

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Means over queries: ``{prefix}top1``, ``top5``, ``mrr``, ``mean_rank`` and chance levels."""
        if self.top1.numel() == 0:
            return {}
        out = {"top1": self.top1, "top5": self.top5, "mrr": self.rr, "mean_rank": self.rank,
               "chance_top1": self.chance_top1, "chance_top5": self.chance_top5,
               "chance_mrr": self.chance_rr, "n_candidates": self.n_candidates.float()}  # fmt: skip
        return {prefix + k: float(v.float().mean()) for k, v in out.items()}


def _harmonic(n: Tensor) -> Tensor:
    """H_n = sum_{r=1..n} 1/r for integer tensor n >= 0 (elementwise)."""
    top = int(n.max()) if n.numel() else 0
    table = torch.cat([torch.zeros(1), torch.cumsum(1.0 / torch.arange(1, top + 1), 0)])
    return table[n.long()]


def retrieval_from_scores(
    scores: Tensor, correct: Tensor, cand_valid: Tensor | None = None
) -> RetrievalResult:
    """Expected ranking metrics from a score matrix (higher = better).

    scores [Q, C]; correct [Q] (index of the right candidate); cand_valid [Q, C] (bool) masks
    candidates out per query (the correct one must be valid). With g candidates scoring strictly
    higher than the correct one and t others tied with it, the rank is uniform on g+1..g+t+1.
    """
    q, c = scores.shape
    scores = scores.float()
    valid = torch.ones(q, c, dtype=torch.bool) if cand_valid is None else cand_valid.bool()
    valid = valid.to(scores.device)
    own = scores.gather(1, correct[:, None].long()).squeeze(1)  # [Q]
    others = valid.clone()
    others[torch.arange(q), correct.long()] = False
    greater = ((scores > own[:, None]) & others).sum(1)
    ties = ((scores == own[:, None]) & others).sum(1)
    n = valid.sum(1)
    span = (ties + 1).float()

    def p_within(k: int) -> Tensor:  # P(rank <= k) with the rank uniform on g+1..g+t+1
        return ((k - greater).float() / span).clamp(0.0, 1.0)

    rr = (_harmonic(greater + ties + 1) - _harmonic(greater)) / span
    return RetrievalResult(
        top1=p_within(1).cpu(),
        top5=p_within(5).cpu(),
        rr=rr.cpu(),
        rank=(greater.float() + (span + 1) / 2).cpu(),
        n_candidates=n.cpu(),
        chance_top1=(1.0 / n.float()).cpu(),
        chance_top5=(n.clamp(max=5).float() / n.float()).cpu(),
        chance_rr=(_harmonic(n) / n.float()).cpu(),
    )


def cosine_scores(queries: Tensor, candidates: Tensor) -> Tensor:
    """Cosine similarity [Q, C] of queries [Q, D] and candidates [C, D] (fp32).

    Scores are rounded to 6 decimals so that numerically equal embeddings tie exactly."""
    s = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    return torch.round(s * 1e6) / 1e6


def retrieval(queries: Tensor, candidates: Tensor, correct: Tensor | None = None,
              cand_valid: Tensor | None = None) -> RetrievalResult:  # fmt: skip
    """Rank each query [Q, D] against candidates [C, D] by cosine; ``correct`` defaults to
    ``arange(Q)`` (query i's answer is candidate i)."""
    if correct is None:
        correct = torch.arange(queries.shape[0])
    return retrieval_from_scores(cosine_scores(queries, candidates), correct, cand_valid)


POSTPROCESS = ("raw", "centred", "whitened")


def fit_postprocess(z: np.ndarray | Tensor, mode: str) -> Callable[[Tensor], Tensor]:
    """A map of embeddings [..., D] fitted on z [N, D] (unlabelled evaluation embeddings):
    ``raw`` (identity), ``centred`` (minus the mean of z) or ``whitened`` (centred, then times
    the inverse square root of z's Ledoit-Wolf shrunk covariance; shrinkage keeps it defined
    when N < D). Returns fp32 tensors."""
    if mode not in POSTPROCESS:
        raise ValueError(f"postprocess {mode!r} is not one of {', '.join(POSTPROCESS)}")
    z64 = torch.as_tensor(np.asarray(z, dtype=np.float64))
    mu = z64.mean(0)
    if mode == "raw":
        return lambda x: torch.as_tensor(x).float()
    if mode == "centred":
        return lambda x: (torch.as_tensor(x).double() - mu).float()
    from sklearn.covariance import ledoit_wolf

    cov = torch.as_tensor(ledoit_wolf(z64.numpy())[0])
    vals, vecs = torch.linalg.eigh(cov)
    vals = vals.clamp(min=float(vals.max()) * 1e-12)
    w = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    return lambda x: ((torch.as_tensor(x).double() - mu) @ w).float()


def spearman(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Spearman rank correlation of two 1-D sequences (ties get average ranks); NaN if constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0, test_frac: float = 0.2,
                   c: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Logistic-regression probe on frozen features with a fixed seeded stratified split.

    features [N, D] (dense or scipy sparse), labels [N]. Features are standardised on the train
    split (dense) or used as they are (sparse, e.g. TF-IDF). Returns test ``accuracy``, the
    majority-class ``chance`` on the test split, ``train_accuracy`` and the split sizes.
    """
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_frac, random_state=seed, stratify=labels
    )
    x_train, x_test = features[idx_train], features[idx_test]
    if not sp.issparse(features):
        scaler = StandardScaler().fit(x_train)
        x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, labels[idx_train])
    _, counts = np.unique(labels[idx_test], return_counts=True)
    return {
        "accuracy": float(clf.score(x_test, labels[idx_test])),
        "chance": float(counts.max() / counts.sum()),
        "train_accuracy": float(clf.score(x_train, labels[idx_train])),
        "n_train": float(len(idx_train)),
        "n_test": float(len(idx_test)),
    }


def per_dim_std(z: Tensor) -> float:
    """Mean over dimensions of the per-dimension std of z [N, D] (after L2 normalisation the
    collapse-free value is about 1/sqrt(D); raw values depend on the embedding's scale)."""
    return float(z.float().std(dim=0).mean()) if z.shape[0] > 1 else math.nan


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola alignment E ||f(x) - f(y)||^alpha over positive pairs (rows of x [N, D] and
    y [N, D]), on L2-normalised embeddings. 0 is perfect; 2 ** alpha is maximal."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(z: Tensor, t: float = 2.0, max_n: int = 4096) -> float:
    """Wang & Isola uniformity log E exp(-t ||f(x) - f(y)||^2) over distinct pairs, on
    L2-normalised z [N, D] (the first ``max_n`` rows). 0 for a collapsed set; lower is more
    uniform (about -4 for a well spread set with t = 2)."""
    z = F.normalize(z[:max_n].float(), dim=-1)
    if z.shape[0] < 2:
        return math.nan
    sq = torch.pdist(z).pow(2)
    return float(torch.logsumexp(-t * sq, 0) - math.log(sq.numel()))


def health(z: Tensor, pairs: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """Collapse monitors of pooled embeddings z [N, D]: RankMe effective rank (and as a fraction
    of min(N, D)), per-dimension std of the raw and of the L2-normalised embeddings, uniformity,
    and alignment of ``pairs`` (two [M, D] tensors of positive pairs) when given."""
    z = z.float()
    zn = F.normalize(z, dim=-1)
    rank = effective_rank(z)
    out = {
        "effective_rank": rank,
        "effective_rank_frac": rank / max(1, min(z.shape)),
        "dim_std": per_dim_std(z),
        "dim_std_normalized": per_dim_std(zn),
        "uniformity": uniformity(z),
    }
    if pairs is not None and pairs[0].shape[0] > 0:
        out["alignment"] = alignment(*pairs)
    return out
