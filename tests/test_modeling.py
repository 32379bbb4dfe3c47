"""The patched GPT-Neo: parity with upstream, stream masks, caches, checkpoints, errors."""
import pytest
import torch
import transformers

from huggingface.transformers.cache_utils import FixedShapeKVCache
from huggingface.transformers.internals import CACHE_FIELD
from huggingface.transformers.generation.speculative_tree import build_tree_buffers
from spec_stream import GPTNeoForCausalLM, shifted_cross_entropy
from tests.helpers import TINY, tiny_config, tiny_model, upstream_twin

SEQ = 24  # > window_size (5): local layers drop keys


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("streams", [0, 3])
def test_main_logits_match_upstream(implementation, streams):
    model = tiny_model(attn_implementation=implementation, num_spec_streams=streams, num_stream_layers=2 if streams else 0)
    upstream = upstream_twin(model)
    ids = torch.randint(1, TINY["vocab_size"], (2, SEQ))
    with torch.no_grad():
        ours = model(ids, stream_positions="all" if streams else None)
        reference = upstream(ids).logits
    assert (ours.logits - reference).abs().max() <= 1e-4
    if streams:
        assert ours.stream_logits.shape == (2, streams, SEQ, TINY["vocab_size"])


def test_local_window_really_masks():
    """Changing a token more than window_size before the end changes logits only through
    global layers: with every layer local, it changes nothing."""
    model = tiny_model(attention_types=[[["local"], 4]])
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # position 0 influences positions < 0 + 4 layers * (window 5 - 1) = 16 at most
    assert torch.equal(a[:, 17:], b[:, 17:])
    assert not torch.equal(a[:, :5], b[:, :5])


def test_streams_are_causal_and_ordered():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ))
    t = 10
    changed = ids.clone()
    changed[0, t + 1 :] = torch.randint(1, TINY["vocab_size"], (SEQ - t - 1,))
    with torch.no_grad():
        a = model(ids, stream_positions="all")
        b = model(changed, stream_positions="all")
        assert torch.allclose(a.stream_logits[:, :, : t + 1], b.stream_logits[:, :, : t + 1], atol=1e-6)
        assert not torch.allclose(a.stream_logits[:, :, t + 1 :], b.stream_logits[:, :, t + 1 :])
        # stream j must not see stream j+1: perturb the last stream's embedding only
        model.transformer.streams.embeddings[2].add_(1.0)
        c = model(ids, stream_positions="all")
    assert torch.equal(a.stream_logits[:, :2], c.stream_logits[:, :2])
    assert not torch.equal(a.stream_logits[:, 2], c.stream_logits[:, 2])
    assert torch.equal(a.logits, c.logits)  # the main stream never sees a stream


