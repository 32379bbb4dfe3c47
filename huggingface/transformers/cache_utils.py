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

Two implementations:
- `FixedShapeKVCache`: preallocated buffers, a length per row never read by the host, and a
  forward always sees *every* slot (stale ones masked), so shapes never change and a step
  can be compiled or captured as a CUDA graph. Other projects call this a static cache.
- `UpstreamCache`: transformers' own `Cache` (what upstream `generate` passes) or no cache,
  with upstream's semantics: keys are numbered by index.

Buffer layout (gpt-fast style): per layer, one keys and one values tensor ``(batch, heads,
slots, head_dim)``, written in place by indexing. One tensor per layer, not one for all
layers: a compiled step then writes each layer's buffer where it lies (a write into a slice
of one stacked input made `torch.compile` copy the whole stack, several times per step).
Rows of a batch are independent sequences: each has its own length, positions and accepted
paths (`TreeKVCache`).
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
    ``cached`` is an int (every row alike), or a (B,) device tensor, one per row."""

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
    only feed the position embedding."""

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
    streams keep no cache) and a length per row: ``length`` (B,) long, on the cache's
    device; row b's slots ``[0, length[b])`` hold its text, later slots are stale. Rows
    advance independently (each accepts its own path): a forward's T new tokens go to each
    row's next T slots. Subclasses decide what a forward sees."""

    def __init__(self, config, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        head_dim = config.hidden_size // config.num_heads
        shape = (batch_size, config.num_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.positions = torch.zeros(batch_size, max_length, device=device, dtype=torch.long)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1): indexes each row's own slots
        self.max_length = max_length
        self.context = config.max_position_embeddings
        self.new_positions = self.new_slots = None  # (B, T): the forward in progress

    def _place_new(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Note where this forward's new tokens go (each row's next T slots) and store their
        positions; returns the position ids (1 or B, T) expanded to (B, T)."""
        position_ids = position_ids.expand(self.length.shape[0], -1)
        self.new_slots = self.length[:, None] + torch.arange(position_ids.shape[1], device=self.length.device)
        self.new_positions = position_ids
        self.positions[self.rows, self.new_slots] = position_ids
        return position_ids

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """The new entries (B, heads, T, head_dim) into each row's new slots. Written by
        indexing (`index_put_`), which `torch.compile` performs in place; a `scatter_` into
        a buffer it copies whole first."""
        self.keys[layer_idx][self.rows, :, self.new_slots] = key_states.transpose(1, 2)  # (B, T, heads, head_dim)
        self.values[layer_idx][self.rows, :, self.new_slots] = value_states.transpose(1, 2)

    def set_length(self, length: torch.Tensor) -> None:
        """Each row's filled slots (B,): after a prefill of prompts of different lengths
        (each from slot 0), the slots past a row's own prompt become stale."""
        self.length.copy_(length)

    def compact(self, start, slots: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Per row b: move ``slots[b]`` (absolute slot indices: (B, m), or (m,) for every
        row) to ``[start[b], start[b] + m)`` (``start``: (B,), 0-d or int); the row's
        length becomes ``start[b] + kept[b]`` (``kept`` (B,): how many of the moved entries
        count; None: all m). Moving the same number of slots in every row keeps the shapes
        fixed whatever each row keeps."""
        batch = self.length.shape[0]
        slots = slots.expand(batch, -1)  # (B, m)
        start = torch.as_tensor(start, device=slots.device).expand(batch)
        target = start[:, None] + torch.arange(slots.shape[1], device=slots.device)  # (B, m)
        for buffer in self.keys + self.values:
            buffer[self.rows, :, target] = buffer[self.rows, :, slots]  # (B, m, heads, head_dim)
        self.positions[self.rows, target] = self.positions[self.rows, slots]
        self.length.copy_(start + (slots.shape[1] if kept is None else kept))  # in place: graphs hold its address


class FixedShapeKVCache(TreeKVCache):
    """Every shape fixed, for steps captured once and replayed as a CUDA graph: the
    lengths never leave the device, `update` writes the new entries at each row's slots
    ``length[b] + i`` and returns the *whole* buffer, and the masks hide stale slots
    instead of slicing them off. Position ids are required (the host cannot compute them
    without reading ``length``)."""

    def begin(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> KeyLayout:
        if position_ids is None:
            raise ValueError("a FixedShapeKVCache needs explicit position_ids (its length stays on the device).")
        position_ids = self._place_new(position_ids)
        return KeyLayout(position_ids, position_ids, self.positions, self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        self._write(key_states, value_states, layer_idx)
        return self.keys[layer_idx], self.values[layer_idx]

    def commit(self) -> None:
        self.length += self.new_positions.shape[1]


def select_per_row(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` (B, ...) at ``index`` along ``dim`` (>= 1): ``index`` (n,) takes the same
    entries in every row, (B, n) its own entries in each row."""
    if index.dim() == 1:
        return tensor.index_select(dim, index)
    shape = [index.shape[0]] + [1] * (tensor.dim() - 1)
    shape[dim] = index.shape[1]
    size = list(tensor.shape)
    size[dim] = index.shape[1]
    return tensor.gather(dim, index.reshape(shape).expand(size))


def as_model_cache(cache, config):
    """Our caches as they are; transformers' own `Cache` or ``None`` behind `UpstreamCache`."""
    return cache if isinstance(cache, TreeKVCache) else UpstreamCache(cache, config)
