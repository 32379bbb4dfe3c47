"""spec-stream: Speculative Streaming for GPT-Neo.

The model and its tree-draft generation live in `huggingface/` (patched `transformers`
modules at their upstream paths); this package re-exports them and adds data, fine-tuning,
engines and metrics.
"""
from huggingface.transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoConfig, GPTNeoForCausalLM

__all__ = ["GPTNeoConfig", "GPTNeoForCausalLM"]
