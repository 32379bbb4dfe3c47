"""A fine-tuned checkpoint the Hugging Face way: after `import spec_stream`, the Auto
classes and `pipeline` build our model with its streams, its generation config makes
speculative streaming the default of plain `generate` (same output as greedy, in batches
and when sampling too; beam search falls back to plain generate), and upstream GPT-Neo
still loads the folder."""
import json
import logging

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

import spec_stream
from spec_stream.data import load_examples

NEW_TOKENS = 24
STREAMS_NOTE = "decoding with the speculative streams"
FALLBACK_NOTE = "this call runs as plain generate()"


@pytest.fixture(scope="module")
def checkpoint(finetuned_checkpoint):
    return finetuned_checkpoint[0]


@pytest.fixture(scope="module")
def prompts(checkpoint, data_dir) -> list[str]:
    return [e.prompt for e in load_examples("e2e_nlg", "test", data_dir, limit=5)]


@pytest.fixture
def notes(caplog):
    """The log records of `generate`, with the one-time notes forgotten first."""
    logging.Logger.warning_once.cache_clear()  # transformers keeps "once" per process
    caplog.set_level(logging.WARNING)

    def messages() -> list[str]:
        return [record.getMessage() for record in caplog.records]

    return messages


@pytest.fixture
def flat_step_costs(monkeypatch):
    """The saved ``tree_widths="auto"`` with every tree size costing one root step: the
    choice then rests on the acceptance stored with the checkpoint alone and drafts a tree,
    whatever this machine's latencies (on a 2-core CPU a tiny model's best tree is none)."""
    import huggingface.transformers.generation.tree_search as tree_search_module

    monkeypatch.setattr(tree_search_module, "probe_step_seconds", lambda model, **kwargs: {(): 1.0, (8, 4, 2): 1.0})


