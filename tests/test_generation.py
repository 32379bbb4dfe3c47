"""Tree-draft generation: token-for-token identical to greedy decoding, and faster in calls."""
import pytest
import torch
from transformers import TextStreamer

from huggingface.transformers.generation.speculative_tree import build_tree_buffers, evaluate_paths
from tests.helpers import TINY, phrase_text, tiny_model, upstream_twin

NEW = 30


def prompts(count, seed=0, low=1, high=40):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator)
    return [torch.randint(1, TINY["vocab_size"], (1, int(n)), generator=generator) for n in lengths]


def speculative(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("eos_token_id", None)
    return model.generate(ids, speculative_streaming=True, return_dict_in_generate=True, **kwargs)


def greedy(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("eos_token_id", None)
    return model.generate(ids, do_sample=False, **kwargs)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_random_weights_identical_to_greedy_ours_and_upstream(implementation):
    model = tiny_model(attn_implementation=implementation, num_spec_streams=3, num_stream_layers=2)
    upstream = upstream_twin(model)
    for ids in prompts(50, seed=1):
        out = speculative(model, ids, tree_widths=(4, 3, 2))
        assert torch.equal(out.sequences, greedy(model, ids))
        assert torch.equal(out.sequences, greedy(upstream, ids))
        assert out.num_forward_calls == 1 + len(out.accepted_lengths)
        assert out.sequences.shape[1] - ids.shape[1] == NEW <= 1 + sum(out.accepted_lengths)


@pytest.mark.trains
def test_fine_tuned_model_identical_and_gains_tokens_per_call(trained_model):
    calls = tokens = 0
    generator = torch.Generator().manual_seed(3)
    for i in range(50):
        ids = phrase_text(1, 2 + i % 20, generator)
        out = speculative(trained_model, ids)
        assert torch.equal(out.sequences, greedy(trained_model, ids))
        calls += out.num_forward_calls
        tokens += NEW
    per_call = tokens / calls
    print(f"fine-tuned tiny model: {per_call:.2f} tokens per forward call (tree 4x3x2)")
    assert per_call > 1.5


@pytest.mark.trains
def test_a_shallow_tree_drafts_what_all_streams_would(trained_model, monkeypatch):
    """Trees of depth 1 and 2 run only the first 1 and 2 of the 3 streams: they draft, so
    accept, exactly what they would with all three running."""
    from huggingface.transformers.generation import fixed_shape

    generator = torch.Generator().manual_seed(14)
    prompts = [phrase_text(1, 2 + i, generator) for i in range(15)]
    original = fixed_shape.FixedShapeDecoder.__init__

    def all_streams(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.one_step.num_streams = trained_model.config.num_spec_streams

    for widths in ((4,), (2, 2)):
        trimmed = [speculative(trained_model, ids, tree_widths=widths) for ids in prompts]
        with monkeypatch.context() as patch:
            patch.setattr(fixed_shape.FixedShapeDecoder, "__init__", all_streams)
            trained_model.__dict__.pop("_tree_runners", None)  # runners made before the patch
            full = [speculative(trained_model, ids, tree_widths=widths) for ids in prompts]
        trained_model.__dict__.pop("_tree_runners", None)
        assert [out.accepted_lengths for out in trimmed] == [out.accepted_lengths for out in full]
        steps = sum(len(out.accepted_lengths) for out in trimmed)
        assert steps < len(prompts) * NEW / 1.3  # drafts were accepted: the comparison saw real drafts
        assert all(torch.equal(a.sequences, b.sequences) for a, b in zip(trimmed, full))


def test_model_without_streams_is_plain_greedy():
    model = tiny_model(num_spec_streams=0)
    for ids in prompts(10, seed=2):
        out = speculative(model, ids, tree_widths=())
        assert torch.equal(out.sequences, greedy(model, ids))
        assert out.num_forward_calls == NEW


def test_eos_inside_an_accepted_path_ends_there(trained_model):
    generator = torch.Generator().manual_seed(4)
    checked = 0
    for _ in range(20):
        ids = phrase_text(1, 7, generator)
        out = speculative(trained_model, ids)
        new = out.sequences[0, ids.shape[1]:].tolist()
        emitted = 1
        for gained in out.accepted_lengths:  # a token strictly inside a multi-token step
            if gained >= 3:
                eos = new[emitted + 1]
                if eos not in new[: emitted + 1]:
                    break
            emitted += gained
        else:
            continue
        stopped = speculative(trained_model, ids, eos_token_id=eos)
        assert torch.equal(stopped.sequences, greedy(trained_model, ids, eos_token_id=eos))
        assert stopped.sequences[0, -1] == eos and stopped.sequences.shape[1] == ids.shape[1] + emitted + 2
        checked += 1
    assert checked >= 5


def test_max_new_tokens_is_exact_mid_path(trained_model):
    ids = phrase_text(1, 9, torch.Generator().manual_seed(5))
    for max_new in range(1, 25):
        out = speculative(trained_model, ids, max_new_tokens=max_new)
        assert out.sequences.shape[1] == ids.shape[1] + max_new
        assert torch.equal(out.sequences, greedy(trained_model, ids, max_new_tokens=max_new))


def test_prompt_ending_near_the_context_limit():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    limit = TINY["max_position_embeddings"]
    for prompt_len, max_new in [(limit - 6, 7), (limit - 1, 2), (limit, 1)]:
        ids = prompts(1, seed=prompt_len, low=prompt_len, high=prompt_len + 1)[0]
        out = speculative(model, ids, max_new_tokens=max_new)
        assert torch.equal(out.sequences, greedy(upstream_twin(model), ids, max_new_tokens=max_new))
    with pytest.raises(ValueError, match="context"):
        speculative(model, ids, max_new_tokens=2)


def test_streamer_sees_every_token_in_order(capsys):
    class Collect(TextStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = prompts(1, seed=6)[0]
    streamer = Collect()
    out = speculative(model, ids, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    streamed = [t for chunk in streamer.chunks[1:-1] for t in chunk]
    assert streamed == out.sequences[0, ids.shape[1]:].tolist()
    assert len(streamer.chunks) == 2 + out.num_forward_calls


def test_steps_run_in_inference_mode_and_return_plain_tensors():
    """The loop's forwards run under inference mode (the speed-up `utils.decode` names);
    what generate returns is made outside it: plain tensors a caller may edit in place."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    modes = []
    model.transformer.register_forward_pre_hook(lambda module, args: modes.append(torch.is_inference_mode_enabled()))
    ids = prompts(1, seed=7)[0]
    out = speculative(model, ids, tree_widths=(2, 2), output_scores=True, output_logits=True)
    assert modes and all(modes) and not torch.is_inference_mode_enabled()
    returned = [out.sequences, *out.scores, *out.logits]
    assert len(returned) == 1 + 2 * NEW and not any(t.is_inference() for t in returned)
    out.sequences[0, 0] = 0
    out.scores[0].zero_()  # an inference tensor would raise here


def test_left_padding_is_ignored_for_a_single_prompt():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = prompts(1, seed=7)[0]
    padded = torch.cat([torch.full((1, 4), 3), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    out = speculative(model, padded, attention_mask=mask)
    assert torch.equal(out.sequences[:, 4:], greedy(model, ids))


def test_unsupported_modes_raise_clear_errors():
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    ids = prompts(2, seed=8, low=5, high=6)
    with pytest.raises(ValueError, match="num_beams=2"):  # do_sample=True is supported: tests/test_sampling.py
        speculative(model, ids[0], num_beams=2)
    with pytest.raises(ValueError, match="one prompt at a time"):  # batches decode greedily (tests/test_batch.py)
        speculative(model, torch.cat(ids), do_sample=True)
    with pytest.raises(ValueError, match="levels"):
        speculative(model, ids[0], tree_widths=(2, 2, 2, 2))


def test_upstream_sampling_and_beam_search_still_match_upstream():
    model = tiny_model(attn_implementation="sdpa", num_spec_streams=3, num_stream_layers=2)
    upstream = upstream_twin(model)
    ids = prompts(1, seed=9)[0]
    beams = dict(num_beams=3, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(model.generate(ids, **beams), upstream.generate(ids, **beams))
    sampled = []
    for m in (model, upstream):
        torch.manual_seed(11)
        sampled.append(m.generate(ids, do_sample=True, top_k=20, max_new_tokens=12, eos_token_id=None))
    assert torch.equal(*sampled)


def test_evaluate_paths_takes_the_longest_matching_path():
    tree = build_tree_buffers((2, 2))  # nodes: 0 | 1 2 | 3 4 (children of 1) 5 6 (children of 2)
    tokens = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    predictions = torch.tensor([12, 0, 16, 0, 0, 0, 0, 99])[:7]  # root -> 12 (node 2) -> 16 (node 6)
    best, accepted = evaluate_paths(tokens, predictions, tree)
    assert int(accepted) == 2 and tree.paths[best].tolist() == [0, 2, 6]
    assert tree.size == 7 and tree.tree_mask[6].nonzero().flatten().tolist() == [0, 2, 6]


def test_empty_tree_decodes_one_token_per_call(trained_model):
    """tree_widths=() (the `static` engine) drafts nothing, even with trained streams."""
    ids = phrase_text(1, 10, torch.Generator().manual_seed(11))
    out = speculative(trained_model, ids, tree_widths=())
    assert out.accepted_lengths == [1] * (NEW - 1) and out.num_forward_calls == NEW
    assert torch.equal(out.sequences, greedy(trained_model, ids))


def test_tree_larger_than_64_nodes_near_the_context_end():
    """A 156-node tree in a 96-position context: the cache is sized from the request."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    for prompt_length, max_new in [(20, 30), (60, 36), (90, 6)]:
        ids = prompts(1, seed=prompt_length, low=prompt_length, high=prompt_length + 1)[0]
        out = speculative(model, ids, tree_widths=(5, 5, 5), max_new_tokens=max_new)
        assert torch.equal(out.sequences, greedy(model, ids, max_new_tokens=max_new))
