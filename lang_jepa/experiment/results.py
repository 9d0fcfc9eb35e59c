"""Aggregate the cells of an experiment: ``results.json``, ``results.md`` and ``results.png``.

Every number is over seeds: the mean, the sample standard deviation (ddof 1; 0 for one seed) and
the min-max range. The "main" encoder of a cell is the one I-JEPA evaluates: the EMA target
encoder when the run has one, else the online encoder (MLM), else the random-init export.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from lang_jepa.runinfo import git_revision

MAIN_ORDER = ("target", "online", "init")
PREDICTOR_KEYS = (
    "loss",
    "top1",
    "mrr",
    "within_doc_top1",
    "within_doc_mrr",
    "within_doc_chance_mrr",
)
# (metric, label) of the summary table and the plot
SUMMARY = (
    ("main.lee_spearman", "Lee50 Spearman"),
    ("main.lee_spearman_centred", "Lee50 centred"),
    ("main.lee_spearman_whitened", "Lee50 whitened"),
    ("main.rt_accuracy", "RT probe acc."),
    ("predictor.model.within_doc_mrr", "pred. in-doc MRR"),
    # the same predictor on another document's context: what target positions and lengths alone
    # give (the predictor is told where and how long each hidden sentence is)
    ("predictor.shuffled.within_doc_mrr", "in-doc MRR, shuffled context"),
    ("predictor.length.within_doc_mrr", "in-doc MRR, length alone"),
    ("predictor.model.within_doc_centred_mrr", "in-doc MRR centred"),
    ("predictor.model.within_doc_whitened_mrr", "in-doc MRR whitened"),
    ("main.effective_rank", "eff. rank"),
)
PLOTTED = ("main.lee_spearman", "main.rt_accuracy", "predictor.model.within_doc_mrr")


def point_metrics(point: dict[str, Any]) -> dict[str, float]:
    """One evaluated point as flat ``{name: value}``: ``ENCODER.metric`` for every exported
    encoder, ``main.metric`` for the main one, ``predictor.METHOD.metric`` and
    ``predictor.shuffled_loss_ratio`` for JEPA runs."""
    out: dict[str, float] = {}
    enc = point["encoders"]
    for name, row in enc.items():
        out.update({f"{name}.{k}": float(v) for k, v in row.items()})
    main = next(n for n in (*MAIN_ORDER, *enc) if n in enc)
    out.update({f"main.{k}": float(v) for k, v in enc[main].items()})
    pred = point.get("predictor")
    if pred:
        for space in ("methods", "methods_centred", "methods_whitened"):
            suffix = space.removeprefix("methods").removeprefix("_")
            for method, row in pred.get(space, {}).items():
                for k, v in row.items():
                    key = k  # the raw space's names; the others' carry the space in the name
                    if suffix and k.startswith("within_doc_"):
                        key = k.replace("within_doc_", f"within_doc_{suffix}_")
                    elif suffix:
                        key = f"{suffix}_{k}"
                    out[f"predictor.{method}.{key}"] = float(v)
        out["predictor.shuffled_loss_ratio"] = float(pred["shuffled_loss_ratio"])
        for which, row in pred.get("health", {}).items():
            out.update({f"predictor.health.{which}.{k}": float(v) for k, v in row.items()})
    return out


def spread(values: list[float]) -> dict[str, float]:
    """mean, std (sample, ddof 1; 0 for one value), min, max and n of finite ``values``."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}  # fmt: skip