class ForwardCalls:
    """Counts forward passes of the decoder stack (our loop calls it directly)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.transformer.register_forward_pre_hook(self.seen)

    def seen(self, *_):
        self.count += 1


def plain_greedy(model, ids) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, speculative_streaming=False)


def test_the_checkpoint_asks_for_speculative_streaming(checkpoint):
    saved = json.loads((checkpoint / "generation_config.json").read_text())
    assert saved["speculative_streaming"] is True and saved["tree_widths"] == "auto"
    config = GenerationConfig.from_pretrained(checkpoint)
    assert config.speculative_streaming is True and config.tree_widths == "auto"


def test_the_saved_tokenizer_knows_the_context(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.model_max_length == AutoConfig.from_pretrained(checkpoint).max_position_embeddings == 1024


def test_auto_classes_build_our_model_with_its_streams(checkpoint):
    config = AutoConfig.from_pretrained(checkpoint)
    assert isinstance(config, spec_stream.GPTNeoConfig) and config.num_spec_streams == 3
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(model) is spec_stream.GPTNeoForCausalLM and model.config.model_type == "gpt_neo"
    direct = spec_stream.GPTNeoForCausalLM.from_pretrained(checkpoint).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == direct.keys() and any("transformer.streams." in key for key in loaded)
    assert all(torch.equal(loaded[key], direct[key]) for key in loaded)


def test_upstream_gpt_neo_still_loads_the_folder_as_plain_gpt_neo(checkpoint, prompts):
    upstream = transformers.GPTNeoForCausalLM.from_pretrained(checkpoint).eval()
    assert type(upstream).__module__.startswith("transformers.")
    assert type(upstream.config) is transformers.GPTNeoConfig
    ours = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = AutoTokenizer.from_pretrained(checkpoint)(prompts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(upstream(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_plain_generate_decodes_with_the_streams_exactly_as_greedy(checkpoint, prompts, notes, flat_step_costs):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    calls = ForwardCalls(model)
    new_tokens = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
        assert torch.equal(out.sequences, plain_greedy(model, ids))
        assert out.num_forward_calls < out.sequences.shape[1] - ids.shape[1]  # several tokens per call
        new_tokens += out.sequences.shape[1] - ids.shape[1]
    assert calls.count < 2 * new_tokens  # the plain runs took one call per token, the streamed ones fewer
    assert sum(STREAMS_NOTE in m for m in notes()) == 1  # said once


def test_the_pipeline_decodes_with_the_streams_exactly_as_greedy(checkpoint, prompts, notes, flat_step_costs):
    generator = pipeline("text-generation", model=str(checkpoint))
    assert type(generator.model) is spec_stream.GPTNeoForCausalLM
    calls = ForwardCalls(generator.model)
    for prompt in prompts[:3]:
        ids = generator.tokenizer(prompt, return_tensors="pt").input_ids
        expected = generator.tokenizer.decode(plain_greedy(generator.model, ids)[0, ids.shape[1]:],
                                              skip_special_tokens=True)
        before = calls.count
        text = generator(prompt, do_sample=False, max_new_tokens=NEW_TOKENS, return_full_text=False)
        assert text[0]["generated_text"] == expected
        assert calls.count - before < NEW_TOKENS  # the streams drafted
    assert any(STREAMS_NOTE in m for m in notes())


@pytest.mark.trains
def test_a_pipeline_batch_decodes_with_the_streams_exactly_as_greedy(checkpoint, prompts, notes, flat_step_costs):
    generator = pipeline("text-generation", model=str(checkpoint), batch_size=4)
    generator.tokenizer.padding_side = "left"
    model, tokenizer = generator.model, generator.tokenizer
    expected = []
    for prompt in prompts[:4]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected.append(tokenizer.decode(plain_greedy(model, ids)[0, ids.shape[1]:], skip_special_tokens=True))
    calls = ForwardCalls(model)
    texts = generator(prompts[:4], do_sample=False, max_new_tokens=NEW_TOKENS, return_full_text=False)
    assert [text[0]["generated_text"] for text in texts] == expected
    assert calls.count < NEW_TOKENS  # one batch, the streams drafting for all four rows
    assert any(STREAMS_NOTE in m for m in notes()) and not any(FALLBACK_NOTE in m for m in notes())


@pytest.mark.trains
def test_sampling_decodes_with_the_streams(checkpoint, prompts, notes, flat_step_costs):
    """Sampling keeps the streams: fewer calls than tokens, one seed one text (that each
    token is drawn from plain sampling's distribution: tests/test_sampling.py)."""
    generator = pipeline("text-generation", model=str(checkpoint))  # samples by default
    calls = ForwardCalls(generator.model)
    prompt_length = len(generator.tokenizer(prompts[0]).input_ids)
    outputs = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outputs.append(generator(prompts[0], max_new_tokens=NEW_TOKENS, return_tensors=True)[0]["generated_token_ids"])
    assert calls.count < sum(len(ids) - prompt_length for ids in outputs)  # drafts were accepted
    assert outputs[0] == outputs[1] and len({tuple(ids) for ids in outputs}) > 1  # reproducible, really sampled
    assert any(STREAMS_NOTE in m for m in notes()) and not any(FALLBACK_NOTE in m for m in notes())


def test_beam_search_falls_back_to_plain_generate_with_one_warning(checkpoint, prompts, notes):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = AutoTokenizer.from_pretrained(checkpoint)(prompts[1], return_tensors="pt").input_ids
    settings = dict(num_beams=2, do_sample=False, max_new_tokens=8)
    assert torch.equal(model.generate(ids, **settings), model.generate(ids, **settings, speculative_streaming=False))
    assert sum(FALLBACK_NOTE in m and "num_beams" in m for m in notes()) == 1


def test_speculative_streaming_false_turns_the_default_off(checkpoint, prompts, notes):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = AutoTokenizer.from_pretrained(checkpoint)(prompts[2], return_tensors="pt").input_ids
    calls = ForwardCalls(model)
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, speculative_streaming=False, do_sample=False)
    assert calls.count == out.shape[1] - ids.shape[1]  # one call per token: plain generate
    assert not any(STREAMS_NOTE in m for m in notes())
