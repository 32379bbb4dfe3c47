"""GPT-Neo with Speculative Streaming (multi-stream attention in the top layers).

State-dict compatible with upstream `transformers.GPTNeoForCausalLM`: same module names
(`transformer.wte/wpe/h.N.{ln_1,attn.attention.{q,k,v,out}_proj,ln_2,mlp.{c_fc,c_proj}}/ln_f`,
tied `lm_head`), plus `transformer.streams.*` for the new parameters. The method is in
docs/method.md; the decisions it leaves open are written next to the code that makes them.

Masks are built once per forward from explicit positions, never from slot indices:
a query at position p sees a key at position k iff the key is valid (not padding), the
key is before the query in the *block* sense (cached keys always; new keys per the causal
or tree mask), and, in local layers, ``p - k < window_size``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPTNeoConfig as UpstreamGPTNeoConfig
from transformers import Cache, DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput
from transformers.utils import logging
from huggingface_hub.dataclasses import strict

from ...cache_utils import KeyLayout, as_model_cache, select_per_row
from ...generation.utils import SpeculativeStreamingGenerationMixin
from ...internals import CACHE_FIELD, upstream_changed
from .packed_linear import linear

logger = logging.get_logger(__name__)


@strict
class GPTNeoConfig(UpstreamGPTNeoConfig):
    """Upstream GPT-Neo config plus the speculative streams.

    num_spec_streams: gamma, streams drafting tokens t+2 .. t+1+gamma (0 = plain GPT-Neo).
    num_stream_layers: N_s, the top layers that run multi-stream attention.
    stream_adapter_rank: rank of the streams' own low-rank adapters in the stream layers
        (0 = none: the streams share the layers' weights and own only their embeddings).
    main_loss_weight, stream_loss_weight: a0 and a_j of the training loss.
    """

    num_spec_streams: int = 0
    num_stream_layers: int = 0
    stream_adapter_rank: int = 0
    main_loss_weight: float = 1.0
    stream_loss_weight: float = 0.1

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "choose a hidden size that is a multiple of the head count."
            )
        if self.num_spec_streams < 0:
            raise ValueError(f"num_spec_streams={self.num_spec_streams} is negative; use 0 for no streams.")
        if not 0 <= self.num_stream_layers <= self.num_layers:
            raise ValueError(
                f"num_stream_layers={self.num_stream_layers} must lie in [0, num_layers={self.num_layers}]; "
                "lower it (the paper uses 1/6 to 1/2 of the layers)."
            )
        if self.num_spec_streams and not self.num_stream_layers:
            raise ValueError("num_spec_streams > 0 needs num_stream_layers >= 1 (the layers the streams run in).")
        if self.window_size < 1:
            raise ValueError(f"window_size={self.window_size} must be at least 1.")
        super().__post_init__(**kwargs)

    @property
    def first_stream_layer(self) -> int:
        return self.num_layers - self.num_stream_layers


@dataclass
class SpecStreamCausalLMOutput(CausalLMOutputWithPast):
    """Upstream's causal-LM output (loss, logits (batch, seq, vocab) of the main stream,
    predicting t+1, and the cache under the name the installed transformers reads:
    `CACHE_FIELD`) plus what the streams add."""

    stream_logits: torch.Tensor | None = None  # (batch, gamma, n_positions, vocab): stream j predicts t+1+j


@dataclass
class GPTNeoModelOutput(ModelOutput):
    """The decoder stack's output, every hidden state after ``ln_f``."""

    hidden_states: torch.Tensor | None = None  # (batch, T, hidden): main stream
    stream_hidden_states: torch.Tensor | None = None  # (batch, gamma, n, hidden): streams at their anchors


@dataclass
class TreeStepOutput(ModelOutput):
    """What `GPTNeoForCausalLM.run_tree` gives the decoding loops."""

    logits: torch.Tensor | None = None  # (batch, n, vocab): main stream at the requested nodes
    stream_states: torch.Tensor | None = None  # (batch, gamma, n, hidden): input of `draft_logits`


