"""Speculative Streaming decoding: draft a tree with the streams, verify it in the same
forward pass, keep the longest path that greedy decoding would have produced.

Medusa-style pure functions (tree buffers, drafting, path evaluation), one host loop
(`decode`: request checks, streaming, EOS and length limits, the output) and two ways of
running its steps on the device, both talking to the model through `run_tree` and
`draft_logits` only: `DynamicTreeSteps` here (shapes follow the request; tree pruning) and
`FixedShapeDecoder` in `fixed_shape.py` (one shape, CUDA graphs). Reachable as
``model.generate(input_ids, speculative_streaming=True, tree_widths=(4, 3, 2))``;
everything else goes to upstream `GenerationMixin.generate`.

One step, with ``L`` tokens cached and ``root`` the last token emitted (not yet cached):
1. draft: tree = root + top-k_j tokens of stream j at the last accepted node, stream j+1's
   tokens children of stream j's; node position = L + depth;
2. forward: one call over the flattened tree (tree attention mask); the main stream at
   each node predicts that node's successor, the streams at each node draft the next tree;
3. verify: accept the longest root-to-leaf path whose every token equals the main-stream
   argmax at its parent; the argmax at the last accepted node is the correction token
   (the next root); compact the accepted nodes' KV entries to slots ``L, L+1, ...``.
A step emits the accepted drafts plus the correction: at least one token, so output is
greedy decoding's, token for token, whatever the streams draft.

With logits processors (``repetition_penalty``, ``min_new_tokens``, ...) each node's
prediction is the argmax after them, each node seeing its own prefix (`request.NodeScorer`);
with ``do_sample=True`` verification samples instead (`speculative_tree.sample_path`):
either way every token is chosen exactly as plain `generate` chooses it after the same
tokens (docs/method.md, sections 5 and 6).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from ..cache_utils import VariableLengthKVCache
from .request import DecodeOptions, NodeScorer, check_batch, prepare_request
from .tree_search import by_size, choose_tree, probe_step_seconds
from .speculative_tree import (
    DEFAULT_MAX_NGRAM,
    DEFAULT_TREE_WIDTHS,
    build_tree_buffers,
    draft_tree,
    evaluate_paths,
    prune_mask,
    propose_lookup,
    sample_from,
    sample_path,
    uniforms_shape,
    valid_drafts,
)

logger = logging.get_logger(__name__)


def _no_timer(name: str):
    return contextlib.nullcontext()


@dataclass
class SpeculativeStreamingOutput(ModelOutput):
    """sequences: (1, prompt + new). num_forward_calls: prefill + tree steps.
    accepted_lengths: tokens gained by each tree step (accepted drafts + correction); the
    prefill's single token is not in it, so ``1 + sum(accepted_lengths) >= new tokens``
    (equal unless EOS or max_new_tokens cut the last step). tree_sizes: tree nodes that
    went through the top layers in each step (fewer than the tree when pruning).
    lookup_accepted: accepted drafts that came from the prompt-lookup branch (the rest of
    ``sum(accepted_lengths) - len(accepted_lengths)`` came from the streams).
    scores / logits (``output_scores`` / ``output_logits``): one (1, V) float32 tensor per
    new token, as plain generate returns them: what the token was chosen from (after
    processors and warpers), and the raw logits."""

    sequences: torch.Tensor | None = None
    num_forward_calls: int | None = None
    accepted_lengths: list | None = None
    tree_sizes: list | None = None
    lookup_accepted: int | None = None
    scores: tuple | None = None
    logits: tuple | None = None


# ----------------------------------------------------------------------------------------
# One host loop; the dynamic path and the fixed-shape path supply its two step functions
# ----------------------------------------------------------------------------------------
class TreeDecodingSteps(Protocol):
    """What a decoding path gives `decode`: device work only, no host logic.

    ``lookup_length``: nodes of the tree's prompt-lookup branch (0: none).
    ``draw_shape``: the uniforms one sampling step consumes (None: greedy, no randomness).
    ``needs_text``: whether its logits processors read the text so far (then passed as
    ``text``, (1, H): the prompt as given plus the new tokens).
    ``recorded``: with a recording scorer, after each call: (scores, logits) float32 rows
    of the nodes on the chosen path, root first; None otherwise.
    ``prefill(input_ids, max_new_tokens, text, uniforms)`` puts the prompt (1, P) in the
    cache and returns the first new token as a (1,) tensor (``uniforms``: one 0-d uniform
    when sampling). ``step(remaining, timer, lookup, text, uniforms)`` runs one draft-verify
    step (at most ``remaining`` tokens are still wanted; ``lookup`` holds up to
    ``lookup_length`` drafts for the lookup branch; ``uniforms``: ``draw_shape`` of them when
    sampling) and returns its summary, the step's only device-to-host copy: ``[accepted
    drafts, nodes run, 1 if they came from the lookup branch else 0, tokens on the chosen
    path (D + 1), the token chosen after each of them (D + 1)]``.
    """

    lookup_length: int
    draw_shape: tuple | None
    needs_text: bool
    recorded: tuple | None

    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int, text=None, uniforms=None) -> torch.Tensor: ...

    def step(self, remaining: int, timer, lookup: list[int] = (), text=None, uniforms=None) -> torch.Tensor: ...


def step_summary(accepted, nodes, from_lookup, path_tokens, path_predictions) -> torch.Tensor:
    """Pack a step's result in the layout `read_step_summary` reads (see `TreeDecodingSteps`)."""
    head = torch.stack([accepted, nodes.to(accepted.dtype), from_lookup.to(accepted.dtype)])
    return torch.cat([head, path_tokens, path_predictions])


