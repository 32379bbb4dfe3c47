"""Key/value caches for tree decoding, and the one interface the model talks to.

Upstream's `DynamicCache` grows by concatenation and only ever appends. Tree-draft decoding
needs two more things: every slot remembers the *position id* of the token it holds (tree
nodes share depths, so slot index != position), and after verification the entries of the
accepted path must be moved next to the prefix and everything else dropped (`compact`).

The model calls every cache the same way, once per forward, without knowing which it has:

    layout = cache.begin(input_ids, position_ids)  # where the new tokens go, what they see
    keys, values = cache.update(k, v, layer)       # per layer: store the new main-stream k/v
    cache.commit()                                 # after the last layer: the new entries count

`KeyLayout` tells the model the position of every key a forward sees and how many of them
were cached before it; the masks are derived from that alone (`build_attention_masks`).

Three implementations:
- `VariableLengthKVCache`: preallocated buffers, ``length`` a host integer; a forward sees
  the filled slots plus its new ones (shapes grow with the sequence). The dynamic loop.
- `FixedShapeKVCache`: the same buffers, ``length`` a 0-d device tensor never read by the
  host, and a forward always sees *every* slot (stale ones masked), so shapes never change
  and a step can be captured as a CUDA graph. Other projects call this a static cache.
- `UpstreamCache`: transformers' own `Cache` (what upstream `generate` passes) or no cache,
  with upstream's semantics: keys are numbered by index.

Buffer layout (gpt-fast style): one tensor per kind, ``(layers, batch, heads, slots,
head_dim)``, written in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeyLayout:
    """What one forward sees. ``position_ids`` (B, T): the new tokens' positions (for the
    position embedding); ``query_positions`` (B, T) and ``key_positions`` (B, K): positions
    the masks compare (the local window); keys ``[0, cached)`` are cached, keys
    ``[cached, cached + T)`` are the new tokens in order, later keys are stale.
    ``cached`` is an int, or a 0-d device tensor for a fixed-shape cache."""

    position_ids: torch.Tensor
    query_positions: torch.Tensor
    key_positions: torch.Tensor
    cached: int | torch.Tensor


def check_positions(position_ids: torch.Tensor, context: int) -> None:
    """A position beyond the embedding table is a request error (a host read: CPU only)."""
    if not position_ids.is_cuda and int(position_ids.max()) >= context:
        raise ValueError(
            f"position id {int(position_ids.max())} >= max_position_embeddings={context}; "
            "shorten the prompt or lower max_new_tokens."
        )


class UpstreamCache:
    """transformers' own `Cache` (or ``None``: no cache) behind the model's cache interface.
    Keys and queries are numbered by index, as upstream GPT-Neo numbers them; position ids
    only feed the position embedding. Supports no tree pruning."""

    can_prune = False

    def __init__(self, cache, config):
        self.cache, self.context = cache, config.max_position_embeddings

    def begin(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> KeyLayout:
        batch, new = input_ids.shape
        past = self.cache.get_seq_length() if self.cache is not None else 0
        if position_ids is None:
            if past + new > self.context:
                raise ValueError(
                    f"sequence of {past + new} tokens is longer than max_position_embeddings={self.context}; "
                    "shorten the prompt or lower max_new_tokens."
                )
            position_ids = torch.arange(past, past + new, device=input_ids.device).expand(batch, new)
        else:
            check_positions(position_ids, self.context)
        key_positions = torch.arange(past + new, device=input_ids.device).expand(batch, -1)
        return KeyLayout(position_ids, key_positions[:, past:], key_positions, past)

    def update(self, key_states, value_states, layer_idx):
        if self.cache is None:
            return key_states, value_states
        return self.cache.update(key_states, value_states, layer_idx)

    def commit(self) -> None:
        """Upstream caches advance inside `update`."""


class TreeKVCache:
    """Preallocated main-stream keys/values with a position id per slot (speculative
    streams keep no cache). Subclasses decide how ``length`` is kept."""

    can_prune = False

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        head_dim = config.hidden_size // config.num_heads
        shape = (config.num_layers, batch_size, config.num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, max_length, device=device, dtype=torch.long)
        self.max_length = max_length
        self.context = config.max_position_embeddings
        self.new_positions = None  # position ids of the forward in progress


class VariableLengthKVCache(TreeKVCache):
    """``length`` slots are filled (a host int); `update` writes the new entries after them
    and returns the filled slots plus the new ones."""

    can_prune = True

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_length, device, dtype)
        self.length = 0

    def begin(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> KeyLayout:
        batch, new = input_ids.shape
        if self.length + new > self.max_length:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {new} new tokens > max_length={self.max_length}. "
                "Create the cache with a larger max_length (prompt + max_new_tokens + tree size)."
            )
        if position_ids is None:
            position_ids = torch.arange(self.length, self.length + new, device=input_ids.device).expand(batch, new)
        check_positions(position_ids, self.context)
        self.new_positions = position_ids
        key_positions = torch.cat([self.positions[:, : self.length], position_ids], dim=1)
        return KeyLayout(position_ids, position_ids, key_positions, self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        end = self.length + key_states.shape[-2]
        self.keys[layer_idx, :, :, self.length : end] = key_states
        self.values[layer_idx, :, :, self.length : end] = value_states
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def commit(self) -> None:
        new = self.new_positions.shape[1]
        self.positions[:, self.length : self.length + new] = self.new_positions
        self.length += new

    def keep_new_rows(self, rows: torch.Tensor, layers: int) -> None:
        """Mid-forward tree pruning: in the first ``layers`` layers (already written), move
        the new entries ``rows`` (indices among the uncommitted new tokens, ascending) to
        the front of the new block; the model then calls `begin` again for those rows."""
        slots = self.length + rows
        for buffer in (self.keys, self.values):
            buffer[:layers, :, :, self.length : self.length + rows.numel()] = buffer[:layers].index_select(3, slots)

    def compact(self, start: int, slots: torch.Tensor) -> None:
        """Keep slots ``[0, start)`` plus the given ``slots`` (1-D, absolute slot indices, in
        order), moved to ``[start, start + len(slots))``; drop everything after."""
        count = slots.numel()
        for buffer in (self.keys, self.values):
            buffer[:, :, :, start : start + count] = buffer.index_select(3, slots)
        self.positions[:, start : start + count] = self.positions.index_select(1, slots)
        self.length = start + count


class FixedShapeKVCache(TreeKVCache):
    """Every shape fixed, for steps captured once and replayed as a CUDA graph: ``length``
    is a 0-d device tensor, `update` writes the new entries at slots ``length + i`` and
    returns the *whole* buffer, and the masks hide stale slots instead of slicing them off.
    Position ids are required (the host cannot compute them without reading ``length``)."""

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_length, device, dtype)
        self.length = torch.zeros((), dtype=torch.long, device=device)

    def _new_slots(self, new: int) -> torch.Tensor:
        return self.length + torch.arange(new, device=self.length.device)

    def begin(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> KeyLayout:
        if position_ids is None:
            raise ValueError("a FixedShapeKVCache needs explicit position_ids (its length stays on the device).")
        self.new_positions = position_ids
        self.positions.index_copy_(1, self._new_slots(position_ids.shape[1]), position_ids)
        return KeyLayout(position_ids, position_ids, self.positions, self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        slots = self._new_slots(key_states.shape[-2])
        self.keys[layer_idx].index_copy_(2, slots, key_states)
        self.values[layer_idx].index_copy_(2, slots, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def commit(self) -> None:
        self.length += self.new_positions.shape[1]

    def compact(self, start: torch.Tensor, slots: torch.Tensor) -> None:
        """Move ``slots`` (device tensor) to ``[start, start + len(slots))``; ``length``
        becomes ``start + len(slots)``. To keep shapes fixed, pass a fixed number of slots
        and set ``length`` yourself afterwards when fewer of them are wanted."""
        target = start + torch.arange(slots.numel(), device=slots.device)
        for buffer in (self.keys, self.values):
            buffer.index_copy_(3, target, buffer.index_select(3, slots))
        self.positions.index_copy_(1, target, self.positions.index_select(1, slots))
        self.length.copy_(start + slots.numel())


def as_model_cache(cache, config):
    """Our caches as they are; transformers' own `Cache` or ``None`` behind `UpstreamCache`."""
    return cache if isinstance(cache, TreeKVCache) else UpstreamCache(cache, config)
