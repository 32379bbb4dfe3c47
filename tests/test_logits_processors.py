"""Same arguments, same output as plain `generate`: every GenerationConfig field is either
applied exactly under ``speculative_streaming=True`` or refused with an error naming it
(`request.REJECTED_FIELDS`, the only fields written down in the product: a field a new
transformers release adds fails the first test here until it has a case)."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation import WatermarkingConfig

from huggingface.transformers.generation.request import REJECTED_FIELDS
from tests.helpers import TINY, phrase_text, tiny_model

NEW = 24


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token i reads "w<i>" (token 1 reads "abcdef": the probe `StopStringCriteria` tokenizes)."""
    vocab = {f"w{i}": i for i in range(TINY["vocab_size"]) if i != 1} | {"abcdef": 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="abcdef"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="abcdef", eos_token="w0")


class BanPreviousToken(LogitsProcessor):
    """A custom processor that reads the prefix: the last token may not come again."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], -float("inf"))


class StopOnRepeat(StoppingCriteria):
    """A custom criterion: stop once the last two tokens are equal."""

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, -1] == input_ids[:, -2]) if input_ids.shape[1] > 1 else torch.zeros(1, dtype=torch.bool)


def odd_after_odd(batch_id, input_ids):
    """prefix_allowed_tokens_fn: after an odd token only odd tokens; batch id 0 always."""
    assert batch_id == 0
    return list(range(int(input_ids[-1]) % 2, TINY["vocab_size"], 2))


# field -> (settings from greedy's own continuation ``new`` of the prompt, whether they change the output)
FIELD_CASES = {
    "max_length": (lambda new: dict(max_new_tokens=None, max_length=45), True),
    "max_new_tokens": (lambda new: dict(max_new_tokens=13), True),
    "min_length": (lambda new: dict(eos_token_id=new[2], min_length=40), True),
    "min_new_tokens": (lambda new: dict(eos_token_id=new[3], min_new_tokens=11), True),
    "eos_token_id": (lambda new: dict(eos_token_id=[new[9], new[5]]), True),
    "pad_token_id": (lambda new: dict(pad_token_id=0), False),  # absent from the prompts; as padding: below
    "repetition_penalty": (lambda new: dict(repetition_penalty=1.8), True),
    "encoder_repetition_penalty": (lambda new: dict(encoder_repetition_penalty=0.5), True),
    "no_repeat_ngram_size": (lambda new: dict(no_repeat_ngram_size=2), True),
    "encoder_no_repeat_ngram_size": (lambda new: dict(encoder_no_repeat_ngram_size=2), True),
    "bad_words_ids": (lambda new: dict(bad_words_ids=[[new[1]], [new[4], new[5]]]), True),
    "sequence_bias": (lambda new: dict(sequence_bias=[[[new[2]], -8.0], [[new[6], new[7]], -20.0]]), True),
    "forced_bos_token_id": (lambda new: dict(forced_bos_token_id=7), True),  # a 1-token prompt is among them
    "forced_eos_token_id": (lambda new: dict(forced_eos_token_id=new[0]), True),
    "remove_invalid_values": (lambda new: dict(remove_invalid_values=True), False),
    "exponential_decay_length_penalty": (lambda new: dict(eos_token_id=new[8], exponential_decay_length_penalty=(
        2, 3.0)), True),
    "suppress_tokens": (lambda new: dict(suppress_tokens=[new[0], new[3]]), True),
    "begin_suppress_tokens": (lambda new: dict(begin_suppress_tokens=[new[0]]), True),
    "renormalize_logits": (lambda new: dict(renormalize_logits=True, output_scores=True,
                                            return_dict_in_generate=True), False),
    "watermarking_config": (lambda new: dict(watermarking_config=WatermarkingConfig(bias=4.0)), True),
    "max_time": (lambda new: dict(max_time=0.0), True),  # over at once: one token, as plain generate stops
    "stop_strings": (lambda new: dict(stop_strings=[f"w{new[6]} w{new[7]}", "never"], tokenizer=word_tokenizer()),
                     True),
    "return_dict_in_generate": (lambda new: dict(return_dict_in_generate=True), False),
    "output_scores": (lambda new: dict(output_scores=True, return_dict_in_generate=True), False),
    "output_logits": (lambda new: dict(output_logits=True, return_dict_in_generate=True), False),
    "prompt_lookup_num_tokens": (lambda new: dict(prompt_lookup_num_tokens=3), False),
    "max_matching_ngram_size": (lambda new: dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=1), False),
    # fields that cannot change a batch-1 decoder-only output
    "bos_token_id": (lambda new: dict(bos_token_id=new[0]), False),
    "decoder_start_token_id": (lambda new: dict(decoder_start_token_id=new[0]), False),
    "use_cache": (lambda new: dict(use_cache=False), False),
    "disable_compile": (lambda new: dict(disable_compile=True), False),
    "transformers_version": (lambda new: dict(transformers_version="5.0.0"), False),
    "_from_model_config": (lambda new: dict(_from_model_config=True), False),
}
# arguments of generate() besides the fields
ARGUMENT_CASES = {
    "logits_processor": (lambda new: dict(logits_processor=LogitsProcessorList([BanPreviousToken()])), True),
    "stopping_criteria": (lambda new: dict(stopping_criteria=StoppingCriteriaList([StopOnRepeat()])), True),
    "prefix_allowed_tokens_fn": (lambda new: dict(prefix_allowed_tokens_fn=odd_after_odd), True),
}
# the sampling settings: applied only with do_sample=True (as plain generate does), checked in tests/test_sampling.py
SAMPLING_FIELDS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                   "top_h"}
REJECTED_EXAMPLES = {
    "num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 0.5, "length_penalty": 2.0, "early_stopping": True,
    "constraints": ["a constraint"], "force_words_ids": [[5]], "low_memory": True, "num_return_sequences": 2,
    "penalty_alpha": 0.6, "dola_layers": "low", "guidance_scale": 1.5, "output_attentions": True,
    "output_hidden_states": True, "token_healing": True, "num_assistant_tokens": 5,
    "num_assistant_tokens_schedule": "heuristic", "assistant_confidence_threshold": 0.2, "assistant_lookbehind": 3,
    "target_lookbehind": 3, "assistant_early_exit": 2, "assistant_ensemble_weight": 0.5, "is_assistant": True,
    "speculation_type": "mtp", "use_mtp": True, "cache_implementation": "static", "cache_config": {"size": 1},
    "max_cache_len": 64, "prefill_chunk_size": 4, "continuous_batching_config": {"size": 1},
}
COMPILE_FIELDS = {"compile_config"}  # how the step runs, not what it chooses: tests/test_fixed_shape.py


def test_every_generation_config_field_is_applied_or_refused():
    fields = set(GenerationConfig().to_dict())
    applied = set(FIELD_CASES) | SAMPLING_FIELDS | COMPILE_FIELDS  # each one has its test
    assert not applied & set(REJECTED_FIELDS)
    assert fields == applied | set(REJECTED_FIELDS), f"a case for each new field: {fields - applied - set(REJECTED_FIELDS)}"
    assert set(REJECTED_FIELDS) == set(REJECTED_EXAMPLES)
    model = tiny_model(num_spec_streams=2, num_stream_layers=2)
    ids = torch.randint(1, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    for field, value in REJECTED_EXAMPLES.items():  # named by our check (or by upstream's validation first)
        with pytest.raises(ValueError, match=field):
            model.generate(ids, speculative_streaming=True, max_new_tokens=4, **{field: value})
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(ids, speculative_streaming=True, max_new_tokens=4, assistant_model=model)


def cases_prompts(trained_model):
    """Prompts of the trained model's domain (one a single token, for forced_bos_token_id),
    and random prompts for two random models."""
    generator = torch.Generator().manual_seed(30)
    trained = [(trained_model, phrase_text(1, 1 + 3 * i, generator)) for i in range(8)]
    random_models = [tiny_model(seed, num_spec_streams=3, num_stream_layers=2) for seed in (1, 2)]
    random = [(model, torch.randint(1, TINY["vocab_size"], (1, 1 + 4 * i), generator=generator))
              for model in random_models for i in range(4)]
    return trained + random


def plain_and_speculative(model, ids, settings):
    settings = {"max_new_tokens": NEW, "eos_token_id": None, **settings}
    plain = model.generate(ids, do_sample=False, **settings)
    ours = model.generate(ids, speculative_streaming=True, tree_widths=(4, 3, 2), **settings)
    return plain, ours


def assert_same_output(plain, ours):
    if isinstance(plain, torch.Tensor):
        assert torch.equal(plain, ours)
        return
    assert torch.equal(plain.sequences, ours.sequences)
    for name in ("scores", "logits"):
        expected, got = getattr(plain, name), getattr(ours, name)
        assert (expected is None) == (got is None)
        if expected is not None:
            assert len(expected) == len(got)
            for a, b in zip(expected, got):
                assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(FIELD_CASES) + sorted(ARGUMENT_CASES))
def test_same_output_as_plain_generate(trained_model, name):
    make_settings, changes_output = {**FIELD_CASES, **ARGUMENT_CASES}[name]
    changed = 0
    for model, ids in cases_prompts(trained_model):
        new = model.generate(ids, do_sample=False, max_new_tokens=NEW, eos_token_id=None)[0, ids.shape[1]:].tolist()
        plain, ours = plain_and_speculative(model, ids, make_settings(new))
        assert_same_output(plain, ours)
        sequence = ours if isinstance(ours, torch.Tensor) else ours.sequences
        changed += sequence[0, ids.shape[1]:].tolist() != new
    assert bool(changed) == changes_output, f"{name} changed {changed} of the outputs"


def test_processors_see_the_padded_prompt_as_plain_generate_does(trained_model):
    """Left padding (batch 1), from the attention mask or inferred from pad_token_id: the
    model skips it; length-based processors count it and the repetition penalty ignores it,
    exactly as in plain generate. Padding elsewhere is refused."""
    generator = torch.Generator().manual_seed(31)
    for i in range(6):
        ids = phrase_text(1, 4 + i, generator)
        padded = torch.cat([torch.full((1, 3), 5), ids], dim=1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
        new = trained_model.generate(ids, do_sample=False, max_new_tokens=NEW, eos_token_id=None)[0, ids.shape[1]:]
        settings = dict(repetition_penalty=1.5, min_length=20, eos_token_id=int(new[1]), no_repeat_ngram_size=3)
        assert_same_output(*plain_and_speculative(trained_model, padded, dict(attention_mask=mask, **settings)))
        assert_same_output(*plain_and_speculative(trained_model, padded, dict(pad_token_id=5, **settings)))  # inferred
    with pytest.raises(ValueError, match="left padding only"):
        trained_model.generate(torch.tensor([[7, 5, 8]]), speculative_streaming=True, pad_token_id=5, max_new_tokens=4)


def test_processors_with_a_lookup_branch(trained_model):
    generator = torch.Generator().manual_seed(32)
    for i in range(8):
        ids = phrase_text(1, 6 + 2 * i, generator)
        settings = dict(max_new_tokens=NEW, eos_token_id=None, repetition_penalty=1.3, no_repeat_ngram_size=4)
        plain = trained_model.generate(ids, do_sample=False, **settings)
        ours = trained_model.generate(ids, speculative_streaming=True, tree_widths=(4, 3, 2),
                                      prompt_lookup_num_tokens=4, **settings)
        assert torch.equal(plain, ours)


def test_processors_that_read_the_text_run_eagerly_under_compile_config(trained_model):
    """compile_config asks for the compiled step, but a processor that reads the text runs
    on the host between forward and verification: that request runs the eager runner."""
    from transformers import CompileConfig
    trained_model.__dict__.pop("_tree_runners", None)  # (other tests' runners)
    ids = phrase_text(1, 9, torch.Generator().manual_seed(34))
    settings = dict(max_new_tokens=NEW, eos_token_id=None, repetition_penalty=1.3)
    ours = trained_model.generate(ids, speculative_streaming=True, tree_widths=(2, 2), compile_config=CompileConfig(),
                                  **settings)
    assert torch.equal(ours, trained_model.generate(ids, do_sample=False, **settings))
    assert not any(runner.mode == "compiled" for runner in trained_model._tree_runners.values())


def test_fast_path_builds_no_processors(trained_model, monkeypatch):
    """A plain greedy request runs no processor machinery: the step takes the raw argmax."""
    from huggingface.transformers.generation import fixed_shape

    built = []
    original = fixed_shape.FixedShapeDecoder.use_scorer

    def spy(self, scorer):
        original(self, scorer)
        built.append(scorer)

    monkeypatch.setattr(fixed_shape.FixedShapeDecoder, "use_scorer", spy)
    ids = phrase_text(1, 8, torch.Generator().manual_seed(33))
    trained_model.generate(ids, speculative_streaming=True, max_new_tokens=8, eos_token_id=None)
    trained_model.generate(ids, speculative_streaming=True, max_new_tokens=8, repetition_penalty=1.2)
    assert built[-2] is None and built[-1] is not None and built[-1].needs_text


def test_clear_errors_for_arguments_not_honoured():
    model = tiny_model(num_spec_streams=2, num_stream_layers=2)
    ids = torch.randint(1, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="stop strings.*tokenizer"):
        model.generate(ids, speculative_streaming=True, max_new_tokens=4, stop_strings=["w3"])
    with pytest.raises(ValueError, match="negative_prompt_ids"):
        model.generate(ids, speculative_streaming=True, max_new_tokens=4, negative_prompt_ids=ids)
    with pytest.raises(ValueError, match="past_key_values|cache"):
        model.generate(ids, speculative_streaming=True, max_new_tokens=4, past_key_values=object())
