"""What made a run, saved with it: resolved config, git revision, package versions, manifest hash."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import logging.handlers
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .config import Config, to_yaml

PACKAGES = ("torch", "deepspeed", "transformers", "tokenizers", "webdataset", "blingfire", "numpy")


def git_revision() -> str:
    """``<sha>`` or ``<sha>-dirty`` of the source tree, or ``unknown`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_info(
    cfg: Config, manifest_sha256: str, world_size: int, ds_config: dict[str, Any]
) -> dict[str, Any]:
    return {
        "git_revision": git_revision(),
        "packages": package_versions(),
        "manifest_sha256": manifest_sha256,
        "world_size": world_size,
        "deepspeed_config": ds_config,
        "argv": sys.argv,
    }


def write_run_dir(run_dir: Path, cfg: Config, info: dict[str, Any]) -> None:
    """Create the run directory layout and write config.yaml and run_info.json (rank 0)."""
    for sub in ("tb", "checkpoints", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))


def setup_logging(rank: int) -> logging.Logger:
    """Rank 0 logs INFO to the console, other ranks only warnings. Records are also held in
    memory until :func:`attach_log_file` (called once the start is accepted) writes them to the
    run's log, so a refused start leaves the run directory as it was."""
    log = logging.getLogger("lang_jepa")
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    log.addHandler(
        logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    )
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return log


def attach_log_file(rank: int, run_dir: Path) -> None:
    """Send the held records and every later one to ``run_dir/logs/train.log`` (rank 0) or
    ``rank{R}.log``."""
    log = logging.getLogger("lang_jepa")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(
        run_dir / "logs" / ("train.log" if rank == 0 else f"rank{rank}.log")
    )
    handler.setFormatter(log.handlers[0].formatter)
    for held in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(handler)
        held.close()  # flushes into the file
        log.removeHandler(held)
    log.addHandler(handler)


SUPERSEDED = "superseded"
PRIOR_STATE = ("checkpoints", "logs", "tb", "config.yaml", "run_info.json")


def supersede(run_dir: Path, stamp: str) -> Path | None:
    """A fresh start in a run directory that holds an earlier run's state: move that state
    (checkpoints, logs, TensorBoard, config) to ``run_dir/superseded/<stamp>/``, never delete it.
    Returns where it went, or None when there was nothing to move."""
    present = [n for n in PRIOR_STATE if (run_dir / n).exists() and _nonempty(run_dir / n)]
    if not present:
        return None
    dest = run_dir / SUPERSEDED / stamp
    dest.mkdir(parents=True, exist_ok=False)
    for name in present:
        os.replace(run_dir / name, dest / name)
    return dest


def _nonempty(path: Path) -> bool:
    return path.is_file() or any(path.iterdir())


LOCK_NAME = ".lock"


class RunDirBusy(RuntimeError):
    """Another training holds the run directory."""


class RunDirLock:
    """An exclusive ``flock`` on ``run_dir/.lock``, held for the life of the training process
    (rank 0): a second training into the same directory fails at once, naming the holder's host
    and pid. The kernel releases the lock when the holder exits, however it exits (a crash,
    ``kill -9``, a requeue), so a stale lock never blocks the next start. On network file systems
    without ``flock`` support the lock is advisory only."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunDirBusy(
                f"{run_dir} is in use by another training ({holder}); wait for it to end, or "
                "choose another train.run_dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1
