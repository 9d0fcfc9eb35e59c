"""``python -m lang_jepa.decoder``: train, export and score a concept decoder.

    python -m lang_jepa.decoder train EXPORT --shards DIR --out RUN_DIR [--config decoder]
        [--deepspeed_config ds_configs/zero2.json] [key=value ...]
    python -m lang_jepa.decoder export RUN_DIR --out DIR [--tag TAG]
    python -m lang_jepa.decoder eval DECODER_DIR --shards DIR [--limit 500] [--out DIR]
    python -m lang_jepa.decoder predict RUN_DIR --decoder DECODER_DIR --text "..." --hide 2
    python -m lang_jepa.decoder predict RUN_DIR --decoder DECODER_DIR [--max-batches 16] [--out DIR]

``train`` runs the repository's ``train.py`` with ``objective=decoder decoder.encoder=EXPORT``
(the same config tree, DeepSpeed engine, checkpoints, exact resume, TensorBoard; several ranks:
``deepspeed train.py ... objective=decoder decoder.encoder=EXPORT``), then exports the newest
checkpoint to ``RUN_DIR/export``. ``eval`` writes ``decoder_eval.json``, ``decoder_eval.md`` and
``decoder_examples.md`` (original, reconstruction, nearest training sentence) for held-out
sentences of the shards' ``val`` split. ``predict`` hides one sentence of a passage, predicts its
concept with a JEPA run's predictor and prints the decoded prediction, the true sentence and the
decoded copy-neighbour baseline; without ``--text`` it does so for every masked sentence of the
run's validation windows and writes ``predict_eval.json``, ``predict_eval.md`` and
``predict_examples.md`` (see :mod:`lang_jepa.decoder.predict`).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CheckpointError
from ..data.reader import decode_sample, read_shard, split_shards
from ..encoder_api import read_export_config
from ..shards import ShardFormatError
from .api import Decoder, DecoderError, export_decoder
from .metrics import (
    SemanticJudge,
    cosine_rows,
    reconstruction_scores,
    semantic_cell,
    semantic_note,
    token_f1,
)
from .predict import embed, predict_hidden, predict_markdown, predict_windows

TRAIN_PY = Path(__file__).resolve().parent.parent.parent / "train.py"
log = logging.getLogger("lang_jepa.decoder")


def held_out_sentences(shards: str | Path, split: str, limit: int, max_tokens: int,
                       ) -> tuple[list[np.ndarray], dict[str, int]]:  # fmt: skip
    """Up to ``limit`` sentences of ``split``: every k-th sentence of the split (k spreads them
    over all documents). Sentences over ``max_tokens`` tokens are skipped and counted."""
    sentences: list[np.ndarray] = []
    skipped = {"longer_than_max_tokens": 0}
    for info in split_shards(shards, split):
        for sample in read_shard(info.url, info.samples, info.sha256):
            tokens, sents, _ = decode_sample(sample, info.url, info.vocab_size)
            for a, b in zip(sents[:-1], sents[1:], strict=True):
                if b - a > max_tokens:
                    skipped["longer_than_max_tokens"] += 1
                elif b > a:
                    sentences.append(np.asarray(tokens[a:b], dtype=np.int64))
    step = max(1, len(sentences) // limit) if limit else 1
    picked = sentences[::step][:limit] if limit else sentences
    return picked, {**skipped, "available": len(sentences), "picked": len(picked)}


def evaluate(decoder_dir: str | Path, shards: str | Path, limit: int = 500, split: str = "val",
             examples: int = 12, pool: int = 5000, strategy: str = "greedy",
             semantic: bool = True) -> dict[str, Any]:  # fmt: skip
    """Score reconstructions of held-out sentences; returns the ``decoder_eval.json`` content.
    ``semantic``: also the all-MiniLM-L6-v2 cosine of each reconstruction (and nearest training
    sentence) to its original, with the level of unrelated sentences (:class:`SemanticJudge`)."""
    dec = Decoder.from_pretrained(decoder_dir, device="cpu")
    limit_tokens = min(dec.max_tokens, dec.encoder.seq_len)
    gold, counts = held_out_sentences(shards, split, limit, limit_tokens)
    if not gold:
        raise DecoderError(f"{shards}: no {split} sentence of at most {limit_tokens} tokens")
    t0 = time.perf_counter()
    emb = embed(dec, gold)
    pred_ids = dec.generate_ids(emb, strategy=strategy)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    gold_ids = [g.tolist() for g in gold]
    pred_text, gold_text = dec.decode(pred_ids), dec.decode(gold_ids)
    scores = reconstruction_scores(pred_ids, gold_ids, pred_text, gold_text)
    cycle = cosine_rows(embed(dec, pred_ids), emb)
    scores["cycle_cosine"] = float(cycle.mean())
    # retrieval, the decoder-free reading of the embedding: the nearest training sentence
    train, _ = held_out_sentences(shards, "train", pool, limit_tokens)
    nearest_ids = [
        train[int(j)].tolist() for j in (_unit(emb) @ _unit(embed(dec, train)).T).argmax(1)
    ]
    nearest = dec.decode(nearest_ids)
    retrieval = reconstruction_scores(nearest_ids, gold_ids, nearest, gold_text)
    semantic_chance = None
    if semantic:
        judge = SemanticJudge()
        judged = judge.embed(gold_text)
        scores["semantic_cosine"] = judge.cosine(pred_text, judged)
        retrieval["semantic_cosine"] = judge.cosine(nearest, judged)
        semantic_chance = judge.chance(judged)
    shown = list(range(0, len(gold), max(1, len(gold) // examples)))[:examples]
    return {
        "decoder": str(Path(decoder_dir).resolve()),
        "encoder": dec.config["source"].get("encoder"),
        "step": dec.config["source"].get("step"),
        "split": split,
        "strategy": strategy,
        "sentences": counts,
        "scores": scores,
        "retrieval_scores": {**retrieval, "pool": len(train)},
        "semantic_chance": semantic_chance,
        "generate_seconds": round(seconds, 2),
        "examples": [
            {
                "original": gold_text[i],
                "reconstruction": pred_text[i],
                "nearest_train": nearest[i],
                "token_f1": token_f1(pred_ids[i], gold_ids[i]),
            }
            for i in shown
        ],  # fmt: skip
    }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def markdown(result: dict[str, Any]) -> tuple[str, str]:
    """(the scores table, the examples page)."""
    s, r = result["scores"], result.get("retrieval_scores")
    table = (
        f"Decoder `{result['decoder']}` (step {result['step']}) on {s['sentences']} held-out "
        f"`{result['split']}` sentences, {result['strategy']} decoding\n\n"
        "| method | token F1 | exact match | BLEU | chrF | cycle cosine | MiniLM cosine |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| decoder | {s['token_f1']:.3f} | {s['exact_match']:.3f} | {s['bleu']:.1f} | "
        f"{s['chrf']:.1f} | {s['cycle_cosine']:.3f} | {semantic_cell(s)} |\n"
    )
    if r is not None:  # the nearest of the training sentences by the encoder's cosine
        table += (
            f"| nearest of {r['pool']} training sentences | {r['token_f1']:.3f} | "
            f"{r['exact_match']:.3f} | {r['bleu']:.1f} | {r['chrf']:.1f} | — | {semantic_cell(r)} |\n"
        )
    table += semantic_note(result.get("semantic_chance"), "original")
    rows = ["| original | reconstruction | nearest training sentence | token F1 |",
            "|---|---|---|---|"]  # fmt: skip
    for e in result["examples"]:
        cells = [e["original"], e["reconstruction"], e["nearest_train"]]
        rows.append(
            "| " + " | ".join(c.replace("|", "\\|") for c in cells) + f" | {e['token_f1']:.2f} |"
        )
    return table, "# Reconstructions\n\n" + "\n".join(rows) + "\n"


def cmd_predict(args: argparse.Namespace) -> int:
    if args.text is None:  # over the validation windows
        result = predict_windows(args.run, args.decoder, args.max_batches, args.examples, args.tag,
                                 args.strategy, semantic=not args.no_semantic)  # fmt: skip
        print(write_reports(result, Path(args.out or args.decoder), "predict", predict_markdown))
        return 0
    if args.hide is None:
        print("error: --text needs --hide (the sentence to hide, 1-based)", file=sys.stderr)
        return 2
    r = predict_hidden(args.run, args.decoder, args.text, args.hide, args.tag)
    width = max(len("copy-neighbour"), 10)
    print(f"{'prediction':<{width}}  {r['prediction']}")
    print(f"{'true':<{width}}  {r['true']}")
    print(f"{'copy-neighbour':<{width}}  {r['copy_neighbour']}   (sentence {r['neighbour']})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = read_export_config(args.export)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: not an encoder export: {err}", file=sys.stderr)
        return 2
    seq_len = int(cfg["model"]["seq_len"])
    cmd = [sys.executable, str(TRAIN_PY), "--deepspeed_config", args.deepspeed_config,
           "--config", args.config, "objective=decoder", f"decoder.encoder={args.export}",
           f"data.shards={args.shards}", f"train.run_dir={args.out}", f"model.seq_len={seq_len}",
           *args.overrides]  # fmt: skip
    log.info("%s", " ".join(cmd))
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    out = export_decoder(args.out, Path(args.out) / "export")
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(export_decoder(args.run, args.out, args.tag))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate(args.decoder, args.shards, args.limit, args.split, args.examples,
                      strategy=args.strategy, semantic=not args.no_semantic)  # fmt: skip
    print(write_reports(result, Path(args.out or args.decoder), "decoder", markdown))
    return 0


def write_reports(result: dict[str, Any], out: Path, prefix: str, render: Any) -> str:
    """``PREFIX_eval.json``, ``PREFIX_eval.md`` (the table, returned) and ``PREFIX_examples.md``
    in ``out``; ``render(result)`` gives (table, examples page)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{prefix}_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    table, page = render(result)
    (out / f"{prefix}_eval.md").write_text(table)
    (out / f"{prefix}_examples.md").write_text(page)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lang_jepa.decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a decoder on an encoder export")
    p.add_argument("export", help="encoder export directory (python -m lang_jepa.export)")
    p.add_argument(
        "--shards", required=True, help="shard directory (train split trains, val scores)"
    )
    p.add_argument("--out", required=True, help="the decoder's run directory")
    p.add_argument("--config", default="decoder", help="preset or YAML file (default: decoder)")
    p.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    # dotted key=value config overrides follow the options (parsed as the unknown arguments)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("export", help="export a decoder run's checkpoint")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None)
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("eval", help="score reconstructions of held-out sentences")
    p.add_argument("decoder", help="decoder export directory")
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=500, help="held-out sentences scored (0: all)")
    p.add_argument("--examples", type=int, default=12)
    p.add_argument("--strategy", choices=("greedy", "top_p"), default="greedy")
    p.add_argument("--out", default=None, help="where the reports go (default: the decoder dir)")
    p.add_argument("--no-semantic", action="store_true",
                   help="skip the all-MiniLM-L6-v2 cosine (the semantic score)")  # fmt: skip
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("predict", help="hide a sentence, predict its concept, write it")
    p.add_argument("run", help="a jepa run directory (its predictor and context encoder)")
    p.add_argument("--decoder", required=True, help="decoder export trained on that run's export")
    p.add_argument("--text", default=None,
                   help="a passage of at least 2 sentences (without it: every masked sentence of "
                   "the run's validation windows, scored)")  # fmt: skip
    p.add_argument("--hide", type=int, default=None, help="the sentence to hide, 1-based")
    p.add_argument("--tag", default=None)
    p.add_argument("--max-batches", type=int, default=16, help="validation batches (no --text)")
    p.add_argument("--examples", type=int, default=12)
    p.add_argument("--strategy", choices=("greedy", "top_p"), default="greedy")
    p.add_argument("--out", default=None, help="where the reports go (default: the decoder dir)")
    p.add_argument("--no-semantic", action="store_true",
                   help="skip the all-MiniLM-L6-v2 cosine (the semantic score)")  # fmt: skip
    p.set_defaults(fn=cmd_predict)
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "train" or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (DecoderError, CheckpointError, ShardFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
