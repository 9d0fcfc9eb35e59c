"""``python -m lang_jepa.report RUN_DIR [--out DIR]``: draw a run over its steps.

Reads ``RUN_DIR/logs/metrics.jsonl`` (one JSON object per logged step; a step logged twice, e.g.
after a restart, keeps its last record), or when that file is missing the TensorBoard events in
``RUN_DIR/tb``. Writes one PNG per panel into ``--out`` (default ``RUN_DIR/report``):

- ``loss.png``: ``train/loss`` and ``val/loss``;
- ``schedules.png``: ``train/lr``, ``train/wd``, ``train/ema_momentum``;
- ``collapse.png``: ``repr/effective_rank``, ``repr/target_std``, ``repr/pred_std``,
  ``repr/pred_target_cos`` (the collapse monitors);
- ``eval.png``: every ``eval/*`` scalar (from the in-training evaluation);
- ``perf.png``: throughput and step time;

and ``index.html`` showing them together with a table of the last value of every scalar.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]  # scalar name -> [(step, value)] sorted by step

PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "Loss", ("train/loss", "val/loss")),
    ("schedules", "Schedules", ("train/lr", "train/wd", "train/ema_momentum")),
    ("collapse", "Collapse monitors",
     ("repr/effective_rank", "repr/target_std", "repr/pred_std", "repr/pred_target_cos")),
    ("eval", "Evaluation", ("eval/",)),
    ("perf", "Throughput", ("perf/tokens_per_s", "perf/step_ms", "perf/mfu")),
)  # fmt: skip


def read_jsonl(path: Path) -> Series:
    """Scalars of ``metrics.jsonl``; for a repeated step the last record wins; bad lines skipped."""
    by_step: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        by_step[int(rec["step"])] = {k: v for k, v in rec.items() if k != "step"}
    series: Series = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(key, []).append((step, float(value)))
    return series


def read_tensorboard(tb_dir: Path) -> Series:
    """Scalars of the TensorBoard event files under ``tb_dir`` (last value per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: Series = {}
    dirs = sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            last = {e.step: e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)}
            merged = dict(series.get(tag, [])) | last
            series[tag] = sorted(merged.items())
    return series


def load_series(run_dir: Path) -> tuple[Series, str]:
    """(scalars, where they came from) of a run directory."""
    jsonl = run_dir / "logs" / "metrics.jsonl"
    if jsonl.is_file():
        return read_jsonl(jsonl), str(jsonl)
    tb = run_dir / "tb"
    if tb.is_dir():
        return read_tensorboard(tb), str(tb)
    raise FileNotFoundError(f"{run_dir}: neither logs/metrics.jsonl nor tb/ found")


def _panel_keys(series: Series, patterns: tuple[str, ...]) -> list[str]:
    keys = []
    for pat in patterns:
        keys += (
            sorted(k for k in series if k.startswith(pat))
            if pat.endswith("/")
            else [pat] * (pat in series)
        )
    return keys


def draw_panel(series: Series, keys: list[str], title: str, path: Path) -> Path:
    """One figure with a subplot per scalar (shared step axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 2.9 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_html(
    run_dir: Path, source: str, series: Series, images: list[tuple[str, Path]], out: Path
) -> Path:
    """``index.html``: the panels (relative image links) and the last value of every scalar."""
    rows = "\n".join(
        f"<tr><td>{html.escape(k)}</td><td>{v[-1][0]}</td><td>{v[-1][1]:.6g}</td></tr>"
        for k, v in sorted(series.items())
    )
    figs = "\n".join(
        f'<h2>{html.escape(title)}</h2><img src="{p.name}" alt="{html.escape(title)}">'
        for title, p in images
    )
    steps = max((v[-1][0] for v in series.values()), default=0)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LANG-JEPA run {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}</style>
</head><body>
<h1>Run <code>{html.escape(str(run_dir))}</code></h1>
<p>Scalars from <code>{html.escape(source)}</code>; last step {steps}.</p>
{figs}
<h2>Last values</h2>
<table><tr><th>scalar</th><th>step</th><th>value</th></tr>
{rows}
</table></body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path


def report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw every panel that has data and the HTML page; returns the written files."""
    run_dir = Path(run_dir)
    series, source = load_series(run_dir)
    if not series:
        raise ValueError(f"{source}: no scalars logged yet")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for name, title, patterns in PANELS:
        keys = _panel_keys(series, patterns)
        if keys:
            images.append((title, draw_panel(series, keys, title, out / f"{name}.png")))
    return [p for _, p in images] + [write_html(run_dir, source, series, images, out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lang_jepa.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dir", help="a run directory (train.run_dir)")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        paths = report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
