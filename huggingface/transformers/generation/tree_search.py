"""``tree_widths="auto"``: the draft tree that maximises expected tokens per second.

Two measurements decide it (Sequoia / EAGLE-2 in spirit, for product trees):
- *acceptance*: ``acceptance[j][r]``, the probability that the rank-``r`` token of stream
  ``j + 1`` is greedy decoding's next-but-``j`` token, given that the drafts above it were
  accepted. Measured once on validation prompts (`spec_stream.acceptance.measure_acceptance`, run at the end of
  fine-tuning and stored in the checkpoint's ``generation_config.json`` as
  ``stream_acceptance``). A product tree of widths ``(k_1, ..., k_D)`` accepts depth ``j``
  after depth ``j - 1`` with probability ``a_j = sum_{r < k_j} acceptance[j-1][r]`` (only
  one token is right), so a step gains ``1 + sum_d prod_{j<=d} a_j`` tokens on average.
  With a prompt-lookup chain beside the tree, ``lookup_acceptance[j]`` (stored as such,
  `measure_lookup_acceptance`) is the chance that its depth-``j + 1`` draft is right
  after the ones above it; a step reaches depth ``d`` by either branch, taken as
  independent: ``1 - (1 - prod a_j) (1 - prod l_j)``.
- *step latency* on the device at hand (`probe_step_seconds`: real decoding steps, the trees
  taking turns, after a short and a long prompt, `PROBE_CONTEXTS`, cached per model, device,
  batch size and mode), as a function of the step's rows (`tree_rows`: every node through
  every layer, plus its stream rows, one per tree level, through the stream layers), linear
  in between, and of the context, linear between the two prompts. Compiled steps are
  estimated from the eager ones less the host time that compiling removes, measured on the
  one-token step alone (`compiled_step_seconds`): probing every tree compiled cost minutes.
`resolve_tree` takes, for the request at hand, the candidate that decodes its expected output
in the least time: ``ceil((new - 1) / tokens per step)`` steps (the prefill gives the first
token) at the step's cost at the request's mean context (prompt + half the new tokens). The
expected output is ``max_new_tokens``, or fewer where fine-tuning measured the model's
greedy outputs ending sooner (``generation_config.mean_new_tokens``). The prefill is the same
forward whatever the tree, so it cannot change the choice; it is left out. A tree is taken
only if it is expected to be `MIN_GAIN` times faster than the one-token step ``()``; else
``()``: speculation must never make decoding slower. A batch of B prompts runs B trees per
step, so its latencies are probed at B: where a batch's own rows already keep the machine
busy, the choice shrinks, down to ``()``.
"""
from __future__ import annotations

import functools
import itertools
import math
import statistics
import time

import torch

from .fixed_shape import COMPILED, CUDA_GRAPHS, EAGER, FixedShapeDecoder
from .speculative_tree import AUTO, DEFAULT_TREE_WIDTHS, TreeSpec, parse_tree, tree_size
from .tree_step import no_timer

MAX_WIDTH = 8  # candidates' widths; acceptance is measured for ranks below it
MAX_LOOKUP = 8  # lookup-chain depths whose acceptance is measured (the benchmark's chains are shorter)
MAX_TREE_NODES = 128  # beyond this a step costs more than any measured acceptance repays on our devices
PROBE_TREES = ((), (1,), (2,), (3,), (2, 2), (4, 2), (4, 3, 2), (6, 4, 2), (8, 4, 2))  # sizes 1 .. 105
GRAPH_PROBE_TREES = ((), (1,), (2,), (2, 2), (4, 2), (4, 3, 2))  # CUDA graphs: each captured, so six trees
PROBE_CONTEXTS = (64, 512)  # prompt lengths the probe times steps after: short (E2E-NLG's 20-35, Spider's 70-146)
# and long (DialogSum's run 73-480); a request's step cost is interpolated at its own context
MIN_GAIN = 1.1  # a tree must be expected this much faster than the one-token step: the estimate's error
# (acceptance measured on validation text, a probe's noise) must not make decoding slower than without drafts
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


