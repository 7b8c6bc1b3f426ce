"""Small transformers for the training harness, with the attention chosen by name."""

from globalattn.models.attention import BASE_NAMES, keys_per_token, make_attention
from globalattn.models.transformer import DecoderLM, EncoderClassifier, ModelConfig, build_model, use_context_parallel

__all__ = [
    "BASE_NAMES",
    "DecoderLM",
    "EncoderClassifier",
    "ModelConfig",
    "build_model",
    "keys_per_token",
    "make_attention",
    "use_context_parallel",
]
