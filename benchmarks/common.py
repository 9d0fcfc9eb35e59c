"""Helpers of the training benchmarks: device names, synthetic shards, medians, tables, the SDPA
backend and host-sync probes, and the summary of a gpu_check.sh run.

Nothing here imports DeepSpeed; ``train_bench.py`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lang_jepa.data.synthetic import Doc, write_shards

REPO = Path(__file__).resolve().parents[1]  # the checkout: ds_configs/ and data/ defaults

Batch = dict[str, Tensor]
SYNTHETIC_VOCAB = 30522  # the BERT vocabulary the demo shards use


def cpu_name() -> str:
    """CPU model and the cores this process may use, e.g. 'AMD EPYC 9R14 x2 cores'."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{len(os.sched_getaffinity(0))} cores"


def device_name(dev: Any) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if getattr(dev, "type", "cpu") == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def synthetic_docs(n_docs: int, seed: int = 0, vocab_size: int = SYNTHETIC_VOCAB) -> list[Doc]:
    """Documents shaped like the demo corpus (State of the Union addresses): 150-450 sentences
    of lognormal length (median ~24 tokens, 3..200), uniformly random token ids."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(150, 450))
        lens = np.clip(rng.lognormal(np.log(24), 0.55, size=n), 3, 200).astype(np.int64)
        sents = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        tokens = rng.integers(1000, vocab_size, size=int(sents[-1]))
        docs.append((f"synthetic-{i}", tokens, sents))
    return docs


def write_synthetic_shards(out_dir: Path, tokens_needed: int, seed: int = 0) -> Path:
    """Shards (train + val) with at least ``tokens_needed`` train tokens, in the real format."""
    n_docs = max(8, -(-tokens_needed // 6500) + 2)  # ~7000 tokens per document
    docs = synthetic_docs(n_docs + 2, seed)
    train = [docs[i:n_docs:4] for i in range(4)]
    return write_shards(out_dir, {"train": train, "val": [docs[n_docs:]]}, SYNTHETIC_VOCAB)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: numbers formatted, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(rows: Iterable[tuple[str, Any]], title: str = "") -> str:
    """A two-column text table of (name, value)."""
    rows = list(rows)
    width = max((len(name) for name, _ in rows), default=0)
    lines = [title] if title else []
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def sdpa_ops(fn: Callable[[], Any]) -> dict[str, int]:
    """Which SDPA implementations ``fn`` ran (aten op names -> calls), via the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter[str] = Counter()
    for evt in prof.events():
        name = evt.name
        if name.startswith(("aten::_scaled_dot_product", "aten::_flash", "aten::_cudnn_att")):
            counts[name.removeprefix("aten::")] += 1
        elif name.startswith("torch_attn::"):  # torch.nn.attention.varlen (packed batches)
            counts[name] += 1
    return dict(counts)


