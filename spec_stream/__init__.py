"""spec-stream: Speculative Streaming for GPT-Neo.

The model and its tree-draft generation live in `huggingface/` (patched `transformers`
modules at their upstream paths); this package re-exports what users and its own modules
need from there, and adds data, fine-tuning, engines and metrics. The method is described
in `docs/method.md`.
"""
from huggingface.transformers.generation.fixed_shape import FixedShapeDecoder
from huggingface.transformers.models.gpt_neo.modeling_gpt_neo import (
    GPTNeoConfig,
    GPTNeoForCausalLM,
    shifted_cross_entropy,
    speculative_streaming_loss,
)

__all__ = ["FixedShapeDecoder", "GPTNeoConfig", "GPTNeoForCausalLM", "shifted_cross_entropy",
           "speculative_streaming_loss"]
