"""The levers of the objective (target layers and norms, token-level targets, InfoNCE, SIGReg on
the context, the jepa+mlm hybrid, the alarm on the predictions), each against a known answer, on
real batches of the tiny preset (real shards, real tokenizer), no engine."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lang_jepa.config import ConfigError, load_config
from lang_jepa.metrics import CollapseAlarm, stream_flops
from lang_jepa.objectives import (
    Runtime,
    batch_segments,
    build_objective,
    infonce,
    jepa_loss,
    pooled_features,
    pooled_targets,
    target_features,
    token_targets,
)
from lang_jepa.objectives.hybrid import context_mlm_mask, latent_weight
from lang_jepa.objectives.jepa import candidates, normalise, representation_stats, same_window
from tests.helpers import setup_batch

CPU = Runtime(torch.device("cpu"), 0, 1, None)


def test_a_perfect_predictor_scores_infonce_near_zero_and_the_mean_log_n():
    n, d = 12, 32
    target = (torch.eye(d)[:n] * 3.0).reshape(2, 6, d)  # orthogonal targets
    valid = torch.ones(2, 6, dtype=torch.bool)
    assert float(infonce(target.clone(), target, valid, 0.05)) < 1e-6
    mean = target.mean((0, 1), keepdim=True).expand_as(target)
    assert float(infonce(mean, target, valid, 0.05)) == pytest.approx(math.log(n), rel=1e-5)
    # invalid slots are neither queries nor candidates
    valid[1, 3:] = False
    assert float(infonce(mean, target, valid, 0.05)) == pytest.approx(math.log(9), rel=1e-5)


def test_infonce_as_a_loss_type_and_mixed_with_the_regression(tiny_shards):
    cfg = load_config("tiny", [f"data.shards={tiny_shards}", "loss.infonce_weight=0.5"])
    pred, target = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    valid = torch.ones(2, 5, dtype=torch.bool)
    loss, parts = jepa_loss(pred, target, valid, cfg.loss)
    regression = F.smooth_l1_loss(pred, target)
    assert float(loss) == pytest.approx(float(regression + 0.5 * parts["infonce"]), rel=1e-5)
    cfg.loss.type, cfg.loss.infonce_weight = "infonce", 0.0
    loss, _ = jepa_loss(pred, target, valid, cfg.loss)
    assert float(loss) == pytest.approx(float(infonce(pred, target, valid, 0.1)), rel=1e-6)


def test_window_negatives_rank_only_the_same_windows_targets():
    # two windows of 3 targets; the same 3 orthogonal directions in each, so the batch holds, for
    # every target, an exact copy of it in the other window
    d = 8
    target = torch.eye(d)[:3].repeat(2, 1, 1) * 3.0
    valid = torch.ones(2, 3, dtype=torch.bool)
    groups = torch.tensor([[0, 0, 0], [1, 1, 1]])
    # over the batch a perfect prediction ties with its copy: log 2
    assert float(infonce(target, target, valid, 0.01)) == pytest.approx(math.log(2), rel=1e-4)
    # within its window it is the only match
    keep = same_window(groups)
    assert float(infonce(target, target, valid, 0.01, keep)) < 1e-6
    # the window's mean prediction scores log(window's targets), not log(batch's)
    mean = target.mean(1, keepdim=True).expand_as(target)
    assert float(infonce(mean, target, valid, 0.05, keep)) == pytest.approx(math.log(3), rel=1e-5)
    valid[1, 2] = False  # an invalid slot is neither query nor candidate
    nce = infonce(mean, target, valid, 0.05, keep)
    mean1 = target[1, :2].mean(0)
    want = (3 * math.log(3) + 2 * float(F.cross_entropy(
        (F.normalize(mean1, dim=0) @ F.normalize(target[1, :2], dim=-1).T)[None] / 0.05,
        torch.tensor([0]),
    ))) / 5  # fmt: skip
    assert float(nce) == pytest.approx(want, rel=1e-5)
    # a prediction with no negative (its window's only valid target) is left out of the mean
    valid[1, 1] = False
    assert float(infonce(mean, target, valid, 0.05, keep)) == pytest.approx(math.log(3), rel=1e-5)


@pytest.mark.parametrize("packing", [True, False])
def test_window_negatives_follow_the_windows_of_a_packed_row(tiny_shards, packing):
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, "loss.type=infonce", "loss.negatives=window", f"data.packing={packing}"
    )
    win, sent_valid = batch["tgt_sent_win"], batch["tgt_sent_valid"]
    n_windows = len(batch["doc_index"])
    assert bool((win[sent_valid] >= 0).all()) and bool((win[~sent_valid] == -1).all())
    # every window owns a run of slots, in order, and every window has at least one
    assert sorted(set(win[sent_valid].tolist())) == list(range(n_windows))
    assert bool((win[sent_valid].diff() >= 0).all())
    if packing:
        assert batch["input_ids"].shape[0] < n_windows  # several windows share a row
    preds, targets = torch.randn(*sent_valid.shape, 16), torch.randn(*sent_valid.shape, 16)
    loss, _ = jepa_loss(preds, targets, sent_valid, cfg.loss, keep=same_window(win))
    # by hand: each window's slots alone, the cross-entropies averaged over the slots of the
    # windows that have more than one (a lone hidden sentence has no negative)
    ces, n = [], 0
    for w in range(n_windows):
        m = (win == w) & sent_valid
        if int(m.sum()) < 2:
            continue
        p, t = F.normalize(preds[m], dim=-1), F.normalize(targets[m], dim=-1)
        ces.append(F.cross_entropy(p @ t.T / cfg.loss.temperature, torch.arange(len(p)),
                                   reduction="sum"))  # fmt: skip
        n += len(p)
    assert float(loss) == pytest.approx(float(sum(ces) / n), rel=1e-5)
    with pytest.raises(ValueError, match="candidates"):
        jepa_loss(preds, targets, sent_valid, cfg.loss)
    # the objective hands the windows over itself
    objective = build_objective(cfg, vocab, CPU)
    loss, outputs = objective.loss(objective.module, batch)
    assert torch.isfinite(loss) and float(outputs.parts["pred_loss"]) > 0


@pytest.mark.parametrize("tensor", ["block", "ffn"])
@pytest.mark.parametrize("norm", ["layer", "instance", "none"])
def test_top_k_targets_equal_averaging_the_layers_by_hand(tiny_shards, tensor, norm):
    cfg, _, target, batch, _ = setup_batch(
        tiny_shards, "model.depth=3", f"target.tensor={tensor}", "target.layers=2",
        f"target.norm={norm}", "data.packing=false",
    )  # fmt: skip
    seen = []
    hooks = [
        (block.mlp if tensor == "ffn" else block).register_forward_hook(
            lambda m, i, o: seen.append(o.detach())
        )
        for block in target.stack.blocks
    ]
    with torch.no_grad():
        target(batch["input_ids"], batch["position_ids"], batch["valid"])
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    valid = batch["valid"]

    def by_hand(x):
        if norm == "layer":
            return F.layer_norm(x, (x.shape[-1],))
        if norm == "none":
            return x
        out = torch.empty_like(x)
        for r in range(x.shape[0]):  # each row: per channel over its valid tokens
            v = x[r][valid[r]]
            out[r] = (x[r] - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5)
        return out

    want = (by_hand(seen[1]) + by_hand(seen[2])) / 2
    got = target_features(target, batch, None, cfg.target)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-4)


def test_the_final_tensor_is_the_encoder_output(tiny_shards):
    cfg, _, target, batch, _ = setup_batch(tiny_shards)
    with torch.no_grad():
        out = target(batch["input_ids"], batch["position_ids"], batch["valid"],
                     batch_segments(batch, "full"))  # fmt: skip
    assert torch.equal(target_features(target, batch, None, cfg.target), out)


def test_instance_norm_is_per_channel_over_valid_tokens():
    x = torch.randn(2, 7, 4) * 5 + 3
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    y = normalise(x, "instance", valid)
    for r in range(2):
        v = y[r][valid[r]]
        torch.testing.assert_close(v.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.std(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


@pytest.mark.parametrize("packing", [True, False])
def test_token_level_predicts_every_target_token(tiny_shards, packing):
    cfg, model, target, batch, _ = setup_batch(
        tiny_shards, "target.level=token", f"data.packing={packing}"
    )
    model.eval()
    with torch.no_grad():
        tokens = model(batch)
        sentences = model.predict(batch, *model.context_inputs(batch), batch["ctx_valid"])
    assert tokens.shape[:2] == batch["tgt_index"].shape
    # a sentence prediction is the mean of its tokens' predictions
    from lang_jepa.models import pool_by_slot

    pooled = pool_by_slot(tokens, batch["tgt_sent"], batch["tgt_valid"], sentences.shape[1])
    m = batch["tgt_sent_valid"]
    torch.testing.assert_close(pooled[m], sentences[m], atol=1e-5, rtol=1e-4)
    # the loss is taken at every valid target token against that token's target
    feats = target_features(target, batch, None, cfg.target)
    targets = token_targets(feats, batch)
    loss, _ = jepa_loss(tokens, targets, batch["tgt_valid"], cfg.loss)
    v = batch["tgt_valid"]
    want = F.smooth_l1_loss(tokens[v], targets[v])
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    # the objective's monitors still see sentences: pooled predictions and pooled targets
    objective = build_objective(cfg, target.tok_emb.num_embeddings, CPU)
    objective.module.load_state_dict(model.state_dict())
    objective.target.load_state_dict(target.state_dict())
    out = objective.outputs(tokens, pooled_targets(feats, batch), batch, {})
    assert out.predictions.shape == out.targets.shape == (*m.shape, tokens.shape[-1])


def test_sigreg_on_the_context_reaches_the_encoder(tiny_shards):
    cfg, model, target, batch, _ = setup_batch(
        tiny_shards, "loss.reg=sigreg", "loss.reg_on=context", "loss.reg_weight=1.0",
        "loss.sigreg_slices=256",
    )  # fmt: skip
    model.return_context = True
    preds, ctx = model(batch)
    targets = pooled_targets(target_features(target, batch, None), batch)
    loss, parts = jepa_loss(
        preds, targets, batch["tgt_sent_valid"], cfg.loss, (ctx, batch["ctx_valid"])
    )
    assert float(parts["reg"]) > 0
    assert float(loss) == pytest.approx(float(parts["pred_loss"] + parts["reg"]), rel=1e-5)
    # the term is on the context encoder's token features: its gradient reaches the encoder only
    from lang_jepa.objectives.jepa import sigreg_term

    model.zero_grad()
    sigreg_term(ctx[batch["ctx_valid"]], n_dirs=256).backward()
    assert model.encoder.tok_emb.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.predictor.parameters())
    # SIGReg prefers isotropic Gaussian features to collapsed ones
    torch.manual_seed(0)
    gauss = torch.randn(2000, 64)
    collapsed = gauss[:, :1].expand(-1, 64) + 0.01 * torch.randn(2000, 64)

    assert float(sigreg_term(gauss, n_dirs=256)) < 0.1 * float(sigreg_term(collapsed, n_dirs=256))


@pytest.mark.parametrize("draws", [1, 3])
def test_the_hybrid_corrupts_only_context_tokens(tiny_shards, tok, draws):
    """Each row's own context: under mask.draws every draw of a window corrupts its own."""
    cfg, _, _, batch, vocab = setup_batch(tiny_shards, "objective=jepa+mlm", f"mask.draws={draws}")
    gen = torch.Generator().manual_seed(0)
    out = context_mlm_mask(batch, tok.mask_token_id, vocab, 0.3, gen)
    b, n = batch["input_ids"].shape
    in_ctx = torch.zeros(b, n, dtype=torch.bool)
    for r in range(b):
        in_ctx[r, batch["ctx_index"][r][batch["ctx_valid"][r]]] = True
    changed = out["mlm_input_ids"] != batch["input_ids"]
    assert changed.any() and not (changed & ~in_ctx).any()  # never a target token
    v = out["mlm_valid"]
    rows = torch.arange(b)[:, None].expand_as(out["mlm_index"])
    assert in_ctx[rows[v], out["mlm_index"][v]].all()
    # mlm_ctx_index points at the same token in the context stream
    ctx_pos = batch["ctx_index"].gather(1, out["mlm_ctx_index"])
    assert torch.equal(ctx_pos[v], out["mlm_index"][v])
    assert torch.equal(out["mlm_labels"][v], batch["input_ids"][rows[v], out["mlm_index"][v]])
    assert torch.equal(out["input_ids"], batch["input_ids"])  # the targets read the clean window


