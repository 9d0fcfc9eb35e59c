"""From concepts back to words: a concept decoder trained on a frozen encoder's sentence
embeddings (``objective=decoder``), ``Decoder.from_pretrained(DIR).generate(embeddings)`` and
``reconstruct(texts)``, and ``python -m lang_jepa.decoder train | export | eval``."""

from .api import Decoder, DecoderError, export_decoder

__all__ = ["Decoder", "DecoderError", "export_decoder"]
