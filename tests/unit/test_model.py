"""Model and objective invariants on real batches (real shards, real tokenizer), no engine."""

from __future__ import annotations

import pytest
import torch

from lang_jepa.engine import param_groups
from lang_jepa.models import build_encoder, encoder_config, pool_by_slot
from lang_jepa.models.layers import matmul_params
from lang_jepa.objectives import compute_targets, jepa_loss
from tests.helpers import setup_batch


@pytest.mark.parametrize("packing", [True, False])
def test_target_tokens_never_reach_the_context_encoder(tiny_shards, packing):
    cfg, model, target, batch, vocab = setup_batch(tiny_shards, f"data.packing={packing}")
    model.eval()
    perturbed = dict(batch)
    ids = batch["input_ids"].clone()
    rows = torch.arange(ids.shape[0])[:, None].expand_as(batch["tgt_index"])
    ids[rows[batch["tgt_valid"]], batch["tgt_index"][batch["tgt_valid"]]] = torch.randint(
        1, vocab, (int(batch["tgt_valid"].sum()),)
    )
    perturbed["input_ids"] = ids
    assert not torch.equal(ids, batch["input_ids"])
    with torch.no_grad():
        # the context encoder's outputs and the predictions do not change by a single bit
        assert torch.equal(model.encode_context(batch), model.encode_context(perturbed))
        assert torch.equal(model(batch), model(perturbed))
        # ...while the targets (the full window) do: the perturbation was real
        t0 = compute_targets(target, batch, None)
        t1 = compute_targets(target, perturbed, None)
    assert not torch.equal(t0, t1)


def test_predictions_depend_on_the_context(tiny_shards):
    _, model, _, batch, _ = setup_batch(tiny_shards, "data.packing=false")
    shuffled = dict(batch)
    perm = torch.roll(torch.arange(batch["input_ids"].shape[0]), 1)
    for key in ("input_ids", "ctx_index", "ctx_valid"):
        shuffled[key] = batch[key][perm]
    with torch.no_grad():
        assert not torch.allclose(model(batch), model(shuffled))


def _window_slots(batch: dict) -> torch.Tensor:
    """Window number (0..W-1) of every target slot of a one-row packed batch."""
    cu = batch["cu_full"].long()
    tgt_window = torch.searchsorted(cu[1:], batch["tgt_index"][0], right=True)
    slots = torch.full((batch["tgt_sent_valid"].shape[1],), -1)
    valid = batch["tgt_valid"][0]
    slots[batch["tgt_sent"][0][valid]] = tgt_window[valid]
    return slots


def test_windows_packed_in_one_row_do_not_see_each_other(tiny_shards):
    cfg, model, target, batch, vocab = setup_batch(tiny_shards)
    assert batch["input_ids"].shape[0] == 1 and len(batch["doc_index"]) >= 3
    model.eval()
    changed = dict(batch)
    cu = batch["cu_full"].tolist()
    ids = batch["input_ids"].clone()
    ids[0, cu[1] : cu[2]] = torch.randint(1, vocab, (cu[2] - cu[1],))  # every token of window 1
    changed["input_ids"] = ids
    window = _window_slots(batch)
    with torch.no_grad():
        p0, p1 = model(batch), model(changed)
        t0, t1 = compute_targets(target, batch, None), compute_targets(target, changed, None)
    for before, after in ((p0, p1), (t0, t1)):
        assert not torch.allclose(before[0, window == 1], after[0, window == 1])
        assert torch.equal(before[0, window != 1], after[0, window != 1])


def test_packed_batch_matches_one_window_per_row(tiny_shards):
    from lang_jepa.data.masking import collate, collate_rows, mask_window
    from lang_jepa.data.reader import document_windows, split_shards
    from lang_jepa.data.windows import WindowCounters

    cfg, model, target, _, _ = setup_batch(tiny_shards)
    model.eval()
    shards = split_shards(tiny_shards, "train")
    windows = list(document_windows(shards, cfg.model.seq_len, 3, WindowCounters()))[:6]
    masks = [mask_window(w, cfg.mask, 0, 0) for w in windows]
    rows = collate(windows, masks, cfg.model.seq_len)
    budget = sum(w.n_tokens for w in windows) + 13  # and a padding tail
    packed = collate_rows([list(zip(windows, masks, strict=True))], budget, packed=True)
    with torch.no_grad():
        pred_rows, pred_packed = model(rows), model(packed)
        tgt_rows = compute_targets(target, rows, None)
        tgt_packed = compute_targets(target, packed, None)
    sel_rows, sel_packed = rows["tgt_sent_valid"], packed["tgt_sent_valid"]
    assert int(sel_rows.sum()) == int(sel_packed.sum())
    torch.testing.assert_close(pred_packed[sel_packed], pred_rows[sel_rows], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tgt_packed[sel_packed], tgt_rows[sel_rows], atol=1e-5, rtol=1e-4)
    loss_rows, _ = jepa_loss(pred_rows, tgt_rows, sel_rows, cfg.loss)
    loss_packed, _ = jepa_loss(pred_packed, tgt_packed, sel_packed, cfg.loss)
    torch.testing.assert_close(loss_packed, loss_rows)


def test_targets_are_pooled_per_sentence_and_layer_normed(tiny_shards):
    _, _, target, batch, _ = setup_batch(tiny_shards, "data.packing=false")
    t = compute_targets(target, batch, None)
    valid = batch["tgt_sent_valid"]
    assert t.shape[:2] == valid.shape and t.dtype == torch.float32
    torch.testing.assert_close(t[valid].mean(-1), torch.zeros(int(valid.sum())), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        t[valid].var(-1, unbiased=False), torch.ones(int(valid.sum())), atol=1e-3, rtol=0
    )
    # by hand: features of the full window, mean over one target sentence's tokens
    with torch.no_grad():
        feats = target(batch["input_ids"], batch["position_ids"], batch["valid"])
    b = 0
    idx = batch["tgt_index"][b][batch["tgt_valid"][b] & (batch["tgt_sent"][b] == 0)]
    pooled = feats[b, idx].mean(0)
    expected = torch.nn.functional.layer_norm(pooled, pooled.shape)
    torch.testing.assert_close(t[b, 0], expected, atol=1e-5, rtol=1e-5)


