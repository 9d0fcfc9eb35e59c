"""``python -m preprocessing.train_tokenizer --input DIR --vocab-size 8192 --out DIR``: a WordPiece
tokenizer trained on a corpus, for ``build_shards --tokenizer DIR``.

The tokenizer has BERT-uncased's pipeline (lower-casing, accent stripping, punctuation split,
``##`` continuation pieces) and its special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``, so every
part of the stack that uses them works unchanged; only the vocabulary is learnt, by the
``tokenizers`` library's WordPiece trainer. A small corpus trains a small model better with a small
vocabulary: with BERT's 30,522 rows the embedding is most of a small encoder's parameters, and most
rows see a handful of updates.

Only the documents ``build_shards`` puts in the train split are read (the same document ids and
``--val-fraction`` hash), so the val split stays unseen. The output is a Hugging Face fast
tokenizer directory (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
plus ``train_tokenizer.json``, which records the corpus, the settings and the counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from preprocessing.accounting import route_of
from preprocessing.readers import InputError, expand_inputs, iter_events

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_texts(inputs: list[str], val_fraction: float, counts: dict[str, int],
                text_key: str = "text", id_key: str = "id") -> Iterator[str]:  # fmt: skip
    """The train-split documents' texts; ``counts`` tallies train, val and skipped documents."""
    for event in iter_events(expand_inputs(inputs), text_key, id_key, skip_bad_files=False):
        if event.text is None:
            counts[f"skipped.{event.skip}"] = counts.get(f"skipped.{event.skip}", 0) + 1
        elif route_of(event.id, val_fraction) == "val":
            counts["val_documents"] += 1
        else:
            counts["train_documents"] += 1
            yield event.text


def train_tokenizer(inputs: list[str], vocab_size: int, out: str | Path, val_fraction: float = 0.02,
                    min_frequency: int = 2) -> dict[str, object]:  # fmt: skip
    """Train, save into ``out`` and return the record written to ``out/train_tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise ValueError(
            f"--vocab-size {vocab_size}: too small (at least {len(SPECIAL_TOKENS) + 100})"
        )
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True,
                                                handle_chinese_chars=True)  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=SPECIAL_TOKENS, show_progress=False)  # fmt: skip
    counts = {"train_documents": 0, "val_documents": 0}
    tok.train_from_iterator(train_texts(inputs, val_fraction, counts), trainer=trainer)
    if counts["train_documents"] == 0:
        raise InputError(f"--input {inputs}: no train-split documents to learn a vocabulary from")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   do_lower_case=True)  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    record = {"inputs": inputs, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
              "requested_vocab_size": vocab_size, "min_frequency": min_frequency,
              "val_fraction": val_fraction, "special_tokens": SPECIAL_TOKENS, **counts}  # fmt: skip
    (out / "train_tokenizer.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocessing.train_tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--input", nargs="+", required=True, help="files, directories or globs (as build_shards)"
    )
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included"
    )
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged piece")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="as build_shards: the val documents are left out")  # fmt: skip
    args = p.parse_args(argv)
    try:
        record = train_tokenizer(
            args.input, args.vocab_size, args.out, args.val_fraction, args.min_frequency
        )
    except (InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: vocabulary {record['vocab_size']}, {record['train_documents']} train "
          f"documents read, {record['val_documents']} val documents left out")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
