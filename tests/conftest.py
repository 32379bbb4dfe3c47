"""Shared fixtures: tiny random GPT-Neo configs and the local dataset copies."""
import os
from pathlib import Path

import pytest
import torch
import transformers

from huggingface.transformers.models.gpt_neo.modeling_gpt_neo import shifted_cross_entropy
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


PHRASES = torch.randint(2, TINY["vocab_size"], (10, 6), generator=torch.Generator().manual_seed(1))


def phrase_text(count, length, generator):
    """The training domain: random sequences of 10 fixed 6-token phrases."""
    choice = torch.randint(0, len(PHRASES), (count, -(-length // 6)), generator=generator)
    return PHRASES[choice].reshape(count, -1)[:, :length]


@pytest.fixture(scope="session")
def trained_model():
    """A tiny model briefly fine-tuned with the Speculative Streaming loss (plus the
    pruning adapter's early-exit loss), so its streams are right often on its domain."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, hidden_size=64, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(2)
    for _ in range(160):
        ids = phrase_text(16, 48, generator)
        out = model(ids, labels=ids, early_exit=True)
        loss = out.loss + 0.1 * shifted_cross_entropy(out.early_exit_logits, ids, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    candidates = [os.environ.get("SPEC_STREAM_DATA_DIR"), Path(__file__).resolve().parents[1].parent / "shared" / "datasets"]
    for candidate in candidates:
        if candidate and Path(candidate, "e2e_nlg").is_dir():
            return Path(candidate)
    pytest.skip("local datasets not found: set SPEC_STREAM_DATA_DIR to a folder laid out like shared/datasets")
