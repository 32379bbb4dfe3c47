"""tree_widths="auto": the tree chosen from acceptance rates and step latencies."""
import pytest
import torch

from huggingface.transformers.generation.tree_search import (
    MAX_WIDTH,
    by_rows,
    candidate_trees,
    choose_tree,
    expected_tokens_per_step,
    probe_step_seconds,
    resolve_tree,
    stream_share,
    tree_rows,
)
from spec_stream.acceptance import measure_acceptance, measure_lookup_acceptance, replayed_accepted_lengths
from tests.helpers import phrase_text


def padded(rows):
    return [row + [0.0] * (MAX_WIDTH - len(row)) for row in rows]


ACCEPTANCE = padded([[0.9, 0.05], [0.8, 0.1], [0.1, 0.05]])
LINEAR = {1: 1.0, 301: 31.0}  # 1 + 0.1 * (rows - 1) seconds: exact under linear interpolation


def test_expected_tokens_by_hand():
    assert expected_tokens_per_step((), ACCEPTANCE) == 1.0
    assert expected_tokens_per_step((1, 1, 1), ACCEPTANCE) == pytest.approx(1 + 0.9 + 0.9 * 0.8 + 0.9 * 0.8 * 0.1)
    assert expected_tokens_per_step((2, 2), ACCEPTANCE) == pytest.approx(1 + 0.95 + 0.95 * 0.9)


def test_expected_tokens_with_a_lookup_chain_by_hand():
    """Depth 1: streams 0.9 or lookup 0.6: 1 - 0.1 * 0.4 = 0.96; depth 2: streams
    0.9 * 0.8 = 0.72 or lookup 0.6 * 0.5 = 0.3: 1 - 0.28 * 0.7 = 0.804; depth 3: lookup
    alone, 0.3 * 0.5 = 0.15 (a chain of 3 nodes beside a tree of depth 2)."""
    lookup = [0.6, 0.5, 0.5, 0.5]
    assert expected_tokens_per_step((1, 1), ACCEPTANCE, lookup, 3) == pytest.approx(1 + 0.96 + 0.804 + 0.15)
    assert expected_tokens_per_step((), ACCEPTANCE, lookup, 2) == pytest.approx(1 + 0.6 + 0.3)
    assert expected_tokens_per_step((1, 1), ACCEPTANCE, lookup, 0) == expected_tokens_per_step((1, 1), ACCEPTANCE)


def test_a_strong_lookup_chain_leaves_less_for_the_streams():
    """With streams in half the layers and a 4-node chain: ``()`` costs 5 rows, 1.4 s;
    (1,) 6 * 1.5 = 9 rows, 1.8 s. Unmeasured chain: 1.0/1.4 = 0.71 against 1.9/1.8 =
    1.06 tokens/s, the streams pay. A chain right 0.9 of the time at every depth: () makes
    1 + 0.9 + 0.81 + 0.729 + 0.656 = 4.10 tokens, 2.93/s; (1,) adds 0.9's chance at depth
    1 alone, 4.19 tokens, 2.33/s: the chain alone wins."""
    strong = [0.9] * 8
    assert choose_tree(ACCEPTANCE, LINEAR, num_streams=1, stream_share=0.5, lookup_length=4) == (1,)
    assert choose_tree(ACCEPTANCE, LINEAR, num_streams=1, stream_share=0.5, lookup_length=4,
                       lookup_acceptance=strong) == ()


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


def test_a_lookup_chain_is_paid_for_in_every_candidate():
    """Second level good enough for (1, 1) alone: 2.44 tokens in 1 + 0.1 * (6 - 1) = 1.5 s
    (1.63/s) against (1,)'s 1.9 in 1.2 s (1.58/s). Beside a 20-node lookup chain every node
    of which runs the tree's streams in half the layers: (1, 1) has 23 * 2 = 46 rows, 5.5 s
    (0.44/s); (1,) 22 * 1.5 = 33 rows, 4.2 s (0.45/s): the shallower tree wins."""
    second_good = padded([[0.9], [0.6], [0.0]])
    assert choose_tree(second_good, LINEAR, num_streams=3, stream_share=0.5) == (1, 1)
    assert choose_tree(second_good, LINEAR, num_streams=3, stream_share=0.5, lookup_length=20) == (1,)
    assert tree_rows((1, 1), 0.5, lookup_length=20) == 46