@pytest.mark.parametrize("draws", [1, 3])
@pytest.mark.parametrize("source", ["ema", "online"])
def test_the_hybrid_loss_is_the_latent_loss_plus_the_weighted_token_loss(
    tiny_shards, source, draws
):
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, "objective=jepa+mlm", "loss.mlm_weight=0.3", f"target.source={source}",
        "target.view=sentence", f"mask.draws={draws}",
    )  # fmt: skip
    cfg.model.vocab_size = vocab
    torch.manual_seed(0)
    objective = build_objective(cfg, vocab, CPU)
    prepared = objective.prepare(batch, "train", (0, 0, 0))
    loss, out = objective.loss(objective.module, prepared)
    p = out.parts
    assert float(loss) == pytest.approx(float(p["latent_loss"] + 0.3 * p["mlm_loss"]), rel=1e-5)
    assert float(p["mlm_loss"]) == pytest.approx(math.log(vocab), rel=0.05)  # untrained head
    if source == "online":  # the targets: the trainable encoder on the clean window
        feats = objective.module(prepared)[3]
        assert feats.requires_grad
        torch.testing.assert_close(
            feats.detach(), target_features(objective.target, batch, None, cfg.target)
        )
    # the same corruption for the same (seed, split, key): a resumed run draws the same
    again = objective.prepare(batch, "train", (0, 0, 0))
    assert torch.equal(again["mlm_input_ids"], prepared["mlm_input_ids"])
    if draws > 1:  # the latent targets: one forward over one copy of the windows
        calls = []
        encoder = objective.module.encoder if source == "online" else objective.target
        hook = encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
        with torch.no_grad():
            objective.loss(objective.module, prepared)
        hook.remove()
        windows = len(batch["input_ids"]) // draws
        # the EMA encoder reads the windows once; the online one also reads every draw's context
        want = [windows] if source == "ema" else [len(batch["input_ids"]), windows]
        assert sorted(calls) == sorted(want), calls