def read_step_summary(summary: list[int]) -> tuple[list[int], int, int]:
    """(tokens the step gained: accepted drafts then the correction, nodes run, accepted
    drafts that came from the lookup branch)."""
    accepted, nodes, from_lookup, path = summary[0], summary[1], summary[2], summary[3:]
    depth = len(path) // 2 - 1
    tokens, predictions = path[: depth + 1], path[depth + 1 :]
    return tokens[1 : accepted + 1] + [predictions[accepted]], nodes, accepted * from_lookup


def check_generation_request(config, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    check_batch(input_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one new token.")
    if input_ids.shape[1] + max_new_tokens - 1 > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the context of "
            f"{config.max_position_embeddings} positions; shorten the prompt or lower max_new_tokens."
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


@torch.no_grad()
def decode(steps: TreeDecodingSteps, config, input_ids: torch.Tensor, max_new_tokens: int,
           eos_token_ids=(), streamer=None, timer=None, max_ngram: int = DEFAULT_MAX_NGRAM,
           options: DecodeOptions | None = None) -> SpeculativeStreamingOutput:
    """Batch-1 tree decoding: prefill, then steps until EOS, ``max_new_tokens`` or another
    stopping criterion (``options``); every token is chosen as plain generate chooses it
    (module docstring). The host proposes the lookup branch (``max_ngram``: longest n-gram
    matched) from the text so far, and draws sampling's uniforms (``options.generator``)."""
    check_generation_request(config, input_ids, max_new_tokens)
    options, timer = options or DecodeOptions(), timer or _no_timer
    prefix = input_ids if options.text_prefix is None else options.text_prefix
    sink = TokenSink(max_new_tokens, eos_token_ids, options.stopping_criteria, prefix[0].tolist(), options.record,
                     input_ids.device)
    def text():
        return sink.text() if steps.needs_text else None
    first_draw = () if steps.draw_shape is not None else None
    with timer("prefill"):
        first = steps.prefill(input_ids, max_new_tokens, text=text(),
                              uniforms=draw_uniforms(first_draw, options.generator, input_ids.device))
    emitted = sink.add(first.tolist(), steps.recorded)
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(emitted))
    context = input_ids[0].tolist() + emitted if steps.lookup_length else None
    accepted_lengths, tree_sizes, lookup_accepted = [], [], 0
    while not sink.stopped:
        lookup = propose_lookup(context, steps.lookup_length, max_ngram) if context is not None else []
        uniforms = draw_uniforms(steps.draw_shape, options.generator, input_ids.device)
        summary = steps.step(max_new_tokens - len(sink.generated), timer, lookup, text=text(), uniforms=uniforms)
        new_tokens, nodes, from_lookup = read_step_summary(summary.tolist())
        accepted_lengths.append(len(new_tokens))
        tree_sizes.append(nodes)
        lookup_accepted += from_lookup
        emitted = sink.add(new_tokens, steps.recorded)
        if context is not None:
            context += emitted
        if streamer is not None:
            streamer.put(torch.tensor(emitted))
    if streamer is not None:
        streamer.end()
    new = torch.tensor([sink.generated], device=input_ids.device, dtype=input_ids.dtype)
    return SpeculativeStreamingOutput(
        sequences=torch.cat([input_ids, new], dim=1), num_forward_calls=1 + len(accepted_lengths),
        accepted_lengths=accepted_lengths, tree_sizes=tree_sizes, lookup_accepted=lookup_accepted,
        scores=None if sink.scores is None else tuple(sink.scores),
        logits=None if sink.logits is None else tuple(sink.logits),
    )


def lookup_tensor(lookup: list[int], length: int, filler: int, device) -> torch.Tensor:
    """The lookup branch's drafts as a (length,) tensor, padded with ``filler`` (wrong
    drafts cost nothing but a node: greedy verification rejects them, sampling verification
    never tries them, see `valid_drafts`)."""
    return torch.tensor((lookup + [filler] * length)[:length], device=device)


def first_token(scorer: NodeScorer | None, logits: torch.Tensor, text=None, uniform=None):
    """The first new token from the prompt's last logits (1, V): the argmax, or through
    ``scorer`` the processed scores' argmax, or a sample when ``uniform`` is given. Returns
    (token (0-d), recorded (scores, logits) or None)."""
    if scorer is None:
        return logits[0].argmax(), None
    scores = scorer(logits, text)
    token = scores[0].argmax() if uniform is None else sample_from(scores[0].softmax(dim=-1), uniform)
    return token, (scores, logits.float()) if scorer.record else None


def chosen_after(tree_tokens: torch.Tensor, path: torch.Tensor, accepted: torch.Tensor, token: torch.Tensor):
    """The token chosen after each node of a sampled path (D + 1,): the next accepted
    draft, then ``token`` after the last accepted node (beyond it: unused)."""
    following = tree_tokens[path].roll(-1)
    return torch.where(torch.arange(len(path), device=path.device) == accepted, token, following)


class DynamicTreeSteps:
    """The dynamic path: a `VariableLengthKVCache` sized for the request, and a tree cut
    short near the end of the context and, when greedy, near ``max_new_tokens`` (sampling
    keeps the depth there, so that a seed decides the same tokens as on the fixed-shape
    path), without its lookup branch when the text offers no match. With
    ``prune_threshold`` the early-exit adapter drops unlikely nodes mid-forward
    (`prune_mask`): fewer nodes run, the output (or its distribution) is unchanged.
    ``scorer``: processors, warpers, sampling (`request.NodeScorer`); None: greedy on the
    raw logits, the fast path."""

    def __init__(self, model, tree_widths=DEFAULT_TREE_WIDTHS, prune_threshold: float = 0.0,
                 lookup_length: int = 0, scorer: NodeScorer | None = None):
        config = model.config
        if prune_threshold and (config.num_spec_streams == 0 or not config.pruner_rank):
            raise ValueError("prune_threshold needs a model with streams and a pruning adapter (pruner_rank > 0).")
        self.model, self.prune_threshold, self.context = model, prune_threshold, config.max_position_embeddings
        self.lookup_length = lookup_length
        self.tree = build_tree_buffers(tree_widths, model.device, config.num_spec_streams, lookup_length)
        without_lookup = build_tree_buffers(tree_widths, model.device, config.num_spec_streams)
        self.trees = {(depth, lookup): (self.tree if lookup else without_lookup).truncated(depth)
                      for depth in range(self.tree.max_depth + 1) for lookup in (False, True)}
        self.streams = config.num_spec_streams > 0 and len(self.tree.widths) > 0
        self.scorer = scorer
        self.needs_text = scorer is not None and scorer.needs_text
        self.draw_shape = uniforms_shape(self.tree) if scorer is not None and scorer.do_sample else None
        self.cache = self.root = self.root_streams = self.recorded = None

    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int, text=None, uniforms=None) -> torch.Tensor:
        prompt_length = input_ids.shape[1]
        self.cache = VariableLengthKVCache(self.model.config, 1, prompt_length + max_new_tokens + self.tree.size,
                                           input_ids.device, self.model.dtype)
        last = torch.tensor([prompt_length - 1], device=input_ids.device)
        out = self.model.run_tree(input_ids, self.cache, torch.arange(prompt_length, device=input_ids.device)[None],
                                  streams=self.streams, logit_positions=last)
        self.root, self.recorded = first_token(self.scorer, out.logits[0], text, uniforms)
        self.root_streams = out.stream_states[0, :, 0] if self.streams else None
        return self.root.reshape(1)

    def step(self, remaining: int, timer, lookup: list[int] = (), text=None, uniforms=None) -> torch.Tensor:
        prefix = self.cache.length
        cut = self.context - 1 - prefix if uniforms is not None else min(remaining - 1, self.context - 1 - prefix)
        tree = self.trees[min(self.tree.max_depth, cut), bool(lookup)]
        with timer("draft"):
            stream_logits = self.model.draft_logits(self.root_streams) if tree.widths else None
            chain = lookup_tensor(list(lookup), tree.lookup_length, 0, self.root.device)
            tokens = draft_tree(self.root, stream_logits, tree, chain)
        with timer("forward"):
            out = self.model.run_tree(tokens[None], self.cache, (prefix + tree.depths)[None], tree.tree_mask,
                                      streams=self.streams, early_exit_filter=self._pruner(tokens, tree))
        with timer("verify"):
            path, accepted, choices, rows = self._verify(tokens, out, tree, len(lookup), text, uniforms)
            slots = rows[: int(accepted) + 1]
            self.cache.compact(prefix, prefix + slots)
            self.root = choices[accepted]
            if self.streams:
                self.root_streams = out.stream_states[0, :, slots[-1]]
        nodes = tree.size if out.kept is None else out.kept.numel()
        from_lookup = tree.is_lookup[path[min(1, tree.max_depth)]]
        return step_summary(accepted, torch.tensor(nodes, device=tokens.device), from_lookup, tokens[path], choices)

    def _verify(self, tokens, out, tree, lookup_count: int, text, uniforms):
        """Greedy (longest matching path) or sampling (`sample_path`) verification on the
        full tree (pruned nodes can be neither accepted nor chosen). Returns (the chosen
        path, accepted drafts on it, the token chosen after each path node, each path
        node's row in the forward)."""
        logits, kept = out.logits[0], out.kept
        rows_of_node = None if kept is None else forward_rows(kept, tree.size)
        scores = logits if self.scorer is None else self.scorer(logits, text, tokens, tree, kept)
        if uniforms is None:
            predictions = on_full_tree(scores.argmax(dim=-1), rows_of_node, -1)
            seen = tokens if kept is None else torch.where(rows_of_node >= 0, tokens, -2)
            best, accepted = evaluate_paths(seen, predictions, tree)
            path = tree.paths[best]
            choices = predictions[path]
        else:
            probabilities = on_full_tree(scores.softmax(dim=-1), rows_of_node, 0.0)
            valid = valid_drafts(tree, lookup_count) & (True if kept is None else rows_of_node >= 0)
            path, accepted, token = sample_path(tokens, probabilities, valid, tree, uniforms)
            choices = chosen_after(tokens, path, accepted, token)
        rows = path if kept is None else rows_of_node[path]
        if self.scorer is not None and self.scorer.record:
            self.recorded = (scores[rows].float(), logits[rows].float())
        return path, accepted, choices, rows

    def _pruner(self, tokens, tree):
        """The early-exit filter of a pruned step, or None."""
        if not self.prune_threshold or tree.size == 1:
            return None
        return lambda logits: prune_mask(tokens, logits[0], tree, self.prune_threshold).nonzero().flatten()


