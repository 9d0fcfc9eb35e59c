"""The sentence splitter: blingfire's, shared by preprocessing and :class:`lang_jepa.Encoder`.

Shards and the Encoder API must cut a text into exactly the same sentences, so both call
:func:`split_sentences`. It calls blingfire's own ``TextToSentencesWithOffsets`` (the function
behind ``blingfire.text_to_sentences_and_offsets``) through the ctypes handle blingfire exposes,
and maps its byte offsets to text with slicing instead of blingfire's per-byte Python loop: the
sentences are identical (a test checks it on the whole demo corpus) and splitting runs ~5x faster,
which is what keeps preprocessing within a few percent of the tokenizer's own speed.

Light on purpose (ctypes, numpy, blingfire): preprocessing's worker processes import it.
"""

from __future__ import annotations

import ctypes

import blingfire
import numpy as np

# Texts longer than this are cut (at a newline or space where there is one) before blingfire sees
# them, so a 10 MB line without punctuation costs linear time and bounded buffers.
PRESPLIT_CHARS = 1 << 20


def _presplit(text: str, limit: int = PRESPLIT_CHARS) -> list[str]:
    """Cut a very long text into pieces of at most ``limit`` chars, at a newline or space if any."""
    pieces, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = -1
        for sep in ("\n", ". ", " "):
            cut = text.rfind(sep, start + limit // 2, end)
            if cut >= 0:
                cut += len(sep)
                break
        cut = end if cut < 0 else cut
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _split_segment(text: str) -> list[str]:
    data = text.encode("utf-8")
    cap = 2 * len(data) + 16
    out = ctypes.create_string_buffer(cap)
    starts = np.empty(cap, dtype=np.int32)
    ends = np.empty(cap, dtype=np.int32)
    n_out = blingfire.blingfire.TextToSentencesWithOffsets(
        ctypes.c_char_p(data),
        ctypes.c_int(len(data)),
        ctypes.byref(out),
        starts.ctypes.data_as(ctypes.c_void_p),
        ends.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int(cap),
    )
    if n_out <= 0 or n_out > cap:
        return [text] if text.strip() else []
    count = out.value.count(b"\n") + 1
    try:
        # blingfire's end offsets are inclusive (the last byte of the sentence).
        return [
            data[a : e + 1].decode("utf-8")
            for a, e in zip(starts[:count].tolist(), ends[:count].tolist(), strict=True)
        ]
    except UnicodeDecodeError:  # an offset inside a character: use blingfire's slow mapping
        _, spans = blingfire.text_to_sentences_and_offsets(text)
        return [text[a:b] for a, b in spans]


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` as blingfire finds them (whitespace between sentences dropped).

    A sentence may hold no token once tokenized (e.g. only whitespace): preprocessing and the
    Encoder API both drop such sentences after tokenizing.
    """
    if len(text) <= PRESPLIT_CHARS:
        return _split_segment(text)
    return [s for piece in _presplit(text) for s in _split_segment(piece)]
