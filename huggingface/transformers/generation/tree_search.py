"""``tree_widths="auto"``: the draft tree that maximises expected tokens per second.

Two measurements decide it (Sequoia / EAGLE-2 in spirit, for product trees):
- *acceptance*: ``acceptance[j][r]``, the probability that the rank-``r`` token of stream
  ``j + 1`` is greedy decoding's next-but-``j`` token, given that the drafts above it were
  accepted. Measured once on validation prompts (`measure_acceptance`, run at the end of
  fine-tuning and stored in the checkpoint's ``generation_config.json`` as
  ``stream_acceptance``). A product tree of widths ``(k_1, ..., k_D)`` accepts depth ``j``
  after depth ``j - 1`` with probability ``a_j = sum_{r < k_j} acceptance[j-1][r]`` (only
  one token is right), so a step gains ``1 + sum_d prod_{j<=d} a_j`` tokens on average.
  With a prompt-lookup chain beside the tree, ``lookup_acceptance[j]`` (stored as such,
  `measure_lookup_acceptance`) is the chance that its depth-``j + 1`` draft is right
  after the ones above it; a step reaches depth ``d`` by either branch, taken as
  independent: ``1 - (1 - prod a_j) (1 - prod l_j)``.
- *step latency* on the device at hand (`probe_step_seconds`: real decoding steps, the trees
  taking turns, cached per model, device and batch size), as a function of the step's rows
  (`tree_rows`: every node through every layer, plus its stream rows, one per tree level,
  through the stream layers), linear in between.
`choose_tree` takes the candidate with the most expected tokens per second. A batch of B
prompts runs B trees per step, so its latencies are probed at B: where a batch's own rows
already keep the machine busy, the choice shrinks, down to ``()`` (no drafts) where
speculation no longer pays.
"""
from __future__ import annotations

import itertools
import statistics
import time

import torch

from .speculative_tree import (AUTO, DEFAULT_MAX_NGRAM, DEFAULT_TREE_WIDTHS, TreeSpec, parse_tree, propose_lookup,
                               tree_size)
from .tree_step import DynamicTreeSteps, no_timer

MAX_WIDTH = 8  # candidates' widths; acceptance is measured for ranks below it
MAX_LOOKUP = 8  # lookup-chain depths whose acceptance is measured (the benchmark's chains are shorter)
MAX_TREE_NODES = 128  # beyond this a step costs more than any measured acceptance repays on our devices
PROBE_TREES = ((), (1,), (2,), (3,), (2, 2), (4, 2), (4, 3, 2), (6, 4, 2), (8, 4, 2))  # sizes 1 .. 105; on a
# CPU, trees of up to 8 rows a layer may take the few-row kernel (`linear_rows`): (3,) probes that edge
PROBE_BURST = 3  # timed steps of one tree per turn of `probe_step_seconds`
PROBE_SETTLE = 6  # untimed steps before them: after a big tree's step the next small ones run slow for a while
# (2-core Xeon, compiled: () 2.1, 1.8, then 1.5 ms after a (4,3,2) step, 1.4 in a run of its own). With 2 the
# probe read () 1.6-2.3 ms against 1.22 inside generate on E2E-NLG, and so (2,) at 1.5-1.6x () against 1.81


def expected_tokens_per_step(tree_widths, acceptance, lookup_acceptance=(), lookup_length: int = 0) -> float:
    """Mean tokens a step gains (accepted drafts + the correction token), the streams'
    tree beside a lookup chain of ``lookup_length`` nodes (its rates ``lookup_acceptance``)."""
    expected, streams, lookup = 1.0, 1.0, 1.0
    for depth in range(max(len(tree_widths), lookup_length)):
        streams *= sum(acceptance[depth][:tree_widths[depth]]) if depth < len(tree_widths) else 0.0
        lookup *= lookup_acceptance[depth] if depth < min(lookup_length, len(lookup_acceptance)) else 0.0
        expected += 1 - (1 - streams) * (1 - lookup)
    return expected


def candidate_trees(num_streams: int, max_width: int = MAX_WIDTH, max_nodes: int = MAX_TREE_NODES):
    """Every product tree with at most ``num_streams`` levels, widths non-increasing with
    depth (deeper drafts are less likely: a wider deep level never pays for itself) and at
    most ``max_nodes`` nodes; the root alone, ``()``, included."""
    trees = [()]
    for depth in range(1, num_streams + 1):
        for widths in itertools.product(range(max_width, 0, -1), repeat=depth):
            if list(widths) == sorted(widths, reverse=True) and tree_size(widths) <= max_nodes:
                trees.append(widths)
    return trees


def tree_rows(tree_widths, stream_share: float, lookup_length: int = 0) -> float:
    """A step's work in rows through one layer: each node (a lookup chain's too) through
    every layer, and a tree of depth D runs streams 1..D at each node through the stream
    layers, which are ``stream_share`` (num_stream_layers / num_layers) of them. A step
    whose text offers no n-gram match runs without its chain; charging the chain every
    step overstates its cost on text that rarely matches (a simplification)."""
    return tree_size(tree_widths, lookup_length) * (1 + len(tree_widths) * stream_share)


def interpolate(step_seconds: dict[float, float], rows: float) -> float:
    """Seconds per step of ``rows`` (`tree_rows`), linear between probed trees (in
    proportion beyond the largest, which `candidate_trees` keeps near range)."""
    probed = sorted(step_seconds)
    if rows <= probed[0]:
        return step_seconds[probed[0]]
    for low, high in zip(probed, probed[1:]):
        if rows <= high:
            share = (rows - low) / (high - low)
            return step_seconds[low] + share * (step_seconds[high] - step_seconds[low])
    return step_seconds[probed[-1]] * rows / probed[-1]


