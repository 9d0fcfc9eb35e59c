"""The evaluation suite end to end on a real tiny run: predictor controls, quick_eval, CLI, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lang_jepa.data import build_val_loader
from lang_jepa.eval.__main__ import main as eval_main
from lang_jepa.eval.loading import load_run
from lang_jepa.eval.predictor import (
    batch_predictions,
    eval_batches,
    method_metrics,
    quick_eval,
    shuffled_contexts,
)
from lang_jepa.eval.suite import evaluate
from lang_jepa.objectives import compute_targets, gather_tokens
from lang_jepa.report import read_jsonl, report

REPO = Path(__file__).resolve().parents[2]
# the runs fixture trains with train.py (the real engine, in processes)
pytestmark = [pytest.mark.processes, pytest.mark.engine]
STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> dict[str, Path]:
    """Real tiny runs trained side by side: JEPA (seq_len 128 so the 2 val documents give several
    batches) and the MLM control (2 steps)."""
    root = tmp_path_factory.mktemp("eval_runs")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = [sys.executable, "train.py", "--config", "tiny", f"data.shards={tiny_shards}"]
    extra = {
        "jepa": [f"train.max_steps={STEPS}", "model.seq_len=128", "train.log_interval=2",
                 "train.val_interval=3", f"train.save_interval={STEPS}"],
        "mlm": ["objective=mlm", "train.max_steps=2", "train.save_interval=2", "train.val_interval=0"],
        "proj": ["train.max_steps=2", "train.save_interval=2", "train.val_interval=0",
                 "model.seq_len=128", "target.source=online", "target.projector=32", "mask.queries=2",
                 "loss.type=infonce", "loss.reg=sigreg", "loss.reg_on=targets",
                 "loss.reg_weight=0.02", "optim.ema_start=0.0", "optim.ema_end=0.0"],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen([*common, f"train.run_dir={root / name}", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, args in extra.items()
    }  # fmt: skip
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} run failed:\n{out[-3000:]}"
    return {name: root / name for name in extra}


@pytest.fixture(scope="module")
def run_dir(runs: dict[str, Path]) -> Path:
    return runs["jepa"]


@pytest.fixture(scope="module")
def loaded(run_dir: Path):
    return load_run(run_dir)


def test_a_projector_run_loads_and_is_scored_in_the_projectors_space(runs) -> None:
    """target.projector: load_run restores the projector from the checkpoint, and the predictor
    table compares predictions with projected targets and projected baselines. The run also
    hides the hidden sentences' lengths (mask.queries): its batches carry renumbered positions and
    the shuffled control reads another window's context at that window's renumbered positions."""
    from lang_jepa import checkpoint
    from lang_jepa.decoder.predict import DecoderError, predict_hidden

    run = load_run(runs["proj"])
    state = checkpoint.consolidated_state(*checkpoint.locate(runs["proj"], None))
    proj = {k: v for k, v in state.items() if k.startswith("projector.")}
    assert len(proj) == 6  # two Linear layers and a LayerNorm, weight and bias each
    for k, v in proj.items():
        torch.testing.assert_close(run.jepa.state_dict()[k], v.float())
    batch = eval_batches(run.cfg, 1)[0]
    assert batch["qry_pos"].shape[1] >= 2 * int(batch["tgt_sent_valid"].sum(1).max())
    shuffled, _ = shuffled_contexts([batch], 0)
    donor = shuffled[0]["ctx_pos"][0][shuffled[0]["ctx_valid"][0]]
    assert set(donor.tolist()) <= set(batch["ctx_pos"][batch["ctx_valid"]].tolist())
    out = batch_predictions(run.jepa, run.target, batch, shuffled[0], None, run.cfg.target)
    with torch.no_grad():
        want = run.jepa.project(compute_targets(run.target, batch, None, run.cfg.target))
    torch.testing.assert_close(out["targets"], want)
    assert out["preds"]["copy_context"].shape == want.shape
    mrr = method_metrics([out], "model", run.cfg.loss)["within_doc_mrr"]
    assert 0.0 < mrr <= 1.0
    with pytest.raises(DecoderError, match="projector"):  # a decoder reads the encoder's space
        predict_hidden(runs["proj"], runs["proj"], "One. Two.", 1)


def test_own_context_reproduces_the_models_forward(loaded) -> None:
    batch = eval_batches(loaded.cfg, 1)[0]
    with torch.no_grad():
        direct = loaded.jepa(batch)
        via = loaded.jepa.predict(
            batch, gather_tokens(batch["input_ids"], batch["ctx_index"]),
            gather_tokens(batch["position_ids"], batch["ctx_index"]), batch["ctx_valid"],
        )  # fmt: skip
    assert torch.equal(direct, via)


def test_shuffled_contexts_come_from_other_documents(loaded) -> None:
    batches = eval_batches(loaded.cfg, 16)
    docs = {int(d) for b in batches for d in b["doc_index"]}
    assert len(docs) == 2 and len(batches) >= 4  # both val documents are in the set
    shuffled, same_doc = shuffled_contexts(batches, seed=0)
    assert same_doc == 0.0
    for b, s in zip(batches, shuffled, strict=True):
        assert s["ctx_ids"].shape[0] == b["input_ids"].shape[0]
        assert s["ctx_valid"].sum(1).min() > 0
    b, s = batches[0], shuffled[0]
    with torch.no_grad():
        own = loaded.jepa(b)
        swapped = loaded.jepa.predict(b, s["ctx_ids"], s["ctx_pos"], s["ctx_valid"])
    assert own.shape == swapped.shape and not torch.equal(own, swapped)


def test_a_perfect_predictor_scores_one_and_controls_are_sane(loaded) -> None:
    """Targets as predictions retrieve perfectly, also among the window's own sentences (which
    checks the slot -> sentence mapping); constant predictions give exactly chance."""
    batches = eval_batches(loaded.cfg, 6)
    shuffled, _ = shuffled_contexts(batches)
    outs = [
        batch_predictions(loaded.jepa, loaded.target, b, s)
        for b, s in zip(batches, shuffled, strict=True)
    ]
    for b, o in zip(batches, outs, strict=True):
        assert torch.equal(
            o["targets"], compute_targets(loaded.target, b, None)
        )  # training's targets
        o["preds"]["perfect"] = o["targets"].clone()
        o["preds"]["constant"] = torch.ones_like(o["targets"])
    perfect = method_metrics(outs, "perfect", loaded.cfg.loss)
    assert perfect["loss"] == pytest.approx(0.0, abs=1e-6)
    for key in ("top1", "top5", "mrr", "within_window_top1", "within_doc_top1", "within_doc_mrr"):
        assert perfect[key] == pytest.approx(1.0), key
    assert perfect["n_candidates"] > perfect["within_doc_n_candidates"] > 2
    const = method_metrics(outs, "constant", loaded.cfg.loss)
    for key in ("top1", "mrr", "within_doc_top1", "within_doc_mrr"):
        chance = key.replace("top1", "chance_top1").replace("mrr", "chance_mrr")
        assert const[key] == pytest.approx(const[chance], abs=1e-6), key


def test_quick_eval_on_the_trainers_val_batches_is_fast_and_finite(loaded) -> None:
    val = list(build_val_loader(loaded.cfg, 0, 1))  # the trainer's: with sentence ids
    assert all("sent_id" in b for b in val)
    start = time.perf_counter()
    out = quick_eval(loaded.jepa, loaded.target, val, loaded.cfg.loss)
    elapsed = time.perf_counter() - start
    assert elapsed < 15.0  # ~0.3 s on an idle 2-core CPU; generous for a loaded machine
    for key in ("retrieval_top1", "retrieval_mrr", "copy_context_top1", "shuffled_loss_ratio",
                "effective_rank", "loss", "within_window_top1", "pred_effective_rank",
                "within_doc_mrr", "copy_neighbour_within_doc_mrr"):  # fmt: skip
        assert key in out and torch.isfinite(torch.tensor(out[key])), key
    assert not any(k.startswith("eval/") for k in out)
    assert loaded.jepa.training is False  # load_run's eval mode restored
    # the in-document metrics are exactly the offline suite's on the same windows
    offline = eval_batches(loaded.cfg, len(val))  # each window once: maybe fewer batches
    n = len(offline)
    assert n >= 2 and all(
        torch.equal(a["sent_id"], b["sent_id"]) for a, b in zip(offline, val[:n], strict=True)
    )
    ours = quick_eval(loaded.jepa, loaded.target, val[:n], loaded.cfg.loss)
    theirs = quick_eval(loaded.jepa, loaded.target, offline, loaded.cfg.loss)
    assert ours["within_doc_mrr"] == pytest.approx(theirs["within_doc_mrr"])


def test_cli_writes_json_markdown_and_plots(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = [str(run_dir), "--out", str(out), "--baselines", "tfidf", "--max-val-batches", "6",
            "--rt-limit", "200"]  # fmt: skip
    assert eval_main(argv) == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["encoders"]) == {"model", "model_online", "tfidf"}
    assert res["source"]["step"] == STEPS and res["source"]["objective"] == "jepa"
    assert set(res["predictor"]["methods"]) == {
        "model",
        "shuffled",
        "copy_context",
        "copy_neighbour",
        "batch_mean",
        "length",
    }
    # the length control: in-window scores only, at least chance (length is never worse than none)
    length = res["predictor"]["methods"]["length"]
    assert "loss" not in length and "mrr" not in length
    assert length["within_doc_mrr"] >= res["predictor"]["methods"]["model"]["within_doc_chance_mrr"]
    for row in res["encoders"].values():
        assert -1.0 <= row["lee_spearman"] <= 1.0 and row["effective_rank"] >= 1.0
    md = (out / "eval.md").read_text()
    assert "Lee50 Spearman" in md and "*chance*" in md and "copy_neighbour" in md
    if "rt_probe" not in res["skipped"]:
        assert 0.0 < res["chance"]["rt_accuracy"] < 1.0 and "RT sentiment probe" in md
    for png in ("eval_encoders.png", "eval_predictor.png", "eval_ranks.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_gets_encoder_metrics_and_missing_rt_data_is_skipped(
    run_dir: Path, tmp_path: Path
) -> None:
    from lang_jepa.export import export

    exp = export(run_dir, tmp_path / "export")
    res = evaluate(exp, baselines=["random"], data_dir=tmp_path / "no_data")
    assert res["predictor"] is None and "export" in res["skipped"]["predictor"]
    assert "make eval-data" in res["skipped"]["rt_probe"]
    assert (
        set(res["encoders"]) == {"model", "random"}
        and "rt_accuracy" not in res["encoders"]["model"]
    )
    run = evaluate(
        run_dir, baselines=[], data_dir=tmp_path / "no_data", max_val_batches=2, quick=True
    )
    # the exported target encoder and the run's target encoder are the same weights
    assert res["encoders"]["model"]["lee_spearman"] == pytest.approx(
        run["encoders"]["model"]["lee_spearman"], abs=1e-5
    )


def test_report_draws_pngs_and_html_and_keeps_the_last_record_of_a_step(
    run_dir: Path, tmp_path: Path
) -> None:
    paths = report(run_dir, tmp_path / "report")
    names = {p.name for p in paths}
    assert {"loss.png", "schedules.png", "collapse.png", "index.html"} <= names
    html = (tmp_path / "report" / "index.html").read_text()
    assert 'src="loss.png"' in html and "repr/effective_rank" in html
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n'
                   '{"step": 2, "train/loss": 1.2, "eval/retrieval_top1": 0.3}\n{"step": 3, "train/lo')  # fmt: skip
    series = read_jsonl(log)
    assert series["train/loss"] == [(1, 2.0), (2, 1.2)]
    assert series["eval/retrieval_top1"] == [(2, 0.3)]


def test_an_mlm_run_gets_the_encoder_metrics_only(runs: dict[str, Path], tmp_path: Path) -> None:
    res = evaluate(runs["mlm"], baselines=[], data_dir=tmp_path / "no_data")
    assert res["source"]["objective"] == "mlm" and res["source"]["model"] == "online encoder"
    assert res["predictor"] is None and "mlm" in res["skipped"]["predictor"]
    assert set(res["encoders"]) == {"model"} and res["encoders"]["model"]["effective_rank"] > 1.0


def test_report_falls_back_to_tensorboard_events(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from lang_jepa.report import load_series

    run = tmp_path / "run"
    shutil.copytree(run_dir / "tb", run / "tb")  # no logs/metrics.jsonl
    series, source = load_series(run)
    assert source.endswith("tb")
    jsonl, _ = load_series(run_dir)
    assert [s for s, _ in series["train/loss"]] == [s for s, _ in jsonl["train/loss"]]
    assert [v for _, v in series["train/loss"]] == pytest.approx(
        [v for _, v in jsonl["train/loss"]], rel=1e-6
    )
    assert (tmp_path / "out" / "index.html") in report(run, tmp_path / "out")
