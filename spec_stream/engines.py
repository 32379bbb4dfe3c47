"""Decoding engines the benchmark compares, all batch 1 and greedy.

Every engine turns a prompt (token ids) into new tokens and reports the forward calls it
made; `Engine.run` times it honestly (device synchronised before and after). They differ
only in how they build the model and which `generate` they call:

| engine            | model                               | decoding                                   |
|-------------------|-------------------------------------|--------------------------------------------|
| naive             | upstream GPT-Neo, fp32              | upstream greedy `generate`                 |
| half              | upstream GPT-Neo, fp16 (or bf16)    | upstream greedy `generate`                 |
| flash_attention2  | upstream + flash-attn, else ours SDPA, fp16 | upstream greedy `generate`         |
| prompt_lookup     | upstream GPT-Neo                    | `generate(prompt_lookup_num_tokens=...)`   |
| assisted          | upstream GPT-Neo + draft GPT-Neo    | `generate(assistant_model=...)`            |
| static            | ours, static KV cache               | our loop with an empty tree (1 token/call) |
| spec_stream       | ours, static KV cache               | tree drafts, `speculative_streaming=True`  |

On a GPU `static` and `spec_stream` replay each decode step as a CUDA graph
(`FixedShapeDecoder`) unless ``cuda_graphs=False``.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field

import torch
import transformers

from spec_stream import FixedShapeDecoder, GPTNeoForCausalLM
from spec_stream.errors import UserError
from spec_stream.timing import StepTimer, synchronize

ENGINE_NAMES = ("naive", "half", "flash_attention2", "prompt_lookup", "assisted", "static", "spec_stream")


@dataclass
class GenerationResult:
    new_tokens: list[int]
    seconds: float
    forward_calls: int
    drafted: int = 0  # draft tokens the verifier could have accepted (tree depth per step)
    accepted: int = 0  # draft tokens it did accept
    step_seconds: dict[str, float] = field(default_factory=dict)


def load_upstream(checkpoint: str, attn_implementation: str):
    """transformers' own GPT-Neo. It ignores our stream parameters by design, so its load
    report (a warning listing them as unexpected) is silenced."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.GPTNeoForCausalLM.from_pretrained(checkpoint, attn_implementation=attn_implementation)
    finally:
        transformers.logging.set_verbosity(verbosity)


