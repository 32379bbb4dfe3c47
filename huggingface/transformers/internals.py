"""The seam with the installed `transformers`: every name we use that is not its public
API, in one place, each checked before use.

Speculative streaming must mean what plain `generate` means by every argument, so it asks
upstream's own `generate` helpers (defaults, special tokens, lengths, processors, stopping
criteria) instead of copying them. Those helpers are private and may change in any
release. Each is listed in `PRIVATE_NAMES` with the parameters we pass; `private` fetches
it and raises `UpstreamChanged` naming the name, what changed and the installed version,
so an upstream change is a clear error rather than wrong output. `tests/test_internals.py`
checks every name against the installed release.

What differs between the supported releases and can be read from public API is read here
too: the name under which upstream passes and returns the cache (`CACHE_FIELD`:
``past_key_values`` up to 5.23, ``cache`` from 5.24).
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
import transformers
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

# what requirements.txt allows; both ends tested (.ci/run, .ci/oldest.txt)
SUPPORTED = "transformers>=5.23,<5.26"


class UpstreamChanged(RuntimeError):
    """The installed transformers lacks, or has changed, a name we rely on."""


def upstream_changed(what: str) -> UpstreamChanged:
    return UpstreamChanged(
        f"transformers {transformers.__version__}: {what}. spec-stream is tested with {SUPPORTED}; install a "
        f"release in that range (pip install -r requirements.txt)."
    )


# private name -> (owner, the parameters we pass it; None for a plain attribute)
PRIVATE_NAMES = {
    "_prepare_generation_config": (GenerationMixin, ("generation_config",)),
    "_prepare_special_tokens": (GenerationMixin, ("generation_config", "kwargs_has_attention_mask", "device",
                                                  "batch_size")),
    "_prepare_attention_mask_for_generation": (GenerationMixin, ("inputs_tensor", "generation_config",
                                                                 "model_kwargs")),
    "_prepare_generated_length": (GenerationMixin, ("generation_config", "has_default_max_length",
                                                    "has_default_min_length", "model_input_name",
                                                    "input_ids_length", "inputs_tensor")),
    "_validate_generated_length": (GenerationMixin, ("generation_config", "input_ids_length",
                                                     "has_default_max_length")),
    "_get_logits_processor": (GenerationMixin, ("generation_config", "input_ids_seq_length", "encoder_input_ids",
                                                "prefix_allowed_tokens_fn", "logits_processor", "device")),
    "_get_stopping_criteria": (GenerationMixin, ("generation_config", "stopping_criteria", "tokenizer")),
    "_get_default_generation_params": (GenerationConfig, ()),
    # attributes: which attention kernel a model runs, and whether a generation config
    # was derived from the model config (then `from_pretrained` rebuilds it, dropping our fields)
    "_attn_implementation": (PretrainedConfig, None),
    "_from_model_config": (GenerationConfig(), None),
}


def check_private(name: str) -> None:
    """An `UpstreamChanged` unless ``name`` exists on its owner and takes our parameters."""
    owner, parameters = PRIVATE_NAMES[name]
    if not hasattr(owner, name):
        raise upstream_changed(f"{getattr(owner, '__name__', type(owner).__name__)}.{name} no longer exists")
    member = getattr(owner, name)
    if parameters is not None:
        known = inspect.signature(member).parameters
        missing = [p for p in parameters if p not in known]
        if missing:
            raise upstream_changed(f"{owner.__name__}.{name} no longer takes {', '.join(missing)}")


def private(holder, name: str):
    """``holder.name`` (a model, or `GenerationConfig`), checked first (`check_private`)."""
    check_private(name)
    return getattr(holder, name)


def set_private(holder, name: str, value) -> None:
    """``holder.name = value``, the name checked first (`check_private`)."""
    check_private(name)
    setattr(holder, name, value)


def default_generation_params() -> dict:
    """The values upstream treats as a field's default (temperature 1.0, top_k 50, ...)."""
    return private(GenerationConfig, "_get_default_generation_params")()


def eos_token_ids(config: GenerationConfig) -> set[int]:
    """Every end-of-sequence id of ``config`` (an int, a list, a tensor or None)."""
    eos = config.eos_token_id
    if eos is None:
        return set()
    return set(torch.as_tensor(eos).flatten().tolist())


def pad_token_id(config: GenerationConfig) -> int | None:
    """The pad token plain `generate` pads with: ``pad_token_id``, else the first EOS."""
    if config.pad_token_id is not None:
        return int(torch.as_tensor(config.pad_token_id))
    eos = config.eos_token_id
    return None if eos is None else int(torch.as_tensor(eos).flatten()[0])


def _cache_field() -> str:
    """The cache's name in upstream's model outputs, which `generate` also passes it as."""
    names = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    raise upstream_changed("CausalLMOutputWithPast has neither a `cache` nor a `past_key_values` field")


CACHE_FIELD = _cache_field()