# ----------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------
@dataclass
class AttentionMasks:
    """Boolean masks (True = may attend), shape (batch, 1, queries, keys), per layer type.

    ``plain_causal`` marks the common case (no padding, no tree, no cached prefix) in which
    SDPA/flash can use their built-in causal masking instead of an explicit mask.
    """

    masks: dict[str, torch.Tensor]
    plain_causal: bool
    window_matters: bool

    def with_streams(self, anchors: torch.Tensor, num_streams: int) -> "AttentionMasks":
        """Append query rows and keys for ``num_streams`` streams at the ``anchors`` (indices
        into the new tokens: (n,) in every row, or (B, n) per row). Stream j at anchor a
        sees what the main stream at a sees (main keys, incl. the local window) plus streams
        1..j at a; main rows see no stream."""
        masks = {}
        n = anchors.shape[-1]
        # stream row (j, s) -> stream key (i, s') allowed iff s == s' and i <= j
        stream_block = torch.kron(
            torch.ones(num_streams, num_streams, dtype=torch.bool, device=anchors.device).tril(),
            torch.eye(n, dtype=torch.bool, device=anchors.device),
        )
        for kind, mask in self.masks.items():
            batch = mask.shape[0]
            main_part = select_per_row(mask, anchors, 2)  # the anchors' own main-stream rows
            stream_rows = torch.cat(
                [main_part.repeat(1, 1, num_streams, 1), stream_block.expand(batch, 1, -1, -1)], dim=-1
            )
            main_rows = F.pad(mask, (0, num_streams * n), value=False)
            masks[kind] = torch.cat([main_rows, stream_rows], dim=2)
        return AttentionMasks(masks, plain_causal=False, window_matters=self.window_matters)


def build_attention_masks(
    layout: KeyLayout,
    new_block: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    window_size: int,
    layer_types: set[str],
) -> AttentionMasks:
    """Masks for one forward from its `KeyLayout` alone, whichever cache produced it: a
    query sees every cached key, the new keys ``new_block`` allows ((T, T) or (B, T, T);
    None = causal by index), no stale key, and in local layers only keys less than
    ``window_size`` positions back. ``key_valid`` (B, K) marks padding (False) or is None.
    With a cached count per row (``layout.cached`` (B,)) each row's new keys start at its
    own slot."""
    batch, new = layout.query_positions.shape
    keys = layout.key_positions.shape[1]
    device = layout.query_positions.device
    plain = isinstance(layout.cached, int) and layout.cached == 0 and keys == new
    plain = plain and key_valid is None and new_block is None
    if new_block is None:
        new_block = torch.ones(new, new, dtype=torch.bool, device=device).tril()
    per_row = torch.is_tensor(layout.cached) and layout.cached.dim() == 1
    cached = layout.cached[:, None] if per_row else layout.cached  # int, 0-d, or (B, 1)
    offset = torch.arange(keys, device=device) - cached  # key index among the new tokens: (K,) or (B, K)
    is_new = (offset >= 0) & (offset < new)
    if per_row:  # (B, T, K): each row's own new keys
        index = offset.clamp(0, new - 1)[:, None, :].expand(-1, new, -1)
        sees_new = new_block.expand(batch, new, new).gather(2, index)
    else:  # (T, K) or (B, T, K)
        sees_new = new_block[..., offset.clamp(0, new - 1)]
    allowed = ((offset < 0)[..., None, :] | (sees_new & is_new[..., None, :])).expand(batch, new, keys)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
        # a padded query would see nothing and softmax would give NaN: let it see itself
        rows = torch.arange(new, device=device)
        allowed[torch.arange(batch, device=device)[:, None], rows, cached + rows] = True
    masks = {"global": allowed[:, None]}
    if "local" in layer_types:
        distance = layout.query_positions[:, :, None] - layout.key_positions[:, None, :]
        masks["local"] = (allowed & (distance < window_size))[:, None]
    # Only the implicit-causal fast path (plain) needs to know whether the window cuts
    # anything: explicit masks carry it already, and reading positions would sync the device.
    window_matters = True
    if plain:
        window_matters = int(layout.query_positions.max() - layout.key_positions.min()) >= window_size
    return AttentionMasks(masks, plain_causal=plain, window_matters=window_matters)


