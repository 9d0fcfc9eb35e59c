"""Exports in the Hugging Face ecosystem's formats: ``python -m lang_jepa.export RUN --out DIR
--format hf`` (or :func:`to_hf` on a native export).

The directory loads with

- ``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)``: ``config.json``
  (``model_type: lang_jepa``, ``auto_map``) names :mod:`configuration_lang_jepa` and
  :mod:`modeling_lang_jepa`, copied into the export from this package (they import only torch and
  transformers), and ``model.safetensors`` holds the encoder under the same parameter names;
- ``sentence_transformers.SentenceTransformer(DIR, trust_remote_code=True)``: ``modules.json``
  (Transformer, then mean Pooling in ``1_Pooling/``) and ``sentence_bert_config.json``
  (``max_seq_length`` = the encoder's ``seq_len``).

The tokenizer is the shards' own, with its post-processor removed: LANG-JEPA reads sentences
without ``[CLS]``/``[SEP]`` (preprocessing tokenizes them so), and a standard library's call
``tokenizer(texts)`` must give the ids the encoder was trained on. ``README.md`` is a model card in
the Hub's format. Texts up to ``seq_len`` tokens embed as ``lang_jepa.Encoder.encode(texts)``
does (tested); longer ones are truncated there, where ``Encoder.encode`` pools pieces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_lang_jepa.py", "modeling_lang_jepa.py")
AUTO_MAP = {
    "AutoConfig": "configuration_lang_jepa.LangJepaConfig",
    "AutoModel": "modeling_lang_jepa.LangJepaModel",
}
SPECIAL = ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


class HFExportError(ValueError):
    """A native export that cannot be converted (missing weights, config or tokenizer)."""


def hf_config(model: dict[str, Any]) -> dict[str, Any]:
    """``LangJepaConfig`` arguments from a native export's ``model`` section."""
    return {
        "vocab_size": int(model["vocab_size"]),
        "hidden_size": int(model["dim"]),
        "num_hidden_layers": int(model["depth"]),
        "num_attention_heads": int(model["heads"]),
        "mlp_ratio": float(model["mlp_ratio"]),
        "max_position_embeddings": int(model["seq_len"]),
        "position_embedding": str(model["pos"]),
        "rope_theta": float(model["rope_theta"]),
        "layer_norm_eps": float(model["norm_eps"]),
    }


