"""Decoding engines the benchmark compares, greedy or sampling.

Every engine turns prompts (token ids) into new tokens and reports the forward calls it
made; `Engine.run` times one prompt honestly (device synchronised before and after),
`Engine.run_many` a list of them, one by one or in left-padded batches of ``batch_size``.
Greedy unless built with a `Sampling` (temperature, top-k, top-p, seed): then every engine
samples with the same warpers, and the prompt (or batch) starting at index i of the list
draws from torch's generators seeded with ``seed + i``, so a pass is reproducible. They
differ in how they build the model and which `generate` they call:

| engine            | model                               | decoding                                   |
|-------------------|-------------------------------------|--------------------------------------------|
| naive             | upstream GPT-Neo, fp32 (the reference model, if given) | upstream greedy `generate` |
| no_cache          | upstream GPT-Neo, fp32              | upstream greedy, `use_cache=False`: every step recomputes the sequence |
| half              | upstream GPT-Neo, fp16 (or bf16)    | upstream greedy `generate`                 |
| int8              | upstream GPT-Neo, int8 linear layers (CPU) | upstream greedy `generate`          |
| compiled          | upstream GPT-Neo, static KV cache   | upstream greedy `generate`, decoding steps compiled |
| flash_attention2  | upstream + flash-attn, else ours SDPA, fp16 | upstream greedy `generate`         |
| prompt_lookup     | upstream GPT-Neo                    | `generate(prompt_lookup_num_tokens=...)`   |
| assisted          | upstream GPT-Neo + draft GPT-Neo    | `generate(assistant_model=...)`            |
| static            | ours, static KV cache               | our loop with an empty tree (1 token/call) |
| spec_stream       | ours, static KV cache               | tree drafts, `speculative_streaming=True`  |
| spec_stream_int8  | ours, int8 linear layers (CPU)      | tree drafts: exact w.r.t. the int8 model's own greedy decoding |

`compiled` is transformers' own fast path, what a user would pick instead of us:
`generate(cache_implementation="static", compile_config=CompileConfig(...))`. How
transformers 5.24 does it: `generate` sizes a `StaticCache` to the call's prompt plus new
tokens, never smaller than the last one it made (`_prepare_static_cache`, "to avoid
recompilation"); `_valid_auto_compile_criteria` (generation/utils.py) compiles the decoding
step when that cache is compileable and the device is a GPU (or XPU, TPU, Neuron), or on any
device when the `CompileConfig` has ``_compile_all_devices`` set, its switch for the CPU,
which ours sets; decoding steps then call `get_compiled_call` (modeling_utils.py):
``torch.compile(model.__call__, **compile_config.to_dict())``, made once and kept on the
model. The prefill stays eager. Ours is the config of transformers' own example
(``dynamic=True``) with ``fullgraph=True`` (inductor, mode ``reduce-overhead``: CUDA graphs
on a GPU, plain inductor on a CPU): cache length and batch size are symbols of the graph, so
no prompt length compiles again; batch 1 (which torch specializes) and batches of 2 or more
compile once each, untimed, before their first call (`warm_up`; the description names the
seconds per batch size). Static shapes (``dynamic=False``) compile again for every longer
cache unless ``max_cache_len`` fixes its length at the model's context, and then every step
attends over all 2,048 slots: 0.54x naive's tokens/s on 5 DialogSum prompts with the `small`
checkpoint (busy development CPU, best of 5 passes), where dynamic shapes ran at 1.00x.
Upstream GPT-Neo's local attention is wrong with a static cache longer than ``window_size``
(`StaticCacheLocalAttention` says why); the engine fixes that, and only that, in the model it
loads. If this torch cannot compile (no C++ compiler for inductor on a CPU, no triton on a
GPU), `unavailable` says so in one line and `build_engine`, and `dataset_tps.py` before any
work, refuse; a compile that fails anyway makes the engine `Unsupported` (its row says why).

`static` and `spec_stream` decode through ``model.generate(speculative_streaming=True, ...)``
with the arguments a user would pass (`SpecStreamEngine.user_call`): on a GPU its runner
replays each step as a CUDA graph; on a CPU it runs compiled (``compile_config=
CompileConfig()``, `defaults.COMPILE_STEP_ON_CPU`), each new shape compiled by an untimed
call before the timed one, and "auto" chooses per call, for the steps that call runs
(`tree_search.resolve_tree`); `static` is the same call with the one-token step. Settings an engine
takes (tree widths, draft model, ...) are named in its ``settings``; `build_engine` passes
each engine its own.

Batches (``batch_size`` > 1): prompts left-padded with an attention mask; upstream engines
call plain `generate` on the batch (what upstream batched greedy is), ours
`generate(speculative_streaming=True)` on it. Engines that decode one prompt at a time
(`prompt_lookup`, `assisted`: upstream refuses batches; ours when sampling, which
`generate(speculative_streaming=True)` serves one prompt at a time) raise `Unsupported`,
and the benchmark's row says so.

int8 (`Int8Linear`): weights int8 with one scale per output channel, activations quantized
to int8 per row (token) at run time, products summed in int32 by `torch._int_mm`. With
per-row scales a row's output is the same bits whatever else the call carries (integer
products, then per-element scaling), so `spec_stream_int8` verifies a tree against exactly
what the int8 model's one-token greedy steps compute. Why not the usual tools (2-core
development CPU, torch 2.13, one thread, CPU time, GPT-Neo-125M shape, upstream greedy):
fp32 40.3 ms per token, `Int8Linear` 12.4 ms, `torch.ao.quantization.quantize_dynamic`
10.9 ms; but quantize_dynamic is deprecated, and its per-tensor activation scale makes a
row's output depend on the other rows of the call (row 0 of a 64-wide layer moved by 3e-2
when two rows joined it), so a tree step could not reproduce greedy steps. torchao 0.18's
row-exact `Int8DynamicActivationInt8WeightConfig` ran its 768 x 50257 LM head at one row in
65 ms against fp32's 9.5 ms and `torch._int_mm`'s 1.1 ms (and is not a dependency here).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import transformers
from transformers import CompileConfig
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

from huggingface.transformers.generation.fixed_shape import (COMPILED, CUDA_GRAPHS, DEFAULT_CACHE_BUCKETS,
                                                              DEFAULT_PREFILL_BUCKETS, EAGER)
from huggingface.transformers.generation.tree_search import PROBE_CONTEXTS, resolve_tree
from spec_stream import GPTNeoForCausalLM
from spec_stream.arithmetic import ModelShape, dtype_name, step_weight_bytes
from spec_stream import defaults
from spec_stream.defaults import BENCHMARK_TREE_WIDTHS, PROMPT_LOOKUP_TOKENS
from spec_stream.errors import UserError
from spec_stream.timing import StepTimer, synchronize


class Unsupported(Exception):
    """An engine cannot serve this request (a batch, say): the benchmark reports why."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings every engine applies alike (upstream's warpers: temperature, then
    top-k (0: off), then top-p (1.0: off)), and the seed of the first prompt."""

    temperature: float
    top_k: int
    top_p: float
    seed: int

    def generate_kwargs(self) -> dict:
        return dict(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def warpers(self) -> transformers.LogitsProcessorList:
        """The warpers plain `generate(do_sample=True, ...)` applies, in its order."""
        warpers = transformers.LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(transformers.TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(transformers.TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(transformers.TopPLogitsWarper(self.top_p))
        return warpers


@dataclass
class GenerationResult:
    new_tokens: list[int]
    seconds: float  # this prompt's wall time; in a batch, its share of the batch's
    forward_calls: float  # in a batch, this prompt's share of the batch's calls
    drafted: int = 0  # draft tokens the verifier could have accepted (tree depth per step)
    accepted: int = 0  # draft tokens it did accept
    accepted_from_lookup: int = 0  # of which from the prompt-lookup branch (the rest from the streams)
    step_seconds: dict[str, float] = field(default_factory=dict)
    latency: float | None = None  # seconds until this prompt's tokens were out (a batch's whole time)
    call_seconds: list[float] = field(default_factory=list)  # wall time from each forward call to the next


def load_upstream(checkpoint: str, attn_implementation: str):
    """transformers' own GPT-Neo. It ignores our stream parameters by design, so its load
    report (a warning listing them as unexpected) is silenced."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.GPTNeoForCausalLM.from_pretrained(checkpoint, attn_implementation=attn_implementation)
    finally:
        transformers.logging.set_verbosity(verbosity)


