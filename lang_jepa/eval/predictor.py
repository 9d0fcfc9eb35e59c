"""Does the predictor use the context? Held-out loss and masked-sentence retrieval vs controls.

For every masked (target) sentence of the validation batches, each *method* makes a prediction
[D] of its target embedding:

- ``model``: the trained context encoder + predictor (what training optimises);
- ``shuffled``: the same model, but each window's context (tokens, positions, validity) comes
  from a window of *another document*; target positions stay. If the predictor uses the
  context, its loss must rise sharply (``shuffled_loss_ratio`` = shuffled / model loss);
- ``copy_context``: the layer-normed mean of the visible (context) sentences' target embeddings;
- ``copy_neighbour``: the target embedding of the nearest visible sentence (the preceding one,
  else the following one); needs sentence ids, so it is left out by :func:`quick_eval`;
- ``batch_mean``: the mean target of the batch (the loss-optimal constant: regression to the mean);
- ``length`` (in-window retrieval only): the hidden sentence's length in tokens and nothing else, scored
  against the candidates' lengths. The predictor is told where each hidden sentence is (a mask
  token at each of its positions), so it knows its length; a window's sentences mostly differ in
  length, so this control alone ranks the right one high within its document, and a predictor
  must beat it there (and its own ``shuffled`` score) before its in-document score says it read
  the context.

Each method gets the held-out loss (``jepa_loss``'s prediction term) and retrieval by cosine:

- ``top1 / top5 / mrr``: candidates = the batch's masked sentences + a fixed pool of distractors
  (masked sentences of other validation batches, deduplicated, the first ``pool_size``);
- ``within_doc_*``: candidates = *every* sentence of the same window (target-encoder embeddings
  of the full window), so topic alone cannot score (needs sentence ids: ``sent_id`` in the batch);
- ``within_window_*``: candidates = the same window's masked sentences (from the batch contract
  alone; what :func:`quick_eval` reports).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lang_jepa.config import Config, LossConfig, TargetConfig
from lang_jepa.data.loader import StreamSpec, ValLoader
from lang_jepa.models import TextEncoder, pool_by_slot
from lang_jepa.objectives import (
    JEPA,
    autocast_context,
    gather_tokens,
    jepa_loss,
    pooled_targets,
    target_features,
)
from lang_jepa.objectives.jepa import same_window

from .metrics import (
    RetrievalResult,
    cosine_scores,
    effective_rank,
    fit_postprocess,
    health,
    retrieval_from_scores,
)

Batch = dict[str, Tensor]
METHODS = ("model", "shuffled", "copy_context", "copy_neighbour", "batch_mean")


def eval_batches(cfg: Config, max_batches: int) -> list[Batch]:
    """Deterministic validation batches: the trainer's validation loader for rank 0 of 1, each
    window once (no cycling), with ``sent_id`` [B, L] (each token's sentence in its window)."""
    return list(ValLoader(StreamSpec.from_config(cfg, "val"), 0, 1, max_batches, cycle=False))


def shuffled_contexts(batches: list[Batch], seed: int = 0) -> tuple[list[Batch], float]:
    """For every window, the context of another window, from another document when there is one.

    Returns per batch ``{"ctx_ids", "ctx_pos", "ctx_valid"}`` ([B, Nc'] each) and the fraction of
    windows whose donor had to come from the same document (1 document in the set)."""
    rows = [(i, r) for i, b in enumerate(batches) for r in range(b["input_ids"].shape[0])]
    docs = [int(batches[i]["doc_index"][r]) for i, r in rows]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    where = {k: p for p, k in enumerate(order)}
    donors, same_doc = [], 0
    for k in range(len(rows)):
        ring = [order[(where[k] + s) % len(rows)] for s in range(1, len(rows))] or [k]
        donor = next((d for d in ring if docs[d] != docs[k]), ring[0])
        same_doc += docs[donor] == docs[k]
        donors.append(donor)
    out, k = [], 0
    for b in batches:
        ids, pos = [], []
        for _ in range(b["input_ids"].shape[0]):
            i, r = rows[donors[k]]
            d = batches[i]
            keep = d["ctx_index"][r][d["ctx_valid"][r]]
            ids.append(d["input_ids"][r][keep])
            if "ctx_pos" in d:  # mask.queries: the donor's renumbered context positions
                pos.append(d["ctx_pos"][r][d["ctx_valid"][r]])
            else:
                pos.append(d["position_ids"][r][keep])
            k += 1
        n = max(len(x) for x in ids)
        valid = torch.stack([torch.arange(n) < len(x) for x in ids]).to(b["input_ids"].device)
        out.append({
            "ctx_ids": torch.stack([F.pad(x, (0, n - len(x))) for x in ids]),
            "ctx_pos": torch.stack([F.pad(x, (0, n - len(x))) for x in pos]),
            "ctx_valid": valid,
        })  # fmt: skip
    return out, same_doc / max(1, len(rows))


def window_sentences(feats: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Target embeddings of every sentence of each window (layer-normed, as targets are) from
    the target encoder's window features [B, L, D].

    Returns (sent_emb [B, N, D], sent_valid [B, N], slot_sentence [B, S]: the window sentence of
    each target slot, -1 for padding slots). Needs ``batch["sent_id"]``."""
    sid = batch["sent_id"]
    n = int(sid.max()) + 1
    feats = feats.float()
    valid = batch["valid"] & (sid >= 0)
    emb = F.layer_norm(pool_by_slot(feats, sid.clamp(min=0), valid, n), (feats.shape[-1],))
    sent_valid = (sid[..., None] == torch.arange(n, device=sid.device)).any(1)  # [B, N]
    return emb, sent_valid, slot_sentences(batch)


def slot_sentences(batch: Batch) -> Tensor:
    """[B, S]: the window sentence (``sent_id``) of each target slot, -1 for padding slots."""
    sid = batch["sent_id"]
    s = batch["tgt_sent_valid"].shape[1]
    slot_sentence = torch.full((sid.shape[0], s), -1, dtype=torch.long, device=sid.device)
    tgt_sid = gather_tokens(sid, batch["tgt_index"])
    for row in range(sid.shape[0]):
        m = batch["tgt_valid"][row]
        slot_sentence[row, batch["tgt_sent"][row][m]] = tgt_sid[row][m]
    return slot_sentence


def neighbours(n_sentences: int, slot_sentence: list[int]) -> list[int]:
    """For each target slot of one window (its sentence, -1 for padding), the nearest visible
    sentence: the one before it, else the one after it; -1 for padding or no visible sentence."""
    masked = {j for j in slot_sentence if j >= 0}
    visible = [j for j in range(n_sentences) if j not in masked]
    out = []
    for j in slot_sentence:
        before, after = [v for v in visible if v < j], [v for v in visible if v > j]
        out.append(-1 if j < 0 or not visible else (before[-1] if before else after[0]))
    return out


def _copy_neighbour(emb: Tensor, sent_valid: Tensor, slot_sentence: Tensor) -> Tensor:
    """[B, S, D]: for each target sentence the nearest visible sentence's embedding (before it,
    else after it); zeros when the window has no visible sentence."""
    out = torch.zeros(*slot_sentence.shape, emb.shape[-1])
    for row in range(emb.shape[0]):
        near = neighbours(int(sent_valid[row].sum()), slot_sentence[row].tolist())
        for slot, j in enumerate(near):
            if j >= 0:
                out[row, slot] = emb[row, j]
    return out


def _copy_context(
    feats: Tensor, batch: Batch, sents: tuple[Tensor, Tensor, Tensor] | None
) -> Tensor:
    """[B, D]: layer-normed mean of the visible sentences' target embeddings (with sentence ids),
    else of the target encoder's features over the context tokens."""
    if sents is not None:
        emb, sent_valid, slot_sentence = sents
        visible = sent_valid.clone()
        for row in range(emb.shape[0]):
            visible[row, slot_sentence[row][slot_sentence[row] >= 0]] = False
        w = visible.float()
        mean = (emb * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    else:
        ctx = gather_tokens(feats.float(), batch["ctx_index"])
        w = batch["ctx_valid"].float()
        mean = (ctx * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    return F.layer_norm(mean, (mean.shape[-1],))


@torch.no_grad()
def batch_predictions(model: JEPA, target: TextEncoder, batch: Batch, shuffled_ctx: Batch,
                      autocast: torch.dtype | None = None,
                      target_cfg: TargetConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """Targets [B, S, D], each method's predictions [B, S, D] and (with ``sent_id``) the window
    sentences, for one batch (sentence level whatever ``target.level`` the model trained at:
    a token-level model's sentence prediction is its token predictions' mean)."""
    slot_valid = batch["tgt_sent_valid"]
    with autocast_context(batch["input_ids"].device, autocast):
        preds = {
            "model": model.predict(batch, *model.context_inputs(batch), batch["ctx_valid"]).float(),
            "shuffled": model.predict(
                batch, shuffled_ctx["ctx_ids"], shuffled_ctx["ctx_pos"], shuffled_ctx["ctx_valid"]
            ).float(),
        }
    feats = target_features(target, batch, autocast, target_cfg)
    # one target forward serves every use below; every target-side embedding goes into the
    # loss's space (target.projector), where the predictions are
    targets = model.project(pooled_targets(feats, batch))
    sents = window_sentences(feats, batch) if "sent_id" in batch else None
    copy_ctx = model.project(_copy_context(feats, batch, sents))
    if sents is not None:
        sents = (model.project(sents[0]), *sents[1:])
    preds["copy_context"] = copy_ctx[:, None, :].expand_as(targets)
    preds["batch_mean"] = targets[slot_valid].mean(0).expand_as(targets)
    preds = {k: v.float().cpu() for k, v in preds.items()}  # metrics run on the CPU
    if sents is not None:
        sents = tuple(x.float().cpu() if x.is_floating_point() else x.cpu() for x in sents)
        preds["copy_neighbour"] = _copy_neighbour(*sents)
    return {
        "targets": targets.cpu(),
        "slot_valid": slot_valid.cpu(),
        "groups": batch["tgt_sent_win"].cpu(),  # each slot's window (loss.negatives=window)
        "preds": preds,
        "sents": sents,
        "lengths": batch_lengths(batch),
    }


def batch_lengths(batch: Batch) -> tuple[Tensor, Tensor | None, int]:
    """(each target slot's length [B, S], each window sentence's length [B, N] or None without
    ``sent_id``, the window length L): what :func:`length_space` reads, on the CPU."""
    slot_valid = batch["tgt_sent_valid"]
    tgt_len = torch.zeros(slot_valid.shape, dtype=torch.long, device=slot_valid.device)
    tgt_len.scatter_add_(1, batch["tgt_sent"].long(), batch["tgt_valid"].long())
    sent_len = None
    if "sent_id" in batch:
        sid = batch["sent_id"]
        sent_len = (sid[..., None] == torch.arange(int(sid.max()) + 1, device=sid.device)).sum(1)
        sent_len = sent_len.cpu()
    return tgt_len.cpu(), sent_len, batch["input_ids"].shape[1]


def length_space(o: dict[str, Any]) -> dict[str, Any]:
    """One batch's outputs in a space that holds nothing but each sentence's length in tokens,
    with the ``length`` method predicting the true length of every hidden sentence: what a
    predictor gets from being told where the hidden sentences are (one mask token per target
    token) without reading any context. A length L is the unit vector at angle L x pi / (2 x
    window), so the cosine of two sentences falls as their lengths part."""
    tgt_len, sent_len, window = o["lengths"]

    def unit(n: Tensor) -> Tensor:
        angle = n.double() * (math.pi / (2 * window))
        return torch.stack([angle.cos(), angle.sin()], -1).float()

    sents = o["sents"]
    if sents is not None:
        sents = (unit(sent_len), sents[1], sents[2])
    return {**o, "targets": unit(tgt_len), "preds": {"length": unit(tgt_len)}, "sents": sents}


def _pool_retrieval(outs: list[dict[str, Any]], method: str, pool_size: int) -> RetrievalResult:
    """Each batch's predictions vs its masked sentences + a fixed, deduplicated distractor pool."""
    flat = [o["targets"][o["slot_valid"]] for o in outs]
    results = []
    for i, o in enumerate(outs):
        others = [t for j, t in enumerate(flat) if j != i]
        pool = torch.unique(torch.cat(others), dim=0)[:pool_size] if others else flat[i][:0]
        cands = torch.cat([flat[i], pool])
        queries = o["preds"][method][o["slot_valid"]]
        results.append(
            retrieval_from_scores(cosine_scores(queries, cands), torch.arange(len(queries)))
        )
    return RetrievalResult.cat(results)


def _local_retrieval(o: dict[str, Any], method: str, within_doc: bool) -> RetrievalResult:
    """Candidates from the query's own window: every sentence (within_doc) or its masked ones."""
    q = o["preds"][method]  # [B, S, D]
    if within_doc:
        cands, cand_valid, correct = o["sents"][0], o["sents"][1], o["sents"][2]
    else:
        cands, cand_valid = o["targets"], o["slot_valid"]
        correct = torch.arange(q.shape[1]).expand(q.shape[0], -1)
    scores = torch.round(torch.einsum("bsd,bnd->bsn", F.normalize(q, dim=-1),
                                      F.normalize(cands, dim=-1)) * 1e6) / 1e6  # fmt: skip
    m = o["slot_valid"]
    valid = cand_valid[:, None, :].expand(-1, q.shape[1], -1)
    return retrieval_from_scores(scores[m], correct[m], valid[m])


def method_metrics(outs: list[dict[str, Any]], method: str, loss_cfg: LossConfig,
                   pool_size: int = 256) -> dict[str, float]:  # fmt: skip
    """Loss (mean over batches, as ``val/loss``) and retrieval summaries of one method."""
    losses = []
    for o in outs:
        keep = None  # loss.negatives=window: each slot's own window's targets
        if loss_cfg.negatives == "window":
            keep = same_window(o["groups"])
        _, parts = jepa_loss(
            o["preds"][method], o["targets"], o["slot_valid"], loss_cfg, None, keep
        )
        losses.append(parts["pred_loss"])
    out = {"loss": float(torch.stack(losses).mean())}
    pool = _pool_retrieval(outs, method, pool_size)
    out.update(pool.summary())
    local = RetrievalResult.cat([_local_retrieval(o, method, within_doc=False) for o in outs])
    out.update(local.summary("within_window_"))
    if all(o["sents"] is not None for o in outs):
        doc = RetrievalResult.cat([_local_retrieval(o, method, within_doc=True) for o in outs])
        out.update(doc.summary("within_doc_"))
    return out


def _mapped(o: dict[str, Any], fn: Any) -> dict[str, Any]:
    """One batch's outputs with ``fn`` applied to every embedding (targets, predictions, window
    sentences)."""
    sents = o["sents"]
    if sents is not None:
        sents = (fn(sents[0]), sents[1], sents[2])
    preds = {k: fn(v) for k, v in o["preds"].items()}
    return {**o, "targets": fn(o["targets"]), "preds": preds, "sents": sents}


def predictor_eval(model: JEPA, target: TextEncoder, batches: list[Batch], loss_cfg: LossConfig,
                   autocast: torch.dtype | None = None, pool_size: int = 256,
                   seed: int = 0, target_cfg: TargetConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """Every method's loss and retrieval on ``batches`` plus health of targets and predictions.

    Returns {"methods": {method: {metric: value}}, "methods_centred" / "methods_whitened": the
    retrieval metrics after centring / whitening with statistics of the evaluation sentences'
    target embeddings, "health": {"targets": ..., "predictions":
    ...}, "shuffled_loss_ratio", "shuffled_same_doc_frac", "n_queries", "ranks": model's
    expected ranks (for the histogram)}."""
    was_training = model.training
    model.eval()
    try:
        shuffled, same_doc = shuffled_contexts(batches, seed)
        outs = [
            batch_predictions(model, target, b, s, autocast, target_cfg)
            for b, s in zip(batches, shuffled, strict=True)
        ]
    finally:
        model.train(was_training)
    methods = [m for m in METHODS if all(m in o["preds"] for o in outs)]
    res = {m: method_metrics(outs, m, loss_cfg, pool_size) for m in methods}
    # the length control: retrieval by the hidden sentence's length alone, within its window (no
    # loss, another space; no pool scores: the pool is deduplicated by embedding, which here would
    # merge every two sentences of one length)
    lengths = method_metrics([length_space(o) for o in outs], "length", loss_cfg, pool_size)
    res["length"] = {
        k: v for k, v in lengths.items() if k.startswith(("within_doc_", "within_window_"))
    }
    t = torch.cat([o["targets"][o["slot_valid"]] for o in outs])
    p = torch.cat([o["preds"]["model"][o["slot_valid"]] for o in outs])
    # retrieval again after centring / whitening every embedding with statistics of the
    # evaluation sentences' target embeddings (every window sentence when known), no labels
    fit_on = torch.cat([o["sents"][0][o["sents"][1]] for o in outs]) if outs[0]["sents"] else t
    spaces = {}
    for mode in ("centred", "whitened"):
        mapped = [_mapped(o, fit_postprocess(fit_on, mode)) for o in outs]
        spaces[f"methods_{mode}"] = {
            m: {k: v for k, v in method_metrics(mapped, m, loss_cfg, pool_size).items() if k != "loss"}
            for m in methods
        }  # fmt: skip
    return {
        "methods": res,
        **spaces,
        "health": {"targets": health(t), "predictions": health(p, pairs=(p, t))},
        "shuffled_loss_ratio": res["shuffled"]["loss"] / max(res["model"]["loss"], 1e-12),
        "shuffled_same_doc_frac": same_doc,
        "n_queries": int(t.shape[0]),
        "ranks": _pool_retrieval(outs, "model", pool_size).rank.tolist(),
    }


def quick_eval(model: JEPA, target: TextEncoder, val_batches: list[Batch], loss_cfg: LossConfig | None = None,
               autocast: torch.dtype | None = None, pool_size: int = 256, seed: int = 0,
               target_cfg: TargetConfig | None = None) -> dict[str, float]:  # fmt: skip
    """A cheap subset of the suite for the training loop (rank 0, every N steps); no I/O.

    ``model``: the JEPA module (``engine.module``), ``target``: the EMA target encoder,
    ``val_batches``: batches of the batch contract on the model's device (e.g. the trainer's
    val loader's). Runs under ``torch.no_grad``, restores the model's train/eval mode. Keys
    (prefix them with ``eval/`` to log): ``retrieval_top1``, ``retrieval_top5``,
    ``retrieval_mrr``, ``retrieval_chance_top1``, ``within_window_top1``, ``within_window_mrr``,
    ``loss``, ``shuffled_loss``, ``shuffled_loss_ratio``, ``shuffled_top1``,
    ``copy_context_loss``, ``copy_context_top1``, ``batch_mean_loss``, ``effective_rank``
    (targets), ``pred_effective_rank``, ``target_std``, ``pred_std``, ``uniformity``,
    ``alignment``, ``seconds``; with ``sent_id`` in every batch (the validation loader's) also
    ``within_doc_top1``, ``within_doc_mrr`` and ``{copy_neighbour,copy_context}_within_doc_mrr``
    (every sentence of the window is a candidate, so topic alone cannot score).
    """
    start = time.perf_counter()
    r = predictor_eval(
        model, target, val_batches, loss_cfg or LossConfig(), autocast, pool_size, seed, target_cfg
    )
    m = r["methods"]
    out: dict[str, float] = defaultdict(float)
    for key in ("top1", "top5", "mrr", "chance_top1"):
        out[f"retrieval_{key}"] = m["model"][key]
    out["within_window_top1"] = m["model"]["within_window_top1"]
    out["within_window_mrr"] = m["model"]["within_window_mrr"]
    out["loss"] = m["model"]["loss"]
    out["shuffled_loss"] = m["shuffled"]["loss"]
    out["shuffled_loss_ratio"] = r["shuffled_loss_ratio"]
    out["shuffled_top1"] = m["shuffled"]["top1"]
    out["copy_context_loss"] = m["copy_context"]["loss"]
    out["copy_context_top1"] = m["copy_context"]["top1"]
    out["batch_mean_loss"] = m["batch_mean"]["loss"]
    if "within_doc_mrr" in m["model"]:
        out["within_doc_top1"] = m["model"]["within_doc_top1"]
        out["within_doc_mrr"] = m["model"]["within_doc_mrr"]
        for method in ("copy_neighbour", "copy_context"):
            out[f"{method}_within_doc_mrr"] = m[method]["within_doc_mrr"]
    ht, hp = r["health"]["targets"], r["health"]["predictions"]
    out["effective_rank"] = ht["effective_rank"]
    out["pred_effective_rank"] = hp["effective_rank"]
    out["target_std"] = ht["dim_std"]
    out["pred_std"] = hp["dim_std"]
    out["uniformity"] = ht["uniformity"]
    out["alignment"] = hp.get("alignment", float("nan"))
    out["seconds"] = time.perf_counter() - start
    return dict(out)


__all__ = ["eval_batches", "effective_rank", "predictor_eval", "quick_eval", "shuffled_contexts"]
