"""What copying the context gives within a window, in the space of any encoder export.

    python experiments/copy_ceiling.py EXPORT [EXPORT ...] --shards DIR [--batches 16] [--json F]

The predictor table ranks a hidden sentence among the window's hidden sentences (in-window) and
among every sentence of the window (in-document). Its copy baselines answer with a visible
sentence's embedding in the *model's own* space, so they only say how much a copy is worth to
that model. This script asks the same of any export (random init, the MLM control, a JEPA
export, all-MiniLM-L6-v2): every sentence of the validation windows read alone (as the export
embeds it), the hidden sentences of the validation masks ranked by cosine to

- ``copy_neighbour``: the nearest visible sentence (before it, else after it);
- ``copy_context``: the (layer-normed) mean of the window's visible sentences, as in the
  predictor table;
- ``length``: the hidden sentence's own length (what a mask token per hidden token tells);

with the chance MRR of a random ranking beside them. A strong sentence encoder whose
copy-neighbour ranks the right sentence above chance shows that the neighbours carry what the
hidden sentence says; an encoder whose copy-neighbour is at chance leaves its predictor nothing
to copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(export: str, shards: str, batches: int) -> dict[str, Any]:
    from lang_jepa.config import TargetConfig, load_config
    from lang_jepa.data.loader import StreamSpec, ValLoader
    from lang_jepa.encoder_api import Encoder
    from lang_jepa.eval.predictor import (
        _copy_context,
        _copy_neighbour,
        _local_retrieval,
        batch_lengths,
        length_space,
        window_sentences,
    )
    from lang_jepa.objectives.jepa import window_features

    enc = Encoder.from_pretrained(export, device="cpu")
    cfg = load_config("mini", [f"data.shards={shards}", f"model.seq_len={enc.seq_len}"])
    loader = ValLoader(StreamSpec.from_config(cfg, "val"), 0, 1, batches, cycle=False)
    view = TargetConfig(view="sentence")
    outs = []
    with torch.no_grad():
        for batch in loader:
            # every sentence read alone from position 0, as the export embeds a sentence
            sid = batch["sent_id"]
            ar = torch.arange(sid.shape[1]).expand_as(sid)
            start = torch.full((len(sid), int(sid.max()) + 2), sid.shape[1], dtype=torch.long)
            start = start.scatter_reduce(1, sid + 1, ar, "amin")
            pos = (ar - torch.gather(start, 1, sid + 1)).masked_fill(sid < 0, 0)
            feats = window_features(enc.model, {**batch, "position_ids": pos}, None, view)
            emb, sent_valid, slot_sentence = window_sentences(feats, batch)
            slot_valid = batch["tgt_sent_valid"]
            idx = slot_sentence.clamp(min=0)[..., None].expand(-1, -1, emb.shape[-1])
            targets = torch.gather(emb, 1, idx)
            ctx = _copy_context(feats, batch, (emb, sent_valid, slot_sentence))
            preds = {
                "copy_neighbour": _copy_neighbour(emb, sent_valid, slot_sentence),
                "copy_context": ctx[:, None, :].expand_as(targets),
            }
            o = {"targets": targets, "slot_valid": slot_valid, "preds": preds,
                 "sents": (emb, sent_valid, slot_sentence), "lengths": batch_lengths(batch)}  # fmt: skip
            outs.append(o)
    from lang_jepa.eval.metrics import RetrievalResult

    result: dict[str, Any] = {"export": export, "shards": shards, "batches": len(outs)}
    for method in ("copy_neighbour", "copy_context", "length"):
        spaces = [length_space(o) if method == "length" else o for o in outs]
        for name, within_doc in (("in_window", False), ("in_doc", True)):
            r = RetrievalResult.cat([_local_retrieval(o, method, within_doc) for o in spaces])
            s = r.summary()
            result[f"{method}_{name}_mrr"] = s["mrr"]
            result[f"chance_{name}_mrr"] = s["chance_mrr"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("exports", nargs="+", help="encoder export directories")
    parser.add_argument("--shards", required=True, help="shards whose val split is read")
    parser.add_argument("--batches", type=int, default=16, help="validation batches of 16 windows")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = [measure(e, args.shards, args.batches) for e in args.exports]
    cols = ["copy_neighbour", "copy_context", "length", "chance"]
    print("| export | " + " | ".join(f"{c} in-window / in-doc MRR" for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[f'{c}_in_window_mrr']:.3f} / {r[f'{c}_in_doc_mrr']:.3f}" for c in cols]
        print(f"| {r['export']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
