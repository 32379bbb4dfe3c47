"""Speculative Streaming decoding: the host loop and ``generate(speculative_streaming=True)``.

`decode` is the one host loop (request checks, prompt lookup, sampling's draws, streaming,
EOS and length limits, the output); it runs `tree_step.TreeStep` (draft, forward, verify,
compact) through the one runner, `fixed_shape.FixedShapeDecoder`. `generate` turns its
arguments into a checked request (`request.prepare_request`) and its ``tree_widths`` into
one concrete tree (`tree_search.resolve_tree`) before any decoding; everything else goes to
upstream `GenerationMixin.generate`. Every step emits the accepted drafts plus one token
chosen as plain decoding chooses it (the argmax, or a sample, after the same processors,
each node seeing its own prefix), so output is plain decoding's, token for token. A batch
(B, P) of left-padded prompts decodes as B independent sequences, one forward per step; the
output is right-padded with ``pad_token_id`` (docs/method.md, sections 5-7).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .fixed_shape import FixedShapeDecoder, runner_for, step_mode
from .request import REJECTED_FIELDS, DecodeOptions, in_effect, pack_prompts, prepare_request
from .speculative_tree import AUTO, DEFAULT_MAX_NGRAM, propose_lookup
from .tree_search import resolve_tree
from .tree_step import no_timer

logger = logging.get_logger(__name__)


@dataclass
class SpeculativeStreamingOutput(ModelOutput):
    """sequences: (B, P + new): the prompts as given (left padding included), then each
    row's new tokens, right-padded with ``pad_token_id`` to the longest row, as plain
    generate pads them. num_forward_calls: prefill + tree steps (of the whole batch).
    accepted_lengths: tokens gained by each tree step (accepted drafts + correction); the
    prefill's single token is not in it, so ``1 + sum(accepted_lengths) >= new tokens``
    (equal unless EOS or max_new_tokens cut the last step). tree_sizes: tree nodes that
    went through the model in each step. tree_widths: the tree the call decoded with (what
    ``tree_widths="auto"`` chose for it).
    lookup_accepted: accepted drafts that came from the prompt-lookup branch (the rest of
    ``sum(accepted_lengths) - len(accepted_lengths)`` came from the streams).
    With B > 1, ``accepted_lengths``, ``tree_sizes`` and ``lookup_accepted`` hold one entry
    per row, each what that row alone would report (its steps up to its own end).
    scores / logits (``output_scores`` / ``output_logits``, batch 1): one (1, V) float32
    tensor per new token, as plain generate returns them: what the token was chosen from
    (after processors and warpers), and the raw logits."""

    sequences: torch.Tensor | None = None
    num_forward_calls: int | None = None
    accepted_lengths: list | None = None
    tree_sizes: list | None = None
    lookup_accepted: int | list | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    tree_widths: tuple | None = None


def read_step_summary(summary: list[int]) -> tuple[list[int], int, int]:
    """One row's (tokens the step gained: accepted drafts then the correction, nodes run,
    accepted drafts that came from the lookup branch)."""
    accepted, nodes, from_lookup, path = summary[0], summary[1], summary[2], summary[3:]
    depth = len(path) // 2 - 1
    tokens, predictions = path[: depth + 1], path[depth + 1 :]
    return tokens[1 : accepted + 1] + [predictions[accepted]], nodes, accepted * from_lookup


def check_generation_request(config, batch: int, longest_prompt: int, max_new_tokens: int, eos_token_ids,
                             options: DecodeOptions) -> None:
    """A ValueError, before any work, for a request no decoding can serve: no new tokens, the
    longest prompt past the context, or rows that may end apart with nothing to pad them."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one new token.")
    if longest_prompt + max_new_tokens - 1 > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest_prompt} tokens + max_new_tokens={max_new_tokens} exceeds the context of "
            f"{config.max_position_embeddings} positions; shorten the prompt or lower max_new_tokens."
        )
    if batch > 1 and options.pad_token_id is None and (eos_token_ids or options.stopping_criteria):
        raise ValueError(
            f"a batch of {batch} prompts whose rows may end at different lengths needs a pad_token_id to "
            "right-pad the shorter outputs with; pass pad_token_id."
        )


class TokenSink:
    """The new tokens, and when to stop, checked after every token as plain `generate`
    checks: EOS, ``max_new_tokens``, then any other ``criteria`` (shown the text so far,
    ``text_prefix`` + the new tokens, and the recorded scores or None). With ``record``
    it keeps each token's (1, V) scores and logits."""

    def __init__(self, max_new_tokens: int, eos_token_ids=(), criteria=None, text_prefix: list[int] = (),
                 record: bool = False, device=None):
        self.max_new_tokens, self.eos_token_ids, self.criteria = max_new_tokens, set(eos_token_ids), criteria
        self.text_prefix, self.device = list(text_prefix), device
        self.generated, self.stopped = [], False
        self.scores, self.logits = ([], []) if record else (None, None)

    def text(self) -> torch.Tensor:
        return torch.tensor([self.text_prefix + self.generated], device=self.device)

    def add(self, tokens: list[int], recorded=None) -> list[int]:
        """Append ``tokens`` (``recorded``: their (scores, logits) rows) up to a stop;
        returns the tokens appended."""
        before = len(self.generated)
        for i, token in enumerate(tokens):
            self.generated.append(token)
            if self.scores is not None:
                self.scores.append(recorded[0][i : i + 1])
                self.logits.append(recorded[1][i : i + 1])
            if token in self.eos_token_ids or len(self.generated) == self.max_new_tokens or self._criteria_met():
                self.stopped = True
                break
        return self.generated[before:]

    def _criteria_met(self) -> bool:
        if self.criteria is None:
            return False
        scores = None if self.scores is None else tuple(self.scores)
        return bool(self.criteria(self.text(), scores).any())