def test_a_delayed_latent_loss_enters_on_its_step_and_ramps(tiny_shards):
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, "objective=jepa+mlm", "loss.mlm_weight=0.3", "loss.latent_start=10",
        "loss.latent_ramp=4",
    )  # fmt: skip
    cfg.model.vocab_size = vocab
    torch.manual_seed(0)
    objective = build_objective(cfg, vocab, CPU)
    for step, want in [(0, 0.0), (9, 0.0), (10, 0.25), (11, 0.5), (13, 1.0), (500, 1.0)]:
        prepared = objective.prepare(batch, "train", (step, 0, 0))
        loss, out = objective.loss(objective.module, prepared)
        p = out.parts
        assert float(p["latent_weight"]) == want
        assert float(p["latent_loss"]) > 0.0  # computed (and its FLOPs spent) at every step
        assert float(loss) == pytest.approx(
            float(want * p["latent_loss"] + 0.3 * p["mlm_loss"]), rel=1e-5
        )
    # before the start the predictor gets no gradient, the encoder only the token loss's
    objective.module.zero_grad()
    loss, _ = objective.loss(objective.module, objective.prepare(batch, "train", (3, 0, 0)))
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in objective.module.predictor.parameters())
    assert any(p.grad is not None and p.grad.any() for p in objective.module.encoder.parameters())
    # validation scores the whole loss at any step
    val = objective.prepare(batch, "val", (0, 0))
    assert float(objective.loss(objective.module, val)[1].parts["latent_weight"]) == 1.0
    assert latent_weight(14, 10, 4) == 1.0 and latent_weight(0, 0, 0) == 1.0  # the default
    with pytest.raises(ConfigError, match="'loss.latent_start'.*jepa\\+mlm"):
        load_config("tiny", [f"data.shards={tiny_shards}", "loss.latent_start=5"])


def test_the_hybrids_token_loss_over_the_whole_window(tiny_shards):
    """``loss.mlm_on=window``: the control's corruption of the whole window in a second forward,
    the context forward on clean tokens; ``context`` predicts context tokens only."""
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, "objective=jepa+mlm", "loss.mlm_on=window", "loss.mlm_prob=0.3"
    )
    cfg.model.vocab_size = vocab
    torch.manual_seed(0)
    objective = build_objective(cfg, vocab, CPU)
    prepared = objective.prepare(batch, "train", (0, 0, 0))
    v = prepared["mlm_valid"]
    rows = torch.arange(len(v))[:, None].expand_as(v)
    # the labels are window tokens, hidden sentences' among them
    assert torch.equal(
        prepared["mlm_labels"][v], batch["input_ids"][rows[v], prepared["mlm_index"][v]]
    )
    hidden = torch.zeros_like(batch["valid"])
    hidden[rows[v], prepared["mlm_index"][v]] = True
    in_ctx = torch.zeros_like(batch["valid"]).scatter(1, batch["ctx_index"], batch["ctx_valid"])
    assert (hidden & ~in_ctx).any() and (hidden & in_ctx).any()
    # the context forward reads clean tokens, the second forward the corrupted window
    seen = []
    hook = objective.module.encoder.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    loss, out = objective.loss(objective.module, prepared)
    hook.remove()
    ctx_ids, _ = objective.module.context_inputs(prepared, key="input_ids")
    assert len(seen) == 2
    assert torch.equal(seen[0], ctx_ids) and torch.equal(seen[1], prepared["mlm_input_ids"])
    assert not torch.equal(prepared["mlm_input_ids"], batch["input_ids"])
    p = out.parts
    assert float(loss) == pytest.approx(float(p["latent_loss"] + p["mlm_loss"]), rel=1e-5)
    assert float(p["mlm_loss"]) == pytest.approx(math.log(vocab), rel=0.05)  # untrained head
    # FLOPs: the context variant's plus a full-window forward and backward (its head at more
    # positions, so more than that); the same draw for the same key
    ctx_cfg, *_ = setup_batch(tiny_shards, "objective=jepa+mlm", "loss.mlm_prob=0.3")
    ctx_cfg.model.vocab_size = vocab
    ctx_obj = build_objective(ctx_cfg, vocab, CPU)
    ctx_prepared = ctx_obj.prepare(batch, "train", (0, 0, 0))
    full = stream_flops(objective.module.encoder, prepared, "full", batch["valid"].sum(1).float())
    assert float(objective.flops(prepared)[0]) > float(ctx_obj.flops(ctx_prepared)[0] + 3 * full)
    again = objective.prepare(batch, "train", (0, 0, 0))
    assert torch.equal(again["mlm_input_ids"], prepared["mlm_input_ids"])
    base = [f"data.shards={tiny_shards}"]
    for bad in (["loss.mlm_on=tokens"], ["loss.mlm_on=window"],
                ["objective=jepa+mlm", "loss.mlm_on=window", "mask.draws=2"]):  # fmt: skip
        with pytest.raises(ConfigError, match="'loss.mlm_on'"):
            load_config("tiny", [*base, *bad])