def test_running_fewer_streams_leaves_the_first_ones_unchanged():
    """A tree of depth D runs streams 1..D only: stream j never sees a later stream, so
    the first D streams' states are those of the full forward."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = torch.randint(1, TINY["vocab_size"], (2, SEQ))
    with torch.no_grad():
        every = model.transformer(ids, stream_positions="all")
        for count in (1, 2):
            first = model.transformer(ids, stream_positions="all", num_streams=count)
            assert first.stream_hidden_states.shape == (2, count, SEQ, TINY["hidden_size"])
            assert (first.stream_hidden_states - every.stream_hidden_states[:, :count]).abs().max() <= 1e-5
            assert (first.hidden_states - every.hidden_states).abs().max() <= 1e-5
        assert model.transformer(ids, stream_positions="all", num_streams=0).stream_hidden_states is None


def test_streams_at_chosen_positions_equal_all_positions():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ))
    chosen = torch.tensor([3, 11, SEQ - 1])
    with torch.no_grad():
        everywhere = model(ids, stream_positions="all").stream_logits
        some = model(ids, stream_positions=chosen).stream_logits
    assert (everywhere[:, :, chosen] - some).abs().max() <= 1e-5


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_incremental_decoding_equals_full_forward(implementation):
    model = tiny_model(attn_implementation=implementation, num_spec_streams=2, num_stream_layers=1)
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ))
    with torch.no_grad():
        full = model(ids, stream_positions="all")
        cache = FixedShapeKVCache(model.config, 1, SEQ + 8, dtype=torch.float32)  # 8 stale slots, always seen
        prefix = model(ids[:, :8], cache=cache, position_ids=torch.arange(8)[None])
        steps = [model(ids[:, i : i + 1], cache=cache, position_ids=torch.tensor([[i]]), stream_positions="all")
                 for i in range(8, SEQ)]
        dynamic = model(ids[:, :8], use_cache=True)
        dynamic_steps = [model(ids[:, i : i + 1], cache=getattr(dynamic, CACHE_FIELD)) for i in range(8, 12)]
    torch.testing.assert_close(prefix.logits, full.logits[:, :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), full.logits[:, 8:], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([s.stream_logits for s in steps], 2), full.stream_logits[:, :, 8:], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([s.logits for s in dynamic_steps], 1), full.logits[:, 8:12], atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_tree_chunk_equals_full_forward_of_each_path(implementation):
    """A flattened tree fed in one call with the tree mask and depth positions gives, at
    every node, the logits of a plain forward over prefix + the node's path; compacting the
    cache to one path leaves a cache equal to having decoded that path."""
    model = tiny_model(attn_implementation=implementation, num_spec_streams=3, num_stream_layers=2)
    tree = build_tree_buffers((3, 2, 2))
    prefix_len = 12  # the tree reaches positions 12..15, the window (5) cuts the prefix
    prefix = torch.randint(1, TINY["vocab_size"], (1, prefix_len))
    tokens = torch.randint(1, TINY["vocab_size"], (tree.size,))
    with torch.no_grad():
        cache = FixedShapeKVCache(model.config, 1, prefix_len + tree.size + 1)
        model(prefix, past_key_values=cache, position_ids=torch.arange(prefix_len)[None])
        out = model(tokens[None], past_key_values=cache, position_ids=(prefix_len + tree.depths)[None],
                    tree_mask=tree.tree_mask, stream_positions="all")
        for node in range(tree.size):
            path = tree.tree_mask[node].nonzero().flatten()  # ancestors in depth order
            reference = model(torch.cat([prefix[0], tokens[path]])[None], stream_positions="all")
            torch.testing.assert_close(out.logits[0, node], reference.logits[0, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.stream_logits[0, :, node], reference.stream_logits[0, :, -1], atol=1e-5, rtol=0)
        path = tree.paths[-1]
        cache.compact(prefix_len, prefix_len + path)
        assert cache.length == prefix_len + len(path)
        nxt = torch.tensor([[7]])
        step = model(nxt, past_key_values=cache, position_ids=torch.tensor([[prefix_len + len(path)]]))
        reference = model(torch.cat([prefix[0], tokens[path], nxt[0]])[None])
    torch.testing.assert_close(step.logits[0, -1], reference.logits[0, -1], atol=1e-5, rtol=0)


def test_padding_mask_blocks_padded_keys():
    model = tiny_model(attn_implementation="sdpa")
    ids = torch.randint(1, TINY["vocab_size"], (1, 10))
    padded = torch.cat([torch.full((1, 3), 5), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    garbage = padded.clone()
    garbage[0, :3] = 9
    with torch.no_grad():
        a = model(padded, attention_mask=mask).logits[:, 3:]
        b = model(garbage, attention_mask=mask).logits[:, 3:]
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_save_load_round_trip_and_upstream_in_both_directions(tmp_path):
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ))
    with torch.no_grad():
        expected = model(ids, stream_positions="all")
    model.save_pretrained(tmp_path / "ours")
    loaded = GPTNeoForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert loaded.config.num_spec_streams == 3 and loaded.config.num_stream_layers == 2
    with torch.no_grad():
        again = loaded(ids, stream_positions="all")
        upstream = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "ours").eval()
        up_logits = upstream(ids).logits
    assert torch.equal(again.logits, expected.logits) and torch.equal(again.stream_logits, expected.stream_logits)
    assert (up_logits - expected.logits).abs().max() <= 1e-4

    upstream.save_pretrained(tmp_path / "upstream")
    ours, info = GPTNeoForCausalLM.from_pretrained(
        tmp_path / "upstream", num_spec_streams=2, num_stream_layers=1, output_loading_info=True
    )
    assert {k for k in info["missing_keys"]} >= {"transformer.streams.embeddings"}
    assert not info["unexpected_keys"]
    with torch.no_grad():
        out = ours.eval()(ids, stream_positions="all")
    assert (out.logits - up_logits).abs().max() <= 1e-4
    assert out.stream_logits.shape[1] == 2 and torch.isfinite(out.stream_logits).all()


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(num_spec_streams=2, num_stream_layers=5), "num_stream_layers"),
        (dict(num_spec_streams=-1), "negative"),
        (dict(hidden_size=30), "divisible"),
        (dict(num_spec_streams=2, num_stream_layers=0), "num_stream_layers"),
    ],
)
def test_inconsistent_configs_raise_value_error(overrides, words):
    with pytest.raises(ValueError, match=words):
        tiny_config(**overrides)


def test_too_long_sequence_raises_value_error_and_cache_overflow_raises():
    """Past the context: a ValueError naming the limit. A `FixedShapeKVCache` keeps its
    lengths on the device and checks nothing on the host (its runner sizes it), but writing
    past its last slot still fails on the CPU rather than landing anywhere."""
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, TINY["max_position_embeddings"] + 1, dtype=torch.long))
    cache = FixedShapeKVCache(model.config, 1, 8)
    model(torch.ones(1, 6, dtype=torch.long), past_key_values=cache, position_ids=torch.arange(6)[None])
    with pytest.raises((IndexError, ValueError)):
        model(torch.ones(1, 3, dtype=torch.long), past_key_values=cache, position_ids=torch.arange(6, 9)[None])
    with pytest.raises(ValueError, match="explicit position_ids"):
        model(torch.ones(1, 1, dtype=torch.long), past_key_values=FixedShapeKVCache(model.config, 1, 8))


def test_flash_attention_2_honours_local_window():
    flash_attn = pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn needs a CUDA device")
    del flash_attn
    torch.manual_seed(0)
    config = tiny_config(max_position_embeddings=96)
    model = GPTNeoForCausalLM(config).cuda().half().eval()
    ids = torch.randint(1, TINY["vocab_size"], (1, 64), device="cuda")
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        reference = model(ids).logits.float()
        model.config._attn_implementation = "flash_attention_2"
        flash = model(ids).logits.float()
    assert (flash - reference).abs().max() < 2e-2


def test_stream_count_mismatch_and_missing_stream_weights_are_reported(tmp_path, caplog):
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="holds 3 trained speculative streams.*num_spec_streams=0"):
        GPTNeoForCausalLM.from_pretrained(tmp_path / "ours", num_spec_streams=2)
    plain = GPTNeoForCausalLM.from_pretrained(tmp_path / "ours", num_spec_streams=0)
    assert plain.transformer.streams is None and not plain.randomly_initialised_streams
    assert not GPTNeoForCausalLM.from_pretrained(tmp_path / "ours").randomly_initialised_streams
    # saved through upstream GPT-Neo: the config still says 3 streams, the weights are gone
    upstream = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "ours")
    upstream.config.num_spec_streams = 3
    upstream.save_pretrained(tmp_path / "upstream")
    with caplog.at_level("WARNING"):
        loaded = GPTNeoForCausalLM.from_pretrained(tmp_path / "upstream")
    assert loaded.randomly_initialised_streams
    assert "initialised at random" in caplog.text and "fine-tuned" in caplog.text


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_loss_only_equals_the_full_loss_and_its_gradients(implementation):
    """Streams only where a stream has a target, the head only on target rows: same loss and
    gradients as the full forward, and both are the method's loss computed independently
    from the full forward's logits: a0 * CE(main, shift 1) + a_j * CE(stream_j, shift 2 + j)."""
    model = tiny_model(attn_implementation=implementation, num_spec_streams=3, num_stream_layers=2).train()
    ids = torch.randint(1, TINY["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :25] = labels[1, :30] = labels[2, :12] = labels[2, 35:] = -100  # prompts, padding
    mask = torch.ones_like(ids)
    mask[2, 35:] = 0
    full = model(ids, attention_mask=mask, labels=labels)
    fast = model(ids, attention_mask=mask, labels=labels, loss_only=True)
    assert fast.logits is None and fast.stream_logits is None
    assert full.stream_logits.shape == (3, 3, 40, TINY["vocab_size"])
    config = model.config
    reference = config.main_loss_weight * shifted_cross_entropy(full.logits, labels, 1)
    for j in range(3):
        reference = reference + config.stream_loss_weight * shifted_cross_entropy(full.stream_logits[:, j], labels, 2 + j)
    torch.testing.assert_close(full.loss, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-6, rtol=0)
    parameters = list(model.parameters())
    full_grads = torch.autograd.grad(full.loss, parameters, allow_unused=True)
    fast_grads = torch.autograd.grad(fast.loss, parameters, allow_unused=True)
    assert sum(g is not None for g in full_grads) > 50
    streams = next(i for i, p in enumerate(parameters) if p is model.transformer.streams.embeddings)
    assert fast_grads[streams] is not None and fast_grads[streams].abs().sum() > 0  # the streams' loss counts
    for a, b in zip(full_grads, fast_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_pruning_adapter_weights_of_old_checkpoints_are_ignored_on_load(tmp_path):
    """Checkpoints saved before tree pruning was removed hold `transformer.streams.pruner_*`:
    they load without complaint and decode as the same model without them."""
    from safetensors.torch import load_file, save_file

    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["transformer.streams.pruner_down.weight"] = torch.randn(4, TINY["hidden_size"])
    weights["transformer.streams.pruner_up.weight"] = torch.randn(TINY["hidden_size"], 4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = GPTNeoForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not any("pruner" in name for name in loaded.state_dict())
    ids = torch.randint(1, TINY["vocab_size"], (1, SEQ))
    with torch.no_grad():
        expected, again = model(ids, stream_positions="all"), loaded.eval()(ids, stream_positions="all")
    assert torch.equal(again.logits, expected.logits) and torch.equal(again.stream_logits, expected.stream_logits)