def test_flat_latency_takes_the_smallest_tree_with_the_most_tokens():
    two_ranks = padded([[0.5, 0.3], [0.5, 0.3], [0.5, 0.3]])
    assert choose_tree(two_ranks, {1: 1.0, 512: 1.0}, num_streams=3, stream_share=0.5) == (2, 2, 2)


def test_candidates_are_bounded_and_non_increasing():
    trees = candidate_trees(3)
    assert () in trees and (1, 1, 1) in trees and (8, 4, 2) in trees and (2, 4) not in trees
    assert all(list(t) == sorted(t, reverse=True) and len(t) <= 3 for t in trees)


@pytest.mark.trains
def test_acceptance_of_a_trained_model(trained_model):
    generator = torch.Generator().manual_seed(31)
    acceptance = measure_acceptance(trained_model, [phrase_text(1, 10 + i, generator) for i in range(6)], 24)
    assert len(acceptance) == 3 and all(len(row) == MAX_WIDTH for row in acceptance)
    assert all(0 <= rate <= 1 for row in acceptance for rate in row)
    assert all(sum(row) <= 1 + 1e-6 for row in acceptance)
    assert acceptance[0][0] > 0.4  # the phrase domain is easy for the first stream


@pytest.mark.trains
def test_lookup_acceptance_of_a_repetitive_domain(trained_model):
    """The phrase domain repeats 10 fixed phrases: the text's last tokens have occurred
    before, so a lookup chain is often right; rates are chances, falling with depth no
    faster than to 0."""
    generator = torch.Generator().manual_seed(33)
    prompts = [phrase_text(1, 30 + i, generator) for i in range(4)]
    rates = measure_lookup_acceptance(trained_model, prompts, max_new_tokens=24, length=4)
    assert len(rates) == 4 and all(0 <= rate <= 1 for rate in rates)
    assert rates[0] > 0.3


def test_a_continuation_ended_early_offers_no_positions(trained_model):
    """Acceptance counts greedy text up to its end-of-sequence token; a prompt whose
    continuation ends before the deepest stream's target gives no positions, not an error."""
    from spec_stream.acceptance import _draft_ranks

    assert _draft_ranks(trained_model, torch.tensor([[1, 2, 3, 4]]), 3, 3).shape == (0, 3)


def test_lookup_acceptance_counts_by_hand():
    """Text 1 2 3 1 2 | 3 1 2 9 (prompt | greedy). The first lookup comes after the
    prefill's token (3), as in decoding; each follows the latest earlier occurrence of the
    last 2 tokens: after "2 3" -> 1 2 (right, right); after "3 1" -> 2 3 (right, wrong:
    9); after "1 2" -> 3 (wrong). Depth 1: 2 of 3; depth 2: 1 of 2."""
    class Greedy:  # a model whose greedy continuation is known
        def generate(self, ids, **kwargs):
            return torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 9]])

    rates = measure_lookup_acceptance(Greedy(), [torch.tensor([[1, 2, 3, 1, 2]])], max_new_tokens=4, length=2)
    assert rates == pytest.approx([2 / 3, 1 / 2])


def test_auto_tree_decodes_like_greedy(trained_model):
    generator = torch.Generator().manual_seed(32)
    prompts = [phrase_text(1, 10 + i, generator) for i in range(4)]
    trained_model.generation_config.stream_acceptance = measure_acceptance(trained_model, prompts, 24)
    try:
        chosen = resolve_tree(trained_model, "auto").widths
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


