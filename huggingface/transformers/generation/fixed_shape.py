"""`TreeStep` on padded shapes: every step of a batch of one shape, replayed or compiled.

At small batches a small model's decode step is bound by kernel launches and Python, not
by the hardware. So, gpt-fast style, the whole step (`tree_step.TreeStep`: drafting,
the forward over the tree, verification, compaction, the next root) runs on device
tensors of one shape per batch size and cache size, against a `FixedShapeKVCache` whose
per-row lengths never leave the device; the host reads one small tensor per step. On a GPU
the step is captured once per shape as a CUDA graph and replayed; on the CPU, with
``compile=True``, `torch.compile` turns it into one compiled function per shape (no
recompiles: the shapes never change), its compile time reported in ``compile_seconds``.
Prefill runs per batch size and prompt-length bucket (each row's prompt from slot 0,
padded at the end; causal masking keeps the padding invisible; it becomes stale slots),
captured or compiled as the step is (compiled: per prompt bucket and cache bucket).

The cache holds ``prompt + max_new_tokens`` rounded up to a bucket (`DEFAULT_CACHE_BUCKETS`;
every forward attends to all of its slots, so a cache sized for the request costs less
than one sized for the context); with CUDA graphs, one bucket: the context.

Differences from the exact-shape path (`tree_step.DynamicTreeSteps`), all for fixed shapes:
- the tree is always the full tree; near ``max_new_tokens`` or the end of the context the
  surplus drafts are computed and then ignored (positions past the context are clamped);
- no tree pruning (it changes the number of nodes), and only the settings that choose a
  token from its node's logits alone (`request.FIXED_SHAPE_FIELDS`);
- finished rows stay in the batch (their length held at the cache's limit) and the host
  ignores their tokens.
``tree_widths=()`` gives plain one-token-per-call decoding (the `static` engine).
Sampling (batch 1) draws its uniforms on the host, exactly as the exact-shape path draws
them, so one seed gives one output on both.
"""
from __future__ import annotations

import time
import types
from dataclasses import dataclass

import torch
from transformers.utils import logging

from ..cache_utils import FixedShapeKVCache
from .request import DecodeOptions, check_batch_features, fixed_shape_scorer
from .tree_search import resolve_tree
from .tree_step import DecodeState, TreeStep, lookup_tensor, no_timer
from .speculative_tree import uniforms_shape
from .utils import SpeculativeStreamingOutput, decode

logger = logging.get_logger(__name__)

DEFAULT_PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_CACHE_BUCKETS = (256, 512, 1024, 2048)
COMPILED_SHAPES = 64  # compiled variants of the step kept at once (see `FixedShapeDecoder`)
# On the CPU, inductor's C++ wrapper calls the step's 40-80 kernels from C++ rather than from
# generated Python: 0.2-0.45 ms less per step (2-core Xeon, small model, one process, A/B
# alternating: () 1.39 -> 1.21 ms, (1,) 2.61 -> 2.14, (1,1,1) 3.64 -> 3.17), same cold compile
# time (~25 s per shape). Other inductor options gained nothing measurable there (README).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}


@dataclass
class BatchState(DecodeState):
    """A `DecodeState` with the static inputs of one batch size and cache size (graphs and
    compiled steps read these addresses on every call)."""

    prompt: torch.Tensor | None = None  # (B, context): each row's prompt from slot 0
    prompt_length: torch.Tensor | None = None  # (B,)

    @classmethod
    def create(cls, model, batch: int, slots: int, streams: int, tree_size: int) -> "BatchState":
        config, device = model.config, model.device
        return cls(
            cache=FixedShapeKVCache(config, batch, slots, device, model.dtype),
            root=torch.zeros(batch, dtype=torch.long, device=device),
            root_streams=torch.zeros(batch, streams, config.hidden_size, dtype=model.dtype, device=device)
            if streams else None,
            length_limit=min(config.max_position_embeddings, slots - tree_size),
            prompt=torch.zeros(batch, config.max_position_embeddings, dtype=torch.long, device=device),
            prompt_length=torch.ones(batch, dtype=torch.long, device=device),
        )


