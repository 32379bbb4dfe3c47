"""Batches (B > 1) of left-padded prompts: every row decodes exactly as it would alone.

Each row of ``generate(input_ids (B, P), attention_mask=..., speculative_streaming=True)``
must equal greedy decoding of that row's prompt alone,
without padding, token for token, right-padded with ``pad_token_id`` to the longest row,
as upstream's batched greedy pads it."""

import pytest
import torch

from huggingface.transformers.generation.request import pack_prompts
from spec_stream import FixedShapeDecoder
from transformers import CompileConfig
from tests.helpers import TINY, phrase_text, tiny_model, upstream_twin

NEW = 24
PAD = 0
TREES = [(), (1, 1, 1), (4, 3, 2)]


def random_rows(count, generator, low=1, high=30):
    lengths = torch.randint(low, high, (count,), generator=generator)
    return [torch.randint(1, TINY["vocab_size"], (int(n),), generator=generator) for n in lengths]


def phrase_rows(count, generator, low=2, high=30):
    lengths = torch.randint(low, high, (count,), generator=generator)
    return [phrase_text(1, int(n), generator)[0] for n in lengths]


def left_padded(rows, pad=PAD):
    """(B, P) prompts padded on the left with ``pad``, and their attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def alone(reference, row, max_new_tokens=NEW, eos=None) -> list[int]:
    """Greedy decoding of one prompt without padding: its new tokens."""
    out = reference.generate(row[None], do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=PAD)
    return out[0, len(row):].tolist()


def expected(ids, new_rows, pad=PAD):
    """The prompts as given, then each row's tokens right-padded to the longest row."""
    longest = max(len(new) for new in new_rows)
    new = torch.tensor([new + [pad] * (longest - len(new)) for new in new_rows], dtype=torch.long)
    return torch.cat([ids, new.reshape(len(new_rows), longest)], dim=1)


def speculative(model, ids, mask, tree_widths, max_new_tokens=NEW, eos=None, **kwargs):
    return model.generate(ids, attention_mask=mask, speculative_streaming=True, tree_widths=tree_widths,
                          max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD,
                          return_dict_in_generate=True, **kwargs)


def early_eos(new_rows) -> int:
    """A token some row emits early (its 3rd), so that rows end at different lengths."""
    return new_rows[0][2]


def check_statistics(out, new_rows, tree_widths):
    """Per-row step statistics: each row's own steps, the batch's calls those of its longest row."""
    assert len(out.accepted_lengths) == len(new_rows) == len(out.tree_sizes)
    for gained, new in zip(out.accepted_lengths, new_rows):
        assert len(new) <= 1 + sum(gained) and all(1 <= n <= 1 + len(tree_widths) for n in gained)
    assert out.num_forward_calls == 1 + max(len(gained) for gained in out.accepted_lengths)


def check_batches(model, reference, rows_of, tree_widths, seed, batches=(2, 3, 5, 8)):
    """With and without an EOS that ends some rows early, against each row alone."""
    generator = torch.Generator().manual_seed(seed)
    ended_early = 0
    for batch in batches:
        rows = rows_of(batch, generator)
        ids, mask = left_padded(rows)
        plain = [alone(reference, row) for row in rows]
        eos = early_eos(plain)
        stopped = [alone(reference, row, eos=eos) for row in rows]
        ended_early += sum(len(new) < NEW for new in stopped)
        for eos_token, new_rows in ((None, plain), (eos, stopped)):
            out = speculative(model, ids, mask, tree_widths, eos=eos_token)
            assert torch.equal(out.sequences, expected(ids, new_rows)), (batch, eos_token)
            check_statistics(out, new_rows, tree_widths)
    assert ended_early > 0  # EOS really cut some rows short


@pytest.mark.parametrize("tree_widths", TREES)
def test_random_weights_every_row_equals_upstream_greedy_alone(tree_widths):
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    check_batches(model, upstream_twin(model), random_rows, tree_widths, seed=1)


