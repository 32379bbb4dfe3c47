"""Trees that carry a prompt-lookup branch beside the streams' drafts: same output as greedy."""
import pytest
import torch

from huggingface.transformers.generation.speculative_tree import (
    LOOKUP,
    build_tree_buffers,
    draft_tree,
    evaluate_paths,
    propose_lookup,
    tree_size,
)
from huggingface.transformers.generation.utils import decode
from spec_stream import FixedShapeDecoder
from tests.helpers import TINY, phrase_text, tiny_model

NEW = 30


def greedy(model, ids, max_new_tokens=NEW):
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)


def hybrid(model, ids, tree_widths=(2, 2), lookup=4, max_new_tokens=NEW):
    return model.generate(ids, speculative_streaming=True, tree_widths=tree_widths, prompt_lookup_num_tokens=lookup,
                          max_new_tokens=max_new_tokens, eos_token_id=None, return_dict_in_generate=True)


def test_lookup_chain_is_one_more_branch():
    tree = build_tree_buffers((2, 2), lookup_length=4)
    assert tree.size == tree_size((2, 2), 4) == 1 + 2 + 4 + 4 and tree.max_depth == 4
    chain = tree.is_lookup.nonzero().flatten().tolist()
    assert tree.depths[chain].tolist() == [1, 2, 3, 4] and tree.topk_ranks[chain].tolist() == [LOOKUP] * 4
    assert tree.parents[chain].tolist() == [0] + chain[:-1]  # a chain hanging from the root
    assert tree.tree_mask[chain[-1]].nonzero().flatten().tolist() == [0] + chain
    assert sorted(tree.path_depths.tolist()) == [2, 2, 2, 2, 4]
    stream_leaf = tree.paths[0]
    assert stream_leaf[2:].tolist() == [stream_leaf[2].item()] * 3  # a short path repeats its leaf


def test_short_paths_never_accept_past_their_leaf():
    """A repeated leaf must not count as more accepted drafts, even when its token equals its
    own prediction (a repeated word)."""
    tree = build_tree_buffers((1,), lookup_length=3)  # nodes: 0 | 1 (stream), 2 (lookup) | 3 | 4
    tokens = torch.tensor([5, 7, 9, 9, 9])
    predictions = torch.tensor([7, 7, 9, 9, 9])  # stream node 1 accepted, and 7 predicts 7 again
    best, accepted = evaluate_paths(tokens, predictions, tree)
    assert int(accepted) == 1 and tree.paths[best][1].item() == 1


def test_draft_fills_the_chain_with_lookup_tokens():
    tree = build_tree_buffers((2,), lookup_length=2)
    stream_logits = torch.zeros(3, 10)
    stream_logits[0, 4], stream_logits[0, 6] = 2.0, 1.0
    tokens = draft_tree(torch.tensor(1), stream_logits, tree, torch.tensor([8, 9]))
    assert tokens.tolist() == [1, 4, 6, 8, 9]


@pytest.mark.parametrize("context, expected", [
    ([1, 2, 3, 9, 1, 2], [3, 9, 1]),      # last 2-gram (1, 2) seen before: what followed it
    ([4, 5, 6, 7, 5], [6, 7, 5]),         # only the 1-gram (5) matches
    ([1, 2, 3, 4], []),                   # no match
    ([3, 1, 2, 8, 1, 2, 7, 2], [7, 2]),   # the latest occurrence wins, cut at the text's end
])
def test_propose_lookup(context, expected):
    assert propose_lookup(context, 3, max_ngram=2) == expected


@pytest.mark.parametrize("tree_widths", [(2, 2), (), (4, 3, 2)])
def test_hybrid_tree_identical_to_greedy_random_weights(tree_widths):
    """Random tiny models repeat themselves now and then: with no stream drafts (``()``)
    the lookup branch alone is accepted; with streams, equal-length stream paths win ties."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    generator = torch.Generator().manual_seed(21)
    from_lookup = 0
    for _ in range(25):
        ids = torch.randint(1, TINY["vocab_size"], (1, int(torch.randint(2, 30, (1,), generator=generator))),
                            generator=generator)
        out = hybrid(model, ids, tree_widths)
        assert torch.equal(out.sequences, greedy(model, ids))
        from_lookup += out.lookup_accepted
    assert from_lookup > 0 or tree_widths  # the branch really was accepted (deterministic seeds)


@pytest.mark.trains
def test_hybrid_tree_on_a_trained_model_uses_both_sources(trained_model):
    generator = torch.Generator().manual_seed(22)
    from_lookup = from_streams = calls = 0
    for i in range(25):
        ids = phrase_text(1, 8 + i, generator)
        out = hybrid(trained_model, ids, (4, 3, 2), lookup=6)
        assert torch.equal(out.sequences, greedy(trained_model, ids))
        from_lookup += out.lookup_accepted
        from_streams += sum(out.accepted_lengths) - len(out.accepted_lengths) - out.lookup_accepted
        calls += out.num_forward_calls
    assert from_lookup > 0 and from_streams > 0
    assert 25 * NEW / calls > 2.0


@pytest.mark.parametrize("tree_widths", [(2, 2), ()])
def test_one_runner_reused_across_prompts_decodes_like_greedy(trained_model, tree_widths):
    """One `FixedShapeDecoder` with a lookup branch, driven by `utils.decode` for prompts of
    many lengths (its cache reused: every request sees the previous one's entries as stale
    slots), gives greedy's tokens and exactly what ``generate`` reports."""
    decoder = FixedShapeDecoder(trained_model, tree_widths, lookup_length=4)
    generator = torch.Generator().manual_seed(23)
    from_lookup = 0
    for i in range(12):
        ids = phrase_text(1, 5 + 2 * i, generator)
        with torch.inference_mode():
            fixed = decode(decoder, trained_model.config, ids, NEW)
        generated = hybrid(trained_model, ids, tree_widths)
        assert torch.equal(fixed.sequences, greedy(trained_model, ids))
        assert torch.equal(fixed.sequences, generated.sequences)
        assert fixed.accepted_lengths == generated.accepted_lengths
        from_lookup += fixed.lookup_accepted
    assert from_lookup > 0 and len(decoder.states) <= 2  # the branch was accepted; caches made once per size


def test_lookup_alone_on_a_model_without_streams_is_prompt_lookup_decoding():
    model = tiny_model(num_spec_streams=0)
    for seed in range(8):
        ids = torch.randint(1, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(seed))
        out = hybrid(model, ids, tree_widths=(), lookup=5)
        assert torch.equal(out.sequences, greedy(model, ids))
