"""The experiment file: a base config, variants, a token budget, seeds and evaluation settings.

An experiment file is YAML, read through OmegaConf structured dataclasses (unknown keys and wrong
types fail with the key's name). Each variant's training config is resolved with
:func:`lang_jepa.config.load_config` before anything runs, so a bad override fails at start-up,
naming the file, the variant and the key. The budget is in tokens: every trained variant runs
``ceil(tokens / (global batch x seq_len))`` optimizer steps (rounded up to a multiple of
``eval.points``), so variants with other batch shapes still see the same number of token slots.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lang_jepa.config import (
    GOVERNED_KEYS,
    INERT_DEFAULTS,
    Config,
    ConfigError,
    load_config,
    resolve_batch,
    to_dict,
)
from lang_jepa.shards import load_manifest

# Keys the harness sets for every cell; an experiment file may not override them.
HARNESS_KEYS = ("train.run_dir", "train.seed", "train.max_steps", "train.save_interval",
                "train.keep_checkpoints", "train.resume", "train.exit_at_step")  # fmt: skip
LAUNCHERS = ("python", "deepspeed")


class ExperimentError(ValueError):
    """A bad experiment file (the message names the file and the key)."""


@dataclass
class BaseSpec:
    config: str = "mini"  # preset name or YAML file (train.py --config)
    deepspeed_config: str = "ds_configs/zero2.json"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys -> values


@dataclass
class VariantSpec:
    name: str = ""  # the run directory is VARIANT-sSEED: letters, digits, '-', '_'
    train: bool = True  # false: no training; the export is a freshly initialised encoder
    # with train: false, the untrained encoder's weights: random (seeded) | pretrained (the
    # model.init_from checkpoint as it is: the "before" of continued pretraining)
    init: str = "random"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class BudgetSpec:
    tokens: int = 0  # token slots (global batch x seq_len per step) every trained variant gets


@dataclass
class EvalSpec:
    points: int = 3  # checkpoints evaluated along the budget (the last is the end of training)
    quick: bool = False  # lang_jepa.eval --quick: 4 validation batches, 2,000 RT snippets
    rt: bool = True  # the Rotten Tomatoes probe (needs data/eval)
    rt_limit: int | None = None  # a stratified RT subset (default: all, or 2,000 with quick)
    data_dir: str = "data/eval"
    max_val_batches: int = 16  # predictor evaluation batches (4 with quick)
    predictor: bool = True  # masked-sentence retrieval of JEPA runs
    online: str = "all"  # evaluate the online encoder of JEPA runs at: all | final | none points


@dataclass
class RunSpec:
    launcher: str = "python"  # python (one process) | deepspeed (the deepspeed launcher)
    ranks: int = 1  # processes (deepspeed --num_gpus)


@dataclass
class ExperimentSpec:
    name: str = ""  # default: the file's stem
    base: BaseSpec = field(default_factory=BaseSpec)
    variants: list[VariantSpec] = field(default_factory=list)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    seeds: list[int] = field(default_factory=lambda: [0])
    eval: EvalSpec = field(default_factory=EvalSpec)
    run: RunSpec = field(default_factory=RunSpec)
    notes: str = ""  # free text, copied into results.md


@dataclass
class Cell:
    """One variant x seed: what to run and where."""

    variant: VariantSpec
    seed: int
    cfg: Config  # resolved training config (harness keys set)
    overrides: list[str]  # everything after --config, for train.py
    steps: int  # optimizer steps (0 for an untrained variant)
    slots_per_step: int  # global batch x seq_len
    save_interval: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.variant.name}-s{self.seed}"

    @property
    def point_steps(self) -> list[int]:
        """The steps evaluated along the budget (``[0]`` for an untrained variant)."""
        if not self.variant.train:
            return [0]
        return list(range(self.save_interval, self.steps + 1, self.save_interval))

    def fingerprint(self, spec: ExperimentSpec) -> str:
        """What a variant's results depend on, the same for each seed: its resolved training
        config (every key, defaults included, less the run directory and the seed), the base
        config's name, whether and from what it trains, and the evaluation settings. A default
        that changes (in the code or in a preset) changes the fingerprint of every cell that
        relied on it, so a recorded result is never taken for a setting it was not made with.
        A key of :data:`lang_jepa.config.INERT_DEFAULTS` at its inert value is left out (the
        code behaves as before the key existed), and so are the keys of
        :data:`lang_jepa.config.GOVERNED_KEYS` while the key governing them has a value under
        which they are not read."""
        resolved = to_dict(self.cfg)
        for key in ("run_dir", "seed"):
            resolved["train"].pop(key, None)
        for key, inert in INERT_DEFAULTS.items():  # a later key at its "not used" value
            section, name = key.split(".")
            if resolved[section].get(name) == inert:
                del resolved[section][name]
        for key, needs, governed in GOVERNED_KEYS:  # keys that count only under another's value
            section, name = key.split(".")
            if resolved[section].get(name, INERT_DEFAULTS.get(key)) != needs:
                for other in governed:
                    other_section, other_name = other.split(".")
                    resolved[other_section].pop(other_name, None)
        blob = json.dumps({"config": resolved, "base": spec.base.config,
                           "train": self.variant.train, "eval": OmegaConf.to_container(
                               OmegaConf.structured(spec.eval)),
                           **({} if self.variant.init == "random" else {"init": self.variant.init})},
                          sort_keys=True, default=str)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Experiment:
    path: Path
    spec: ExperimentSpec
    out_dir: Path
    cells: list[Cell]  # the cells to run (``--only`` / ``--seeds``)
    all_cells: list[Cell]  # every variant x seed
    record_dir: Path | None = None  # committed copies of finished cells' results (None: off)

    def recorded(self, cell: Cell) -> Path | None:
        """Where ``cell``'s committed result lives (``RECORD/cells/VARIANT-sSEED.json``)."""
        return None if self.record_dir is None else self.record_dir / "cells" / f"{cell.name}.json"