# ----------------------------------------------------------------------------------------
# Attention backends. q, k, v: (batch, heads, seq, head_dim). GPT-Neo uses scale 1.0.
# ----------------------------------------------------------------------------------------
def eager_attention(q, k, v, mask, dropout_p=0.0):
    """The reference: fp32 scores (GPT-Neo's unscaled q.k overflow fp16), fp32 softmax."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p).to(v.dtype)
    return torch.matmul(weights, v)


def sdpa_attention(q, k, v, mask, dropout_p=0.0, causal=False):
    """`scaled_dot_product_attention` with scale 1.0. ``causal`` (no explicit mask) lets the
    flash kernel run; an explicit boolean mask selects the memory-efficient or math kernel."""
    if causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1, dropout_p=dropout_p, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)


def flash_attention(q, k, v, window, dropout_p=0.0):
    """flash-attn 2 with causal bottom-right alignment and, in local layers, the sliding
    window (upstream GPT-Neo's flash path drops the window; we pass it)."""
    from flash_attn import flash_attn_func

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=1.0,
        causal=True, window_size=(window - 1, 0) if window else (-1, -1),
    )
    return out.transpose(1, 2)


def project(module: nn.Linear, x: torch.Tensor, low_rank: nn.Module | None, num_main: int) -> torch.Tensor:
    """``module(x)`` (`packed_linear.linear`), plus ``low_rank`` on the rows after the first ``num_main`` (the
    streams' rows); the main rows never see it, so the main stream stays the base model."""
    y = linear(module, x)
    if low_rank is None or x.shape[1] == num_main:
        return y
    return torch.cat([y[:, :num_main], y[:, num_main:] + low_rank(x[:, num_main:])], dim=1)


class LowRank(nn.Module):
    """``up(down(x))``, rank ``rank``; ``up`` starts at zero, so a fresh adapter adds nothing."""

    def __init__(self, inputs: int, outputs: int, rank: int):
        super().__init__()
        self.down = nn.Linear(inputs, rank, bias=False)
        self.up = nn.Linear(rank, outputs, bias=False)

    def forward(self, x):
        return self.up(self.down(x))


class StreamLayerAdapter(nn.Module):
    """The streams' own capacity in one stream layer (a decision the paper leaves open, made
    for ``--freeze-base``: there the shared weights cannot move, so without these only the
    stream embeddings would train). Low-rank deltas on the layer's q, k, v, out, fc and proj
    projections, applied to the stream rows only (`project`)."""

    def __init__(self, config: "GPTNeoConfig"):
        super().__init__()
        hidden, inner, rank = config.hidden_size, config.intermediate_size or 4 * config.hidden_size, \
            config.stream_adapter_rank
        self.q, self.k, self.v, self.out = (LowRank(hidden, hidden, rank) for _ in range(4))
        self.fc, self.proj = LowRank(hidden, inner, rank), LowRank(inner, hidden, rank)


