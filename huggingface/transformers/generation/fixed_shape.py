"""The one way a tree step runs: `tree_step.TreeStep` on padded shapes, eager, compiled or
replayed as a CUDA graph. `generate(speculative_streaming=True)` decodes through it
(`runner_for`), and so does everything that times it.

At small batches a small model's decode step is bound by kernel launches and Python, not by
the hardware. So, gpt-fast style, the whole step (drafting, the forward over the tree,
verification, compaction, the next root) runs on device tensors of one shape per batch size
and cache size, against a `FixedShapeKVCache` whose per-row lengths never leave the device;
the host reads one small tensor per step. Three modes (`step_mode`, transformers' own rule
for when `generate` compiles):
- ``eager``: the step as written; the prompt is prefilled at its own length and the cache
  sized for the request. The CPU default, and the mode for what reads the text on the host
  (logits processors such as ``repetition_penalty``, recorded scores).
- ``compiled``: `torch.compile` per batch size and cache bucket (`DEFAULT_CACHE_BUCKETS`);
  on a CPU when ``generation_config.compile_config`` asks. There the prefill stays eager, at
  the prompt's own length: it runs once per request, a compiled one costs a compile per
  prompt bucket and pads every prompt to it (DialogSum: 42 ms per prompt compiled, padded).
  On a GPU it is compiled per prompt bucket (``compile_prefill``).
- ``cuda_graphs``: captured once per shape and replayed; the GPU default.
``disable_compile=True`` runs eagerly anywhere. The full tree always runs: near
``max_new_tokens`` or the end of the context surplus drafts are computed and ignored
(positions past the context are clamped), and finished rows of a batch keep running (the
host ignores their tokens). Sampling's uniforms are drawn on the host, so one seed gives one
output in every mode.
"""
from __future__ import annotations

import time
import types

import torch
from transformers.utils import logging

from ..models.gpt_neo import packed_linear
from .speculative_tree import TreeSpec, parse_tree, uniforms_shape
from .tree_step import DecodeState, TreeStep, lookup_tensor, no_timer

logger = logging.get_logger(__name__)

EAGER, COMPILED, CUDA_GRAPHS = "eager", "compiled", "cuda_graphs"
DEFAULT_PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_CACHE_BUCKETS = (256, 512, 1024, 2048)
EAGER_CACHE_ROUNDING = 64  # an eager cache is sized for the request, rounded up so that similar requests share it
COMPILED_SHAPES = 64  # compiled variants of a step kept at once (torch's default limit is 8 per code object)
RUNNERS_PER_MODEL = 16  # runners a model keeps (`runner_for`), the oldest dropped first
# On the CPU, inductor's C++ wrapper calls the step's 40-80 kernels from C++ rather than from
# generated Python: 0.2-0.45 ms less per step (2-core Xeon, small model, A/B alternating: ()
# 1.39 -> 1.21 ms, (1,) 2.61 -> 2.14), same cold compile time (~25 s per shape).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}


def step_mode(model, config, scorer=None) -> str:
    """How ``generate`` runs the step for a request: CUDA graphs on a GPU, compiled on a CPU
    when ``config.compile_config`` is set, eager otherwise, and eager whenever
    ``config.disable_compile`` is set or the ``scorer`` reads the text or records scores
    (host work between a step's forward and its verification)."""
    if getattr(config, "disable_compile", False) or (scorer is not None and (scorer.needs_text or scorer.record)):
        return EAGER
    if model.device.type == "cuda":
        return CUDA_GRAPHS
    return COMPILED if getattr(config, "compile_config", None) is not None else EAGER


