"""Use a trained (exported) encoder: ``Encoder.from_pretrained(DIR).encode(texts)``.

An export directory (written by :mod:`lang_jepa.export`) holds ``model.safetensors`` (fp32
:class:`~lang_jepa.models.TextEncoder` weights), ``config.json`` (its hyperparameters and where it
came from) and ``tokenizer/`` (the shards' tokenizer).

Embeddings are pooled exactly as training pools its targets: a text is split into sentences with
:func:`lang_jepa.sentences.split_sentences` (preprocessing's blingfire splitter), each sentence is tokenized on its own without special tokens (as preprocessing does),
runs of whole consecutive sentences of at most ``seq_len`` tokens form windows (a longer sentence
is cut into ``seq_len`` pieces first), the encoder reads each window with positions ``0..n-1``,
and an embedding is the mean of the final features of its tokens. Three granularities:

- ``encode(texts, level="sentence")``: each text is one sentence, embedded on its own -> [T, D].
- ``encode(texts, level="document")``: each text is a document; mean over *all* its tokens, each
  token read in the context of its window -> [T, D].
- ``encode_sentences(texts)``: each text is a document; one embedding per blingfire sentence, read
  in the context of its window (what a training target is) -> a list of [S_i, D]; the matching
  sentences are ``enc.split_sentences(text)``.

``layer_norm=True`` applies training's target normalisation (layer norm without affine
parameters); ``normalize=True`` then scales every embedding to unit L2 norm (for cosine search).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data.windows import split_long_sentences, window_bounds
from .models import TextEncoder, build_encoder
from .sentences import split_sentences

FORMAT = "lang-jepa-encoder/2"  # /2: config.json's "model" is models.encoder_config (seq_len)
FORMAT_V1 = "lang-jepa-encoder/1"  # /1: "model" held TextEncoder arguments (max_len); still read
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"

Doc = tuple[np.ndarray, np.ndarray]  # (token ids [T], sentence offsets [S + 1]), the shard fields


def read_export_config(path: str | Path) -> dict[str, Any]:
    """An export directory's ``config.json``; its ``model`` section is the encoder's
    :func:`~lang_jepa.models.encoder_config` (``vocab_size``, ``seq_len``, ``dim``, ...)."""
    root = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} not found: not a LANG-JEPA export directory "
                "(write one with python -m lang_jepa.export RUN_DIR --out DIR)"
            )
    config = json.loads((root / CONFIG_NAME).read_text())
    if config.get("format") == FORMAT_V1:
        model = dict(config["model"])
        model["seq_len"] = model.pop("max_len")
        config = {**config, "format": FORMAT, "model": model}
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{root / CONFIG_NAME}: format {config.get('format')!r}, expected {FORMAT!r}"
        )
    return config


def load_tokenizer(path: Path) -> Any:
    """The fast tokenizer's backend (``tokenizers.Tokenizer``), no padding, no truncation."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    tok.no_padding()  # a tokenizer.json may pad/cut for model inputs; sentences are encoded whole
    tok.no_truncation()
    return tok


