"""Use a trained concept decoder: ``Decoder.from_pretrained(DIR).generate(embeddings)``.

A decoder export directory holds

    DIR/decoder.safetensors   ConceptDecoder state_dict, fp32
    DIR/config.json           {"format", "decoder": its architecture, "bos", "eos", "source"}
    DIR/encoder/              a copy of the encoder export it was trained on (weights, tokenizer)

so ``Decoder.from_pretrained(DIR).reconstruct(texts)`` (encode with that encoder, then write) needs
nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .. import checkpoint
from ..encoder_api import Encoder
from ..models.decoder import ConceptDecoder, build_decoder

log = logging.getLogger(__name__)

FORMAT = "lang-jepa-decoder/1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "decoder.safetensors"
ENCODER_DIR = "encoder"


class DecoderError(ValueError):
    """A bad decoder export or input (the message names the file or argument)."""


def export_decoder(run: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Write a decoder export from an ``objective=decoder`` run's checkpoint; returns ``out``."""
    from safetensors.torch import save_file

    from ..objectives.decoder import special_ids

    ckpt_dir, tag = checkpoint.locate(run, tag)
    meta = checkpoint.read_meta(ckpt_dir, tag)
    cfg = meta["config"]
    if cfg.get("objective") != "decoder":
        raise DecoderError(
            f"{ckpt_dir / tag}: objective {cfg.get('objective')!r}, not a decoder run "
            "(train one with python -m lang_jepa.decoder train)"
        )
    state = checkpoint.consolidated_state(ckpt_dir, tag)
    enc_dir = Path(cfg["decoder"]["encoder"])
    enc_cfg = json.loads((enc_dir / "config.json").read_text())
    d = cfg["decoder"]
    model = ConceptDecoder(
        int(enc_cfg["model"]["dim"]), state["tok_emb.weight"].shape[0], d["dim"], d["depth"],
        d["heads"], d["mlp_ratio"], d["prefix"], d["max_tokens"] + 1, cfg["model"]["norm_eps"],
        cfg["model"]["rope_theta"],
    )  # fmt: skip
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DecoderError(
            f"{ckpt_dir / tag}: weights do not match the decoder config: {err}"
        ) from err
    bos, eos = special_ids(enc_dir / "tokenizer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": FORMAT})  # fmt: skip
    shutil.rmtree(out / ENCODER_DIR, ignore_errors=True)
    shutil.copytree(enc_dir, out / ENCODER_DIR)
    config = {
        "format": FORMAT,
        "decoder": model.config(),
        "bos": bos,
        "eos": eos,
        "conditioning": "prefix: the layer-normed sentence embedding projected to `prefix` vectors "
                        "before [BOS] t_1..t_n, causal self-attention over prefix and tokens",
        "source": {"run_dir": str(ckpt_dir.parent.resolve()), "tag": tag, "step": int(meta["step"]),
                   "encoder": str(enc_dir.resolve())},
    }  # fmt: skip
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    log.info("exported the decoder of %s (step %d) to %s", ckpt_dir / tag, meta["step"], out)
    return out


