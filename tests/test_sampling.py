"""Sampling with speculative streaming: the same distribution as plain sampling.

Statistical tests (chi-square, strict level) compare speculative samples with plain
`generate(do_sample=True)` samples of a trained tiny model, per position and on the joint
of the first three tokens; a deliberately wrong verification (accept a child whenever it
is the argmax) must fail the same tests. Exact tests check each token's distribution
against plain generate's scores, and that a seed fixes the output in every step mode."""
import contextlib
from collections import Counter

import pytest
import torch

from huggingface.transformers.generation import speculative_tree
from huggingface.transformers.generation.speculative_tree import (
    build_tree_buffers,
    sample_from,
    sample_path,
    uniforms_shape,
    valid_drafts,
)
from huggingface.transformers.generation.request import NodeScorer
from spec_stream import FixedShapeDecoder
from transformers import CompileConfig, GenerationConfig
from tests.helpers import PHRASES, TINY, phrase_text, tiny_model
from tests.test_fixed_shape import HostSyncDetector

ALPHA = 1e-3  # strict: a correct sampler fails one of these tests about once in a thousand seeds


# ----------------------------------------------------------------------------------------
# chi-square tests
# ----------------------------------------------------------------------------------------
def pooled(observed: torch.Tensor, expected: torch.Tensor):
    """Columns whose smallest expected count is below 5 are pooled into one."""
    small = (expected < 5).any(dim=0)
    if small.sum() < 2:
        return observed, expected
    keep = lambda table: torch.cat([table[:, ~small], table[:, small].sum(dim=1, keepdim=True)], dim=1)
    return keep(observed), keep(expected)


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor, dof_lost: int) -> float:
    """Pearson's test: p-value of the statistic for (rows, categories) counts."""
    observed, expected = pooled(observed.double(), expected.double())
    statistic = ((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum()
    dof = observed.numel() - dof_lost
    if dof <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), statistic / 2))


def homogeneity_p_value(first: list, second: list) -> float:
    """Do two samples of hashable outcomes come from one distribution?"""
    categories = sorted(set(first) | set(second), key=repr)
    counts = [Counter(first), Counter(second)]
    table = torch.tensor([[c[k] for k in categories] for c in counts], dtype=torch.double)
    expected = table.sum(dim=1, keepdim=True) * table.sum(dim=0, keepdim=True) / table.sum()
    observed, expected = pooled(table, expected)
    return chi_square_p_value(observed, expected, dof_lost=observed.shape[1] + 1)


def goodness_of_fit_p_value(samples: list, probabilities: dict) -> float:
    """Do the samples follow ``probabilities`` (outcome -> probability, summing to 1)?"""
    counts = Counter(samples)
    assert set(counts) <= set(probabilities)
    outcomes = list(probabilities)
    observed = torch.tensor([[counts[k] for k in outcomes]], dtype=torch.double)
    expected = torch.tensor([[probabilities[k] * len(samples) for k in outcomes]], dtype=torch.double)
    return chi_square_p_value(observed, expected, dof_lost=1)


