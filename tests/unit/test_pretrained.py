"""model.init_from: a BERT-family checkpoint (the offline all-MiniLM-L6-v2 weights) loads into the
``arch=bert`` encoder exactly, against ``transformers.BertModel`` on the same input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from lang_jepa.models import build_encoder
from lang_jepa.models.layers import Segments
from lang_jepa.pretrained import PretrainedError, bert_architecture, load_pretrained
from preprocessing.tokenizer import default_tokenizer_dir

MINILM = default_tokenizer_dir()  # the package's model/ directory: config, weights, tokenizer


def _encoder() -> torch.nn.Module:
    arch = bert_architecture(MINILM)
    cfg = {"seq_len": 128, "rope_theta": 1e4, "dropout": 0.0, "init_std": 0.02, **arch}
    enc = build_encoder(cfg, arch["vocab_size"]).eval()
    load_pretrained(enc, MINILM)
    return enc


def test_architecture_is_read_from_the_checkpoint():
    arch = bert_architecture(MINILM)
    assert arch == {"arch": "bert", "pos": "learned", "dim": 384, "depth": 6, "heads": 12,
                    "mlp_ratio": 4.0, "norm_eps": 1e-12, "max_positions": 512,
                    "vocab_size": 30522}  # fmt: skip


def test_token_features_equal_transformers_bertmodel():
    """fp32 on CPU, the same weights and ids, padding masked: equal to 1e-5 (measured ~2e-6 on
    features up to ~6; the two differ in summation order only)."""
    enc, ref = _encoder(), BertModel.from_pretrained(str(MINILM)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (3, 48), generator=gen)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 30:] = False
    valid[2, 7:] = False
    pos = torch.arange(48).expand(3, -1)
    with torch.no_grad():
        ours = enc(ids, pos, valid)
        theirs = ref(input_ids=ids, attention_mask=valid.long(),
                     token_type_ids=torch.zeros_like(ids)).last_hidden_state  # fmt: skip
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-5), (ours - theirs)[valid].abs().max()


def test_a_packed_row_gives_each_window_its_own_features():
    """Packing still works with the BERT encoder: two windows in one row, kept apart."""
    enc = _encoder()
    a, b = torch.randint(1000, 29000, (1, 20)), torch.randint(1000, 29000, (1, 12))
    row = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(20), torch.arange(12)])[None]
    seg = Segments(torch.tensor([0, 20, 32], dtype=torch.int32), max_len=20, total=32)
    with torch.no_grad():
        packed = enc(row, pos, None, seg)
        alone = [enc(x, torch.arange(x.shape[1])[None]) for x in (a, b)]
    assert torch.allclose(packed, torch.cat(alone, dim=1), atol=1e-5)


def test_a_checkpoint_that_is_not_bert_is_refused(tmp_path: Path):
    cfg = json.loads((MINILM / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(PretrainedError, match=r"model_type 'roberta', not a BERT-family"):
        bert_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(PretrainedError, match=r"hidden_act 'relu'"):
        bert_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match=r"cannot read model.safetensors"):
        load_pretrained(_encoder(), tmp_path)


def test_the_untrained_pretrained_export_is_the_checkpoint(tmp_path: Path):
    """The experiment harness's ``init: pretrained`` variant (the "before" of continued
    pretraining): the export holds the checkpoint's weights and embeds like BertModel + mean."""
    from safetensors.torch import load_file

    from lang_jepa import Encoder
    from lang_jepa.export import export_random_init
    from lang_jepa.pretrained import bert_state

    arch = bert_architecture(MINILM)
    cfg = {"seq_len": 128, "rope_theta": 1e4, "dropout": 0.0, "init_std": 0.02, **arch}
    out = export_random_init(cfg, arch["vocab_size"], MINILM, tmp_path / "before", 0, str(MINILM))
    saved, expected = load_file(str(out / "model.safetensors")), bert_state(MINILM, 6)
    assert saved.keys() == expected.keys() and all(
        torch.equal(saved[k], expected[k]) for k in saved
    )
    enc = Encoder.from_pretrained(out, device="cpu")
    ids = enc.tokenizer.encode("The committee approved the budget.", add_special_tokens=False).ids
    ref = BertModel.from_pretrained(str(MINILM)).eval()
    with torch.no_grad():
        feats = ref(input_ids=torch.tensor([ids])).last_hidden_state.mean(1)
    emb = enc.encode("The committee approved the budget.")
    assert torch.allclose(emb, feats, atol=1e-5)


def test_a_bert_export_in_hf_format_is_a_plain_bertmodel(tmp_path: Path):
    """``--format hf`` of an ``arch=bert`` encoder: transformers' own BertModel (no remote code),
    MiniLM's weights under their own names, and sentence-transformers giving Encoder.encode's
    embeddings (fp32, the same weights and ids: a few ulps apart; asserted to 1e-5)."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from lang_jepa import Encoder
    from lang_jepa.export import export_random_init
    from lang_jepa.hf import to_hf

    arch = bert_architecture(MINILM)
    cfg = {"seq_len": 128, "rope_theta": 1e4, "dropout": 0.0, "init_std": 0.02, **arch}
    native = export_random_init(
        cfg, arch["vocab_size"], MINILM, tmp_path / "native", 0, str(MINILM)
    )
    out = to_hf(native, tmp_path / "hf")
    assert not (out / "modeling_lang_jepa.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["lang_jepa"]["which"] == "init"
    # MiniLM's own tensors come back under their own names (the pooler, unused, is zeros)
    mine, theirs = (
        load_file(str(out / "model.safetensors")),
        load_file(str(MINILM / "model.safetensors")),
    )
    theirs = {k.removeprefix("bert."): v for k, v in theirs.items() if "position_ids" not in k}
    shared = [k for k in theirs if not k.startswith("pooler.")]
    assert set(shared) <= set(mine) and all(torch.equal(mine[k], theirs[k]) for k in shared)
    assert not mine["pooler.dense.weight"].any()

    texts = [
        "The committee approved the budget.",
        "Peace was made with Spain after the war.",
        "Taxes rose.",
    ]
    ref = Encoder.from_pretrained(native, device="cpu").encode(texts)
    model = AutoModel.from_pretrained(out).eval()
    assert type(model).__name__ == "BertModel"
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() != tok.cls_token_id  # no [CLS]/[SEP], as in training
    with torch.no_grad():
        feats = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (feats * mask).sum(1) / mask.sum(1)
    assert torch.allclose(pooled, ref, atol=1e-5), (pooled - ref).abs().max()
    st = SentenceTransformer(str(out), device="cpu")
    emb = st.encode(texts, convert_to_tensor=True).cpu()
    assert torch.allclose(emb, ref, atol=1e-5), (emb - ref).abs().max()
    card = (out / "README.md").read_text()
    assert "loaded as `transformers.BertModel`" in card and "trust_remote_code" not in card