@pytest.mark.parametrize("recompute", [False, True])
def test_the_latent_loss_can_be_kept_out_of_the_lower_blocks(tiny_shards, recompute):
    """``loss.latent_grad_from=k`` (with ``mlm_on=window``): the latent loss's gradient reaches
    blocks k.. and the predictor only, the token loss every block; the values are unchanged
    (with activation checkpointing too)."""
    base = ("objective=jepa+mlm", "loss.mlm_on=window",
            f"model.activation_checkpointing={str(recompute).lower()}")  # fmt: skip

    def step(*extra: str) -> tuple[float, nn.Module]:
        cfg, _, _, batch, vocab = setup_batch(tiny_shards, *base, *extra)
        cfg.model.vocab_size = vocab
        torch.manual_seed(0)
        objective = build_objective(cfg, vocab, CPU)
        loss, _ = objective.loss(objective.module, objective.prepare(batch, "train", (0, 0, 0)))
        loss.backward()
        return float(loss), objective.module

    def learns(module: nn.Module) -> bool:
        return any(p.grad is not None and bool(p.grad.any()) for p in module.parameters())

    latent, module = step("loss.latent_grad_from=1", "loss.mlm_weight=0")
    enc = module.encoder
    assert enc.depth >= 2
    assert not learns(enc.tok_emb) and not learns(enc.stack.blocks[0])
    assert all(learns(b) for b in enc.stack.blocks[1:]) and learns(module.predictor)
    everywhere, module = step("loss.mlm_weight=0")
    assert latent == everywhere and learns(module.encoder.tok_emb)  # only the gradient differs
    _, module = step("loss.latent_grad_from=1")  # with the token loss, every block learns
    assert learns(module.encoder.tok_emb) and learns(module.encoder.stack.blocks[0])
    shards = f"data.shards={tiny_shards}"
    for bad in (["objective=jepa+mlm", "loss.latent_grad_from=1"],
                [*base, "loss.latent_grad_from=1", "target.source=online"],
                [*base, "loss.latent_grad_from=99"]):  # fmt: skip
        with pytest.raises(ConfigError, match="'loss.latent_grad_from'"):
            load_config("tiny", [shards, *bad])


def test_the_alarm_sees_a_prediction_that_regressed_to_the_mean():
    alarm = CollapseAlarm(min_rank=2.0, min_std=0.05, patience=2, min_pred_std=0.01)
    assert not alarm.check(50.0, 0.8, 0.2)
    assert not alarm.check(50.0, 0.8, 0.005)  # healthy targets, a mean prediction: one strike
    assert alarm.check(50.0, 0.8, 0.004) and "prediction std" in alarm.why
    # in-batch retrieval: perfect predictions find their own target, the mean finds ~one
    t = torch.randn(1, 40, 16)
    valid = torch.ones(1, 40, dtype=torch.bool)
    perfect = representation_stats(t, t, valid)
    assert float(perfect["pred_top1"]) == 1.0
    assert float(perfect["pred_top1_chance"]) == pytest.approx(1 / 40)
    mean = representation_stats(t.mean(1, keepdim=True).expand_as(t) + 1e-4 * t, t, valid)
    assert float(mean["pred_top1"]) <= 0.1 and float(mean["pred_std"]) < 0.01


def test_joined_reg_sets_add_one_term_each(tiny_shards):
    cfg, model, target, batch, _ = setup_batch(
        tiny_shards, "loss.reg=sigreg", "loss.reg_on=predictions+context", "loss.reg_weight=0.5",
        "loss.sigreg_slices=128",
    )  # fmt: skip
    model.return_context = True
    with torch.no_grad():
        preds, ctx = model(batch)
        targets = pooled_targets(target_features(target, batch, None), batch)
    valid, context = batch["tgt_sent_valid"], (ctx, batch["ctx_valid"])
    torch.manual_seed(3)
    loss, parts = jepa_loss(preds, targets, valid, cfg.loss, context)
    terms = []
    torch.manual_seed(3)  # the same random directions, drawn in the same order
    for on in ("predictions", "context"):
        one = dataclasses.replace(cfg.loss, reg_on=on)
        terms.append(jepa_loss(preds, targets, valid, one, context)[1]["reg"])
    assert float(terms[0]) > 0 and float(terms[1]) > 0
    assert float(parts["reg"]) == pytest.approx(float(terms[0] + terms[1]), rel=1e-5)
    assert float(loss) == pytest.approx(float(parts["pred_loss"] + 0.5 * parts["reg"]), rel=1e-5)