def distribution_p_values(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Homogeneity p-values per position and for the joint of the first three tokens."""
    result = {f"position {i}": homogeneity_p_value(first[:, i].tolist(), second[:, i].tolist())
              for i in range(first.shape[1])}
    joint = lambda samples: [tuple(row) for row in samples[:, :3].tolist()]
    result["first three"] = homogeneity_p_value(joint(first), joint(second))
    return result


def accept_argmax_child(probabilities, child_tokens, candidate, uniforms):
    """The deliberately wrong rule: as `accept_first_child`, but a child holding the argmax
    is always accepted (probability 1 instead of p(x))."""
    mass = probabilities.gather(0, child_tokens.clamp(min=0)) * candidate
    left = (1 - (mass.cumsum(dim=0) - mass)).clamp(min=0)
    accept = candidate & ((uniforms * left < mass) | (child_tokens == probabilities.argmax()))
    return accept.any(), accept.int().argmax()


# ----------------------------------------------------------------------------------------
# the verification walk on its own: exact reference by enumeration
# ----------------------------------------------------------------------------------------
def walk_distribution(tree, tokens, probabilities, valid, node=0, prefix=()):
    """Exact law of the tokens one `sample_path` call emits: accepted drafts and the token
    after them (outcome -> probability), each token drawn from its node's distribution."""
    children = {}
    for child in tree.children[node].tolist():
        if child >= 0 and valid[child] and int(tokens[child]) not in children:
            children[int(tokens[child])] = child
    result = {}
    for token, p in enumerate(probabilities[node].tolist()):
        if p == 0:
            continue
        if token in children:
            for outcome, q in walk_distribution(tree, tokens, probabilities, valid, children[token],
                                                prefix + (token,)).items():
                result[outcome] = result.get(outcome, 0.0) + p * q
        else:
            result[prefix + (token,)] = result.get(prefix + (token,), 0.0) + p
    return result


def walk_samples(tree, tokens, probabilities, valid, count, seed):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        path, accepted, token = sample_path(tokens, probabilities, valid, tree,
                                            torch.rand(uniforms_shape(tree), generator=generator))
        samples.append(tuple(tokens[path[1: int(accepted) + 1]].tolist()) + (int(token),))
    return samples


def walk_case(seed=0, vocab=6):
    """A tree of several branches with a lookup chain whose tokens repeat stream drafts,
    its last lookup node filler (only one token offered), and random node distributions in
    which, as with trained streams, a node's first draft is often the most likely token."""
    tree = build_tree_buffers((3, 2), lookup_length=2)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([0, 1, 2, 3, 2, 4, 5, 4, 5, 4, 5, 4])  # root | 1 2 3, lookup 2 | 4 5 (x3), lookup filler
    assert len(tokens) == tree.size
    logits = torch.randn(tree.size, vocab, generator=generator)
    first_draft = tokens[tree.children[:, 0].clamp(min=0)]
    logits[torch.arange(tree.size), first_draft] += 2.0
    logits[:, 0] = -float("inf")  # a token no node can emit
    return tree, tokens, logits.softmax(dim=-1), valid_drafts(tree, 1)


def test_walk_emits_each_token_from_its_node_distribution():
    tree, tokens, probabilities, valid = walk_case()
    exact = walk_distribution(tree, tokens, probabilities, valid)
    assert sum(exact.values()) == pytest.approx(1.0)
    samples = walk_samples(tree, tokens, probabilities, valid, 20000, seed=1)
    assert max(len(outcome) for outcome in samples) == 3  # whole paths were accepted
    assert goodness_of_fit_p_value(samples, exact) > ALPHA


def test_walk_with_the_wrong_rule_is_caught(monkeypatch):
    tree, tokens, probabilities, valid = walk_case()
    exact = walk_distribution(tree, tokens, probabilities, valid)
    monkeypatch.setattr(speculative_tree, "accept_first_child", accept_argmax_child)
    samples = walk_samples(tree, tokens, probabilities, valid, 5000, seed=1)
    assert goodness_of_fit_p_value(samples, exact) < ALPHA


def test_sample_from_inverts_the_cdf_and_skips_zero_weights():
    weights = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    chosen = {int(sample_from(weights, torch.tensor(u))) for u in torch.linspace(0, 1 - 1e-7, 101).tolist()}
    assert chosen == {1, 4}
    assert int(sample_from(weights, torch.tensor(0.499))) == 1 and int(sample_from(weights, torch.tensor(0.5))) == 4


def test_filler_lookup_nodes_are_never_accepted():
    tree = build_tree_buffers((2,), lookup_length=3)  # root | 2 stream nodes, lookup 1 | lookup 2 | lookup 3
    assert valid_drafts(tree, 1).tolist() == [True, True, True, True, False, False]
    tokens = torch.tensor([0, 1, 2, 3, 3, 3])
    probabilities = torch.zeros(tree.size, 4)
    probabilities[:, 3] = 1.0  # token 3 certain everywhere: the filler would be accepted if tried
    path, accepted, token = sample_path(tokens, probabilities, valid_drafts(tree, 1), tree, torch.rand(4, 4))
    assert int(accepted) == 1 and path[1].item() == 3 and int(token) == 3


# ----------------------------------------------------------------------------------------
# end to end: plain sampling against speculative sampling of the trained tiny model
# ----------------------------------------------------------------------------------------
NEW = 4
# Each prompt stops inside a phrase, so a new phrase (one of 10, a spread distribution)
# starts at a drafted position: new token 1 (a depth-1 draft of the prefill's tree) after
# prompt 0, new token 2 after prompt 1. There a wrong acceptance rule shows whatever the
# trained model's rounding; inside a phrase the next token is all but certain, and any rule
# draws it right.
PROMPTS = (torch.cat([PHRASES[0], PHRASES[3][:5]])[None], torch.cat([PHRASES[5], PHRASES[7][:4]])[None])
PHRASE_STARTS = {0: 1, 1: 2}  # prompt -> the new token that starts a phrase
EOS = int(PHRASES[2][0])  # a phrase start: some samples end early
SETTINGS = {
    "temperature 0.7, top-k, lookup branch": dict(temperature=0.7, top_k=5, prompt_lookup_num_tokens=3),
    "temperature 1.0, top-p, EOS": dict(temperature=1.0, top_p=0.8, eos_token_id=EOS),
}
SPECULATIVE_ONLY = ("prompt_lookup_num_tokens",)


def plain_samples(model, ids, count, seed, settings):
    torch.manual_seed(seed)
    plain = {k: v for k, v in settings.items() if k not in SPECULATIVE_ONLY}
    plain.setdefault("eos_token_id", None)
    out = model.generate(ids.expand(count, -1), do_sample=True, max_new_tokens=NEW, pad_token_id=0, **plain)
    return torch.nn.functional.pad(out[:, ids.shape[1]:], (0, NEW + ids.shape[1] - out.shape[1]))


def speculative_samples(model, ids, count, seed, settings):
    generator = torch.Generator().manual_seed(seed)
    rows, calls = [], 0
    for _ in range(count):
        out = model.generate(ids, speculative_streaming=True, tree_widths=(4, 3, 2), do_sample=True,
                             max_new_tokens=NEW, generator=generator, return_dict_in_generate=True,
                             **{"eos_token_id": None, **settings})
        new = out.sequences[0, ids.shape[1]:]
        rows.append(torch.nn.functional.pad(new, (0, NEW - len(new))))  # pad 0 after EOS, as plain generate does
        calls += out.num_forward_calls
    return torch.stack(rows), calls


def p_values_over_prompts(model, settings, count):
    """Every p-value of the test (per position, first three) for each prompt, and the
    speculative run's forward calls and distinct first-three outcomes."""
    p_values, calls, outcomes = {}, 0, set()
    for i, ids in enumerate(PROMPTS):
        plain = plain_samples(model, ids, count, seed=10 + i, settings=settings)
        ours, used = speculative_samples(model, ids, count, seed=20 + i, settings=settings)
        p_values.update({f"prompt {i}, {k}": v for k, v in distribution_p_values(plain, ours).items()})
        calls += used
        outcomes |= set(map(tuple, ours[:, :3].tolist()))
    return p_values, calls, outcomes


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_distribution_as_plain_sampling(trained_model, name):
    p_values, calls, outcomes = p_values_over_prompts(trained_model, SETTINGS[name], 1500)
    print(f"{name}: smallest p-value {min(p_values.values()):.3g}, {2 * 1500 * NEW / calls:.2f} tokens per call")
    assert min(p_values.values()) > ALPHA, p_values
    assert len(outcomes) >= 5  # a real distribution, not one sequence (the model trained on one thread gave 10)
    assert calls < 2 * 1500 * NEW * 0.8  # drafts were accepted: fewer calls than tokens


@pytest.mark.trains
def test_the_wrong_rule_fails_the_same_test(trained_model, monkeypatch):
    """The same test, the same sample count, caught where a phrase starts at a drafted
    position (PROMPTS): the model spreads its probability over the next phrases there (checked
    first), so a draft of the argmax is accepted too often. (With both prompts ending at a
    phrase's end, that position was never drafted at depth 1 and the smallest p-value was
    0.16 for one setting's trained model: not caught.)"""
    for i, position in PHRASE_STARTS.items():  # the wrong rule's bias needs a spread distribution there
        assert most_likely_next_phrase_share(trained_model, i, position) < 0.6
    monkeypatch.setattr(speculative_tree, "accept_first_child", accept_argmax_child)
    p_values, _, _ = p_values_over_prompts(trained_model, SETTINGS["temperature 0.7, top-k, lookup branch"], 1500)
    assert min(p_values.values()) < ALPHA, p_values


@torch.no_grad()
def most_likely_next_phrase_share(model, prompt: int, position: int) -> float:
    """The main model's largest next-token probability (temperature 0.7) where new token
    ``position`` after PROMPTS[prompt] starts a phrase, the tokens before it greedy."""
    ids = model.generate(PROMPTS[prompt], do_sample=False, max_new_tokens=position, eos_token_id=None)
    return float(torch.softmax(model(ids).logits[0, -1] / 0.7, dim=-1).max())


# ----------------------------------------------------------------------------------------
# exact checks: each token's distribution is plain generate's, a seed fixes the output
# ----------------------------------------------------------------------------------------
WARPERS = [dict(temperature=0.6), dict(top_k=3), dict(top_p=0.7), dict(min_p=0.2), dict(typical_p=0.6),
           dict(epsilon_cutoff=0.05), dict(eta_cutoff=0.05), dict(top_h=0.5),
           dict(temperature=1.3, repetition_penalty=1.4, no_repeat_ngram_size=2)]


@pytest.mark.trains
@pytest.mark.parametrize("settings", WARPERS, ids=lambda s: ",".join(s))
def test_every_token_drawn_from_plain_generates_distribution(trained_model, settings):
    """With output_scores, speculative sampling returns what each token was drawn from;
    plain generate, asked for one token after the same prefix, computes the same scores."""
    generator = torch.Generator().manual_seed(40)
    calls = 0
    for i in range(3):
        ids = phrase_text(1, 5 + 4 * i, generator)
        out = trained_model.generate(ids, speculative_streaming=True, do_sample=True, max_new_tokens=8,
                                     eos_token_id=None, generator=generator, output_scores=True,
                                     return_dict_in_generate=True, **settings)
        calls += out.num_forward_calls
        for t, scores in enumerate(out.scores):
            prefix = out.sequences[:, : ids.shape[1] + t]
            plain = trained_model.generate(prefix, do_sample=True, max_new_tokens=1, eos_token_id=None,
                                           output_scores=True, return_dict_in_generate=True, **settings)
            kept = torch.isfinite(plain.scores[0])
            assert torch.equal(kept, torch.isfinite(scores))
            assert torch.allclose(plain.scores[0][kept], scores[kept], atol=1e-4)
            assert kept[0, out.sequences[0, ids.shape[1] + t]]  # the token drawn was allowed
    # some call gave several tokens, so accepted drafts were checked too (counted over the
    # three prompts: at temperature 1.3 with penalties, one prompt's 8 tokens took 8 calls
    # with one setting's trained model)
    assert calls < 3 * 8


def test_top_k_1_sampling_is_greedy(trained_model):
    generator = torch.Generator().manual_seed(41)
    for i in range(5):
        ids = phrase_text(1, 3 + 5 * i, generator)
        sampled = trained_model.generate(ids, speculative_streaming=True, do_sample=True, top_k=1, max_new_tokens=20,
                                         eos_token_id=None)
        assert torch.equal(sampled, trained_model.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=None))


