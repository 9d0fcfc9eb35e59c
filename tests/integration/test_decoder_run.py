"""``python -m lang_jepa.decoder train | export | eval`` with the real DeepSpeed engine (ZeRO-2 on
CPU) on real shards: an interrupted decoder run resumes exactly, and its export loads and scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lang_jepa.config import load_config
from lang_jepa.decoder import Decoder
from lang_jepa.encoder_api import TOKENIZER_DIR
from lang_jepa.export import export_random_init
from lang_jepa.models import encoder_config
from tests.helpers import cpu_env, losses

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes, pytest.mark.engine]
STEPS = 8
SMALL = ["decoder.dim=32", "decoder.depth=1", "decoder.heads=2", "decoder.prefix=2",
         "decoder.max_tokens=24", "data.micro_batch_size=4", "train.log_interval=1",
         "train.val_interval=4", "train.save_interval=4", "optim.warmup_steps=2",
         f"train.max_steps={STEPS}"]  # fmt: skip


def decoder_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lang_jepa.decoder", *args], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=900)  # fmt: skip


def started(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lang_jepa.decoder", *args], cwd=REPO,
                            env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def finished(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def encoder_export(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("tiny", [f"data.shards={tiny_shards}", "model.seq_len=64"])
    out = tmp_path_factory.mktemp("encoder_export")
    return export_random_init(encoder_config(cfg.model, 30522), 30522, tiny_shards / TOKENIZER_DIR,
                              out, seed=0)  # fmt: skip


def test_decoder_run_resumes_exactly_and_its_export_scores(encoder_export: Path, tiny_shards: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [str(encoder_export), "--shards", str(tiny_shards)]
    done = started("train", *args, "--out", str(straight), *SMALL)  # side by side
    first = started("train", *args, "--out", str(split), *SMALL, "train.exit_at_step=4")
    for rc, text in (finished(done), finished(first)):
        assert rc == 0, text[-3000:]
    assert max(losses(split)) == 4
    second = decoder_cli("train", *args, "--out", str(split), *SMALL)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    want, got = losses(straight), losses(split)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert got == want  # bit-exact: same batches, same sentences, same decoder updates
    assert want[STEPS] < want[1]  # it learns

    export = straight / "export"
    dec = Decoder.from_pretrained(export, device="cpu")
    assert dec.config["source"]["step"] == STEPS
    assert (export / "encoder" / "tokenizer").is_dir()
    texts = dec.reconstruct(["the congress of the united states.", "peace was made."])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    scored = decoder_cli("eval", str(export), "--shards", str(tiny_shards), "--limit", "20",
                         "--examples", "3", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "decoder_eval.json").read_text())
    assert result["scores"]["sentences"] == 20
    assert 0.0 <= result["scores"]["token_f1"] <= 1.0
    assert len(result["examples"]) == 3
    assert (
        "| original | reconstruction |" in (tmp_path / "eval" / "decoder_examples.md").read_text()
    )
    retrieval = result["retrieval_scores"]
    assert retrieval["sentences"] == 20 and retrieval["pool"] > 20
    assert "nearest of" in (tmp_path / "eval" / "decoder_eval.md").read_text()
    # scored on training sentences, each one's nearest training sentence is itself
    from lang_jepa.decoder.__main__ import evaluate

    on_train = evaluate(export, tiny_shards, limit=20, split="train", examples=2)
    assert on_train["retrieval_scores"]["exact_match"] == 1.0
    # the semantic judge (all-MiniLM-L6-v2): the nearest is the sentence itself, cosine 1, and
    # unrelated sentences of the set score less
    assert on_train["retrieval_scores"]["semantic_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert on_train["semantic_chance"] < 0.9
    assert -1.0 <= result["scores"]["semantic_cosine"] <= 1.0
    assert "MiniLM cosine" in (tmp_path / "eval" / "decoder_eval.md").read_text()


def test_decoder_cli_errors_name_the_problem(tiny_shards: Path, tmp_path: Path) -> None:
    not_export = decoder_cli("train", str(tmp_path), "--shards", str(tiny_shards), "--out",
                             str(tmp_path / "run"))  # fmt: skip
    assert not_export.returncode == 2 and "not an encoder export" in not_export.stderr
    bad = decoder_cli("eval", str(tmp_path), "--shards", str(tiny_shards))
    assert bad.returncode == 2 and "not a LANG-JEPA decoder export" in bad.stderr


def test_predict_then_say_it(encoder_export: Path, tiny_shards: Path, tmp_path: Path) -> None:
    """A JEPA run's predictor fills a hidden sentence; the decoder writes prediction, truth and
    the copy-neighbour baseline (a decoder on a random-init export of the same width: the
    mechanics, not the quality)."""
    jepa = tmp_path / "jepa"
    train = subprocess.run(
        [sys.executable, "train.py", "--deepspeed_config", "ds_configs/zero2.json", "--config", "tiny",
         f"data.shards={tiny_shards}", f"train.run_dir={jepa}", "model.seq_len=64",
         "train.max_steps=2", "train.save_interval=2", "train.val_interval=0", "train.precision=fp32"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    dec_run = tmp_path / "dec"
    done = decoder_cli("train", str(encoder_export), "--shards", str(tiny_shards), "--out",
                       str(dec_run), *SMALL, "train.max_steps=2", "train.save_interval=2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = "The Congress met in December. It passed a law on taxes. The President signed it."
    args = ["predict", str(jepa), "--decoder", str(dec_run / "export"), "--text", text]
    said = decoder_cli(*args, "--hide", "2")
    assert said.returncode == 0, said.stderr[-3000:]
    lines = said.stdout.splitlines()
    assert [line.split()[0] for line in lines[-3:]] == ["prediction", "true", "copy-neighbour"]
    assert lines[-2].split(None, 1)[1] == "it passed a law on taxes."
    assert "(sentence 1)" in lines[-1]
    wrong = decoder_cli(*args, "--hide", "4")
    assert wrong.returncode == 2 and "--hide 4: the text has 3 sentences (1..3)" in wrong.stderr
    # over the validation windows: every masked sentence scored or counted, three decodings each
    out = tmp_path / "said"
    table = decoder_cli("predict", str(jepa), "--decoder", str(dec_run / "export"),
                        "--max-batches", "2", "--examples", "3", "--out", str(out))  # fmt: skip
    assert table.returncode == 0, table.stderr[-3000:]
    result = json.loads((out / "predict_eval.json").read_text())
    from lang_jepa.config import load_config as load
    from lang_jepa.eval.predictor import eval_batches

    batches = eval_batches(load(str(jepa / "config.yaml")), 2)
    masked = sum(int(b["tgt_sent_valid"].sum()) for b in batches)
    counted = result["sentences"]
    assert counted["scored"] > 0
    assert counted["scored"] + sum(v for k, v in counted.items() if k != "scored") == masked
    assert set(result["scores"]) == {"prediction", "copy_neighbour", "reconstruction"}
    assert result["scores"]["reconstruction"]["concept_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["scores"]["copy_neighbour"]["concept_cosine"] < 0.999
    assert all(0.0 <= s["token_f1"] <= 1.0 for s in result["scores"].values())
    assert all(-1.0 <= s["semantic_cosine"] <= 1.0 for s in result["scores"].values())
    assert result["semantic_chance"] < 1.0
    assert len(result["examples"]) == 3 and all(e["true"] for e in result["examples"])
    page = (out / "predict_examples.md").read_text()
    assert result["examples"][0]["true"] in page and "| method | token F1" in table.stdout