def test_lever_settings_are_checked(tiny_shards):
    base = [f"data.shards={tiny_shards}"]
    for bad, key in [("target.tensor=middle", "target.tensor"), ("target.layers=9", "target.layers"),
                     ("target.norm=batch", "target.norm"), ("target.level=word", "target.level"),
                     ("loss.type=hinge", "loss.type"), ("loss.temperature=0", "loss.temperature"),
                     ("loss.reg_on=tokens", "loss.reg_on"), ("objective=jepa+vae", "objective"),
                     ("loss.reg_on=context+context", "loss.reg_on"),
                     ("target.view=page", "target.view"), ("target.source=teacher", "target.source"),
                     ("loss.negatives=doc", "loss.negatives"),
                     ("loss.negatives=window", "loss.negatives")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config("tiny", [*base, bad])
    # SIGReg on EMA targets would regularise nothing (they carry no gradient)
    with pytest.raises(ConfigError, match="'loss.reg_on'.*no gradient"):
        load_config(
            "tiny", [*base, "loss.reg=sigreg", "loss.reg_weight=0.02", "loss.reg_on=targets"]
        )
    with pytest.raises(ConfigError, match="'loss.reg_on'.*no gradient"):
        load_config("tiny", [*base, "loss.reg=sigreg", "loss.reg_weight=0.02",
                             "loss.reg_on=context+targets"])  # fmt: skip
    with pytest.raises(ConfigError, match="'loss.reg_on'.*no gradient"):
        load_config(
            "tiny", [*base, "loss.reg=sigreg", "loss.reg_weight=0.02", "loss.reg_on=pooled"]
        )
    with pytest.raises(ConfigError, match="target.tensor=final is one tensor"):
        load_config("tiny", [*base, "target.layers=2"])


@pytest.mark.parametrize("packing", [True, False])
def test_the_sentence_view_reads_each_sentence_alone(tiny_shards, packing):
    cfg, _, target, batch, _ = setup_batch(
        tiny_shards, "target.view=sentence", f"data.packing={packing}"
    )
    feats = target_features(target, batch, None, cfg.target)
    window = target_features(target, batch, None, None)
    cu = batch["cu_sent"].long()
    length = batch["input_ids"].shape[1]
    a, b = int(cu[1]), int(cu[2])  # the first window's second sentence (row 0)
    assert b <= length and b - a > 1
    ids, pos = batch["input_ids"][:1, a:b], batch["position_ids"][:1, a:b]
    with torch.no_grad():  # the sentence encoded on its own, at its positions in the window
        alone = target(ids, pos, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(feats[0, a:b], alone[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(window[0, a:b], alone[0], atol=1e-3)  # the window view sees more
    # a change in another sentence leaves this one's features unchanged (window view: it moves)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, b] = (changed["input_ids"][0, b] + 1) % target.tok_emb.num_embeddings
    torch.testing.assert_close(target_features(target, changed, None, cfg.target)[0, a:b],
                               feats[0, a:b], atol=1e-6, rtol=0)  # fmt: skip
    assert not torch.allclose(target_features(target, changed, None, None)[0, a:b], window[0, a:b])
    # every valid token lies in exactly one sentence segment of its own window
    assert int(cu[-1]) == batch["input_ids"].numel()
    del batch["cu_sent"]
    with pytest.raises(KeyError, match="cu_sent"):
        target_features(target, batch, None, cfg.target)


def test_online_targets_carry_the_gradient_and_sigreg_acts_on_them(tiny_shards):
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, "target.source=online", "target.view=sentence", "loss.type=l2",
        "loss.reg=sigreg", "loss.reg_on=targets", "loss.reg_weight=1.0", "loss.sigreg_slices=256",
        "optim.ema_start=0.0", "optim.ema_end=0.0",
    )  # fmt: skip
    objective = build_objective(cfg, vocab, CPU)
    model = objective.module
    preds, ctx, feats = model(batch)  # the trainable encoder over the window, in the forward
    assert ctx is None and feats.requires_grad
    # at the start the EMA copy is the online encoder: the same targets, without gradient
    ema = target_features(objective.target, batch, None, cfg.target)
    torch.testing.assert_close(feats.detach(), ema, atol=1e-6, rtol=0)
    torch.manual_seed(1)
    loss, outputs = objective.loss(model, batch)  # the module stands in for the engine's call
    sentences = pooled_targets(feats, batch)
    valid = batch["tgt_sent_valid"]
    from lang_jepa.objectives.jepa import sigreg_term

    torch.manual_seed(1)
    want_reg = sigreg_term(sentences[valid], n_dirs=256)
    assert float(outputs.parts["reg"]) == pytest.approx(float(want_reg), rel=1e-5)
    want = (preds - sentences).pow(2).mean(-1)[valid].mean() + want_reg
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert not outputs.targets.requires_grad  # the monitors get detached targets
    # SIGReg on the targets reaches the encoder and nothing else
    model.zero_grad()
    sigreg_term(sentences[valid], n_dirs=256).backward()
    assert model.encoder.tok_emb.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.predictor.parameters())


@pytest.mark.parametrize("draws", [1, 3])
def test_sigreg_on_the_pooled_features_reads_them_before_the_layer_norm(tiny_shards, draws):
    """loss.reg_on=pooled: SIGReg on the hidden sentences' mean-pooled features as they come
    out of the (online) encoder, before the layer norm the targets get, each sentence once under
    mask.draws; a low-rank set passes for Gaussian far more easily behind the layer norm."""
    from lang_jepa.objectives.jepa import first_copies, sigreg_term

    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, f"mask.draws={draws}", "target.source=online", "loss.type=infonce",
        "loss.reg=sigreg", "loss.reg_on=pooled", "loss.reg_weight=0.5", "loss.sigreg_slices=128",
        "optim.ema_start=0.0", "optim.ema_end=0.0",
    )  # fmt: skip
    objective = build_objective(cfg, vocab, CPU)
    model = objective.module
    torch.manual_seed(5)
    loss, outputs = objective.loss(model, batch)
    preds, _, feats = model(batch)
    # the pooled features by hand: the mean of each hidden sentence's token features
    rows = torch.arange(len(batch["input_ids"])) // draws
    tokens = feats[rows[:, None], batch["tgt_index"]]
    pooled = torch.zeros(*batch["tgt_sent_valid"].shape, feats.shape[-1])
    count = torch.zeros(batch["tgt_sent_valid"].shape)
    for b, n in zip(*torch.nonzero(batch["tgt_valid"], as_tuple=True), strict=True):
        pooled[b, batch["tgt_sent"][b, n]] += tokens[b, n]
        count[b, batch["tgt_sent"][b, n]] += 1
    pooled = pooled / count.clamp(min=1)[..., None]
    torch.testing.assert_close(pooled_features(feats, batch), pooled, atol=1e-5, rtol=1e-5)
    read = batch["tgt_sent_valid"]
    if draws > 1:
        read = read & first_copies(batch, "sentence")
        assert int(read.sum()) < int(batch["tgt_sent_valid"].sum())
    torch.manual_seed(5)  # the regulariser's directions, as in the loss
    want = sigreg_term(pooled[read], n_dirs=128)
    assert float(outputs.parts["reg"]) == pytest.approx(float(want), rel=1e-4)
    # not the layer-normed targets' statistic
    torch.manual_seed(5)
    normed = sigreg_term(pooled_targets(feats, batch)[read], n_dirs=128)
    assert abs(float(normed) - float(want)) > 1e-3
    assert float(loss) == pytest.approx(float(outputs.parts["pred_loss"]) + 0.5 * float(want),
                                        rel=1e-4)  # fmt: skip
    # why: 32 sentences (about a mini micro-batch's) of rank 10 in 128 dimensions score about
    # nine times a Gaussian sample's statistic as they are, and about twice once layer-normed
    # (norm sqrt(128) each: every random projection then has about unit variance)
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(128, 10)).Q
    low = torch.randn(32, 10) @ basis.T
    stats = [float(sigreg_term(z, torch.Generator().manual_seed(1), n_dirs=256)) for z in (
        low, F.layer_norm(low, (128,)), torch.randn(32, 128)
    )]  # fmt: skip
    raw_stat, normed_stat, gauss_stat = stats
    assert raw_stat > 3 * normed_stat and raw_stat > 5 * gauss_stat, stats
    assert normed_stat < 2.5 * gauss_stat, stats


def test_flops_count_the_online_target_backward_and_the_sentence_attention(tiny_shards):
    from lang_jepa.metrics import stream_flops
    from lang_jepa.objectives.jepa import step_flops

    cfg, model, _, batch, _ = setup_batch(tiny_shards)
    n_win = batch["valid"].sum(1).float()
    window = stream_flops(model.encoder, batch, "full", n_win)
    sentences = stream_flops(model.encoder, batch, "sent", n_win)
    assert float(sentences) < float(window)  # the same matmuls, attention within sentences
    ema, _ = step_flops(model, batch, recompute=False)
    model.online = True  # the target forward is trained: 3x instead of 1x
    online, _ = step_flops(model, batch, recompute=False)
    assert float(online - ema) == pytest.approx(2 * float(window), rel=1e-6)
    model.online, model.target_cfg = False, dataclasses.replace(cfg.target, view="sentence")
    sentence_view, _ = step_flops(model, batch, recompute=False)
    assert float(ema - sentence_view) == pytest.approx(float(window - sentences), rel=1e-6)


