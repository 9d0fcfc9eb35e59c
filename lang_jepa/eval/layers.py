"""``python -m lang_jepa.eval.layers EXPORT [EXPORT ...] [--random SEED ...] [--out DIR]``

Where in an encoder each task's information lives. The encoder tasks (Lee50 Spearman on raw,
centred and whitened embeddings; the Rotten Tomatoes probe) are scored on every pooled hidden
state of each export, each pooled as the exported embedding is (mean over a document's tokens in
their windows):

- ``embeddings``: the embedding output (with rotary positions, the mean of the document's word
  vectors; with learned positions, word + position vectors, layer-normed for ``arch=bert``);
- ``block1`` .. ``blockD``: each transformer block's output (before the final norm, if any);
- ``final``: the final output, which is the exported embedding (``Encoder.encode``);
- ``first_last``: ``(layer_norm(embeddings) + final) / 2``, the norm without parameters (``final``
  is normed already): the bottom-and-top average of the sentence-embedding literature.

An export is named by its path, or by ``NAME`` given as ``NAME=EXPORT``. ``--random SEED`` adds a random-init encoder of the first export's architecture (``--random 0`` is
the evaluation suite's ``random`` baseline). Prints a markdown table; ``--out DIR`` also writes
``layers.json`` and ``layers.md``, each with the date, commit and machine. One forward pass per
text serves every hidden state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lang_jepa.encoder_api import CONFIG_NAME, TOKENIZER_DIR, Encoder, read_export_config
from lang_jepa.experiment.results import describe_machine, machine
from lang_jepa.runinfo import git_revision

from .loading import random_encoder
from .metrics import probe_accuracy
from .tasks import DEFAULT_EVAL_DATA, lee_corpus, lee_scores, rotten_tomatoes

log = logging.getLogger("lang_jepa.eval.layers")
COLUMNS = {"lee_spearman": "Lee50", "lee_spearman_centred": "Lee50 centred",
           "lee_spearman_whitened": "Lee50 whitened", "rt_accuracy": "RT probe"}  # fmt: skip


def layer_views(pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named [N, D] views of pooled hidden states [N, depth + 2, D] (see the module doc)."""
    if pooled.dim() != 3 or pooled.shape[1] < 3:
        raise ValueError(
            f"expected pooled hidden states [N, depth + 2, D], got {tuple(pooled.shape)}"
        )
    depth = pooled.shape[1] - 2
    views = {"embeddings": pooled[:, 0]}
    views.update({f"block{i}": pooled[:, i] for i in range(1, depth + 1)})
    views["final"] = pooled[:, -1]
    dim = pooled.shape[-1]
    views["first_last"] = (F.layer_norm(pooled[:, 0], (dim,)) + pooled[:, -1]) / 2
    return views


def layer_scores(encoder: Encoder, rt: tuple[list[str], np.ndarray] | None,
                 batch_size: int = 128) -> dict[str, dict[str, float]]:  # fmt: skip
    """{view: {lee_spearman, lee_spearman_centred, lee_spearman_whitened[, rt_accuracy]}}."""
    docs, _ = lee_corpus()
    lee = layer_views(
        encoder.encode(docs, level="document", batch_size=batch_size, all_layers=True)
    )
    probe = None
    if rt is not None:
        texts, labels = rt
        probe = layer_views(
            encoder.encode(texts, level="document", batch_size=batch_size, all_layers=True)
        )
    out: dict[str, dict[str, float]] = {}
    for name, z in lee.items():
        s = lee_scores(z)
        row = {"lee_spearman": s["spearman"], "lee_spearman_centred": s["spearman_centred"],
               "lee_spearman_whitened": s["spearman_whitened"]}  # fmt: skip
        if probe is not None:
            row["rt_accuracy"] = probe_accuracy(probe[name].numpy(), labels)["accuracy"]
        out[name] = row
    return out


def markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per encoder and view; the columns of :data:`COLUMNS` that were measured."""
    keys = [k for k in COLUMNS if any(k in row for r in results.values() for row in r.values())]
    lines = ["| encoder | view | " + " | ".join(COLUMNS[k] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]  # fmt: skip
    for name, views in results.items():
        for view, row in views.items():
            cells = " | ".join(f"{row[k]:.3f}" if k in row else "—" for k in keys)
            lines.append(f"| {name} | {view} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lang_jepa.eval.layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "exports",
        nargs="+",
        metavar="[NAME=]EXPORT",
        help="export directories (python -m lang_jepa.export), each named by its path or NAME",
    )
    parser.add_argument("--random", type=int, action="append", default=[], metavar="SEED",
                        help="add a random-init encoder of the first export's shape (repeatable)")  # fmt: skip
    parser.add_argument("--no-rt", action="store_true", help="skip the Rotten Tomatoes probe")
    parser.add_argument("--data-dir", default=str(DEFAULT_EVAL_DATA), help="the RT csv's directory")
    parser.add_argument("--rt-limit", type=int, default=None, help="a stratified RT subset")
    parser.add_argument("--out", default=None, help="write layers.json and layers.md here")
    args = parser.parse_args(argv)
    started = {"date": time.strftime("%Y-%m-%d"), "commit": git_revision()}  # the code that runs
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    named = [a.split("=", 1) if "=" in a else [a, a] for a in args.exports]
    paths = [Path(p) for _, p in named]
    for path in paths:  # every input checked before any is scored
        if not (path / CONFIG_NAME).is_file():
            parser.error(f"{path}: not an export directory (no {CONFIG_NAME})")
    jobs: list[tuple[str, Callable[[], Encoder]]] = [
        (name, lambda p=p: Encoder.from_pretrained(p, device="cpu"))
        for (name, _), p in zip(named, paths, strict=True)
    ]
    if args.random:
        model_cfg, tok = read_export_config(paths[0])["model"], paths[0] / TOKENIZER_DIR
        jobs += [
            (f"random-s{seed}",
             lambda seed=seed: random_encoder(model_cfg, model_cfg["vocab_size"], tok, seed))
            for seed in args.random
        ]  # fmt: skip
    rt = None if args.no_rt else rotten_tomatoes(Path(args.data_dir), limit=args.rt_limit)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, build in jobs:
        start = time.perf_counter()
        results[name] = layer_scores(build(), rt)
        log.info("%s: %d views in %.1f s", name, len(results[name]), time.perf_counter() - start)
    table = markdown(results)
    sys.stdout.write(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = {"rt": rt is not None, "rt_snippets": None if rt is None else len(rt[0]),
                    "random_seeds": args.random, **started,
                    "machine": describe_machine(machine())}  # fmt: skip
        (out / "layers.json").write_text(
            json.dumps({"settings": settings, "encoders": results}, indent=2) + "\n"
        )
        (out / "layers.md").write_text(
            f"{table}\nMeasured {settings['date']} on {settings['machine']}; commit "
            f"{settings['commit'][:12]}; RT: {settings['rt_snippets'] or 'not run'} snippets.\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
