"""The draft tree of Speculative Streaming: its shape, drafting, verification, pruning.

Pure functions on device tensors (Medusa style), for `tree_step.TreeStep`. A tree has two kinds of drafts below its root (the last token
emitted):
- *stream* nodes: widths ``(k_1, ..., k_D)``; depth ``j`` holds the top-``k_j`` tokens of
  speculative stream ``j``, and every depth-``j`` node has the same ``k_{j+1}`` children;
- an optional *lookup chain* of ``L`` nodes (prompt lookup): the tokens that followed the
  latest earlier occurrence of the text's last n-gram, one more branch of the same tree.
Greedy verification accepts the longest root-to-leaf path that greedy decoding would have
produced, whichever kind of drafts it holds; sampling verification (`sample_path`) walks
down the tree accepting each child with its probability under the target distribution,
so every emitted token is one sample from it (docs/method.md, section 6).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch

DEFAULT_TREE_WIDTHS = (4, 3, 2)  # the paper's tree: the one default (spec_stream.defaults points here)
DEFAULT_MAX_NGRAM = 2  # prompt lookup matches the last 2 tokens, then 1 (transformers' default)
LOOKUP = -1  # the "rank" naming a lookup-chain node
AUTO = "auto"  # a tree request resolved per model, device and batch size (`tree_search.resolve_tree`)
TREE_NODE_LIMIT = 4096  # a step's mask is nodes x nodes and every node a row: far past any useful tree


@dataclass(frozen=True)
class TreeSpec:
    """A concrete draft tree, checked when made: ``widths`` (k_1, ..., k_D), the top-k of
    streams 1..D (``()``: the root alone, one token per call), and a prompt-lookup chain of
    ``lookup_length`` nodes beside them. Requests (``"auto"``, ``"4,3,2"``, a tuple) become
    one at the edge (`parse_tree`); below it only specs travel, and `buffers` turns one into
    the tensors a step runs (Medusa's ``generate_medusa_buffers``)."""

    widths: tuple = DEFAULT_TREE_WIDTHS
    lookup_length: int = 0

    def __post_init__(self):
        try:
            widths = tuple(_integer(k) for k in self.widths)
            lookup_length = _integer(self.lookup_length)
        except TypeError:
            raise ValueError(f"tree widths {self.widths!r}, lookup {self.lookup_length!r}: integers, please") from None
        if any(k < 1 for k in widths):
            raise ValueError(f"tree widths {widths}: every width must be at least 1 (top-k per stream).")
        if lookup_length < 0:
            raise ValueError(f"prompt lookup length {lookup_length} is negative; use 0 for no lookup branch.")
        limit = TREE_NODE_LIMIT  # checked by parts first: widths of 10**9 would build huge products
        if max((*widths, lookup_length, len(widths))) > limit or tree_size(widths, lookup_length) > limit:
            raise ValueError(f"a tree of {len(widths)} levels (widest {max(widths, default=1)}) and lookup "
                             f"{lookup_length} has more than {limit} nodes; pass fewer or narrower widths, e.g. 4,3,2.")
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "lookup_length", lookup_length)

    @property
    def depth(self) -> int:
        return max(len(self.widths), self.lookup_length)

    @property
    def size(self) -> int:
        return tree_size(self.widths, self.lookup_length)

    def check_streams(self, num_streams: int, model: str = "the model") -> "TreeSpec":
        """Itself, or a ValueError if it drafts from more streams than ``model`` has."""
        if len(self.widths) > num_streams:
            raise ValueError(
                f"tree widths {','.join(map(str, self.widths))} have {len(self.widths)} levels but {model} has "
                f"{num_streams} speculative streams; pass at most that many widths, e.g. "
                f"{','.join(map(str, self.widths[:num_streams])) or '() (one token per call)'}."
            )
        return self

    def buffers(self, device=None) -> "TreeBuffers":
        return build_tree_buffers(self.widths, device, lookup_length=self.lookup_length)

    def __str__(self) -> str:
        lookup = f" + lookup {self.lookup_length}" if self.lookup_length else ""
        return (",".join(map(str, self.widths)) or "()") + lookup


def _integer(value) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not a width")
    return operator.index(value)


