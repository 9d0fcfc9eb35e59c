"""Checkpoints: DeepSpeed's layout plus the state an exact resume needs.

``run_dir/checkpoints/<tag>/`` (tag ``step00000040``) holds:

- DeepSpeed's files: module and optimizer states, ZeRO partitions, fp32 masters (its own layout,
  readable by ``zero_to_fp32``);
- ``target_encoder.safetensors``: the EMA target encoder (fp32; identical on every rank, written
  by rank 0);
- ``trainer_state_rank{R}.pt``: that rank's global step, data-reader position and RNG states
  (tensors and plain Python values only: loadable with ``torch.load(weights_only=True)``);
- ``meta.json``: step, world size, ZeRO stage, resolved config, shard manifest hash.

A run that resumes on another number of ranks reads a partitioned checkpoint (ZeRO >= 1, or bf16's
partitioned fp32 masters) through DeepSpeed's universal checkpoint: rank 0 converts it once with
``ds_to_universal`` into ``checkpoints/universal/<tag>/`` (:func:`to_universal`; the save carries
the ``universal_checkpoint_info`` the converter asks for) and every rank loads that with
``checkpoint.load_universal``. The EMA target encoder is read from the original tag, and the data
position from every old rank's trainer state (:meth:`lang_jepa.data.TrainLoader.take_over`).

``checkpoints/latest`` names the newest *complete* checkpoint: it is replaced atomically by rank 0
only after every rank has finished writing (DeepSpeed's own ``latest`` is written before the other
ranks are done, so it is switched off). A crash while writing leaves the previous checkpoint whole
and ``latest`` pointing at it.

Reading is done here only, for the trainer's resume, export and evaluation alike: :func:`locate`
(a run, checkpoints or tag directory -> (checkpoints directory, tag)), :func:`read_meta`,
:func:`target_state` (the EMA target encoder) and :func:`consolidated_state` (the DeepSpeed
module's full fp32 state_dict, consolidated from the ZeRO partitions). Every error names the path.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger("lang_jepa")
TARGET_FILE = "target_encoder.safetensors"
META_FILE = "meta.json"
MODULE_STATES_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's module states (ZeRO-0: the weights)
ENCODER_PREFIX = "encoder."  # the encoder inside the DeepSpeed module (objective.JEPA, mlm.MLM)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    """torch / numpy / random states as tensors and plain values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "random": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuples(state["random"]))


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


TAG_RE = re.compile(r"step\d{8}")


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names, or None when there is no ``latest`` (it may be "" or garbage:
    :func:`resolve_resume` judges it)."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    try:
        return latest.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "\ufffd"  # unreadable: no tag directory has this name


def step_tags(ckpt_dir: Path) -> list[str]:
    """The ``step*`` checkpoint directories, oldest first (complete or not)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoints whose ``meta.json`` (written last) reads back, oldest first."""
    out = []
    for tag in step_tags(ckpt_dir):
        try:
            read_meta(ckpt_dir, tag)
        except CheckpointError:
            continue
        out.append(tag)
    return out


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where to resume from: ``auto`` (the run's ``latest``; None in a run directory without
    checkpoints), ``none`` (a fresh start on purpose), or a path to a ``<tag>`` directory or to a
    checkpoints directory holding ``latest``.

    A run directory that holds checkpoints is never restarted silently: with ``auto``, a
    ``latest`` that is empty, unreadable or names no checkpoint, and ``step*`` directories
    without ``latest``, raise :class:`CheckpointError` naming the newest complete checkpoint and
    the two ways on (``train.resume=PATH`` or ``train.resume=none``)."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = latest_tag(ckpt_dir)
        if tag is None:
            if not step_tags(ckpt_dir):
                return None  # a new run
            problem = "checkpoints but no 'latest' file"
        elif TAG_RE.fullmatch(tag) and (ckpt_dir / tag).is_dir():
            return ckpt_dir, tag
        elif not tag:
            problem = "an empty 'latest' file (a crash or a full disk while it was written?)"
        else:
            problem = f"a 'latest' file naming {tag[:40]!r}, which is not a checkpoint there"
        raise CheckpointError(_refuse_restart(ckpt_dir, problem))
    path = Path(resume)
    if (path / "latest").is_file():
        tag = latest_tag(path) or ""
        if not (TAG_RE.fullmatch(tag) and (path / tag).is_dir()):
            raise CheckpointError(
                _refuse_restart(path, f"train.resume={resume!r}: its 'latest' names {tag[:40]!r}")
            )
        return path, tag
    if (path / META_FILE).is_file():
        return path.parent, path.name
    raise CheckpointError(
        f"train.resume={resume!r}: no checkpoint there (want a checkpoint directory with "
        f"{META_FILE}, or a checkpoints directory with a 'latest' file)"
    )


