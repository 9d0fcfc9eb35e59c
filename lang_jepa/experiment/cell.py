"""One variant x seed ("cell"): train with the real engine, export, evaluate each budget point.

Training is ``train.py`` as a subprocess (one process, or the deepspeed launcher), with
``train.resume=auto``, so a cell killed mid-training resumes from its newest checkpoint when the
harness runs again. Every evaluated point is exported with :func:`lang_jepa.export.export`
(``export/stepNNNNNNNN/{target,online}``; the last point also at ``export/{target,online}``) and
scored by the suite's own functions; each point's scores are cached in ``eval/stepNNNNNNNN.json``.
An untrained variant's export (``export/init``) is :func:`lang_jepa.eval.loading.random_encoder`,
the suite's random-init baseline, seeded with the cell's seed. ``result.json`` marks a cell done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lang_jepa.checkpoint import TAG_RE, TARGET_FILE, latest_tag, tag_for
from lang_jepa.encoder_api import CONFIG_NAME, TOKENIZER_DIR, Encoder
from lang_jepa.eval.loading import load_run
from lang_jepa.eval.predictor import eval_batches, predictor_eval
from lang_jepa.eval.suite import encoder_tasks
from lang_jepa.eval.tasks import EncoderEmbedder
from lang_jepa.export import export, export_random_init
from lang_jepa.report import read_jsonl
from lang_jepa.runinfo import git_revision

from .results import machine
from .spec import Cell, ExperimentSpec, model_config

log = logging.getLogger("lang_jepa.experiment")
TRAIN_PY = Path(__file__).resolve().parent.parent.parent / "train.py"
RESULT_FILE = "result.json"
Progress = Callable[[Cell, int, float], None]  # (cell, step reached, seconds this cell trained)


class CellFailed(RuntimeError):
    """A cell's training or evaluation failed (the message names the cell and its log)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT reached the harness; the training child was asked to checkpoint."""


def train_command(cell: Cell, spec: ExperimentSpec, port: int | None = None) -> list[str]:
    """The command that trains ``cell`` (``train.py`` with every override)."""
    if not TRAIN_PY.is_file():
        raise CellFailed(f"{TRAIN_PY} not found (the harness runs the repository's train.py)")
    args = [str(TRAIN_PY), "--deepspeed_config", spec.base.deepspeed_config,
            "--config", spec.base.config, *cell.overrides]  # fmt: skip
    if spec.run.launcher == "python":
        return [sys.executable, "-u", *args]
    launcher = Path(sys.executable).parent / "deepspeed"
    port_args = ["--master_port", str(port)] if port else []
    return [str(launcher), "--num_gpus", str(spec.run.ranks), *port_args, *args]


