"""The concept decoder: batch construction, scores, deterministic generation, overfitting a
sentence, and clear errors for bad inputs (real tokenizer, real shards, no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lang_jepa.config import ConfigError, load_config
from lang_jepa.decoder import Decoder, DecoderError
from lang_jepa.decoder.metrics import reconstruction_scores, token_f1
from lang_jepa.encoder_api import TOKENIZER_DIR, Encoder
from lang_jepa.export import export_random_init
from lang_jepa.models import encoder_config
from lang_jepa.models.decoder import ConceptDecoder, sentence_rows, teacher_forcing
from lang_jepa.objectives.decoder import decoder_loss, embed_rows, load_frozen_encoder

TINY = {"seq_len": 64, "dim": 32, "depth": 2, "heads": 2}


@pytest.fixture(scope="module")
def export_dir(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("tiny", [f"data.shards={tiny_shards}", "model.seq_len=64"])
    model_cfg = encoder_config(cfg.model, 30522)
    out = tmp_path_factory.mktemp("enc_export")
    return export_random_init(model_cfg, 30522, tiny_shards / TOKENIZER_DIR, out, seed=0)


def make_decoder(export_dir: Path, seed: int = 0, max_len: int = 33) -> Decoder:
    torch.manual_seed(seed)
    enc = Encoder.from_pretrained(export_dir, device="cpu")
    model = ConceptDecoder(enc.dim, 30522, dim=64, depth=2, heads=2, prefix=2, max_len=max_len)
    return Decoder(model, enc, {"bos": 101, "eos": 102, "source": {}}, torch.device("cpu"))


def test_sentence_rows_and_teacher_forcing_known_answer() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0]])
    tgt_index = torch.tensor([[1, 2, 4, 5, 6, 0]])
    tgt_sent = torch.tensor([[0, 0, 1, 1, 1, 0]])
    tgt_valid = torch.tensor([[True, True, True, True, True, False]])
    rows, lengths, truncated = sentence_rows(ids, tgt_index, tgt_sent, tgt_valid, max_tokens=2)
    assert rows.tolist() == [[6, 7], [9, 10]] and lengths.tolist() == [2, 2] and truncated == 1
    rows, lengths, truncated = sentence_rows(ids, tgt_index, tgt_sent, tgt_valid, max_tokens=8)
    assert rows.tolist() == [[6, 7, 0], [9, 10, 11]] and lengths.tolist() == [2, 3]
    tf = teacher_forcing(rows, lengths, bos=101, eos=102)
    assert tf["dec_input_ids"].tolist() == [[101, 6, 7, 0], [101, 9, 10, 11]]
    assert tf["dec_labels"].tolist() == [[6, 7, 102, -100], [9, 10, 11, 102]]
    assert tf["dec_valid"].tolist() == [[True, True, True, False], [True, True, True, True]]


def test_scores_known_answers() -> None:
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([4], [1, 2]) == 0.0
    assert token_f1([1, 1, 2], [1, 2, 3, 4]) == pytest.approx(
        2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    )
    same = reconstruction_scores(
        [[1, 2]], [[1, 2]], ["the cat sat on the mat"], ["the cat sat on the mat"]
    )
    assert (
        same["token_f1"] == 1.0
        and same["exact_match"] == 1.0
        and same["bleu"] == pytest.approx(100)
    )
    off = reconstruction_scores([[3]], [[1, 2]], ["a dog"], ["the cat sat"])
    assert off["exact_match"] == 0.0 and off["bleu"] < 1 and off["chrf"] < 20


def test_the_semantic_judge_scores_meaning_not_word_overlap() -> None:
    """all-MiniLM-L6-v2 (offline copy): the original itself scores 1, a paraphrase with few
    shared words scores above a sentence that shares most words but says another thing, and
    unrelated sentences score the chance level."""
    from lang_jepa.decoder.metrics import SemanticJudge

    judge = SemanticJudge()
    gold_text = ["the president signed the tax bill into law.",
                 "the army crossed the river at dawn.",
                 "prices of wheat fell sharply this year.",
                 "the navy built three new ships."]  # fmt: skip
    gold = judge.embed(gold_text)
    assert judge.cosine(gold_text, gold) == pytest.approx(1.0, abs=1e-5)
    paraphrase = ["the chief executive approved the new taxation act."]
    same_words = ["the president signed the tax bill of the football club into a song."]
    assert judge.cosine(paraphrase, gold[:1]) > judge.cosine(same_words, gold[:1])
    assert token_f1(paraphrase[0].split(), gold_text[0].split()) < token_f1(
        same_words[0].split(), gold_text[0].split()
    )  # word overlap ranks them the other way
    chance = judge.chance(gold)
    assert chance < 0.4 < judge.cosine(paraphrase, gold[:1])
    assert judge.chance(gold[:1]) is None
    with pytest.raises(ValueError, match="2 texts against 1 originals"):
        judge.cosine(gold_text[:2], gold[:1])


def test_reports_render_without_the_semantic_judge() -> None:
    """--no-semantic: the tables show a dash and no chance note."""
    from lang_jepa.decoder.__main__ import markdown
    from lang_jepa.decoder.predict import predict_markdown

    row = {"sentences": 2, "token_f1": 0.5, "exact_match": 0.0, "bleu": 1.0, "chrf": 10.0,
           "cycle_cosine": 0.3}  # fmt: skip
    result = {"decoder": "d", "step": 1, "split": "val", "strategy": "greedy", "scores": row,
              "retrieval_scores": {**row, "pool": 5}, "semantic_chance": None, "examples": []}  # fmt: skip
    table, _ = markdown(result)
    assert "| decoder | 0.500 | 0.000 | 1.0 | 10.0 | 0.300 | — |" in table
    assert "unrelated" not in table
    table, _ = markdown({**result, "scores": {**row, "semantic_cosine": 0.25},
                         "semantic_chance": 0.1})  # fmt: skip
    assert "| 0.300 | 0.250 |" in table and "score 0.100" in table
    said = {"run": "r", "run_step": 1, "decoder": "d", "strategy": "greedy",
            "sentences": {"scored": 2}, "scores": {"prediction": {**row, "concept_cosine": 0.2}},
            "semantic_chance": None, "examples": []}  # fmt: skip
    table, _ = predict_markdown(said)
    assert "| prediction | 0.500 | 0.000 | 1.0 | 10.0 | 0.300 | 0.200 | — |" in table
    assert "unrelated" not in table


def test_causal_prefix_decoder_ignores_later_tokens(export_dir: Path) -> None:
    dec = make_decoder(export_dir)
    concept = torch.randn(2, dec.model.concept_dim)
    a = torch.tensor([[101, 5, 6, 7], [101, 8, 9, 10]])
    b = a.clone()
    b[:, 3] = 999
    valid = torch.ones_like(a, dtype=torch.bool)
    with torch.no_grad():
        la, lb = dec.model(concept, a, valid), dec.model(concept, b, valid)
        other = dec.model(torch.randn(2, dec.model.concept_dim), a, valid)
    assert torch.equal(la[:, :3], lb[:, :3])  # position t sees tokens <= t only
    assert not torch.allclose(la, other)  # and the concept (through the prefix)


def test_greedy_generation_is_deterministic_and_top_p_is_seeded(export_dir: Path) -> None:
    dec = make_decoder(export_dir)
    emb = dec.encoder.encode(["the congress met today.", "war was declared."])
    first = dec.generate_ids(emb, max_new_tokens=8)
    assert first == dec.generate_ids(emb, max_new_tokens=8)
    assert first == dec.generate_ids(
        emb, max_new_tokens=8, batch_size=1
    )  # batching changes nothing
    assert all(len(r) <= 8 for r in first)
    s1 = dec.generate_ids(emb, 8, strategy="top_p", top_p=0.95, seed=3)
    assert s1 == dec.generate_ids(emb, 8, strategy="top_p", top_p=0.95, seed=3)


def test_decoder_reproduces_an_overfit_sentence(export_dir: Path) -> None:
    dec = make_decoder(export_dir)
    texts = ["the senate passed the bill.", "our navy is strong and ready.",
             "taxes must fall next year.", "peace was made with spain."]  # fmt: skip
    ids = dec.encoder.tokenize_sentences(texts)
    lengths = torch.tensor([len(i) for i in ids])
    rows = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for r, i in enumerate(ids):
        rows[r, : len(i)] = torch.tensor(i)
    concept = embed_rows(dec.encoder.model, rows, lengths)
    torch.testing.assert_close(concept, dec.encoder.encode(texts), atol=1e-5, rtol=1e-5)
    batch = teacher_forcing(rows, lengths, dec.bos, dec.eos)
    opt = torch.optim.AdamW(dec.model.parameters(), lr=3e-3)
    dec.model.train()
    for _ in range(150):
        logits = dec.model(concept, batch["dec_input_ids"], batch["dec_valid"])
        loss = decoder_loss(logits, batch["dec_labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.model.eval()
    assert float(loss.detach()) < 0.05
    assert dec.generate_ids(concept) == ids
    assert dec.reconstruct(texts) == dec.decode(ids)


def test_bad_inputs_get_clear_errors(export_dir: Path, tiny_shards: Path, tmp_path: Path) -> None:
    dec = make_decoder(export_dir)
    with pytest.raises(ValueError, match=r"texts\[1\].*no token"):
        dec.reconstruct(["fine.", "   "])
    with pytest.raises(
        DecoderError, match=r"texts\[0\] has \d+ tokens, more than the encoder's window of 64"
    ):
        dec.reconstruct(["word " * 100])
    with pytest.raises(DecoderError, match=r"embeddings must be \[N, 64\]"):
        dec.generate(torch.zeros(2, 7))
    with pytest.raises(DecoderError, match="max_new_tokens"):
        dec.generate(torch.zeros(1, 64), max_new_tokens=0)
    with pytest.raises(FileNotFoundError, match="not a LANG-JEPA decoder export"):
        Decoder.from_pretrained(tmp_path)
    # an encoder export without its tokenizer cannot train a decoder: the key and the dir are named
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        (bare / name).write_bytes((export_dir / name).read_bytes())
    cfg = load_config("decoder", [f"data.shards={tiny_shards}", f"decoder.encoder={bare}"])
    with pytest.raises(ConfigError, match=r"decoder\.encoder.*bare has no tokenizer/"):
        load_frozen_encoder(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="decoder.encoder"):
        load_config("decoder", [f"data.shards={tiny_shards}", "objective=decoder"])