def _refuse_restart(ckpt_dir: Path, problem: str) -> str:
    complete = complete_tags(ckpt_dir)
    if complete:
        newest = ckpt_dir / complete[-1]
        found = (
            f"the newest complete checkpoint is {newest}: resume from it with train.resume={newest}"
        )
    else:
        found = "no complete checkpoint is there"
    return (
        f"{ckpt_dir} holds {problem}; not starting afresh over it. {found}, or start afresh on "
        "purpose with train.resume=none (the run directory's checkpoints and logs are then moved "
        "to superseded/, never deleted)"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    engine: Any,
    ckpt_dir: Path,
    state: dict[str, Any],
    target: torch.nn.Module | None,
    meta: dict[str, Any],
    keep: int,
    barrier: Any,
) -> Path:
    """Write one checkpoint on every rank (a collective), then publish it as ``latest``."""
    tag = tag_for(int(state["step"]))
    rank = engine.global_rank
    from . import engine as ds  # save() runs under DeepSpeed only

    # with what ds_to_universal asks of a checkpoint before it converts it (another world size)
    client_state = {"step": int(state["step"]), **ds.universal_checkpoint_info()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    out = ckpt_dir / tag
    torch.save(state, out / f"trainer_state_rank{rank}.pt")
    if rank == 0 and target is not None:
        weights = {k: v.detach().contiguous().cpu() for k, v in target.state_dict().items()}
        save_file(weights, str(out / TARGET_FILE))
    barrier()  # every rank has written everything
    if rank == 0:
        # meta.json last, with every file and its size: its presence means "complete", and a
        # file lost or truncated later is named at load time
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        meta = {**meta, "files": files}
        _write_atomic(out / META_FILE, json.dumps(meta, indent=2, default=str))
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep, tag, meta.get("sequence"))
    barrier()
    log.info("saved checkpoint %s", out)
    return out


def _prune(ckpt_dir: Path, keep: int, current: str, sequence: str | None) -> None:
    """Keep the newest ``keep`` checkpoints of this run's sequence (``meta.json``'s
    ``sequence``, carried across resumes), ``current`` among them. Never deleted: a checkpoint
    newer than ``current``, one of another sequence (another run, or one started afresh in this
    directory) and one whose ``meta.json`` does not read back (it cannot be attributed)."""
    if keep <= 0 or sequence is None:
        return
    step = int(read_meta(ckpt_dir, current)["step"])
    ours = []
    for tag in step_tags(ckpt_dir):
        if tag == current:
            continue
        try:
            meta = read_meta(ckpt_dir, tag)
        except CheckpointError:
            continue
        if meta.get("sequence") == sequence and int(meta["step"]) < step:
            ours.append((int(meta["step"]), tag))
    for _, tag in sorted(ours)[: max(0, len(ours) - (keep - 1))]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        log.info("pruned checkpoint %s (train.keep_checkpoints=%d)", ckpt_dir / tag, keep)