class FixedShapeDecoder:
    """Reusable decoder for one model and one tree (``tree_widths``: widths, a `TreeSpec`
    or "auto", resolved now): buffers, caches and (on a GPU) CUDA graphs or (``compile``)
    compiled steps are made once per shape, then `generate` serves any batch of prompts of
    that size that fits the context. Greedy unless ``generation_config`` or keyword settings
    (``do_sample=True, temperature=0.7, top_k=20, ...``) are given; these combine with the
    model's generation config exactly as in ``generate(speculative_streaming=True, ...)``.
    Sampling and the lookup branch: batch 1."""

    def __init__(self, model, tree_widths, cuda_graphs: bool | None = None,
                 prefill_buckets=DEFAULT_PREFILL_BUCKETS, lookup_length: int = 0, generation_config=None,
                 compile: bool = False, cache_buckets=DEFAULT_CACHE_BUCKETS, **sampling):
        config = model.config
        self.model, self.device = model, model.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device; pass cuda_graphs=False on the CPU.")
        if compile and self.cuda_graphs:
            raise ValueError("compile=True and CUDA graphs are two ways to run the step; pass cuda_graphs=False.")
        self.spec = resolve_tree(model, tree_widths, lookup_length)
        self.tree = self.spec.buffers(self.device)
        self.lookup_length = lookup_length
        given = generation_config is not None or sampling
        scorer = fixed_shape_scorer(model, generation_config, **sampling) if given else None
        self.one_step = TreeStep(model, len(self.spec.widths), scorer)
        self.draw_shape = uniforms_shape(self.tree) if scorer is not None and scorer.do_sample else None
        self.needs_text, self.recorded = False, None  # token choice from the logits alone; no output_scores
        self.context = config.max_position_embeddings
        self.buckets = sorted({min(b, self.context) for b in prefill_buckets} | {self.context})
        self.cache_buckets = [self.context] if self.cuda_graphs else \
            sorted({min(b, self.context) for b in cache_buckets} | {self.context})
        self.states: dict[tuple, BatchState] = {}  # by (batch size, cache bucket)
        self.state: BatchState | None = None  # the batch being decoded (set by each prefill)
        # static inputs of batch-1 features: graphs read these addresses on every replay
        self.lookup = torch.zeros(lookup_length, dtype=torch.long, device=self.device)  # lookup branch drafts
        self.lookup_count = torch.zeros((), dtype=torch.long, device=self.device)  # of which real (not filler)
        self.uniforms = torch.zeros(self.draw_shape or (1, 1), device=self.device)  # sampling's draws for a step
        self.first_uniform = torch.zeros((), device=self.device)  # and for the prefill's token
        self.graphs: dict = {}
        self.compiled_step = self.compiled_prefill = None
        if compile:
            # one compiled variant per batch size and cache bucket: raise torch's default
            # limit of 8 (per code object), past which it would run eagerly
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
            options = CPU_COMPILE_OPTIONS if self.device.type == "cpu" else None
            self.compiled_step = torch.compile(with_own_code(self._step), dynamic=False, options=options)
            self.compiled_prefill = torch.compile(with_own_code(self._prefill), dynamic=False, options=options)
        self.compile_seconds: dict[tuple, float] = {}  # first call per shape (`_compiled`): compile + one call

    def _state(self, batch: int, slots: int) -> BatchState:
        if (batch, slots) not in self.states:
            self.states[batch, slots] = BatchState.create(self.model, batch, slots + self.tree.size,
                                                          self.one_step.num_streams, self.tree.size)
        return self.states[batch, slots]

    # -- the two fixed-shape functions ---------------------------------------------------
    def _prefill(self, bucket: int) -> torch.Tensor:
        """Prompts (each padded to ``bucket``) into the cache; returns each row's first new
        token (B,)."""
        state = self.state
        state.cache.length.zero_()
        uniform = self.first_uniform if self.draw_shape else None
        return self.one_step.prefill(state, state.prompt[:, :bucket], state.prompt_length, uniform=uniform)

    def _step(self) -> torch.Tensor:
        """One step for every row; returns its summary (`utils.TreeDecodingSteps`)."""
        uniforms = self.uniforms if self.draw_shape else None
        return self.one_step.step(self.state, self.tree, self.lookup, self.lookup_count, uniforms=uniforms)

    # -- what `utils.decode` calls ---------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int, text=None, uniforms=None,
                prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        batch, width = input_ids.shape
        if uniforms is not None:
            self.first_uniform.copy_(uniforms)
        bucket = self._bucket(width)  # the prompt's padded width, which the cache must hold too
        self.state = self._state(batch, self._cache_bucket(max(width + max_new_tokens, bucket)))
        key = ("step", batch, self.state.cache.max_length)
        if self.cuda_graphs and key not in self.graphs:
            self.graphs[key] = self._capture(self._step)  # before the prefill that resets its warm-up
        self.state.prompt[:, :width].copy_(input_ids)
        if prompt_lengths is None:
            self.state.prompt_length.fill_(width)
        else:
            self.state.prompt_length.copy_(prompt_lengths)
        if self.compiled_prefill is None:
            return self._run(("prefill", batch, bucket), lambda: self._prefill(bucket))
        return self._compiled(("prefill", batch, bucket, self.state.cache.max_length),
                              lambda: self.compiled_prefill(bucket), lambda: self._prefill(bucket))

    def step(self, remaining: int, timer, lookup: list[int] = (), text=None, uniforms=None) -> torch.Tensor:
        """The full tree whatever ``remaining`` is: surplus drafts are computed and ignored."""
        with timer("step"):
            if self.lookup_length:
                self.lookup.copy_(lookup_tensor(list(lookup), self.lookup_length, 0, self.device))
                self.lookup_count.fill_(len(lookup))
            if uniforms is not None:
                self.uniforms.copy_(uniforms)
            key = ("step", len(self.state.root), self.state.cache.max_length)
            if self.compiled_step is None:
                return self._run(key, self._step)
            return self._compiled(key, self.compiled_step, self._step)

    def keep_rows(self, indices: list[int]) -> bool:
        """Fixed shapes: every row keeps running (`_step`); the host ignores finished ones."""
        return False

    def _compiled(self, key, compiled, eager) -> torch.Tensor:
        """``compiled()``, the compiled step or prefill of shape ``key``; the first call per
        shape compiles it (timed in ``compile_seconds``). If compiling fails (no C++ compiler
        for inductor, an unsupported op), ``eager()`` runs instead, and both functions run
        eagerly from then on, with one warning: same tokens, the eager speed."""
        if key in self.compile_seconds:
            return compiled()
        start = time.perf_counter()
        try:
            result = compiled()
        except Exception as error:  # compilation happens before the function touches any state
            logger.warning(f"torch.compile of the decoder's {key[0]} failed ({type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                           "running it eagerly instead.")
            self.compiled_step = self.compiled_prefill = None
            return eager()
        self.compile_seconds[key] = time.perf_counter() - start
        return result

    # -- CUDA graphs ----------------------------------------------------------------------
    def _capture(self, function):
        """Warm up on a side stream (lazy initialisation stays out of the graph), then
        record one call. Warm-up runs change the cache and the state; every `generate`
        starts with a prefill, which resets both."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                function()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = function()
        return graph, output

    def _run(self, key, function):
        if not self.cuda_graphs:
            return function()
        if key not in self.graphs:
            self.graphs[key] = self._capture(function)
        graph, output = self.graphs[key]
        graph.replay()
        return output

    @torch.inference_mode()  # as `utils.decode` runs the steps it captures
    def capture(self, max_prompt_length: int | None = None, batch_size: int = 1) -> None:
        """Capture the step and the prefill buckets up to ``max_prompt_length`` for
        ``batch_size`` now, so that no capture happens inside a timed `generate`. No-op
        without CUDA graphs."""
        if not self.cuda_graphs:
            return
        self.state = self._state(batch_size, self.cache_buckets[-1])
        self._run(("step", batch_size, self.state.cache.max_length), self._step)
        largest = self.buckets.index(self._bucket(max_prompt_length or self.context))
        for bucket in self.buckets[: largest + 1]:
            self._run(("prefill", batch_size, bucket), lambda: self._prefill(bucket))

    @torch.inference_mode()
    def prepare(self, prompt_lengths, max_new_tokens: int, batch_size: int = 1) -> None:
        """Compile (``compile=True``) the prefill and the step for every prompt bucket and cache
        bucket that prompts of ``prompt_lengths`` tokens and ``max_new_tokens`` new ones will
        use and that is not compiled yet, now, so that no compile happens inside a timed
        `generate` (one prefill and one step of filler tokens per pair of buckets; every
        `generate` starts with a prefill, which resets the cache). No-op for eager steps; CUDA
        graphs: `capture`."""
        if self.compiled_step is None:
            return
        shapes = {(self._bucket(n), self._cache_bucket(max(n + max_new_tokens, self._bucket(n)))): n
                  for n in prompt_lengths}
        for (bucket, cache_bucket), length in shapes.items():
            slots = self._state(batch_size, cache_bucket).cache.max_length
            if {("prefill", batch_size, bucket, slots), ("step", batch_size, slots)} - set(self.compile_seconds):
                self.prefill(torch.ones(batch_size, length, dtype=torch.long, device=self.device), max_new_tokens)
                self.step(max_new_tokens, no_timer)

    def _bucket(self, prompt_length: int) -> int:
        return next(b for b in self.buckets if b >= prompt_length)

    def _cache_bucket(self, tokens: int) -> int:
        return next((b for b in self.cache_buckets if b >= tokens), self.cache_buckets[-1])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids=(), streamer=None,
                 timer=None, generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 pad_token_id: int | None = None) -> SpeculativeStreamingOutput:
        """Decoding of a prompt (1, P) or a batch (B, P) (left padding marked by
        ``attention_mask``; rows that end early are right-padded with ``pad_token_id``);
        same output as the dynamic path (when sampling, batch 1: for the same ``generator``
        state, or global seed when None)."""
        check_batch_features(len(input_ids), {"do_sample=True": self.draw_shape is not None,
                                              "a lookup branch (lookup_length)": self.lookup_length,
                                              "a streamer": streamer is not None})
        return decode(self, self.model.config, input_ids, max_new_tokens, eos_token_ids, streamer, timer,
                      options=DecodeOptions(generator=generator, pad_token_id=pad_token_id),
                      attention_mask=attention_mask)


def with_own_code(method):
    """The bound ``method`` with a code object of its own. Dynamo keeps the graphs compiled
    from one code object in one list and checks their guards in turn on every call, so the
    steps of every decoder in the process, all compiled from `FixedShapeDecoder._step`, would
    slow each other down (2-core Xeon, small model: a compiled () step went from 1.32 to 1.75
    ms once six other trees had been compiled, as `tree_search.resolve_tree`'s probe does) and
    outlive their decoders. With a copy per decoder, its graphs go when it goes."""
    function = method.__func__
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return types.MethodType(copy, method.__self__)


def compiled_steps(model, tree) -> FixedShapeDecoder:
    """The compiled fixed-shape steps of ``tree`` (greedy, CPU): what `tree_search.resolve_tree`
    probes (``runner=compiled_steps``) to size an "auto" tree for this way of running the step.
    Its prefill stays eager: the probe times steps alone, and a compiled prefill per probed tree
    took the probe from 10 to 23 s (100 s cold)."""
    decoder = FixedShapeDecoder(model, tree, cuda_graphs=False, compile=True)
    decoder.compiled_prefill = None
    return decoder
