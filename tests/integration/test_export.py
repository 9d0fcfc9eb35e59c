"""Export and the Encoder API against real training runs (DeepSpeed ZeRO-2 and ZeRO-3 on CPU).

The exported encoder must be bit-identical to what the checkpoint holds, and must give the same
embeddings as the encoder inside the training run (same tokens, windows, positions, pooling).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lang_jepa import checkpoint
from lang_jepa.config import load_config
from lang_jepa.data.reader import decode_sample, read_shard
from lang_jepa.data.windows import cut_windows
from lang_jepa.export import ExportError, export
from lang_jepa.export import main as export_main
from lang_jepa.models import encoder_config, pool_by_slot
from lang_jepa.objectives import build_models
from lang_jepa.shards import load_manifest, shard_urls, tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]
STEPS = 6


def _ds_config(tmp: Path, stage: int) -> Path:
    """ZeRO-3 with every parameter partitioned (small models hide ZeRO-3 bugs), or ZeRO-0."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    else:
        cfg["zero_optimization"] = {"stage": stage}
    path = tmp / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> dict[str, Path]:
    """Tiny training runs, ZeRO-0, 2 and 3, trained side by side with train.py."""
    tmp = tmp_path_factory.mktemp("export_runs")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    ds = {
        "zero0": _ds_config(tmp, 0),
        "zero2": REPO / "ds_configs" / "zero2.json",
        "zero3": _ds_config(tmp, 3),
    }
    procs = {}
    for name, ds_config in ds.items():
        cmd = [sys.executable, "train.py", "--deepspeed_config", str(ds_config), "--config", "tiny",
               f"data.shards={tiny_shards}", f"train.run_dir={tmp / name}", f"train.max_steps={STEPS}",
               "train.val_interval=0"]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)  # fmt: skip
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} run failed:\n{out[-4000:]}"
    return {name: tmp / name for name in ds}


def _tag_dir(run: Path) -> Path:
    ckpt = run / "checkpoints"
    return ckpt / (ckpt / "latest").read_text().strip()