def locate(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints directory, tag) of a complete checkpoint, from a run directory, its
    ``checkpoints/`` directory or one ``checkpoints/<tag>/`` directory. Without ``tag`` the
    checkpoint named by ``latest`` is taken (or the tag directory itself)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if tag is None and (p / META_FILE).is_file():
        return p.parent, p.name
    ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if not tag:
            raise CheckpointError(
                f"{ckpt_dir}: no checkpoint ('latest' missing); name a tag or a checkpoint directory"
            )
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{ckpt_dir / tag}: no such checkpoint")
    check_files(ckpt_dir, tag, read_meta(ckpt_dir, tag))  # complete and undamaged?
    return ckpt_dir, tag


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """A checkpoint's ``meta.json``: step, world size, ZeRO stage, resolved config, manifest hash."""
    path = ckpt_dir / tag / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir / tag}: incomplete checkpoint ({META_FILE} missing; the run may have died "
            "while writing it)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    for key in ("step", "config"):
        if key not in meta:
            raise CheckpointError(f"{path}: no {key!r} entry")
    return meta


def check_files(ckpt_dir: Path, tag: str, meta: dict[str, Any]) -> None:
    """Every file ``meta.json`` lists is there with its size, or CheckpointError naming them
    (checkpoints written before the list was kept are not checked)."""
    bad = []
    for name, size in meta.get("files", {}).items():
        path = ckpt_dir / tag / name
        if not path.is_file():
            bad.append(f"{name} is missing")
        elif path.stat().st_size != int(size):
            bad.append(f"{name} has {path.stat().st_size} bytes, {size} when written")
    if bad:
        raise CheckpointError(f"{ckpt_dir / tag}: damaged checkpoint: {'; '.join(bad)}")


def has_target(ckpt_dir: Path, tag: str) -> bool:
    """Whether the checkpoint holds an EMA target encoder (JEPA runs; not the MLM control)."""
    return (ckpt_dir / tag / TARGET_FILE).is_file()


def target_state(ckpt_dir: Path, tag: str) -> dict[str, Tensor]:
    """The EMA target encoder's fp32 state_dict, as saved with the checkpoint (on CPU)."""
    path = ckpt_dir / tag / TARGET_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} missing: incomplete checkpoint")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def consolidated_state(ckpt_dir: Path, tag: str) -> dict[str, Tensor]:
    """The DeepSpeed module's full fp32 state_dict (encoder and predictor or head), on CPU.

    ZeRO >= 1: the fp32 master weights, consolidated from every rank's partitions
    (:func:`lang_jepa.engine.consolidated_fp32_state`, DeepSpeed's ``zero_to_fp32``). ZeRO-0: the
    module states DeepSpeed saved, the fp32 weights themselves in fp32 training (bf16 training at
    ZeRO-0 keeps no fp32 masters on disk: its bf16 weights are upcast, with a warning).
    """
    zero_stage = int(read_meta(ckpt_dir, tag).get("zero_stage", 0))
    if zero_stage >= 1:
        from . import engine  # imports DeepSpeed, so only when a ZeRO checkpoint is read

        try:
            state = engine.consolidated_fp32_state(ckpt_dir, tag)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"{ckpt_dir / tag}: cannot consolidate the ZeRO-{zero_stage} checkpoint ({err})"
            ) from err
    else:
        state = _zero0_module_state(ckpt_dir / tag)
    return {k: v.float() for k, v in state.items()}


def encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's part of a :func:`consolidated_state` (``encoder.*`` keys, prefix removed)."""
    n = len(ENCODER_PREFIX)
    return {k[n:]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}


def _zero0_module_state(tag_dir: Path) -> dict[str, Tensor]:
    path = tag_dir / MODULE_STATES_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} missing: incomplete ZeRO-0 checkpoint")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - DeepSpeed pickles non-tensor objects beside the weights
        # DeepSpeed's own zero_to_fp32 loads these files with pickle too: read trusted runs only.
        log.warning("%s needs pickle to load (DeepSpeed's format); loading it as trusted", path)
        states = torch.load(path, map_location="cpu", weights_only=False)
    module = states.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: no 'module' state_dict")
    dtypes = {v.dtype for v in module.values() if torch.is_tensor(v)}
    if dtypes != {torch.float32}:
        log.warning(
            "%s holds %s module weights (bf16 training at ZeRO-0): reading them upcast to fp32; "
            "the exact fp32 masters need ZeRO >= 1",
            path,
            sorted(map(str, dtypes)),
        )
    return module


