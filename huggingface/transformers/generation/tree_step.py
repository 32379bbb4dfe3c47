"""One decoding step of Speculative Streaming, written once.

With ``L`` tokens cached and ``root`` the last token emitted (not yet cached), `TreeStep`:
1. drafts: tree = root + top-k_j tokens of stream j at the last accepted node, stream j+1's
   tokens children of stream j's (plus the lookup chain, if any); node position = L + depth;
2. runs one forward over the flattened tree (tree attention mask); the main stream at
   each node predicts that node's successor, the streams at each node draft the next tree;
3. verifies: greedy accepts the longest root-to-leaf path whose every token equals the
   main-stream choice at its parent; sampling walks the tree (`sample_path`); the choice
   after the last accepted node is the next root;
4. compacts the accepted nodes' KV entries to slots ``L, L+1, ...``.
A step emits the accepted drafts plus the next root: at least one token, chosen exactly as
plain decoding chooses it. Device work only, no host reads (except processors that read the
text, which run eagerly): `fixed_shape.FixedShapeDecoder` runs it, eager, compiled or as a
CUDA graph. The model is reached through `TreeModel` alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from ..cache_utils import FixedShapeKVCache, select_per_row
from .request import NodeScorer
from .speculative_tree import (
    TreeBuffers,
    TreeSpec,
    draft_tree,
    evaluate_paths,
    sample_from,
    sample_path,
    uniforms_shape,
    valid_drafts,
)


class TreeModel(Protocol):
    """What decoding needs of a model (`GPTNeoForCausalLM` provides it): its config
    (``num_spec_streams``, ``max_position_embeddings``, ``hidden_size``, ``num_layers``,
    ``num_heads``), device and dtype, and two calls."""

    config: object
    device: torch.device
    dtype: torch.dtype

    def run_tree(self, tokens: torch.Tensor, cache, position_ids: torch.Tensor, tree_mask=None,
                 num_streams: int | None = None, logit_positions=None):
        """One forward over a flattened tree (or prompts): ``.logits`` (B, n, V) at the
        requested nodes, ``.stream_states`` (B, streams, n, H)."""

    def draft_logits(self, stream_states: torch.Tensor) -> torch.Tensor:
        """Stream logits (..., V) from stream states (..., H)."""


def no_timer(name: str):
    return contextlib.nullcontext()


@dataclass
class DecodeState:
    """What a step reads and writes, per batch row, at fixed addresses (graphs and compiled
    steps read them on every call): the cache, the last emitted token (``root`` (B,)), the
    stream states at the last accepted node (``root_streams`` (B, streams, H); None without
    streams) and each row's prompt from slot 0 (``prompt`` (B, context), ``prompt_length``
    (B,)). ``length_limit``: the most tokens a row may hold; a row held there runs on
    without growing (finished rows keep running)."""

    cache: FixedShapeKVCache
    root: torch.Tensor
    root_streams: torch.Tensor | None
    length_limit: int
    prompt: torch.Tensor
    prompt_length: torch.Tensor

    @classmethod
    def create(cls, model, batch: int, slots: int, streams: int, tree_size: int) -> "DecodeState":
        config, device = model.config, model.device
        return cls(
            cache=FixedShapeKVCache(config, batch, slots, device, model.dtype),
            root=torch.zeros(batch, dtype=torch.long, device=device),
            root_streams=torch.zeros(batch, streams, config.hidden_size, dtype=model.dtype, device=device)
            if streams else None,
            length_limit=min(config.max_position_embeddings, slots - tree_size),
            prompt=torch.zeros(batch, config.max_position_embeddings, dtype=torch.long, device=device),
            prompt_length=torch.ones(batch, dtype=torch.long, device=device),
        )


def step_summary(accepted, nodes, from_lookup, path_tokens, path_predictions) -> torch.Tensor:
    """Pack a step's result per row, (B, S), in the layout `utils.read_step_summary` reads:
    accepted, nodes, from_lookup (B,); path tokens and predictions (B, D + 1)."""
    head = torch.stack([accepted, nodes.to(accepted.dtype), from_lookup.to(accepted.dtype)], dim=-1)
    return torch.cat([head, path_tokens, path_predictions], dim=-1)


def first_tokens(scorer: NodeScorer | None, logits: torch.Tensor, text=None, uniform=None):
    """Each row's first new token from its prompt's last logits (B, V): the argmax, or
    through ``scorer`` the processed scores' argmax, or (batch 1) a sample when ``uniform``
    is given. Returns (tokens (B,), recorded (scores, logits) or None)."""
    if scorer is None:
        return logits.argmax(dim=-1), None
    scores = scorer(logits, text)
    tokens = scores.argmax(dim=-1) if uniform is None else sample_from(scores[0].softmax(dim=-1), uniform)[None]
    return tokens, (scores, logits.float()) if scorer.record else None


def chosen_after(tree_tokens: torch.Tensor, path: torch.Tensor, accepted: torch.Tensor, token: torch.Tensor):
    """The token chosen after each node of a sampled path (D + 1,): the next accepted
    draft, then ``token`` after the last accepted node (beyond it: unused)."""
    following = tree_tokens[path].roll(-1)
    return torch.where(torch.arange(len(path), device=path.device) == accepted, token, following)


def lookup_tensor(lookup: list[int], length: int, filler: int, device) -> torch.Tensor:
    """The lookup branch's drafts as a (length,) tensor, padded with ``filler`` (wrong
    drafts cost nothing but a node: greedy verification rejects them, sampling verification
    never tries them, see `valid_drafts`)."""
    return torch.tensor((lookup + [filler] * length)[:length], device=device)


class TreeStep:
    """The prefill and the draft-forward-verify-compact step of one model, for trees
    drafting from its first ``num_streams`` streams; device work only, no host reads
    (except processors that read the text). ``scorer``: processors, warpers, sampling
    (`request.NodeScorer`); None: greedy on the raw logits. ``recorded``: after a call with
    a recording scorer, the (scores, logits) rows of the chosen path's nodes."""

    def __init__(self, model: TreeModel, num_streams: int, scorer: NodeScorer | None = None):
        self.model, self.num_streams, self.scorer = model, num_streams, scorer
        self.context = model.config.max_position_embeddings
        self.recorded = None

    def prefill(self, state: DecodeState, prompts: torch.Tensor, lengths: torch.Tensor, text=None,
                uniform=None) -> torch.Tensor:
        """Prompts (B, P), each row's real tokens (``lengths`` (B,)) from slot 0 of an empty
        cache; sets and returns each row's first new token (B,)."""
        out = self.model.run_tree(prompts, state.cache, torch.arange(prompts.shape[1], device=prompts.device)[None],
                                  num_streams=self.num_streams, logit_positions=(lengths - 1)[:, None])
        state.cache.set_length(lengths)  # a shorter row's filler slots become stale
        root, self.recorded = first_tokens(self.scorer, out.logits[:, 0], text, uniform)
        state.root.copy_(root)
        if self.num_streams:
            state.root_streams.copy_(out.stream_states[:, :, 0])
        return state.root

    def step(self, state: DecodeState, tree: TreeBuffers, lookup: torch.Tensor | None = None, lookup_count=0,
             text=None, uniforms=None, timer=no_timer) -> torch.Tensor:
        """One step of every row on ``tree`` (``lookup``: its chain's drafts, of which
        ``lookup_count`` real; ``uniforms``: sampling's draws); returns its summary (B, S)."""
        start = state.cache.length.clone()  # (B,)
        with timer("draft"):
            stream_logits = self.model.draft_logits(state.root_streams) if tree.widths else None  # (B, streams, V)
            tokens = draft_tree(state.root, stream_logits, tree, lookup)  # (B, n)
        with timer("forward"):
            positions = (start[:, None] + tree.depths).clamp(max=self.context - 1)  # past the end: ignored drafts
            out = self.model.run_tree(tokens, state.cache, positions, tree.tree_mask, num_streams=self.num_streams)
        with timer("verify"):
            path, accepted, choices = self.verify(tokens, out.logits, tree, lookup_count, text, uniforms)
            # each row's whole path moves next to its prefix; its accepted nodes count (up to the limit)
            counted = torch.minimum(accepted + 1, state.length_limit - start)
            state.cache.compact(start, start[:, None] + path, counted)
            last = path.gather(1, accepted[:, None])  # (B, 1): each row's last accepted node
            state.root.copy_(choices.gather(1, accepted[:, None])[:, 0])
            if self.num_streams:
                state.root_streams.copy_(select_per_row(out.stream_states, last, 2)[:, :, 0])
        nodes = torch.full_like(accepted, tree.size)
        from_lookup = tree.is_lookup.index_select(0, path[:, min(1, tree.max_depth)])
        return step_summary(accepted, nodes, from_lookup, tokens.gather(1, path), choices)

    def verify(self, tokens, logits, tree: TreeBuffers, lookup_count, text, uniforms):
        """Greedy (each row's longest matching path) or sampling (`sample_path`, batch 1)
        verification. Returns, per row, (the chosen path (B, D + 1), accepted drafts on it
        (B,), the token chosen after each path node (B, D + 1))."""
        scores = self._scores(logits, text, tokens, tree)  # (B, n, V)
        if uniforms is None:
            predictions = scores.argmax(dim=-1)  # (B, n)
            best, accepted = evaluate_paths(tokens, predictions, tree)
            # index with index_select/gather, never tensor[0-d tensor]: that reads the value on the host
            path = tree.paths.index_select(0, best)
            choices = predictions.gather(1, path)
        else:
            valid = valid_drafts(tree, lookup_count)
            path, accepted, token = sample_path(tokens[0], scores[0].softmax(dim=-1), valid, tree, uniforms)
            path, accepted, choices = path[None], accepted[None], chosen_after(tokens[0], path, accepted, token)[None]
        if self.scorer is not None and self.scorer.record:
            self.recorded = (scores[0, path[0]].float(), logits[0, path[0]].float())
        return path, accepted, choices

    def _scores(self, logits, text, tokens, tree):
        """What each node's token is chosen from (B, n, V): the logits, or the scorer's
        scores (processors that read the text: batch 1, each node seeing its prefix)."""
        if self.scorer is None:
            return logits
        if not self.scorer.needs_text:
            return self.scorer(logits.flatten(0, 1)).view(logits.shape)
        return self.scorer(logits[0], text, tokens[0], tree)[None]