class ForwardCounter:
    """Counts forward calls of a module with a pre-hook. Hooked on the model's
    ``transformer`` (the decoder stack), it counts upstream `generate` loops, which go
    through ``model.forward``, and our loop, which calls the decoder directly, alike."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


class Engine:
    """Base: subclasses set ``model`` and implement `_generate`."""

    name = "engine"
    backend = "eager"

    def __init__(self, checkpoint: str, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.checkpoint = device, dtype, checkpoint
        self.model = self._load(checkpoint).to(device=device, dtype=dtype).eval()
        self.counter = ForwardCounter(self.model.transformer)

    def _load(self, checkpoint: str):
        return load_upstream(checkpoint, "eager")

    @property
    def description(self) -> str:
        return f"{self.backend}, {str(self.dtype).removeprefix('torch.')}"

    @torch.no_grad()
    def run(self, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> GenerationResult:
        prompt_ids = prompt_ids.to(self.device)
        self.counter.calls = 0
        synchronize(self.device)
        start = time.perf_counter()
        sequences, extra = self._generate(prompt_ids, max_new_tokens, eos_token_id)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        new_tokens = sequences[0, prompt_ids.shape[1]:].tolist()
        extra.setdefault("forward_calls", self.counter.calls)  # CUDA-graph replays bypass hooks
        return GenerationResult(new_tokens, seconds, **extra)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the target model's weights: what each forward call reads at least."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _generate(self, prompt_ids, max_new_tokens, eos_token_id):
        sequences = self.model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=eos_token_id, **self.generate_kwargs(),
        )
        return sequences, {}

    def generate_kwargs(self) -> dict:
        return {}


class NaiveEngine(Engine):
    name = "naive"


class HalfEngine(Engine):
    name = "half"


class FlashAttention2Engine(Engine):
    """Upstream GPT-Neo with flash-attn 2 when it is installed (CUDA); otherwise our model
    with SDPA, whose flash kernel runs on causal prefill. Upstream's flash path ignores the
    local window (see SPEC_STREAM.md), so its output may differ from `naive`: the result
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

    def __init__(self, *args, lookup_tokens: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.lookup_tokens = lookup_tokens

    def generate_kwargs(self):
        return {"prompt_lookup_num_tokens": self.lookup_tokens}


class AssistedEngine(Engine):
    name = "assisted"
    backend = "upstream assisted generation"

    def __init__(self, *args, draft_model: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.assistant = self._load(draft_model).to(device=self.device, dtype=self.dtype).eval()

    def generate_kwargs(self):
        return {"assistant_model": self.assistant}


class SpecStreamEngine(Engine):
    """Our model and loop. ``tree_widths=()`` makes it the `static` engine: the same
    preallocated cache and loop, one token per forward call. With ``cuda_graphs`` (the
    default on a GPU) each step is one replayed CUDA graph (`FixedShapeDecoder`);
    otherwise the dynamic loop of ``generate(speculative_streaming=True)`` runs."""

    name = "spec_stream"

    def __init__(self, *args, tree_widths=(4, 3, 2), cuda_graphs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree_widths = tuple(tree_widths)
        self.decoder = None
        if cuda_graphs and self.device.type == "cuda":
            self.decoder = FixedShapeDecoder(self.model, self.tree_widths, cuda_graphs=True)
            self.decoder.capture()  # every graph now, none inside a timed call
        steps = "CUDA graphs" if self.decoder else "eager steps"
        self.backend = f"spec-stream sdpa, static cache, {steps}" + ("" if self.tree_widths else ", no speculation")

    def _load(self, checkpoint):
        return GPTNeoForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa")

    def _generate(self, prompt_ids, max_new_tokens, eos_token_id):
        timer = StepTimer(self.device)
        if self.decoder is not None:
            eos = set() if eos_token_id is None else {eos_token_id}
            out = self.decoder.generate(prompt_ids, max_new_tokens, eos, timer=timer)
        else:
            out = self.model.generate(
                prompt_ids, speculative_streaming=True, tree_widths=self.tree_widths,
                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, return_dict_in_generate=True,
                step_timer=timer,
            )
        depth = len(self.tree_widths)
        steps = out.accepted_lengths
        extra = dict(drafted=depth * len(steps), accepted=sum(n - 1 for n in steps),
                     step_seconds=dict(timer.seconds), forward_calls=out.num_forward_calls)
        return out.sequences, extra


class StaticEngine(SpecStreamEngine):
    name = "static"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, tree_widths=(), **kwargs)


ENGINES = {cls.name: cls for cls in (NaiveEngine, HalfEngine, FlashAttention2Engine, PromptLookupEngine,
                                     AssistedEngine, StaticEngine, SpecStreamEngine)}


def engine_dtype(name: str, device: torch.device, half_dtype: torch.dtype) -> torch.dtype:
    """naive is fp32 by definition; the others run in half precision on a GPU. On the CPU,
    half precision is slow and spec_stream must match naive token for token, so only
    `half` keeps its half dtype there."""
    if name == "naive":
        return torch.float32
    if name == "half" or device.type == "cuda":
        return half_dtype
    return torch.float32


def build_engine(name: str, checkpoint: str, device: torch.device, half_dtype=torch.float16,
                 draft_model: str | None = None, tree_widths=(4, 3, 2), cuda_graphs: bool = True) -> Engine:
    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)} or all")
    kwargs = dict(device=device, dtype=engine_dtype(name, device, half_dtype))
    if name == "assisted":
        if not draft_model:
            raise UserError("the assisted engine needs a small GPT-Neo draft model: pass --draft-model PATH_OR_ID")
        kwargs["draft_model"] = draft_model
    if name in ("spec_stream", "static"):
        kwargs["cuda_graphs"] = cuda_graphs
    if name == "spec_stream":
        kwargs["tree_widths"] = tree_widths
    return ENGINES[name](checkpoint, **kwargs)
