"""Run an experiment's cells in order, skip the finished ones, show progress, write the results."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from lang_jepa.eval.tasks import MissingData, rotten_tomatoes
from lang_jepa.shards import load_manifest

from .cell import RESULT_FILE, run_cell, train_command
from .results import write_results
from .spec import Cell, Experiment, ExperimentError

log = logging.getLogger("lang_jepa.experiment")
QUICK_RT_LIMIT = 2000  # as lang_jepa.eval --quick


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """The progress line: cell k/n, its step, elapsed time and an estimate of the time left
    (finished cells of the same variant, else the seconds per step measured so far)."""

    def __init__(self, cells: list[Cell]) -> None:
        self.cells, self.start = cells, time.perf_counter()
        self.totals: dict[str, list[float]] = {}  # variant -> seconds of cells run here
        self.per_step: list[float] = []  # seconds per step of cells trained here
        self.index, self.last_step = 0, -1

    def begin(self, index: int) -> None:
        self.index, self.last_step = index, -1
        self.cell_start = time.perf_counter()

    def finish(self, cell: Cell, trained_steps: int, train_s: float) -> None:
        self.totals.setdefault(cell.variant.name, []).append(time.perf_counter() - self.cell_start)
        if trained_steps > 0 and train_s > 0:
            self.per_step.append(train_s / trained_steps)

    def estimate(self, cell: Cell) -> float | None:
        done = self.totals.get(cell.variant.name)
        if done:
            return sum(done) / len(done)
        if not cell.variant.train:
            return 0.0
        if self.per_step:
            return cell.steps * sum(self.per_step) / len(self.per_step)
        return None

    def left(self, current_left: float | None) -> float | None:
        later = [self.estimate(c) for c in self.cells[self.index + 1 :]]
        if current_left is None or any(e is None for e in later):
            return None
        return current_left + sum(later)  # type: ignore[arg-type]

    def line(self, text: str, current_left: float | None = None) -> None:
        k, n = self.index + 1, len(self.cells)
        elapsed = time.perf_counter() - self.start
        print(f"[{k}/{n}] {text} | elapsed {_hms(elapsed)} | left ~{_hms(self.left(current_left))}",
              flush=True)  # fmt: skip

    def __call__(self, cell: Cell, step: int, seconds: float) -> None:
        """Called while ``cell`` trains: ``step`` reached, ``seconds`` since this launch."""
        if step == self.last_step:
            return
        if self.last_step < 0:
            self.first_step, self.first_s = step, seconds
        self.last_step = step
        done = step - self.first_step
        rate = (seconds - self.first_s) / done if done > 0 else None
        current = None if rate is None else rate * (cell.steps - step)
        self.line(f"{cell.name}: step {step}/{cell.steps}", current)


def plan(exp: Experiment) -> str:
    """What would run: per cell the steps, token slots and the command."""
    lines = [f"experiment {exp.spec.name} ({exp.path}) -> {exp.out_dir}",
             f"budget {exp.spec.budget.tokens:,} token slots; seeds {exp.spec.seeds}; "
             f"{exp.spec.eval.points} evaluated points"]  # fmt: skip
    if exp.record_dir is not None:
        lines.insert(1, f"finished cells and results recorded in {exp.record_dir}")
    for cell in exp.cells:
        done = f" ({state})" if (state := done_state(exp, cell)) else ""
        if not cell.variant.train:
            init = "model.init_from weights" if cell.variant.init == "pretrained" else "random-init"
            lines.append(f"  {cell.name}: no training; {init} export{done}")
            continue
        lines.append(f"  {cell.name}: {cell.steps} steps x {cell.slots_per_step:,} token slots = "
                     f"{cell.steps * cell.slots_per_step:,}; points at {cell.point_steps}{done}")  # fmt: skip
        lines.append("    " + " ".join(train_command(cell, exp.spec)))
    return "\n".join(lines)


def check_data(exp: Experiment) -> None:
    """Every cell's shards exist (their manifest is read), before anything runs."""
    for cell in exp.cells:
        try:
            load_manifest(cell.cfg.data.shards)
        except (OSError, ValueError) as err:
            raise ExperimentError(
                f"{exp.path}: variant {cell.variant.name}: key 'data.shards' "
                f"({cell.cfg.data.shards}): {err}"
            ) from err


def load_rt(exp: Experiment) -> tuple[list[str], Any] | None:
    e = exp.spec.eval
    if not e.rt:
        return None
    limit = e.rt_limit if e.rt_limit is not None else (QUICK_RT_LIMIT if e.quick else None)
    try:
        return rotten_tomatoes(Path(e.data_dir), limit=limit, seed=0)
    except MissingData as err:
        log.warning("sentiment probe skipped: %s", err)
        return None