def attention_checks(trainer: Any, batch: Batch) -> dict[str, Any]:
    """The encoder's attention: flash with no mask, which backend with a padding mask, and which
    backends one real train step used."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enc, dev = trainer.model.encoder, trainer.dev
    b, n = 2, min(trainer.cfg.model.seq_len, 256)
    ids = torch.randint(1000, 2000, (b, n), device=dev)
    pos = torch.arange(n, device=dev).expand(b, n)
    padded = torch.ones(b, n, dtype=torch.bool, device=dev)
    padded[1, n // 2 :] = False
    out: dict[str, Any] = {}

    def forward(valid: Tensor | None, backend: SDPBackend | None = None) -> None:
        with torch.no_grad(), sdpa_kernel(backend) if backend else contextlib.nullcontext():
            enc(ids, pos, valid)

    for label, valid in (("no_mask", None), ("padding_mask", padded)):
        try:
            forward(valid, SDPBackend.FLASH_ATTENTION)
            out[f"flash_forced_{label}"] = "ok"
        except RuntimeError as err:
            out[f"flash_forced_{label}"] = f"refused: {str(err).splitlines()[0][:160]}"
        out[f"default_{label}"] = sdpa_ops(lambda v=valid: forward(v))
    out.update(packed_attention_check(enc, trainer.rt.autocast, ids, pos))
    out["train_step"] = sdpa_ops(lambda: trainer.train_step([batch]))
    return out


def packed_attention_check(enc: Any, dtype: torch.dtype | None, ids: Tensor, pos: Tensor) -> dict:
    """Two windows packed in one row (plus a padding tail) through the encoder with
    :class:`Segments` must give what each window gives alone; and which kernel ran."""
    from lang_jepa.models.layers import Segments

    n = ids.shape[1]
    a, b = n // 2, n // 4
    row_ids = ids[:1].clone()
    row_pos = torch.cat((pos[0, :a], pos[0, : n - a]))[None]
    cu = torch.tensor([0, a, a + b, n], dtype=torch.int32, device=ids.device)
    seg = Segments(cu, max(a, n - a - b), n)
    dev_type = ids.device.type
    with (
        torch.no_grad(),
        torch.autocast(dev_type, dtype=dtype or torch.float32, enabled=bool(dtype)),
    ):
        packed = enc(row_ids, row_pos, None, seg).float()
        first = enc(row_ids[:, :a], row_pos[:, :a]).float()
        second = enc(row_ids[:, a : a + b], row_pos[:, a : a + b]).float()
        ops = sdpa_ops(lambda: enc(row_ids, row_pos, None, seg))
    diff = max(
        (packed[:, :a] - first).abs().max().item(),
        (packed[:, a : a + b] - second).abs().max().item(),
    )
    return {"packed_max_abs_diff": diff, "packed_ops": ops}


def count_host_syncs(trainer: Any, batch: Batch) -> dict[str, Any] | None:
    """Host-device synchronisations in one train step (CUDA sync debug mode), by source line."""
    if trainer.dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step([batch])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    return {"count": sum(where.values()), "by_line": dict(where.most_common())}


RUNS = ("base", "base_ac", "large", "large_ac", "xl_offload")


def summarize_dir(out_dir: Path) -> dict[str, Any]:
    """gpu_check.sh's results against issue 6's targets: a table, and summary.json."""
    runs: dict[str, Any] = {}
    for name in (*RUNS, "paths", "pack_vs"):
        path = out_dir / f"{name}.json"
        runs[name] = json.loads(path.read_text()) if path.is_file() else None
    f = fmt
    print(f"{'run':<11} {'device':<24} {'MFU':>6} {'HFU':>6} {'tokens/s':>10} {'step ms':>8} "
          f"{'peak GB':>8} {'act GB':>7}")  # fmt: skip
    for name in RUNS:
        r = runs[name]
        if r is None:
            print(f"{name:<11} (no result: see {name}.log)")
            continue
        print(f"{name:<11} {r['device'][:24]:<24} {f(r['mfu'], '.1%'):>6} {f(r['hfu'], '.1%'):>6} "
              f"{f(r['tokens_per_s'], ',.0f'):>10} {f(r['step_ms'], '.1f'):>8} "
              f"{f(r['peak_mem_gb'], '.2f'):>8} {f(r.get('act_mem_gb'), '.2f'):>7}")  # fmt: skip

    def get(name: str, key: str) -> Any:
        return (runs[name] or {}).get(key)

    act = (get("large", "act_mem_gb"), get("large_ac", "act_mem_gb"))
    act_ratio = act[0] / act[1] if None not in act and act[1] > 0 else None
    ok = (runs["paths"] or {}).get("checks", {}).get("ok", {})
    checks = {
        "base MFU >= 50%": (get("base", "mfu"), _at_least(get("base", "mfu"), 0.50)),
        "large + act. ckpt MFU >= 45%": (
            get("large_ac", "mfu"),
            _at_least(get("large_ac", "mfu"), 0.45),
        ),
        "large activation memory >= 3x lower with ckpt": (act_ratio, _at_least(act_ratio, 3.0)),
        "xl ZeRO-3 + CPU offload trains on one GPU": (
            get("xl_offload", "peak_mem_gb"),
            runs["xl_offload"] is not None,
        ),
        "flash SDPA taken with no mask": (None, ok.get("flash_sdpa_no_mask")),
        "packed attention = per-window attention": (None, ok.get("packed_matches_windows")),
        "flash varlen taken for packed batches": (None, ok.get("flash_varlen_packed")),
        "bf16 engine": (None, ok.get("bf16_engine")),
        "FusedAdam is engine.basic_optimizer": (None, ok.get("fused_adam")),
    }
    print("\ntarget                                            value   met")
    for label, (value, met) in checks.items():
        shown = f(value, ".3g") if isinstance(value, float) else f(value)
        print(f"{label:<48} {shown:>7}   {f(met)}")
    pack_vs = get("pack_vs", "vs_over_base_tokens_per_s")
    if pack_vs:
        preset = runs["pack_vs"]["settings"]["preset"]
        print(f"packed / unpacked tokens/s, {preset}, interleaved: {1.0 / pack_vs:.2f}x")
    syncs = (runs["paths"] or {}).get("checks", {}).get("host_syncs_per_step")
    if syncs:
        print(f"host syncs in one train step: {syncs['count']} {syncs['by_line']}")
    summary = {"runs": runs, "activation_memory_ratio_large": act_ratio,
               "packed_over_unpacked_tokens_per_s": 1.0 / pack_vs if pack_vs else None,
               "targets": {k: {"value": v, "met": m} for k, (v, m) in checks.items()}}  # fmt: skip
    write_json(out_dir / "summary.json", summary)
    return summary


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound
