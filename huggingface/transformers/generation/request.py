"""From a ``generate(speculative_streaming=True)`` call to a decoding request whose
arguments mean what they mean to plain `generate` (docs/method.md, section 5).

Only what differs from plain `generate` is written here; the rest is upstream's own:
- `GenerationConfig` fields are applied by upstream's helpers, except the ones that ask for
  another decoding strategy or another cache (`REJECTED_FIELDS`), refused with a ValueError
  naming them when they are set.
- Logits processors and warpers are built by upstream's own `_get_logits_processor`;
  `NodeScorer` applies them at every tree node with that node's own prefix (the text so far
  plus the node's drafts), so each node's distribution is the one plain `generate` would
  choose from after the same tokens.
- Stopping criteria come from upstream's `_get_stopping_criteria`; the decoding loop checks
  them after every emitted token (EOS and the length limit it enforces itself).
- A batch (B, P) takes left padding (``attention_mask``) and decodes greedily, each row as
  it would alone; what needs one prompt (sampling, processors that read the text, recorded
  scores, prompt lookup, a streamer) is refused by name (`check_batch_features`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import logits_process as processors_module
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from ..internals import default_generation_params, eos_token_ids, pad_token_id, private
from .speculative_tree import node_prefixes

_BEAM = "beam search; speculative streaming decodes one greedy or sampled sequence"
_ASSISTED = "assisted decoding; here the model's own streams draft (prompt_lookup_num_tokens adds a lookup branch)"
_CACHE = "plain generate's cache; speculative streaming runs its own preallocated cache"
REJECTED_FIELDS = {
    **dict.fromkeys(("num_beams", "num_beam_groups", "diversity_penalty", "length_penalty", "early_stopping",
                     "constraints", "force_words_ids", "low_memory"), _BEAM),
    "num_return_sequences": "several sequences per prompt; call generate once per sequence",
    "penalty_alpha": "contrastive search",
    "dola_layers": "DoLa decoding",
    "guidance_scale": "classifier-free guidance (a second, unconditional forward per token)",
    "output_attentions": "attention weights per token, which a tree step does not produce",
    "output_hidden_states": "hidden states per token, which a tree step does not produce",
    "token_healing": "token healing, which rewrites the prompt",
    **dict.fromkeys(("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
                     "assistant_lookbehind", "target_lookbehind", "assistant_early_exit", "assistant_ensemble_weight",
                     "is_assistant", "speculation_type", "use_mtp"), _ASSISTED),
    **dict.fromkeys(("cache_implementation", "cache_config", "max_cache_len", "prefill_chunk_size",
                     "continuous_batching_config"), _CACHE),
}
# a field holding one of these values is not in effect (upstream's defaults, and a neutral guidance scale)
_INERT = {**default_generation_params(), "guidance_scale": 1.0}
# processors and warpers that read the scores only, never the tokens before them
SCORES_ONLY = tuple(getattr(processors_module, name) for name in (
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper", "SuppressTokensLogitsProcessor",
    "InfNanRemoveLogitsProcessor", "LogitNormalization",
))
# generate() arguments besides GenerationConfig fields
EXTRA_ARGUMENTS = frozenset({
    "attention_mask", "streamer", "tree_widths", "step_timer", "logits_processor",
    "stopping_criteria", "prefix_allowed_tokens_fn", "tokenizer", "generator",
})


def in_effect(field: str, value) -> bool:
    """Whether a GenerationConfig value changes anything (unset, False and defaults do not)."""
    if value is None or value is False:
        return False
    return not (field in _INERT and _INERT[field] is not None and value == _INERT[field])


def check_generation_fields(config: GenerationConfig) -> None:
    """A ValueError naming every field of ``config`` in `REJECTED_FIELDS` that is set."""
    refused = [f"{field}={getattr(config, field)!r} ({reason})" for field, reason in REJECTED_FIELDS.items()
               if in_effect(field, getattr(config, field, None))]
    if refused:
        raise ValueError(f"speculative_streaming=True does not support {'; '.join(refused)}: remove "
                         f"{'it' if len(refused) == 1 else 'them'}, or call generate() without speculative_streaming.")


class NodeScorer:
    """What the next token at a tree node is chosen from: the main stream's logits there,
    in float32, through plain `generate`'s logits processors (and warpers, when sampling),
    each node seeing its own prefix. Processors get one row per node, a depth at a time
    (every node of a depth has a prefix of the same length), as beam search hands them
    one row per beam."""

    def __init__(self, processors: LogitsProcessorList, do_sample: bool, record: bool = False):
        self.processors, self.do_sample, self.record = processors, do_sample, record
        self.needs_text = any(not isinstance(processor, SCORES_ONLY) for processor in processors)

    def __call__(self, logits: torch.Tensor, text: torch.Tensor | None = None, tree_tokens=None,
                 tree=None) -> torch.Tensor:
        """Scores (m, V) for logits (m, V). Without ``tree``: the rows follow ``text`` (1, H)
        itself (a prompt); with it, row i is tree node i."""
        scores = logits.to(torch.float32, copy=True)
        if not self.processors:
            return scores
        if not self.needs_text:
            return self.processors(torch.zeros(len(scores), 0, dtype=torch.long, device=scores.device), scores)
        if tree is None:
            return self.processors(text, scores)
        processed = torch.empty_like(scores)
        for nodes, prefixes in node_prefixes(text, tree_tokens, tree):
            processed[nodes] = self.processors(prefixes, scores[nodes])
        return processed


@dataclass
class DecodeOptions:
    """What a request adds to plain greedy tree decoding.

    generator: sampling's stream of uniforms (None: torch's global generator).
    stopping_criteria: checked after every emitted token (besides EOS and the length).
    record: keep the scores and logits of every emitted token (output_scores/output_logits).
    pad_token_id: what right-pads the rows of a batch that ended early (None: rows must all
        run to ``max_new_tokens``, i.e. no EOS and no other stopping criterion).
    """

    generator: torch.Generator | None = None
    stopping_criteria: StoppingCriteriaList | None = None
    record: bool = False
    pad_token_id: int | None = None


@dataclass
class SpeculativeRequest:
    """A checked ``generate(speculative_streaming=True)`` call, ready to decode."""

    input_ids: torch.Tensor  # as given (padding included)
    attention_mask: torch.Tensor  # given, or inferred from pad_token_id as plain generate infers it
    config: GenerationConfig
    max_new_tokens: int
    eos_token_ids: set
    scorer: NodeScorer | None
    options: DecodeOptions
    extra: dict  # the EXTRA_ARGUMENTS given


def prepare_request(model, inputs, generation_config, kwargs: dict) -> SpeculativeRequest:
    """Upstream's own preparation (config defaults, special tokens, lengths, processors,
    stopping criteria) for a prompt or a batch, and a ValueError for anything not honoured."""
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    check_input_ids(input_ids, model.config.vocab_size)
    default_max_length = (kwargs.get("max_length") is None and getattr(generation_config, "max_length", None) is None
                          and model.generation_config.max_length is None)
    default_min_length = (kwargs.get("min_length") is None and getattr(generation_config, "min_length", None) is None
                          and model.generation_config.min_length is None)
    config, extra = private(model, "_prepare_generation_config")(generation_config, **kwargs)
    check_generation_fields(config)
    extra = {key: value for key, value in extra.items() if value is not None and value is not False}
    unknown = set(extra) - EXTRA_ARGUMENTS - {"output_attentions", "output_hidden_states"}  # fields: checked
    if unknown:
        raise ValueError(f"speculative_streaming=True does not support the argument(s) {sorted(unknown)}; it takes "
                         f"GenerationConfig fields and {sorted(EXTRA_ARGUMENTS)}.")
    if not isinstance(extra.get("generator", torch.Generator()), torch.Generator):
        raise ValueError(f"generator={extra['generator']!r}: pass a torch.Generator (or none: torch's global seed).")
    mask = prompt_mask(model, config, input_ids, extra.get("attention_mask"))
    length = input_ids.shape[1]
    config = private(model, "_prepare_generated_length")(config, default_max_length, default_min_length, "input_ids",
                                                         length, input_ids)
    private(model, "_validate_generated_length")(config, length, default_max_length)
    padding = 0 if bool(mask.all()) else int((mask[0] != 0).int().argmax())  # what the repetition penalty skips
    processors = build_processors(model, config, input_ids, padding, extra)
    record = bool(config.return_dict_in_generate and (config.output_scores or config.output_logits))
    text_readers = [type(p).__name__ for p in processors if not isinstance(p, SCORES_ONLY)]
    check_batch_features(len(input_ids), {
        "do_sample=True": config.do_sample, "output_scores/output_logits": record,
        "prompt_lookup_num_tokens": config.prompt_lookup_num_tokens,
        "a streamer": extra.get("streamer") is not None,
        f"logits processors that read the text ({', '.join(text_readers)})": text_readers,
    })
    needed = processors or config.do_sample or record
    scorer = NodeScorer(processors, bool(config.do_sample), record) if needed else None
    options = DecodeOptions(extra.get("generator"), build_stopping_criteria(model, config, extra), record,
                            pad_token_id(config))
    return SpeculativeRequest(input_ids, mask, config, config.max_length - length, eos_token_ids(config), scorer,
                              options, extra)


def check_input_ids(input_ids, vocab_size: int) -> None:
    """A TypeError or ValueError, before any work, for prompts no decoding can take: they must
    be a (B, P) tensor of token ids, P >= 1, each id in [0, vocab_size)."""
    fix = "pass tokenizer(text, return_tensors='pt').input_ids"
    if not torch.is_tensor(input_ids) or input_ids.is_floating_point() or input_ids.dtype in (torch.bool, torch.complex64):
        raise TypeError(f"input_ids must be a tensor of integer token ids, got {type(input_ids).__name__}"
                        f"{'' if not torch.is_tensor(input_ids) else f' of {input_ids.dtype}'}; {fix}.")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}: speculative streaming needs (batch, prompt "
                         f"length) with at least one prompt of at least one token; {fix}.")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids hold token id {low if low < 0 else high}, outside the model's vocabulary of "
                         f"{vocab_size} ids; encode the text with this model's own tokenizer.")


def prompt_mask(model, config: GenerationConfig, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The prompt's attention mask (B, P), checked: given, or inferred from pad_token_id as
    plain generate infers it (pad tokens are padding when the pad differs from EOS); left
    padding only. A batch without a mask whose rows start with the pad token is refused:
    its padding would be read as text."""
    batch = len(input_ids)
    private(model, "_prepare_special_tokens")(config, mask is not None, device=input_ids.device, batch_size=batch)
    if mask is None:
        mask = private(model, "_prepare_attention_mask_for_generation")(input_ids, config, {})
        pad = pad_token_id(config)
        if batch > 1 and pad is not None and bool(mask.all()) and bool((input_ids[:, 0] == pad).any()):
            raise ValueError(
                f"a batch of {batch} prompts without an attention_mask, some starting with pad_token_id={pad}: "
                "their padding would be read as text; pass the attention_mask of the padded batch "
                "(tokenizer(prompts, padding=True, return_tensors='pt') gives it, with padding_side='left')."
            )
    check_left_padding(mask, config.pad_token_id)
    return mask


def check_batch_features(batch: int, features: dict) -> None:
    """A batch decodes greedily, every row with its own tree: a ValueError naming every
    feature in use (``features``: name -> in use) that needs a single prompt."""
    used = [name for name, in_use in features.items() if in_use]
    if batch > 1 and used:
        raise ValueError(
            f"a batch of {batch} prompts decodes greedily, row by row; {', '.join(used)} need{'s' * (len(used) == 1)} "
            "one prompt at a time: pass the prompts one by one (batch 1), or drop "
            f"{'it' if len(used) == 1 else 'them'}."
        )


def check_left_padding(mask: torch.Tensor, pad_token_id=None) -> None:
    """Prompts take left padding only (masked tokens before each row's first real one),
    which the model skips with the same output as plain generate."""
    real = mask != 0  # (B, P)
    first_real = real.int().argmax(dim=1)
    after_first = torch.arange(real.shape[1], device=real.device) >= first_real[:, None]
    if not bool(real.any(dim=1).all()) or not bool(real[after_first].all()):
        inferred = "" if pad_token_id is None else \
            f" (a mask inferred from pad_token_id={pad_token_id} when none is given)"
        problem = "every token of a prompt" if not bool(real.any(dim=1).all()) else "tokens after a prompt's first real one"
        raise ValueError(
            f"the attention mask masks {problem}{inferred}: speculative streaming takes left padding only; "
            "pad on the left (tokenizer padding_side='left') and pass its attention_mask, or a pad_token_id that "
            "is not in the text."
        )