def choose_tree(acceptance, step_seconds: dict[float, float], num_streams: int, stream_share: float,
                lookup_length: int = 0, lookup_acceptance=()) -> tuple:
    """The candidate tree with the most expected tokens per second (ties: the smaller);
    ``step_seconds``: seconds per step by rows (`by_rows` of `probe_step_seconds`). A
    lookup chain of ``lookup_length`` nodes rides along: its nodes count in every
    candidate's cost, its tokens by ``lookup_acceptance`` (none when not measured)."""
    levels = min(num_streams, len(acceptance))
    def speed(widths):
        rows = tree_rows(widths, stream_share, lookup_length)
        tokens = expected_tokens_per_step(widths, acceptance, lookup_acceptance, lookup_length)
        return tokens / interpolate(step_seconds, rows)
    return max(candidate_trees(levels), key=lambda widths: (speed(widths), -tree_size(widths)))


@torch.inference_mode()  # as `utils.decode` runs its steps
def probe_step_seconds(model, prompt_length: int = 64, steps: int = 8, trees=PROBE_TREES,
                       batch_size: int = 1, runner=None) -> dict[tuple, float]:
    """Median seconds of ``steps`` (or a few more) decoding steps of each probe tree the model
    can draft, after ``batch_size`` random prompts (the cost of a step hardly depends on the
    tokens; it does on the rows: a batch of B runs B trees per step), by tree widths. ``runner(model,
    spec)`` makes the steps to time (`utils.TreeDecodingSteps`; default: the exact-shape
    `DynamicTreeSteps` that ``generate`` runs). The trees take turns, each turn a prefill,
    `PROBE_SETTLE` untimed steps, then `PROBE_BURST` timed ones: a machine whose speed drifts
    then slows every tree alike instead of the ones timed during a slow spell, which flipped
    the choice between trees of near-equal merit from run to run."""
    runner = runner or DynamicTreeSteps
    config = model.config
    prompt_length = max(1, min(prompt_length, config.max_position_embeddings // 2))
    ids = torch.randint(0, config.vocab_size, (batch_size, prompt_length), generator=torch.Generator().manual_seed(0))
    turns, per_turn = -(-steps // PROBE_BURST), PROBE_SETTLE + PROBE_BURST
    decoders = {widths: runner(model, TreeSpec(widths)) for widths in (tuple(w) for w in trees)
                if len(widths) <= config.num_spec_streams}
    for widths, decoder in decoders.items():  # one untimed step each first: a compiled step compiles here
        decoder.prefill(ids.to(model.device), max_new_tokens=per_turn * (len(widths) + 1))
        timed_step(decoder, len(widths) + 1, model.device)
    times = {widths: [] for widths in decoders}
    for _ in range(turns):
        for widths, decoder in decoders.items():
            decoder.prefill(ids.to(model.device), max_new_tokens=per_turn * (len(widths) + 1))  # same shapes
            seconds = [timed_step(decoder, len(widths) + 1, model.device) for _ in range(per_turn)]
            times[widths] += seconds[PROBE_SETTLE:]
    return {widths: statistics.median(seconds) for widths, seconds in times.items()}


def timed_step(decoder, remaining: int, device) -> float:
    """Seconds of one step of ``decoder``, its host read (``.tolist()``) included."""
    _synchronize(device)
    start = time.perf_counter()
    decoder.step(remaining=remaining, timer=no_timer).tolist()
    return time.perf_counter() - start


def resolve_tree(model, request, lookup_length: int = 0, batch_size: int = 1, runner=None,
                 probe_trees=PROBE_TREES) -> TreeSpec:
    """A tree request (`parse_tree`: "auto", widths, a `TreeSpec`) as the concrete tree to
    decode with, its lookup chain ``lookup_length`` nodes, checked against the model's
    streams. "auto": the candidate with the most expected tokens per second from the
    acceptance rates stored with the checkpoint (``generation_config.stream_acceptance``,
    and ``lookup_acceptance`` for the chain) and the latencies of ``runner``'s steps
    (default: the exact-shape steps ``generate`` runs) for ``probe_trees`` on this device at
    ``batch_size`` prompts, probed once per model, device, batch size and runner; without
    stored stream rates, the default tree cut to the model's streams."""
    spec = parse_tree(request, lookup_length)
    num_streams = model.config.num_spec_streams
    if spec != AUTO:
        return spec.check_streams(num_streams)
    acceptance = getattr(model.generation_config, "stream_acceptance", None)
    if not acceptance or not num_streams:
        return TreeSpec(DEFAULT_TREE_WIDTHS[:num_streams], lookup_length)
    probes = model.__dict__.setdefault("_step_seconds_by_device", {})
    share = stream_share(model.config)
    key = (str(model.device), batch_size) if runner is None else (str(model.device), batch_size, runner.__name__)
    if key not in probes:
        seconds = probe_step_seconds(model, batch_size=batch_size, trees=probe_trees, runner=runner)
        probes[key] = by_rows(seconds, share)
    lookup_acceptance = getattr(model.generation_config, "lookup_acceptance", None) or ()
    widths = choose_tree(acceptance, probes[key], num_streams, share, lookup_length, lookup_acceptance)
    return TreeSpec(widths, lookup_length)


def by_rows(step_seconds: dict[tuple, float], stream_share: float) -> dict[float, float]:
    """`probe_step_seconds`' result keyed by `tree_rows`, as `choose_tree` takes it."""
    return {tree_rows(widths, stream_share): seconds for widths, seconds in step_seconds.items()}


def stream_share(config) -> float:
    """The share of a model's layers its streams run in."""
    return config.num_stream_layers / config.num_layers


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
