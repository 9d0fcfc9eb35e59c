"""Data-loader benchmark: masked-window batches per second from one DataLoader worker.

    .venv/bin/python benchmarks/loader_bench.py [--shards DIR | --raw DIR] [--preset small]
        [--seq-len 256 512] [--seconds 8] [--json FILE] [--no-unpacked]

Shards: ``--shards DIR`` (a build_shards output) is read as is; otherwise the text files of
``--raw`` (default data/demo/raw, the SOTU demo corpus) are sentence-split with blingfire and
tokenized with the default BERT tokenizer into temporary shards; without either, synthetic
documents with SOTU-like sentence lengths are used (the table says which). For each seq_len it
measures the train loader with one worker process (``tokens_per_s_per_worker`` counts real, unpadded
tokens) and the padding fraction of the batches: padding / (B x L) of the window tokens (what the
target encoder reads), and the same for the context and target index rows. It does so with packing
(the default: windows best-fit into one row of micro_batch x seq_len tokens) and without (one
window per row). For the unpacked batches it splits the padding of whole-sentence windows
(greedy cut = fewest windows) into its two causes: the gap at the end of full windows and each
document's last, partly filled window. JSON: the first seq_len's packed figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lang_jepa.config import load_config
from lang_jepa.data.loader import StreamSpec, TrainLoader
from lang_jepa.data.reader import document_windows, split_shards
from lang_jepa.data.synthetic import Doc, write_shards
from lang_jepa.data.windows import WindowCounters
from preprocessing.tokenizer import default_tokenizer_dir


def docs_from_text(raw: Path) -> list[Doc]:
    """One document per ``*.txt`` file: blingfire sentences, BERT token ids, no special tokens."""
    import blingfire
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    docs = []
    for path in sorted(raw.glob("*.txt")):
        sentences = [s for s in blingfire.text_to_sentences(path.read_text()).split("\n") if s]
        ids = [x for x in tok(sentences, add_special_tokens=False)["input_ids"] if x]
        if not ids:
            continue
        sents = np.concatenate(([0], np.cumsum([len(x) for x in ids]))).astype(np.int32)
        docs.append((path.stem, np.concatenate(ids), sents))
    return docs


def synthetic_sotu(n_docs: int = 120, seed: int = 0) -> list[Doc]:
    """SOTU-like documents: ~300 sentences of lognormal length (median ~24 tokens)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        lens = np.clip(rng.lognormal(np.log(24), 0.55, size=int(rng.integers(150, 450))), 3, 200)
        sents = np.concatenate(([0], np.cumsum(lens.astype(np.int64)))).astype(np.int32)
        docs.append((f"synthetic-{i}", rng.integers(1000, 30000, size=int(sents[-1])), sents))
    return docs


