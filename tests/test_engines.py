"""Engines on a briefly trained tiny checkpoint: no_cache and naive in batches reproduce
naive, int8 and spec_stream on int8 reproduce the int8 model's greedy decoding, compiled
(transformers' static cache and torch.compile) reproduces naive with one compile, engines
that cannot batch or compile say so, sampling is reproducible per seed, and the registry
hands each engine its own settings."""
import json
import re
import shutil

import pytest
import torch

import spec_stream.engines
from spec_stream.engines import (ENGINE_NAMES, ENGINES, Int8Linear, Sampling, StaticCacheLocalAttention, Unsupported,
                                 build_engine, compile_unavailable, left_padded, load_upstream, place_local_windows,
                                 quantize_int8, until_eos)
from spec_stream.errors import UserError
from tests.helpers import phrase_text

CPU = torch.device("cpu")
EOS = 0
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(trained_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines") / "tiny"
    trained_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(11)
    return [phrase_text(1, length, generator) for length in (5, 9, 14, 20, 7, 31)]


def outputs(name, checkpoint, prompts, **settings):
    engine = build_engine(name, checkpoint, CPU, **settings)
    return [r.new_tokens for r in engine.run_many(prompts, NEW_TOKENS, EOS)], engine


@pytest.fixture(scope="module")
def naive_outputs(checkpoint, prompts):
    return outputs("naive", checkpoint, prompts)[0]


@torch.no_grad()
def greedy_without_cache(model, prompt, max_new_tokens, eos):
    """Greedy decoding from scratch: the full sequence through the model at every step."""
    ids = prompt
    for _ in range(max_new_tokens):
        token = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        if token == eos:
            break
    return ids[0, prompt.shape[1]:].tolist()


def test_no_cache_equals_naive(checkpoint, prompts, naive_outputs):
    result, engine = outputs("no_cache", checkpoint, prompts)
    assert result == naive_outputs
    assert engine.generate_kwargs() == {"use_cache": False}


def test_batched_rows_equal_naive_and_share_the_batch(checkpoint, prompts, naive_outputs):
    engine = build_engine("naive", checkpoint, CPU)
    results = engine.run_many(prompts, NEW_TOKENS, EOS, batch_size=4)  # a batch of 4 (mixed lengths), then one of 2
    assert [r.new_tokens for r in results] == naive_outputs
    first, second = results[:4], results[4:]
    for batch in (first, second):
        assert all(r.latency == batch[0].latency for r in batch)
        assert sum(r.seconds for r in batch) == pytest.approx(batch[0].latency)
        steps = max(len(r.new_tokens) for r in batch)  # one call per token of the longest row
        assert sum(r.forward_calls for r in batch) == pytest.approx(steps)
    assert all(r.forward_calls < NEW_TOKENS for r in results)
    with pytest.raises(UserError, match="batch size 0"):
        engine.run_many(prompts, NEW_TOKENS, EOS, batch_size=0)


def test_engines_that_cannot_batch_say_so(checkpoint, prompts, naive_outputs):
    with pytest.raises(Unsupported, match="one prompt at a time"):
        build_engine("prompt_lookup", checkpoint, CPU).run_many(prompts, NEW_TOKENS, EOS, batch_size=2)
    engine = build_engine("spec_stream", checkpoint, CPU, tree_widths=(3, 2, 2))
    assert [r.new_tokens for r in engine.run_many(prompts, NEW_TOKENS, EOS, batch_size=3)] == naive_outputs
    with pytest.raises(Unsupported, match="lookup branch decodes one prompt at a time"):
        build_engine("spec_stream", checkpoint, CPU, tree_widths=(2,), lookup_branch=3).run_many(
            prompts, NEW_TOKENS, EOS, batch_size=3)


def test_auto_spec_stream_takes_each_batch_sizes_own_tree(checkpoint, prompts, naive_outputs, monkeypatch):
    """With "auto" the engine settles its tree per batch size before timing it (here a stub
    probe makes drafts free at batch 1 and cost a row each at batch 3), says which in its
    description, and stays exact at both."""
    import huggingface.transformers.generation.tree_search as tree_search_module
    from huggingface.transformers.generation.tree_search import tree_size

    def probe(model, batch_size=1, **kwargs):  # seconds per step by tree
        trees = [(), (1,), (4, 3, 2)]
        if batch_size == 1:
            return {widths: 1.0 for widths in trees}  # drafts free: the deepest tree
        return {widths: float(tree_size(widths)) for widths in trees}  # a second per node: no drafts
    monkeypatch.setattr(tree_search_module, "probe_step_seconds", probe)
    engine = build_engine("spec_stream", checkpoint, CPU, tree_widths="auto")
    engine.model.generation_config.stream_acceptance = [[0.5, 0.2] + [0.0] * 6] * 3  # as fine-tuning stores it
    engine.use_batch_size(1)
    batch_one = engine.tree_widths
    engine.use_batch_size(3)
    assert batch_one != () and engine.tree_widths == () and "no speculation" in engine.backend
    assert [r.new_tokens for r in engine.run_many(prompts, NEW_TOKENS, EOS, batch_size=3)] == naive_outputs
    engine.use_batch_size(1)
    assert engine.tree_widths == batch_one and f"tree {','.join(map(str, batch_one))}" in engine.backend
    assert [r.new_tokens for r in engine.run_many(prompts, NEW_TOKENS, EOS)] == naive_outputs


def test_lookup_branch_is_exact_and_counts_what_it_supplied(checkpoint, prompts, naive_outputs):
    """The phrase domain repeats itself, so a lookup chain beside a one-level tree gets
    drafts accepted; every output stays naive's, and the two sources add up."""
    streams_only = build_engine("spec_stream", checkpoint, CPU, tree_widths=(2,)).run_many(prompts, NEW_TOKENS, EOS)
    engine = build_engine("spec_stream", checkpoint, CPU, tree_widths=(2,), lookup_branch=4)
    hybrid = engine.run_many(prompts, NEW_TOKENS, EOS)
    assert [r.new_tokens for r in hybrid] == naive_outputs and "lookup 4" in engine.backend
    assert all(0 <= r.accepted_from_lookup <= r.accepted for r in hybrid)
    assert sum(r.accepted_from_lookup for r in hybrid) > 0
    assert sum(r.accepted_from_lookup for r in streams_only) == 0
    assert all(r.drafted == 4 * (r.forward_calls - 1) for r in hybrid)  # the chain is the deeper branch
    assert sum(r.forward_calls for r in hybrid) < sum(r.forward_calls for r in streams_only)


def test_sampling_is_reproducible_per_seed_and_follows_the_settings(checkpoint, prompts, naive_outputs):
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=5)
    for name in ("naive", "spec_stream"):
        engine = build_engine(name, checkpoint, CPU, sampling=sampling)
        first, again = ([r.new_tokens for r in engine.run_many(prompts, NEW_TOKENS, EOS)] for _ in range(2))
        assert first == again and first != naive_outputs  # seeded per prompt; really sampled
        assert engine.decoding() == dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    greedy_like = build_engine("spec_stream", checkpoint, CPU, sampling=Sampling(1.0, 1, 1.0, 0))  # top-k 1: argmax
    assert [r.new_tokens for r in greedy_like.run_many(prompts, NEW_TOKENS, EOS)] == naive_outputs
    assert len(Sampling(0.7, 50, 0.9, 0).warpers()) == 3 and len(sampling.warpers()) == 0