def machine() -> dict[str, Any]:
    """CPU model, the flags that decide the precision (AVX2, AVX-512-BF16, AMX), cores."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}  # fmt: skip


def aggregate(results: list[dict[str, Any]], spec_info: dict[str, Any]) -> dict[str, Any]:
    """The content of ``results.json``: per variant the final point's metrics and the curve,
    each over seeds, plus tokens, FLOPs and wall times; the cells themselves."""
    variants: dict[str, Any] = {}
    names = list(dict.fromkeys(r["variant"] for r in results))
    for name in names:
        cells = [r for r in results if r["variant"] == name]
        per_seed = [[point_metrics(p) for p in c["points"]] for c in cells]
        n_points = min(len(p) for p in per_seed)
        keys = sorted({k for seed in per_seed for k in seed[-1]})
        curve = []
        for i in range(n_points):
            curve.append({
                "step": cells[0]["points"][i]["step"],
                "tokens": spread([c["points"][i]["tokens"] for c in cells]),
                "metrics": {k: spread([s[i].get(k, math.nan) for s in per_seed]) for k in keys},
            })  # fmt: skip
        variants[name] = {
            "trained": cells[0]["trained"], "objective": cells[0]["objective"],
            "seeds": [c["seed"] for c in cells], "steps": cells[0]["steps"],
            "token_slots_per_step": cells[0]["token_slots_per_step"],
            "tokens_seen": spread([c["tokens_seen"] for c in cells]),
            "token_slots_seen": spread([c["token_slots_seen"] for c in cells]),
            "flops": spread([c["flops"] for c in cells]),
            "train_seconds": spread([c["train_seconds"] for c in cells]),
            "eval_seconds": spread([c["eval_seconds"] for c in cells]),
            "final": curve[-1]["metrics"], "curve": curve,
        }  # fmt: skip
    return {"experiment": spec_info, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "git_revision": git_revision(),
            "spread": "mean, sample std over seeds (ddof 1), min-max", "variants": variants,
            "cells": results}  # fmt: skip


def _pm(s: dict[str, float] | None, digits: int = 3) -> str:
    if not s or s["n"] == 0 or not math.isfinite(s["mean"]):
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
            f"({s['min']:.{digits}f}–{s['max']:.{digits}f})")  # fmt: skip


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "—"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def margins(agg: dict[str, Any]) -> list[str]:
    """Each trained variant against each untrained one on the plotted encoder metrics: the
    difference of means, and "clear" when it exceeds the sum of the two seed stds and every
    seed of one is above every seed of the other."""
    v = agg["variants"]
    lines = []
    for a, va in v.items():
        for b, vb in v.items():
            if not va["trained"] or vb["trained"]:
                continue
            for key, label in SUMMARY[:4]:
                sa, sb = va["final"].get(key), vb["final"].get(key)
                if not sa or not sb or sa["n"] == 0 or sb["n"] == 0:
                    continue
                diff = sa["mean"] - sb["mean"]
                noise = sa["std"] + sb["std"]
                clear = diff > noise and sa["min"] > sb["max"]
                worse = -diff > noise and sa["max"] < sb["min"]
                verdict = "clearly better" if clear else "clearly worse" if worse else "not clear"
                if min(sa["n"], sb["n"]) < 2:
                    verdict = "not judged: one seed, no spread"
                lines.append(f"- `{a}` − `{b}`, {label}: {diff:+.3f} (seed stds "
                             f"{sa['std']:.3f} + {sb['std']:.3f}) → **{verdict}**")  # fmt: skip
    return lines


def describe_machine(m: dict[str, Any]) -> str:
    """``CPU, N cores, AVX2 yes, AVX-512-BF16 yes, AMX no[, GPU ...]; torch X``."""
    flag = {True: "yes", False: "no", None: "?"}
    return (f"{m['cpu']}, {m['cores']} cores, AVX2 {flag[m.get('avx2')]}, "
            f"AVX-512-BF16 {flag[m.get('avx512_bf16')]}, AMX {flag[m.get('amx_bf16')]}"
            + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; torch {m['torch']}")  # fmt: skip


def provenance(cells: list[dict[str, Any]]) -> list[str]:
    """One line per (date, machine, commit) the cells were measured on, naming the cells."""
    groups: dict[str, list[str]] = {}
    for c in cells:
        m = c.get("measured")
        key = ("not recorded in the cell" if m is None else
               f"{m['date']} on {describe_machine(m['machine'])}; commit {m['commit'][:12]}")  # fmt: skip
        groups.setdefault(key, []).append(f"{c['variant']}-s{c['seed']}")
    return [f"- {key}: {', '.join(names)}" for key, names in groups.items()]


def markdown(agg: dict[str, Any]) -> str:
    """``results.md``: the summary table, the margins, every metric, and the curves."""
    e, v = agg["experiment"], agg["variants"]
    lines = [f"# Experiment `{e['name']}`", "",
             f"`{e['file']}`; tabulated {agg['date']} at commit {agg['git_revision']}. Budget "
             f"{_num(e['budget_tokens'])} token slots per trained variant. Numbers: "
             f"{agg['spread']}. The cells were measured:", "",
             *provenance(agg.get("cells", [])), ""]  # fmt: skip
    if e.get("notes"):
        lines += [e["notes"].strip(), ""]
    head = ["variant", "seeds", "steps", "tokens seen", "FLOPs", "train s / seed"]
    head += [label for _, label in SUMMARY]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in v.items():
        row = [f"`{name}`", ",".join(map(str, r["seeds"])), str(r["steps"]),
               _num(r["tokens_seen"]["mean"]), _num(r["flops"]["mean"]),
               f"{r['train_seconds']['mean']:.0f}"]  # fmt: skip
        row += [_pm(r["final"].get(k)) for k, _ in SUMMARY]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Margins at the end of the budget:", "", *(margins(agg) or ["- (none)"]), ""]
    keys = sorted({k for r in v.values() for k in r["final"]})
    lines += [
        "## Every metric (end of the budget)",
        "",
        "| metric | " + " | ".join(f"`{n}`" for n in v) + " |",
        "|---|" + "---|" * len(v),
    ]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_pm(r["final"].get(k)) for r in v.values()) + " |")
    lines += ["", "## Curves", "", "| variant | step | tokens | "
              + " | ".join(label for key, label in SUMMARY if key in PLOTTED) + " |",
              "|---|---|---|" + "---|" * len(PLOTTED)]  # fmt: skip
    for name, r in v.items():
        for p in r["curve"]:
            cells = [_pm(p["metrics"].get(k)) for k, _ in SUMMARY if k in PLOTTED]
            lines.append(f"| `{name}` | {p['step']} | {_num(p['tokens']['mean'])} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], path: Path) -> Path:
    """The plotted metrics against training tokens: a line (mean) and a min-max band per trained
    variant, a horizontal line and band per untrained one; chance dotted grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = agg["variants"]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4))
    labels = dict(SUMMARY)
    x_max = max([p["tokens"]["mean"] for r in v.values() for p in r["curve"]] + [1.0])
    for ax, key in zip(axes, PLOTTED, strict=True):
        for i, (name, r) in enumerate(v.items()):
            color = f"C{i}"
            pts = [p for p in r["curve"] if p["metrics"].get(key, {}).get("n", 0) > 0]
            if not pts:
                continue
            mean = [p["metrics"][key]["mean"] for p in pts]
            lo = [p["metrics"][key]["min"] for p in pts]
            hi = [p["metrics"][key]["max"] for p in pts]
            if r["trained"]:
                x = [p["tokens"]["mean"] for p in pts]
                ax.plot(x, mean, "o-", color=color, label=name)
                ax.fill_between(x, lo, hi, color=color, alpha=0.2)
            else:
                ax.axhline(mean[-1], color=color, ls="--", label=f"{name} (untrained)")
                ax.axhspan(lo[-1], hi[-1], color=color, alpha=0.15)
            if key == "main.rt_accuracy" and agg["experiment"].get("rt_chance"):
                ax.axhline(agg["experiment"]["rt_chance"], color="grey", ls=":", lw=1)
            if key.endswith("within_doc_mrr"):
                chance = [p["metrics"].get(key.replace("within_doc_mrr", "within_doc_chance_mrr"))
                          for p in pts]  # fmt: skip
                if chance[-1]:
                    ax.axhline(chance[-1]["mean"], color="grey", ls=":", lw=1)
        ax.set_xlim(0, x_max * 1.05)
        ax.set_xlabel("training tokens seen")
        ax.set_title(labels[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{agg['experiment']['name']}: mean over seeds, band = min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SPREAD_LINE = re.compile(
    r'\{\s*"mean": ([^,]+),\s*"std": ([^,]+),\s*"min": ([^,]+),\s*"max": ([^,]+),\s*"n": (\d+)\s*\}'
)


def _rounded(x: Any) -> Any:
    """Floats to 6 significant digits, through dicts and lists (what a reader of the table
    needs; the cells' records keep every digit)."""
    if isinstance(x, float | np.floating):
        return float(f"{x:.6g}") if math.isfinite(x) else float(x)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_rounded(v) for v in x]
    return x


def to_json(agg: dict[str, Any]) -> str:
    """``results.json``'s text: numbers rounded, every spread (mean, std, min, max, n) on one line,
    so that a re-published experiment rewrites a few MB, not tens, and diffs by metric."""
    text = json.dumps(_rounded(agg), indent=1, default=float)
    return SPREAD_LINE.sub(r'{"mean": \1, "std": \2, "min": \3, "max": \4, "n": \5}', text) + "\n"


def write_results(
    results: list[dict[str, Any]], spec_info: dict[str, Any], out: Path
) -> list[Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out``."""
    agg = aggregate(results, spec_info)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "results.png"]
    paths[0].write_text(to_json(agg))
    paths[1].write_text(markdown(agg))
    plot(agg, paths[2])
    return paths
