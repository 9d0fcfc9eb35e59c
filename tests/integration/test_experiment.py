"""The experiment harness with the real engine on real tiny shards: an experiment end to end
(random init + JEPA), nothing re-run the second time, a killed variant resumes; bad experiment
files name the file and the key; centring and whitening do what the cosine tasks rely on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lang_jepa.eval.loading import random_encoder
from lang_jepa.eval.metrics import fit_postprocess, spearman
from lang_jepa.experiment import ExperimentError, load_experiment
from lang_jepa.experiment.__main__ import main
from lang_jepa.experiment.spec import model_config
from tests.helpers import cpu_env, wait_for_run_dir_release

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]
TINY_SLOTS = 4 * 64  # the tiny preset's token slots per step (micro-batch 4 x seq_len 64)


def write_experiment(path: Path, shards: Path, variants: str, tokens: int, points: int = 2) -> Path:
    path.write_text(f"""
name: t
base:
  config: tiny
  overrides: {{data.shards: {shards}, train.log_interval: 2, train.val_interval: 0}}
budget: {{tokens: {tokens}}}
seeds: [3]
eval: {{points: {points}, quick: true, rt_limit: 300, max_val_batches: 2}}
variants:
{variants}
""")
    return path


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in cpu_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)  # data/eval is found relative to the repository


def test_experiment_end_to_end_then_nothing_reruns(
    tmp_path: Path, tiny_shards: Path, capsys
) -> None:
    variants = "  - {name: random, train: false}\n  - {name: jepa}"
    exp_file = write_experiment(
        tmp_path / "t.yaml", tiny_shards, variants, tokens=8 * TINY_SLOTS - 10
    )
    out = tmp_path / "runs"
    assert main([str(exp_file), "--out", str(out), "--poll", "1"]) == 0
    root = out / "t"
    res = json.loads((root / "results.json").read_text())
    md = (root / "results.md").read_text()
    assert md.startswith("# Experiment `t`")
    # every cell says when, on what machine and at which commit it was measured
    from lang_jepa.runinfo import git_revision

    for cell_result in res["cells"]:
        m = cell_result["measured"]
        assert m["commit"] == git_revision() and m["machine"]["cpu"] and m["date"]
    assert f"commit {git_revision()[:12]}: random-s3, jepa-s3" in md
    assert (root / "results.png").stat().st_size > 10_000

    jepa, rand = res["variants"]["jepa"], res["variants"]["random"]
    assert jepa["steps"] == 8 and jepa["seeds"] == [3]  # 8 x 256 slots >= the budget
    assert [p["step"] for p in jepa["curve"]] == [4, 8]
    assert 0.5 * 8 * TINY_SLOTS < jepa["tokens_seen"]["mean"] <= 8 * TINY_SLOTS
    assert jepa["flops"]["mean"] > 0 and jepa["train_seconds"]["mean"] > 0
    final = jepa["final"]
    for key in ("target.lee_spearman", "online.lee_spearman", "target.lee_spearman_whitened",
                "target.rt_accuracy", "predictor.model.within_doc_mrr",
                "predictor.model.within_doc_centred_mrr", "main.lee_spearman_centred"):  # fmt: skip
        assert np.isfinite(final[key]["mean"]), key
    assert final["main.lee_spearman"]["mean"] == final["target.lee_spearman"]["mean"]
    assert rand["steps"] == 0 and rand["tokens_seen"]["mean"] == 0
    assert "predictor.model.within_doc_mrr" not in rand["final"]

    cell = root / "jepa-s3"
    for sub in ("export/target", "export/online", "export/step00000004/target"):
        assert (cell / sub / "model.safetensors").is_file(), sub
    # the random-init export is the suite's random baseline at the cell's seed, same shape
    exp = load_experiment(exp_file, out)
    model_cfg, vocab = model_config(exp.cells[0].cfg)
    expected = random_encoder(
        model_cfg, vocab, tiny_shards / "tokenizer", seed=3
    ).model.state_dict()
    saved = load_file(str(root / "random-s3" / "export" / "init" / "model.safetensors"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    trained = load_file(str(cell / "export" / "online" / "model.safetensors"))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in saved.items()}

    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")}
    launches = (cell / "harness_train.log").read_text().count("train.py")
    assert main([str(exp_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, not re-run") == 2
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/result.json")} == stamps
    assert (cell / "harness_train.log").read_text().count("train.py") == launches

    # the record beside the experiment file (what a repository commits) survives losing runs/:
    # a fresh checkout re-runs nothing and rebuilds the same table from it
    record = tmp_path / "results" / "t"
    assert sorted(p.name for p in (record / "cells").iterdir()) == [
        "jepa-s3.json",
        "random-s3.json",
    ]
    assert json.loads((record / "results.json").read_text())["variants"] == res["variants"]
    shutil.rmtree(out)
    assert main([str(exp_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("recorded, not re-run") == 2 and "starting" not in printed
    assert not (out / "t" / "jepa-s3").exists()
    assert json.loads((out / "t" / "results.json").read_text())["variants"] == res["variants"]
    # a figure of chosen variants from the record, nothing run
    png = tmp_path / "only-jepa.png"
    assert main([str(exp_file), "--out", str(out), "--only", "jepa", "--figure", str(png)]) == 0
    assert png.stat().st_size > 10_000 and not (out / "t" / "jepa-s3").exists()


def test_killed_variant_resumes_from_its_checkpoint(tmp_path: Path, tiny_shards: Path) -> None:
    exp_file = write_experiment(tmp_path / "t.yaml", tiny_shards, "  - {name: jepa}",
                                tokens=40 * TINY_SLOTS, points=4)  # fmt: skip
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "lang_jepa.experiment", str(exp_file), "--out", str(out),
           "--poll", "0.5"]  # fmt: skip
    cell = out / "t" / "jepa-s3"
    latest = cell / "checkpoints" / "latest"
    harness = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not latest.is_file():
        assert harness.poll() is None, "the harness ended before its first checkpoint"
        time.sleep(0.1)
    children = subprocess.run(["pgrep", "-P", str(harness.pid)], capture_output=True, text=True)
    harness.send_signal(signal.SIGKILL)  # the machine stops: harness and training die at once
    harness.wait()
    for pid in children.stdout.split():
        os.killpg(int(pid), signal.SIGKILL)
    wait_for_run_dir_release(cell)
    killed_at = int(latest.read_text().removeprefix("step"))
    assert 10 <= killed_at < 40 and not (cell / "result.json").exists()

    rerun = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (cell / "logs" / "train.log").read_text()
    assert f"step {killed_at})" in log and "resumed from" in log
    result = json.loads((cell / "result.json").read_text())
    assert [p["step"] for p in result["points"]] == [10, 20, 30, 40]
    assert result["tokens_seen"] <= 40 * TINY_SLOTS


def test_bad_experiment_files_name_the_file_and_key(tmp_path: Path, tiny_shards: Path) -> None:
    head = "base: {config: tiny}\nbudget: {tokens: 1000}\n"
    cases = {
        "base: {config: tiny}\nbudget: {tokenz: 5}\nvariants: [{name: a}]": "budget.tokenz",
        head + "variants: [{name: a, overides: {}}]": "overides",
        head + "variants: [{name: a, overrides: {train.max_stepz: 3}}]": "train.max_stepz",
        head + "variants: [{name: a, overrides: {train.max_steps: 3}}]": "set by the harness",
        head + "variants: [{name: a}, {name: a}]": "appears twice",
        head + "eval: {points: 0}\nvariants: [{name: a}]": "eval.points",
        head + "variants: []": "variants",
    }
    for i, (text, key) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text + "\n")
        with pytest.raises(ExperimentError) as err:
            load_experiment(path)
        assert str(path) in str(err.value) and key in str(err.value), str(err.value)
    with pytest.raises(ExperimentError, match="no such variant"):
        load_experiment(write_experiment(tmp_path / "ok.yaml", tiny_shards, "  - {name: a}", 999),
                        only=["b"])  # fmt: skip


def test_dry_run_prints_the_plan_and_trains_nothing(
    tmp_path: Path, tiny_shards: Path, capsys
) -> None:
    exp_file = write_experiment(tmp_path / "t.yaml", tiny_shards,
                                "  - {name: mlm, overrides: {objective: mlm}}", tokens=5000)  # fmt: skip
    assert main([str(exp_file), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "mlm-s3: 20 steps x 256 token slots = 5,120" in printed and "objective=mlm" in printed
    assert not (tmp_path / "runs").exists()


def test_whitening_recovers_what_a_dominant_nuisance_direction_hides() -> None:
    gen = np.random.default_rng(0)
    signal_dims = gen.normal(size=(300, 8))  # what the "ratings" depend on
    nuisance = gen.normal(size=(300, 1)) * 30.0  # a large shared direction, no signal
    z = np.concatenate([signal_dims, nuisance, np.full((300, 3), 5.0)], axis=1)
    iu = np.triu_indices(300, k=1)
    truth = (signal_dims @ signal_dims.T)[iu]

    def rho(mode: str) -> float:
        x = torch.nn.functional.normalize(fit_postprocess(z, mode)(z), dim=-1)
        return spearman((x @ x.T).numpy()[iu], truth)

    assert rho("raw") < 0.3 < 0.8 < rho("whitened")
    centred = fit_postprocess(z, "centred")(z).numpy()
    assert np.abs(centred.mean(0)).max() < 1e-5

    def spectrum_ratio(x: np.ndarray) -> float:
        vals = np.linalg.eigvalsh(np.cov(x.T))
        return float(vals.max() / vals.min())

    white = fit_postprocess(z[:, :9], "whitened")(z[:, :9]).numpy()  # N >> D: a flat spectrum
    assert spectrum_ratio(z[:, :9]) > 100 and spectrum_ratio(white) < 3
    few = fit_postprocess(z[:20], "whitened")(z[:20])  # N < D stays finite (shrinkage)
    assert torch.isfinite(few).all()


def test_a_changed_default_changes_the_fingerprint(tmp_path: Path, tiny_shards: Path) -> None:
    """The fingerprint is taken over the resolved config: a default that moves (here the loss
    type in the preset file) changes the cells that relied on it, pinning the old value in the
    experiment file keeps them, and the seed and run directory never matter."""
    preset = tmp_path / "preset.yaml"
    tiny = (REPO / "lang_jepa" / "configs" / "tiny.yaml").read_text()
    preset.write_text(tiny)
    variants = "  - {name: a}\n  - {name: b, overrides: {loss.type: smooth_l1}}"
    exp_file = write_experiment(tmp_path / "t.yaml", tiny_shards, variants, tokens=5000)
    exp_file.write_text(exp_file.read_text().replace("config: tiny", f"config: {preset}"))

    def prints(**kw: object) -> dict[str, str]:
        exp = load_experiment(exp_file, **kw)
        return {c.name: c.fingerprint(exp.spec) for c in exp.all_cells}

    before = prints()
    assert before["a-s3"] == before["b-s3"]  # smooth_l1 is the default: the same settings
    assert prints(seeds=[4], out_root=tmp_path / "elsewhere") == {
        k.replace("-s3", "-s4"): v for k, v in before.items()
    }
    preset.write_text(tiny + "loss: {type: l2}\n")  # the default moves
    after = prints()
    assert after["a-s3"] != before["a-s3"] and after["b-s3"] == before["b-s3"]


def test_a_new_key_at_its_inert_value_keeps_recorded_fingerprints(
    tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key added after cells were recorded (config.INERT_DEFAULTS) is left out of the
    fingerprint at the value that reproduces the code before it, and counts at any other."""
    import lang_jepa.experiment.spec as spec_mod

    online = "target.source: online, optim.ema_start: 0.0, optim.ema_end: 0.0"
    variants = (f"  - {{name: a, overrides: {{{online}}}}}\n"
                f"  - {{name: b, overrides: {{{online}, target.projector: 32}}}}")  # fmt: skip
    exp_file = write_experiment(tmp_path / "t.yaml", tiny_shards, variants, tokens=5000)
    exp = load_experiment(exp_file)
    a, b = (c.fingerprint(exp.spec) for c in exp.all_cells)
    assert a != b  # a projector is another setting
    # as if target.projector had always counted
    others = {k: v for k, v in spec_mod.INERT_DEFAULTS.items() if k != "target.projector"}
    monkeypatch.setattr(spec_mod, "INERT_DEFAULTS", others)
    assert exp.all_cells[0].fingerprint(exp.spec) != a  # so the inert key was left out
    assert exp.all_cells[1].fingerprint(exp.spec) == b  # and a key in use is never left out


def test_span_settings_count_only_under_span_masks(tmp_path: Path, tiny_shards: Path) -> None:
    """mask.span_* (config.GOVERNED_KEYS) are read only under mask.unit=span: with sentence
    masks they leave a cell's fingerprint alone, with span masks each one counts, its default
    included (a default that moves changes the span cells that relied on it)."""
    online = "target.source: online, optim.ema_start: 0.0, optim.ema_end: 0.0, loss.type: infonce"
    variants = (f"  - {{name: a, overrides: {{{online}}}}}\n"
                f"  - {{name: b, overrides: {{{online}, mask.span_max: 6}}}}\n"
                f"  - {{name: c, overrides: {{{online}, mask.unit: span}}}}\n"
                f"  - {{name: d, overrides: {{{online}, mask.unit: span, mask.span_max: 6}}}}")  # fmt: skip
    exp_file = write_experiment(tmp_path / "t.yaml", tiny_shards, variants, tokens=5000)
    exp = load_experiment(exp_file)
    a, b, c, d = (cell.fingerprint(exp.spec) for cell in exp.all_cells)
    assert a == b and len({a, c, d}) == 3
