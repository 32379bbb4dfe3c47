"""Speculative Streaming decoding: draft a tree with the streams, verify it in the same
forward pass, keep the longest path that greedy decoding would have produced.

Medusa-style pure functions (tree buffers, drafting, path evaluation) plus one loop,
reachable as ``model.generate(input_ids, speculative_streaming=True, tree_widths=(4, 3, 2))``.
Everything else goes to upstream `GenerationMixin.generate`.

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
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import ModelOutput

from ..cache_utils import StaticKVCache

DEFAULT_TREE_WIDTHS = (4, 3, 2)


# ----------------------------------------------------------------------------------------
# Tree buffers
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeBuffers:
    """A static draft tree, nodes in breadth-first order (node 0 = root).

    depths (n,): 0 for the root, j for a token of stream j.
    parents (n,): index of each node's parent (0 for the root itself).
    topk_ranks (n,): which of stream j's top-k tokens the node holds (0 for the root).
    tree_mask (n, n): node i may attend to node k iff k is i or an ancestor of i.
    paths (num_leaves, max_depth + 1): node indices from the root to each leaf.
    """

    widths: tuple
    depths: torch.Tensor
    parents: torch.Tensor
    topk_ranks: torch.Tensor
    tree_mask: torch.Tensor
    paths: torch.Tensor

    @property
    def size(self) -> int:
        return self.depths.numel()

    @property
    def max_depth(self) -> int:
        return self.paths.shape[1] - 1

    def truncated(self, max_depth: int) -> "TreeBuffers":
        """The same tree cut below ``max_depth`` (breadth-first order makes it a prefix)."""
        if max_depth >= self.max_depth:
            return self
        size = int((self.depths <= max_depth).sum())
        paths = torch.unique(self.paths[:, : max_depth + 1], dim=0)
        return TreeBuffers(
            self.widths[:max_depth], self.depths[:size], self.parents[:size], self.topk_ranks[:size],
            self.tree_mask[:size, :size], paths,
        )


def build_tree_buffers(tree_widths, device=None, num_streams: int | None = None) -> TreeBuffers:
    """Tree of ``1 + sum_j prod_{i<=j} k_i`` nodes for widths ``(k_1, ..., k_D)``; with
    ``num_streams``, checks that the model has a stream for every level."""
    if any(int(k) < 1 for k in tree_widths):
        raise ValueError(f"tree_widths={tuple(tree_widths)}: every width must be >= 1.")
    if num_streams is not None and len(tree_widths) > num_streams:
        raise ValueError(
            f"tree_widths={tuple(tree_widths)} has {len(tree_widths)} levels but the model has "
            f"{num_streams} speculative streams; pass at most that many widths."
        )
    levels = [[()]]  # each node named by its top-k ranks from the root down
    for width in tree_widths:
        levels.append([name + (rank,) for name in levels[-1] for rank in range(int(width))])
    names = [name for level in levels for name in level]
    index = {name: i for i, name in enumerate(names)}
    size = len(names)
    tree_mask = torch.zeros(size, size, dtype=torch.bool)
    for i, name in enumerate(names):
        for d in range(len(name) + 1):
            tree_mask[i, index[name[:d]]] = True
    paths = torch.tensor([[index[leaf[:d]] for d in range(len(leaf) + 1)] for leaf in levels[-1]])
    return TreeBuffers(
        widths=tuple(int(k) for k in tree_widths),
        depths=torch.tensor([len(name) for name in names], device=device),
        parents=torch.tensor([index[name[:-1]] if name else 0 for name in names], device=device),
        topk_ranks=torch.tensor([name[-1] if name else 0 for name in names], device=device),
        tree_mask=tree_mask.to(device),
        paths=paths.to(device),
    )


# ----------------------------------------------------------------------------------------
# Draft and verify (pure functions on device tensors)
# ----------------------------------------------------------------------------------------
def draft_tree(root: torch.Tensor, stream_logits: torch.Tensor, buffers: TreeBuffers) -> torch.Tensor:
    """Tokens of every tree node. root: () token; stream_logits: (gamma, vocab) at the
    last accepted node; stream j's top-k fills depth j."""
    if buffers.size == 1:
        return root.reshape(1)
    top = stream_logits[: buffers.max_depth].topk(max(buffers.widths), dim=-1).indices
    drafts = top[buffers.depths[1:] - 1, buffers.topk_ranks[1:]]
    return torch.cat([root.reshape(1), drafts])


def evaluate_paths(tree_tokens: torch.Tensor, predictions: torch.Tensor, buffers: TreeBuffers):
    """Greedy verification. predictions (n,): the main-stream argmax at each node.
    Returns (best path index, accepted drafts on it) as 0-d tensors; ties go to the first
    path, so the choice is deterministic."""
    path_tokens = tree_tokens[buffers.paths]
    path_predictions = predictions[buffers.paths]
    matches = (path_tokens[:, 1:] == path_predictions[:, :-1]).int().cumprod(dim=1).sum(dim=1)
    return matches.argmax(), matches.max()  # (not matches[best]: a 0-d tensor index syncs the host)


def prune_mask(tree_tokens: torch.Tensor, early_exit_logits: torch.Tensor, buffers: TreeBuffers,
               threshold: float) -> torch.Tensor:
    """Which nodes survive pruning (bool, (n,)): a node is dropped when the early-exit
    probability of its token under its parent's early-exit distribution is below
    ``threshold``, and so is everything below it. Dropping drafts only shortens what can
    be accepted, never what is accepted from the nodes kept: output is unchanged."""
    probabilities = early_exit_logits.float().softmax(dim=-1)
    likely = torch.ones_like(tree_tokens, dtype=torch.bool)
    likely[1:] = probabilities[buffers.parents[1:], tree_tokens[1:]] >= threshold
    return ~(buffers.tree_mask & ~likely[None, :]).any(dim=1)  # every ancestor-or-self is likely


# ----------------------------------------------------------------------------------------
# Timing (for the benchmark's step breakdown)
# ----------------------------------------------------------------------------------------
class StepTimer:
    """Accumulates wall time per section, synchronising the device around each one."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] += time.perf_counter() - start


def _no_timer(name: str):
    return contextlib.nullcontext()


@dataclass
class SpeculativeStreamingOutput(ModelOutput):
    """sequences: (1, prompt + new). num_forward_calls: prefill + tree steps.
    accepted_lengths: tokens gained by each tree step (accepted drafts + correction); the
    prefill's single token is not in it, so ``1 + sum(accepted_lengths) >= new tokens``
    (equal unless EOS or max_new_tokens cut the last step). tree_sizes: tree nodes that
    went through the top layers in each step (fewer than the tree when pruning)."""

    sequences: torch.Tensor | None = None
    num_forward_calls: int | None = None
    accepted_lengths: list | None = None
    tree_sizes: list | None = None


# ----------------------------------------------------------------------------------------
# The decoding loop
# ----------------------------------------------------------------------------------------
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
def speculative_streaming_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int],
    tree_widths=DEFAULT_TREE_WIDTHS,
    streamer=None,
    timer=None,
    prune_threshold: float = 0.0,
) -> SpeculativeStreamingOutput:
    """Batch-1 greedy decoding with tree drafts; see the module docstring."""
    config = model.config
    timer = timer or _no_timer
    prompt_length = input_ids.shape[1]
    check_generation_request(config, input_ids, max_new_tokens)
    if prune_threshold and (config.num_spec_streams == 0 or not config.pruner_rank):
        raise ValueError("prune_threshold needs a model with streams and a pruning adapter (pruner_rank > 0).")
    device = input_ids.device
    buffers = build_tree_buffers(tree_widths, device, num_streams=config.num_spec_streams)
    trees_by_depth = [buffers.truncated(depth) for depth in range(buffers.max_depth + 1)]
    cache = StaticKVCache(
        config, 1, prompt_length + max_new_tokens + buffers.size, device, model.dtype
    )
    streams = config.num_spec_streams > 0 and buffers.max_depth > 0
    with timer("prefill"):
        hidden, stream_hidden, _ = model.transformer(
            input_ids, cache, stream_positions=torch.tensor([prompt_length - 1], device=device) if streams else None
        )
        root = model.lm_head(hidden[0, -1]).argmax()
    node_stream_hidden = stream_hidden[0, :, 0] if streams else None
    generated = [int(root)]
    accepted_lengths, tree_sizes = [], []
    if streamer is not None:
        streamer.put(input_ids.cpu())
        streamer.put(torch.tensor(generated))
    while generated[-1] not in eos_token_ids and len(generated) < max_new_tokens:
        prefix = cache.length
        depth = min(buffers.max_depth, max_new_tokens - len(generated) - 1,
                    config.max_position_embeddings - 1 - prefix)
        with timer("draft"):
            tree = trees_by_depth[depth]
            stream_logits = model.lm_head(node_stream_hidden) if tree.size > 1 else None
            tokens = draft_tree(root, stream_logits, tree)
            position_ids = (prefix + tree.depths)[None]
        kept = None  # indices of the nodes that survive pruning (None: all of them)

        def prune(early_exit_hidden):
            nonlocal kept
            kept = prune_mask(tokens, model.lm_head(early_exit_hidden[0]), tree, prune_threshold).nonzero().flatten()
            return kept

        with timer("forward"):
            hidden, stream_hidden, _ = model.transformer(
                tokens[None], cache, position_ids=position_ids, tree_mask=tree.tree_mask,
                stream_positions="all" if streams else None,
                node_filter=prune if prune_threshold and tree.size > 1 else None,
            )
            predictions = model.lm_head(hidden[0]).argmax(dim=-1)
        with timer("verify"):
            slot_of_node = None
            if kept is not None:  # back to full-tree indexing; pruned nodes can never match
                tree_sizes.append(kept.numel())
                slot_of_node = torch.full_like(tokens, -1).index_put_((kept,), torch.arange(kept.numel(), device=device))
                predictions = torch.full_like(tokens, -1).index_put_((kept,), predictions)
                tokens_seen = torch.where(slot_of_node >= 0, tokens, -2)
            else:
                tree_sizes.append(tree.size)
                tokens_seen = tokens
            best, accepted = evaluate_paths(tokens_seen, predictions, tree)
            path = tree.paths[best]
            # the one device-to-host copy of the step: accepted count, path tokens, correction
            summary = torch.cat([accepted.reshape(1), tokens[path], predictions[path]]).tolist()
            accepted = summary[0]
            path_tokens, path_predictions = summary[1 : 2 + tree.max_depth], summary[2 + tree.max_depth :]
            new_tokens = path_tokens[1 : accepted + 1] + [path_predictions[accepted]]
            accepted_lengths.append(len(new_tokens))
            accepted_nodes = path[: accepted + 1]
            slots = accepted_nodes if slot_of_node is None else slot_of_node[accepted_nodes]
            cache.compact(prefix, prefix + slots)
            root = predictions[accepted_nodes[-1]]
            if streams:
                node_stream_hidden = stream_hidden[0, :, slots[-1]]
        emitted = emit_tokens(generated, new_tokens, eos_token_ids, max_new_tokens)
        if streamer is not None:
            streamer.put(torch.tensor(emitted))
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, torch.tensor([generated], device=device, dtype=input_ids.dtype)], dim=1)
    return SpeculativeStreamingOutput(
        sequences=sequences, num_forward_calls=1 + len(accepted_lengths), accepted_lengths=accepted_lengths,
        tree_sizes=tree_sizes,
    )


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
        tree_widths = extra.get("tree_widths")  # () is a tree of the root alone: one token per call
        if tree_widths is None:
            tree_widths = DEFAULT_TREE_WIDTHS[: self.config.num_spec_streams]
        eos = generation_config.eos_token_id
        eos_ids = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
        output = speculative_streaming_decode(
            self, prompt, max_new_tokens, eos_ids,
            tree_widths=tuple(tree_widths),
            streamer=extra.get("streamer"), timer=extra.get("step_timer"),
            prune_threshold=float(extra.get("prune_threshold") or 0.0),
        )
        if prompt is not input_ids:
            output.sequences = torch.cat([input_ids, output.sequences[:, prompt.shape[1]:]], dim=1)
        return output if generation_config.return_dict_in_generate else output.sequences