class GPTNeoSelfAttention(nn.Module):
    def __init__(self, config: GPTNeoConfig, attention_type: str, layer_id: int):
        super().__init__()
        self.config = config
        self.attention_type = attention_type
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.attn_dropout = float(config.attention_dropout)
        self.resid_dropout = nn.Dropout(float(config.resid_dropout))

    def _heads(self, x):
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states, masks: AttentionMasks, cache=None, num_main: int | None = None, adapter=None):
        """``num_main``: the first rows are main-stream tokens (cached); any rows after them
        are speculative-stream queries whose keys/values live for this forward only, and
        the stream rows alone go through ``adapter`` (`StreamLayerAdapter`) if any."""
        num_main = hidden_states.shape[1] if num_main is None else num_main
        q = self._heads(project(self.q_proj, hidden_states, adapter and adapter.q, num_main))
        k = self._heads(project(self.k_proj, hidden_states, adapter and adapter.k, num_main))
        v = self._heads(project(self.v_proj, hidden_states, adapter and adapter.v, num_main))
        if cache is not None:
            main_k, main_v = cache.update(k[:, :, :num_main], v[:, :, :num_main], self.layer_id)
            if k.shape[2] > num_main:  # stream keys after the cache's (a copy of the cache: only when needed)
                main_k, main_v = torch.cat([main_k, k[:, :, num_main:]], dim=2), torch.cat([main_v, v[:, :, num_main:]], dim=2)
            k, v = main_k, main_v
        mask = masks.masks[self.attention_type]
        dropout = self.attn_dropout if self.training else 0.0
        implementation = self.config._attn_implementation
        local = self.attention_type == "local" and masks.window_matters
        if implementation == "flash_attention_2" and masks.plain_causal and q.is_cuda:
            out = flash_attention(q, k, v, self.config.window_size if local else 0, dropout)
        elif implementation in ("sdpa", "flash_attention_2"):
            out = sdpa_attention(q, k, v, mask, dropout, causal=masks.plain_causal and not local)
        else:
            out = eager_attention(q, k, v, mask, dropout)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:2], -1)
        return self.resid_dropout(project(self.out_proj, out, adapter and adapter.out, num_main))


class GPTNeoAttention(nn.Module):
    """Wrapper kept for upstream's parameter names (`attn.attention.q_proj`, ...)."""

    def __init__(self, config: GPTNeoConfig, layer_id: int):
        super().__init__()
        self.attention = GPTNeoSelfAttention(config, config.attention_layers[layer_id], layer_id)

    def forward(self, *args, **kwargs):
        return self.attention(*args, **kwargs)


class GPTNeoMLP(nn.Module):
    def __init__(self, intermediate_size: int, config: GPTNeoConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, intermediate_size)
        self.c_proj = nn.Linear(intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(float(config.resid_dropout))

    def forward(self, x, num_main: int | None = None, adapter=None):
        num_main = x.shape[1] if num_main is None else num_main
        inner = self.act(project(self.c_fc, x, adapter and adapter.fc, num_main))
        return self.dropout(project(self.c_proj, inner, adapter and adapter.proj, num_main))


class GPTNeoBlock(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer_id: int):
        super().__init__()
        inner = config.intermediate_size or 4 * config.hidden_size
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTNeoAttention(config, layer_id)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTNeoMLP(inner, config)

    def forward(self, hidden_states, masks, cache=None, num_main=None, adapter=None):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), masks, cache, num_main, adapter)
        return hidden_states + self.mlp(self.ln_2(hidden_states), num_main, adapter)


class SpeculativeStreams(nn.Module):
    """The new parameters: stream embeddings P_j, and the streams' own adapters if any."""

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(config.num_spec_streams, config.hidden_size))
        self.adapters = None  # one per stream layer, bottom to top
        if config.stream_adapter_rank:
            self.adapters = nn.ModuleList(StreamLayerAdapter(config) for _ in range(config.num_stream_layers))

    def initial_states(self, main_states: torch.Tensor, num_streams: int) -> torch.Tensor:
        """S_j(t) = M(t) + P_j for the first ``num_streams`` streams: (batch, n, hidden) ->
        (batch, num_streams * n, hidden), stream-major."""
        batch, n, hidden = main_states.shape
        streams = main_states[:, None] + self.embeddings[None, :num_streams, None].to(main_states.dtype)
        return streams.reshape(batch, -1, hidden)