def plain_decoding(model) -> dict:
    """What asks our model for plain `generate` (a checkpoint's generation config may turn
    its streams on by default); nothing for upstream's model, which knows no such flag."""
    return {"speculative_streaming": False} if isinstance(model, GPTNeoForCausalLM) else {}


class ForwardCounter:
    """Counts forward calls of a module with a pre-hook and notes when each began. Hooked
    on the model's ``transformer`` (the decoder stack), it counts upstream `generate`
    loops, which go through ``model.forward``, and our loop, which calls the decoder
    directly, alike. (Upstream `generate` synchronises a GPU every step, so the times hold
    there too; CUDA-graph replays bypass hooks.)"""

    def __init__(self, module: torch.nn.Module):
        self.starts: list[float] = []
        self.hook = module.register_forward_pre_hook(self._note)

    def remove(self) -> None:
        """Unhook it (a hook inside a compiled call would be traced into it, see below)."""
        self.hook.remove()

    @property
    def calls(self) -> int:
        return len(self.starts)

    def reset(self) -> None:
        self.starts = []

    def _note(self, module, args):
        self.starts.append(time.perf_counter())

    def call_seconds(self, end: float) -> list[float]:
        times = self.starts + [end]
        return [later - earlier for earlier, later in zip(times, times[1:])]