@pytest.mark.parametrize("tree_widths", TREES)
def test_trained_model_every_row_equals_its_greedy_alone(trained_model, tree_widths):
    check_batches(trained_model, trained_model, phrase_rows, tree_widths, seed=2, batches=(2, 4, 6, 8))


@pytest.mark.trains
def test_trained_model_batches_still_gain_several_tokens_per_call(trained_model):
    generator = torch.Generator().manual_seed(3)
    rows = phrase_rows(6, generator)
    ids, mask = left_padded(rows)
    out = speculative(trained_model, ids, mask, (4, 3, 2))
    tokens = sum(1 + sum(gained) for gained in out.accepted_lengths)
    steps = sum(1 + len(gained) for gained in out.accepted_lengths)
    assert tokens / steps > 1.5  # each row accepts its own drafts


def test_a_compiled_batch_equals_each_row_alone(trained_model):
    """``compile_config``: the compiled step of a batch size, finished rows running on."""
    generator = torch.Generator().manual_seed(4)
    rows = phrase_rows(3, generator)
    eos = early_eos([alone(trained_model, row) for row in rows])
    ids, mask = left_padded(rows)
    out = speculative(trained_model, ids, mask, (2, 2), eos=eos, compile_config=CompileConfig())
    assert torch.equal(out.sequences, expected(ids, [alone(trained_model, row, eos=eos) for row in rows]))
    assert any(r.mode == "compiled" and ("step", 3, r.state.cache.max_length, False) in r.compile_seconds
               for r in trained_model._tree_runners.values())


