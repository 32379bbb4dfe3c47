"""GPT-Neo with Speculative Streaming (multi-stream attention in the top layers).

State-dict compatible with upstream `transformers.GPTNeoForCausalLM`: same module names
(`transformer.wte/wpe/h.N.{ln_1,attn.attention.{q,k,v,out}_proj,ln_2,mlp.{c_fc,c_proj}}/ln_f`,
tied `lm_head`), plus `transformer.streams.*` for the new parameters. The method is in
SPEC_STREAM.md; the decisions it leaves open are written next to the code that makes them.

Masks are built once per forward from explicit positions, never from slot indices:
a query at position p sees a key at position k iff the key is valid (not padding), the
key is before the query in the *block* sense (cached keys always; new keys per the causal
or tree mask), and, in local layers, ``p - k < window_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPTNeoConfig as UpstreamGPTNeoConfig
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging
from huggingface_hub.dataclasses import strict

from ...cache_utils import FixedShapeKVCache, StaticKVCache
from ...generation.utils import SpeculativeStreamingGenerationMixin

logger = logging.get_logger(__name__)


@strict
class GPTNeoConfig(UpstreamGPTNeoConfig):
    """Upstream GPT-Neo config plus the speculative streams.

    num_spec_streams: gamma, streams drafting tokens t+2 .. t+1+gamma (0 = plain GPT-Neo).
    num_stream_layers: N_s, the top layers that run multi-stream attention.
    pruner_rank: rank of the tree-pruning adapter (0 = none).
    main_loss_weight, stream_loss_weight: a0 and a_j of the training loss.
    """

    num_spec_streams: int = 0
    num_stream_layers: int = 0
    pruner_rank: int = 8
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
class SpecStreamCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (batch, seq, vocab): main stream, predicts t+1
    stream_logits: torch.Tensor | None = None  # (batch, gamma, n_positions, vocab): stream j predicts t+1+j
    early_exit_logits: torch.Tensor | None = None  # (batch, seq, vocab): pruning adapter at the first stream layer
    past_key_values: object | None = None


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
        into the new tokens). Stream j at anchor a sees what the main stream at a sees
        (main keys, incl. the local window) plus streams 1..j at a; main rows see no stream."""
        masks = {}
        n = anchors.numel()
        # stream row (j, s) -> stream key (i, s') allowed iff s == s' and i <= j
        stream_block = torch.kron(
            torch.ones(num_streams, num_streams, dtype=torch.bool, device=anchors.device).tril(),
            torch.eye(n, dtype=torch.bool, device=anchors.device),
        )
        for kind, mask in self.masks.items():
            batch = mask.shape[0]
            main_part = mask[:, :, anchors]  # the anchors' own main-stream rows
            stream_rows = torch.cat(
                [main_part.repeat(1, 1, num_streams, 1), stream_block.expand(batch, 1, -1, -1)], dim=-1
            )
            main_rows = F.pad(mask, (0, num_streams * n), value=False)
            masks[kind] = torch.cat([main_rows, stream_rows], dim=2)
        return AttentionMasks(masks, plain_causal=False, window_matters=self.window_matters)


def build_attention_masks(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor | None,
    new_block: torch.Tensor | None,
    window_size: int,
    layer_types: set[str],
) -> AttentionMasks:
    """query_positions (B, T), key_positions (B, P+T) (the last T keys are the queries'
    own), key_valid (B, P+T) or None, new_block (T, T) or (B, T, T): which new keys each new
    query may see (None = causal by index)."""
    batch, new = query_positions.shape
    past = key_positions.shape[1] - new
    device = query_positions.device
    plain = past == 0 and key_valid is None and new_block is None
    if new_block is None:
        new_block = torch.ones(new, new, dtype=torch.bool, device=device).tril()
    new_block = new_block.expand(batch, new, new)
    old_block = torch.ones(batch, new, past, dtype=torch.bool, device=device)
    allowed = torch.cat([old_block, new_block], dim=-1)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :].bool()
        # a padded query would see nothing and softmax would give NaN: let it see itself
        allowed[:, torch.arange(new, device=device), past + torch.arange(new, device=device)] = True
    distance = query_positions[:, :, None] - key_positions[:, None, :]
    masks = {"global": allowed[:, None]}
    if "local" in layer_types:
        masks["local"] = (allowed & (distance < window_size))[:, None]
    # Only the implicit-causal fast path (plain) needs to know whether the window cuts
    # anything: explicit masks carry it already, and reading positions would sync the device.
    window_matters = True
    if plain:
        window_matters = new > 0 and int(query_positions.max() - key_positions.min()) >= window_size
    return AttentionMasks(masks, plain_causal=plain, window_matters=window_matters)


