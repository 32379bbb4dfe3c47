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
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import ModelOutput

from ..cache_utils import VariableLengthKVCache
from .tree_search import by_size, choose_tree, probe_step_seconds
from .speculative_tree import (
    DEFAULT_MAX_NGRAM,
    DEFAULT_TREE_WIDTHS,
    build_tree_buffers,
    draft_tree,
    evaluate_paths,
    prune_mask,
    propose_lookup,
)

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
    ``sum(accepted_lengths) - len(accepted_lengths)`` came from the streams)."""

    sequences: torch.Tensor | None = None
    num_forward_calls: int | None = None
    accepted_lengths: list | None = None
    tree_sizes: list | None = None
    lookup_accepted: int | None = None


# ----------------------------------------------------------------------------------------
# One host loop; the dynamic path and the fixed-shape path supply its two step functions
# ----------------------------------------------------------------------------------------
class TreeDecodingSteps(Protocol):
    """What a decoding path gives `decode`: device work only, no host logic.

    ``lookup_length``: nodes of the tree's prompt-lookup branch (0: none).
    ``prefill(input_ids, max_new_tokens)`` puts the prompt (1, P) in the cache and returns
    the first new token as a (1,) tensor. ``step(remaining, timer, lookup)`` runs one
    draft-verify step (at most ``remaining`` tokens are still wanted; ``lookup`` holds the
    lookup branch's ``lookup_length`` drafts) and returns its summary, the step's only
    device-to-host copy: ``[accepted drafts, nodes run, 1 if they came from the lookup
    branch else 0, tokens on the chosen path (D + 1), main-stream predictions on it (D + 1)]``.
    """

    lookup_length: int

    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor: ...

    def step(self, remaining: int, timer, lookup: list[int]) -> torch.Tensor: ...


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
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative_streaming=True decodes one sequence at a time, got a batch of {input_ids.shape[0]}; "
            "loop over the prompts (or use plain generate() for batched greedy decoding)."
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one new token.")
    if input_ids.shape[1] + max_new_tokens - 1 > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the context of "
            f"{config.max_position_embeddings} positions; shorten the prompt or lower max_new_tokens."
        )


def emit_tokens(generated: list[int], new_tokens: list[int], eos_token_ids: set[int], max_new_tokens: int):
    """Append a step's tokens to ``generated``, stopping after EOS or at ``max_new_tokens``;
    returns the tokens appended."""
    before = len(generated)
    for token in new_tokens:
        generated.append(token)
        if token in eos_token_ids or len(generated) == max_new_tokens:
            break
    return generated[before:]


@torch.no_grad()
def decode(steps: TreeDecodingSteps, config, input_ids: torch.Tensor, max_new_tokens: int,
           eos_token_ids=(), streamer=None, timer=None, max_ngram: int = DEFAULT_MAX_NGRAM
           ) -> SpeculativeStreamingOutput:
    """Batch-1 greedy decoding with tree drafts: prefill, then steps until EOS or
    ``max_new_tokens``; every token is greedy decoding's (module docstring). The host
    proposes the lookup branch (``max_ngram``: longest n-gram matched) from the text so far."""
    check_generation_request(config, input_ids, max_new_tokens)
    timer, eos_token_ids = timer or _no_timer, set(eos_token_ids)
    with timer("prefill"):
        generated = steps.prefill(input_ids, max_new_tokens).tolist()
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(generated))
    text = input_ids[0].tolist() + generated if steps.lookup_length else None
    accepted_lengths, tree_sizes, lookup_accepted = [], [], 0
    while generated[-1] not in eos_token_ids and len(generated) < max_new_tokens:
        lookup = propose_lookup(text, steps.lookup_length, max_ngram) if text is not None else []
        summary = steps.step(max_new_tokens - len(generated), timer, lookup).tolist()
        new_tokens, nodes, from_lookup = read_step_summary(summary)
        accepted_lengths.append(len(new_tokens))
        tree_sizes.append(nodes)
        lookup_accepted += from_lookup
        emitted = emit_tokens(generated, new_tokens, eos_token_ids, max_new_tokens)
        if text is not None:
            text += emitted
        if streamer is not None:
            streamer.put(torch.tensor(emitted))
    if streamer is not None:
        streamer.end()
    new = torch.tensor([generated], device=input_ids.device, dtype=input_ids.dtype)
    return SpeculativeStreamingOutput(
        sequences=torch.cat([input_ids, new], dim=1), num_forward_calls=1 + len(accepted_lengths),
        accepted_lengths=accepted_lengths, tree_sizes=tree_sizes, lookup_accepted=lookup_accepted,
    )


def lookup_tensor(lookup: list[int], length: int, filler: int, device) -> torch.Tensor:
    """The lookup branch's drafts as a (length,) tensor, padded with ``filler`` (wrong
    drafts cost nothing but a node: verification rejects them)."""
    return torch.tensor((lookup + [filler] * length)[:length], device=device)


class DynamicTreeSteps:
    """The dynamic path: a `VariableLengthKVCache` sized for the request, and a tree cut
    short near ``max_new_tokens`` or the end of the context, without its lookup branch when
    the text offers no match. With ``prune_threshold`` the early-exit adapter drops
    unlikely nodes mid-forward (`prune_mask`): fewer nodes run, the output is unchanged."""

    def __init__(self, model, tree_widths=DEFAULT_TREE_WIDTHS, prune_threshold: float = 0.0,
                 lookup_length: int = 0):
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
        self.cache = self.root = self.root_streams = None

    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        prompt_length = input_ids.shape[1]
        self.cache = VariableLengthKVCache(self.model.config, 1, prompt_length + max_new_tokens + self.tree.size,
                                           input_ids.device, self.model.dtype)
        last = torch.tensor([prompt_length - 1], device=input_ids.device)
        out = self.model.run_tree(input_ids, self.cache, torch.arange(prompt_length, device=input_ids.device)[None],
                                  streams=self.streams, logit_positions=last)
        self.root = out.logits[0, 0].argmax()
        self.root_streams = out.stream_states[0, :, 0] if self.streams else None
        return self.root.reshape(1)

    def step(self, remaining: int, timer, lookup: list[int] = ()) -> torch.Tensor:
        prefix = self.cache.length
        depth = min(self.tree.max_depth, remaining - 1, self.context - 1 - prefix)
        tree = self.trees[depth, bool(lookup)]
        with timer("draft"):
            stream_logits = self.model.draft_logits(self.root_streams) if tree.widths else None
            chain = lookup_tensor(list(lookup), tree.lookup_length, 0, prefix_device(self.cache))
            tokens = draft_tree(self.root, stream_logits, tree, chain)
        with timer("forward"):
            out = self.model.run_tree(tokens[None], self.cache, (prefix + tree.depths)[None], tree.tree_mask,
                                      streams=self.streams, early_exit_filter=self._pruner(tokens, tree))
            predictions = out.logits[0].argmax(dim=-1)
        with timer("verify"):
            slot_of_node, tokens_seen, nodes = None, tokens, tree.size
            if out.kept is not None:
                slot_of_node, predictions, tokens_seen = on_full_tree(tokens, out.kept, predictions)
                nodes = out.kept.numel()
            best, accepted = evaluate_paths(tokens_seen, predictions, tree)
            path = tree.paths[best]
            accepted_nodes = path[: int(accepted) + 1]
            slots = accepted_nodes if slot_of_node is None else slot_of_node[accepted_nodes]
            self.cache.compact(prefix, prefix + slots)
            self.root = predictions[accepted_nodes[-1]]
            if self.streams:
                self.root_streams = out.stream_states[0, :, slots[-1]]
        from_lookup = tree.is_lookup[path[min(1, tree.max_depth)]]
        return step_summary(accepted, torch.tensor(nodes), from_lookup, tokens[path], predictions[path])

    def _pruner(self, tokens, tree):
        """The early-exit filter of a pruned step, or None."""
        if not self.prune_threshold or tree.size == 1:
            return None
        return lambda logits: prune_mask(tokens, logits[0], tree, self.prune_threshold).nonzero().flatten()


def prefix_device(cache) -> torch.device:
    return cache.keys.device


def on_full_tree(tokens: torch.Tensor, kept: torch.Tensor, predictions: torch.Tensor):
    """Back to full-tree indexing after pruning: (slot in the forward of each node, -1 if
    pruned; the prediction at each node, -1 if pruned; the tokens with pruned ones set to
    -2, so that no path can accept them)."""
    slot_of_node = torch.full_like(tokens, -1).index_put_((kept,), torch.arange(kept.numel(), device=tokens.device))
    full_predictions = torch.full_like(tokens, -1).index_put_((kept,), predictions)
    return slot_of_node, full_predictions, torch.where(slot_of_node >= 0, tokens, -2)


class SpeculativeStreamingGenerationMixin(GenerationMixin):
    """Upstream `generate`, plus ``speculative_streaming=True`` for tree-draft decoding."""

    _SUPPORTED = {"attention_mask", "streamer", "tree_widths", "step_timer", "prune_threshold"}

    def generate(self, inputs=None, generation_config=None, speculative_streaming: bool = False, **kwargs):
        if not speculative_streaming:
            return super().generate(inputs, generation_config, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("speculative_streaming=True needs input_ids (batch of 1 prompt).")
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        extra = generation_config.update(**kwargs)
        unknown = set(extra) - self._SUPPORTED
        if unknown:
            raise ValueError(
                f"speculative_streaming=True does not support {sorted(unknown)}; supported extras: "
                f"{sorted(self._SUPPORTED)} plus max_new_tokens, eos_token_id, pad_token_id."
            )
        if generation_config.do_sample or (generation_config.num_beams or 1) > 1:
            raise ValueError(
                "speculative_streaming=True is greedy only (do_sample=False, num_beams=1), so its output is "
                "identical to greedy decoding; for sampling or beam search call generate() without it."
            )
        attention_mask = extra.get("attention_mask")
        prompt = input_ids
        if attention_mask is not None and not bool(attention_mask.all()):
            prompt = input_ids[:, attention_mask[0].bool()]  # batch 1: padding carries nothing
        max_new_tokens = generation_config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = max(generation_config.max_length - input_ids.shape[1], 0)
        tree_widths = extra.get("tree_widths", "auto")  # () is a tree of the root alone: one token per call
        if tree_widths is None or tree_widths == "auto":
            tree_widths = self.auto_tree_widths()
        eos = generation_config.eos_token_id
        eos_ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
        # prompt lookup (transformers' own two settings): one more branch of the same tree
        lookup_length = int(generation_config.prompt_lookup_num_tokens or 0)
        max_ngram = int(generation_config.max_matching_ngram_size or DEFAULT_MAX_NGRAM)
        steps = DynamicTreeSteps(self, tuple(tree_widths), float(extra.get("prune_threshold") or 0.0), lookup_length)
        output = decode(steps, self.config, prompt, max_new_tokens, eos_ids, streamer=extra.get("streamer"),
                        timer=extra.get("step_timer"), max_ngram=max_ngram)
        if prompt is not input_ids:
            output.sequences = torch.cat([input_ids, output.sequences[:, prompt.shape[1]:]], dim=1)
        return output if generation_config.return_dict_in_generate else output.sequences

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