def forward_rows(kept: torch.Tensor, size: int) -> torch.Tensor:
    """Each tree node's row in a pruned forward (``kept``: the nodes that ran), -1 if pruned."""
    rows = torch.arange(kept.numel(), device=kept.device)
    return torch.full((size,), -1, device=kept.device).index_put_((kept,), rows)


def on_full_tree(values: torch.Tensor, rows_of_node: torch.Tensor | None, fill) -> torch.Tensor:
    """Per-row ``values`` of a (possibly pruned) forward, one per tree node; pruned nodes
    get ``fill``."""
    if rows_of_node is None:
        return values
    present = (rows_of_node >= 0).reshape(-1, *[1] * (values.dim() - 1))
    return torch.where(present, values[rows_of_node.clamp(min=0)], torch.tensor(fill, dtype=values.dtype))


def streams_by_default(model, inputs, generation_config, kwargs) -> bool:
    """``speculative_streaming`` for a call that does not pass it: the generation config's
    (a fine-tuned checkpoint's ``generation_config.json`` says True), said once in the log;
    a sampling, beam-search or batched request runs plain `generate` instead, with a one-time
    warning (the streams decode one sequence greedily)."""
    config = generation_config or model.generation_config
    if not getattr(config, "speculative_streaming", False) or not model.config.num_spec_streams:
        return False
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    sampling = kwargs.get("do_sample", config.do_sample)
    beams = kwargs.get("num_beams", config.num_beams) or 1
    if sampling or beams > 1 or (input_ids is not None and input_ids.shape[0] > 1):
        logger.warning_once(
            "generation_config.speculative_streaming=True, but speculative streaming decodes one sequence "
            "greedily: sampling, beam search and batches run as plain generate()."
        )
        return False
    logger.warning_once(
        "decoding with the speculative streams, as this model's generation_config says "
        "(speculative_streaming=True); pass speculative_streaming=False for plain generate()."
    )
    return True


