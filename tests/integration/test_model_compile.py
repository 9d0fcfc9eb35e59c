"""torch.compile of the model's blocks on CPU (inductor runs the C++ compiler, in processes)."""

from __future__ import annotations

import pytest
import torch

from lang_jepa.config import load_config
from lang_jepa.data import build_train_loader
from lang_jepa.models.layers import compile_blocks
from lang_jepa.objectives import compute_targets, jepa_loss
from tests.helpers import setup_batch

pytestmark = pytest.mark.processes


def test_compiled_blocks_match_eager(tiny_shards):
    """model.compile=true (torch.compile of every block, dynamic shapes) on CPU: same loss and
    gradients as the eager model, for a packed batch and a one-window-per-row batch."""
    import copy

    cfg, model, target, packed, _ = setup_batch(tiny_shards)
    rows = next(
        iter(
            build_train_loader(
                load_config("tiny", [f"data.shards={tiny_shards}", "data.packing=false"]), 0, 1
            )
        )
    )
    compiled = copy.deepcopy(model)
    for stack in (compiled.encoder.stack, compiled.predictor.stack):
        compile_blocks(stack)
    for batch in (packed, rows):
        targets = compute_targets(target, batch, None)
        losses = []
        for m in (model, compiled):
            m.zero_grad()
            loss, _ = jepa_loss(m(batch), targets, batch["tgt_sent_valid"], cfg.loss)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(model.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
