"""How often the streams' drafts (and a prompt-lookup chain's) are greedy decoding's tokens.

Measured at the end of fine-tuning on validation prompts and stored in the checkpoint's
``generation_config.json`` (`training.evaluation`), where ``tree_widths="auto"`` reads them
(`huggingface.transformers.generation.tree_search`); `replayed_accepted_lengths` replays a
product tree's steps on a given text (scripts/tokens_per_call_on_texts.py).
"""
from __future__ import annotations

import torch

from huggingface.transformers.generation.speculative_tree import DEFAULT_MAX_NGRAM, TreeSpec, propose_lookup
from huggingface.transformers.generation.tree_search import MAX_LOOKUP, MAX_WIDTH


@torch.no_grad()
def measure_acceptance(model, prompts, max_new_tokens: int = 48, max_rank: int = MAX_WIDTH,
                       texts=None) -> list[list[float]]:
    """``acceptance[j][r]`` for the model's streams on the given prompts (each (1, P)):
    greedy continuations (``texts``: `greedy_texts` already made), then one forward with
    the streams at every position; the rank of greedy's token at depth j in stream j,
    counted where every shallower draft was within the top ``max_rank`` (so could have
    been in a tree)."""
    depth = model.config.num_spec_streams
    counts = torch.zeros(depth, max_rank, dtype=torch.long)
    eligible = torch.zeros(depth, dtype=torch.long)
    for ids, sequence in zip(prompts, texts or greedy_texts(model, prompts, max_new_tokens)):
        ranks = _draft_ranks(model, sequence, ids.shape[1], depth)  # (positions, depth)
        within = torch.ones(ranks.shape[0], dtype=torch.bool)
        for j in range(depth):
            eligible[j] += int(within.sum())
            counts[j] += torch.bincount(ranks[within, j].clamp(max=max_rank), minlength=max_rank + 1)[:max_rank]
            within &= ranks[:, j] < max_rank
    return (counts / eligible.clamp(min=1)[:, None]).tolist()


@torch.no_grad()
def measure_lookup_acceptance(model, prompts, max_new_tokens: int = 48, length: int = MAX_LOOKUP,
                              max_ngram: int = DEFAULT_MAX_NGRAM, texts=None) -> list[float]:
    """``lookup_acceptance[j]`` on the given prompts (each (1, P)): at every step of their
    greedy continuations (``texts``: `greedy_texts` already made), the chain
    `propose_lookup` offers from the text so far, and the chance that its depth-``j + 1``
    draft is greedy's token given that those above it were (no match, or a chain that
    ends, counts as a miss)."""
    accepted, eligible = [0] * length, [0] * length
    for ids, text in zip(prompts, texts or greedy_texts(model, prompts, max_new_tokens)):
        sequence = text[0].tolist()
        for end in range(ids.shape[1] + 1, len(sequence)):  # text so far: up to the root at end - 1 (the
            # first lookup follows the prefill's token, as in decoding)
            drafts = propose_lookup(sequence[:end], length, max_ngram)
            for depth in range(min(length, len(sequence) - end)):
                eligible[depth] += 1
                if depth >= len(drafts) or drafts[depth] != sequence[end + depth]:
                    break
                accepted[depth] += 1
    return [a / e if e else 0.0 for a, e in zip(accepted, eligible)]


@torch.no_grad()
def replayed_accepted_lengths(model, text: torch.Tensor, prompt_length: int, tree_widths) -> list[int]:
    """The tokens each step of a product tree of ``tree_widths`` gains when decoding ``text``
    (1, L) on from its first ``prompt_length`` tokens, as if each of its tokens were the
    main stream's choice: one forward with the streams everywhere, then the steps replayed
    (the depth-``d`` draft is accepted while the text's token is within stream ``d``'s
    top-``k_d`` at the last accepted node). On a model's own greedy text it is what
    decoding gains; on another model's text, tokens per call on the same text."""
    if not 1 <= prompt_length <= text.shape[1]:
        raise ValueError(f"prompt_length {prompt_length} must be within the text's 1..{text.shape[1]} tokens")
    tree_widths = TreeSpec(tuple(tree_widths)).check_streams(model.config.num_spec_streams).widths
    ranks = _stream_ranks(model, text, prompt_length, len(tree_widths))  # row i: the node at prompt_length - 1 + i
    length = text.shape[1]
    gained, node = [], prompt_length - 1  # the prefill emits the token at prompt_length
    while node + 2 < length:  # the root sits at node + 1; tokens after it remain
        row, accepted = ranks[node - prompt_length + 1], 0
        while accepted < len(tree_widths) and row[accepted] < tree_widths[accepted]:
            accepted += 1
        gained.append(min(1 + accepted, length - node - 2))  # the correction, if the text goes on
        node += 1 + accepted
    return gained


def greedy_texts(model, prompts, max_new_tokens: int) -> list[torch.Tensor]:
    """Each prompt (1, P) and its greedy continuation up to the model's end-of-sequence
    token (what decoding will see: past it a small model loops, which flatters every draft)."""
    return [model.generate(ids, speculative_streaming=True, tree_widths=(), max_new_tokens=max_new_tokens)
            for ids in prompts]


def _draft_ranks(model, sequence: torch.Tensor, prompt_length: int, depth: int) -> torch.Tensor:
    """`_stream_ranks` at the positions with all ``depth`` targets known: (positions, depth)."""
    known = max(0, sequence.shape[1] - depth - prompt_length)  # positions t < length - 1 - depth
    return _stream_ranks(model, sequence, prompt_length, depth)[:known]


NO_TARGET = torch.iinfo(torch.long).max  # the rank of a target past the text's end: never within a tree


def _stream_ranks(model, sequence: torch.Tensor, prompt_length: int, depth: int) -> torch.Tensor:
    """Rank of the text's token ``t + 2 + j`` in stream ``j + 1``'s logits at ``t``
    (``NO_TARGET`` past the text's end), for every position ``t`` from ``prompt_length - 1``
    to the second-last: (positions, depth), on the CPU."""
    length = sequence.shape[1]
    starts = torch.arange(prompt_length - 1, max(prompt_length - 1, length - 1))
    ranks = torch.full((len(starts), depth), NO_TARGET, dtype=torch.long)
    if not depth or not len(starts):
        return ranks
    stream_logits = model(sequence, stream_positions="all").stream_logits[0]  # (streams, L, V)
    for j in range(depth):
        known = starts + 2 + j < length
        positions = starts[known].to(stream_logits.device)
        logits = stream_logits[j, positions].float()
        target = sequence[0, positions + 2 + j].to(logits.device)
        ranks[known, j] = (logits > logits.gather(1, target[:, None])).sum(dim=1).cpu()
    return ranks
