"""spec-stream: Speculative Streaming for GPT-Neo.

The model and its tree-draft generation live in `huggingface/` (patched `transformers`
modules at their upstream paths); this package re-exports what users and its own modules
need from there, and adds data, fine-tuning, engines and metrics. The method is described
in `docs/method.md`.

Importing it registers the model with transformers' Auto classes: ``AutoConfig``,
``AutoModelForCausalLM.from_pretrained(folder)`` and ``pipeline("text-generation",
model=folder)`` then build this GPT-Neo, streams included, for any checkpoint whose
config says ``"model_type": "gpt_neo"`` (a checkpoint without streams loads as plain
GPT-Neo, bit for bit). The saved model_type stays ``gpt_neo``, so upstream
``transformers.GPTNeoForCausalLM`` still loads the same folder (without the streams).
"""
import importlib

from transformers import AutoConfig, AutoModelForCausalLM

from huggingface.transformers.generation.fixed_shape import FixedShapeDecoder
from huggingface.transformers.models.gpt_neo.modeling_gpt_neo import (
    GPTNeoConfig,
    GPTNeoForCausalLM,
    shifted_cross_entropy,
)

# Upstream's GPT-Neo module builds its docstrings from the config registered for "gpt_neo":
# import it while that is still upstream's (else it logs errors about ours).
importlib.import_module("transformers.models.gpt_neo.modeling_gpt_neo")
AutoConfig.register(GPTNeoConfig.model_type, GPTNeoConfig, exist_ok=True)
AutoModelForCausalLM.register(GPTNeoConfig, GPTNeoForCausalLM, exist_ok=True)

__all__ = ["FixedShapeDecoder", "GPTNeoConfig", "GPTNeoForCausalLM", "shifted_cross_entropy"]
