"""Predict, then say it: a JEPA run's predicted concepts, written as words by a concept decoder.

:func:`predict_hidden` hides one sentence of a passage; :func:`predict_windows` does it for every
masked sentence of the validation windows and scores three decodings against the true sentence:

- ``prediction``: the predictor's concept for the hidden sentence, from the rest of the window;
- ``copy_neighbour``: the embedding of the nearest visible sentence (before it, else after it),
  what a predictor that copies its neighbour would say;
- ``reconstruction``: the true sentence's own embedding, the most the decoder can say (its
  ceiling for this encoder).

The predictions live in the run's target space (the layer-normed, mean-pooled features of a
sentence read in its window); the decoder was trained on the export's embeddings of sentences
read alone, and layer-norms its input, so a prediction is decoded in nearly, but not exactly, the
space it learned. ``concept_cosine`` says how close each method's embedding is to the true
sentence's own.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import Decoder, DecoderError
from .metrics import (
    SemanticJudge,
    cosine_rows,
    reconstruction_scores,
    semantic_cell,
    semantic_note,
    token_f1,
)

METHODS = ("prediction", "copy_neighbour", "reconstruction")


def embed(dec: Decoder, ids: list[np.ndarray] | list[list[int]]) -> np.ndarray:
    """Sentence embeddings of token-id lists (each read on its own); an empty list gives zeros."""
    docs = [(np.asarray(i, dtype=np.int64), np.array([0, len(i)], dtype=np.int64)) for i in ids]
    out = np.zeros((len(ids), dec.encoder.dim), dtype=np.float32)
    keep = [k for k, (t, _) in enumerate(docs) if len(t)]
    if keep:
        out[keep] = dec.encoder.encode_ids([docs[k] for k in keep], level="document").numpy()
    return out


def load_predictor(run_dir: str | Path, decoder_dir: str | Path, tag: str | None) -> tuple:
    """(the run, the decoder), or a DecoderError saying why this pair cannot say a prediction."""
    from ..eval.loading import load_run

    run = load_run(run_dir, tag)
    if run.jepa is None:
        raise DecoderError(
            f"{run_dir}: objective {run.objective!r} has no predictor (a jepa run has)"
        )
    if run.jepa.projector is not None:
        raise DecoderError(
            f"{run_dir}: target.projector={run.cfg.target.projector}: the predictions live in the "
            "projector's space, which the decoder (trained on the encoder's embeddings) cannot read"
        )
    if run.cfg.mask.unit != "sentence":
        raise DecoderError(
            f"{run_dir}: mask.unit={run.cfg.mask.unit}: its predictor says hidden spans, not the "
            "hidden sentences the decoder is scored against"
        )
    dec = Decoder.from_pretrained(decoder_dir, device="cpu")
    if dec.encoder.dim != run.cfg.model.dim:
        raise DecoderError(
            f"{decoder_dir}: the decoder reads {dec.encoder.dim}-wide concepts, the run "
            f"{run_dir} predicts {run.cfg.model.dim}-wide ones (train the decoder on its export)"
        )
    return run, dec


def predict_hidden(run_dir: str | Path, decoder_dir: str | Path, text: str, hide: int,
                   tag: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Hide sentence ``hide`` (1-based) of ``text``, predict its concept from the rest with the run's
    predictor, and write three sentences: the decoded prediction, the true sentence and the
    decoded copy-neighbour baseline (the embedding of the sentence before it, or after the first)."""
    from ..data.masking import collate_rows, mask_indices
    from ..data.windows import Window

    run, dec = load_predictor(run_dir, decoder_dir, tag)
    ids, offsets = dec.encoder.tokenize_document(text)
    n = len(offsets) - 1
    if n < 2:
        raise DecoderError(
            f"--text has {n} sentence(s): at least 2 are needed (one hidden, one read)"
        )
    if not 1 <= hide <= n:
        raise DecoderError(f"--hide {hide}: the text has {n} sentences (1..{n})")
    if int(offsets[-1]) > run.cfg.model.seq_len:
        raise DecoderError(
            f"--text has {int(offsets[-1])} tokens, more than the run's window of {run.cfg.model.seq_len}"
        )
    s = hide - 1
    window = Window("predict", 0, 0, ids, offsets)
    batch = collate_rows(
        [[(window, mask_indices(offsets, [[s]]))]], run.cfg.model.seq_len, packed=False,
        queries=run.cfg.mask.queries,
    )  # fmt: skip
    with torch.no_grad():
        pred = run.jepa.predict(batch, *run.jepa.context_inputs(batch), batch["ctx_valid"])[0, 0]
    sentence = [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(n)]
    neighbour = s - 1 if s > 0 else s + 1
    concepts = torch.stack((pred.float(), torch.as_tensor(embed(dec, [sentence[neighbour]])[0])))
    written = dec.generate(concepts)
    return {
        "hidden": hide,
        "prediction": written[0],
        "true": dec.decode([sentence[s]])[0],
        "copy_neighbour": written[1],
        "neighbour": neighbour + 1,
        "run_step": run.step,
    }