def prepare_shards(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    if args.shards:
        return Path(args.shards), f"shards {args.shards}"
    raw = Path(args.raw)
    if raw.is_dir() and any(raw.glob("*.txt")):
        docs, source = docs_from_text(raw), f"text {raw} (blingfire + BERT tokenizer)"
    else:
        docs, source = synthetic_sotu(), "synthetic SOTU-like (no demo text found)"
    shards = [docs[i::8] for i in range(8)]
    return write_shards(tmp, {"train": shards}, vocab_size=30522), f"{source}, {len(docs)} docs"


def padding_floor(shard_dir: Path, seq_len: int) -> tuple[float, float]:
    """(gap share, last-window share) of padding when every window is one row of seq_len."""
    windows = list(document_windows(split_shards(shard_dir, "train"), seq_len, 1, WindowCounters()))
    fill = np.asarray([w.n_tokens for w in windows], dtype=np.float64)
    last = np.asarray(
        [i + 1 == len(windows) or windows[i + 1].index == 0 for i in range(len(windows))]
    )
    total = len(windows) * seq_len
    return float((seq_len - fill[~last]).sum() / total), float((seq_len - fill[last]).sum() / total)


def measure(
    shard_dir: Path,
    preset: str,
    seq_len: int,
    workers: int,
    seconds: float,
    packing: bool,
    min_batches: int = 0,
) -> dict:
    cfg = load_config(
        preset, [f"data.shards={shard_dir}", f"model.seq_len={seq_len}", f"data.packing={packing}"]
    )
    loader = TrainLoader(StreamSpec.from_config(cfg, "train"), 0, 1, num_workers=workers)
    for _ in range(3):  # worker start-up and first reads
        next(loader)
    sums = dict.fromkeys(("real", "total", "ctx", "ctx_total", "tgt", "tgt_total", "batches"), 0)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or sums["batches"] < min_batches:
        batch = next(loader)
        for key, mask in (("real", "valid"), ("ctx", "ctx_valid"), ("tgt", "tgt_valid")):
            sums[key] += int(batch[mask].sum())
            sums["total" if key == "real" else f"{key}_total"] += batch[mask].numel()
        sums["batches"] += 1
    elapsed = time.perf_counter() - start
    counters = loader.counters()
    loader.close()
    return {
        "seq_len": seq_len,
        "packing": packing,
        "micro_batch": cfg.data.micro_batch_size,
        "tokens_per_s": sums["real"] / elapsed,
        "batches": sums["batches"],
        "batches_per_s": sums["batches"] / elapsed,
        "padding_fraction": 1.0 - sums["real"] / sums["total"],
        "ctx_padding_fraction": 1.0 - sums["ctx"] / sums["ctx_total"],
        "tgt_padding_fraction": 1.0 - sums["tgt"] / sums["tgt_total"],
        "short_windows": counters["short_windows"],
        "long_sentence_pieces": counters["long_sentence_pieces"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", help="a build_shards output directory")
    p.add_argument("--raw", default="data/demo/raw", help="text files to tokenize (one doc each)")
    p.add_argument("--preset", default="small", help="config preset (batch size, masking)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per seq_len")
    p.add_argument(
        "--min-batches",
        type=int,
        default=0,
        help="measure at least this many batches (fixed figures whatever the load)",
    )
    p.add_argument("--no-unpacked", action="store_true", help="measure packed batches only")
    p.add_argument("--json", help="write the packed figures of the first seq_len here")
    args = p.parse_args(argv)
    modes = (True,) if args.no_unpacked else (True, False)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir, source = prepare_shards(args, Path(tmp))
        rows, floors = [], {}
        for seq_len in args.seq_len:
            for packing in modes:
                rows.append(
                    measure(
                        shard_dir,
                        args.preset,
                        seq_len,
                        args.workers,
                        args.seconds,
                        packing,
                        args.min_batches,
                    )
                )
            floors[seq_len] = padding_floor(shard_dir, seq_len)
    print(f"data: {source}; preset {args.preset}; {args.workers} worker(s)")
    print(f"{'seq_len':>7} {'packed':>6} {'batch':>5} {'tokens/s':>10} {'batches/s':>9} "
          f"{'padding':>8} {'ctx pad':>8} {'tgt pad':>8} {'short':>6} {'pieces':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['seq_len']:>7} {'yes' if r['packing'] else 'no':>6} {r['micro_batch']:>5} "
              f"{r['tokens_per_s']:>10,.0f} {r['batches_per_s']:>9.1f} "
              f"{r['padding_fraction']:>8.2%} {r['ctx_padding_fraction']:>8.2%} "
              f"{r['tgt_padding_fraction']:>8.2%} {r['short_windows']:>6} "
              f"{r['long_sentence_pieces']:>6}")  # fmt: skip
    for seq_len, (gap, last) in floors.items():
        print(f"unpacked padding at seq_len {seq_len}: {gap:.2%} gap at the end of full windows "
              f"+ {last:.2%} in documents' last windows")  # fmt: skip
    if args.json:
        first = rows[0]
        out = {
            "tokens_per_s_per_worker": first["tokens_per_s"] / max(1, args.workers),
            "padding_fraction": first["padding_fraction"],
            "seq_len": first["seq_len"],
            "source": source,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