def read_state(
    ckpt_dir: Path, tag: str, rank: int, world: int, every_rank: bool = False
) -> tuple[dict, list[dict]]:
    """(meta, trainer states) of a checkpoint to resume from, checked before anything is loaded
    (every file there with its size). The states are this rank's alone when the checkpoint was
    written by as many ranks, else (or with ``every_rank``) every old rank's, in rank order."""
    meta = read_meta(ckpt_dir, tag)
    check_files(ckpt_dir, tag, meta)
    written_by = int(meta.get("world_size") or world)
    ranks = [rank] if written_by == world and not every_rank else list(range(written_by))
    states = []
    for r in ranks:
        state_file = ckpt_dir / tag / f"trainer_state_rank{r}.pt"
        if not state_file.is_file():
            raise CheckpointError(f"{state_file} is missing")
        states.append(torch.load(state_file, weights_only=True))
    return meta, states


UNIVERSAL_DIR = "universal"  # checkpoints/universal/<tag>/: converted for another world size
CONVERTED = "converted"  # written last into a universal tag directory: the conversion finished


def is_partitioned(ckpt_dir: Path, tag: str) -> bool:
    """Whether DeepSpeed split the checkpoint's optimizer state by rank (ZeRO >= 1, bf16): it
    then needs :func:`to_universal` to resume on another number of ranks."""
    return any((ckpt_dir / tag).glob("*zero_pp_rank_*"))


def to_universal(ckpt_dir: Path, tag: str, timeout_s: float = 3600.0) -> Path:
    """Convert checkpoint ``tag`` into DeepSpeed's universal format, once (rank 0 only; the
    others learn the outcome from it). Returns the directory to pass to ``load_checkpoint`` with
    that tag. A
    failed or interrupted conversion leaves nothing that looks finished; the error names the
    checkpoint and quotes the converter."""
    import subprocess
    import sys

    out_root = ckpt_dir / UNIVERSAL_DIR
    dest = out_root / tag
    if (dest / CONVERTED).is_file():
        return out_root
    work = out_root / f"{tag}.converting"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    # --inject_missing_state: checkpoints saved before they carried universal_checkpoint_info
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(ckpt_dir / tag), "--output_folder", str(work), "--num_extract_workers", "1",
           "--num_merge_workers", "1", "--inject_missing_state"]  # fmt: skip
    log.info("converting %s to a universal checkpoint for another world size", ckpt_dir / tag)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise CheckpointError(f"{ckpt_dir / tag}: ds_to_universal ran over {timeout_s} s") from err
    if proc.returncode != 0:
        raise CheckpointError(
            f"{ckpt_dir / tag}: ds_to_universal failed (exit {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    os.replace(work, dest)
    (dest / CONVERTED).write_text(f"from {ckpt_dir / tag}\n")
    (out_root / "latest_universal").unlink(missing_ok=True)  # the converter's; tags are explicit
    return out_root


def load(
    engine: Any,
    ckpt_dir: Path,
    tag: str,
    target: torch.nn.Module | None,
    engine_dir: Path | None = None,
) -> None:
    """Load model, optimizer and target encoder (after :func:`read_state`); DeepSpeed's part from
    ``engine_dir`` when given (:func:`to_universal`'s directory). A checkpoint that cannot be
    loaded is an error, never a silent fresh start."""
    try:
        load_path, _ = engine.load_checkpoint(str(engine_dir or ckpt_dir), tag=tag)
    except (AssertionError, OSError, KeyError, RuntimeError) as err:  # DeepSpeed's own checks
        raise CheckpointError(
            f"DeepSpeed could not load {ckpt_dir / tag} ({type(err).__name__}: {err})"
        ) from err
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}")
    if target is not None:
        target.load_state_dict(target_state(ckpt_dir, tag))