@functools.lru_cache(maxsize=None)
def candidate_trees(num_streams: int, max_width: int = MAX_WIDTH, max_nodes: int = MAX_TREE_NODES) -> tuple:
    """Every product tree with at most ``num_streams`` levels, widths non-increasing with
    depth (deeper drafts are less likely: a wider deep level never pays for itself) and at
    most ``max_nodes`` nodes; the root alone, ``()``, included."""
    trees = [()]
    for depth in range(1, num_streams + 1):
        for widths in itertools.product(range(max_width, 0, -1), repeat=depth):
            if list(widths) == sorted(widths, reverse=True) and tree_size(widths) <= max_nodes:
                trees.append(widths)
    return tuple(trees)


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
                lookup_length: int = 0, lookup_acceptance=(), new_tokens: int | None = None) -> tuple:
    """The candidate tree that decodes ``new_tokens`` (None: a long output) in the least
    expected time, if that is `MIN_GAIN` times faster than the one-token step ``()``, else
    ``()`` (ties: the smaller); ``step_seconds``: seconds per step by rows (`by_rows`). A
    lookup chain of ``lookup_length`` nodes rides along: its nodes count in every
    candidate's cost, its tokens by ``lookup_acceptance`` (none when not measured)."""
    levels = min(num_streams, len(acceptance))
    def speed(widths):  # expected new tokens per second of decoding after the prefill
        rows = tree_rows(widths, stream_share, lookup_length)
        tokens = expected_tokens_per_step(widths, acceptance, lookup_acceptance, lookup_length)
        steps = 1 / tokens if new_tokens is None else math.ceil(max(new_tokens - 1, 1) / tokens)
        return 1.0 / (steps * interpolate(step_seconds, rows))
    best = max(candidate_trees(levels), key=lambda widths: (speed(widths), -tree_size(widths)))
    return best if speed(best) >= MIN_GAIN * speed(()) else ()  # () keeps a lookup chain, if any


