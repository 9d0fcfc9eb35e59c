"""Config tree, presets, schedules and the DeepSpeed config filling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lang_jepa import schedules
from lang_jepa.config import ConfigError, load_config, preset_names, resolve_batch
from lang_jepa.engine import build_ds_config


def test_presets_load_and_have_narrower_predictors():
    assert {"tiny", "small", "base", "large", "xl"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.predictor.dim < cfg.model.dim and cfg.predictor.depth <= cfg.model.depth


def test_precedence_defaults_preset_overrides(tmp_path):
    assert load_config().model.dim == 768
    assert load_config("tiny").model.dim == 64
    assert load_config("tiny", ["model.dim=96", "model.heads=4"]).model.dim == 96
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("model: {dim: 128, heads: 4}\n")
    assert load_config(str(yaml), ["model.depth=3"]).model.depth == 3


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["train.max_stepz=1"], "train.max_stepz"),
        (["model.depth=two"], "model.depth"),
        (["model.heads=5"], "model.heads"),
        (["train.precision=fp16"], "train.precision"),
        (["mask.min_blocks=5"], "mask.max_blocks"),
        (["objective=mae"], "objective"),
        (["nonsense"], "nonsense"),
        (["model.dim=-8"], "model.dim"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.start_lr=-0.1"], "optim.start_lr"),
        (["model.dropout=1.5"], "model.dropout"),
        (["optim.ema_end=1.5"], "optim.ema_end"),
        (["optim.ema_start=-0.1"], "optim.ema_start"),
        (["optim.betas=[0.9,1.0]"], "optim.betas"),
        (["predictor.depth=0"], "predictor.depth"),
        (["train.keep_checkpoints=-1"], "train.keep_checkpoints"),
        (["eval.collapse_min_rank_frac=2"], "eval.collapse_min_rank_frac"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides)


def test_every_preset_is_in_range():
    for name in preset_names():
        load_config(name)  # validate() checks every range of config.RANGES


def test_range_table_names_real_keys():
    from lang_jepa.config import RANGES, Config, _value

    cfg = Config()
    for key in RANGES:
        assert isinstance(_value(cfg, key), int | float), key


def test_batch_arithmetic():
    cfg = load_config("tiny", ["data.micro_batch_size=4", "train.global_batch_size=32"])
    assert resolve_batch(cfg, 2) == (4, 4, 32)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        resolve_batch(load_config("tiny", ["train.global_batch_size=30"]), 2)


def test_schedules_are_pure_functions_of_the_step():
    o = load_config(
        "tiny", ["optim.warmup_steps=10", "optim.start_lr=0.0002", "optim.lr=0.001"]
    ).optim
    assert schedules.learning_rate(0, 100, o) == pytest.approx(2e-4)
    assert schedules.learning_rate(10, 100, o) == pytest.approx(1e-3)
    assert schedules.learning_rate(100, 100, o) == pytest.approx(o.min_lr)
    assert schedules.weight_decay(0, 100, o) == pytest.approx(0.04)
    assert schedules.weight_decay(100, 100, o) == pytest.approx(0.4)
    assert schedules.ema_momentum(0, 100, o) == pytest.approx(0.996)
    assert schedules.ema_momentum(50, 100, o) == pytest.approx(0.998)
    assert schedules.ema_momentum(100, 100, o) == pytest.approx(1.0)


def test_deepspeed_config_is_filled_once(tmp_path):
    cfg = load_config(
        "tiny", ["data.micro_batch_size=3", "optim.grad_clip=0.5", "train.precision=bf16"]
    )
    ds = build_ds_config("ds_configs/zero2.json", cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 6
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        raw = json.loads(Path(f"ds_configs/{name}.json").read_text())
        assert raw["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in raw
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="gradient_clipping.*optim.grad_clip"):
        build_ds_config(bad, cfg, 1)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer'"):
        build_ds_config(bad, cfg, 1)