def hidden_sentences(run: Any, batches: list[dict], max_tokens: int) -> tuple[dict, Counter]:
    """Every masked sentence of ``batches`` with its prediction: ``{"true": [ids], "neighbour":
    [ids], "prediction": [N, D]}``, and the sentences left out, counted by reason (over
    ``max_tokens`` tokens; no visible sentence in the window)."""
    from ..eval.predictor import neighbours, slot_sentences

    out: dict[str, list] = {"true": [], "neighbour": [], "prediction": []}
    skipped: Counter = Counter()
    for b in batches:
        with torch.no_grad():
            preds = run.jepa.predict(b, *run.jepa.context_inputs(b), b["ctx_valid"]).float()
        slots = slot_sentences(b)
        for r in range(b["input_ids"].shape[0]):
            sid, ids = b["sent_id"][r], b["input_ids"][r]
            n = int(sid.max()) + 1
            sentence = [ids[sid == j].tolist() for j in range(n)]
            near = neighbours(n, slots[r].tolist())
            for slot, j in enumerate(slots[r].tolist()):
                if j < 0:
                    continue
                if near[slot] < 0:
                    skipped["no_visible_sentence"] += 1
                elif len(sentence[j]) > max_tokens:
                    skipped["longer_than_max_tokens"] += 1
                else:
                    out["true"].append(sentence[j])
                    out["neighbour"].append(sentence[near[slot]])
                    out["prediction"].append(preds[r, slot].numpy())
    return out, skipped


def predict_windows(run_dir: str | Path, decoder_dir: str | Path, max_batches: int = 16,
                    examples: int = 12, tag: str | None = None,
                    strategy: str = "greedy", semantic: bool = True) -> dict[str, Any]:  # fmt: skip
    """Predict, then say it, over the run's validation windows (its mask draws, as the predictor
    table of the evaluation suite): each method's decoding scored against the true sentence
    (``semantic``: with all-MiniLM-L6-v2's cosine too, see :class:`SemanticJudge`). Returns the
    ``predict_eval.json`` content."""
    from ..eval.predictor import eval_batches

    run, dec = load_predictor(run_dir, decoder_dir, tag)
    limit = min(dec.max_tokens, dec.encoder.seq_len)
    hidden, skipped = hidden_sentences(run, eval_batches(run.cfg, max_batches), limit)
    if not hidden["true"]:
        raise DecoderError(f"{run_dir}: no masked validation sentence of at most {limit} tokens")
    true_emb = embed(dec, hidden["true"])
    concepts = {
        "prediction": np.stack(hidden["prediction"]),
        "copy_neighbour": embed(dec, hidden["neighbour"]),
        "reconstruction": true_emb,
    }
    true_text = dec.decode(hidden["true"])
    scores, written, written_ids = {}, {}, {}
    judge = SemanticJudge() if semantic else None
    judged = judge.embed(true_text) if judge is not None else None
    for name in METHODS:
        ids = dec.generate_ids(concepts[name], strategy=strategy)  # type: ignore[arg-type]
        written_ids[name], written[name] = ids, dec.decode(ids)
        s = reconstruction_scores(ids, hidden["true"], written[name], true_text)
        s["cycle_cosine"] = float(cosine_rows(embed(dec, ids), true_emb).mean())
        s["concept_cosine"] = float(cosine_rows(concepts[name], true_emb).mean())
        if judge is not None:
            s["semantic_cosine"] = judge.cosine(written[name], judged)
        scores[name] = s
    shown = list(range(0, len(true_text), max(1, len(true_text) // examples)))[:examples]
    return {
        "run": str(Path(run_dir).resolve()),
        "run_step": run.step,
        "decoder": str(Path(decoder_dir).resolve()),
        "strategy": strategy,
        "sentences": {"scored": len(true_text), **dict(skipped)},
        "scores": scores,
        "semantic_chance": None if judge is None else judge.chance(judged),
        "examples": [
            {
                "true": true_text[i],
                **{m: written[m][i] for m in METHODS},
                **{
                    f"{m}_token_f1": token_f1(written_ids[m][i], hidden["true"][i]) for m in METHODS
                },
            }
            for i in shown
        ],
    }


def predict_markdown(result: dict[str, Any]) -> tuple[str, str]:
    """(the scores table, the examples page) of :func:`predict_windows`."""
    head = (
        f"Run `{result['run']}` (step {result['run_step']}), decoder `{result['decoder']}`: "
        f"{result['sentences']['scored']} masked validation sentences, {result['strategy']} "
        "decoding\n\n| method | token F1 | exact match | BLEU | chrF | cycle cosine | concept "
        "cosine | MiniLM cosine |\n|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {m} | {s['token_f1']:.3f} | {s['exact_match']:.3f} | {s['bleu']:.1f} | "
        f"{s['chrf']:.1f} | {s['cycle_cosine']:.3f} | {s['concept_cosine']:.3f} | "
        f"{semantic_cell(s)} |"
        for m, s in result["scores"].items()
    ]
    page = ["# Predict, then say it", "",
            "| true sentence | prediction | copy-neighbour | reconstruction |", "|---|---|---|---|"]  # fmt: skip
    for e in result["examples"]:
        cells = [e["true"], *(f"{e[m]} ({e[f'{m}_token_f1']:.2f})" for m in METHODS)]
        page.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    note = semantic_note(result.get("semantic_chance"), "true sentence")
    return head + "\n".join(rows) + "\n" + note, "\n".join(page) + "\n"
