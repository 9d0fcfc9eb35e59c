"""Shards to batches: windows of whole sentences, pure-function masking, packing, resumable loaders.

Entry points for the trainer: :func:`build_train_loader` (endless, resumable via
``state_dict()`` / ``load_state_dict()``; packed batches by default) and :func:`build_val_loader`
(``train.val_batches`` deterministic batches per rank, one window per row). The batch contract is
documented in :func:`lang_jepa.data.masking.collate_arrays`.
"""

from lang_jepa.data.loader import TrainLoader, ValLoader, build_train_loader, build_val_loader
from lang_jepa.data.reader import check_tokenizer, manifest_vocab_size

__all__ = [
    "TrainLoader",
    "ValLoader",
    "build_train_loader",
    "build_val_loader",
    "check_tokenizer",
    "manifest_vocab_size",
]
