"""The streams' own adapters: they change the stream rows, never the main stream."""
import torch
import transformers

from spec_stream import GPTNeoForCausalLM
from tests.helpers import TINY, tiny_model, upstream_twin

SEQ = 24


def with_random_adapters(seed=0, **overrides):
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, stream_adapter_rank=4, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters." in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def test_fresh_adapters_change_nothing_and_trained_ones_only_the_streams():
    ids = torch.randint(1, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    plain = tiny_model(num_spec_streams=3, num_stream_layers=2)
    fresh = tiny_model(num_spec_streams=3, num_stream_layers=2, stream_adapter_rank=4)
    adapted = with_random_adapters()
    for model in (fresh, adapted):  # the plain model's weights; adapters as they are (fresh: up = 0)
        assert not model.load_state_dict(plain.state_dict(), strict=False).unexpected_keys
    assert any(".adapters." in name for name, _ in fresh.named_parameters())
    with torch.no_grad():
        a, b, c = (m(ids, stream_positions="all") for m in (plain, fresh, adapted))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.stream_logits, b.stream_logits)
    assert torch.equal(a.logits, c.logits)  # bit for bit: the main rows never see an adapter
    assert (a.stream_logits - c.stream_logits).abs().max() > 1e-2


def test_decoding_with_adapters_is_greedy_decoding_of_the_base():
    model = with_random_adapters(seed=2)
    upstream = upstream_twin(model)
    for seed in range(10):
        ids = torch.randint(1, TINY["vocab_size"], (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        out = model.generate(ids, speculative_streaming=True, tree_widths=(4, 3, 2), max_new_tokens=20,
                             eos_token_id=None)
        assert torch.equal(out, upstream.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=None,
                                                  pad_token_id=0))


def test_adapters_save_load_and_upstream_ignores_them(tmp_path):
    model = with_random_adapters(seed=3)
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(4))
    model.save_pretrained(tmp_path)
    loaded = GPTNeoForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    upstream = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        expected, again = model(ids, stream_positions="all"), loaded(ids, stream_positions="all")
        assert torch.equal(expected.stream_logits, again.stream_logits)
        assert (upstream(ids).logits - expected.logits).abs().max() <= 1e-4


def test_adapters_added_to_a_trained_model_start_as_no_change():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids, stream_positions="all")
        model.add_stream_adapters(8)
        after = model(ids, stream_positions="all")
    assert model.config.stream_adapter_rank == 8 and len(model.transformer.streams.adapters) == 2
    assert torch.equal(before.logits, after.logits) and torch.equal(before.stream_logits, after.stream_logits)