class GenerateStepCounter(ForwardCounter):
    """A `ForwardCounter` for a model whose decoding step is `torch.compile`d: a hook inside
    the compiled call would be traced into it (dynamo guards on the list of start times and
    compiles again every call), so this counts, outside it, the calls of the model's
    ``prepare_inputs_for_generation``, which upstream's greedy and sampling loops make once
    before each forward call, prefill included."""

    def __init__(self, model: torch.nn.Module):
        self.starts: list[float] = []
        prepare = model.prepare_inputs_for_generation

        @functools.wraps(prepare)  # generate reads its signature
        def counted(*args, **kwargs):
            self._note(model, args)
            return prepare(*args, **kwargs)
        model.prepare_inputs_for_generation = counted


class LoopCallCounter(ForwardCounter):
    """A `ForwardCounter` for our decoding loop, passed to it as ``step_timer``: counts,
    outside any compiled or graphed step, each section that starts a forward call (the
    prefill; each step, named "step", or "draft" when eager) and times every section
    (``timer``, a `StepTimer`)."""

    FORWARDS = ("prefill", "step", "draft")

    def __init__(self, device):
        self.starts: list[float] = []
        self.timer = StepTimer(device)

    def reset(self) -> None:
        self.starts, self.timer = [], StepTimer(self.timer.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if name in self.FORWARDS:
            self._note(None, ())
        with self.timer(name):
            yield


class Int8Linear(torch.nn.Module):
    """A linear layer in int8 (see the module docstring): weight (out, in) int8 with a scale
    per output channel, each input row quantized with its own scale, int32 products."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        quantized = torch.round(rows / scale).to(torch.int8)
        out = torch._int_mm(quantized, self.weight.t()).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Every `nn.Linear` of ``model`` (LM head included; a tied embedding stays fp32 for
    the lookup) replaced in place by an `Int8Linear`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model


class Engine:
    """Base: subclasses set ``model`` and implement `_generate` (one prompt) and, when they
    batch, `_generate_batch`."""

    name = "engine"
    backend = "eager"
    settings: tuple[str, ...] = ()  # keyword settings `build_engine` hands to this engine
    devices = ("cpu", "cuda")  # device types the engine runs on
    precision = "auto"  # "fp32": always; "half": the half dtype everywhere; "auto": half on a GPU only
    quantization: str | None = None  # "int8" for the int8 engines
    batches = True  # whether `generate` takes a left-padded batch of prompts

    def __init__(self, checkpoint: str, device: torch.device, dtype: torch.dtype, sampling: Sampling | None = None):
        self.device, self.dtype, self.checkpoint, self.sampling = device, dtype, checkpoint, sampling
        self.model = self._load(checkpoint).to(device=device, dtype=dtype).eval()
        self.counter = self._forward_counter()

    def _forward_counter(self) -> ForwardCounter:
        return ForwardCounter(self.model.transformer)

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why this engine cannot run on ``device`` with this installation (one line), or
        None. Checked before any model is loaded."""
        return None

    @classmethod
    def dtype_for(cls, device: torch.device, half_dtype: torch.dtype) -> torch.dtype:
        """naive-like engines are fp32 by definition; the others run in half precision on a
        GPU. On the CPU half precision is slow and spec_stream must match naive token for
        token, so only `half` keeps its half dtype there."""
        if cls.precision == "half" or (cls.precision == "auto" and device.type == "cuda"):
            return half_dtype
        return torch.float32

    def _load(self, checkpoint: str):
        return load_upstream(checkpoint, "eager")

    @property
    def description(self) -> str:
        return f"{self.backend}, {self.weight_format}"

    @property
    def weight_format(self) -> str:
        """'int8' for the int8 engines, else the dtype's name ('float32', ...)."""
        return self.quantization or dtype_name(self.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights each forward call reads at least (`arithmetic.step_weight_bytes`:
        every block and the LM head in the engine's format; embedding rows and the streams
        left out)."""
        return step_weight_bytes(ModelShape.of(self.model.config), self.weight_format)

    def decoding(self) -> dict:
        """Greedy, or the run's sampling settings: the same for every engine."""
        return self.sampling.generate_kwargs() if self.sampling else {"do_sample": False}

    def _timed(self, index: int, generate):
        """``generate()`` timed with the device synchronised around it, after seeding torch's
        generators for the prompt (or batch) at ``index`` when sampling: (its value, start, end)."""
        if self.sampling:
            torch.manual_seed(self.sampling.seed + index)
        self.counter.reset()
        synchronize(self.device)
        start = time.perf_counter()
        value = generate()
        synchronize(self.device)
        return value, start, time.perf_counter()

    @torch.no_grad()
    def run(self, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
            index: int = 0) -> GenerationResult:
        prompt_ids = prompt_ids.to(self.device)
        (sequences, extra), start, end = self._timed(
            index, lambda: self._generate(prompt_ids, max_new_tokens, eos_token_id))
        new_tokens = sequences[0, prompt_ids.shape[1]:].tolist()
        extra.setdefault("forward_calls", self.counter.calls)  # CUDA-graph replays bypass hooks
        return GenerationResult(new_tokens, end - start, latency=end - start,
                                call_seconds=self.counter.call_seconds(end), **extra)

    def run_many(self, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id: int | None,
                 batch_size: int = 1) -> list[GenerationResult]:
        """Every prompt, in order: one at a time (`run`) at batch size 1, else in batches
        (`run_batch`); prompt (or batch start) i samples with seed ``seed + i``."""
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: a batch holds at least 1 prompt")
        if batch_size == 1:
            return [self.run(ids, max_new_tokens, eos_token_id, index) for index, ids in enumerate(prompts)]
        return [result for start in range(0, len(prompts), batch_size)
                for result in self.run_batch(prompts[start:start + batch_size], max_new_tokens, eos_token_id, start)]

    @torch.no_grad()
    def run_batch(self, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id: int | None,
                  index: int = 0) -> list[GenerationResult]:
        """One left-padded batch. A row's result carries its share of the batch's seconds and
        forward calls (the engine's count, or the batch's ``forward_calls`` in its extras), so a pass's sums are the batches' totals (tokens over seconds is the
        throughput), and as ``latency`` the batch's whole time, what each prompt waited. A row
        ends at its first end-of-sequence token, as it would alone."""
        if not self.batches:
            raise Unsupported(f"{self.name} decodes one prompt at a time (upstream generate refuses batches here)")
        ids, mask, pad = left_padded(prompts, eos_token_id, self.device)
        (sequences, extras), start, end = self._timed(
            index, lambda: self._generate_batch(ids, mask, pad, max_new_tokens, eos_token_id))
        share = len(prompts)
        return [GenerationResult(until_eos(row, eos_token_id), (end - start) / share,
                                 extra.pop("forward_calls", self.counter.calls) / share, latency=end - start, **extra)
                for row, extra in zip(sequences[:, ids.shape[1]:].tolist(), extras)]

    def _generate(self, prompt_ids, max_new_tokens, eos_token_id):
        mask = torch.ones_like(prompt_ids)
        return self._generate_batch(prompt_ids, mask, eos_token_id, max_new_tokens, eos_token_id)[0], {}

    def _generate_batch(self, ids, mask, pad, max_new_tokens, eos_token_id):
        """Plain `generate` over the rows: (sequences, one dict of extra figures per row)."""
        sequences = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad,
            **self.decoding(), **plain_decoding(self.model), **self.generate_kwargs(),
        )
        return sequences, [{} for _ in range(ids.shape[0])]

    def generate_kwargs(self) -> dict:
        return {}

    def use_batch_size(self, batch_size: int) -> None:
        """Settle what depends on the batch size before a batch of that size is timed."""


def left_padded(prompts: list[torch.Tensor], eos_token_id: int | None, device: torch.device):
    """(ids, attention mask, pad id) of ``prompts`` (each (1, length)) left-padded to the
    longest, padded with EOS (or 0 without one), on ``device``."""
    width = max(p.shape[1] for p in prompts)
    pad = eos_token_id if eos_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1]:] = prompt[0]
        mask[row, width - prompt.shape[1]:] = 1
    return ids.to(device), mask.to(device), pad