def parse_tree(request, lookup_length: int = 0) -> "TreeSpec | str":
    """A tree request as a `TreeSpec` (its lookup chain ``lookup_length``), or `AUTO`:
    ``"auto"`` or None, a `TreeSpec`, widths as a sequence of integers, or as text
    (``"4,3,2"``, ``"(4, 3, 2)"``; ``""`` or ``"()"``: the root alone). ValueError otherwise."""
    if request is None or request == AUTO:
        return AUTO
    if isinstance(request, TreeSpec):
        return request if not lookup_length else TreeSpec(request.widths, lookup_length)
    if isinstance(request, str):
        text = request.strip().strip("()[]").replace(" ", "")
        try:
            request = tuple(int(k) for k in text.split(",") if k) if text else ()
        except ValueError:
            raise ValueError(f"tree widths {request!r}: give comma-separated integers like 4,3,2, or auto") from None
    try:
        widths = tuple(request)
    except TypeError:
        raise ValueError(f"tree widths {request!r}: give widths like (4, 3, 2), or 'auto'") from None
    return TreeSpec(widths, lookup_length)


@dataclass(frozen=True)
class TreeBuffers:
    """A static draft tree, nodes in breadth-first order (node 0 = root; within a depth,
    stream nodes first, then the lookup node).

    depths (n,): 0 for the root, j for a node j levels below it.
    parents (n,): index of each node's parent (0 for the root itself).
    topk_ranks (n,): which of stream j's top-k tokens the node holds (0 for the root,
        ``LOOKUP`` for a lookup-chain node).
    tree_mask (n, n): node i may attend to node k iff k is i or an ancestor of i.
    paths (num_leaves, max_depth + 1): node indices from the root to each leaf; a path
        shorter than ``max_depth`` repeats its leaf, and ``path_depths`` says where it ends.
    ancestry (n, max_depth): the nodes at depths 1..d from the root down to node i (depth
        d), then i repeated: a node's drafts are ``tokens[ancestry[i, :d]]``.
    children (n, C): each node's children in breadth-first order (the order sampling
        verification tries them), padded with -1; C >= 1.
    """

    widths: tuple
    lookup_length: int
    depths: torch.Tensor
    parents: torch.Tensor
    topk_ranks: torch.Tensor
    tree_mask: torch.Tensor
    paths: torch.Tensor
    path_depths: torch.Tensor
    ancestry: torch.Tensor
    children: torch.Tensor

    @property
    def size(self) -> int:
        return self.depths.numel()

    @property
    def max_depth(self) -> int:
        return self.paths.shape[1] - 1

    @property
    def is_lookup(self) -> torch.Tensor:
        return self.topk_ranks == LOOKUP


def tree_size(tree_widths, lookup_length: int = 0) -> int:
    """Nodes of a tree: ``1 + sum_j prod_{i<=j} k_i + L``."""
    size, level = 1, 1
    for width in tree_widths:
        level *= int(width)
        size += level
    return size + lookup_length


def build_tree_buffers(tree_widths, device=None, lookup_length: int = 0) -> TreeBuffers:
    """The tree of widths ``(k_1, ..., k_D)`` plus a lookup chain of ``lookup_length``
    nodes (checked as a `TreeSpec`). Built once per shape and device (every generate call
    asks again): treat its tensors as read-only."""
    spec = TreeSpec(tuple(tree_widths), lookup_length)
    return _build_tree_buffers(spec.widths, None if device is None else torch.device(device), spec.lookup_length)


@functools.lru_cache(maxsize=256)
def _build_tree_buffers(tree_widths: tuple, device, lookup_length: int) -> TreeBuffers:
    levels = [[()]]  # each node named by its top-k ranks from the root down (LOOKUP for the chain)
    for depth in range(1, max(len(tree_widths), lookup_length) + 1):
        level = []
        if depth <= len(tree_widths):
            streams = [name for name in levels[-1] if LOOKUP not in name]
            level = [name + (rank,) for name in streams for rank in range(int(tree_widths[depth - 1]))]
        if depth <= lookup_length:
            level.append((LOOKUP,) * depth)
        levels.append(level)
    names = [name for level in levels for name in level]
    index = {name: i for i, name in enumerate(names)}
    tree_mask = torch.zeros(len(names), len(names), dtype=torch.bool)
    for i, name in enumerate(names):
        for d in range(len(name) + 1):
            tree_mask[i, index[name[:d]]] = True
    leaves = [name for name in names if not any(other[:-1] == name for other in names if other)]
    depth = len(levels) - 1
    paths = [[index[leaf[: min(d, len(leaf))]] for d in range(depth + 1)] for leaf in leaves]
    ancestry = [[index[name[: min(d, len(name))]] for d in range(1, depth + 1)] for name in names]
    children = [[index[other] for other in names if other and other[:-1] == name] for name in names]
    width = max(1, max(len(row) for row in children))
    return TreeBuffers(
        widths=tuple(int(k) for k in tree_widths),
        lookup_length=lookup_length,
        depths=torch.tensor([len(name) for name in names], device=device),
        parents=torch.tensor([index[name[:-1]] if name else 0 for name in names], device=device),
        topk_ranks=torch.tensor([name[-1] if name else 0 for name in names], device=device),
        tree_mask=tree_mask.to(device),
        paths=torch.tensor(paths, device=device),
        path_depths=torch.tensor([len(leaf) for leaf in leaves], device=device),
        ancestry=torch.tensor(ancestry, dtype=torch.long, device=device).reshape(len(names), depth),
        children=torch.tensor([row + [-1] * (width - len(row)) for row in children], device=device),
    )


