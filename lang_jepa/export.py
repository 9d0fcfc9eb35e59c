"""Export a trained encoder from a run's checkpoint: consolidated fp32 safetensors + config + tokenizer.

    python -m lang_jepa.export RUN_DIR --out DIR [--tag TAG] [--which target|online] [--tokenizer PATH]
                               [--format native|hf]

``RUN_DIR`` may be a run directory, its ``checkpoints/`` directory, or one ``checkpoints/<tag>/``.
``--which target`` (default) exports the EMA target encoder (the one I-JEPA evaluates), read from
the checkpoint's ``target_encoder.safetensors``; ``--which online`` exports the trained context
encoder from DeepSpeed's fp32 master weights (:func:`lang_jepa.checkpoint.consolidated_state`:
``zero_to_fp32`` at ZeRO-1/2/3, the module states at ZeRO-0). The output loads with
``lang_jepa.Encoder.from_pretrained(DIR)``:

    DIR/model.safetensors   TextEncoder state_dict, fp32
    DIR/config.json         {"format", "which", "model": the encoder's architecture
                             (lang_jepa.models.encoder_config: vocab_size, seq_len, dim, ...),
                             "source": run, tag, step, ZeRO stage, world size, manifest hash,
                             "tokenizer", "pooling"}
    DIR/tokenizer/          the shards' tokenizer files (from <data.shards>/tokenizer)

``--format hf`` writes the Hugging Face layout instead (:mod:`lang_jepa.hf`): ``AutoModel`` and
``SentenceTransformer`` load it with ``trust_remote_code=True``, and it carries a model card.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from . import checkpoint
from .checkpoint import CheckpointError
from .encoder_api import CONFIG_NAME, FORMAT, TOKENIZER_DIR, WEIGHTS_NAME
from .models import build_encoder, encoder_config

log = logging.getLogger("lang_jepa.export")
# A checkpoint that cannot be exported, or a bad request (the message names the path): one error
# type with the checkpoint readers'.
ExportError = CheckpointError


def tokenizer_source(meta: dict[str, Any], override: str | None) -> Path | None:
    """The shards' tokenizer directory recorded in the checkpoint's config (or ``override``)."""
    if override == "none":
        return None
    if override is not None:
        path = Path(override)
    else:
        path = Path(meta["config"]["data"]["shards"]) / TOKENIZER_DIR
    if not (path.is_dir() and any(path.iterdir())):
        raise ExportError(
            f"tokenizer directory {path} not found (the run's data.shards/tokenizer); "
            "pass --tokenizer PATH, or --tokenizer none to export without one"
        )
    return path


def export(run: str | Path, out: str | Path, tag: str | None = None, which: str = "target",
           tokenizer: str | None = None) -> Path:  # fmt: skip
    """Write ``out/model.safetensors``, ``out/config.json`` and ``out/tokenizer/``; returns ``out``."""
    if which not in ("target", "online"):
        raise ExportError(f"--which must be target or online, got {which!r}")
    ckpt_dir, tag = checkpoint.locate(run, tag)
    meta = checkpoint.read_meta(ckpt_dir, tag)
    if which == "target":
        state = checkpoint.target_state(ckpt_dir, tag)
    else:
        state = checkpoint.encoder_state(checkpoint.consolidated_state(ckpt_dir, tag))
        if not state:
            raise ExportError(
                f"{ckpt_dir / tag}: no '{checkpoint.ENCODER_PREFIX}*' weights in the DeepSpeed "
                "checkpoint"
            )
    if "tok_emb.weight" not in state:
        raise ExportError(f"{ckpt_dir / tag}: the {which} encoder has no token embedding")
    model = encoder_config(meta["config"]["model"], state["tok_emb.weight"].shape[0])
    try:  # the weights must fit the architecture the config describes, exactly
        build_encoder(model, model["vocab_size"]).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(
            f"{ckpt_dir / tag}: {which} weights do not match the config's encoder: {err}"
        ) from err
    tok_src = tokenizer_source(meta, tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": FORMAT, "which": which})  # fmt: skip
    if tok_src is not None:
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
        shutil.copytree(tok_src, out / TOKENIZER_DIR)
    config = {
        "format": FORMAT,
        "which": which,
        "model": model,
        "pooling": "mean over a sentence's (or document's) final token features, in windows of whole "
                   "sentences <= seq_len tokens; training targets add a layer norm without affine",
        "source": {
            "run_dir": str(ckpt_dir.parent.resolve()), "checkpoint": str((ckpt_dir / tag).resolve()),
            "tag": tag, "step": int(meta["step"]), "zero_stage": int(meta.get("zero_stage", 0)),
            "world_size": meta.get("world_size"), "manifest_sha256": meta.get("manifest_sha256"),
        },
        "tokenizer": None if tok_src is None else {"dir": TOKENIZER_DIR, "source": str(tok_src.resolve())},
    }  # fmt: skip
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    log.info(
        "exported the %s encoder of %s (step %d) to %s", which, ckpt_dir / tag, meta["step"], out
    )
    return out


def export_random_init(model_cfg: dict[str, Any], vocab_size: int, tokenizer_dir: Path, out: Path,
                       seed: int = 0, init_from: str | None = None) -> Path:  # fmt: skip
    """A freshly initialised encoder (the random-init baseline, seeded), or with ``init_from`` a
    BERT-family checkpoint's weights in it, in the export format, with ``tokenizer_dir`` copied
    beside it; returns ``out``."""
    from .eval.loading import random_encoder
    from .pretrained import load_pretrained

    enc = random_encoder(model_cfg, vocab_size, tokenizer_dir, seed=seed)
    if init_from:
        load_pretrained(enc.model, init_from)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT, "which": "init"})
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    shutil.copytree(tokenizer_dir, out / TOKENIZER_DIR)
    config = {"format": FORMAT, "which": "init", "model": encoder_config(model_cfg, vocab_size),
              "source": {"kind": "pretrained", "init_from": str(init_from), "step": 0} if init_from
              else {"kind": "random_init", "seed": seed, "step": 0},
              "tokenizer": {"dir": TOKENIZER_DIR, "source": str(Path(tokenizer_dir).resolve())}}  # fmt: skip
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lang_jepa.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "run", help="run directory, its checkpoints/ directory, or a checkpoint <tag> directory"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--tag", default=None, help="checkpoint tag (default: the one named by 'latest')"
    )
    parser.add_argument(
        "--which",
        choices=("target", "online"),
        default="target",
        help="EMA target encoder (default) or the online context encoder",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory to copy (default: <data.shards>/tokenizer); 'none' skips it",
    )
    parser.add_argument(
        "--format",
        choices=("native", "hf"),
        default="native",
        help="native (lang_jepa.Encoder) or hf: a directory that transformers.AutoModel and "
        "sentence_transformers.SentenceTransformer load (trust_remote_code=True), with a model card",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.format == "hf":
            out = export_hf(args.run, args.out, args.tag, args.which, args.tokenizer)
        else:
            out = export(args.run, args.out, args.tag, args.which, args.tokenizer)
    except (CheckpointError, ValueError) as err:  # HFExportError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


def export_hf(run: str | Path, out: str | Path, tag: str | None = None, which: str = "target",
              tokenizer: str | None = None) -> Path:  # fmt: skip
    """:func:`export`, then :func:`lang_jepa.hf.to_hf` into ``out``; the model card carries the
    run's ``eval/eval.md`` when ``python -m lang_jepa.eval`` has written one."""
    import tempfile

    from .hf import to_hf

    ckpt_dir, _ = checkpoint.locate(run, tag)
    eval_md = ckpt_dir.parent / "eval" / "eval.md"
    with tempfile.TemporaryDirectory(prefix="lang_jepa_export_") as tmp:
        native = export(run, Path(tmp) / "native", tag, which, tokenizer)
        return to_hf(native, out, eval_md.read_text() if eval_md.is_file() else None)


if __name__ == "__main__":
    sys.exit(main())