def until_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    """``tokens`` up to and including the first ``eos_token_id`` (a finished batch row is
    padded after it)."""
    if eos_token_id is None or eos_token_id not in tokens:
        return tokens
    return tokens[:tokens.index(eos_token_id) + 1]


class NaiveEngine(Engine):
    """Upstream `generate`, fp32: the reference (at batch B, upstream batched greedy)."""

    name = "naive"
    precision = "fp32"


class NoCacheEngine(Engine):
    """What the KV cache buys: each step runs the whole sequence again."""

    name = "no_cache"
    backend = "eager, no KV cache"
    precision = "fp32"

    def generate_kwargs(self):
        return {"use_cache": False}


class HalfEngine(Engine):
    name = "half"
    precision = "half"


class FlashAttention2Engine(Engine):
    """Upstream GPT-Neo with flash-attn 2 when it is installed (CUDA); otherwise our model
    with SDPA, whose flash kernel runs on causal prefill. Upstream's flash path ignores the
    local window (it passes no window to flash-attn), so its output may differ from `naive`: the result
    row names the backend that ran."""

    name = "flash_attention2"

    def _load(self, checkpoint):
        if self.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
            self.backend = "upstream flash_attention_2"
            return load_upstream(checkpoint, "flash_attention_2")
        self.backend = "spec-stream sdpa (flash-attn not installed)"
        return GPTNeoForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa")


class PromptLookupEngine(Engine):
    name = "prompt_lookup"
    backend = "upstream prompt lookup"
    settings = ("lookup_tokens",)
    batches = False  # upstream: "assisted generate is only supported for batch_size = 1"

    def __init__(self, *args, lookup_tokens: int = PROMPT_LOOKUP_TOKENS, **kwargs):
        super().__init__(*args, **kwargs)
        self.lookup_tokens = lookup_tokens

    def generate_kwargs(self):
        return {"prompt_lookup_num_tokens": self.lookup_tokens}