def test_a_seed_fixes_the_output_eager_and_compiled(trained_model):
    settings = dict(do_sample=True, temperature=0.9, top_p=0.95, speculative_streaming=True, tree_widths=(4, 3, 2),
                    prompt_lookup_num_tokens=3)
    generator = torch.Generator().manual_seed(42)
    outputs = set()
    for i in range(16):
        ids = phrase_text(1, 3 + 2 * i, generator)
        request = dict(max_new_tokens=5 + i, eos_token_id=int(PHRASES[i % 10][0]) if i % 3 == 0 else None, **settings)
        eager = [trained_model.generate(ids, generator=torch.Generator().manual_seed(i), **request) for _ in range(2)]
        compiled = trained_model.generate(ids, generator=torch.Generator().manual_seed(i),
                                          compile_config=CompileConfig(), **request)
        torch.manual_seed(100 + i)
        global_seed = trained_model.generate(ids, **request)
        torch.manual_seed(100 + i)
        assert torch.equal(global_seed, trained_model.generate(ids, **request))
        assert torch.equal(eager[0], eager[1]) and torch.equal(eager[0], compiled)
        outputs.add(tuple(compiled[0, ids.shape[1]:].tolist()))
    assert len(outputs) == 16  # the seeds matter


def test_sampling_step_never_syncs_the_host(trained_model):
    decoder = FixedShapeDecoder(trained_model, (4, 3, 2), prefill_buckets=(16,), lookup_length=2)
    decoder.use_scorer(NodeScorer(warpers(trained_model, temperature=0.7, top_k=10, top_p=0.9), do_sample=True))
    ids = phrase_text(1, 10, torch.Generator().manual_seed(43))
    with torch.no_grad(), HostSyncDetector():
        decoder.prefill(ids, max_new_tokens=8, uniforms=torch.tensor(0.3))
        for _ in range(3):
            decoder.step(remaining=8, timer=lambda name: contextlib.nullcontext(), lookup=[5],
                         uniforms=torch.rand(decoder.draw_shape))