def _tokenizer(src: Path, out: Path, seq_len: int) -> None:
    """The shards' tokenizer without its post-processor, saved as a fast tokenizer in ``out``."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    original = AutoTokenizer.from_pretrained(str(src))
    data = json.loads((src / "tokenizer.json").read_text())
    data["post_processor"] = None
    specials = {k: getattr(original, k) for k in SPECIAL if getattr(original, k, None)}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   model_max_length=seq_len, **specials)  # fmt: skip
    fast.save_pretrained(str(out))


def model_card(native: dict[str, Any], params: int, eval_md: str | None) -> str:
    """``README.md`` in the Hub's format: YAML metadata, then what the model is and how it did;
    ``params``: the encoder's parameter count."""
    src = native.get("source", {})
    m = native["model"]
    bert = m.get("arch", "pre_ln") == "bert"
    remote = "" if bert else ", trust_remote_code=True"
    if bert:
        body = (f"BERT (post-LN, learned absolute positions, token types, GELU), loaded as "
                f"`transformers.BertModel`: {m['depth']} layers, width {m['dim']}, {m['heads']} "
                f"heads, MLP ratio {m['mlp_ratio']}")  # fmt: skip
    else:
        body = (f"pre-LN transformer: {m['depth']} layers, width {m['dim']}, {m['heads']} heads, "
                f"MLP ratio {m['mlp_ratio']}, {m['pos']} positions")  # fmt: skip
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [lang-jepa, jepa, sentence-embeddings, feature-extraction]",
        "license: apache-2.0",
        "---",
        "",
        "# LANG-JEPA text encoder",
        "",
        "A sentence encoder pretrained with LANG-JEPA: whole sentences of a document are hidden, a "
        "context encoder reads the rest, and a predictor regresses, in latent space, the embeddings "
        "that an EMA target encoder gives the hidden sentences. No tokens are reconstructed.",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("PATH"{remote})',
        'emb = model.encode(["The committee approved the budget.", "The plan was voted through."])',
        "```",
        "",
        f"or `transformers.AutoModel.from_pretrained(PATH{remote})` and the mean "
        "of `last_hidden_state` over `attention_mask`.",
        "",
        "## Architecture",
        "",
        f"- {body}, up to {m['seq_len']} tokens (about "
        f"{params / 1e6:.1f}M parameters, {m['vocab_size'] * m['dim'] / 1e6:.1f}M of them the "
        "token embedding);",
        "- sentence embedding: the mean of the final token features (no special tokens);",
        f"- tokenizer: {m['vocab_size']:,} pieces, the one the training shards were made with, "
        "used without `[CLS]`/`[SEP]`.",
        "",
        "## Training",
        "",
        f"- encoder exported: `{native.get('which', '?')}` (EMA target or online context encoder);",
        f"- checkpoint: step {src.get('step', '?')} of run `{src.get('run_dir', '?')}` (ZeRO stage "
        f"{src.get('zero_stage', '?')}, world size {src.get('world_size', '?')});",
        f"- training data: the shards with manifest sha256 `{src.get('manifest_sha256', '?')}`; the "
        "run directory's `config.yaml` holds the full training configuration.",
        "",
        "## Evaluation",
        "",
        eval_md.strip()
        if eval_md
        else "No evaluation was found beside the export; run `python -m lang_jepa.eval` on it.",
        "",
        "## Intended use and limits",
        "",
        "Research on self-supervised sentence representations. The embeddings are not tuned for any "
        "task; compare them with the random-init and masked-LM baselines of the evaluation before "
        "relying on them. Texts longer than the context are truncated here.",
        "",
        "## Licence",
        "",
        "Apache-2.0 for the weights and code in this directory; the training data keeps its own "
        "licence.",
        "",
    ]
    return "\n".join(lines)


def to_hf(native_dir: str | Path, out: str | Path, eval_md: str | None = None) -> Path:
    """Convert a native export (``config.json``, ``model.safetensors``, ``tokenizer/``) into a
    Hugging Face / sentence-transformers directory ``out``; returns ``out``."""
    from .configuration_lang_jepa import LangJepaConfig

    native_dir, out = Path(native_dir), Path(out)
    try:
        native = json.loads((native_dir / "config.json").read_text())
        state = load_file(str(native_dir / "model.safetensors"))
    except (OSError, ValueError) as err:
        raise HFExportError(f"{native_dir}: not a LANG-JEPA export ({err})") from err
    arch = native["model"].get("arch", "pre_ln")
    tok_dir = native_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise HFExportError(f"{native_dir}: the export has no tokenizer/tokenizer.json to ship")
    out.mkdir(parents=True, exist_ok=True)
    about = {"which": native.get("which"), "source": native.get("source")}
    seq_len = int(native["model"]["seq_len"])
    if arch == "bert":  # BERT exactly (model.init_from): transformers' own BertModel, no code
        from transformers import BertConfig

        from lang_jepa.pretrained import bert_config, to_bert_state

        BertConfig(**bert_config(native["model"]), architectures=["BertModel"],
                   lang_jepa=about).save_pretrained(str(out))  # fmt: skip
        state = to_bert_state(state, int(native["model"]["depth"]))
    else:
        args = hf_config(native["model"])
        LangJepaConfig(**args, architectures=["LangJepaModel"], auto_map=AUTO_MAP,
                       lang_jepa=about).save_pretrained(str(out))  # fmt: skip
        for name in CODE_FILES:
            shutil.copyfile(HERE / name, out / name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    _tokenizer(tok_dir, out, seq_len)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ], indent=2) + "\n")  # fmt: skip
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": seq_len, "do_lower_case": False}, indent=2) + "\n")  # fmt: skip
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": int(native["model"]["dim"]), "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2) + "\n")  # fmt: skip
    params = sum(v.numel() for k, v in state.items() if not k.startswith("pooler."))
    (out / "README.md").write_text(model_card(native, params, eval_md))
    return out