def test_until_eos_cuts_padding_after_the_first_eos():
    assert until_eos([5, 6, 0, 0, 0], 0) == [5, 6, 0]
    assert until_eos([5, 6, 7], 0) == [5, 6, 7]
    assert until_eos([5, 0, 6], None) == [5, 0, 6]


def test_int8_linear_rows_are_independent_and_close_to_fp32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    int8 = Int8Linear(linear)
    x = torch.randn(7, 64) * torch.logspace(-2, 1, 7)[:, None]  # rows of very different ranges
    together = int8(x)
    alone = torch.cat([int8(row[None]) for row in x])
    assert torch.equal(together, alone)  # bit for bit: per-row scales, integer products
    error = (together - linear(x)).abs().amax(dim=1) / linear(x).abs().amax(dim=1)
    assert error.max() < 0.05
    assert int8.weight.dtype == torch.int8


def test_int8_engines_equal_int8_greedy(checkpoint, prompts, naive_outputs):
    reference_model = quantize_int8(load_upstream(checkpoint, "eager").eval())
    reference = [greedy_without_cache(reference_model, p, NEW_TOKENS, EOS) for p in prompts]
    int8, int8_engine = outputs("int8", checkpoint, prompts)
    assert int8 == reference
    speculative, engine = outputs("spec_stream_int8", checkpoint, prompts, tree_widths=(3, 2, 2))
    assert speculative == reference
    results = engine.run_many(prompts, NEW_TOKENS, EOS)
    assert sum(r.accepted for r in results) > 0  # the tree really drafted and was verified
    assert engine.tree_widths == (3, 2, 2) and engine.weight_format == "int8"
    for batch_size in (4, 1):  # settling for a batch size keeps the description's int8
        engine.use_batch_size(batch_size)
        assert engine.backend.endswith("tree 3,2,2, int8 linear layers (per-token activations)")
    assert sum(isinstance(m, Int8Linear) for m in engine.model.modules()) > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in int8_engine.model.modules())
    fp32_bytes = build_engine("naive", checkpoint, CPU).weight_bytes
    assert int8_engine.weight_bytes < fp32_bytes