def test_the_projector_puts_targets_and_predictions_in_its_space(tiny_shards):
    """target.projector: the loss, InfoNCE and SIGReg act on the projected targets; the gradient
    reaches the projector and the encoder; the encoder (the export) holds no projector weight."""
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, "target.source=online", "target.projector=48", "loss.type=infonce",
        "loss.reg=sigreg", "loss.reg_on=targets", "loss.reg_weight=0.5", "loss.sigreg_slices=64",
        "optim.ema_start=0.0", "optim.ema_end=0.0",
    )  # fmt: skip
    objective = build_objective(cfg, vocab, CPU)
    model = objective.module
    proj = model.projector
    assert [type(m).__name__ for m in proj] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert proj[0].out_features == 48 and proj[-1].out_features == cfg.model.dim
    torch.manual_seed(2)
    loss, outputs = objective.loss(model, batch)
    preds, _, feats = model(batch)
    z = proj(pooled_targets(feats, batch))  # by hand: LN(mean-pooled targets), then projected
    valid = batch["tgt_sent_valid"]
    from lang_jepa.objectives.jepa import sigreg_term

    torch.manual_seed(2)
    want_reg = sigreg_term(z[valid], n_dirs=64)
    want = infonce(preds, z, valid, cfg.loss.temperature) + 0.5 * want_reg
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(outputs.targets, z.detach())  # the monitors see the loss's space
    assert not torch.allclose(z, pooled_targets(feats, batch), atol=1e-2)
    model.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert model.encoder.tok_emb.weight.grad.abs().sum() > 0
    assert not any("projector" in k for k in model.encoder.state_dict())
    # without a projector, project() is the identity
    plain = build_objective(load_config("tiny", [f"data.shards={tiny_shards}"]), vocab, CPU)
    assert plain.module.projector is None and plain.module.project(z) is z


def test_the_projector_needs_online_targets(tiny_shards):
    base = [f"data.shards={tiny_shards}"]
    with pytest.raises(ConfigError, match="'target.projector'.*target.source=online"):
        load_config("tiny", [*base, "target.projector=64"])
    with pytest.raises(ConfigError, match="'target.projector'"):
        load_config("tiny", [*base, "target.source=online", "target.projector=-1"])
    cfg = load_config("tiny", [*base, "target.source=online", "target.projector=64"])
    assert cfg.target.projector == 64


def test_queries_hide_the_length_of_a_hidden_sentence(tiny_shards):
    """mask.queries: the predictor's output for a window does not change when a hidden sentence
    is made longer (its context, positions and queries stay the same); with one mask token per
    target token (queries 0) it does. Packed rows predict what one window per row predicts."""
    from lang_jepa.data.masking import collate_rows, mask_indices
    from lang_jepa.data.reader import document_windows, split_shards
    from lang_jepa.data.windows import Window, WindowCounters

    cfg, model, _, _, _ = setup_batch(tiny_shards, "mask.queries=3", "data.packing=false")
    model.eval()
    shards = split_shards(tiny_shards, "train")
    w = next(w for w in document_windows(shards, 96, 4, WindowCounters()) if len(w.offsets) > 4)
    off = np.asarray(w.offsets)
    longer_tokens = np.concatenate(
        [w.tokens[: off[2]], w.tokens[off[1] : off[2]], w.tokens[off[2] :]]
    )
    longer = Window(w.doc_key, w.doc_index, w.index, longer_tokens,
                    np.concatenate([off[:2], off[2:] + (off[2] - off[1])]))  # fmt: skip
    preds = {}
    for k in (3, 0):
        for name, win in (("same", w), ("longer", longer)):
            batch = collate_rows([[(win, mask_indices(win.offsets, [[1]]))]], 128, False, queries=k)
            with torch.no_grad():
                preds[k, name] = model(batch)[0, 0]
    torch.testing.assert_close(preds[3, "same"], preds[3, "longer"], atol=0, rtol=0)
    assert not torch.allclose(preds[0, "same"], preds[0, "longer"], atol=1e-4)
    # packed: two windows in one row, each predicted as on its own
    masks = [mask_indices(x.offsets, [[1]]) for x in (w, longer)]
    rows = collate_rows([[(w, masks[0])], [(longer, masks[1])]], 128, False, queries=3)
    packed = collate_rows([list(zip((w, longer), masks, strict=True))], 256, True, queries=3)
    with torch.no_grad():
        got_rows, got_packed = model(rows), model(packed)
    torch.testing.assert_close(
        got_packed[packed["tgt_sent_valid"]], got_rows[rows["tgt_sent_valid"]], atol=1e-5, rtol=1e-4
    )


def test_query_settings_are_checked(tiny_shards):
    base = [f"data.shards={tiny_shards}"]
    with pytest.raises(ConfigError, match="'mask.queries'.*rope"):
        load_config("tiny", [*base, "mask.queries=2", "model.pos=learned"])
    with pytest.raises(ConfigError, match="'mask.queries'.*target.level=sentence"):
        load_config("tiny", [*base, "mask.queries=2", "target.level=token"])
    with pytest.raises(ConfigError, match="'mask.queries'"):
        load_config("tiny", [*base, "mask.queries=-1"])


@pytest.mark.parametrize("packing", [True, False])
def test_draws_cost_one_target_forward(tiny_shards, packing):
    """mask.draws=3: each window laid out three times with three masks (the first the one-draw
    mask), the target encoder run once over one copy, its features the one-draw batch's."""
    from lang_jepa.data.loader import build_train_loader
    from lang_jepa.metrics import Accumulators
    from lang_jepa.objectives.base import window_rows

    cfg, _, target, batch, _ = setup_batch(tiny_shards, "mask.draws=3", f"data.packing={packing}")
    one = next(iter(build_train_loader(
        load_config("tiny", [f"data.shards={tiny_shards}", f"data.packing={packing}"]), 0, 1
    )))  # fmt: skip
    assert batch["draws"] == 3 and "draws" not in one
    assert len(batch["input_ids"]) == 3 * len(one["input_ids"])
    for key in ("input_ids", "position_ids", "valid"):
        for d in range(3):  # every copy holds the same windows
            torch.testing.assert_close(batch[key][d::3], one[key], rtol=0, atol=0)
    # the first draw is the one-draw mask; the others differ
    n = one["ctx_index"].shape[1]
    assert torch.equal(batch["ctx_index"][::3, :n], one["ctx_index"])
    assert (
        not torch.equal(batch["ctx_valid"][1::3], batch["ctx_valid"][::3])
        or not torch.equal(batch["tgt_sent_valid"][1::3], batch["tgt_sent_valid"][::3])
        or not torch.equal(batch["ctx_index"][1::3], batch["ctx_index"][::3])
    )
    # what the target encoder reads is the one-draw batch's window stream, segments included
    once = window_rows(batch)
    for key in ("input_ids", "position_ids", "valid", "cu_sent", "max_sent", *(
        ("cu_full", "max_full") if packing else ()
    )):  # fmt: skip
        assert torch.equal(torch.as_tensor(once[key]), torch.as_tensor(one[key])), key
    calls = []
    hook = target.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    for view in ("window", "sentence"):
        cfg.target.view = view
        calls.clear()
        feats = target_features(target, batch, None, cfg.target)
        assert calls == [len(one["input_ids"])]  # one forward over one copy of the windows
        want = target_features(target, one, None, cfg.target)
        torch.testing.assert_close(feats, want, rtol=0, atol=0)  # one row a window, not repeated
        with pytest.raises(ValueError, match="feature rows x 3 draws"):
            pooled_targets(feats.repeat_interleave(3, 0), batch)  # already repeated: refused
        # each draw's targets read its own window's row: as if the features were repeated
        rep = {**batch, "draws": 1}
        for fn in (pooled_targets, token_targets):
            torch.testing.assert_close(
                fn(feats, batch), fn(feats.repeat_interleave(3, 0), rep), rtol=0, atol=0
            )
    hook.remove()
    # the training counters see each window once
    counts = []
    for b in (batch, one):
        acc = Accumulators.zeros(torch.device("cpu"))
        acc.add(torch.tensor(1.0), b, torch.tensor(0.0))
        counts.append((int(acc.tokens), acc.samples, acc.slots))
    assert counts[0] == counts[1]