def draw_uniforms(shape: tuple | None, generator: torch.Generator | None, device) -> torch.Tensor | None:
    """Sampling's uniforms in [0, 1) from ``generator`` (torch's global CPU generator when
    None), moved to ``device``; None for greedy (``shape`` None)."""
    if shape is None:
        return None
    return torch.rand(shape, generator=generator, device=generator.device if generator else "cpu").to(device)


class RowOutputs:
    """Each row's `TokenSink` (its text: the row as given, left padding included, then its
    new tokens) and step statistics, and the output they make."""

    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids, options: DecodeOptions):
        self.max_new_tokens = max_new_tokens
        self.sinks = [TokenSink(max_new_tokens, eos_token_ids, options.stopping_criteria, row.tolist(), options.record,
                                input_ids.device) for row in input_ids]
        self.accepted_lengths = [[] for _ in self.sinks]
        self.tree_sizes = [[] for _ in self.sinks]
        self.lookup_accepted = [0] * len(self.sinks)
        self.steps = 0

    def unfinished(self) -> bool:
        return not all(sink.stopped for sink in self.sinks)

    def remaining(self) -> int:
        """The most tokens an unfinished row still wants."""
        return max(self.max_new_tokens - len(sink.generated) for sink in self.sinks if not sink.stopped)

    def add_first(self, tokens: list[int], recorded) -> list[list[int]]:
        return [sink.add([token], recorded) for sink, token in zip(self.sinks, tokens)]

    def add_step(self, summary: list[list[int]], recorded) -> list[list[int]]:
        """A step's tokens, ``summary[row]`` per row; finished rows take nothing. Returns the
        tokens each row emitted."""
        self.steps += 1
        emitted = []
        for row, row_summary in enumerate(summary):
            if self.sinks[row].stopped:
                emitted.append([])
                continue
            new_tokens, nodes, from_lookup = read_step_summary(row_summary)
            self.accepted_lengths[row].append(len(new_tokens))
            self.tree_sizes[row].append(nodes)
            self.lookup_accepted[row] += from_lookup
            emitted.append(self.sinks[row].add(new_tokens, recorded))
        return emitted

    def result(self, input_ids: torch.Tensor, pad_token_id: int | None) -> SpeculativeStreamingOutput:
        """The prompts as given, then each row's tokens right-padded with ``pad_token_id``
        (needed only when rows differ: `check_generation_request`). Built outside inference
        mode (`decode` runs in it): plain tensors, which a caller may edit in place."""
        with torch.inference_mode(False):
            longest = max(len(sink.generated) for sink in self.sinks)
            rows = [sink.generated + [pad_token_id] * (longest - len(sink.generated)) for sink in self.sinks]
            new = torch.tensor(rows, device=input_ids.device, dtype=input_ids.dtype).reshape(len(rows), longest)
            def per_row(values):  # batch 1: that row's values, as before batches existed
                return values[0] if len(values) == 1 else values
            first = self.sinks[0]
            return SpeculativeStreamingOutput(
                sequences=torch.cat([input_ids, new], dim=1), num_forward_calls=1 + self.steps,
                accepted_lengths=per_row(self.accepted_lengths), tree_sizes=per_row(self.tree_sizes),
                lookup_accepted=per_row(self.lookup_accepted),
                scores=None if first.scores is None else tuple(score.clone() for score in first.scores),
                logits=None if first.logits is None else tuple(logit.clone() for logit in first.logits),
            )