def test_prompts_near_the_context_end_beside_short_ones():
    """The longest row nears the context's end (its positions are clamped, the drafts past
    the end ignored); the short rows are unaffected."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, attn_implementation="sdpa")
    reference = upstream_twin(model)
    context = TINY["max_position_embeddings"]
    generator = torch.Generator().manual_seed(5)
    for long_length, max_new in [(context - 10, 11), (context - 1, 2)]:
        rows = random_rows(3, generator, 1, 12) + random_rows(1, generator, long_length, long_length + 1)
        ids, mask = left_padded(rows)
        want = expected(ids, [alone(reference, row, max_new) for row in rows])
        assert torch.equal(speculative(model, ids, mask, (4, 3, 2), max_new).sequences, want)


def test_scores_only_processors_apply_row_by_row(trained_model):
    """Processors that read the scores alone (suppress_tokens) serve batches, eager and compiled."""
    generator = torch.Generator().manual_seed(6)
    rows = phrase_rows(4, generator)
    ids, mask = left_padded(rows)
    suppressed = alone(trained_model, rows[0])[:2]
    new_rows = [trained_model.generate(row[None], do_sample=False, max_new_tokens=NEW, eos_token_id=None,
                                       suppress_tokens=suppressed)[0, len(row):].tolist() for row in rows]
    for step in ({}, dict(compile_config=CompileConfig())):
        out = speculative(trained_model, ids, mask, (2, 2), suppress_tokens=suppressed, **step)
        assert torch.equal(out.sequences, expected(ids, new_rows))


def test_auto_tree_is_chosen_for_the_batch_size(trained_model, monkeypatch):
    """generate's "auto" probes step latencies at the request's batch size: probed latencies
    that ignore the rows at batch 1 (drafts cost nothing: a tree) and grow with them at batch
    4 (every draft costs a row: none) give a tree alone and no drafts in the batch; each
    row still decodes as it would alone."""
    import huggingface.transformers.generation.tree_search as tree_search_module
    from huggingface.transformers.generation.tree_search import stream_share, tree_rows

    share = stream_share(trained_model.config)
    def probe(model, batch_size=1, **kwargs):
        slope = 0.0 if batch_size == 1 else 1.0
        return {w: 1.0 + slope * (tree_rows(w, share) - 1) for w in [(), (1,), (2, 2), (8, 4, 2)]}
    monkeypatch.setattr(tree_search_module, "probe_step_seconds", probe)
    monkeypatch.setitem(trained_model.__dict__, "_step_seconds_by_device", {})
    monkeypatch.setattr(trained_model.generation_config, "stream_acceptance",
                        [[0.5, 0.2] + [0.0] * 6] * 3, raising=False)
    rows = phrase_rows(4, torch.Generator().manual_seed(9))
    ids, mask = left_padded(rows)
    batch = speculative(trained_model, ids, mask, "auto")
    assert all(size == 1 for sizes in batch.tree_sizes for size in sizes)
    assert torch.equal(batch.sequences, expected(ids, [alone(trained_model, row) for row in rows]))
    single = speculative(trained_model, rows[0][None], torch.ones_like(rows[0][None]), "auto")
    assert max(single.tree_sizes) > 1
    assert set(trained_model.__dict__["_step_seconds_by_device"]) == {("cpu", 4, "eager"), ("cpu", 1, "eager")}


def test_one_runner_serves_several_batch_sizes(trained_model):
    trained_model.__dict__.pop("_tree_runners", None)
    generator = torch.Generator().manual_seed(7)
    for batch in (3, 1, 3, 2):
        rows = phrase_rows(batch, generator)
        ids, mask = left_padded(rows)
        out = speculative(trained_model, ids, mask, (4, 3, 2), max_new_tokens=NEW)
        assert torch.equal(out.sequences, expected(ids, [alone(trained_model, row) for row in rows]))
    (runner,) = trained_model._tree_runners.values()
    assert sorted({batch for batch, _ in runner.states}) == [1, 2, 3]


def test_fixed_shape_batch_step_never_syncs_the_host(trained_model):
    from tests.test_fixed_shape import steps_without_host_sync

    decoder = FixedShapeDecoder(trained_model, (4, 3, 2), prefill_buckets=(16,))
    rows = phrase_rows(3, torch.Generator().manual_seed(8), 4, 14)
    packed, lengths = pack_prompts(*left_padded(rows))  # each row's prompt from slot 0
    steps_without_host_sync(decoder, packed, prompt_lengths=lengths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_batches_equal_eager(trained_model):
    model = trained_model.cuda()
    generator = torch.Generator().manual_seed(9)
    try:
        for batch in (4, 2, 4):
            ids, mask = left_padded(phrase_rows(batch, generator))
            ids, mask = ids.cuda(), mask.cuda()
            eos = int(ids[0, -1])
            assert torch.equal(speculative(model, ids, mask, (4, 3, 2), eos=eos).sequences,
                               speculative(model, ids, mask, (4, 3, 2), eos=eos, disable_compile=True).sequences)
        (graphed,) = [r for r in model._tree_runners.values() if r.mode == "cuda_graphs"]
        assert {key[1] for key in graphed.graphs if key[0] == "step"} == {2, 4}
    finally:
        trained_model.cpu()
        trained_model.__dict__.pop("_tree_runners", None)


def test_bad_batches_are_clear_errors():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    rows = random_rows(3, torch.Generator().manual_seed(10), 3, 9)
    ids, mask = left_padded(rows)
    with pytest.raises(ValueError, match="left padding only"):  # right padding
        speculative(model, ids, mask.flip(1), (2, 2))
    with pytest.raises(ValueError, match="pass the attention_mask"):  # padding (pad = EOS) read as text
        model.generate(ids, speculative_streaming=True, max_new_tokens=4, eos_token_id=PAD, pad_token_id=PAD)
    for setting in (dict(do_sample=True), dict(repetition_penalty=1.3), dict(prompt_lookup_num_tokens=3),
                    dict(output_scores=True)):
        with pytest.raises(ValueError, match="one prompt at a time"):
            speculative(model, ids, mask, (2, 2), **setting)
    from huggingface.transformers.generation.utils import decode
    with pytest.raises(ValueError, match="pad_token_id"):  # rows may end apart: what pads them?
        decode(FixedShapeDecoder(model, (2, 2)), model.config, ids, 4, {5}, attention_mask=mask)