class Encoder:
    """An exported LANG-JEPA text encoder with its tokenizer and training's pooling.

    Build with :meth:`from_pretrained`. ``device`` may be any torch device; ``dtype`` (e.g.
    ``torch.bfloat16`` on a GPU) runs the encoder under autocast, pooling stays fp32.
    """

    def __init__(self, model: TextEncoder, tokenizer: Any, config: dict[str, Any],
                 device: torch.device, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.dtype = dtype
        self.seq_len = int(config["model"]["seq_len"])
        self.dim = int(config["model"]["dim"])

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Encoder:  # fmt: skip
        """Load an export directory. ``device`` defaults to CUDA when available, else CPU."""
        from safetensors.torch import load_file

        root = Path(path)
        config = read_export_config(root)
        model = build_encoder(config["model"], config["model"]["vocab_size"])
        model.load_state_dict(load_file(str(root / WEIGHTS_NAME)), strict=True)
        tok_dir = root / TOKENIZER_DIR
        tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
        dev = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        return cls(model, tokenizer, config, dev, dtype)

    # ----- text -> token ids (as preprocessing makes them) -----

    split_sentences = staticmethod(split_sentences)

    def tokenize_sentences(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids of each sentence, no special tokens."""
        if self.tokenizer is None:
            raise RuntimeError(
                "this export has no tokenizer/ directory: use encode_ids with token ids"
            )
        return [
            e.ids for e in self.tokenizer.encode_batch(list(sentences), add_special_tokens=False)
        ]

    def tokenize_document(self, text: str, split: bool = True) -> Doc:
        """(token ids [T], sentence offsets [S + 1]) of one text; ``split=False``: one sentence.

        Sentences without any token are dropped (as preprocessing does)."""
        sentences = self.split_sentences(text) if split else [text]
        ids = [s for s in self.tokenize_sentences(sentences) if s] if sentences else []
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter((t for s in ids for t in s), dtype=np.int64, count=int(offsets[-1]))
        return tokens, offsets

    # ----- public encoding API -----

    def encode(self, texts: str | Sequence[str], level: Literal["sentence", "document"] = "sentence",
               batch_size: int = 32, normalize: bool = False, layer_norm: bool = False,
               as_numpy: bool = False, empty: Literal["error", "zero"] = "error",
               all_layers: bool = False) -> Tensor | np.ndarray:  # fmt: skip
        """Embeddings [T, D] (fp32, on CPU) of ``texts`` (a str gives [1, D]).

        ``level="sentence"``: each text is embedded as one sentence; ``level="document"``: each
        text is split into sentences, windowed, and all its tokens mean-pooled. ``batch_size``
        counts windows per forward pass.

        A text without any token (empty, or whitespace only) has nothing to embed: ``empty="error"``
        (the default) raises ValueError naming its index; ``empty="zero"`` gives it an all-zero
        row, left zero by ``normalize`` and ``layer_norm`` (its cosine with anything is 0).

        ``all_layers``: [T, depth + 2, D], every hidden state pooled alike (embedding output, each
        block, final = the default embedding), for layer-wise analysis
        (``python -m lang_jepa.eval.layers``).
        """
        if level not in ("sentence", "document"):
            raise ValueError(f"level must be 'sentence' or 'document', got {level!r}")
        if empty not in ("error", "zero"):
            raise ValueError(f"empty must be 'error' or 'zero', got {empty!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        docs = [self.tokenize_document(t, split=level == "document") for t in texts]
        blank = [i for i, (ids, _) in enumerate(docs) if len(ids) == 0]
        if blank and empty == "error":
            more = f" (and {len(blank) - 5} more)" if len(blank) > 5 else ""
            raise ValueError(
                f"texts[{', '.join(map(str, blank[:5]))}]{more}: no token to embed (empty or "
                "whitespace only); drop them, or pass empty='zero' for all-zero rows"
            )
        out = self.encode_ids(docs, level="document", batch_size=batch_size, all_layers=all_layers)
        out = self._finish(out, normalize, layer_norm, as_numpy=False)
        if blank:
            out[blank] = 0.0  # layer_norm of a zero row is its bias-free zero: keep it exactly 0
        return out.numpy() if as_numpy else out

    def encode_sentences(self, texts: str | Sequence[str], batch_size: int = 32, normalize: bool = False,
                         layer_norm: bool = False, as_numpy: bool = False) -> list[Tensor | np.ndarray]:  # fmt: skip
        """Per text (a document), its sentence embeddings [S_i, D] in window context; sentence i
        is the i-th of ``split_sentences(text)`` that has a token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        docs = [self.tokenize_document(t) for t in texts]
        flat = self.encode_ids(docs, level="sentence", batch_size=batch_size)
        flat = self._finish(flat, normalize, layer_norm, as_numpy)
        sizes = [len(off) - 1 for _, off in docs]
        return list(
            flat.split(sizes) if isinstance(flat, Tensor) else np.split(flat, np.cumsum(sizes)[:-1])
        )

    @staticmethod
    def _finish(
        x: Tensor, normalize: bool, layer_norm: bool, as_numpy: bool
    ) -> Tensor | np.ndarray:
        if layer_norm:
            x = F.layer_norm(x, (x.shape[-1],))
        if normalize:
            x = F.normalize(x, dim=-1)
        return x.numpy() if as_numpy else x

    # ----- token-level API -----

    @torch.no_grad()
    def embed_tokens(self, input_ids: Tensor, position_ids: Tensor | None = None,
                     valid: Tensor | None = None, all_layers: bool = False) -> Tensor:  # fmt: skip
        """Final token features [B, N, D] (fp32) of padded windows ``input_ids`` [B, N].

        ``position_ids`` default to ``0..N-1``; ``valid`` [B, N] (bool) marks real tokens.
        ``all_layers``: [B, N, depth + 2, D], every hidden state of
        :meth:`~lang_jepa.models.TextEncoder.hidden_states` (embeddings, each block, final)."""
        input_ids = input_ids.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        valid = valid.to(self.device)
        position_ids = torch.where(valid, position_ids.to(self.device), 0)
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            if all_layers:
                states = self.model.hidden_states(input_ids, position_ids, valid)
                return torch.stack(states, dim=2).float()
            return self.model(input_ids, position_ids, valid).float()

    def encode_ids(self, docs: Sequence[Doc], level: Literal["sentence", "document"] = "document",
                   batch_size: int = 32, all_layers: bool = False) -> Tensor:  # fmt: skip
        """Pooled embeddings of tokenized documents (the shard fields: ids [T], offsets [S + 1]).

        ``level="document"``: [len(docs), D], the mean over each document's tokens.
        ``level="sentence"``: [sum S_i, D], each sentence's mean, documents concatenated in order.
        Every token is read in the context of its window (whole sentences, <= seq_len tokens).
        ``all_layers``: [units, depth + 2, D], each hidden state pooled alike (the last is the
        embedding above; see :meth:`embed_tokens`).
        """
        windows, units, n_units = _windows(docs, self.seq_len, per_sentence=level == "sentence")
        width = (len(self.model.stack.blocks) + 2, self.dim) if all_layers else (self.dim,)
        sums = torch.zeros(n_units, *width, dtype=torch.float32, device=self.device)
        counts = torch.zeros(n_units, dtype=torch.float32, device=self.device)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))  # less padding
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            ids, valid = _pad([windows[i] for i in chosen])
            unit = torch.from_numpy(np.concatenate([units[i] for i in chosen])).to(self.device)
            feats = self.embed_tokens(ids, None, valid, all_layers)[valid.to(self.device)]
            sums.index_add_(0, unit, feats)  # feats: [tokens, D] or [tokens, depth + 2, D]
            counts.index_add_(0, unit, torch.ones_like(unit, dtype=torch.float32))
        counts = counts.clamp(min=1).view(-1, *([1] * len(width)))
        return (sums / counts).cpu()


