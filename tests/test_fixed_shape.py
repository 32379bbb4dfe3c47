"""The one runner (`FixedShapeDecoder`) behind ``generate(speculative_streaming=True)``, in
each of its modes, decodes exactly like greedy.

On the CPU the step runs eagerly by default and compiled with ``compile_config``; CUDA
graphs are exercised when a GPU is present. What makes a step capturable (no host sync) is
checked on the CPU."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig

from huggingface.transformers.cache_utils import FixedShapeKVCache
from huggingface.transformers.generation import fixed_shape
from huggingface.transformers.generation.fixed_shape import COMPILED, EAGER, FixedShapeDecoder
from huggingface.transformers.generation.utils import decode
from tests.helpers import TINY, phrase_text, tiny_model

NEW = 30


def greedy(model, ids, max_new_tokens=NEW, eos_token_id=None):
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=0, speculative_streaming=False)


def speculative(model, ids, tree_widths=(4, 3, 2), max_new_tokens=NEW, **kwargs):
    return model.generate(ids, speculative_streaming=True, tree_widths=tree_widths, max_new_tokens=max_new_tokens,
                          return_dict_in_generate=True, **kwargs)


def test_fixed_shape_cache_masks_stale_slots_and_follows_the_tree():
    """Prefill, then a tree chunk, against a cache whose unused slots hold noise: each node's
    logits are the full forward's over the prefix and the node's own path."""
    model = tiny_model(num_spec_streams=2, num_stream_layers=2, attn_implementation="sdpa")
    ids = torch.randint(1, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    chunk = torch.tensor([[5, 6, 7]])  # node 0, its children 1 and 2
    tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    cache = FixedShapeKVCache(model.config, 1, 40)
    for buffer in cache.keys + cache.values:
        buffer.normal_()  # stale slots must be masked, whatever they hold
    with torch.no_grad():
        model.run_tree(ids, cache, torch.arange(20)[None])
        out = model.run_tree(chunk, cache, torch.tensor([[20, 21, 21]]), tree_mask)
        for node, path in enumerate([[5], [5, 6], [5, 7]]):
            full = model(torch.cat([ids, torch.tensor([path])], dim=1)).logits[0, -1]
            torch.testing.assert_close(out.logits[0, node], full, atol=1e-5, rtol=1e-5)
    assert int(cache.length) == 23


@pytest.mark.trains
@pytest.mark.parametrize("tree_widths", [(4, 3, 2), (2, 2), ()])
def test_generate_identical_to_greedy(trained_model, tree_widths):
    generator = torch.Generator().manual_seed(5)
    calls = 0
    for i in range(40):
        ids = phrase_text(1, 1 + i % 30, generator)
        out = speculative(trained_model, ids, tree_widths)
        assert torch.equal(out.sequences, greedy(trained_model, ids))
        calls += out.num_forward_calls
    print(f"tree {tree_widths}: {40 * NEW / calls:.2f} tokens per forward call")
    assert calls == 40 * NEW if not tree_widths else calls < 40 * NEW / 1.5


def test_random_prompts_and_weights():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(6)
    for _ in range(20):
        ids = torch.randint(1, TINY["vocab_size"], (1, int(torch.randint(1, 60, (1,), generator=generator))),
                            generator=generator)
        assert torch.equal(speculative(model, ids).sequences, greedy(model, ids))


@pytest.mark.trains
def test_eos_and_max_new_tokens_in_the_middle_of_a_tree(trained_model):
    """A well-trained model accepts long paths, so EOS and the token budget fall mid-path."""
    generator = torch.Generator().manual_seed(7)
    mid_path_stops = 0
    for i in range(30):
        ids = phrase_text(1, 6 + i, generator)
        reference = greedy(trained_model, ids, max_new_tokens=NEW)[0, ids.shape[1]:]
        eos = int(reference[4 + i % 7])  # a token greedy decoding emits a few steps in
        out = speculative(trained_model, ids, eos_token_id=eos)
        assert torch.equal(out.sequences, greedy(trained_model, ids, eos_token_id=eos))
        budget = 3 + i % 11
        out = speculative(trained_model, ids, max_new_tokens=budget)
        assert torch.equal(out.sequences, greedy(trained_model, ids, max_new_tokens=budget))
        assert out.sequences.shape[1] == ids.shape[1] + budget
        mid_path_stops += 1 + sum(out.accepted_lengths) > budget
    assert mid_path_stops > 0  # the budget really cut an accepted path


def test_prompt_at_the_end_of_the_context():
    """Tree nodes past the last position are clamped and never emitted."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, attn_implementation="sdpa")
    context = TINY["max_position_embeddings"]
    ids = torch.randint(1, TINY["vocab_size"], (1, context - 5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(speculative(model, ids, (2, 2, 2), 6).sequences, greedy(model, ids, max_new_tokens=6))
    with pytest.raises(ValueError, match="context"):
        speculative(model, ids, (2, 2, 2), 7)


def test_tree_larger_than_64_nodes():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, attn_implementation="sdpa")
    for prompt_length, max_new in [(20, 30), (90, 6)]:
        ids = torch.randint(1, TINY["vocab_size"], (1, prompt_length), generator=torch.Generator().manual_seed(7))
        out = speculative(model, ids, (5, 5, 5), max_new)
        assert torch.equal(out.sequences, greedy(model, ids, max_new_tokens=max_new))


def test_bad_requests_are_clear_errors():
    model = tiny_model(num_spec_streams=2, num_stream_layers=2)
    with pytest.raises(ValueError, match="speculative streams"):
        FixedShapeDecoder(model, (2, 2, 2))
    with pytest.raises(ValueError, match="CUDA device"):
        FixedShapeDecoder(model, (2, 2), mode="cuda_graphs")
    with pytest.raises(ValueError, match="mode="):
        FixedShapeDecoder(model, (2, 2), mode="fast")
    with pytest.raises(ValueError, match="one prompt at a time"):  # batches decode greedily (tests/test_batch.py)
        speculative(model, torch.ones(2, 4, dtype=torch.long), (2,), 4, do_sample=True)


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
    decoder = FixedShapeDecoder(trained_model, tree_widths, prefill_buckets=(16,))
    steps_without_host_sync(decoder, phrase_text(1, 10, torch.Generator().manual_seed(10)))


def test_compile_config_compiles_once_per_shape_and_keeps_the_runner(trained_model, caplog, monkeypatch):
    """``compile_config`` on a CPU runs the compiled step, made once per model and shape:
    a second call of the same shape compiles nothing; the first compile is logged once;
    ``disable_compile=True`` runs the eager runner."""
    monkeypatch.setattr(fixed_shape, "_first_compile_logged", False)
    generator = torch.Generator().manual_seed(11)
    compiled = dict(compile_config=CompileConfig())
    with caplog.at_level("WARNING"):
        for length in (3, 9, 3):
            ids = phrase_text(1, length, generator)
            out = speculative(trained_model, ids, (2, 2), 20, **compiled)
            assert torch.equal(out.sequences, greedy(trained_model, ids, max_new_tokens=20))
    runners = [r for r in trained_model._tree_runners.values() if r.spec.widths == (2, 2)]
    (runner,) = [r for r in runners if r.mode == COMPILED]
    assert len(runner.compile_seconds) == 1  # one step shape: both prompts fit it (a CPU's prefill runs eagerly)
    assert sum("compiled the decoding" in r.getMessage() for r in caplog.records) == 1
    ids = phrase_text(1, 5, generator)
    assert torch.equal(speculative(trained_model, ids, (2, 2), 20, disable_compile=True).sequences,
                       greedy(trained_model, ids, max_new_tokens=20))
    assert any(r.mode == EAGER for r in trained_model._tree_runners.values() if r.spec.widths == (2, 2))


def test_compiled_runner_one_compile_per_bucket(trained_model):
    """Every prompt length that shares a prompt bucket and a cache bucket shares one compiled
    prefill and step; another bucket compiles its own (the prefill compiled as a GPU's is)."""
    decoder = FixedShapeDecoder(trained_model, (2, 2), COMPILED, prefill_buckets=(16, 32), cache_buckets=(48, 96),
                                compile_prefill=True)
    generator = torch.Generator().manual_seed(11)
    for length in (3, 9, 14):
        ids = phrase_text(1, length, generator)
        assert torch.equal(decode(decoder, trained_model.config, ids, 20).sequences,
                           greedy(trained_model, ids, max_new_tokens=20))
    assert list(decoder.compile_seconds) == [("prefill", 1, 16, 55, False), ("step", 1, 55, False)]  # cache 48 + 7 nodes
    ids = phrase_text(1, 40, generator)  # prompt bucket 96 (the context), so cache bucket 96
    assert torch.equal(decode(decoder, trained_model.config, ids, 20).sequences,
                       greedy(trained_model, ids, max_new_tokens=20))
    assert list(decoder.compile_seconds)[2:] == [("prefill", 1, 96, 103, False), ("step", 1, 103, False)]


def test_each_runner_keeps_its_own_compiled_steps(trained_model):
    """Dynamo files compiled graphs under the code object they came from and checks their
    guards in turn on each call: runners sharing `FixedShapeDecoder._step` would each pay
    for every other's graphs (a () step 1.3 -> 1.75 ms after a probe's six trees). Each
    runner's step has its own code, holding its own shapes' graphs alone."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    ids = phrase_text(1, 9, torch.Generator().manual_seed(13))
    decoders = [FixedShapeDecoder(trained_model, widths, COMPILED, cache_buckets=(48,)) for widths in [(), (2,)]]
    for decoder in decoders:
        assert torch.equal(decode(decoder, trained_model.config, ids, 12).sequences,
                           greedy(trained_model, ids, max_new_tokens=12))
    codes = [decoder.compiled_step._torchdynamo_orig_callable.__code__ for decoder in decoders]
    assert codes[0] is not codes[1]
    assert [len(_debug_get_cache_entry_list(code)) for code in codes] == [1, 1]
    assert _debug_get_cache_entry_list(FixedShapeDecoder._step.__code__) == []


def test_a_step_that_fails_to_compile_runs_eagerly(trained_model, caplog):
    decoder = FixedShapeDecoder(trained_model, (2, 2), COMPILED)

    def no_compiler(*args):
        raise RuntimeError("InductorError: no working C++ compiler found")

    decoder.compiled_prefill = decoder.compiled_step = no_compiler
    ids = phrase_text(1, 8, torch.Generator().manual_seed(12))
    with caplog.at_level("WARNING"):
        out = decode(decoder, trained_model.config, ids, 12)
    assert torch.equal(out.sequences, greedy(trained_model, ids, max_new_tokens=12))
    assert decoder.mode == EAGER and "running it eagerly" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_identical_to_eager(trained_model):
    model = trained_model.cuda()
    try:
        generator = torch.Generator().manual_seed(9)
        for i in range(10):
            ids = phrase_text(1, 3 + 4 * i, generator).cuda()
            graphed = speculative(model, ids)
            assert torch.equal(graphed.sequences, speculative(model, ids, disable_compile=True).sequences)
            assert torch.equal(graphed.sequences, greedy(model, ids))
        assert any(r.mode == "cuda_graphs" and r.graphs for r in model._tree_runners.values())
    finally:
        trained_model.cpu()
        trained_model.__dict__.pop("_tree_runners", None)