class FixedShapeDecoder:
    """The prefill and step of one model and one concrete tree (widths or a `TreeSpec`) in
    one ``mode``, for `utils.decode`: caches, graphs and compiled steps are made once per
    shape and reused by every later request. ``use_scorer`` sets what chooses tokens
    (`request.NodeScorer`, None: greedy on the raw logits); a compiled or graphed runner
    keeps the scorer it was first given (`runner_for` keys runners by it)."""

    def __init__(self, model, tree_widths, mode: str = EAGER, lookup_length: int = 0,
                 prefill_buckets=DEFAULT_PREFILL_BUCKETS, cache_buckets=DEFAULT_CACHE_BUCKETS,
                 compile_prefill: bool | None = None):
        if mode not in (EAGER, COMPILED, CUDA_GRAPHS):
            raise ValueError(f"mode={mode!r}: choose {EAGER!r}, {COMPILED!r} or {CUDA_GRAPHS!r}.")
        if mode == CUDA_GRAPHS and model.device.type != "cuda":
            raise ValueError("mode='cuda_graphs' needs the model on a CUDA device; use 'eager' or 'compiled'.")
        config = model.config
        self.model, self.device, self.mode = model, model.device, mode
        self.spec = TreeSpec(parse_tree(tree_widths).widths, lookup_length).check_streams(config.num_spec_streams)
        self.tree = self.spec.buffers(self.device)
        self.lookup_length = lookup_length
        self.one_step = TreeStep(model, len(self.spec.widths))
        packed_linear.prepare(model)
        self.use_scorer(None)
        self.context = config.max_position_embeddings
        self.buckets = sorted({min(b, self.context) for b in prefill_buckets} | {self.context})
        self.cache_buckets = [self.context] if mode == CUDA_GRAPHS else \
            sorted({min(b, self.context) for b in cache_buckets} | {self.context})
        self.states: dict[tuple, DecodeState] = {}  # by (batch size, cache slots)
        self.state: DecodeState | None = None  # the batch being decoded (set by each prefill)
        # static inputs of batch-1 features: graphs read these addresses on every replay
        self.lookup = torch.zeros(lookup_length, dtype=torch.long, device=self.device)  # lookup branch drafts
        self.lookup_count = torch.zeros((), dtype=torch.long, device=self.device)  # of which real (not filler)
        self.uniforms = torch.zeros(uniforms_shape(self.tree), device=self.device)  # sampling's draws for a step
        self.first_uniform = torch.zeros((), device=self.device)  # and for the prefill's token
        self.graphs: dict = {}
        self.compiled_step = self.compiled_prefill = None
        if mode == COMPILED:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
            options = CPU_COMPILE_OPTIONS if self.device.type == "cpu" else None
            self.compiled_step = torch.compile(with_own_code(self._step), dynamic=False, options=options)
            if compile_prefill or compile_prefill is None and self.device.type != "cpu":
                self.compiled_prefill = torch.compile(with_own_code(self._prefill), dynamic=False, options=options)
        self.compile_seconds: dict[tuple, float] = {}  # first call per shape (`_compiled`): compile + one call

    def use_scorer(self, scorer) -> None:
        self.one_step.scorer = scorer
        self.needs_text = scorer is not None and scorer.needs_text
        self.draw_shape = uniforms_shape(self.tree) if scorer is not None and scorer.do_sample else None

    @property
    def recorded(self):
        """(scores, logits) of the last call's emitted nodes with a recording scorer, else None."""
        return self.one_step.recorded

    def _state(self, batch: int, slots: int) -> DecodeState:
        if (batch, slots) not in self.states:
            if len(self.states) >= COMPILED_SHAPES:
                del self.states[next(iter(self.states))]
            self.states[batch, slots] = DecodeState.create(self.model, batch, slots + self.tree.size,
                                                          self.one_step.num_streams, self.tree.size)
        return self.states[batch, slots]

    # -- the two fixed-shape functions ---------------------------------------------------
    def _prefill(self, width: int, text=None) -> torch.Tensor:
        """Prompts (each padded to ``width``) into the cache; returns each row's first new token (B,)."""
        state = self.state
        state.cache.length.zero_()
        uniform = self.first_uniform if self.draw_shape else None
        return self.one_step.prefill(state, state.prompt[:, :width], state.prompt_length, text, uniform)

    def _step(self, text=None, timer=no_timer) -> torch.Tensor:
        """One step for every row; returns its summary (`utils.read_step_summary`)."""
        uniforms = self.uniforms if self.draw_shape else None
        return self.one_step.step(self.state, self.tree, self.lookup, self.lookup_count, text, uniforms, timer)

    # -- what `utils.decode` calls ---------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int, text=None, uniforms=None,
                prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts (B, P), each row's real tokens (``prompt_lengths``, None: all P) from slot 0;
        returns each row's first new token (B,)."""
        batch, width = input_ids.shape
        if uniforms is not None:
            self.first_uniform.copy_(uniforms)
        exact = self.mode == EAGER or (self.mode == COMPILED and self.compiled_prefill is None)
        padded = width if exact else self._bucket(width)
        self.state = self._state(batch, self._cache_slots(max(width + max_new_tokens, padded)))
        key = self._step_key()
        if self.mode == CUDA_GRAPHS and key not in self.graphs:
            self.graphs[key] = self._capture(self._step)  # before the prefill that resets its warm-up
        self.state.prompt[:, :width].copy_(input_ids)
        self.state.prompt_length.copy_(torch.full((batch,), width) if prompt_lengths is None else prompt_lengths)
        with packed_linear.packed_products(self.device):
            if exact:
                return self._prefill(width, text)
            if self.mode == CUDA_GRAPHS:
                return self._run(("prefill", batch, padded), lambda: self._prefill(padded))
            return self._compiled(("prefill", batch, padded, self.state.cache.max_length, self.model.training),
                                  lambda: self.compiled_prefill(padded), lambda: self._prefill(padded))

    def step(self, remaining: int, timer=no_timer, lookup: list[int] = (), text=None, uniforms=None) -> torch.Tensor:
        """The full tree whatever ``remaining`` is: surplus drafts are computed and ignored."""
        if self.lookup_length:
            self.lookup.copy_(lookup_tensor(list(lookup), self.lookup_length, 0, self.device))
            self.lookup_count.fill_(len(lookup))
        if uniforms is not None:
            self.uniforms.copy_(uniforms)
        with packed_linear.packed_products(self.device):
            if self.mode == EAGER:
                return self._step(text, timer)
            with timer("step"):
                key = self._step_key()
                if self.mode == CUDA_GRAPHS:
                    return self._run(key, self._step)
                return self._compiled(key, self.compiled_step, self._step)

    def _step_key(self) -> tuple:
        """The shape of the current batch's step: one compiled variant or graph each."""
        return "step", len(self.state.root), self.state.cache.max_length, self.model.training

    def _compiled(self, key, compiled, eager) -> torch.Tensor:
        """``compiled()``, the compiled step or prefill of shape ``key``; the first call per
        shape compiles it (timed in ``compile_seconds``, the first one logged). Later calls
        check only dynamo's guards on tensors (shapes, dtypes), which tell this runner's
        shapes apart: the rest (the model, the runner, its scorer, the packed-products flag)
        is fixed for the runner's life, and ``model.training``, which is not, is in ``key``;
        checking it all took 0.2-0.4 ms a step (2-core AMD EPYC, small model, alternating:
        one-token step 2.46 -> 2.03 ms, (2,2) 3.75 -> 3.62). If compiling
        fails (no C++ compiler for inductor, an unsupported op), ``eager()`` runs instead and
        this runner stays eager, with one warning: same tokens, the eager speed."""
        if key in self.compile_seconds:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return compiled()
        start = time.perf_counter()
        try:
            result = compiled()
        except Exception as error:  # compilation happens before the function touches any state
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            logger.warning(f"torch.compile of the decoder's {key[0]} failed ({type(error).__name__}: {message}); "
                           "running it eagerly instead.")
            self.mode, self.compiled_step, self.compiled_prefill = EAGER, None, None
            return eager()
        self.compile_seconds[key] = time.perf_counter() - start
        if not _first_compile_logged:
            note_first_compile(key[0], self.compile_seconds[key])
        return result

    def _bucket(self, prompt_length: int) -> int:
        return next(b for b in self.buckets if b >= prompt_length)

    def _cache_slots(self, tokens: int) -> int:
        """Cache slots (before the tree's) for ``tokens``: a bucket for compiled steps and
        graphs (one shape each), the request's own size rounded up when eager."""
        if self.mode == EAGER:
            return min(-(-tokens // EAGER_CACHE_ROUNDING) * EAGER_CACHE_ROUNDING, self.context)
        return next((b for b in self.cache_buckets if b >= tokens), self.cache_buckets[-1])

    # -- CUDA graphs ----------------------------------------------------------------------
    def _capture(self, function):
        """Warm up on a side stream (lazy initialisation stays out of the graph), then
        record one call. Warm-up runs change the cache and the state; every decode
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
        if key not in self.graphs:
            self.graphs[key] = self._capture(function)
        graph, output = self.graphs[key]
        graph.replay()
        return output


_first_compile_logged = False


def note_first_compile(what: str, seconds: float) -> None:
    """Log the process's first compile of a step or prefill, with its time, once."""
    global _first_compile_logged
    _first_compile_logged = True
    logger.warning(f"spec-stream: compiled the decoding {what} in {seconds:.1f} s (once per batch size and cache "
                   "bucket, kept with the model; later calls reuse it).")


def with_own_code(method):
    """The bound ``method`` with a code object of its own. Dynamo keeps the graphs compiled
    from one code object in one list and checks their guards in turn on every call, so the
    steps of every runner in the process, all compiled from `FixedShapeDecoder._step`, would
    slow each other down (2-core Xeon, small model: a compiled () step went from 1.32 to 1.75
    ms once six other trees had been compiled) and outlive their runners. With a copy per runner, its graphs go when it goes."""
    function = method.__func__
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return types.MethodType(copy, method.__self__)


def runner_for(model, tree: TreeSpec, mode: str, scorer=None) -> FixedShapeDecoder:
    """The model's runner for ``tree`` in ``mode`` with ``scorer``, made on first use and kept
    on the model (at most `RUNNERS_PER_MODEL`), so compiled steps and graphs are made once.
    Eager runners take each request's scorer; compiled ones and graphs are kept per scorer
    (`scorer_key`), since their steps hold it."""
    runners = model.__dict__.setdefault("_tree_runners", {})
    key = (tree, mode, str(model.device), model.dtype, None if mode == EAGER else scorer_key(scorer))
    if key not in runners:
        if len(runners) >= RUNNERS_PER_MODEL:
            del runners[next(iter(runners))]
        runners[key] = FixedShapeDecoder(model, tree.widths, mode, tree.lookup_length)
        runners[key].use_scorer(scorer)
    runner = runners[key]
    if mode == EAGER:
        runner.use_scorer(scorer)
    return runner


def scorer_key(scorer) -> tuple | None:
    """What a scorer computes, as a hashable value: its processors' types and settings."""
    if scorer is None:
        return None
    settings = tuple((type(p).__name__, tuple(sorted((k, repr(v)) for k, v in vars(p).items())))
                     for p in scorer.processors)
    return settings, scorer.do_sample, scorer.record