def _training_encoder(run: Path) -> torch.nn.Module:
    """The target encoder as the trainer builds and restores it (build_models + checkpoint file)."""
    cfg = load_config(str(run / "config.yaml"))
    _, target = build_models(cfg, cfg.model.vocab_size)
    target.load_state_dict(load_file(str(_tag_dir(run) / "target_encoder.safetensors")))
    return target.eval()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_export_target_is_the_checkpoints_ema_encoder(runs, tmp_path, zero, tiny_shards):
    out = export(runs[zero], tmp_path / "out")
    got = load_file(str(out / "model.safetensors"))
    want = load_file(str(_tag_dir(runs[zero]) / "target_encoder.safetensors"))
    assert got.keys() == want.keys() and "stack.blocks.0.attn.qkv.weight" in got
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == torch.float32 for k in got)
    config = json.loads((out / "config.json").read_text())
    meta = json.loads((_tag_dir(runs[zero]) / "meta.json").read_text())
    assert config["which"] == "target" and config["source"]["step"] == STEPS
    assert config["source"]["zero_stage"] == int(zero[-1]) == meta["zero_stage"]
    assert config["source"]["manifest_sha256"] == meta["manifest_sha256"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tokenizer_fingerprint(tok) == load_manifest(tiny_shards)["tokenizer"]["sha256"]


def test_export_online_is_the_fp32_master_encoder(runs, tmp_path):
    online2 = load_file(
        str(export(runs["zero2"], tmp_path / "o2", which="online") / "model.safetensors")
    )
    online3 = load_file(
        str(export(runs["zero3"], tmp_path / "o3", which="online") / "model.safetensors")
    )
    # ZeRO-2, one rank, fp32 training: the module states DeepSpeed saved are the master weights.
    module = torch.load(_tag_dir(runs["zero2"]) / "mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    masters = {k.removeprefix("encoder."): v for k, v in module.items() if k.startswith("encoder.")}
    assert online2.keys() == masters.keys()
    assert all(torch.equal(online2[k], masters[k].float()) for k in masters)
    # ZeRO-0 (no partitioning, fp32): the module weights themselves, read without zero_to_fp32.
    online0 = load_file(
        str(export(runs["zero0"], tmp_path / "o0", which="online") / "model.safetensors")
    )
    module0 = torch.load(
        _tag_dir(runs["zero0"]) / "mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    assert (
        all(torch.equal(online0[k], module0[f"encoder.{k}"]) for k in online0)
        and online0.keys() == masters.keys()
    )
    # ZeRO-3 (every parameter partitioned) consolidates to the same model, up to reduction order.
    assert online3.keys() == online2.keys()
    assert all(torch.allclose(online3[k], online2[k], atol=1e-5) for k in online2)
    # Sanity: the online encoder moved away from the EMA target (momentum < 1) during training.
    target = load_file(str(_tag_dir(runs["zero2"]) / "target_encoder.safetensors"))
    assert max(float((online2[k] - target[k]).abs().max()) for k in target) > 1e-4


def test_checkpoint_readers_give_what_export_writes(runs, tmp_path):
    """One reader for training, export and evaluation (lang_jepa.checkpoint): the same checkpoint
    from a run, checkpoints or tag directory; the consolidated state is the whole DeepSpeed module
    in fp32, and its encoder part and the target state are exactly what export writes."""
    for zero, run in runs.items():
        ckpt_dir, tag = checkpoint.locate(run)
        assert (ckpt_dir, tag) == (run / "checkpoints", _tag_dir(run).name)
        for where in ((ckpt_dir,), (ckpt_dir / tag,), (run, tag)):
            assert checkpoint.locate(*where) == (ckpt_dir, tag)
        full = checkpoint.consolidated_state(ckpt_dir, tag)
        assert all(v.dtype == torch.float32 for v in full.values())
        cfg = load_config(str(run / "config.yaml"))
        jepa, _ = build_models(cfg, cfg.model.vocab_size)
        jepa.load_state_dict(full, strict=True)  # encoder and predictor, every parameter
        online = load_file(str(export(run, tmp_path / zero, which="online") / "model.safetensors"))
        enc = checkpoint.encoder_state(full)
        assert enc.keys() == online.keys() and all(torch.equal(enc[k], online[k]) for k in online)
        target = checkpoint.target_state(ckpt_dir, tag)
        exported = load_file(str(export(run, tmp_path / f"{zero}_t") / "model.safetensors"))
        assert target.keys() == exported.keys()
        assert all(torch.equal(target[k], exported[k]) for k in exported)


def test_export_config_is_the_encoders_architecture_and_v1_exports_load(runs, tmp_path):
    from lang_jepa import Encoder

    run = runs["zero2"]
    out = export(run, tmp_path / "v2")
    config = json.loads((out / "config.json").read_text())
    cfg = load_config(str(run / "config.yaml"))
    assert config["format"] == "lang-jepa-encoder/2"
    assert config["model"] == encoder_config(cfg.model, cfg.model.vocab_size)
    new = Encoder.from_pretrained(out, device="cpu")
    # an export written before the model section took ModelConfig's names (max_len, not seq_len)
    v1_model = {k: v for k, v in config["model"].items() if k != "seq_len"}
    v1 = {
        **config,
        "format": "lang-jepa-encoder/1",
        "model": {**v1_model, "max_len": cfg.model.seq_len},
    }
    (out / "config.json").write_text(json.dumps(v1))
    old = Encoder.from_pretrained(out, device="cpu")
    assert (
        old.seq_len == new.seq_len == cfg.model.seq_len and old.config["model"] == config["model"]
    )
    text = "The old export still embeds. It gives the same vectors."
    assert torch.equal(old.encode([text], level="document"), new.encode([text], level="document"))


def _val_document(shards: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(raw text, shard tokens, shard sentence offsets) of the first validation document."""
    url = shard_urls(shards, "val")[0]
    tokens, sents, meta = decode_sample(next(iter(read_shard(url))), url)
    return Path(meta["source"]).read_text(encoding="utf-8"), tokens, sents


def _training_token_features(encoder, windows, seq_len: int) -> torch.Tensor:
    """Final features [T, D] of every token of the windows, in order: each window padded to
    seq_len with positions 0..n-1 (0 on padding), as the training collator builds the batch."""
    b = len(windows)
    ids = torch.zeros(b, seq_len, dtype=torch.long)
    valid = torch.zeros(b, seq_len, dtype=torch.bool)
    for row, w in enumerate(windows):
        ids[row, : w.n_tokens] = torch.from_numpy(w.tokens.astype(np.int64))
        valid[row, : w.n_tokens] = True
    pos = torch.where(valid, torch.arange(seq_len).expand(b, -1), 0)
    with torch.no_grad():
        return encoder(ids, pos, valid)[valid]


def _pool(feats: torch.Tensor, sents: np.ndarray) -> torch.Tensor:
    """Training's target pooling (pool_by_slot): mean of each sentence's token features, [S, D]."""
    slot = torch.from_numpy(np.repeat(np.arange(len(sents) - 1), np.diff(sents)))
    return pool_by_slot(
        feats[None], slot[None], torch.ones_like(slot[None], dtype=torch.bool), len(sents) - 1
    )[0]


def test_exported_encoder_embeds_like_the_training_encoder(runs, tmp_path, tiny_shards):
    from lang_jepa import Encoder

    run = runs["zero3"]
    enc = Encoder.from_pretrained(export(run, tmp_path / "out"), device="cpu")
    text, tokens, sents = _val_document(tiny_shards)
    # Text -> ids exactly as preprocessing made the shard (blingfire sentences, no special tokens).
    got_tokens, got_sents = enc.tokenize_document(text)
    assert np.array_equal(got_tokens, tokens) and np.array_equal(got_sents, sents)
    # Every window of the document, as the training loader cuts it, through the training encoder.
    windows = cut_windows(tokens, sents, enc.seq_len, 1, "val-doc")
    assert len(windows) > 10 and sum(w.n_tokens for w in windows) == len(tokens)
    training = _training_encoder(run)
    feats = _training_token_features(training, windows, enc.seq_len)
    want = _pool(feats, sents)
    (got,) = enc.encode_sentences([text], batch_size=7)
    assert got.shape == want.shape == (len(sents) - 1, enc.dim)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # level="document": the mean over all the document's tokens, each read in its window.
    doc = enc.encode([text], level="document")
    torch.testing.assert_close(doc[0], feats.mean(0), atol=2e-6, rtol=1e-5)
    # level="sentence": each text alone in its own window (here the document's first sentence);
    # layer_norm=True is the training target's normalisation.
    first = enc.encode([enc.split_sentences(text)[0]], layer_norm=True, as_numpy=True)
    alone = cut_windows(tokens[: sents[1]], sents[:2], enc.seq_len, 1, "s")
    want_first = torch.nn.functional.layer_norm(
        _training_token_features(training, alone, enc.seq_len).mean(0), (enc.dim,)
    )
    np.testing.assert_allclose(first[0], want_first.numpy(), atol=1e-5)


def test_export_errors_name_the_path(runs, tmp_path, capsys):
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nothing", tmp_path / "out")
    # the command line: exit code 2 and the message, no traceback
    assert export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing'} does not exist\n"
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match=f"{empty / 'checkpoints'}.*'latest' missing"):
        export(empty, tmp_path / "out")
    broken = empty / "checkpoints" / "step00000001"
    broken.mkdir()
    (empty / "checkpoints" / "latest").write_text("step00000001")
    with pytest.raises(ExportError, match=f"{broken}: incomplete checkpoint.*meta.json"):
        export(empty, tmp_path / "out")
    with pytest.raises(ExportError, match="no such checkpoint"):
        export(runs["zero2"], tmp_path / "out", tag="step99999999")


HF_TEXTS = ["The committee approved the budget on Tuesday.", "Congress shall make no law.",
            "We the people, in order to form a more perfect union, establish justice.", "Peace."]  # fmt: skip


def test_hf_export_loads_in_transformers_and_sentence_transformers(runs, tmp_path, tiny_shards):
    """The real libraries, offline, on CPU: the same embeddings as lang_jepa.Encoder (fp32 SDPA
    with the same weights and ids: equal to a few ulps; asserted to 1e-5)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from lang_jepa import Encoder

    out = tmp_path / "hf"
    assert export_main([str(runs["zero2"]), "--out", str(out), "--format", "hf"]) == 0
    native = export(runs["zero2"], tmp_path / "native")
    ref = Encoder.from_pretrained(native).encode(HF_TEXTS)

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "LangJepaModel"
    batch = tok(HF_TEXTS, padding=True, return_tensors="pt")
    # the shards' ids: no [CLS]/[SEP] (preprocessing tokenizes sentences without them)
    assert batch["input_ids"][0, 0].item() != tok.cls_token_id
    with torch.no_grad():
        feats = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"][..., None].float()
    pooled = (feats.last_hidden_state * mask).sum(1) / mask.sum(1)
    assert torch.allclose(pooled, ref, atol=1e-5), (pooled - ref).abs().max()

    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    emb = st.encode(HF_TEXTS, convert_to_tensor=True).cpu()
    assert emb.shape == ref.shape and torch.allclose(emb, ref, atol=1e-5), (emb - ref).abs().max()
    assert st.max_seq_length == load_config("tiny", []).model.seq_len

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert f"step {STEPS} of run" in card and "## Licence" in card and "## Evaluation" in card


def test_hf_export_errors_name_the_export(runs, tmp_path, capsys):
    from lang_jepa.hf import HFExportError, to_hf

    bare = export(runs["zero2"], tmp_path / "bare", tokenizer="none")
    with pytest.raises(HFExportError, match=r"bare: the export has no tokenizer"):
        to_hf(bare, tmp_path / "hf")
    with pytest.raises(HFExportError, match=r"nowhere: not a LANG-JEPA export"):
        to_hf(tmp_path / "nowhere", tmp_path / "hf2")
