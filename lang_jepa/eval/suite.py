"""The offline suite: load a run or an export, score it and the baselines with the same code.

:func:`evaluate` returns one JSON-able dict (the content of ``eval.json``):

    {"source": {...}, "settings": {...},
     "encoders": {name: {metric: value}},      # model [, model_online], baselines
     "chance": {metric: value},                # what a random guess scores
     "predictor": {...} | null,                # lang_jepa.eval.predictor.predictor_eval (runs)
     "skipped": {task: reason}, "seconds": {...}}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from lang_jepa.config import to_dict
from lang_jepa.encoder_api import CONFIG_NAME, TOKENIZER_DIR, Encoder, read_export_config

from .loading import LoadedRun, is_run_dir, load_run, make_encoder, random_encoder
from .predictor import eval_batches, predictor_eval
from .tasks import (
    DEFAULT_EVAL_DATA,
    Embedder,
    EncoderEmbedder,
    MiniLMEmbedder,
    MissingData,
    TfidfEmbedder,
    encoder_health,
    lee_similarity,
    rotten_tomatoes,
    sentiment_probe,
)

log = logging.getLogger("lang_jepa.eval")
BASELINES = ("random", "tfidf", "minilm")
QUICK_RT_LIMIT = 2000


def _model_embedders(
    path: Path, quick: bool
) -> tuple[list[Embedder], dict[str, Any], LoadedRun | None]:
    """The evaluated encoders of a run (target, and online unless quick) or of an export dir,
    plus a source description and the loaded run (None for an export)."""
    if is_run_dir(path):
        run = load_run(path)
        main = run.target if run.target is not None else run.online
        embs: list[Embedder] = [EncoderEmbedder(make_encoder(main, run.tokenizer_dir), "model")]
        if run.target is not None and run.online is not None and not quick:
            embs.append(
                EncoderEmbedder(make_encoder(run.online, run.tokenizer_dir), "model_online")
            )
        source = {"kind": "run", "path": str(path.resolve()), "tag": run.tag, "step": run.step,
                  "objective": run.objective,
                  "model": "target (EMA) encoder" if run.target is not None else "online encoder",
                  "model_online": "online (context) encoder"}  # fmt: skip
        return embs, source, run
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path}: neither a run directory (config.yaml + checkpoints/) nor an export ({CONFIG_NAME})"
        )
    enc = Encoder.from_pretrained(path, device="cpu")
    source = {"kind": "export", "path": str(path.resolve()), **enc.config.get("source", {}),
              "model": f"exported {enc.config.get('which', '?')} encoder"}  # fmt: skip
    return [EncoderEmbedder(enc, "model")], source, None


def _baseline(name: str, path: Path, run: LoadedRun | None) -> Embedder:
    if name == "tfidf":
        return TfidfEmbedder()
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "random":
        if run is not None:
            model_cfg, tok, vocab = to_dict(run.cfg)["model"], run.tokenizer_dir, run.vocab_size
        else:
            model_cfg = read_export_config(path)["model"]
            tok, vocab = path / TOKENIZER_DIR, model_cfg["vocab_size"]
        return EncoderEmbedder(random_encoder(model_cfg, vocab, tok), "random")
    raise ValueError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")


def encoder_tasks(embedders: list[Embedder], rt: tuple[list[str], np.ndarray] | None,
                  seconds: dict[str, float]) -> dict[str, dict[str, float]]:  # fmt: skip
    """Lee50 Spearman, RT probe (when ``rt`` is given) and health for every embedder."""
    out: dict[str, dict[str, float]] = {}
    for emb in embedders:
        start = time.perf_counter()
        lee = lee_similarity(emb)
        row = {"lee_spearman": lee["spearman"], "lee_spearman_centred": lee["spearman_centred"],
               "lee_spearman_whitened": lee["spearman_whitened"]}  # fmt: skip
        if rt is not None:
            probe = sentiment_probe(emb, *rt)
            row["rt_accuracy"], row["rt_train_accuracy"] = (
                probe["accuracy"],
                probe["train_accuracy"],
            )
        row.update(encoder_health(emb))
        out[emb.name] = row
        seconds[emb.name] = time.perf_counter() - start
        log.info("%s: %s (%.1f s)", emb.name, _short(row), seconds[emb.name])
    return out


def _short(row: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v:.3f}"
        for k, v in row.items()
        if k in ("lee_spearman", "rt_accuracy", "effective_rank")
    )


def evaluate(path: str | Path, baselines: list[str] | tuple[str, ...] = BASELINES, max_val_batches: int = 16,
             quick: bool = False, data_dir: Path = DEFAULT_EVAL_DATA, rt_limit: int | None = None,
             seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Run the whole suite on a run directory or an export directory (see the module docstring)."""
    t0 = time.perf_counter()
    path = Path(path)
    embs, source, run = _model_embedders(path, quick)
    embs += [_baseline(b, path, run) for b in baselines]
    skipped: dict[str, str] = {}
    rt_limit = rt_limit if rt_limit is not None else (QUICK_RT_LIMIT if quick else None)
    try:
        rt = rotten_tomatoes(data_dir, limit=rt_limit, seed=seed)
    except MissingData as err:
        rt, skipped["rt_probe"] = None, str(err)
        log.warning("sentiment probe skipped: %s", err)
    seconds: dict[str, float] = {}
    encoders = encoder_tasks(embs, rt, seconds)
    chance = {"lee_spearman": 0.0}
    if rt is not None:
        chance["rt_accuracy"] = float(max(rt[1].mean(), 1 - rt[1].mean()))
    predictor = None
    if run is not None and run.jepa is not None and run.target is not None:
        start = time.perf_counter()
        batches = eval_batches(run.cfg, max_val_batches)
        predictor = predictor_eval(
            run.jepa, run.target, batches, run.cfg.loss, seed=seed, target_cfg=run.cfg.target
        )
        predictor["n_batches"] = len(batches)
        seconds["predictor"] = time.perf_counter() - start
    elif run is not None:
        skipped["predictor"] = f"objective {run.objective!r} has no JEPA predictor / target encoder"
    else:
        skipped["predictor"] = "an export directory holds an encoder only (pass the run directory)"
    seconds["total"] = time.perf_counter() - t0
    settings = {"baselines": list(baselines), "max_val_batches": max_val_batches, "quick": quick,
                "rt_examples": None if rt is None else len(rt[0]), "seed": seed}  # fmt: skip
    return {"source": source, "settings": settings, "encoders": encoders, "chance": chance,
            "predictor": predictor, "skipped": skipped, "seconds": seconds}  # fmt: skip