class AssistedEngine(Engine):
    name = "assisted"
    backend = "upstream assisted generation"
    settings = ("draft_model",)
    batches = False

    def __init__(self, *args, draft_model: str | None = None, **kwargs):
        if not draft_model:
            raise UserError("the assisted engine needs a small GPT-Neo draft model: pass --draft-model PATH_OR_ID")
        super().__init__(*args, **kwargs)
        self.assistant = self._load(draft_model).to(device=self.device, dtype=self.dtype).eval()

    def generate_kwargs(self):
        return {"assistant_model": self.assistant}


class StaticCacheLocalAttention(GPTNeoSelfAttention):
    """Upstream GPT-Neo's eager attention with a local layer's window ending at the query's
    own slot. Upstream's `_attn` cuts its causal buffer as if the keys ended at the query
    (``bias[:, :, key_length - query_length:key_length, :key_length]``): true of a dynamic
    cache, not of a static one, whose ``max_cache_len`` slots run past the sequence, so a
    local layer's window lands at the end of the cache. Global layers are unharmed (the 4D
    mask `generate` builds for a static cache carries causality), but local layers go wrong
    once the cache is longer than ``window_size``: on DialogSum's first 8 test prompts (64 new
    tokens, `small` checkpoint, window 256) upstream's static cache changed 3 outputs at its
    default size and 4 at 2,048 slots (transformers 5.24; GPT-Neo says
    ``_can_compile_fullgraph = False  # TODO: needs a hybrid cache``). Here the query's slot
    is the last key its 4D mask lets it see (always itself; a left-padding query sees none
    and is attended by none), and scores, mask values and softmax are upstream's. Without a
    mask (no cache, or a dynamic cache without padding) upstream's slice is right and runs."""

    def _attn(self, query, key, value, attention_mask=None):
        if attention_mask is None:
            return super()._attn(query, key, value, attention_mask)
        query, key = query.to(torch.float32), key.to(torch.float32)  # as upstream: scores in fp32
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        slots = torch.arange(key.size(-2), device=key.device)
        own = torch.where(attention_mask == 0, slots, 0).amax(-1, keepdim=True)  # the query's slot
        window = (slots <= own) & (slots > own - self.config.window_size)
        mask_value = torch.tensor(torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype,
                                  device=attn_weights.device)
        attn_weights = torch.where(window, attn_weights, mask_value) + attention_mask
        attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1).to(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value), attn_weights


def place_local_windows(model):
    """``model`` (upstream GPT-Neo, eager) with every local layer's attention a
    `StaticCacheLocalAttention`, in place; a UserError if upstream's layout moved."""
    layers = [block.attn.attention for block in getattr(getattr(model, "transformer", None), "h", [])]
    local = [a for a in layers if type(a) is GPTNeoSelfAttention and a.attention_type == "local"]
    if len(local) != list(model.config.attention_layers).count("local"):
        raise UserError(f"the compiled engine expects upstream GPT-Neo's eager attention at transformer.h[i].attn."
                        f"attention (transformers {transformers.__version__} moved it); spec-stream is tested with "
                        f"the versions in requirements.txt")
    for attention in local:
        attention.__class__ = StaticCacheLocalAttention
    return model


@functools.lru_cache(maxsize=None)
def compile_unavailable(device_type: str) -> str | None:
    """Why torch.compile's inductor cannot compile for ``device_type`` here, or None (what it
    would fail on at the first call: dynamo itself, inductor's C++ compiler on a CPU, triton
    on a GPU)."""
    if not torch._dynamo.is_dynamo_supported():
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        return f"torch.compile does not support Python {python} in torch {torch.__version__}"
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()  # inductor's own search: $CXX, else g++
        except ImportError:
            return None  # moved in this torch: the first compile will tell
        except Exception:
            return "torch.compile's inductor needs a C++ compiler on a CPU and found none (install g++ or set CXX)"
    elif device_type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            return "torch.compile's inductor needs triton on a GPU and it is not installed (pip install triton)"
    return None