def test_pool_by_slot_matches_a_loop():
    x = torch.randn(2, 7, 3)
    slot = torch.tensor([[0, 0, 1, 1, 1, 2, 0], [1, 1, 0, 0, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]]).bool()
    out = pool_by_slot(x, slot, valid, 3)
    for b in range(2):
        for s in range(3):
            sel = (slot[b] == s) & valid[b]
            want = x[b, sel].mean(0) if sel.any() else torch.zeros(3)
            torch.testing.assert_close(out[b, s], want)


def test_activation_checkpointing_and_positions(tiny_shards):
    for pos in ("rope", "learned"):
        cfg, model, target, batch, _ = setup_batch(tiny_shards, f"model.pos={pos}")
        model.train()
        loss_a, _ = jepa_loss(
            model(batch), compute_targets(target, batch, None), batch["tgt_sent_valid"], cfg.loss
        )
        loss_a.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model.encoder.activation_checkpointing = model.predictor.activation_checkpointing = True
        loss_b, _ = jepa_loss(
            model(batch), compute_targets(target, batch, None), batch["tgt_sent_valid"], cfg.loss
        )
        loss_b.backward()
        assert torch.equal(loss_a, loss_b)
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-7)


def test_flops_count_every_matmul_weight(tiny_shards):
    _, model, _, _, _ = setup_batch(tiny_shards)
    for module in (model.encoder, model.predictor):
        weights = sum(
            m.weight.numel() for m in module.stack.modules() if isinstance(m, torch.nn.Linear)
        )
        assert matmul_params(module.dim, module.depth, module.mlp_ratio) == weights


def test_one_encoder_builder_for_training_export_and_baselines(tiny_shards):
    """build_encoder gives the training encoder (same seed, same weights) from the ModelConfig, the
    resolved config's model dict or an export's model section alike."""
    from lang_jepa.config import to_dict

    cfg, model, _, batch, vocab = setup_batch(tiny_shards, "model.pos=learned")
    section = encoder_config(cfg.model, vocab)  # what an export's config.json records
    assert section["vocab_size"] == vocab and section["seq_len"] == cfg.model.seq_len
    for source in (cfg.model, to_dict(cfg)["model"], section):
        torch.manual_seed(0)  # setup_batch's seed: build_models builds the encoder first
        encoder = build_encoder(source, vocab)
        assert encoder.training and encoder.max_len == cfg.model.seq_len
        want = model.encoder.state_dict()
        got = encoder.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    checkpointed = build_encoder({**section, "activation_checkpointing": True}, vocab)
    assert (
        checkpointed.activation_checkpointing
        and not build_encoder(section, vocab).activation_checkpointing
    )
    with pytest.raises(ValueError, match="seq_len"):
        build_encoder({k: v for k, v in section.items() if k != "seq_len"}, vocab)


def test_only_the_engine_imports_deepspeed_and_models_know_no_engine():
    """DeepSpeed is imported by lang_jepa/engine.py only; models/ knows nothing of the engine,
    torch.distributed, checkpoint files or logging (STYLE rules 1 and 15)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "lang_jepa"
    seen_engine = False
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "deepspeed":
                    assert path == root / "engine.py", f"{path} imports {name}"
                    seen_engine = True
                if path.parent == root / "models":
                    banned = ("deepspeed", "torch.distributed", "safetensors", "logging")
                    assert not name.startswith(banned), f"{path} imports {name}"
    assert seen_engine


def test_no_weight_decay_on_biases_and_norms(tiny_shards):
    _, model, _, _, _ = setup_batch(tiny_shards)
    decay, no_decay = param_groups(model)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    assert any(p is model.predictor.mask_token for p in no_decay["params"])


def test_varlen_branch_passes_what_varlen_attn_expects(tiny_shards, monkeypatch):
    """The CUDA branch of packed attention, run on CPU against a reference ``varlen_attn``: it must
    get q/k/v [T, H, hd] contiguous, int32 cu_seqlens covering every token, the true longest
    segment, and its output must land where the padded path's does."""
    from lang_jepa.models import layers

    _, model, target, batch, _ = setup_batch(tiny_shards)
    model.eval()
    with torch.no_grad():
        expected = model(batch), compute_targets(target, batch, None)
    calls = []

    def reference(q, k, v, cu_q, cu_k, max_q, max_k):
        assert q.dim() == 3 and q.is_contiguous() and k.shape == v.shape == q.shape
        assert cu_q is cu_k and cu_q.dtype == torch.int32 and int(cu_q[-1]) == q.shape[0]
        lengths = cu_q.diff().tolist()
        assert max_q == max_k == max(lengths) and min(lengths) > 0
        out = [
            torch.nn.functional.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1) for t in (q, k, v))
            ).transpose(0, 1)
            for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True)
        ]
        calls.append(q.shape[0])
        return torch.cat(out)

    monkeypatch.setattr(layers, "varlen_attn", reference)
    monkeypatch.setattr(layers, "use_varlen", lambda q, dropout: True)
    with torch.no_grad():
        got = model(batch), compute_targets(target, batch, None)
    # every layer of the context encoder, the target encoder and the predictor took the branch
    assert len(calls) == 2 * model.encoder.depth + model.predictor.depth
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