@torch.inference_mode()  # as `utils.decode` runs its steps
def probe_step_seconds(model, prompt_length: int = 64, steps: int = 8, trees=PROBE_TREES,
                       batch_size: int = 1, mode: str = EAGER) -> dict[tuple, float]:
    """Median seconds of ``steps`` (or a few more) decoding steps of each probe tree the model
    can draft, after ``batch_size`` random prompts (the cost of a step hardly depends on the
    tokens; it does on the rows: a batch of B runs B trees per step), by tree widths, on the
    runner ``generate`` uses in ``mode`` (`fixed_shape.FixedShapeDecoder`). The trees take
    turns, each turn a prefill, `PROBE_SETTLE` untimed steps, then `PROBE_BURST` timed ones:
    a machine whose speed drifts then slows every tree alike instead of the ones timed during
    a slow spell, which flipped the choice between trees of near-equal merit from run to run."""
    config = model.config
    prompt_length = max(1, min(prompt_length, config.max_position_embeddings // 2))
    ids = torch.randint(0, config.vocab_size, (batch_size, prompt_length), generator=torch.Generator().manual_seed(0))
    turns, per_turn = -(-steps // PROBE_BURST), PROBE_SETTLE + PROBE_BURST
    decoders = {widths: FixedShapeDecoder(model, widths, mode, compile_prefill=False)
                for widths in (tuple(w) for w in trees) if len(widths) <= config.num_spec_streams}
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


def resolve_tree(model, request, lookup_length: int = 0, batch_size: int = 1, mode: str = EAGER,
                 prompt_length: int = PROBE_CONTEXTS[0], max_new_tokens: int | None = None) -> TreeSpec:
    """A tree request (`parse_tree`: "auto", widths, a `TreeSpec`) as the concrete tree to
    decode with, its lookup chain ``lookup_length`` nodes, checked against the model's
    streams. "auto": for a request of ``batch_size`` prompts of ``prompt_length`` tokens and
    ``max_new_tokens`` (None: a long output), the candidate expected to decode it fastest
    (module docstring) from the acceptance rates stored with the checkpoint
    (``generation_config.stream_acceptance``, ``lookup_acceptance`` for the chain) and the
    latencies of the steps ``generate`` runs in ``mode`` on this device (`step_costs`);
    without stored stream rates, the default tree cut to the model's streams."""
    spec = parse_tree(request, lookup_length)
    num_streams = model.config.num_spec_streams
    if spec != AUTO:
        return spec.check_streams(num_streams)
    config = model.generation_config
    acceptance = getattr(config, "stream_acceptance", None)
    if not acceptance or not num_streams:
        return TreeSpec(DEFAULT_TREE_WIDTHS[:num_streams], lookup_length)
    new_tokens = max_new_tokens
    mean = getattr(config, "mean_new_tokens", None)
    if mean is not None:  # the model's greedy outputs end sooner on its task
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not 0 < mean < math.inf:
            raise ValueError(f"generation_config.mean_new_tokens={mean!r}: it must be a positive number of tokens "
                             "(what fine-tuning stores); fix it or remove it from generation_config.json.")
        new_tokens = min(new_tokens or math.inf, max(1, round(mean)))
    context = prompt_length + (new_tokens or 0) // 2
    lookup_acceptance = getattr(config, "lookup_acceptance", None) or ()
    probed = step_costs(model, batch_size, mode)
    choice = (context, new_tokens, lookup_length, repr(acceptance), repr(lookup_acceptance))
    if choice not in probed["choices"]:  # made once per kind of request: the search walks ~150 trees
        probed["choices"][choice] = choose_tree(acceptance, seconds_at_context(probed["by_context"], context),
                                                num_streams, stream_share(model.config), lookup_length,
                                                lookup_acceptance, new_tokens)
    return TreeSpec(probed["choices"][choice], lookup_length)


def step_costs(model, batch_size: int, mode: str) -> dict:
    """The steps ``generate`` runs in ``mode`` at ``batch_size``, probed once per model,
    device, batch size and mode: ``by_context``, seconds per step by probe context and rows
    (`by_rows`), and ``choices``, the trees chosen from them so far."""
    probes = model.__dict__.setdefault("_step_seconds_by_device", {})
    key = (str(model.device), batch_size, mode)
    if key not in probes:
        share = stream_share(model.config)
        contexts = sorted({min(c, model.config.max_position_embeddings // 2) for c in PROBE_CONTEXTS})
        seconds = {c: probed_seconds(model, c, batch_size, mode) for c in contexts}
        if mode == COMPILED:
            seconds = compiled_step_seconds(model, seconds, batch_size)
        probes[key] = {"by_context": {c: by_rows(s, share) for c, s in seconds.items()}, "choices": {}}
    return probes[key]


def probed_seconds(model, prompt_length: int, batch_size: int, mode: str) -> dict[tuple, float]:
    """Each probe tree's seconds per step after ``prompt_length`` tokens: on CUDA graphs as
    such; otherwise eager (compiled steps are estimated from them, `compiled_step_seconds`)."""
    if mode == CUDA_GRAPHS:
        return probe_step_seconds(model, prompt_length=prompt_length, batch_size=batch_size, trees=GRAPH_PROBE_TREES,
                                  mode=mode)
    return probe_step_seconds(model, prompt_length=prompt_length, batch_size=batch_size, trees=PROBE_TREES, mode=EAGER)


def compiled_step_seconds(model, eager: dict[int, dict[tuple, float]], batch_size: int) -> dict[int, dict[tuple, float]]:
    """Compiled steps estimated from ``eager`` ones (by context, then tree): each less the
    host time compiling removes, measured once, on the one-token step at the shortest
    context (one compile), and taken as the same for every tree and context (a step runs
    the same ops whatever its rows and its context). Never below that compiled step."""
    short = min(eager)
    one_token = probe_step_seconds(model, prompt_length=short, batch_size=batch_size, trees=((),), mode=COMPILED)[()]
    host = max(0.0, eager[short][()] - one_token)
    return {c: {widths: max(one_token, s - host) for widths, s in seconds.items()} for c, seconds in eager.items()}


def seconds_at_context(costs: dict[int, dict[float, float]], context: int) -> dict[float, float]:
    """Seconds per step by rows at ``context`` tokens: linear between the shortest and the
    longest probe context, on beyond the longest, the shortest's below it."""
    (short, at_short), (long, at_long) = sorted(costs.items())[0], sorted(costs.items())[-1]
    if long == short:
        return at_short
    share = max(0.0, (context - short) / (long - short))
    return {rows: max(at_short[rows], at_short[rows] + share * (at_long[rows] - at_short[rows])) for rows in at_short}


def by_rows(step_seconds: dict[tuple, float], stream_share: float) -> dict[float, float]:
    """`probe_step_seconds`' result keyed by `tree_rows`, as `choose_tree` takes it."""
    return {tree_rows(widths, stream_share): seconds for widths, seconds in step_seconds.items()}


def stream_share(config) -> float:
    """The share of a model's layers its streams run in."""
    return config.num_stream_layers / config.num_layers


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