class CompiledEngine(Engine):
    """transformers' own fast path: upstream GPT-Neo (local layers fixed for a static cache),
    `generate` with a static KV cache and the decoding step compiled by transformers'
    auto-compile, dynamic shapes (see the module docstring). Each batch size is warmed up
    once, untimed, before its first call (`warm_up`); ``compile_seconds`` keeps the seconds
    it took (also in the description; near 0 for a batch size whose graph was already made).
    fp32 on the CPU like `naive` (exact: it must reproduce naive), half precision on a GPU."""

    name = "compiled"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile_config = CompileConfig(fullgraph=True, dynamic=True)
        self.compile_config._compile_all_devices = True  # transformers' switch for compiling on a CPU
        self.compile_seconds: dict[int, float] = {}  # batch size -> seconds of its untimed compile
        self.failure: str | None = None
        self._describe()

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        reason = compile_unavailable(device.type)
        return f"the compiled engine cannot run: {reason}" if reason else None

    def _load(self, checkpoint):
        return place_local_windows(load_upstream(checkpoint, "eager"))

    def _forward_counter(self) -> ForwardCounter:
        return GenerateStepCounter(self.model)

    def _describe(self) -> None:
        compiled = ", ".join(f"batch {size} {seconds:.1f} s" for size, seconds in sorted(self.compile_seconds.items()))
        self.backend = (f"upstream eager, static cache, torch.compile inductor (fullgraph, dynamic shapes); "
                        f"compile: {compiled or 'not yet'}")

    def generate_kwargs(self) -> dict:
        return {"cache_implementation": "static", "compile_config": self.compile_config}

    def use_batch_size(self, batch_size: int) -> None:
        self.warm_up(batch_size)

    @torch.no_grad()
    def warm_up(self, batch_size: int) -> None:
        """Compile the decoding step for batches of ``batch_size``, once: a 2-token
        `generate` of a dummy prompt (the prefill stays eager, so its length does not
        matter), timed into ``compile_seconds``. A failure makes the engine `Unsupported`
        (one line, no traceback), and stays: nothing falls back to eager under this name."""
        if batch_size in self.compile_seconds:
            return
        if self.failure:
            raise Unsupported(self.failure)
        ids = torch.ones((batch_size, 8), dtype=torch.long, device=self.device)
        synchronize(self.device)
        start = time.perf_counter()
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # never eager in disguise
                self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                                    do_sample=False, pad_token_id=0, **self.generate_kwargs())
            synchronize(self.device)
        except Exception as error:  # whatever inductor or dynamo raised: its root cause in one line
            while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
                error = inner  # dynamo wraps a backend's error (BackendCompilerFailed)
            first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
            self.failure = (f"{self.name}: torch.compile failed at batch {batch_size} ({type(error).__name__}: "
                            f"{first_line[:200]})")
            raise Unsupported(self.failure) from None
        self.compile_seconds[batch_size] = time.perf_counter() - start
        self._describe()

    def run(self, prompt_ids, max_new_tokens, eos_token_id, index=0):
        self.warm_up(1)  # before the timed region
        return super().run(prompt_ids, max_new_tokens, eos_token_id, index)

    def run_batch(self, prompts, max_new_tokens, eos_token_id, index=0):
        self.warm_up(len(prompts))  # a batch size of its own (a last, shorter batch too): compiled untimed
        return super().run_batch(prompts, max_new_tokens, eos_token_id, index)