def warpers(model, **settings):
    """Plain sampling's warpers for ``settings``, as generate builds them."""
    config = GenerationConfig(do_sample=True, **settings)
    return model._get_logits_processor(config, input_ids_seq_length=1, device=model.device)


def test_sampling_for_a_checkpoint_that_names_its_pad_token(monkeypatch):
    """A fine-tuned checkpoint's generation config names its pad token (padding output rows
    chooses no token): sampling with the streams takes it, compiled or not."""
    model = tiny_model(num_spec_streams=2, num_stream_layers=2)
    monkeypatch.setattr(model.generation_config, "pad_token_id", 0)
    ids = phrase_text(1, 6, torch.Generator().manual_seed(45))
    settings = dict(speculative_streaming=True, tree_widths=(2, 2), do_sample=True, temperature=0.7,
                    max_new_tokens=12, eos_token_id=None)
    compiled = model.generate(ids, generator=torch.Generator().manual_seed(7), compile_config=CompileConfig(),
                              **settings)
    assert torch.equal(compiled, model.generate(ids, generator=torch.Generator().manual_seed(7), **settings))


@pytest.mark.trains
def test_sampling_acceptance_close_to_greedy(trained_model):
    """Drafts of a trained model are still accepted often when sampling at T=0.7 (a draft
    passes with probability p(x) instead of whenever it is the argmax, so somewhat less
    often: 0.77 of greedy's tokens per call when the fixture trains on one thread, more on
    two; an engine that never accepts a sampled draft makes 1.0)."""
    per_call = {}
    for mode, settings in {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, temperature=0.7)}.items():
        generator = torch.Generator().manual_seed(44)
        calls = 0
        for i in range(20):
            ids = phrase_text(1, 2 + i, generator)
            calls += trained_model.generate(ids, speculative_streaming=True, max_new_tokens=30, eos_token_id=None,
                                            return_dict_in_generate=True, generator=generator,
                                            **settings).num_forward_calls
        per_call[mode] = 20 * 30 / calls
    print(f"tokens per call on the trained tiny model, tree 4x3x2: {per_call}")
    assert per_call["sampling"] > 1.5 and per_call["sampling"] > 0.7 * per_call["greedy"]