def test_draws_keep_a_targets_copies_out_of_its_negatives(tiny_shards):
    cfg, _, target, batch, _ = setup_batch(
        tiny_shards, "mask.draws=4", "loss.type=infonce", "data.packing=false"
    )
    feats = target_features(target, batch, None, cfg.target)

    def copies(x: Tensor, valid: Tensor) -> Tensor:  # [N, N]: two valid slots, equal targets
        flat, v = x.flatten(0, 1), valid.flatten()
        equal = (flat[:, None, :] == flat[None, :, :]).all(-1) & v[:, None] & v[None, :]
        return equal & ~torch.eye(len(v), dtype=torch.bool)

    for level, targets, valid in (
        ("sentence", pooled_targets(feats, batch), batch["tgt_sent_valid"]),
        ("token", token_targets(feats, batch), batch["tgt_valid"]),
    ):
        keep = candidates(batch, cfg.loss, level)
        same = copies(targets, valid)
        assert bool(same.any())  # some sentence is hidden by two draws of its window
        v = valid.flatten()
        # exactly the copies are taken out: not the right target, not another one
        assert torch.equal(~keep & v[:, None] & v[None, :], same), level
        if level == "sentence":  # a perfect prediction: with the copies kept out, no tie
            assert float(infonce(targets, targets, valid, 0.01)) > 0.1
            assert float(infonce(targets, targets, valid, 0.01, keep)) < 1e-4


def test_draw_settings_are_checked(tiny_shards):
    base = [f"data.shards={tiny_shards}"]
    with pytest.raises(ConfigError, match="'mask.draws'"):
        load_config("tiny", [*base, "mask.draws=0"])
    with pytest.raises(ConfigError, match="'mask.draws'.*latent objective"):
        load_config("tiny", [*base, "mask.draws=2", "objective=mlm"])


def test_draws_count_each_hidden_sentence_once_outside_the_loss(tiny_shards):
    """Under mask.draws the regulariser on the targets, the monitors and the FLOPs see each
    hidden sentence and each window once; the validation batches keep one draw."""
    from lang_jepa.data.loader import build_val_loader
    from lang_jepa.metrics import stream_flops
    from lang_jepa.objectives.jepa import first_copies, step_flops, target_keys

    cfg, model, target, batch, vocab = setup_batch(
        tiny_shards, "mask.draws=3", "target.source=online", "loss.type=infonce",
        "loss.reg=sigreg", "loss.reg_on=targets", "loss.reg_weight=0.02", "optim.ema_start=0.0",
        "optim.ema_end=0.0",
    )  # fmt: skip
    valid = batch["tgt_sent_valid"]
    once = first_copies(batch, "sentence")
    keys = target_keys(batch, "sentence")
    # one slot per distinct hidden sentence, and every one of them
    assert sorted(keys[valid & once].tolist()) == sorted(set(keys[valid].tolist()))
    assert int((valid & once).sum()) < int(valid.sum())  # some sentence was hidden twice
    objective = build_objective(cfg, vocab, CPU)
    torch.manual_seed(3)
    loss, outputs = objective.loss(objective.module, batch)
    assert torch.equal(outputs.valid, valid & once)  # the monitors' slots
    from lang_jepa.objectives.jepa import sigreg_term

    feats = objective.module(batch)[2]
    sentences = pooled_targets(feats, batch)
    torch.manual_seed(3)  # the regulariser's directions, as in the loss
    want = sigreg_term(sentences[valid & once], n_dirs=cfg.loss.sigreg_slices)
    assert float(outputs.parts["reg"]) == pytest.approx(float(want), rel=1e-4)
    # the FLOPs: the online target forward and backward of one copy of each window
    one_cfg, one_model, _, one, _ = setup_batch(tiny_shards, "target.source=online")
    enc, pred = model.encoder, model.predictor
    n_ctx = batch["ctx_valid"].sum(1).float()
    n_tgt = batch["tgt_valid"].sum(1).float()
    trainable = (stream_flops(enc, batch, "ctx", n_ctx)
                 + stream_flops(pred, batch, "pred", n_ctx + n_tgt)
                 + 2.0 * enc.dim * pred.dim * (n_ctx.sum() + valid.sum()))  # fmt: skip
    window = stream_flops(enc, one, "full", one["valid"].sum(1).float())
    model_flops, _ = step_flops(objective.module, batch, recompute=False)
    assert float(model_flops) == pytest.approx(float(3.0 * (trainable + window)), rel=1e-6)
    # validation: one draw, one row per window
    val = next(iter(build_val_loader(cfg, 0, 1)))
    assert "draws" not in val and len(val["input_ids"]) <= cfg.data.micro_batch_size


def test_queued_negatives_are_candidates_for_every_prediction():
    n, d = 6, 32
    target = (torch.eye(d)[:n] * 3.0).reshape(2, 3, d)
    valid = torch.ones(2, 3, dtype=torch.bool)
    queue = torch.eye(d)[n : n + 10] * 3.0  # ten other directions
    # a perfect predictor still scores ~0: the queue's targets are orthogonal to every prediction
    assert float(infonce(target.clone(), target, valid, 0.05, extra=queue)) < 1e-6
    # the mean prediction scores log(batch + queue): every queued target is one more candidate
    mean = (target.flatten(0, 1).sum(0) + queue.sum(0)) / (n + 10)
    mean = mean.expand_as(target)
    assert float(infonce(mean, target, valid, 0.05, extra=queue)) == pytest.approx(
        math.log(n + 10), rel=1e-5
    )
    # one valid slot and no other target in the batch: the queue alone gives it its negatives
    alone = torch.zeros_like(valid)
    alone[0, 0] = True
    assert float(infonce(target, target, alone, 0.05)) == 0.0  # no negative: scores nothing
    assert float(infonce(mean, target, alone, 0.05, extra=queue)) == pytest.approx(
        math.log(11), rel=1e-5
    )