@pytest.fixture(scope="module")
def compiled_engine(checkpoint):
    """One compiled engine for every check of it: the compile is the cost (on the 2-core
    development CPU about 35 s cold, 7 s with inductor's on-disk cache warm)."""
    return build_engine("compiled", checkpoint, CPU)


def test_compiled_equals_naive_and_compiles_once_untimed(compiled_engine, prompts, naive_outputs):
    """transformers' fast path (static cache, compiled decoding step) reproduces naive on
    prompts of 5 to 31 tokens plus 24 new ones, far past the tiny model's local window of 5:
    one compile, before the first timed call, and none for any other prompt length."""
    engine = compiled_engine
    engine.use_batch_size(1)  # what the benchmark does before its warm-up
    assert list(engine.compile_seconds) == [1] and engine.compile_seconds[1] > 0
    assert f"compile: batch 1 {engine.compile_seconds[1]:.1f} s" in engine.description
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        results = engine.run_many(prompts, NEW_TOKENS, EOS)
    assert [r.new_tokens for r in results] == naive_outputs
    assert [r.forward_calls for r in results] == [len(r.new_tokens) for r in results]  # prefill, then 1 per token
    assert all(len(r.call_seconds) == r.forward_calls for r in results)
    assert max(r.seconds for r in results) < engine.compile_seconds[1]  # the compile was not timed


def test_spec_stream_on_compiled_steps_equals_naive_and_compiles_untimed(checkpoint, prompts, naive_outputs,
                                                                        monkeypatch, tmp_path):
    """On a CPU spec_stream calls ``generate(speculative_streaming=True,
    compile_config=CompileConfig())``, as a user would: its "auto" tree chosen for the compiled
    steps that call runs (eager probes less the host time the compiled one-token step saves:
    one probe compile), every cache bucket compiled before the timed call that needs it,
    never again, and the tokens naive's."""
    from huggingface.transformers.generation import tree_search

    shutil.copytree(checkpoint, tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "generation_config.json").read_text())
    config["stream_acceptance"] = [[0.6, 0.2] + [0.0] * 6] * 3  # what fine-tuning stores: "auto" then probes
    config.pop("_from_model_config", None)  # else loading rebuilds the generation config from the model's
    (tmp_path / "tiny" / "generation_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(tree_search, "PROBE_TREES", ((), (2,)))  # two trees to probe
    probed = []
    original = tree_search.probe_step_seconds
    monkeypatch.setattr(tree_search, "probe_step_seconds",
                        lambda model, **kwargs: probed.append((kwargs["mode"], kwargs["trees"])) or original(model, **kwargs))
    engine = build_engine("spec_stream", str(tmp_path / "tiny"), CPU, compile_step=True)
    assert probed[-1] == ("compiled", ((),)) and set(probed[:-1]) == {("eager", ((), (2,)))}  # one probe compile
    assert "generate(speculative_streaming=True, compile_config=CompileConfig()): compiled steps" in engine.description
    results = engine.run_many(prompts, NEW_TOKENS, EOS)  # the first run compiles its cache bucket, untimed
    assert [r.new_tokens for r in results] == naive_outputs
    (runner,) = [r for r in engine.model._tree_runners.values() if r.mode == "compiled"]
    # prompts of 5 to 31 tokens + 24 new: one cache bucket, compiled before timing (the prefill runs eagerly)
    assert [key[0] for key in runner.compile_seconds] == ["step"]
    assert max(r.seconds for r in results) < sum(runner.compile_seconds.values())  # the compile was not timed
    with torch._dynamo.config.patch(error_on_recompile=True):  # from then on, any recompile raises
        assert [r.new_tokens for r in engine.run_many(prompts, NEW_TOKENS, EOS)] == naive_outputs
    assert runner.mode == "compiled" and len(runner.compile_seconds) == 1
    assert [r.forward_calls for r in results] == [len(r.call_seconds) for r in results]  # counted outside it
    if engine.tree_widths:
        assert sum(r.forward_calls for r in results) < sum(len(r.new_tokens) for r in results)
    engine.use_batch_size(2)  # a batch size of its own: compiled by an untimed call first
    batched = engine.run_many(prompts, NEW_TOKENS, EOS, batch_size=2)
    assert [r.new_tokens for r in batched] == naive_outputs and all(r.forward_calls > 0 for r in batched)


def test_local_window_fix_makes_upstreams_static_cache_exact(checkpoint, prompts, naive_outputs):
    """Why the compiled engine replaces upstream GPT-Neo's local attention: upstream's own
    static cache (eager, nothing compiled) puts a local layer's window at the end of the
    cache and changes naive's outputs; with `place_local_windows` the same static cache
    reproduces naive, one prompt at a time and in a left-padded batch. (Should the first
    assertion fail, transformers fixed it: drop `StaticCacheLocalAttention`.)"""

    @torch.no_grad()
    def static_cache_outputs(model, batch_size):
        rows = []
        for start in range(0, len(prompts), batch_size):
            ids, mask, pad = left_padded(prompts[start:start + batch_size], EOS, CPU)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=EOS,
                                 pad_token_id=pad, do_sample=False, cache_implementation="static")
            rows += [until_eos(row, EOS) for row in out[:, ids.shape[1]:].tolist()]
        return rows

    assert static_cache_outputs(load_upstream(checkpoint, "eager").eval(), 1) != naive_outputs
    fixed = place_local_windows(load_upstream(checkpoint, "eager").eval())
    assert any(isinstance(block.attn.attention, StaticCacheLocalAttention) for block in fixed.transformer.h)
    assert static_cache_outputs(fixed, 1) == naive_outputs
    assert static_cache_outputs(fixed, 4) == naive_outputs  # a batch of 4 (left-padded), then one of 2


