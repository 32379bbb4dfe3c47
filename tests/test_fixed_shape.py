"""The fixed-shape (CUDA-graph-ready) step decodes exactly like the dynamic loop and greedy.

On the CPU the fixed-shape functions run eagerly; these tests check the tokens they
produce. The graph capture itself is exercised when a GPU is present."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from huggingface.transformers.cache_utils import FixedShapeKVCache, VariableLengthKVCache
from huggingface.transformers.generation.fixed_shape import FixedShapeDecoder
from tests.helpers import TINY, phrase_text, tiny_model

NEW = 30


def greedy(model, ids, max_new_tokens=NEW, eos_token_id=None):
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=0)


def test_fixed_shape_cache_forward_equals_dynamic_cache():
    """Prefill, then a tree chunk: same outputs whether the cache slices or masks stale slots."""
    model = tiny_model(num_spec_streams=2, num_stream_layers=2, attn_implementation="sdpa")
    config = model.config
    ids = torch.randint(1, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    chunk, chunk_positions = ids[:, :3], torch.tensor([[20, 21, 21]])
    dynamic, fixed = VariableLengthKVCache(config, 1, 40), FixedShapeKVCache(config, 1, 40)
    for buffer in fixed.keys + fixed.values:
        buffer.normal_()  # stale slots must be masked, whatever they hold
    outputs = []
    for cache in (dynamic, fixed):
        model.run_tree(ids, cache, torch.arange(20)[None])
        outputs.append(model.run_tree(chunk, cache, chunk_positions, tree_mask))
    variable, fixed_shape = outputs
    assert torch.allclose(variable.logits, fixed_shape.logits, atol=1e-5)
    assert torch.allclose(variable.stream_states, fixed_shape.stream_states, atol=1e-5)
    assert int(fixed.length) == dynamic.length == 23


@pytest.mark.parametrize("tree_widths", [(4, 3, 2), (2, 2), ()])
def test_fixed_shape_decoder_identical_to_greedy_and_dynamic_loop(trained_model, tree_widths):
    decoder = FixedShapeDecoder(trained_model, tree_widths, cuda_graphs=False, prefill_buckets=(8, 16, 32))
    generator = torch.Generator().manual_seed(5)
    calls = 0
    for i in range(40):
        ids = phrase_text(1, 1 + i % 30, generator)
        out = decoder.generate(ids, NEW)
        assert torch.equal(out.sequences, greedy(trained_model, ids))
        dynamic = trained_model.generate(ids, speculative_streaming=True, tree_widths=tree_widths or None,
                                         max_new_tokens=NEW, eos_token_id=None, return_dict_in_generate=True)
        if tree_widths:
            assert out.accepted_lengths[:-1] == dynamic.accepted_lengths[:-1]
        calls += out.num_forward_calls
    print(f"fixed-shape decoder, tree {tree_widths}: {40 * NEW / calls:.2f} tokens per forward call")
    if not tree_widths:
        assert calls == 40 * NEW


def test_fixed_shape_decoder_random_prompts_and_weights():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, attn_implementation="sdpa")
    decoder = FixedShapeDecoder(model, (4, 3, 2), cuda_graphs=False)
    generator = torch.Generator().manual_seed(6)
    for _ in range(20):
        ids = torch.randint(1, TINY["vocab_size"], (1, int(torch.randint(1, 60, (1,), generator=generator))),
                            generator=generator)
        assert torch.equal(decoder.generate(ids, NEW).sequences, greedy(model, ids))


def test_eos_and_max_new_tokens_in_the_middle_of_a_tree(trained_model):
    """A well-trained model accepts long paths, so EOS and the token budget fall mid-path."""
    decoder = FixedShapeDecoder(trained_model, (4, 3, 2), cuda_graphs=False)
    generator = torch.Generator().manual_seed(7)
    mid_path_stops = 0
    for i in range(30):
        ids = phrase_text(1, 6 + i, generator)
        reference = greedy(trained_model, ids, max_new_tokens=NEW)[0, ids.shape[1]:]
        eos = int(reference[4 + i % 7])  # a token greedy decoding emits a few steps in
        out = decoder.generate(ids, NEW, eos_token_ids={eos})
        assert torch.equal(out.sequences, greedy(trained_model, ids, eos_token_id=eos))
        budget = 3 + i % 11
        out = decoder.generate(ids, budget)
        assert torch.equal(out.sequences, greedy(trained_model, ids, max_new_tokens=budget))
        assert out.sequences.shape[1] == ids.shape[1] + budget
        mid_path_stops += 1 + sum(out.accepted_lengths) > budget
    assert mid_path_stops > 0  # the budget really cut an accepted path


def test_prompt_at_the_end_of_the_context():
    """Tree nodes past the last position are clamped and never emitted."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, attn_implementation="sdpa")
    decoder = FixedShapeDecoder(model, (2, 2, 2), cuda_graphs=False)
    context = TINY["max_position_embeddings"]
    ids = torch.randint(1, TINY["vocab_size"], (1, context - 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(decoder.generate(ids, 6).sequences, greedy(model, ids, max_new_tokens=6))
    with pytest.raises(ValueError, match="exceeds the context"):
        decoder.generate(ids, 7)


def test_bad_requests_are_clear_errors():
    model = tiny_model(num_spec_streams=2, num_stream_layers=2)
    with pytest.raises(ValueError, match="speculative streams"):
        FixedShapeDecoder(model, (2, 2, 2), cuda_graphs=False)
    with pytest.raises(ValueError, match="CUDA device"):
        FixedShapeDecoder(model, (2, 2), cuda_graphs=True)
    with pytest.raises(ValueError, match="one prompt at a time"):  # batches decode greedily (tests/test_batch.py)
        FixedShapeDecoder(model, (2,), cuda_graphs=False, do_sample=True).generate(torch.ones(2, 4, dtype=torch.long), 4)


class HostSyncDetector(TorchDispatchMode):
    """Fails on any op that makes the host wait for a device value (forbidden in a CUDA
    graph): reading a scalar, or an output whose shape depends on data."""

    SYNCING = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        assert name not in self.SYNCING, f"{name} syncs the host inside a fixed-shape step"
        return func(*args, **(kwargs or {}))


def steps_without_host_sync(decoder, prompts, steps: int = 3, **prefill_settings) -> None:
    """A prefill of ``prompts`` and ``steps`` steps under `HostSyncDetector`."""
    with torch.no_grad(), HostSyncDetector():
        decoder.prefill(prompts, max_new_tokens=8, **prefill_settings)
        for _ in range(steps):
            decoder.step(remaining=8, timer=lambda name: contextlib.nullcontext())


@pytest.mark.parametrize("tree_widths", [(4, 3, 2), ()])
def test_fixed_shape_functions_never_sync_the_host(trained_model, tree_widths):
    """What makes the step capturable as a CUDA graph, checked on the CPU."""
    decoder = FixedShapeDecoder(trained_model, tree_widths, cuda_graphs=False, prefill_buckets=(16,))
    steps_without_host_sync(decoder, phrase_text(1, 10, torch.Generator().manual_seed(10)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_identical_to_eager(trained_model):
    model = trained_model.cuda()
    graphed = FixedShapeDecoder(model, (4, 3, 2), cuda_graphs=True, prefill_buckets=(16, 32))
    eager = FixedShapeDecoder(model, (4, 3, 2), cuda_graphs=False)
    generator = torch.Generator().manual_seed(9)
    try:
        for i in range(20):
            ids = phrase_text(1, 1 + i, generator).cuda()
            assert torch.equal(graphed.generate(ids, NEW).sequences, eager.generate(ids, NEW).sequences)
    finally:
        trained_model.cpu()


def test_tree_larger_than_64_nodes():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    decoder = FixedShapeDecoder(model, (5, 5, 5), cuda_graphs=False)
    for prompt_length, max_new in [(20, 30), (90, 6)]:
        ids = torch.randint(1, TINY["vocab_size"], (1, prompt_length), generator=torch.Generator().manual_seed(7))
        assert torch.equal(decoder.generate(ids, max_new).sequences, greedy(model, ids, max_new_tokens=max_new))


def test_compiled_step_decodes_like_greedy_with_one_compile_per_shape(trained_model):
    """`compile=True` hands the same step to torch.compile: same tokens as greedy, one
    compile for every prompt length that shares the cache bucket (no recompiles), and a
    second batch size or cache bucket its own."""
    decoder = FixedShapeDecoder(trained_model, (2, 2), cuda_graphs=False, compile=True, prefill_buckets=(16, 32),
                                cache_buckets=(48, 96))
    generator = torch.Generator().manual_seed(11)
    for length in (3, 9, 14):
        ids = phrase_text(1, length, generator)
        assert torch.equal(decoder.generate(ids, 20).sequences, greedy(trained_model, ids, max_new_tokens=20))
    # every prompt in bucket 16; cache bucket 48 + the tree's 7 nodes
    assert list(decoder.compile_seconds) == [("prefill", 1, 16, 55), ("step", 1, 55)]
    ids = phrase_text(1, 40, generator)  # prompt bucket 96 (the context), so cache bucket 96
    assert torch.equal(decoder.generate(ids, 20).sequences, greedy(trained_model, ids, max_new_tokens=20))
    assert list(decoder.compile_seconds)[2:] == [("prefill", 1, 96, 103), ("step", 1, 103)]
    assert all(seconds > 0 for seconds in decoder.compile_seconds.values())


def test_each_decoder_keeps_its_own_compiled_steps(trained_model):
    """Dynamo files compiled graphs under the code object they came from and checks their
    guards in turn on each call: decoders sharing `FixedShapeDecoder._step` would each pay
    for every other's graphs (a () step 1.3 -> 1.75 ms after a probe's six trees). Each
    decoder's step has its own code, holding its own shapes' graphs alone."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    ids = phrase_text(1, 9, torch.Generator().manual_seed(13))
    decoders = [FixedShapeDecoder(trained_model, widths, cuda_graphs=False, compile=True, cache_buckets=(48,))
                for widths in [(), (2,)]]
    for decoder in decoders:
        assert torch.equal(decoder.generate(ids, 12).sequences, greedy(trained_model, ids, max_new_tokens=12))
    codes = [decoder.compiled_step._torchdynamo_orig_callable.__code__ for decoder in decoders]
    assert codes[0] is not codes[1]
    assert [len(_debug_get_cache_entry_list(code)) for code in codes] == [1, 1]
    assert _debug_get_cache_entry_list(FixedShapeDecoder._step.__code__) == []


def test_a_step_that_fails_to_compile_runs_eagerly(trained_model, caplog):
    decoder = FixedShapeDecoder(trained_model, (2, 2), cuda_graphs=False, compile=True)

    def no_compiler():
        raise RuntimeError("InductorError: no working C++ compiler found")

    decoder.compiled_step = no_compiler
    ids = phrase_text(1, 8, torch.Generator().manual_seed(12))
    with caplog.at_level("WARNING"):
        out = decoder.generate(ids, 12)
    assert torch.equal(out.sequences, greedy(trained_model, ids, max_new_tokens=12))
    assert decoder.compiled_step is None and "running it eagerly" in caplog.text