def test_the_queue_keeps_the_newest_targets_and_its_state_round_trips():
    from lang_jepa.objectives.jepa import TargetQueue

    q = TargetQueue(4, 3, torch.device("cpu"))
    assert q.negatives() is None
    q.push(torch.tensor([[2.0, 0, 0], [0, 3.0, 0]]))  # unit-normalised on the way in
    torch.testing.assert_close(q.negatives(), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    q.push(torch.tensor([[0, 0, 1.0], [1.0, 1.0, 0], [0, 1.0, 1.0]]))  # wraps: the oldest goes
    s = 2**-0.5
    want = torch.tensor([[0, s, s], [0, 1.0, 0], [0, 0, 1.0], [s, s, 0]])
    torch.testing.assert_close(q.negatives(), want)
    q.push(torch.arange(18.0).view(6, 3) + 1)  # more than the queue: its last four rows,
    newest = F.normalize(torch.arange(6.0, 18.0).view(4, 3) + 1)  # written from slot 1 on
    torch.testing.assert_close(q.negatives(), newest.roll(1, 0))
    other = TargetQueue(4, 3, torch.device("cpu"))
    other.load_state_dict(q.state_dict())
    torch.testing.assert_close(other.negatives(), q.negatives())
    assert (other.head, other.filled) == (q.head, q.filled)
    with pytest.raises(ValueError, match="loss.queue"):
        TargetQueue(8, 3, torch.device("cpu")).load_state_dict(q.state_dict())
    # a non-finite target never enters: it would spoil every later step's InfoNCE
    before = q.negatives().clone()
    q.push(torch.tensor([[float("nan"), 1.0, 0], [0, float("inf"), 0]]))
    torch.testing.assert_close(q.negatives(), before)
    q.push(torch.tensor([[float("nan"), 1.0, 0], [0, 0, 2.0]]))  # the finite row does
    assert (q.negatives() == torch.tensor([0, 0, 1.0])).all(1).any()


@pytest.mark.parametrize("objective_name", ["jepa", "jepa+mlm"])
def test_training_micro_batches_fill_the_queue_and_validation_reads_it(tiny_shards, objective_name):
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, f"objective={objective_name}", "target.source=online", "loss.type=infonce",
        "loss.queue=64", "optim.ema_start=0.0", "optim.ema_end=0.0",
    )  # fmt: skip
    cfg.model.vocab_size = vocab
    objective = build_objective(cfg, vocab, CPU)
    prepared = objective.prepare(batch, "train", (0, 0, 0))
    model = objective.module
    n_valid = int(batch["tgt_sent_valid"].sum())
    # an empty queue: the micro-batch's candidates only
    first = objective.loss(model, prepared)[0].detach()
    assert objective.queue.filled == min(64, n_valid)
    queued = objective.queue.negatives().clone()
    # the same micro-batch again, now against its own targets in the queue as well
    model.eval()  # validation: reads the queue, adds nothing to it
    with torch.no_grad():
        again, _ = objective.loss(model, prepared)
    assert objective.queue.filled == min(64, n_valid)
    torch.testing.assert_close(objective.queue.negatives(), queued)
    assert float(again) > float(first)  # more candidates (each target's own copy among them)
    # the queue travels in the objective's per-rank state
    state = objective.state_dict()
    fresh = build_objective(cfg, vocab, CPU)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.queue.negatives(), queued)


def test_queue_settings_are_checked(tiny_shards):
    base = [f"data.shards={tiny_shards}"]
    with pytest.raises(ConfigError, match="'loss.queue'.*InfoNCE"):
        load_config("tiny", [*base, "loss.queue=128"])
    with pytest.raises(ConfigError, match="'loss.queue'"):
        load_config("tiny", [*base, "loss.queue=-1"])
    with pytest.raises(ConfigError, match="'loss.queue'.*window"):
        load_config("tiny", [*base, "loss.type=infonce", "loss.negatives=window", "loss.queue=8"])
    with pytest.raises(ConfigError, match="'loss.queue'.*latent objective"):
        load_config("tiny", [*base, "objective=mlm", "loss.infonce_weight=1", "loss.queue=8"])
    assert load_config("tiny", [*base, "loss.type=infonce", "loss.queue=8"]).loss.queue == 8


def test_span_targets_pool_each_hidden_span(tiny_shards):
    cfg, _, _, batch, vocab = setup_batch(
        tiny_shards, "mask.unit=span", "mask.span_min=2", "mask.span_max=5",
        "target.source=online", "loss.type=infonce", "optim.ema_start=0.0", "optim.ema_end=0.0",
    )  # fmt: skip
    objective = build_objective(cfg, vocab, CPU)
    model = objective.module
    _, _, feats = model(batch)
    targets = pooled_targets(feats, batch)
    row = 0
    tgt, slot = batch["tgt_index"][row], batch["tgt_sent"][row]
    tgt, slot = tgt[batch["tgt_valid"][row]], slot[batch["tgt_valid"][row]]
    n_slots = int(batch["tgt_sent_valid"][row].sum())
    assert n_slots > 1 and len(tgt) <= 0.2 * int(batch["valid"][row].sum()) + 1
    lengths = []
    for s in range(n_slots):  # each slot: a run of 2..5 adjacent tokens, mean-pooled
        run = tgt[slot == s]
        lengths.append(len(run))
        assert 1 <= len(run) <= 5 and (run.diff() == 1).all()
        want = F.layer_norm(feats[row, run].mean(0), (feats.shape[-1],))
        torch.testing.assert_close(targets[row, s], want, atol=1e-5, rtol=1e-5)
    # span_min, but for each window's last span, cut to its share (a packed row holds several)
    windows = batch["tgt_sent_win"][row][batch["tgt_sent_valid"][row]].unique()
    assert sum(n < 2 for n in lengths) <= len(windows)
    loss, outputs = objective.loss(model, batch)
    assert torch.isfinite(loss) and outputs.valid.sum() == batch["tgt_sent_valid"].sum()


def test_span_settings_are_checked(tiny_shards):
    base = [f"data.shards={tiny_shards}"]
    for bad, key in [("mask.unit=word", "mask.unit"), ("mask.span_min=0", "mask.span_max"),
                     ("mask.span_max=2", "mask.span_max"), ("mask.span_frac=0.9", "mask.span_frac"),
                     ("mask.span_frac=0", "mask.span_frac")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config("tiny", [*base, "mask.unit=span", bad])
    with pytest.raises(ConfigError, match="'mask.unit'.*queries"):
        load_config("tiny", [*base, "mask.unit=span", "mask.queries=4", "model.pos=rope"])
    with pytest.raises(ConfigError, match="'mask.unit'.*latent objective"):
        load_config("tiny", [*base, "mask.unit=span", "objective=mlm"])
    with pytest.raises(ConfigError, match="'mask.unit'.*draws=1"):
        load_config("tiny", [*base, "mask.unit=span", "mask.draws=2"])
    # under sentence masks the span keys are not read, so not checked either
    cfg = load_config("tiny", [*base, "mask.min_context_frac=0.85", "mask.span_max=1"])
    assert cfg.mask.unit == "sentence"