def draft_tree(root: torch.Tensor, stream_logits: torch.Tensor | None, buffers: TreeBuffers,
               lookup_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens of every tree node, (n,) per sequence. root: () token, or (B,) for a batch;
    stream_logits: (gamma, vocab), or (B, gamma, vocab), at each sequence's last accepted
    node (stream j's top-k fills depth j); lookup_tokens: (L,) (or (B, L)) the lookup
    chain's drafts (any tokens when there is no match: verification rejects wrong ones).
    Returns (n,), or (B, n)."""
    if buffers.size == 1:
        return root[..., None]
    depths, ranks = buffers.depths[1:], buffers.topk_ranks[1:]
    drafts = torch.zeros(*root.shape, len(depths), dtype=depths.dtype, device=depths.device)
    if buffers.widths:
        top = stream_logits[..., : len(buffers.widths), :].topk(max(buffers.widths), dim=-1).indices
        drafts = top[..., (depths - 1).clamp(max=len(buffers.widths) - 1), ranks.clamp(min=0)]
    if buffers.lookup_length:
        chain = lookup_tokens[..., (depths - 1).clamp(max=buffers.lookup_length - 1)]
        drafts = torch.where(ranks == LOOKUP, chain, drafts)
    return torch.cat([root[..., None], drafts], dim=-1)


def evaluate_paths(tree_tokens: torch.Tensor, predictions: torch.Tensor, buffers: TreeBuffers):
    """Greedy verification. predictions (n,) (or (B, n), one row per sequence): the
    main-stream argmax at each node. Returns (best path index, accepted drafts on it), 0-d
    tensors (or (B,)); ties go to the first path, so the choice is deterministic."""
    path_tokens = tree_tokens[..., buffers.paths]  # (..., paths, D + 1)
    path_predictions = predictions[..., buffers.paths]
    on_path = torch.arange(buffers.max_depth, device=tree_tokens.device) < buffers.path_depths[:, None]
    matches = ((path_tokens[..., 1:] == path_predictions[..., :-1]) & on_path).int().cumprod(dim=-1).sum(dim=-1)
    return matches.argmax(dim=-1), matches.max(dim=-1).values  # (not matches[best]: a 0-d index syncs the host)


def propose_lookup(context: list[int], length: int, max_ngram: int = DEFAULT_MAX_NGRAM) -> list[int]:
    """Prompt lookup: the ``length`` tokens that followed the latest earlier occurrence of
    the context's last n-gram (longest n first, ``max_ngram`` down to 1); fewer or none
    when there is no match or the text ends sooner."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                return context[start + n : start + n + length]
    return []


def node_prefixes(text: torch.Tensor, tree_tokens: torch.Tensor, buffers: TreeBuffers):
    """What each node's next token is conditioned on, grouped by depth (one rectangle per
    depth): yields ``(nodes, prefixes)``, the nodes of that depth and their prefixes
    (len(nodes), H + depth) = the text so far (1, H), ending with the root, then the node's
    drafts from depth 1 down to itself."""
    for depth in range(buffers.max_depth + 1):
        nodes = (buffers.depths == depth).nonzero().flatten()
        drafts = tree_tokens[buffers.ancestry[nodes, :depth]]
        yield nodes, torch.cat([text.expand(nodes.numel(), -1), drafts], dim=1)


def valid_drafts(buffers: TreeBuffers, lookup_count) -> torch.Tensor:
    """Nodes sampling verification may accept (bool, (n,)): every stream node, and the
    lookup chain's nodes down to ``lookup_count`` (a 0-d tensor or int: the drafts the text
    offered; the rest are filler)."""
    return ~buffers.is_lookup | (buffers.depths <= lookup_count)


def sample_from(probabilities: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token from ``probabilities`` (V,) (any non-negative weights, not all zero) by
    inverting its CDF at ``uniform`` in [0, 1); only tokens of positive weight come out.
    Fixed shapes, no host sync."""
    cdf = probabilities.cumsum(dim=0)
    token = torch.searchsorted(cdf, (uniform * cdf[-1]).reshape(1), right=True)[0]
    positions = torch.arange(probabilities.numel(), device=probabilities.device)
    last_positive = torch.where(probabilities > 0, positions, 0).max()  # rounding can push past the end
    return torch.minimum(token, last_positive)


def accept_first_child(probabilities: torch.Tensor, child_tokens: torch.Tensor, candidate: torch.Tensor,
                       uniforms: torch.Tensor):
    """Multi-draft acceptance at one node: try the candidate children in order, accept
    child x with probability p(x) renormalised over what earlier rejections left
    (``uniform * (1 - rejected mass) < p(x)``). Returns (any accepted, index of the first
    accepted) as 0-d tensors. ``candidate`` must hold each token at most once."""
    mass = probabilities.gather(0, child_tokens.clamp(min=0)) * candidate
    left = (1 - (mass.cumsum(dim=0) - mass)).clamp(min=0)
    accept = candidate & (uniforms * left < mass)
    return accept.any(), accept.int().argmax()


def _candidates(node: torch.Tensor, tree_tokens: torch.Tensor, valid: torch.Tensor, buffers: TreeBuffers):
    """A node's children (C,), their tokens, and which may be accepted: valid, and the first
    child holding its token (a repeated token was already rejected: p(x) is then 0)."""
    children = buffers.children.index_select(0, node.reshape(1))[0]
    existing = children.clamp(min=0)
    tokens = tree_tokens.gather(0, existing)
    ok = (children >= 0) & valid.gather(0, existing)
    earlier = torch.ones(len(children), len(children), dtype=torch.bool, device=children.device).tril(-1)
    repeated = ((tokens[:, None] == tokens[None, :]) & ok[None, :] & earlier).any(dim=1)
    return children, tokens, ok & ~repeated


def sample_path(tree_tokens: torch.Tensor, probabilities: torch.Tensor, valid: torch.Tensor,
                buffers: TreeBuffers, uniforms: torch.Tensor):
    """Sampling verification: from the root, try each node's children in order
    (`accept_first_child`, uniforms ``[depth, :C]``), follow the accepted one; where none
    is accepted (or at a leaf), draw the next token from the node's distribution without
    the rejected children (uniform ``[depth, -1]``). Every token so chosen is one sample
    from its node's distribution ``probabilities`` (n, V) given the tokens before it.

    ``valid`` (n,): nodes that may be accepted (not lookup filler). uniforms:
    (>= max_depth + 1, >= C + 1). Returns (path (max_depth + 1,) node
    indices, repeating the last accepted node; accepted drafts (0-d); the token drawn after
    the path (0-d)). Fixed shapes, no host sync."""
    node = torch.zeros((), dtype=torch.long, device=tree_tokens.device)
    accepted, done, path = torch.zeros_like(node), torch.zeros_like(node, dtype=torch.bool), [node]
    width = buffers.children.shape[1]
    for depth in range(buffers.max_depth):
        children, tokens, ok = _candidates(node, tree_tokens, valid, buffers)
        distribution = probabilities.index_select(0, node.reshape(1))[0]
        found, first = accept_first_child(distribution, tokens, ok, uniforms[depth, :width])
        take = found & ~done
        node = torch.where(take, children.gather(0, first.reshape(1))[0], node)
        accepted, done = accepted + take.long(), done | ~take
        path.append(node)
    _, tokens, ok = _candidates(node, tree_tokens, valid, buffers)
    distribution = probabilities.index_select(0, node.reshape(1))[0]
    rejected = torch.zeros_like(distribution).scatter_add(0, tokens.clamp(min=0), ok.to(distribution.dtype)) > 0
    residual = torch.where(rejected, 0.0, distribution)
    residual = torch.where(residual.sum() > 0, residual, distribution)  # all mass rejected: only by rounding
    uniform = uniforms[:, -1].gather(0, accepted.reshape(1))[0]
    return torch.stack(path), accepted, sample_from(residual, uniform)


def uniforms_shape(buffers: TreeBuffers) -> tuple:
    """The uniforms `sample_path` takes for this tree (and any tree cut from it)."""
    return buffers.max_depth + 1, buffers.children.shape[1] + 1
