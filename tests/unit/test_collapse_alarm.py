"""The collapse alarm's unit behaviour; a real run that trips it is in
tests/integration/test_collapse.py."""

from __future__ import annotations

import torch

from lang_jepa.metrics import CollapseAlarm


def test_alarm_needs_patience_and_resets():
    alarm = CollapseAlarm(min_rank=2.0, min_std=0.05, patience=3)
    assert not alarm.check(1.5, 0.5) and not alarm.check(1.5, 0.5)
    assert not alarm.check(10.0, 0.5)  # healthy check resets the count
    assert [alarm.check(10.0, 0.01) for _ in range(3)] == [False, False, True]
    assert alarm.tripped and not alarm.check(1.0, 0.01)  # trips once
    assert not CollapseAlarm(2.0, 0.05, 1).check(
        float("nan"), float("nan")
    )  # MLM: nothing to watch


def test_checks_during_the_warmup_or_a_delayed_latent_loss_do_not_count(tmp_path, tiny_shards):
    from lang_jepa.config import load_config
    from lang_jepa.metrics import TrainMetrics

    def trip_step(*overrides: str) -> int | None:
        cfg = load_config("tiny", [f"data.shards={tiny_shards}", "eval.collapse_patience=2",
                                   *overrides])  # fmt: skip
        metrics = TrainMetrics(cfg, torch.device("cpu"), 0, 1, tmp_path)
        for step in range(1, 20):  # a constant prediction from the first step
            scalars = {"repr/effective_rank": 30.0, "repr/target_std": 0.5, "repr/pred_std": 0.001}
            if metrics.watch_collapse(step, scalars):
                return step
            assert scalars["repr/collapse_alarm"] == 0.0
        return None

    assert trip_step() == 7  # the tiny preset warms up for 5 steps: checks at 6 and 7 count
    assert trip_step("eval.collapse_after_step=0") == 2
    assert trip_step("eval.collapse_after_step=12") == 14
    # a delayed latent loss (objective=jepa+mlm): the checks wait for its ramp to end (8 + 4)
    delayed = ("objective=jepa+mlm", "loss.latent_start=8", "loss.latent_ramp=4")
    assert trip_step(*delayed) == 14
    assert trip_step(*delayed, "eval.collapse_after_step=0") == 2  # an explicit step wins
