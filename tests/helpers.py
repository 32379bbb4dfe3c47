"""Helpers shared by the tests: tiny random GPT-Neo models, their upstream twins, and the
phrase domain the session's fine-tuned tiny model learns."""
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


PHRASES = torch.randint(2, TINY["vocab_size"], (10, 6), generator=torch.Generator().manual_seed(1))


def phrase_text(count, length, generator):
    """The training domain: random sequences of 10 fixed 6-token phrases."""
    choice = torch.randint(0, len(PHRASES), (count, -(-length // 6)), generator=generator)
    return PHRASES[choice].reshape(count, -1)[:, :length]