def test_probe_takes_turns_so_a_slow_spell_slows_every_tree_alike(trained_model, monkeypatch):
    """The machine runs 3x slower for one turn of the probe: timed one tree after the other,
    the trees timed then would look 3x dearer and win or lose the choice for it; taking
    turns, every tree's median is its own cost (a step costs 1 + the tree's depth, plus 5
    for the first step after another tree's, which `PROBE_SETTLE` leaves untimed)."""
    import huggingface.transformers.generation.tree_search as tree_search_module

    trees = [(), (1,), (2, 2)]
    per_turn = len(trees) * (tree_search_module.PROBE_SETTLE + tree_search_module.PROBE_BURST)
    slow_steps = range(len(trees) + per_turn + 1, len(trees) + 2 * per_turn + 1)  # the second turn
    clock = {"now": 0.0, "steps": 0, "last": None}

    modes = []

    class FakeSteps:  # stands in for the `FixedShapeDecoder` each probe tree gets
        def __init__(self, model, widths, mode, compile_prefill=True):
            self.depth = len(widths)
            modes.append((mode, compile_prefill))

        def prefill(self, ids, max_new_tokens):
            pass

        def step(self, remaining, timer):
            clock["steps"] += 1
            slow = 3.0 if clock["steps"] in slow_steps else 1.0
            switch = 5.0 if clock["last"] is not self else 0.0
            clock["last"] = self
            clock["now"] += slow * (1 + self.depth) + switch
            return torch.zeros(1)

    monkeypatch.setattr(tree_search_module.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(tree_search_module, "FixedShapeDecoder", FakeSteps)
    seconds = probe_step_seconds(trained_model, steps=8, trees=trees, mode="compiled")
    assert modes == [("compiled", False)] * len(trees)  # the mode asked for; steps timed, prefills not compiled
    turns = -(-8 // tree_search_module.PROBE_BURST)
    assert clock["steps"] == len(trees) + turns * per_turn  # a warm-up step each, then 8 timed steps or more
    assert seconds == {(): 1.0, (1,): 2.0, (2, 2): 3.0}


def test_fine_tuning_stores_the_acceptance_auto_trees_read(finetuned_checkpoint, monkeypatch):
    from spec_stream import GPTNeoForCausalLM
    import huggingface.transformers.generation.tree_search as tree_search_module

    output, summary = finetuned_checkpoint
    model = GPTNeoForCausalLM.from_pretrained(output)
    stored = model.generation_config.stream_acceptance
    assert stored == summary["stream_acceptance"]
    lookup = model.generation_config.lookup_acceptance
    assert lookup == summary["lookup_acceptance"] and len(lookup) == 8 and all(0 <= rate <= 1 for rate in lookup)
    assert len(stored) == model.config.num_spec_streams and all(len(row) == MAX_WIDTH for row in stored)
    assert all(0 <= rate <= 1 for row in stored for rate in row) and stored[0][0] > 0
    # generate's "auto" reads the stored rates (the probe stubbed with flat latencies)
    flat = {widths: 1.0 for widths in [(), (1,), (8, 4, 2)]}
    monkeypatch.setattr(tree_search_module, "probe_step_seconds", lambda model, **kwargs: flat)
    share = stream_share(model.config)
    mean_new_tokens = model.generation_config.mean_new_tokens  # the greedy outputs' length, planned for
    assert mean_new_tokens == summary["mean_new_tokens"] and (mean_new_tokens is None or 1 <= mean_new_tokens < 43.2)
    new_tokens = None if mean_new_tokens is None else round(mean_new_tokens)
    assert resolve_tree(model, "auto").widths == choose_tree(stored, by_rows(flat, share), model.config.num_spec_streams,
                                                             share, new_tokens=new_tokens)


def test_replayed_steps_on_a_models_own_text_are_its_decoding_steps(trained_model):
    """Replaying a tree on the model's own greedy text gains, step by step, what decoding
    with that tree gains (the last step aside: the length limit cuts decoding's)."""
    generator = torch.Generator().manual_seed(40)
    for widths in [(1,), (2, 2), (4, 3, 2)]:
        for length in (6, 13, 21):
            ids = phrase_text(1, length, generator)
            text = trained_model.generate(ids, speculative_streaming=True, tree_widths=(), max_new_tokens=20,
                                          eos_token_id=None)
            decoded = trained_model.generate(ids, speculative_streaming=True, tree_widths=widths, max_new_tokens=20,
                                             eos_token_id=None, return_dict_in_generate=True)
            replayed = replayed_accepted_lengths(trained_model, text, length, widths)
            assert len(replayed) == len(decoded.accepted_lengths) and replayed[:-1] == decoded.accepted_lengths[:-1]
            assert sum(replayed) == 19 and max(decoded.accepted_lengths) > 1  # drafts were accepted


def test_tokens_per_call_on_the_originals_texts_is_its_decodings(finetuned_checkpoint, data_dir, capsys):
    """scripts/tokens_per_call_on_texts.py: for the original itself, the replayed figure is
    the one its decoding reaches on the same prompts (tokens over forward calls)."""
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from spec_stream import GPTNeoForCausalLM
    from spec_stream.data import load_examples

    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        import tokens_per_call_on_texts
    finally:
        sys.path.remove(scripts)
    checkpoint = str(finetuned_checkpoint[0])
    assert tokens_per_call_on_texts.main([checkpoint, "--original", checkpoint, "--dataset", "e2e_nlg", "--data-dir",
                                          str(data_dir), "--num-samples", "4", "--max-new-tokens", "16",
                                          "--tree-widths", "2,2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].split(": ")[1] == lines[2].split(": ")[1]
    model, tokenizer = GPTNeoForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    tokens = calls = 0
    for example in load_examples("e2e_nlg", "test", data_dir, limit=4):
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids
        out = model.generate(ids, speculative_streaming=True, tree_widths=(2, 2), max_new_tokens=16,
                             return_dict_in_generate=True)
        tokens, calls = tokens + out.sequences.shape[1] - ids.shape[1], calls + out.num_forward_calls
    assert lines[1].endswith(f": {tokens / calls:.3f} tokens per call ({calls} calls)") and calls < tokens


def test_auto_probes_the_steps_of_the_mode_it_decodes_in(monkeypatch):
    """"auto" times the runner ``generate`` will decode with, after a short and a long prompt:
    eager steps on the nine probe trees; for compiled steps the same eager probes plus the
    compiled one-token step once (one compile), each probed once per model, device, batch
    size and mode."""
    import huggingface.transformers.generation.tree_search as tree_search_module
    from tests.helpers import tiny_model

    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    model.generation_config.stream_acceptance = ACCEPTANCE
    calls = []

    def probe(model, **kwargs):
        calls.append(kwargs)
        return {(): 1.0, (1,): 1.1, (1, 1): 1.2, (8, 4, 2): 50.0}

    monkeypatch.setattr(tree_search_module, "probe_step_seconds", probe)
    share = stream_share(model.config)
    expected = choose_tree(ACCEPTANCE, by_rows(probe(model), share), 3, share)
    calls.clear()
    assert expected != () and resolve_tree(model, "auto").widths == expected
    assert resolve_tree(model, "auto", mode="eager").widths == expected
    assert resolve_tree(model, "auto", mode="compiled").widths == expected
    contexts = sorted({min(c, model.config.max_position_embeddings // 2) for c in tree_search_module.PROBE_CONTEXTS})
    eager = [dict(prompt_length=length, batch_size=1, trees=tree_search_module.PROBE_TREES, mode="eager")
             for length in contexts]  # (a model of few positions probes at half its context, once)
    assert calls == eager + eager + [dict(prompt_length=contexts[0], batch_size=1, trees=((),), mode="compiled")]
    resolve_tree(model, "auto", batch_size=2)
    assert calls[-1] == dict(prompt_length=contexts[-1], batch_size=2, trees=tree_search_module.PROBE_TREES,
                             mode="eager")


def test_short_outputs_and_small_gains_keep_the_one_token_step():
    """A step of (1, 1) gains 2.62 tokens at 1.2x the one-token step's cost: 2.18x faster on a
    long output. For 2 new tokens every tree needs its one step (the prefill gives the first
    token): nothing to gain, () is kept. For 4: () needs 3 steps (3 s), (1, 1) ceil(3 / 2.62) =
    2 (2.4 s), (1,) ceil(3 / 1.9) = 2 (2.2 s): (1,) is 1.36x faster, so it is taken. A tree
    expected less than `MIN_GAIN` faster is not taken."""
    from huggingface.transformers.generation.tree_search import MIN_GAIN

    assert choose_tree(ACCEPTANCE, LINEAR, num_streams=3, stream_share=0.0) == (1, 1)
    assert choose_tree(ACCEPTANCE, LINEAR, num_streams=3, stream_share=0.0, new_tokens=2) == ()
    assert choose_tree(ACCEPTANCE, LINEAR, num_streams=3, stream_share=0.0, new_tokens=4) == (1,)
    barely = padded([[(MIN_GAIN - 1) * 0.99, 0.0]])  # (1,) at ()'s cost: just short of MIN_GAIN
    assert choose_tree(barely, {1: 1.0, 2: 1.0}, num_streams=1, stream_share=0.0) == ()
    enough = padded([[(MIN_GAIN - 1) * 1.01, 0.0]])
    assert choose_tree(enough, {1: 1.0, 2: 1.0}, num_streams=1, stream_share=0.0) == (1,)


def test_step_costs_follow_the_requests_context():
    """Costs by rows probed after 64 and 512 tokens: a request at 288 tokens of context is
    charged halfway between, one past 512 beyond it, one before 64 the short context's."""
    from huggingface.transformers.generation.tree_search import seconds_at_context

    costs = {64: {1.0: 1.0, 5.0: 2.0}, 512: {1.0: 2.0, 5.0: 6.0}}
    assert seconds_at_context(costs, 288) == {1.0: 1.5, 5.0: 4.0}
    assert seconds_at_context(costs, 960) == {1.0: 3.0, 5.0: 10.0}
    assert seconds_at_context(costs, 10) == {1.0: 1.0, 5.0: 2.0}


def test_a_long_context_can_turn_a_tree_off(monkeypatch):
    """A tree that pays after a short prompt but whose cost grows with the context: "auto"
    takes it for a short prompt and the one-token step for a long one (the request's own)."""
    import huggingface.transformers.generation.tree_search as tree_search_module
    from tests.helpers import tiny_model

    model = tiny_model(num_spec_streams=3, num_stream_layers=2, max_position_embeddings=1024)
    model.generation_config.stream_acceptance = padded([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    monkeypatch.setattr(tree_search_module, "probe_step_seconds",
                        lambda model, prompt_length, **kwargs: {(): 1.0, (1,): 1.2 if prompt_length < 100 else 2.0})
    assert resolve_tree(model, "auto", prompt_length=30, max_new_tokens=64).widths == (1,)
    assert resolve_tree(model, "auto", prompt_length=480, max_new_tokens=64).widths == ()


def test_compiled_steps_are_the_eager_ones_less_the_host_time(monkeypatch):
    """Eager () 3 ms after the short prompt, compiled () 1 ms there: 2 ms of host time, taken
    off every eager step at both contexts; a step never estimated below the compiled
    one-token step (a (1,) step whose eager time was mostly host)."""
    import huggingface.transformers.generation.tree_search as tree_search_module
    from tests.helpers import tiny_model

    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    probed = []
    monkeypatch.setattr(tree_search_module, "probe_step_seconds",
                        lambda model, **kwargs: probed.append(kwargs["prompt_length"]) or {(): 1.0})
    eager = {64: {(): 3.0, (1,): 2.5, (4, 3, 2): 9.0}, 512: {(): 4.0, (1,): 5.0, (4, 3, 2): 12.0}}
    estimate = tree_search_module.compiled_step_seconds(model, eager, 1)
    assert estimate == {64: {(): 1.0, (1,): 1.0, (4, 3, 2): 7.0}, 512: {(): 2.0, (1,): 3.0, (4, 3, 2): 10.0}}
    assert probed == [64]  # one compiled probe, at the short context


@pytest.mark.parametrize("mean", ["eleven", -3, 0, float("nan"), True])
def test_a_bad_stored_output_length_is_named(mean):
    """A hand-edited ``mean_new_tokens`` that is no positive number: a ValueError naming the
    field and the fix, before any probe or decoding."""
    from tests.helpers import tiny_model

    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    model.generation_config.stream_acceptance = ACCEPTANCE
    model.generation_config.mean_new_tokens = mean
    with pytest.raises(ValueError, match="mean_new_tokens.*positive number"):
        resolve_tree(model, "auto", max_new_tokens=20)
    assert "_step_seconds_by_device" not in model.__dict__  # nothing probed