def _windows(
    docs: Sequence[Doc], seq_len: int, per_sentence: bool
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Cut documents into windows as the training loader does.

    Returns (window token ids, per-token pooling unit of each window, number of units). A unit
    is a document, or with ``per_sentence`` a sentence (pieces of a long sentence pool together).
    """
    windows, units, base = [], [], 0
    for tokens, sents in docs:
        sents = np.asarray(sents, dtype=np.int64)
        n_sent = len(sents) - 1
        if n_sent <= 0 or sents[-1] == 0:
            base += max(n_sent, 0) if per_sentence else 1
            continue
        unit_of_token = (
            np.repeat(np.arange(n_sent), np.diff(sents))
            if per_sentence
            else np.zeros(int(sents[-1]), np.int64)
        )
        offsets, _, _ = split_long_sentences(sents, seq_len)
        for first, end in window_bounds(offsets, seq_len).tolist():
            a, b = int(offsets[first]), int(offsets[end])
            windows.append(np.asarray(tokens[a:b], dtype=np.int64))
            units.append(unit_of_token[a:b] + base)
        base += n_sent if per_sentence else 1
    return windows, units, base


def _pad(windows: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """0-padded ids [B, N] and valid [B, N] for windows of different lengths."""
    n = max(len(w) for w in windows)
    ids = np.zeros((len(windows), n), dtype=np.int64)
    valid = np.zeros((len(windows), n), dtype=bool)
    for row, w in enumerate(windows):
        ids[row, : len(w)] = w
        valid[row, : len(w)] = True
    return torch.from_numpy(ids), torch.from_numpy(valid)