@torch.inference_mode()  # spares each of a step's ~2,000 small ops autograd's bookkeeping
def decode(steps: FixedShapeDecoder, config, input_ids: torch.Tensor, max_new_tokens: int,
           eos_token_ids=(), streamer=None, timer=None, max_ngram: int = DEFAULT_MAX_NGRAM,
           options: DecodeOptions | None = None, attention_mask: torch.Tensor | None = None
           ) -> SpeculativeStreamingOutput:
    """Tree decoding of the prompts ``input_ids`` (B, P) (left padding marked by
    ``attention_mask``; None: none): prefill, then steps until every row has met EOS,
    ``max_new_tokens`` or another stopping criterion (``options``); every row's tokens are
    chosen as plain generate chooses them for that row alone (module docstring). The host
    proposes the lookup branch (``max_ngram``: longest n-gram matched) from the text so far,
    and draws sampling's uniforms (``options.generator``): both batch 1 only."""
    options, timer = options or DecodeOptions(), timer or no_timer
    prompts, lengths = pack_prompts(input_ids, attention_mask)  # (B, P'): each row's tokens from slot 0
    check_generation_request(config, len(prompts), prompts.shape[1], max_new_tokens, eos_token_ids, options)
    outputs = RowOutputs(input_ids, max_new_tokens, eos_token_ids, options)
    def text():  # processors that read the text: batch 1
        return outputs.sinks[0].text() if steps.needs_text else None
    first_draw = () if steps.draw_shape is not None else None
    with timer("prefill"):
        first = steps.prefill(prompts, max_new_tokens, text=text(), prompt_lengths=lengths,
                              uniforms=draw_uniforms(first_draw, options.generator, input_ids.device))
    emitted = outputs.add_first(first.tolist(), steps.recorded)
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(emitted[0]))
    context = prompts[0].tolist() + emitted[0] if steps.lookup_length else None
    while outputs.unfinished():
        lookup = propose_lookup(context, steps.lookup_length, max_ngram) if context is not None else []
        uniforms = draw_uniforms(steps.draw_shape, options.generator, input_ids.device)
        summary = steps.step(outputs.remaining(), timer, lookup, text=text(), uniforms=uniforms)
        emitted = outputs.add_step(summary.tolist(), steps.recorded)
        if context is not None:
            context += emitted[0]
        if streamer is not None:
            streamer.put(torch.tensor(emitted[0]))
    if streamer is not None:
        streamer.end()
    return outputs.result(input_ids, options.pad_token_id)


def streams_by_default(model, generation_config, kwargs) -> bool:
    """``speculative_streaming`` for a call that does not pass it: the generation config's
    (a fine-tuned checkpoint's ``generation_config.json`` says True), said once in the log;
    a request for what the streams do not do (beam search, several sequences per prompt:
    `request.REJECTED_FIELDS`) runs plain `generate` instead, with a one-time warning."""
    config = generation_config or model.generation_config
    if not getattr(config, "speculative_streaming", False) or not model.config.num_spec_streams:
        return False
    rejected = [field for field in REJECTED_FIELDS if in_effect(field, kwargs.get(field, getattr(config, field, None)))]
    if rejected:
        logger.warning_once(f"generation_config.speculative_streaming=True, but {', '.join(rejected)} asks for what "
                            "the streams do not do: this call runs as plain generate().")
        return False
    logger.warning_once(
        "decoding with the speculative streams, as this model's generation_config says "
        "(speculative_streaming=True); pass speculative_streaming=False for plain generate()."
    )
    return True


class SpeculativeStreamingGenerationMixin(GenerationMixin):
    """Upstream `generate`, plus ``speculative_streaming=True`` for tree-draft decoding."""

    def generate(self, inputs=None, generation_config=None, speculative_streaming: bool | None = None, **kwargs):
        """Upstream `generate`; with ``speculative_streaming=True`` tree-draft decoding of a
        prompt, or of a batch of them (left padding marked by ``attention_mask``; each row
        decodes as it would alone, greedily), with the same arguments meaning the same
        (`request.prepare_request`), plus ``tree_widths`` ("auto", or widths; () for one
        token per call), ``step_timer`` and ``generator`` (a `torch.Generator` for
        sampling's draws). The step runs eagerly on a CPU, compiled there when
        ``compile_config`` is given, as CUDA graphs on a GPU, eagerly anywhere with
        ``disable_compile=True`` (`fixed_shape.step_mode`)."""
        if speculative_streaming is None:  # not passed: the generation config decides
            speculative_streaming = streams_by_default(self, generation_config, kwargs)
        if not speculative_streaming:
            return super().generate(inputs, generation_config, **kwargs)
        request = prepare_request(self, inputs, generation_config, kwargs)
        config, extra = request.config, request.extra
        # prompt lookup (transformers' own two settings): one more branch of the same tree
        lookup_length = int(config.prompt_lookup_num_tokens or 0)
        mode = step_mode(self, config, request.scorer)
        # () is a tree of the root alone: one token per call; a generation config may hold the tree
        requested = extra.get("tree_widths", getattr(config, "tree_widths", AUTO))
        batch, prompt_length = request.input_ids.shape
        tree = resolve_tree(self, requested, lookup_length, batch, mode, prompt_length, request.max_new_tokens)
        output = decode(runner_for(self, tree, mode, request.scorer), self.config, request.input_ids,
                        request.max_new_tokens, request.eos_token_ids, streamer=extra.get("streamer"),
                        timer=extra.get("step_timer"), max_ngram=int(config.max_matching_ngram_size or DEFAULT_MAX_NGRAM),
                        options=request.options, attention_mask=request.attention_mask)
        output.tree_widths = tree.widths
        output.scores = output.scores if config.output_scores else None
        output.logits = output.logits if config.output_logits else None
        return output if config.return_dict_in_generate else output.sequences