def trained_step(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0 without one)."""
    tag = latest_tag(run_dir / "checkpoints")
    return int(tag.removeprefix("step")) if tag and TAG_RE.fullmatch(tag) else 0


def logged_step(run_dir: Path) -> int:
    """The last step in ``logs/metrics.jsonl`` (0 before the first record)."""
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 8192))
        for line in reversed(f.read().decode(errors="replace").splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(cell: Cell, spec: ExperimentSpec, progress: Progress, poll_s: float = 10.0) -> float:
    """Train (or resume) ``cell`` to its last step. Returns the seconds spent this time."""
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port() if spec.run.launcher == "deepspeed" else None
    cmd = train_command(cell, spec, port)
    log_path = cell.run_dir / "harness_train.log"
    env = {**os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with open(log_path, "a") as out:
        out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            while proc.poll() is None:
                progress(cell, logged_step(cell.run_dir), time.perf_counter() - start)
                _wait(proc, poll_s)
        except KeyboardInterrupt:
            log.warning("%s: interrupted; asking train.py to checkpoint (SIGTERM)", cell.name)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise CellFailed(f"{cell.name}: train.py exited with {proc.returncode}; see {log_path}")
    if trained_step(cell.run_dir) != cell.steps:
        raise CellFailed(
            f"{cell.name}: training ended at step {trained_step(cell.run_dir)}, not {cell.steps}"
        )
    return seconds


def _wait(proc: subprocess.Popen, seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def export_random(cell: Cell, out: Path) -> Path:
    """The untrained variant's export: the suite's random-init encoder, seeded with the cell's
    seed, or (``init: pretrained``) the ``model.init_from`` checkpoint's weights, written in the
    export format (``lang_jepa.Encoder.from_pretrained`` loads it)."""
    model_cfg, vocab = model_config(cell.cfg)
    init_from = model_cfg.get("init_from") if cell.variant.init == "pretrained" else None
    return export_random_init(model_cfg, vocab, Path(cell.cfg.data.shards) / TOKENIZER_DIR, out,
                              cell.seed, init_from)  # fmt: skip


def exports_at(cell: Cell, spec: ExperimentSpec, step: int) -> dict[str, Path]:
    """Export the encoders evaluated at ``step``: {"target", "online"} (JEPA), {"online"}
    (MLM), {"init"} (untrained). The last point goes to ``export/``, others below it."""
    root = cell.run_dir / "export"
    if not cell.variant.train:
        out = root / "init"
        return {"init": out if (out / CONFIG_NAME).is_file() else export_random(cell, out)}
    tag = tag_for(step)
    last = step == cell.steps
    where = root if last else root / tag
    has_target = (cell.run_dir / "checkpoints" / tag / TARGET_FILE).is_file()
    online = spec.eval.online == "all" or (spec.eval.online == "final" and last)
    which = (["target"] if has_target else []) + (["online"] if online or not has_target else [])
    outs = {}
    for w in which:
        outs[w] = where / w
        if not (outs[w] / CONFIG_NAME).is_file():
            export(cell.run_dir, outs[w], tag=tag, which=w)
    return outs


def evaluate_point(cell: Cell, spec: ExperimentSpec, step: int,
                   rt: tuple[list[str], Any] | None) -> dict[str, Any]:  # fmt: skip
    """Encoder tasks for each export at ``step`` and, for JEPA runs, the predictor table."""
    cache = cell.run_dir / "eval" / f"{tag_for(step)}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    exports = exports_at(cell, spec, step)
    embs = [
        EncoderEmbedder(Encoder.from_pretrained(p, device="cpu"), w) for w, p in exports.items()
    ]
    seconds: dict[str, float] = {}
    point: dict[str, Any] = {"step": step, "encoders": encoder_tasks(embs, rt, seconds),
                             "exports": {w: str(p) for w, p in exports.items()},
                             "predictor": None}  # fmt: skip
    if "target" in exports and spec.eval.predictor:
        t0 = time.perf_counter()
        run = load_run(cell.run_dir, tag_for(step))
        max_val = (
            min(spec.eval.max_val_batches, 4) if spec.eval.quick else spec.eval.max_val_batches
        )
        batches = eval_batches(run.cfg, max_val)
        pred = predictor_eval(
            run.jepa, run.target, batches, run.cfg.loss, seed=0, target_cfg=run.cfg.target
        )
        pred.pop("ranks", None)
        point["predictor"] = {**pred, "n_batches": len(batches)}
        seconds["predictor"] = time.perf_counter() - t0
    point["seconds"] = {**seconds, "total": time.perf_counter() - start}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(point, indent=2, default=float) + "\n")
    return point


def token_counts(run_dir: Path, world: int) -> Callable[[int], tuple[float, float]]:
    """``at(step) -> (valid tokens seen, model FLOPs)`` up to ``step``, from ``metrics.jsonl``.

    Each record covers the steps since the previous record at its interval's rates: tokens/s x
    step time per step, and TFLOP/s per rank x 1e12 x step time x ranks; a step inside an
    interval gets its share. For a resumed run the records of the final trajectory count once
    (a repeated step keeps its last record, as in :func:`lang_jepa.report.read_jsonl`)."""
    path = run_dir / "logs" / "metrics.jsonl"
    series = read_jsonl(path) if path.is_file() else {}
    tok = dict(series.get("perf/tokens_per_s", []))
    tf = dict(series.get("perf/tflops_per_gpu", []))
    rows, prev, tokens, flops = [], 0, 0.0, 0.0
    for step, ms in sorted(series.get("perf/step_ms", [])):
        per_tok = tok.get(step, 0.0) * ms / 1000.0
        per_flop = tf.get(step, 0.0) * 1e12 * ms / 1000.0 * world
        rows.append((prev, step, tokens, flops, per_tok, per_flop))
        tokens += per_tok * (step - prev)
        flops += per_flop * (step - prev)
        prev = step

    def at(step: int) -> tuple[float, float]:
        for lo, hi, t0, f0, pt, pf in rows:
            if lo < step <= hi:
                return t0 + pt * (step - lo), f0 + pf * (step - lo)
        return (tokens, flops) if step > 0 else (0.0, 0.0)

    return at


def measured(cell: Cell) -> dict[str, Any]:
    """Where and when the cell's figures were made: the date, the machine (CPU model and the
    flags that decide the precision), and the commit it trained at (its run_info.json) or, for an
    untrained variant, the commit that evaluated it."""
    info = cell.run_dir / "run_info.json"
    commit = json.loads(info.read_text()).get("git_revision") if info.is_file() else None
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "commit": commit or git_revision()}  # fmt: skip


def _timing(cell: Cell) -> dict[str, float]:
    path = cell.run_dir / "harness_timing.json"
    return json.loads(path.read_text()) if path.is_file() else {"train_s": 0.0, "eval_s": 0.0}


def _save_timing(cell: Cell, timing: dict[str, float]) -> None:
    (cell.run_dir / "harness_timing.json").write_text(json.dumps(timing) + "\n")


def run_cell(cell: Cell, spec: ExperimentSpec, rt: tuple[list[str], Any] | None,
             progress: Progress, poll_s: float = 10.0) -> dict[str, Any]:  # fmt: skip
    """Train (resuming), export and evaluate one cell; write and return ``result.json``."""
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    timing = _timing(cell)
    if cell.variant.train and trained_step(cell.run_dir) < cell.steps:
        base = timing["train_s"]

        def tick(c: Cell, step: int, seconds: float) -> None:
            timing["train_s"] = base + seconds
            _save_timing(cell, timing)
            progress(c, step, seconds)

        timing["train_s"] = base + train(cell, spec, tick, poll_s)
        _save_timing(cell, timing)
    start = time.perf_counter()
    points = [evaluate_point(cell, spec, s, rt) for s in cell.point_steps]
    timing["eval_s"] += time.perf_counter() - start
    _save_timing(cell, timing)
    counts = token_counts(cell.run_dir, spec.run.ranks)
    for p in points:
        p["tokens"], p["flops"] = counts(p["step"])
        p["token_slots"] = p["step"] * cell.slots_per_step
    result = {
        "variant": cell.variant.name, "seed": cell.seed, "trained": cell.variant.train,
        "objective": cell.cfg.objective if cell.variant.train else None,
        "steps": cell.steps, "token_slots_per_step": cell.slots_per_step,
        "budget_tokens": spec.budget.tokens, "tokens_seen": points[-1]["tokens"],
        "token_slots_seen": points[-1]["token_slots"], "flops": points[-1]["flops"],
        "train_seconds": timing["train_s"], "eval_seconds": timing["eval_s"],
        "overrides": cell.overrides, "fingerprint": cell.fingerprint(spec), "points": points,
        "measured": measured(cell),
    }  # fmt: skip
    (cell.run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result
