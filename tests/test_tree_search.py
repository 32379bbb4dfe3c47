"""tree_widths="auto": the tree chosen from acceptance rates and step latencies."""
import pytest
import torch

from huggingface.transformers.generation.tree_search import (
    MAX_WIDTH,
    by_rows,
    candidate_trees,
    choose_tree,
    expected_tokens_per_step,
    measure_acceptance,
    probe_step_seconds,
    stream_share,
    tree_rows,
)
from tests.helpers import phrase_text


def padded(rows):
    return [row + [0.0] * (MAX_WIDTH - len(row)) for row in rows]


ACCEPTANCE = padded([[0.9, 0.05], [0.8, 0.1], [0.1, 0.05]])
LINEAR = {1: 1.0, 301: 31.0}  # 1 + 0.1 * (rows - 1) seconds: exact under linear interpolation


def test_expected_tokens_by_hand():
    assert expected_tokens_per_step((), ACCEPTANCE) == 1.0
    assert expected_tokens_per_step((1, 1, 1), ACCEPTANCE) == pytest.approx(1 + 0.9 + 0.9 * 0.8 + 0.9 * 0.8 * 0.1)
    assert expected_tokens_per_step((2, 2), ACCEPTANCE) == pytest.approx(1 + 0.95 + 0.95 * 0.9)


def test_choice_is_the_hand_computed_best():
    """By hand, tokens per second = expected tokens / (1 + 0.1 * (size - 1)):
    (1,) 1.9/1.1 = 1.73; (1, 1) 2.62/1.2 = 2.18; (1, 1, 1) 2.692/1.3 = 2.07;
    (2, 1) 2.71/1.4 = 1.94; (2, 2) 2.805/1.6 = 1.75; every wider tree is slower still."""
    assert choose_tree(ACCEPTANCE, LINEAR, num_streams=3, stream_share=0.0) == (1, 1)
    assert choose_tree(ACCEPTANCE, LINEAR, num_streams=1, stream_share=0.0) == (1,)


def test_deeper_trees_pay_for_their_stream_rows():
    """A tree of depth D runs D streams at every node in the stream layers. Here the third
    stream is good: counting nodes alone (share 0), (1, 1, 1) makes 3.124 tokens in 1.3 s
    (2.40/s) against (1, 1)'s 2.62 in 1.2 s (2.18/s). With streams in half the layers the
    rows are 4 * (1 + 3/2) = 10 against 3 * (1 + 2/2) = 6: 3.124/1.9 = 1.64/s against
    2.62/1.5 = 1.75/s, and (1, 1) wins ((1,): 1.9/1.2 = 1.58; (2, 1): 2.71/1.9 = 1.43)."""
    good_third = padded([[0.9, 0.05], [0.8, 0.1], [0.7, 0.05]])
    assert choose_tree(good_third, LINEAR, num_streams=3, stream_share=0.0) == (1, 1, 1)
    assert choose_tree(good_third, LINEAR, num_streams=3, stream_share=0.5) == (1, 1)
    assert tree_rows((1, 1, 1), 0.5) == 10 and tree_rows((), 0.5) == 1 and tree_rows((8,), 1 / 6) == 9 * (1 + 1 / 6)


def test_flat_latency_takes_the_smallest_tree_with_the_most_tokens():
    two_ranks = padded([[0.5, 0.3], [0.5, 0.3], [0.5, 0.3]])
    assert choose_tree(two_ranks, {1: 1.0, 512: 1.0}, num_streams=3, stream_share=0.5) == (2, 2, 2)


def test_candidates_are_bounded_and_non_increasing():
    trees = candidate_trees(3)
    assert () in trees and (1, 1, 1) in trees and (8, 4, 2) in trees and (2, 4) not in trees
    assert all(list(t) == sorted(t, reverse=True) and len(t) <= 3 for t in trees)


def test_acceptance_of_a_trained_model(trained_model):
    generator = torch.Generator().manual_seed(31)
    acceptance = measure_acceptance(trained_model, [phrase_text(1, 10 + i, generator) for i in range(6)], 24)
    assert len(acceptance) == 3 and all(len(row) == MAX_WIDTH for row in acceptance)
    assert all(0 <= rate <= 1 for row in acceptance for rate in row)
    assert all(sum(row) <= 1 + 1e-6 for row in acceptance)
    assert acceptance[0][0] > 0.4  # the phrase domain is easy for the first stream


def test_auto_tree_decodes_like_greedy(trained_model):
    generator = torch.Generator().manual_seed(32)
    prompts = [phrase_text(1, 10 + i, generator) for i in range(4)]
    trained_model.generation_config.stream_acceptance = measure_acceptance(trained_model, prompts, 24)
    try:
        chosen = trained_model.auto_tree_widths()
        assert chosen in candidate_trees(3)
        for ids in prompts:
            auto = trained_model.generate(ids, speculative_streaming=True, max_new_tokens=20, eos_token_id=None)
            assert torch.equal(auto, trained_model.generate(ids, do_sample=False, max_new_tokens=20,
                                                            eos_token_id=None, pad_token_id=0))
    finally:
        del trained_model.generation_config.stream_acceptance


def test_probe_measures_every_probe_size(trained_model):
    seconds = probe_step_seconds(trained_model, steps=2)
    assert set(seconds) == {(), (1,), (2,), (3,), (2, 2), (4, 2), (4, 3, 2), (6, 4, 2), (8, 4, 2)}
    assert all(s > 0 for s in seconds.values())


def test_fine_tuning_stores_the_acceptance_auto_trees_read(finetuned_checkpoint, monkeypatch):
    from spec_stream import GPTNeoForCausalLM
    import huggingface.transformers.generation.utils as generation_utils

    output, summary = finetuned_checkpoint
    model = GPTNeoForCausalLM.from_pretrained(output)
    stored = model.generation_config.stream_acceptance
    assert stored == summary["stream_acceptance"]
    assert len(stored) == model.config.num_spec_streams and all(len(row) == MAX_WIDTH for row in stored)
    assert all(0 <= rate <= 1 for row in stored for rate in row) and stored[0][0] > 0
    # generate's "auto" reads the stored rates (the probe stubbed with flat latencies)
    flat = {widths: 1.0 for widths in [(), (1,), (8, 4, 2)]}
    monkeypatch.setattr(generation_utils, "probe_step_seconds", lambda model: flat)
    share = stream_share(model.config)
    assert model.auto_tree_widths() == choose_tree(stored, by_rows(flat, share), model.config.num_spec_streams, share)
