"""Export a trained encoder from a run's checkpoint: consolidated fp32 safetensors + config + tokenizer.

    python -m lang_jepa.export RUN_DIR --out DIR [--tag TAG] [--which target|online] [--tokenizer PATH]

``RUN_DIR`` may be a run directory, its ``checkpoints/`` directory, or one ``checkpoints/<tag>/``.
``--which target`` (default) exports the EMA target encoder (the one I-JEPA evaluates), read from
the checkpoint's ``target_encoder.safetensors``; ``--which online`` exports the trained context
encoder from DeepSpeed's fp32 master weights (consolidated with ``zero_to_fp32`` at ZeRO-1/2/3,
from the module states at ZeRO-0). The output loads with
``lang_jepa.Encoder.from_pretrained(DIR)``:

    DIR/model.safetensors   TextEncoder state_dict, fp32
    DIR/config.json         {"format", "which", "model": the encoder's architecture
                             (lang_jepa.models.encoder_config: vocab_size, seq_len, dim, ...),
                             "source": run, tag, step, ZeRO stage, world size, manifest hash,
                             "tokenizer", "pooling"}
    DIR/tokenizer/          the shards' tokenizer files (from <data.shards>/tokenizer)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .encoder_api import CONFIG_NAME, FORMAT, TOKENIZER_DIR, WEIGHTS_NAME
from .models import build_encoder, encoder_config

log = logging.getLogger("lang_jepa.export")
TARGET_FILE = "target_encoder.safetensors"  # written by lang_jepa.checkpoint
META_FILE = "meta.json"
ONLINE_PREFIX = "encoder."  # the context encoder inside the DeepSpeed module (objective.JEPA)


class ExportError(RuntimeError):
    """The checkpoint to export is missing, incomplete or inconsistent (the message names the path)."""


def locate_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints directory, tag) from a run directory, a checkpoints directory or a tag directory.

    Without ``tag`` the one named by ``latest`` is taken.
    """
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    if (p / META_FILE).is_file() and tag is None:
        return p.parent, p.name
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise ExportError(
                f"{ckpt_dir}: no checkpoint ('latest' missing); pass --tag or a checkpoint directory"
            )
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise ExportError(f"{ckpt_dir / tag}: no such checkpoint")
    if not (ckpt_dir / tag / META_FILE).is_file():
        raise ExportError(
            f"{ckpt_dir / tag}: incomplete checkpoint ({META_FILE} missing; the run may "
            "have died while writing it)"
        )
    return ckpt_dir, tag


def target_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA target encoder's fp32 state_dict, as saved with the checkpoint."""
    path = tag_dir / TARGET_FILE
    if not path.is_file():
        raise ExportError(f"{path} missing: incomplete checkpoint")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def online_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The online (context) encoder's consolidated fp32 master weights."""
    tag_dir = ckpt_dir / tag
    if zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ExportError(
                f"{tag_dir}: cannot consolidate the ZeRO-{zero_stage} checkpoint ({err})"
            ) from err
    else:
        full = zero0_module_states(tag_dir)
    state = {
        k[len(ONLINE_PREFIX) :]: v.float() for k, v in full.items() if k.startswith(ONLINE_PREFIX)
    }
    if not state:
        raise ExportError(f"{tag_dir}: no '{ONLINE_PREFIX}*' weights in the DeepSpeed checkpoint")
    return state


def zero0_module_states(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Module weights of a ZeRO-0 checkpoint (fp32 training: the master weights themselves)."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ExportError(f"{path} missing: incomplete ZeRO-0 checkpoint")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - DeepSpeed pickles non-tensor objects beside the weights
        # DeepSpeed's own zero_to_fp32 loads these files with pickle too: export trusted runs only.
        log.warning("%s needs pickle to load (DeepSpeed's format); loading it as trusted", path)
        states = torch.load(path, map_location="cpu", weights_only=False)
    module = states.get("module")
    if not isinstance(module, dict):
        raise ExportError(f"{path}: no 'module' state_dict")
    dtypes = {v.dtype for v in module.values() if torch.is_tensor(v)}
    if dtypes != {torch.float32}:
        log.warning(
            "%s holds %s module weights (bf16 training at ZeRO-0): exporting them upcast to "
            "fp32; the exact fp32 masters need ZeRO >= 1",
            path,
            sorted(map(str, dtypes)),
        )
    return module


def read_checkpoint_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    meta = json.loads((ckpt_dir / tag / META_FILE).read_text())
    for key in ("step", "config"):
        if key not in meta:
            raise ExportError(f"{ckpt_dir / tag / META_FILE}: no {key!r} entry")
    return meta


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
    ckpt_dir, tag = locate_checkpoint(run, tag)
    meta = read_checkpoint_meta(ckpt_dir, tag)
    cfg = meta["config"]
    zero_stage = int(meta.get("zero_stage", 0))
    if which == "target":
        state = target_state_dict(ckpt_dir / tag)
    else:
        state = online_state_dict(ckpt_dir, tag, zero_stage)
    model = encoder_config(cfg["model"], state["tok_emb.weight"].shape[0])
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
            "tag": tag, "step": int(meta["step"]), "zero_stage": zero_stage,
            "world_size": meta.get("world_size"), "manifest_sha256": meta.get("manifest_sha256"),
        },
        "tokenizer": None if tok_src is None else {"dir": TOKENIZER_DIR, "source": str(tok_src.resolve())},
    }  # fmt: skip
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    log.info(
        "exported the %s encoder of %s (step %d) to %s", which, ckpt_dir / tag, meta["step"], out
    )
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = export(args.run, args.out, args.tag, args.which, args.tokenizer)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