def pack_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Each row's real tokens from slot 0 (left padding removed): (B, P') with P' the
    longest row, a shorter row followed by filler (copies of its last token, which the
    model never attends to), and each row's length (B,)."""
    width = input_ids.shape[1]
    if attention_mask is None or bool(attention_mask.all()):
        return input_ids, torch.full((len(input_ids),), width, device=input_ids.device)
    check_left_padding(attention_mask)
    lengths = (attention_mask != 0).sum(dim=1)
    start = width - lengths  # (B,): where each row's real tokens begin
    index = (torch.arange(int(lengths.max()), device=input_ids.device) + start[:, None]).clamp(max=width - 1)
    return input_ids.gather(1, index), lengths


def build_processors(model, config: GenerationConfig, input_ids: torch.Tensor, padding: int,
                     extra: dict) -> LogitsProcessorList:
    """Plain generate's processor list for this prompt, for one row per tree node:
    ``prefix_allowed_tokens_fn`` always hears batch id 0, and the repetition penalty skips
    the first ``padding`` tokens (plain generate: up to the first unmasked one)."""
    allowed = extra.get("prefix_allowed_tokens_fn")
    processors = private(model, "_get_logits_processor")(
        config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=None if allowed is None else (lambda batch_id, tokens: allowed(0, tokens)),
        logits_processor=extra.get("logits_processor") or LogitsProcessorList(), device=input_ids.device,
    )
    penalty = processors_module.RepetitionPenaltyLogitsProcessor
    for i, processor in enumerate(processors):
        if padding and type(processor) is penalty and processor.prompt_ignore_length is None:
            processors[i] = penalty(processor.penalty, prompt_ignore_length=padding)
    return processors


def build_stopping_criteria(model, config: GenerationConfig, extra: dict) -> StoppingCriteriaList | None:
    """Plain generate's stopping criteria without the two the loop enforces itself (EOS,
    the length limit); None when nothing is left."""
    criteria = private(model, "_get_stopping_criteria")(config, extra.get("stopping_criteria") or StoppingCriteriaList(),
                                            tokenizer=extra.get("tokenizer"))
    rest = StoppingCriteriaList(c for c in criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria)))
    return rest or None
