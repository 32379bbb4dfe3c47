"""A preallocated key/value cache that tree decoding can write into and compact.

Upstream's `DynamicCache` grows by concatenation and only ever appends. Tree-draft decoding
needs two more things: every slot remembers the *position id* of the token it holds (tree
nodes share depths, so slot index != position), and after verification the entries of the
accepted path must be moved next to the prefix and everything else dropped (`compact`).

Layout (gpt-fast style): one tensor per kind, ``(num_layers, batch, heads, max_length,
head_dim)``, written in place; ``length`` slots are filled. `update` has upstream's
signature ``update(key_states, value_states, layer_idx)`` so attention code treats both
caches alike; the model calls `commit` once after all layers to advance ``length``.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    """Preallocated main-stream keys/values (speculative streams keep no cache)."""

    is_static_tree_cache = True  # lets the model tell it apart from upstream `Cache` objects

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        if max_length > config.max_position_embeddings + 64:
            # a little headroom is fine (tree nodes beyond the prefix), far more is a mistake
            raise ValueError(
                f"StaticKVCache max_length={max_length} is far beyond max_position_embeddings="
                f"{config.max_position_embeddings}; ask for at most prompt + new tokens + tree size."
            )
        head_dim = config.hidden_size // config.num_heads
        shape = (config.num_layers, batch_size, config.num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, max_length, device=device, dtype=torch.long)
        self.max_length = max_length
        self.length = 0  # filled slots; slots [length, length + new) are written by `update`

    # -- upstream-compatible surface -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Write the new main-stream keys/values after the filled slots and return all of
        them, shape ``(batch, heads, length + new, head_dim)``."""
        new = key_states.shape[-2]
        end = self.length + new
        self.keys[layer_idx, :, :, self.length:end] = key_states
        self.values[layer_idx, :, :, self.length:end] = value_states
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    # -- tree decoding ---------------------------------------------------------------------
    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {new_tokens} new tokens > max_length="
                f"{self.max_length}. Create the cache with a larger max_length (prompt + "
                "max_new_tokens + tree size)."
            )

    def key_positions(self, new_position_ids: torch.Tensor) -> torch.Tensor:
        """Position ids of every key the next forward will see: cached, then new."""
        return torch.cat([self.positions[:, : self.length], new_position_ids], dim=1)

    def commit(self, position_ids: torch.Tensor) -> None:
        """Called by the model after a forward: the new entries become part of the cache."""
        new = position_ids.shape[1]
        self.positions[:, self.length : self.length + new] = position_ids
        self.length += new

    def keep_new_rows(self, rows: torch.Tensor, layers: int) -> None:
        """Mid-forward tree pruning: in the first ``layers`` layers (already written), move
        the new entries ``rows`` (indices among the uncommitted new tokens, ascending) to
        the front of the new block, so the remaining layers continue with those alone."""
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

    def crop(self, length: int) -> None:
        """Forget every entry from slot ``length`` on."""
        self.length = min(self.length, length)


class FixedShapeKVCache(StaticKVCache):
    """The same buffers with every shape fixed, for steps captured once and replayed as a
    CUDA graph: ``length`` is a 0-d device tensor (never read by the host), `update`
    writes the new entries at slots ``length + i`` and returns the *whole* buffer, and the
    model masks stale slots instead of slicing them off (`build_fixed_shape_masks`).
    `compact` takes its start and slots as device tensors."""

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_length, device, dtype)
        self.length = torch.zeros((), dtype=torch.long, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise ValueError("FixedShapeKVCache keeps its length on the device; read cache.length instead.")

    def _new_slots(self, new: int) -> torch.Tensor:
        return self.length + torch.arange(new, device=self.length.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        slots = self._new_slots(key_states.shape[-2])
        self.keys[layer_idx].index_copy_(2, slots, key_states)
        self.values[layer_idx].index_copy_(2, slots, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def key_positions(self, new_position_ids: torch.Tensor) -> torch.Tensor:
        """Writes the new tokens' positions into their slots; returns every slot's."""
        self.positions.index_copy_(1, self._new_slots(new_position_ids.shape[1]), new_position_ids)
        return self.positions

    def commit(self, position_ids: torch.Tensor) -> None:
        self.length += position_ids.shape[1]

    def compact(self, start: torch.Tensor, slots: torch.Tensor) -> None:
        """Move ``slots`` (device tensor) to ``[start, start + len(slots))``; ``length``
        becomes ``start + len(slots)``. To keep shapes fixed, pass a fixed number of slots
        and set ``length`` yourself afterwards when fewer of them are wanted."""
        target = start + torch.arange(slots.numel(), device=slots.device)
        for buffer in (self.keys, self.values):
            buffer.index_copy_(3, target, buffer.index_select(3, slots))
        self.positions.index_copy_(1, target, self.positions.index_select(1, slots))
        self.length.copy_(start + slots.numel())

    def crop(self, length) -> None:
        self.length.clamp_(max=length)
