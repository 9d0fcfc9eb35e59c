"""``Encoder.encode`` of a text without any token: an error naming its index by default, an
all-zero row (left zero by ``normalize`` and ``layer_norm``) with ``empty="zero"``."""

from __future__ import annotations

import pytest
import torch

from lang_jepa.encoder_api import TOKENIZER_DIR
from lang_jepa.eval.loading import random_encoder


@pytest.fixture(scope="module")
def encoder(tiny_shards):
    from lang_jepa.config import load_config

    model = load_config("tiny", ["model.depth=1"]).model
    return random_encoder(model, 30522, tiny_shards / TOKENIZER_DIR, seed=0)


def test_empty_and_whitespace_texts_are_refused_by_index(encoder):
    with pytest.raises(ValueError, match=r"texts\[1, 3\]: no token to embed"):
        encoder.encode(["A sentence.", "", "Another one.", " \n\t "])
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        encoder.encode("", level="document")


@pytest.mark.parametrize("level", ["sentence", "document"])
def test_empty_zero_gives_zero_rows_and_leaves_the_others_alone(encoder, level):
    texts = ["A sentence.", "   ", "Another one."]
    got = encoder.encode(texts, level=level, empty="zero", normalize=True, layer_norm=True)
    want = encoder.encode([texts[0], texts[2]], level=level, normalize=True, layer_norm=True)
    assert torch.equal(got[1], torch.zeros(encoder.dim))
    torch.testing.assert_close(got[[0, 2]], want)
    assert torch.allclose(got[[0, 2]].norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="empty must be 'error' or 'zero'"):
        encoder.encode(texts, empty="skip")
