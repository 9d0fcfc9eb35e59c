"""Write the suite's results: ``eval.json``, ``eval.md`` (tables, chance beside), PNG plots, and a
short console summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# (key in encoders[name], label, higher is better?)
ENCODER_ROWS = (
    ("lee_spearman", "Lee50 Spearman vs humans", True),
    ("rt_accuracy", "RT sentiment probe accuracy", True),
    ("effective_rank", "effective rank (RankMe)", True),
    ("effective_rank_frac", "effective rank / min(N, D)", True),
    ("dim_std_normalized", "per-dim std (L2-normed)", True),
    ("uniformity", "uniformity (lower = spread)", False),
    ("alignment", "alignment, adjacent sentences", False),
    ("lee_spearman_centred", "Lee50 Spearman, centred embeddings", True),
    ("lee_spearman_whitened", "Lee50 Spearman, whitened embeddings", True),
)
USES_CONTEXT_RATIO = 1.05  # shuffled / true-context loss above which the context counts as used
PREDICTOR_COLS = (
    ("loss", "loss"),
    ("top1", "top-1"),
    ("top5", "top-5"),
    ("mrr", "MRR"),
    ("within_doc_top1", "in-doc top-1"),
    ("within_doc_mrr", "in-doc MRR"),
)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / "eval.json"
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return path


def predictor_verdict(pred: dict[str, Any]) -> str:
    """One line: does the model beat copy-context, copy-neighbour and the length control
    (within-document MRR, the retrieval topic alone cannot win), and how much does shuffling the
    context cost it?"""
    m = pred["methods"]
    key = "within_doc_mrr" if "within_doc_mrr" in m["model"] else "mrr"
    rivals = [r for r in ("copy_context", "copy_neighbour", "length") if key in m.get(r, {})]
    best_name = max(rivals, key=lambda r: m[r][key])
    best = m[best_name][key]
    chance = m["model"][key.replace("mrr", "chance_mrr")]
    beats = m["model"][key] > max(best, chance)
    ratio = pred["shuffled_loss_ratio"]
    uses = "uses" if ratio > USES_CONTEXT_RATIO else "IGNORES"
    return (f"model {key} {m['model'][key]:.3f} vs best baseline ({best_name}) {best:.3f}, chance "
            f"{chance:.3f} -> {'beats' if beats else 'does NOT beat'} them; shuffled-context loss "
            f"ratio {ratio:.2f} -> the predictor {uses} the context")  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    """The tables of ``eval.md``."""
    src, enc, chance = results["source"], results["encoders"], results["chance"]
    names = list(enc)
    lines = [f"# Evaluation of `{src['path']}`", "",
             f"{src['kind']}, step {src.get('step', '?')}, objective {src.get('objective', '?')}; "
             f"`model` = {src.get('model', '?')}.", "",
             "## Encoder (frozen embeddings; baselines through the same code)", "",
             "| metric | chance | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]  # fmt: skip
    for key, label, _ in ENCODER_ROWS:
        if not any(key in enc[n] for n in names):
            continue
        row = [_fmt(enc[n].get(key)) for n in names]
        lines.append(f"| {label} | {_fmt(chance.get(key))} | " + " | ".join(row) + " |")
    pred = results.get("predictor")
    if pred:
        m = pred["methods"]
        lines += ["", f"## Masked-sentence prediction ({pred['n_queries']} masked sentences, "
                  f"{pred['n_batches']} val batches)", "",
                  "| method | " + " | ".join(lbl for _, lbl in PREDICTOR_COLS) + " |",
                  "|---|" + "---|" * len(PREDICTOR_COLS)]  # fmt: skip
        for method, row in m.items():
            lines.append(
                f"| {method} | " + " | ".join(_fmt(row.get(k)) for k, _ in PREDICTOR_COLS) + " |"
            )
        ch = m["model"]
        chance_row = ["—"] + [_fmt(ch.get(f"chance_{k}")) for k in ("top1", "top5", "mrr")]
        chance_row += [
            _fmt(ch.get("within_doc_chance_top1")),
            _fmt(ch.get("within_doc_chance_mrr")),
        ]
        lines.append("| *chance* | " + " | ".join(chance_row) + " |")
        lines += ["", f"Candidates: {ch['n_candidates']:.1f} per query on average (the batch's "
                  f"masked sentences + distractors); in-doc: {ch.get('within_doc_n_candidates', math.nan):.1f} "
                  "(every sentence of the same window).", "",
                  f"**{predictor_verdict(pred)}**", ""]  # fmt: skip
        ht, hp = pred["health"]["targets"], pred["health"]["predictions"]
        lines += [f"Health: targets effective rank {_fmt(ht['effective_rank'])}, "
                  f"predictions {_fmt(hp['effective_rank'])}; per-dim std targets "
                  f"{_fmt(ht['dim_std'])}, predictions {_fmt(hp['dim_std'])}; "
                  f"alignment(pred, target) {_fmt(hp.get('alignment'))}."]  # fmt: skip
    for task, why in results.get("skipped", {}).items():
        lines += ["", f"*{task} skipped*: {why}"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """``eval_encoders.png`` (bars per metric vs baselines, chance dashed), and for runs
    ``eval_predictor.png`` (methods) and ``eval_ranks.png`` (the model's retrieval ranks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    enc, chance = results["encoders"], results["chance"]
    keys = [(k, lbl) for k, lbl, _ in ENCODER_ROWS[:3] if any(k in v for v in enc.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        names = [n for n in enc if key in enc[n]]
        ax.bar(
            names,
            [enc[n][key] for n in names],
            color=["C3" if n.startswith("model") else "C0" for n in names],
        )
        if key in chance:
            ax.axhline(chance[key], ls="--", c="k", lw=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "eval_encoders.png"))
    pred = results.get("predictor")
    if pred:
        m = pred["methods"]
        cols = [(k, lbl) for k, lbl in PREDICTOR_COLS if k in m["model"]]
        fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.4), squeeze=False)
        for ax, (key, label) in zip(axes[0], cols, strict=True):
            ax.bar(
                list(m),
                [m[x].get(key, math.nan) for x in m],
                color=["C3" if x == "model" else "C0" for x in m],
            )
            if f"chance_{key}" in m["model"] or key.startswith("within_doc_"):
                ck = (
                    f"chance_{key}"
                    if not key.startswith("within_doc_")
                    else key.replace("within_doc_", "within_doc_chance_")
                )
                if ck in m["model"]:
                    ax.axhline(m["model"][ck], ls="--", c="k", lw=1)
            ax.set_title(label, fontsize=10)
            ax.tick_params(axis="x", rotation=45, labelsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / "eval_predictor.png"))
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.hist(pred["ranks"], bins=min(50, max(5, len(set(pred["ranks"])))), color="C3")
        ax.set_xlabel("expected rank of the right sentence (1 = best)")
        ax.set_ylabel("masked sentences")
        ax.set_title(f"retrieval ranks, {_fmt(m['model']['n_candidates'])} candidates", fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, out / "eval_ranks.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def console_summary(results: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    enc, chance = results["encoders"], results["chance"]
    lines = []
    for name, row in enc.items():
        parts = [f"Lee50 rho {_fmt(row.get('lee_spearman'))}"]
        if "rt_accuracy" in row:
            parts.append(
                f"RT acc {_fmt(row['rt_accuracy'])} (chance {_fmt(chance.get('rt_accuracy'))})"
            )
        parts.append(f"eff. rank {_fmt(row.get('effective_rank'))}")
        lines.append(f"{name:>13}: " + ", ".join(parts))
    pred = results.get("predictor")
    if pred:
        m = pred["methods"]["model"]
        lines.append(f"    predictor: top-1 {_fmt(m['top1'])} (chance {_fmt(m['chance_top1'])}), MRR "
                     f"{_fmt(m['mrr'])} (chance {_fmt(m['chance_mrr'])}), loss {_fmt(m['loss'])}")  # fmt: skip
        lines.append("    " + predictor_verdict(pred))
    for task, why in results.get("skipped", {}).items():
        lines.append(f"    skipped {task}: {why}")
    return "\n".join(lines)


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """eval.json, eval.md and the PNGs into ``out`` (created); returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_json(results, out)]
    (out / "eval.md").write_text(markdown(results))
    paths.append(out / "eval.md")
    paths += plot(results, out)
    return paths
