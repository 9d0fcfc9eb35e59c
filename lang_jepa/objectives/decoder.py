"""``objective=decoder``: train a concept decoder on a frozen exported encoder.

The same loader, windows and masks as pretraining; each window's *target* sentences (the blocks
the mask samples, 2-4 runs of whole sentences) are the decoder's training sentences. Each sentence
is embedded **on its own** by the frozen encoder (positions 0..n-1, mean of its final token
features: what ``Encoder.encode(texts)`` returns for one sentence), and the decoder learns to write
its tokens from that embedding (:class:`~lang_jepa.models.decoder.ConceptDecoder`, token
cross-entropy). The encoder stays outside the DeepSpeed engine, in eval mode, without gradients;
only the decoder is trained, checkpointed and resumed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config, ConfigError
from ..models.decoder import ConceptDecoder, sentence_rows, teacher_forcing
from ..models.layers import matmul_params
from .base import Batch, Outputs, Runtime, autocast_context, move_batch, parameter_count


def special_ids(tokenizer_dir: str | Path) -> tuple[int, int]:
    """(BOS, EOS): the tokenizer's [CLS] / [SEP] (BERT) or BOS / EOS tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if bos is None or eos is None:
        raise ConfigError(
            f"config key 'decoder.encoder': the tokenizer in {tokenizer_dir} has no CLS/BOS and "
            "SEP/EOS tokens for the decoder to start and stop with"
        )
    return int(bos), int(eos)


def load_frozen_encoder(cfg: Config, device: torch.device) -> Any:
    """The export named by ``decoder.encoder``, checked against the shards (tokenizer, vocab)."""
    from ..data.reader import check_tokenizer, manifest_vocab_size
    from ..encoder_api import TOKENIZER_DIR, Encoder

    root = Path(cfg.decoder.encoder)
    try:
        enc = Encoder.from_pretrained(root, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config key 'decoder.encoder': {err}") from err
    if enc.tokenizer is None:
        raise ConfigError(
            f"config key 'decoder.encoder': {root} has no {TOKENIZER_DIR}/ directory; the decoder "
            "writes text with the encoder's tokenizer (re-export with python -m lang_jepa.export)"
        )
    try:
        check_tokenizer(cfg.data.shards, str(root / TOKENIZER_DIR))
    except ValueError as err:
        raise ConfigError(f"config key 'decoder.encoder': {root}: {err}") from err
    vocab = manifest_vocab_size(cfg.data.shards)
    if int(enc.config["model"]["vocab_size"]) != vocab:
        raise ConfigError(
            f"config key 'decoder.encoder': {root} has a vocabulary of "
            f"{enc.config['model']['vocab_size']}, the shards in {cfg.data.shards} {vocab}"
        )
    for p in enc.model.parameters():
        p.requires_grad_(False)
    return enc


def build_decoder_for(cfg: Config, concept_dim: int, vocab_size: int) -> ConceptDecoder:
    d = cfg.decoder
    return ConceptDecoder(
        concept_dim, vocab_size, d.dim, d.depth, d.heads, d.mlp_ratio, d.prefix,
        d.max_tokens + 1, cfg.model.norm_eps, cfg.model.rope_theta, cfg.model.init_std,
    )  # fmt: skip


@torch.no_grad()
def embed_rows(encoder: Any, ids: Tensor, lengths: Tensor) -> Tensor:
    """Each row a sentence on its own (positions 0..n-1): the mean of its final features [N, D]."""
    n, lmax = ids.shape
    valid = torch.arange(lmax, device=ids.device)[None] < lengths[:, None]
    positions = torch.arange(lmax, device=ids.device)[None].expand(n, -1)
    feats = encoder(ids, positions, valid).float()
    return (feats * valid[..., None]).sum(1) / lengths[:, None].clamp(min=1)


def decoder_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


class DecoderObjective:
    """``objective=decoder``: token cross-entropy of a prefix-conditioned causal decoder."""

    name: ClassVar[str] = "decoder"
    target = None

    def __init__(self, cfg: Config, vocab_size: int, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        self.frozen = load_frozen_encoder(cfg, rt.device)
        self.encoder_seq_len = self.frozen.seq_len
        self.bos, self.eos = special_ids(Path(cfg.decoder.encoder) / "tokenizer")
        self.module = build_decoder_for(cfg, self.frozen.dim, vocab_size)
        self.truncated = 0

    def prepare(self, batch: dict[str, Any], split: str, key: tuple[int, ...]) -> Batch:
        ids, lengths, truncated = sentence_rows(
            batch["input_ids"], batch["tgt_index"], batch["tgt_sent"], batch["tgt_valid"],
            min(self.cfg.decoder.max_tokens, self.encoder_seq_len),
        )  # fmt: skip
        if split == "train":
            self.truncated += truncated
        out = {"sent_ids": ids, "sent_lengths": lengths, "doc_index": batch["doc_index"]}
        out.update(teacher_forcing(ids, lengths, self.bos, self.eos))
        out["valid"] = out["dec_valid"]  # the tokens a step trains on (throughput, tokens seen)
        return move_batch(out, self.rt.device)

    def loss(self, eng: Any, batch: Batch) -> tuple[Tensor, Outputs]:
        # the frozen encoder embeds each sentence on its own
        with self.rt.phase("targets"), autocast_context(self.rt.device, self.rt.autocast):
            concept = embed_rows(self.frozen.model, batch["sent_ids"], batch["sent_lengths"])
        with self.rt.phase("forward"):
            logits = eng(concept, batch["dec_input_ids"], batch["dec_valid"])
        with self.rt.phase("loss"):
            loss = decoder_loss(logits, batch["dec_labels"])
        return loss, Outputs(parts={"decoder_loss": loss.detach()})

    def flops(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Decoder forward + backward (6 x matmul params x tokens, head included) plus the frozen
        encoder's forward (2 x its matmul params x tokens); attention scores left out."""
        m = self.module
        dec = matmul_params(m.dim, m.depth, m.mlp_ratio) + m.dim * m.vocab_size
        enc = self.frozen.model
        tokens = batch["dec_valid"].sum().float() + m.prefix * batch["dec_valid"].shape[0]
        flops = 6.0 * dec * tokens + 2.0 * matmul_params(enc.dim, enc.depth, enc.mlp_ratio) * (
            batch["sent_lengths"].sum().float()
        )
        return flops, flops

    def after_step(self, eng: Any, step: int) -> None:
        return None

    def monitor(self, outputs: Outputs) -> dict[str, Tensor | float]:
        # training sentences cut to decoder.max_tokens by this process since it started
        return {"data/decoder_truncated_sentences": float(self.truncated)}

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        return {}  # python -m lang_jepa.decoder eval scores reconstructions

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing per rank beyond the engine

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def summary(self) -> str:
        return (
            f"decoder {parameter_count(self.module) / 1e6:.1f}M params on the frozen encoder "
            f"{self.cfg.decoder.encoder} ({parameter_count(self.frozen.model) / 1e6:.1f}M, "
            f"dim {self.frozen.dim})"
        )