def test_generator_must_be_a_torch_generator():
    model = tiny_model(num_spec_streams=2, num_stream_layers=2)
    with pytest.raises((TypeError, ValueError)):
        model.generate(torch.tensor([[3, 4]]), speculative_streaming=True, do_sample=True, max_new_tokens=3,
                       generator=42)


def test_no_token_outside_the_warped_support():
    """top_k=2 on a random model: every token is one of the two most likely after its prefix."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2)
    generator = torch.Generator().manual_seed(45)
    for seed in range(6):
        ids = torch.randint(1, TINY["vocab_size"], (1, 6), generator=generator)
        out = model.generate(ids, speculative_streaming=True, do_sample=True, top_k=2, max_new_tokens=12,
                             eos_token_id=None, generator=torch.Generator().manual_seed(seed))
        logits = model(out).logits[0, ids.shape[1] - 1 : -1]
        top2 = logits.topk(2, dim=-1).indices
        assert all(token in row for token, row in zip(out[0, ids.shape[1]:].tolist(), top2.tolist()))



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampling_identical_to_eager(trained_model):
    model = trained_model.cuda()
    settings = dict(speculative_streaming=True, tree_widths=(4, 3, 2), do_sample=True, temperature=0.8, top_k=20,
                    top_p=0.9, max_new_tokens=24)
    generator = torch.Generator().manual_seed(46)
    try:
        for i in range(20):
            ids = phrase_text(1, 1 + i, generator).cuda()
            outputs = [model.generate(ids, generator=torch.Generator().manual_seed(i), **step, **settings)
                       for step in ({}, dict(disable_compile=True))]
            assert torch.equal(*outputs)
    finally:
        trained_model.cpu()
        trained_model.__dict__.pop("_tree_runners", None)