def test_compiled_says_in_one_line_why_it_cannot_compile(monkeypatch, tmp_path):
    """Without a C++ compiler for inductor the engine is refused before any model is loaded,
    by build_engine and by dataset_tps (`all` leaves it out)."""
    import torch._inductor.cpp_builder as cpp_builder

    import dataset_tps

    def no_compiler():
        raise RuntimeError("no g++ here")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    compile_unavailable.cache_clear()
    try:
        assert "needs a C++ compiler" in ENGINES["compiled"].unavailable(CPU)
        with pytest.raises(UserError, match=r"needs a C\+\+ compiler.*; drop compiled from --model_type$"):
            build_engine("compiled", str(tmp_path / "nothing"), CPU)  # loading would fail: the check comes first
        with pytest.raises(UserError, match=r"needs a C\+\+ compiler"):
            dataset_tps.resolve_engines("naive,compiled", None, CPU)
        assert "compiled" not in dataset_tps.resolve_engines("all", None, CPU)
    finally:
        compile_unavailable.cache_clear()  # the next call asks the real compiler search again


def test_a_failing_compile_makes_the_compiled_engine_unsupported(checkpoint, prompts):
    """A compile that fails anyway: `Unsupported` with the root cause in one line (the
    benchmark's row says it), and again on the next call: nothing runs eagerly under its name."""

    def failing_backend(graph, example_inputs, **options):
        raise RuntimeError("inductor could not build its kernels\nand more lines")
    engine = build_engine("compiled", checkpoint, CPU)
    engine.compile_config.backend = failing_backend
    for _ in range(2):
        with pytest.raises(Unsupported) as refusal:
            engine.run_many(prompts[:2], NEW_TOKENS, EOS)
        assert str(refusal.value) == ("compiled: torch.compile failed at batch 1 "
                                      "(RuntimeError: inductor could not build its kernels)")


def test_every_engine_is_in_the_table_and_the_names():
    table_names = re.findall(r"^\| (\w+)\s+\|", spec_stream.engines.__doc__, flags=re.MULTILINE)
    assert set(table_names) - {"engine"} == set(ENGINE_NAMES) == set(ENGINES)


def test_build_engine_checks_before_loading(tmp_path):
    missing = str(tmp_path / "nothing")  # any load would fail: the checks must come first
    with pytest.raises(UserError, match="unknown engine"):
        build_engine("fast", missing, CPU)
    with pytest.raises(UserError, match="draft model"):
        build_engine("assisted", missing, CPU, draft_model=None)
    with pytest.raises(UserError, match="runs on cpu only"):
        build_engine("int8", missing, torch.device("cuda"))
    with pytest.raises(TypeError, match="unknown settings"):
        build_engine("naive", missing, CPU, tree_width=(2,))


def test_build_engine_hands_each_engine_its_own_settings(checkpoint):
    settings = dict(tree_widths=(2, 2), cuda_graphs=False, draft_model=None, lookup_tokens=4)
    assert build_engine("spec_stream", checkpoint, CPU, **settings).tree_widths == (2, 2)
    static = build_engine("static", checkpoint, CPU, **settings, lookup_branch=3)
    assert static.tree_widths == () and static.lookup_branch == 0  # static takes no lookup branch
    assert build_engine("spec_stream", checkpoint, CPU, **settings, lookup_branch=3).lookup_branch == 3
    assert build_engine("prompt_lookup", checkpoint, CPU, **settings).lookup_tokens == 4
    assert build_engine("half", checkpoint, CPU, half_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert build_engine("no_cache", checkpoint, CPU, half_dtype=torch.bfloat16).dtype == torch.float32