class SpecStreamEngine(Engine):
    """Our model through ``model.generate(speculative_streaming=True, ...)``, with the
    arguments a user passes (`user_call` names them): on a GPU its step replays as CUDA
    graphs (``cuda_graphs=False``: ``disable_compile=True``, eager); on a CPU it runs compiled
    (``compile_config=CompileConfig()``; ``compile_step``, None: `defaults.COMPILE_STEP_ON_CPU`),
    each new shape compiled by an untimed call before the timed one, else eagerly.
    ``tree_widths=()`` makes it the `static` engine: the same runner and loop, one token per
    forward call. Batches decode greedily; sampling and the lookup branch take one prompt at
    a time, so such a batch is `Unsupported`."""

    name = "spec_stream"
    settings = ("tree_widths", "cuda_graphs", "lookup_branch", "compile_step")
    weights_note = ""  # what the backend adds about the weights (the int8 engine's)

    def __init__(self, *args, tree_widths=BENCHMARK_TREE_WIDTHS, cuda_graphs: bool = True, lookup_branch: int = 0,
                 compile_step: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        compile_step = defaults.COMPILE_STEP_ON_CPU if compile_step is None else compile_step
        if self.device.type == "cuda":
            self.mode = CUDA_GRAPHS if cuda_graphs else EAGER
        else:
            self.mode = COMPILED if compile_step and compile_unavailable("cpu") is None else EAGER
        # "auto": generate chooses per request, from the checkpoint's measured acceptance and this
        # device's probed step latencies at the request's batch size, prompt length and new tokens
        self.tree_request = tree_widths  # a TreeSpec, widths or "auto", passed to every generate call
        self.lookup_branch = lookup_branch  # prompt-lookup nodes beside the streams' (0: none)
        self.warmed: set[tuple] = set()  # (batch, cache bucket, tree) already compiled
        self.trees_used: Counter = Counter()  # the tree of each timed call since `use_batch_size`
        start = time.perf_counter()
        self.tree_widths = self._tree_for(1)  # with "auto", the step probe runs here
        self.setup_seconds = time.perf_counter() - start  # untimed: the probe, then every warm-up call
        self._describe()

    def _forward_counter(self) -> ForwardCounter:
        return LoopCallCounter(self.device)

    def _tree_for(self, batch_size: int, prompt_length: int = PROBE_CONTEXTS[0], new_tokens: int | None = None) -> tuple:
        """The tree ``generate`` resolves for a request of this shape (probed on its runner)."""
        return resolve_tree(self.model, self.tree_request, self.lookup_branch, batch_size, self.mode, prompt_length,
                            new_tokens).widths

    def use_batch_size(self, batch_size: int) -> None:
        """The tree for batches of ``batch_size`` (with "auto": probed at that size; a batch
        this engine refuses keeps the tree it has); the count of trees used starts afresh."""
        if batch_size == 1 or self._batch_refusal(batch_size) is None:
            self.tree_widths = self._tree_for(batch_size)
            self.trees_used.clear()
            self._describe(batch_size)

    def _count_tree(self, widths: tuple) -> None:
        """One more timed call decoded with ``widths``; the engine's tree: the most used."""
        self.trees_used[tuple(widths)] += 1
        self.tree_widths = self.trees_used.most_common(1)[0][0]
        self._describe()

    def _batch_refusal(self, batch_size: int) -> str | None:
        """Why this engine cannot decode a batch of ``batch_size`` > 1, or None."""
        if self.sampling:
            return (f"{self.name}: generate(speculative_streaming=True) refuses a batch of {batch_size} when "
                    "sampling: it samples one prompt at a time")
        if self.lookup_branch:
            return (f"{self.name}: the prompt-lookup branch decodes one prompt at a time; pass --lookup-branch 0 "
                    "to batch the streams alone")
        return None

    def _describe(self, batch_size: int = 1) -> None:
        if len(self.trees_used) > 1:  # "auto" chose per request: each tree with its share of the calls
            total = sum(self.trees_used.values())
            tree = ", trees " + ", ".join(f"{','.join(map(str, w)) or 'none'} {n / total:.0%}"
                                          for w, n in self.trees_used.most_common())
        else:
            tree = f", tree {','.join(map(str, self.tree_widths))}" if self.tree_widths else ", no speculation"
        lookup = f" + lookup {self.lookup_branch}" if self.lookup_branch else ""
        work = {COMPILED: "probe and compiles", CUDA_GRAPHS: "probe and graph captures", EAGER: "probe"}[self.mode]
        setup = f"; {work} {self.setup_seconds:.1f} s, untimed" if self.setup_seconds >= 0.05 else ""
        self.backend = f"{self.user_call()}: {self.mode} steps{tree}{lookup}{self.weights_note}{setup}"

    def user_call(self) -> str:
        """The call a user makes to decode as this engine does."""
        step = {COMPILED: ", compile_config=CompileConfig()", EAGER: ", disable_compile=True"
                if self.device.type == "cuda" else "", CUDA_GRAPHS: ""}[self.mode]
        return f"generate(speculative_streaming=True{step})"

    @torch.no_grad()
    def run(self, prompt_ids, max_new_tokens, eos_token_id, index=0):
        self.warm_up(prompt_ids.shape, max_new_tokens, eos_token_id)
        return super().run(prompt_ids, max_new_tokens, eos_token_id, index)

    @torch.no_grad()
    def run_batch(self, prompts, max_new_tokens, eos_token_id, index=0):
        if (refusal := self._batch_refusal(len(prompts))) is not None:
            raise Unsupported(refusal)
        self.warm_up((len(prompts), max(p.shape[1] for p in prompts)), max_new_tokens, eos_token_id)
        return super().run_batch(prompts, max_new_tokens, eos_token_id, index)

    def warm_up(self, shape, max_new_tokens, eos_token_id) -> None:
        """Compiled steps and CUDA graphs: one untimed call for a batch size, (graphs: prompt
        bucket,) cache bucket and tree not compiled or captured yet, so that none happens
        inside a timed call (its seconds added to ``setup_seconds``)."""
        if self.mode == EAGER:
            return
        batch, width = shape
        prompt_bucket = next(b for b in (*DEFAULT_PREFILL_BUCKETS, width) if b >= width)
        key = (batch, prompt_bucket if self.mode == CUDA_GRAPHS else None,
               next((b for b in DEFAULT_CACHE_BUCKETS if b >= width + max_new_tokens), None),
               self._tree_for(batch, width, max_new_tokens))
        if key not in self.warmed:
            start = time.perf_counter()
            self._speculative_generate(torch.ones(shape, dtype=torch.long, device=self.device), max_new_tokens,
                                       eos_token_id)
            self.setup_seconds += time.perf_counter() - start
            self.warmed.add(key)
            self._describe(batch)

    def _load(self, checkpoint):
        return GPTNeoForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa")

    def sampling_kwargs(self) -> dict:
        """Nothing when greedy (our plain greedy path, no scorer), else the run's sampling."""
        return self.sampling.generate_kwargs() if self.sampling else {}

    def _generate(self, prompt_ids, max_new_tokens, eos_token_id):
        out = self._speculative_generate(prompt_ids, max_new_tokens, eos_token_id, step_timer=self.counter)
        self._count_tree(out.tree_widths)
        extra = dict(self.draft_figures(out.accepted_lengths, out.tree_widths), step_seconds=dict(self.counter.timer.seconds),
                     forward_calls=out.num_forward_calls, accepted_from_lookup=out.lookup_accepted or 0)
        return out.sequences, extra

    def _generate_batch(self, ids, mask, pad, max_new_tokens, eos_token_id):
        out = self._speculative_generate(ids, max_new_tokens, eos_token_id, attention_mask=mask, pad_token_id=pad)
        self._count_tree(out.tree_widths)
        return out.sequences, [dict(self.draft_figures(steps, out.tree_widths), forward_calls=out.num_forward_calls)  # the batch's
                               for steps in accepted_lengths_per_row(out, ids.shape[0])]

    def _speculative_generate(self, ids, max_new_tokens, eos_token_id, **kwargs):
        lookup = {"prompt_lookup_num_tokens": self.lookup_branch} if self.lookup_branch else {}
        step = {COMPILED: {"compile_config": CompileConfig()}, EAGER: {"disable_compile": True}, CUDA_GRAPHS: {}}
        return self.model.generate(ids, speculative_streaming=True, tree_widths=self.tree_request,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   return_dict_in_generate=True, **step[self.mode], **lookup, **self.sampling_kwargs(),
                                   **kwargs)

    def draft_figures(self, accepted_lengths: list[int], tree_widths: tuple) -> dict:
        """Draft positions offered (the depth of the call's tree, streams' or lookup's, per
        step) and drafts accepted, from the tokens each step gained (accepted drafts + 1)."""
        depth = max(len(tree_widths), self.lookup_branch)
        return dict(drafted=depth * len(accepted_lengths), accepted=sum(n - 1 for n in accepted_lengths))


def accepted_lengths_per_row(out, rows: int) -> list[list[int]]:
    """Each row's tokens gained per step: ``accepted_lengths`` holds one list per row for a
    batch, the single row's list at batch 1."""
    return out.accepted_lengths if rows > 1 else [out.accepted_lengths]


class StaticEngine(SpecStreamEngine):
    name = "static"
    settings = ("cuda_graphs",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, tree_widths=(), **kwargs)


class Int8Mixin:
    """The engine's model with every linear layer in int8 (`quantize_int8`); CPU only
    (`torch._int_mm` on a GPU wants more than 16 rows and widths divisible by 8)."""

    devices = ("cpu",)
    precision = "fp32"
    quantization = "int8"

    def _load(self, checkpoint):
        return quantize_int8(super()._load(checkpoint))


class Int8Engine(Int8Mixin, Engine):
    name = "int8"
    backend = "eager, int8 linear layers (per-token activations)"


class SpecStreamInt8Engine(Int8Mixin, SpecStreamEngine):
    name = "spec_stream_int8"
    settings = ("tree_widths",)
    weights_note = ", int8 linear layers (per-token activations)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, cuda_graphs=False, compile_step=False, **kwargs)


ENGINES = {cls.name: cls for cls in (
    NaiveEngine, NoCacheEngine, HalfEngine, Int8Engine, CompiledEngine, FlashAttention2Engine, PromptLookupEngine,
    AssistedEngine, StaticEngine, SpecStreamEngine, SpecStreamInt8Engine)}
ENGINE_NAMES = tuple(ENGINES)
ENGINE_SETTINGS = frozenset(setting for cls in ENGINES.values() for setting in cls.settings)


def build_engine(name: str, checkpoint: str, device: torch.device, half_dtype: torch.dtype = torch.float16,
                 sampling: Sampling | None = None, **settings) -> Engine:
    """The engine ``name`` on ``checkpoint``, greedy or with ``sampling``. ``settings`` may
    hold any engine's settings (`ENGINE_SETTINGS`: tree_widths, cuda_graphs, draft_model,
    lookup_tokens, lookup_branch); each engine takes its own and ignores the rest, and None leaves an
    engine's default."""
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)} or all")
    unknown = set(settings) - ENGINE_SETTINGS
    if unknown:
        raise TypeError(f"build_engine got unknown settings {sorted(unknown)}; engines take {sorted(ENGINE_SETTINGS)}")
    engine_class = ENGINES[name]
    if device.type not in engine_class.devices:
        raise UserError(f"the {name} engine runs on {' or '.join(engine_class.devices)} only, not {device.type}; "
                        f"drop it from --model_type or pass --device cpu")
    if (reason := engine_class.unavailable(device)) is not None:
        raise UserError(f"{reason}; drop {name} from --model_type")
    own = {key: value for key, value in settings.items() if key in engine_class.settings and value is not None}
    return engine_class(checkpoint, device=device, dtype=engine_class.dtype_for(device, half_dtype),
                        sampling=sampling, **own)


def engines_for(device: torch.device) -> tuple[str, ...]:
    """The engines that run on ``device`` (what `--model_type all` means there)."""
    return tuple(name for name, cls in ENGINES.items() if device.type in cls.devices)