def _err(path: Path, key: str, msg: str) -> ExperimentError:
    return ExperimentError(f"{path}: key {key!r}: {msg}")


def format_value(value: Any) -> str:
    """A YAML value as the right-hand side of a ``key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def flatten(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """``{train.precision: fp32, optim: {lr: 1e-3}}`` -> ``["train.precision=fp32", "optim.lr=0.001"]``."""
    out: list[str] = []
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flatten(value, full + ".")
        else:
            out.append(f"{full}={format_value(value)}")
    return out


def read_spec(path: Path) -> ExperimentSpec:
    """The experiment file, type-checked against :class:`ExperimentSpec`."""
    if not path.is_file():
        raise ExperimentError(f"{path}: no such experiment file")
    try:
        raw = OmegaConf.load(path)
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentSpec), raw)
        spec: ExperimentSpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _err(path, key, first) from err
    except Exception as err:  # noqa: BLE001 - YAML syntax errors
        raise ExperimentError(f"{path}: cannot read it as YAML: {err}") from err
    spec.name = spec.name or path.stem
    _check_spec(path, spec)
    return spec


def _check_spec(path: Path, spec: ExperimentSpec) -> None:
    if not spec.variants:
        raise _err(path, "variants", "needs at least one variant")
    names = [v.name for v in spec.variants]
    for i, v in enumerate(spec.variants):
        ok = v.name and all(c.isalnum() or c in "-_" for c in v.name)
        if not ok:
            raise _err(path, f"variants[{i}].name", f"{v.name!r}: letters, digits, '-', '_'")
        if names.count(v.name) > 1:
            raise _err(path, f"variants[{i}].name", f"{v.name!r} appears twice")
        for o in flatten(v.overrides):
            _check_override(path, f"variants[{i}].overrides", o)
        if v.init not in ("random", "pretrained") or (v.init == "pretrained" and v.train):
            raise _err(path, f"variants[{i}].init",
                       f"{v.init!r}: random | pretrained (pretrained: with train: false)")  # fmt: skip
    for o in flatten(spec.base.overrides):
        _check_override(path, "base.overrides", o)
    if any(v.train for v in spec.variants) and spec.budget.tokens <= 0:
        raise _err(path, "budget.tokens", "must be a positive number of tokens")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise _err(path, "seeds", f"{spec.seeds}: needs distinct seeds")
    if spec.eval.points < 1:
        raise _err(path, "eval.points", "must be >= 1")
    if spec.eval.online not in ("all", "final", "none"):
        raise _err(path, "eval.online", f"{spec.eval.online!r} is not all | final | none")
    if spec.run.launcher not in LAUNCHERS:
        raise _err(path, "run.launcher", f"{spec.run.launcher!r} is not {' | '.join(LAUNCHERS)}")
    if spec.run.ranks < 1 or (spec.run.launcher == "python" and spec.run.ranks != 1):
        raise _err(path, "run.ranks", "the python launcher runs 1 rank; use run.launcher=deepspeed")


def _check_override(path: Path, where: str, override: str) -> None:
    key = override.split("=", 1)[0]
    if key in HARNESS_KEYS:
        raise _err(path, f"{where}.{key}", "is set by the harness (budget, seeds, run directory)")


def steps_for_budget(cfg: Config, tokens: int, ranks: int, points: int) -> tuple[int, int, int]:
    """(steps, token slots per step, save interval): enough steps for ``tokens`` token slots,
    rounded up to a multiple of ``points`` so the evaluated checkpoints are evenly spaced."""
    _, _, glob = resolve_batch(cfg, ranks)
    slots = glob * cfg.model.seq_len
    steps = max(math.ceil(tokens / slots), points)
    steps = math.ceil(steps / points) * points
    return steps, slots, steps // points


def default_record_dir(path: Path, name: str) -> Path:
    """``results/NAME/`` beside the experiment file (``experiments/results/NAME/``)."""
    return path.parent / "results" / name


def load_experiment(path: str | Path, out_root: str | Path = "runs/experiments",
                    seeds: list[int] | None = None, only: list[str] | None = None,
                    record: str | Path | None = "default") -> Experiment:  # fmt: skip
    """Read and check the experiment file and resolve every cell's training config.

    ``record``: where finished cells' results and the aggregate are kept for the repository
    (``"default"``: :func:`default_record_dir`; ``None``: nowhere)."""
    path = Path(path)
    spec = read_spec(path)
    record_dir = None if record is None else (
        default_record_dir(path, spec.name) if record == "default" else Path(record))  # fmt: skip
    if seeds:
        spec.seeds = list(seeds)
    variants = spec.variants
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise ExperimentError(
                f"{path}: --only {', '.join(unknown)}: no such variant "
                f"(variants: {', '.join(v.name for v in variants)})"
            )
    chosen = set(only) if only else {v.name for v in variants}
    out_dir = Path(out_root) / spec.name
    base = flatten(spec.base.overrides)
    cells = []
    for i, variant in enumerate(spec.variants):
        where = f"variants[{i}] ({variant.name})"
        mine = base + flatten(variant.overrides)
        try:
            cfg = load_config(spec.base.config, mine)
            steps, slots, every = steps_for_budget(
                cfg, spec.budget.tokens, spec.run.ranks, spec.eval.points
            )
        except ConfigError as err:
            raise ExperimentError(f"{path}: {where}: {err}") from err
        if not variant.train:
            steps, every = 0, 0
        elif cfg.optim.warmup_steps >= steps:
            raise _err(path, f"{where}.optim.warmup_steps",
                       f"{cfg.optim.warmup_steps} >= the budget's {steps} steps")  # fmt: skip
        for seed in spec.seeds:
            run_dir = out_dir / f"{variant.name}-s{seed}"
            harness = [f"train.run_dir={run_dir}", f"train.seed={seed}", "train.resume=auto",
                       f"train.max_steps={max(steps, 1)}", f"train.save_interval={max(every, 1)}",
                       "train.keep_checkpoints=0"]  # fmt: skip
            overrides = mine + harness
            cells.append(Cell(variant, seed, load_config(spec.base.config, overrides), overrides,
                              steps, slots, every, run_dir))  # fmt: skip
    chosen_cells = [c for c in cells if c.variant.name in chosen]
    return Experiment(path, spec, out_dir, chosen_cells, cells, record_dir)


def model_config(cfg: Config) -> tuple[dict[str, Any], int]:
    """(the ``model`` section as a dict, vocabulary size) with ``model.vocab_size: 0`` resolved
    from the shards' manifest, as the trainer resolves it."""
    model = to_dict(cfg)["model"]
    if model.get("init_from"):  # the architecture is the checkpoint's, as the trainer takes it
        from lang_jepa.pretrained import bert_architecture, resolve_path

        model["init_from"] = resolve_path(model["init_from"])
        model.update(bert_architecture(model["init_from"]))
        return model, int(model["vocab_size"])
    vocab = cfg.model.vocab_size or int(load_manifest(cfg.data.shards)["tokenizer"]["vocab_size"])
    return model, vocab