def build_fixed_shape_masks(
    query_positions: torch.Tensor,
    slot_positions: torch.Tensor,
    length: torch.Tensor,
    new_block: torch.Tensor,
    window_size: int,
    layer_types: set[str],
) -> AttentionMasks:
    """Masks over *every* slot of a fixed-shape cache (`FixedShapeKVCache`), so their shape
    never changes: slots ``[0, length)`` are the cached prefix, the T new tokens were just
    written to slots ``[length, length + T)`` (``new_block`` (T, T) says which of them each
    sees), later slots are stale. ``slot_positions`` (B, S) and ``length`` (0-d) live on
    the device: no host synchronisation."""
    new = query_positions.shape[1]
    offset = torch.arange(slot_positions.shape[1], device=length.device) - length  # slot - length
    is_new = (offset >= 0) & (offset < new)
    sees_new = new_block[:, offset.clamp(0, new - 1)] & is_new  # (T, S)
    allowed = ((offset < 0) | sees_new)[None].expand(query_positions.shape[0], -1, -1)
    masks = {"global": allowed[:, None]}
    if "local" in layer_types:
        distance = query_positions[:, :, None] - slot_positions[:, None, :]
        masks["local"] = (allowed & (distance < window_size))[:, None]
    return AttentionMasks(masks, plain_causal=False, window_matters=True)


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

    def forward(self, hidden_states, masks: AttentionMasks, cache=None, num_main: int | None = None):
        """``num_main``: the first rows are main-stream tokens (cached); any rows after them
        are speculative-stream queries whose keys/values live for this forward only."""
        num_main = hidden_states.shape[1] if num_main is None else num_main
        q = self._heads(self.q_proj(hidden_states))
        k = self._heads(self.k_proj(hidden_states))
        v = self._heads(self.v_proj(hidden_states))
        if cache is not None:
            main_k, main_v = cache.update(k[:, :, :num_main], v[:, :, :num_main], self.layer_id)
            k = torch.cat([main_k, k[:, :, num_main:]], dim=2)
            v = torch.cat([main_v, v[:, :, num_main:]], dim=2)
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
        return self.resid_dropout(self.out_proj(out))


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

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPTNeoBlock(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer_id: int):
        super().__init__()
        inner = config.intermediate_size or 4 * config.hidden_size
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTNeoAttention(config, layer_id)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTNeoMLP(inner, config)

    def forward(self, hidden_states, masks, cache=None, num_main=None):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), masks, cache, num_main)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class SpeculativeStreams(nn.Module):
    """The new parameters: stream embeddings P_j and the tree-pruning adapter.

    Pruning adapter (a decision SPEC_STREAM.md leaves open): ``h + up(down(h))`` with
    rank-``pruner_rank`` ``down``/``up`` and ``up`` initialised to zero, applied to the
    main-stream state entering the first stream layer; ``ln_f`` and the tied LM head turn
    it into early-exit logits.
    """

    def __init__(self, config: GPTNeoConfig):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(config.num_spec_streams, config.hidden_size))
        self.pruner_down = self.pruner_up = None
        if config.pruner_rank:
            self.pruner_down = nn.Linear(config.hidden_size, config.pruner_rank, bias=False)
            self.pruner_up = nn.Linear(config.pruner_rank, config.hidden_size, bias=False)

    def initial_states(self, main_states: torch.Tensor) -> torch.Tensor:
        """S_j(t) = M(t) + P_j: (batch, n, hidden) -> (batch, gamma * n, hidden), stream-major."""
        batch, n, hidden = main_states.shape
        streams = main_states[:, None] + self.embeddings[None, :, None].to(main_states.dtype)
        return streams.reshape(batch, -1, hidden)

    def pruner(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.pruner_down is None:
            raise ValueError("this model has no pruning adapter (config.pruner_rank=0); rebuild with pruner_rank=8.")
        return hidden_states + self.pruner_up(self.pruner_down(hidden_states))


class GPTNeoPreTrainedModel(PreTrainedModel):
    config_class = GPTNeoConfig
    config: GPTNeoConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTNeoBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _keys_to_ignore_on_load_unexpected = [r"attn\.attention\.(bias|masked_bias)"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SpeculativeStreams):
            init.normal_(module.embeddings, mean=0.0, std=self.config.initializer_range)
            if module.pruner_up is not None:
                init.zeros_(module.pruner_up.weight)


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
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        stream_positions: torch.Tensor | str | None = None,
        early_exit: bool = False,
        node_filter=None,
    ):
        """Returns (main hidden states (B, T, H), stream hidden states (B, gamma, n, H) or
        None, early-exit hidden states (B, T, H) or None), all after ``ln_f``.

        ``past_key_values``: None, a `StaticKVCache`, or an upstream `Cache`.
        ``position_ids``: required with a `StaticKVCache` and a tree; default: past + index.
        ``tree_mask`` (T, T) bool: which new tokens each new token sees (default causal).
        ``stream_positions``: None (no streams), "all", or indices into the new tokens.
        ``node_filter``: tree pruning (batch 1, `StaticKVCache`, streams "all"): called at
        the first stream layer with the early-exit hidden states (1, T, H); returns the
        ascending indices of the new tokens to keep (ancestors of kept ones included). Only
        those go through the top layers and into the cache; outputs cover them alone.
        """
        batch, new = input_ids.shape
        cache = past_key_values
        static = isinstance(cache, StaticKVCache)
        fixed_shape = isinstance(cache, FixedShapeKVCache)  # its length lives on the device
        past = cache.get_seq_length() if cache is not None and not fixed_shape else 0
        if fixed_shape and (position_ids is None or node_filter is not None):
            raise ValueError("a FixedShapeKVCache needs explicit position_ids and no node_filter (pruning "
                             "changes shapes); use a StaticKVCache for pruned trees.")
        if static and not fixed_shape:
            cache.check_room(new)
        if position_ids is None:
            if past + new > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence of {past + new} tokens is longer than max_position_embeddings="
                    f"{self.config.max_position_embeddings}; shorten the prompt or lower max_new_tokens."
                )
            position_ids = torch.arange(past, past + new, device=input_ids.device).expand(batch, new)
        elif not (fixed_shape or position_ids.is_cuda) and (
            int(position_ids.max()) >= self.config.max_position_embeddings  # a sync: CPU only
        ):
            raise ValueError(
                f"position id {int(position_ids.max())} >= max_position_embeddings="
                f"{self.config.max_position_embeddings}; shorten the prompt or lower max_new_tokens."
            )
        if node_filter is not None and not (static and batch == 1 and stream_positions in (None, "all")):
            raise ValueError("tree pruning (node_filter) needs batch 1, a StaticKVCache and stream_positions='all'.")
        key_valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask[:, -(past + new):].bool()

        def make_masks(position_ids, tree_mask):
            if fixed_shape:
                causal = torch.ones(new, new, dtype=torch.bool, device=input_ids.device).tril()
                return build_fixed_shape_masks(
                    position_ids, cache.key_positions(position_ids), cache.length,
                    causal if tree_mask is None else tree_mask, self.config.window_size,
                    set(self.config.attention_layers),
                )
            if static:
                query_positions, key_positions = position_ids, cache.key_positions(position_ids)
            else:  # upstream caches: positions by index (position_ids only feed the embedding)
                key_positions = torch.arange(past + new, device=input_ids.device).expand(batch, -1)
                query_positions = key_positions[:, past:]
            return build_attention_masks(
                query_positions, key_positions, key_valid, tree_mask, self.config.window_size,
                set(self.config.attention_layers),
            )

        masks = make_masks(position_ids, tree_mask)
        hidden = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        first_stream_layer = self.config.first_stream_layer
        early_exit_hidden = None
        for index, block in enumerate(self.h):
            if index == first_stream_layer:
                if early_exit or node_filter is not None:
                    early_exit_hidden = self.ln_f(self.streams.pruner(hidden))
                if node_filter is not None:
                    keep = node_filter(early_exit_hidden)
                    cache.keep_new_rows(keep, layers=index)
                    new, hidden, position_ids = keep.numel(), hidden[:, keep], position_ids[:, keep]
                    tree_mask = tree_mask[keep][:, keep] if tree_mask is not None else None
                    masks = make_masks(position_ids, tree_mask)
                if stream_positions is not None and self.streams is not None:
                    anchors = (
                        torch.arange(new, device=hidden.device) if isinstance(stream_positions, str)
                        else stream_positions.to(hidden.device)
                    )
                    hidden = torch.cat([hidden, self.streams.initial_states(hidden[:, anchors])], dim=1)
                    masks = masks.with_streams(anchors, self.config.num_spec_streams)
            hidden = block(hidden, masks, cache, new)
        if static:
            cache.commit(position_ids)
        hidden = self.ln_f(hidden)
        stream_hidden = None
        if hidden.shape[1] > new:
            stream_hidden = hidden[:, new:].reshape(batch, self.config.num_spec_streams, -1, hidden.shape[-1])
        return hidden[:, :new], stream_hidden, early_exit_hidden


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
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        tree_mask: torch.Tensor | None = None,
        stream_positions: torch.Tensor | str | None = None,
        early_exit: bool = False,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SpecStreamCausalLMOutput:
        """Upstream's forward plus ``tree_mask``, ``stream_positions`` and ``early_exit``
        (see `GPTNeoModel.forward`). With ``labels`` (aligned with ``input_ids``, -100 =
        ignore), streams run at every position and ``loss`` is SPEC_STREAM.md's
        ``a0 * CE(main) + sum_j a_j * CE(stream_j)``."""
        if input_ids is None:
            raise ValueError("GPTNeoForCausalLM (spec-stream) needs input_ids; inputs_embeds is not supported.")
        if labels is not None and stream_positions is None and self.config.num_spec_streams:
            stream_positions = "all"
        if use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        hidden, stream_hidden, early_hidden = self.transformer(
            input_ids, past_key_values, attention_mask, position_ids, tree_mask, stream_positions, early_exit
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        stream_logits = self.lm_head(stream_hidden) if stream_hidden is not None else None
        early_exit_logits = self.lm_head(early_hidden) if early_hidden is not None else None
        loss = None
        if labels is not None:
            loss = speculative_streaming_loss(
                logits, stream_logits, labels, self.config.main_loss_weight, self.config.stream_loss_weight
            )
        return SpecStreamCausalLMOutput(loss, logits, stream_logits, early_exit_logits, past_key_values)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean CE of ``logits[:, t]`` against ``labels[:, t + shift]`` over labels that are not
    -100 (0 when there are none, e.g. a target shorter than the stream's offset)."""
    predicted = logits[:, : max(labels.shape[1] - shift, 0)].float()
    targets = labels[:, shift:]
    total = F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (targets != -100).sum().clamp(min=1)


def speculative_streaming_loss(logits, stream_logits, labels, main_weight=1.0, stream_weight=0.1):
    """``main_weight * CE(main(t), y(t+1)) + stream_weight * sum_j CE(stream_j(t), y(t+1+j))``."""
    loss = main_weight * shifted_cross_entropy(logits, labels, 1)
    if stream_logits is not None:
        for j in range(stream_logits.shape[1]):
            loss = loss + stream_weight * shifted_cross_entropy(stream_logits[:, j], labels, 2 + j)
    return loss