class SpeculativeStreamingGenerationMixin(GenerationMixin):
    """Upstream `generate`, plus ``speculative_streaming=True`` for tree-draft decoding."""

    def generate(self, inputs=None, generation_config=None, speculative_streaming: bool | None = None, **kwargs):
        """Upstream `generate`; with ``speculative_streaming=True`` tree-draft decoding of one
        prompt, with the same arguments meaning the same (`request.prepare_request`), plus
        ``tree_widths`` ("auto", or widths; () for one token per call), ``prune_threshold``,
        ``step_timer`` and ``generator`` (a `torch.Generator` for sampling's draws)."""
        if speculative_streaming is None:  # not passed: the generation config decides
            speculative_streaming = streams_by_default(self, inputs, generation_config, kwargs)
        if not speculative_streaming:
            return super().generate(inputs, generation_config, **kwargs)
        request = prepare_request(self, inputs, generation_config, kwargs)
        config, extra = request.config, request.extra
        # () is a tree of the root alone: one token per call; a generation config may hold the tree
        tree_widths = extra.get("tree_widths", getattr(config, "tree_widths", "auto"))
        if tree_widths is None or tree_widths == "auto":
            tree_widths = self.auto_tree_widths()
        # prompt lookup (transformers' own two settings): one more branch of the same tree
        lookup_length = int(config.prompt_lookup_num_tokens or 0)
        max_ngram = int(config.max_matching_ngram_size or DEFAULT_MAX_NGRAM)
        steps = DynamicTreeSteps(self, tuple(tree_widths), float(extra.get("prune_threshold") or 0.0), lookup_length,
                                 request.scorer)
        output = decode(steps, self.config, request.prompt, request.max_new_tokens, request.eos_token_ids,
                        streamer=extra.get("streamer"), timer=extra.get("step_timer"), max_ngram=max_ngram,
                        options=request.options)
        if request.prompt is not request.input_ids:
            output.sequences = torch.cat([request.input_ids, output.sequences[:, request.prompt.shape[1]:]], dim=1)
        output.scores = output.scores if config.output_scores else None
        output.logits = output.logits if config.output_logits else None
        return output if config.return_dict_in_generate else output.sequences

    def auto_tree_widths(self) -> tuple:
        """``tree_widths="auto"``: the tree with the most expected tokens per second from the
        acceptance rates stored with the checkpoint (``generation_config.stream_acceptance``)
        and this device's step latencies (probed once per model and device). Without stored
        rates: the default tree."""
        acceptance = getattr(self.generation_config, "stream_acceptance", None)
        if not acceptance or not self.config.num_spec_streams:
            return DEFAULT_TREE_WIDTHS[: self.config.num_spec_streams]
        probes = self.__dict__.setdefault("_step_seconds_by_device", {})
        if str(self.device) not in probes:
            probes[str(self.device)] = by_size(probe_step_seconds(self))
        return choose_tree(acceptance, probes[str(self.device)], self.config.num_spec_streams)