def done_state(exp: Experiment, cell: Cell) -> str | None:
    """``"done"`` (its run directory has a result), ``"recorded"`` (only the committed record
    has one) or None."""
    if (cell.run_dir / RESULT_FILE).is_file():
        return "done"
    rec = exp.recorded(cell)
    return "recorded" if rec is not None and rec.is_file() else None


def finished(exp: Experiment) -> list[dict[str, Any]]:
    """Every finished cell of the experiment's variants whose settings are the current ones (any
    seed), in variant order: from its run directory, else from the committed record."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    fingerprints = {c.variant.name: c.fingerprint(exp.spec) for c in exp.all_cells}
    sources = [exp.out_dir.glob(f"{name}-s*/{RESULT_FILE}") for name in fingerprints]
    if exp.record_dir is not None:
        sources.append((exp.record_dir / "cells").glob("*.json"))
    for paths in sources:
        for path in sorted(paths):
            r = json.loads(path.read_text())
            if r.get("fingerprint") == fingerprints.get(r.get("variant")):
                out.setdefault((r["variant"], r["seed"]), r)
    order = list(fingerprints)
    return [out[k] for k in sorted(out, key=lambda k: (order.index(k[0]), k[1]))]


def record(exp: Experiment, cell: Cell) -> None:
    """Copy a finished cell's ``result.json`` into the record (a file small enough to commit)."""
    rec = exp.recorded(cell)
    if rec is not None:
        rec.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cell.run_dir / RESULT_FILE, rec)


def publish(exp: Experiment, rt: tuple[list[str], Any] | None) -> list[Path]:
    """Write the aggregate into the experiment directory and, if kept, the record."""
    cells, info = finished(exp), spec_info(exp, rt)
    paths = write_results(cells, info, exp.out_dir)
    if exp.record_dir is not None:
        paths += write_results(cells, info, exp.record_dir)
    return paths


def figure(exp: Experiment, only: list[str] | None, path: str | Path) -> Path:
    """The curves of the finished cells of ``only`` (every variant when None), in that order."""
    from .results import aggregate, plot

    order = only or [v.name for v in exp.spec.variants]
    cells = [c for c in finished(exp) if c["variant"] in order]
    if not cells:
        raise ExperimentError(f"{exp.path}: no finished cell of {', '.join(order)}")
    cells.sort(key=lambda c: (order.index(c["variant"]), c["seed"]))
    info = {
        **spec_info(exp, load_rt(exp)),  # the RT probe's majority-class line, as publish draws it
        "variants": [v for v in order if any(c["variant"] == v for c in cells)],
    }
    return plot(aggregate(cells, info), Path(path))


def spec_info(exp: Experiment, rt: tuple[list[str], Any] | None = None) -> dict[str, Any]:
    chance = None if rt is None else float(max(rt[1].mean(), 1 - rt[1].mean()))
    return {"rt_chance": chance, "name": exp.spec.name, "file": str(exp.path), "budget_tokens": exp.spec.budget.tokens,
            "seeds": exp.spec.seeds, "base": exp.spec.base.config, "notes": exp.spec.notes,
            "variants": [v.name for v in exp.spec.variants]}  # fmt: skip


def run_experiment(exp: Experiment, poll_s: float = 30.0) -> list[Path]:
    """Run every cell not yet finished, then write the results; returns their paths."""
    check_data(exp)
    rt = load_rt(exp)
    progress = Progress(exp.cells)
    for k, cell in enumerate(exp.cells):
        progress.begin(k)
        state = done_state(exp, cell)
        if state is not None:
            result = cell.run_dir / RESULT_FILE if state == "done" else exp.recorded(cell)
            r = json.loads(result.read_text())
            if r.get("fingerprint") != cell.fingerprint(exp.spec):
                raise ExperimentError(
                    f"{exp.path}: {result} was made with other settings (command or eval); "
                    f"delete it to re-run {cell.name}"
                )
            if state == "done":
                record(exp, cell)
            progress.line(f"{cell.name}: {state}, not re-run")
            continue
        progress.line(f"{cell.name}: starting")
        r = run_cell(cell, exp.spec, rt, progress, poll_s)
        record(exp, cell)
        progress.finish(cell, cell.steps, r["train_seconds"])
        progress.line(f"{cell.name}: finished ({_hms(r['train_seconds'])} training, "
                      f"{_hms(r['eval_seconds'])} evaluation)", 0.0)  # fmt: skip
        publish(exp, rt)
    return publish(exp, rt)
