"""The seam with transformers (`huggingface/transformers/internals.py`): every private name
we use exists in the installed release and takes what we pass, an upstream change is a
clear error naming it and the version, the cache reaches our model under either name, and
plain decoding of a trained checkpoint is upstream greedy decoding, token for token."""
import inspect
import logging
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, DynamicCache, GenerationMixin

from huggingface.transformers import internals
from huggingface.transformers.internals import CACHE_FIELD, PRIVATE_NAMES, UpstreamChanged, check_private
from spec_stream import GPTNeoForCausalLM
from spec_stream.data import load_examples
from tests.helpers import TINY, tiny_model, upstream_twin


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_private_name_exists_and_takes_our_arguments(name):
    check_private(name)  # raises UpstreamChanged naming the name and the installed version


def test_a_removed_private_name_is_a_clear_error_naming_it_and_the_version(monkeypatch):
    monkeypatch.delattr(GenerationMixin, "_get_stopping_criteria")
    model = tiny_model(num_spec_streams=2, num_stream_layers=1)
    ids = torch.randint(1, TINY["vocab_size"], (1, 6))
    with pytest.raises(UpstreamChanged, match=rf"transformers {transformers.__version__}: "
                                              r"GenerationMixin\._get_stopping_criteria no longer exists"):
        model.generate(ids, speculative_streaming=True, max_new_tokens=4)


def test_a_changed_signature_is_a_clear_error_naming_the_parameter(monkeypatch):
    monkeypatch.setattr(GenerationMixin, "_validate_generated_length",
                        lambda self, generation_config, input_ids_length: None)
    with pytest.raises(UpstreamChanged, match="_validate_generated_length no longer takes has_default_max_length"):
        check_private("_validate_generated_length")


def test_cache_field_is_the_name_upstream_gpt_neo_returns():
    upstream = upstream_twin(tiny_model())
    out = upstream(torch.randint(1, TINY["vocab_size"], (1, 5)), use_cache=True)
    assert isinstance(out[CACHE_FIELD], DynamicCache)
    expected = "cache" if "cache" in inspect.signature(type(upstream).forward).parameters else "past_key_values"
    assert CACHE_FIELD == expected


def test_either_cache_name_gives_the_same_step_and_both_at_once_is_refused():
    model = tiny_model(num_spec_streams=2, num_stream_layers=1)
    ids = torch.randint(1, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = model(ids[:, :8], use_cache=True)
            assert isinstance(prefix[CACHE_FIELD], DynamicCache)
            step = model(ids[:, 8:], **{name: prefix[CACHE_FIELD]})
            torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="pass the cache once"):
            model(ids[:, 8:], cache=DynamicCache(), past_key_values=DynamicCache())


def test_a_cache_under_a_name_we_do_not_know_is_an_error_not_garbage(monkeypatch):
    """A transformers release that renamed the cache once more: generate would hand it to
    the model under that name, which our forward must refuse rather than decode without."""
    model = tiny_model(num_spec_streams=2, num_stream_layers=1)
    original = model.prepare_inputs_for_generation

    def renamed(*args, **kwargs):
        inputs = original(*args, **kwargs)
        for name in ("cache", "past_key_values"):
            if name in inputs:
                inputs["kv_cache"] = inputs.pop(name)
        return inputs

    monkeypatch.setattr(model, "prepare_inputs_for_generation", renamed)
    with pytest.raises(UpstreamChanged, match=rf"transformers {transformers.__version__}.*`kv_cache`"):
        model.generate(torch.randint(1, TINY["vocab_size"], (1, 6)), max_new_tokens=4, speculative_streaming=False)


def test_plain_decoding_warns_of_no_deprecated_cache_name(caplog):
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    caplog.set_level(logging.WARNING)
    model = tiny_model(num_spec_streams=2, num_stream_layers=1)
    ids = torch.randint(1, TINY["vocab_size"], (1, 6))
    model.generate(ids, max_new_tokens=4, speculative_streaming=False)
    model.generate(ids, max_new_tokens=4, speculative_streaming=True, tree_widths=(2, 1))
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_plain_generate_of_a_trained_checkpoint_is_upstream_greedy(finetuned_checkpoint, data_dir):
    """On real E2E-NLG prompts: our model's plain `generate` and upstream GPT-Neo's, same weights."""
    folder = finetuned_checkpoint[0]
    ours = GPTNeoForCausalLM.from_pretrained(folder).eval()
    upstream = transformers.GPTNeoForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for example in load_examples("e2e_nlg", "test", data_dir, limit=8):
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids
        settings = dict(max_new_tokens=32, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
        expected = upstream.generate(ids, **settings)
        assert expected.shape[1] > ids.shape[1] + 4  # it writes text, not a stop at once
        assert torch.equal(ours.generate(ids, speculative_streaming=False, **settings), expected)
        assert torch.equal(ours.generate(ids, speculative_streaming=True, **settings), expected)


def test_supported_range_is_the_one_requirements_declare():
    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    line = next(line.split("#")[0].strip() for line in requirements.splitlines() if line.startswith("transformers"))
    assert line == internals.SUPPORTED
