"""Shared fixtures: tiny random GPT-Neo configs and the local dataset copies."""
import os
from pathlib import Path

import pytest
import torch
import transformers

from spec_stream import GPTNeoConfig, GPTNeoForCausalLM

# window_size (5) is far below the sequence lengths used, so local layers really mask.
TINY = dict(
    vocab_size=101, hidden_size=32, num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]],
    window_size=5, max_position_embeddings=96, bos_token_id=0, eos_token_id=0,
)


def tiny_config(**overrides) -> GPTNeoConfig:
    return GPTNeoConfig(**{**TINY, **overrides})


def tiny_model(seed=0, attn_implementation="eager", **overrides) -> GPTNeoForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    return GPTNeoForCausalLM(config).eval()


def upstream_twin(model) -> transformers.GPTNeoForCausalLM:
    """transformers' own GPT-Neo holding the same (main-stream) weights."""
    fields = {k: getattr(model.config, k) for k in TINY}
    upstream = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**fields)).eval()
    result = upstream.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys, result.missing_keys
    return upstream


@pytest.fixture(scope="session")
def data_dir() -> Path:
    candidates = [os.environ.get("SPEC_STREAM_DATA_DIR"), Path(__file__).resolve().parents[1].parent / "shared" / "datasets"]
    for candidate in candidates:
        if candidate and Path(candidate, "e2e_nlg").is_dir():
            return Path(candidate)
    pytest.skip("local datasets not found: set SPEC_STREAM_DATA_DIR to a folder laid out like shared/datasets")