class GPTNeoPreTrainedModel(PreTrainedModel):
    config_class = GPTNeoConfig
    config: GPTNeoConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTNeoBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # upstream's attention buffers; the tree-pruning adapter of checkpoints from before the one runner
    _keys_to_ignore_on_load_unexpected = [r"attn\.attention\.(bias|masked_bias)", r"streams\.pruner_(down|up)"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SpeculativeStreams):  # (children first: zeros here are not overwritten)
            init.normal_(module.embeddings, mean=0.0, std=self.config.initializer_range)
            for low_rank in module.modules():
                if isinstance(low_rank, LowRank):
                    init.zeros_(low_rank.up.weight)


class GPTNeoModel(GPTNeoPreTrainedModel):
    def __init__(self, config: GPTNeoConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(float(config.embed_dropout))
        self.h = nn.ModuleList([GPTNeoBlock(config, i) for i in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.streams = SpeculativeStreams(config) if config.num_spec_streams else None
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(
        self,
        input_ids: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        stream_positions: torch.Tensor | str | None = None,
        num_streams: int | None = None,
    ) -> GPTNeoModelOutput:
        """Main stream over the new tokens; speculative streams join at the first stream layer.

        ``cache``: None, one of our caches, or an upstream `Cache`
        (`cache_utils` says how each is seen). ``position_ids`` default to the cached length
        + index. ``tree_mask`` (T, T) bool: which new tokens each new token sees (default
        causal). ``stream_positions``: None (no streams), "all", or indices into the new
        tokens ((n,) in every row, or (B, n) per row). ``num_streams``: run
        only the first streams (stream j sees streams 1..j alone, so the others cannot
        change them; a tree of depth D drafts from streams 1..D); None: all of them.
        """
        cache = as_model_cache(cache, self.config)
        layout = cache.begin(input_ids, position_ids)
        key_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask[:, -layout.key_positions.shape[1]:].bool()
        masks = self._masks(layout, tree_mask, key_valid)
        hidden = self.drop(self.wte(input_ids) + self.wpe(layout.position_ids))  # (B, T, H)
        first = self.config.first_stream_layer
        hidden = self._run_blocks(self.h[:first], hidden, masks, cache)
        num_main = hidden.shape[1]
        streams = self.config.num_spec_streams if stream_positions is not None and self.streams is not None else 0
        streams = streams if num_streams is None else max(0, min(num_streams, streams))
        if streams:
            hidden, masks = self._add_streams(hidden, masks, stream_positions, streams)  # (B, T + s*n, H)
        adapters = self.streams.adapters if self.streams is not None else None
        hidden = self.ln_f(self._run_blocks(self.h[first:], hidden, masks, cache, num_main, adapters))
        cache.commit()
        stream_hidden = None
        if hidden.shape[1] > num_main:  # (B, streams, n, H), stream-major
            stream_hidden = hidden[:, num_main:].reshape(hidden.shape[0], streams, -1, hidden.shape[-1])
        return GPTNeoModelOutput(hidden[:, :num_main], stream_hidden)

    def _add_streams(self, hidden, masks, stream_positions, streams: int):
        """Append the first ``streams`` streams' initial states at the anchors ("all": every
        new token) after the main rows, and their rows and keys to the masks."""
        anchors = torch.arange(hidden.shape[1], device=hidden.device) if isinstance(stream_positions, str) \
            else stream_positions.to(hidden.device)
        anchor_states = select_per_row(hidden, anchors, 1)  # (B, n, H)
        hidden = torch.cat([hidden, self.streams.initial_states(anchor_states, streams)], dim=1)
        return hidden, masks.with_streams(anchors, streams)

    def _masks(self, layout, tree_mask, key_valid) -> AttentionMasks:
        return build_attention_masks(layout, tree_mask, key_valid, self.config.window_size,
                                     set(self.config.attention_layers))

    @staticmethod
    def _run_blocks(blocks, hidden, masks, cache, num_main=None, adapters=None):
        for index, block in enumerate(blocks):
            hidden = block(hidden, masks, cache, num_main, adapters[index] if adapters is not None else None)
        return hidden


class GPTNeoForCausalLM(GPTNeoPreTrainedModel, SpeculativeStreamingGenerationMixin):
    """GPT-Neo LM with speculative streams; `generate(..., speculative_streaming=True)`
    decodes with tree drafts (see `huggingface/transformers/generation/utils.py`)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTNeoConfig):
        super().__init__(config)
        self.transformer = GPTNeoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        tree_mask: torch.Tensor | None = None,
        stream_positions: torch.Tensor | str | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        loss_only: bool = False,
        distill_streams: bool = False,
        past_key_values=None,
        **unused,
    ) -> SpecStreamCausalLMOutput:
        """Upstream's forward plus ``tree_mask`` and ``stream_positions`` (see
        `GPTNeoModel.forward`). The cache comes as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (before), and goes back under the installed release's name.
        With ``labels`` (aligned with ``input_ids``, -100 = ignore), streams run at every
        position and ``loss`` is the method's ``a0 * CE(main) + sum_j a_j * CE(stream_j)``
        (`_loss`); with ``loss_only`` too, streams run only where they have a target
        (`_stream_anchors`) and no logits are returned: the same loss for less work.
        ``distill_streams`` teaches each stream the main stream's own distribution instead of
        the labels. Other arguments are ignored, as upstream's GPT-Neo ignores them, except a
        cache (`check_unused_arguments`)."""
        check_unused_arguments(unused)
        if input_ids is None:
            raise ValueError("GPTNeoForCausalLM (spec-stream) needs input_ids; inputs_embeds is not supported.")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache once: as `cache` or as `past_key_values`, not both.")
        cache = cache if cache is not None else past_key_values
        if labels is not None and stream_positions is None and self.config.num_spec_streams:
            stream_positions = self._stream_anchors(labels) if loss_only else "all"
        if use_cache and cache is None and not loss_only:
            cache = DynamicCache(config=self.config)
        out = self.transformer(input_ids=input_ids, cache=cache, attention_mask=attention_mask,
                               position_ids=position_ids, tree_mask=tree_mask, stream_positions=stream_positions)
        loss = None if labels is None else self._loss(out, labels, stream_positions, distill_streams)
        if loss_only:
            return SpecStreamCausalLMOutput(loss=loss)
        hidden = out.hidden_states[:, -logits_to_keep:] if logits_to_keep else out.hidden_states
        stream_logits = None if out.stream_hidden_states is None else self.lm_head(out.stream_hidden_states)
        return SpecStreamCausalLMOutput(loss=loss, logits=self.lm_head(hidden), stream_logits=stream_logits,
                                        **{CACHE_FIELD: cache})

    def _stream_anchors(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The positions where some stream has a target in some row (a prompt's streams
        predict prompt tokens, labelled -100; left-padded batches keep those positions few:
        every row's targets end at the same place); None when the streams' loss weight is 0."""
        if not self.config.stream_loss_weight:
            return None
        has_target = (labels != -100).any(dim=0)  # (T,)
        length = labels.shape[1]
        anchors = torch.zeros(length, dtype=torch.bool, device=labels.device)
        for shift in range(2, 2 + self.config.num_spec_streams):  # stream j at t predicts t + 1 + j
            anchors[: max(length - shift, 0)] |= has_target[shift:]  # a sequence shorter than the shift: none
        return anchors.nonzero().flatten()

    def _loss(self, out: GPTNeoModelOutput, labels: torch.Tensor, anchors, distill_streams: bool) -> torch.Tensor:
        """``a0 * CE(main) + sum_j a_j * CE(stream_j)`` over every target of the batch, the
        streams run at ``anchors`` (indices, "all" or None); the head projects only rows with
        a target, which changes no sum or count. A weight of 0 skips its part.
        ``distill_streams``: stream j at t learns the main stream's distribution at t + j
        (its prediction of the same token t + 1 + j) instead of the label: KL(main || stream),
        the main side detached. Acceptance is agreement with the main stream, so this teaches
        the streams exactly what verification checks."""
        loss = torch.zeros((), device=labels.device)
        if self.config.main_loss_weight:
            main_rows = (labels != -100).any(dim=0)[1:].nonzero().flatten()  # t with a target at t + 1
            loss = self.config.main_loss_weight * self._head_loss(out.hidden_states, main_rows, labels, 1)
        if out.stream_hidden_states is None or not self.config.stream_loss_weight:
            return loss
        positions = anchors if torch.is_tensor(anchors) else torch.arange(labels.shape[1], device=labels.device)
        stream_loss = self._distillation_loss if distill_streams else self._head_loss
        for j in range(out.stream_hidden_states.shape[1]):
            loss = loss + self.config.stream_loss_weight * stream_loss(
                out.stream_hidden_states[:, j], None, labels, 2 + j, positions=positions,
                **({"main_hidden": out.hidden_states} if distill_streams else {}))
        return loss

    def _distillation_loss(self, hidden, rows, labels, shift, positions, main_hidden) -> torch.Tensor:
        """Mean KL(main || stream) over the targets ``shift`` tokens after ``positions``:
        the stream at t against the main stream at t + shift - 1, which predicts the same
        token (the target only says where to count, as in `_head_loss`)."""
        rows = (positions + shift < labels.shape[1]).nonzero().flatten()
        targets = labels[:, positions[rows] + shift]  # (B, n)
        counted = targets != -100
        with torch.no_grad():
            teacher = F.log_softmax(self.lm_head(main_hidden[:, positions[rows] + shift - 1][counted]).float(), -1)
        student = F.log_softmax(self.lm_head(hidden[:, rows][counted]).float(), -1)
        total = F.kl_div(student, teacher, log_target=True, reduction="sum")
        return total / (labels[:, shift:] != -100).sum().clamp(min=1)

    def _head_loss(self, hidden, rows, labels, shift, positions=None) -> torch.Tensor:
        """Mean CE of the head at ``rows`` of ``hidden`` (positions ``positions[rows]``, or
        the rows themselves) against ``labels`` ``shift`` tokens later; the mean is over
        every target of that shift in the batch, as `shifted_cross_entropy`'s."""
        positions = torch.arange(hidden.shape[1], device=labels.device) if positions is None else positions
        if rows is None:
            rows = (positions + shift < labels.shape[1]).nonzero().flatten()
        targets = labels[:, positions[rows] + shift]
        logits = self.lm_head(hidden[:, rows]).float()
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                reduction="sum")
        return total / (labels[:, shift:] != -100).sum().clamp(min=1)

    def add_stream_adapters(self, rank: int) -> None:
        """Give the streams adapters of ``rank`` (`StreamLayerAdapter`), fresh: they add
        nothing until trained. For fine-tuning the streams of a model whose base stays frozen."""
        if not self.config.num_spec_streams:
            raise ValueError("stream adapters need a model with speculative streams (num_spec_streams > 0).")
        if rank < 1:
            raise ValueError(f"stream adapter rank {rank} must be at least 1.")
        self.config.stream_adapter_rank = rank
        parameter = self.transformer.streams.embeddings
        adapters = nn.ModuleList(StreamLayerAdapter(self.config) for _ in range(self.config.num_stream_layers))
        for low_rank in adapters.modules():
            if isinstance(low_rank, LowRank):
                nn.init.normal_(low_rank.down.weight, std=self.config.initializer_range)
                nn.init.zeros_(low_rank.up.weight)
        self.transformer.streams.adapters = adapters.to(device=parameter.device, dtype=parameter.dtype)

    # -- the contract with generation ------------------------------------------------------
    def run_tree(self, tokens: torch.Tensor, cache, position_ids: torch.Tensor, tree_mask: torch.Tensor | None = None,
                 num_streams: int | None = None, logit_positions: torch.Tensor | None = None) -> TreeStepOutput:
        """One forward over a flattened draft tree (or a prompt): the only model call the
        decoding loop makes besides `draft_logits`. tokens, position_ids (B, T); cache: a
        `FixedShapeKVCache`; tree_mask (T, T): ancestors-or-self (None: causal, e.g. a
        prompt). The first ``num_streams`` speculative streams (None: all; 0: none) run at
        every node that gets logits; ``logit_positions`` (None: every node; (n,): the same
        nodes in every row; (B, n): per row, e.g. each row's last prompt token) selects those."""
        anchors = "all" if logit_positions is None else logit_positions
        out = self.transformer(input_ids=tokens, cache=cache, position_ids=position_ids, tree_mask=tree_mask,
                               stream_positions=anchors, num_streams=num_streams)
        hidden = out.hidden_states if logit_positions is None else select_per_row(out.hidden_states, logit_positions, 1)
        return TreeStepOutput(linear(self.lm_head, hidden), out.stream_hidden_states)

    def draft_logits(self, stream_states: torch.Tensor) -> torch.Tensor:
        """Stream logits from `run_tree`'s stream states (any leading shape, hidden last)."""
        return linear(self.lm_head, stream_states)

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Upstream's `from_pretrained`, plus two checks on the speculative streams: asking
        for a different number of streams than the checkpoint holds is a clear error (pass
        ``num_spec_streams=0`` to drop them), and stream weights missing from a checkpoint
        whose config has streams are reported loudly (they would be random: decoding stays
        exact, but drafts are never accepted until they are fine-tuned)."""
        saved = None
        if kwargs.get("config") is None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                saved = cls.config_class.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
        return_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except RuntimeError as error:
            wanted = kwargs.get("num_spec_streams")
            if "mismatched" not in str(error) or saved is None or wanted in (None, saved.num_spec_streams):
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path} holds {saved.num_spec_streams} trained speculative streams but "
                f"num_spec_streams={wanted} was asked for; load it as it is (omit "
                "num_spec_streams), or pass num_spec_streams=0 and fine-tune a fresh set of streams."
            ) from None
        missing = sorted(k for k in info.get("missing_keys", ()) if "streams." in k)
        if missing and saved is not None and saved.num_spec_streams:
            logger.warning(
                f"{pretrained_model_name_or_path}: its config has {saved.num_spec_streams} speculative streams but "
                f"the weights file lacks {len(missing)} of their tensors ({missing[0]}, ...): they were initialised "
                "at random. Speculative decoding stays exact but will draft nothing useful until the streams are "
                "fine-tuned (python -m spec_stream.finetune --base this checkpoint)."
            )
        model.randomly_initialised_streams = bool(missing)
        return (model, info) if return_info else model


def check_unused_arguments(arguments: dict) -> None:
    """Upstream's `generate` hands the model what it does not read (a ``tokenizer``, say),
    which upstream's GPT-Neo ignores too; a cache among them is an error, not ignored:
    decoding would go on without its past and write garbage."""
    caches = [name for name, value in arguments.items() if isinstance(value, Cache)]
    if caches:
        raise upstream_changed(f"it passed GPT-Neo's cache as `{caches[0]}`, an argument spec-stream does not know "
                               "(it reads `cache` and `past_key_values`), so decoding would run without its past")


def _hub_kwargs(kwargs: dict) -> dict:
    """The arguments of `from_pretrained` that say where and how to fetch files."""
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    return {k: kwargs[k] for k in keys if k in kwargs}


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean CE of ``logits[:, t]`` against ``labels[:, t + shift]`` over labels that are not
    -100 (0 when there are none, e.g. a target shorter than the stream's offset)."""
    predicted = logits[:, : max(labels.shape[1] - shift, 0)].float()
    targets = labels[:, shift:]
    total = F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (targets != -100).sum().clamp(min=1)