class Decoder:
    """A trained concept decoder with the encoder it reads (``.encoder``, a
    :class:`lang_jepa.Encoder`). Build with :meth:`from_pretrained`."""

    def __init__(self, model: ConceptDecoder, encoder: Encoder, config: dict[str, Any],
                 device: torch.device) -> None:  # fmt: skip
        self.model = model.to(device).eval()
        self.encoder = encoder
        self.config = config
        self.device = device
        self.bos, self.eos = int(config["bos"]), int(config["eos"])

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> Decoder:
        from safetensors.torch import load_file

        root = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME, ENCODER_DIR):
            if not (root / name).exists():
                raise FileNotFoundError(
                    f"{root / name} not found: not a LANG-JEPA decoder export (write one with "
                    "python -m lang_jepa.decoder export RUN_DIR --out DIR)"
                )
        config = json.loads((root / CONFIG_NAME).read_text())
        if config.get("format") != FORMAT:
            raise DecoderError(
                f"{root / CONFIG_NAME}: format {config.get('format')!r}, expected {FORMAT!r}"
            )
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )  # fmt: skip
        encoder = Encoder.from_pretrained(root / ENCODER_DIR, device=dev)
        if encoder.tokenizer is None:
            raise DecoderError(f"{root / ENCODER_DIR}: the encoder export has no tokenizer/")
        model = build_decoder(config["decoder"])
        model.load_state_dict(load_file(str(root / WEIGHTS_NAME)), strict=True)
        return cls(model, encoder, config, dev)

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_len) - 1

    @torch.no_grad()
    def generate_ids(self, embeddings: Tensor | np.ndarray, max_new_tokens: int | None = None,
                     strategy: Literal["greedy", "top_p"] = "greedy", top_p: float = 0.9,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[list[int]]:  # fmt: skip
        """Token ids (without BOS/EOS) written from each embedding [N, D]."""
        emb = torch.as_tensor(
            np.asarray(embeddings) if not isinstance(embeddings, Tensor) else embeddings
        )
        if emb.dim() != 2 or emb.shape[1] != self.model.concept_dim:
            raise DecoderError(
                f"embeddings must be [N, {self.model.concept_dim}] (the encoder's width), "
                f"got {list(emb.shape)}"
            )
        if strategy not in ("greedy", "top_p"):
            raise DecoderError(f"strategy must be 'greedy' or 'top_p', got {strategy!r}")
        if not 0.0 < top_p <= 1.0 or temperature <= 0:
            raise DecoderError(
                f"need 0 < top_p <= 1 and temperature > 0, got {top_p}, {temperature}"
            )
        limit = self.max_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= limit <= self.max_tokens + 1:
            raise DecoderError(f"max_new_tokens must be in [1, {self.max_tokens + 1}], got {limit}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out: list[list[int]] = []
        for start in range(0, emb.shape[0], batch_size):
            concept = emb[start : start + batch_size].float().to(self.device)
            n = concept.shape[0]
            ids = torch.full((n, 1), self.bos, dtype=torch.long, device=self.device)
            done = torch.zeros(n, dtype=torch.bool, device=self.device)
            for _ in range(limit):
                logits = self.model(concept, ids, torch.ones_like(ids, dtype=torch.bool))[
                    :, -1
                ].float()
                if strategy == "greedy":
                    nxt = logits.argmax(-1)
                else:
                    nxt = sample_top_p(logits / temperature, top_p, gen).to(self.device)
                nxt = torch.where(done, self.eos, nxt)
                ids = torch.cat((ids, nxt[:, None]), dim=1)
                done |= nxt == self.eos
                if bool(done.all()):
                    break
            for row in ids[:, 1:].tolist():
                out.append(row[: row.index(self.eos)] if self.eos in row else row)
        return out

    def generate(self, embeddings: Tensor | np.ndarray, max_new_tokens: int | None = None,
                 strategy: Literal["greedy", "top_p"] = "greedy", top_p: float = 0.9,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[str]:  # fmt: skip
        """The text written from each embedding [N, D] (greedy: deterministic)."""
        ids = self.generate_ids(
            embeddings, max_new_tokens, strategy, top_p, temperature, seed, batch_size
        )
        return self.decode(ids)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.encoder.tokenizer.decode_batch([list(i) for i in ids], skip_special_tokens=True)

    def reconstruct(self, texts: str | Sequence[str], **kwargs: Any) -> list[str]:
        """Each text embedded as one sentence by the encoder, then written back (``generate``'s
        keyword arguments). Empty texts are refused, naming their index; a text longer than the
        encoder's window is refused, naming its index and length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        lengths = [len(ids) for ids in self.encoder.tokenize_sentences(texts)]
        long = [i for i, n in enumerate(lengths) if n > self.encoder.seq_len]
        if long:
            raise DecoderError(
                f"texts[{long[0]}] has {lengths[long[0]]} tokens, more than the encoder's window of "
                f"{self.encoder.seq_len}: reconstruct takes one sentence per text"
            )
        return self.generate(self.encoder.encode(texts), **kwargs)


def sample_top_p(logits: Tensor, top_p: float, gen: torch.Generator) -> Tensor:
    """Nucleus sampling: one id per row from the smallest set of tokens with mass >= top_p."""
    probs = torch.softmax(logits.cpu(), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the first token always stays
    sorted_p = torch.where(keep, sorted_p, 0.0)
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return order.gather(1, pick).squeeze(1)
