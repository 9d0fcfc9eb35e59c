"""Hugging Face configuration of a LANG-JEPA text encoder (shipped inside every ``--format hf``
export; it imports only ``transformers``)."""

from transformers import PretrainedConfig


class LangJepaConfig(PretrainedConfig):
    """The encoder's architecture: a pre-LN transformer over token ids (rotary or learned
    positions), its final token features mean-pooled per sentence."""

    model_type = "lang_jepa"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        max_position_embeddings: int = 512,
        position_embedding: str = "rope",
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-6,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)
