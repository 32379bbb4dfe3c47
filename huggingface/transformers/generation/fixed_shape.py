"""The fast path: Speculative Streaming with every decode step of one fixed shape.

At batch 1 a small model's decode step is bound by kernel launches and Python, not by
the GPU. So, gpt-fast style, the whole step (drafting the tree from the streams' top-k,
the forward pass over the flattened tree, greedy verification, compaction of the
accepted path's KV entries and the next root) runs on device tensors of fixed shape,
against a `FixedShapeKVCache` whose length never leaves the device. On a GPU the step is
captured once as a CUDA graph and replayed; the host reads one small tensor per step
(accepted count, path tokens, predictions). Prefill is captured per prompt-length bucket
(the prompt is padded at the end; causal masking keeps the padding invisible).

The host loop is `utils.decode`, shared with the dynamic path: this class supplies only
`prefill` and `step`. Without CUDA graphs (the CPU, or ``cuda_graphs=False``) the same
functions run eagerly, which is how the tests check that the fixed-shape step decodes
exactly like the dynamic path. Differences from that loop, all for fixed shapes:
- the tree is always the full tree; near ``max_new_tokens`` or the end of the context the
  surplus drafts are computed and then ignored (positions past the context are clamped:
  such nodes only feed tokens beyond what is emitted);
- no tree pruning (it changes the number of nodes).
``tree_widths=()`` gives plain one-token-per-call decoding (the `static` engine).

Sampling (``do_sample=True`` with temperature, top-k, top-p, ...: the settings that choose a
token from its node's logits alone, `request.FIXED_SHAPE_FIELDS`) runs inside the same
fixed-shape step (`speculative_tree.sample_path`); the host draws the step's uniforms and
copies them in, exactly as the dynamic path draws them, so one seed gives one output on
both paths. Processors that read the text (repetition penalty, ...) need the dynamic path.
"""
from __future__ import annotations

import torch

from ..cache_utils import FixedShapeKVCache
from .request import DecodeOptions, fixed_shape_scorer
from .speculative_tree import (
    DEFAULT_TREE_WIDTHS,
    build_tree_buffers,
    draft_tree,
    evaluate_paths,
    sample_path,
    uniforms_shape,
    valid_drafts,
)
from .utils import SpeculativeStreamingOutput, chosen_after, decode, first_token, lookup_tensor, step_summary

DEFAULT_PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


class FixedShapeDecoder:
    """Reusable decoder for one model and one tree: buffers, cache and (on a GPU) CUDA
    graphs are made once, then `generate` serves any prompt that fits the context.
    Greedy unless ``generation_config`` or keyword settings (``do_sample=True,
    temperature=0.7, top_k=20, ...``) are given; these combine with the model's generation
    config exactly as in ``generate(speculative_streaming=True, ...)``."""

    def __init__(self, model, tree_widths=DEFAULT_TREE_WIDTHS, cuda_graphs: bool | None = None,
                 prefill_buckets=DEFAULT_PREFILL_BUCKETS, lookup_length: int = 0, generation_config=None,
                 **sampling):
        config = model.config
        self.model, self.device = model, model.device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device; pass cuda_graphs=False on the CPU.")
        self.tree = build_tree_buffers(tree_widths, self.device, config.num_spec_streams, lookup_length)
        self.lookup_length = lookup_length
        given = generation_config is not None or sampling
        self.scorer = fixed_shape_scorer(model, generation_config, **sampling) if given else None
        self.draw_shape = uniforms_shape(self.tree) if self.scorer is not None and self.scorer.do_sample else None
        self.needs_text, self.recorded = False, None  # token choice from the logits alone; no output_scores
        self.streams = config.num_spec_streams > 0 and len(self.tree.widths) > 0
        self.context = config.max_position_embeddings
        self.buckets = sorted({min(b, self.context) for b in prefill_buckets} | {self.context})
        self.cache = FixedShapeKVCache(config, 1, self.context + self.tree.size, self.device, model.dtype)
        # static inputs and state: graphs read and write these addresses on every replay
        self.prompt = torch.zeros(1, self.context, dtype=torch.long, device=self.device)
        self.prompt_length = torch.ones((), dtype=torch.long, device=self.device)
        self.root = torch.zeros((), dtype=torch.long, device=self.device)
        self.tree_size = torch.tensor(self.tree.size, device=self.device)
        self.lookup = torch.zeros(lookup_length, dtype=torch.long, device=self.device)  # lookup branch drafts
        self.lookup_count = torch.zeros((), dtype=torch.long, device=self.device)  # of which real (not filler)
        self.uniforms = torch.zeros(self.draw_shape or (1, 1), device=self.device)  # sampling's draws for a step
        self.first_uniform = torch.zeros((), device=self.device)  # and for the prefill's token
        self.root_streams = torch.zeros(config.num_spec_streams, config.hidden_size, dtype=model.dtype,
                                        device=self.device)  # stream states at the last accepted node
        self.graphs: dict = {}

    # -- the two fixed-shape functions ---------------------------------------------------
    def _prefill(self, bucket: int) -> torch.Tensor:
        """Prompt (padded to ``bucket``) into the cache; returns the first new token (1,)."""
        self.cache.length.zero_()
        last = (self.prompt_length - 1).reshape(1)
        positions = torch.arange(bucket, device=self.device)[None]
        out = self.model.run_tree(self.prompt[:, :bucket], self.cache, positions, streams=self.streams,
                                  logit_positions=last)
        self.cache.length.copy_(self.prompt_length)  # the padding's entries become stale slots
        uniform = self.first_uniform if self.draw_shape else None
        self.root.copy_(first_token(self.scorer, out.logits[0], uniform=uniform)[0])
        if self.streams:
            self.root_streams.copy_(out.stream_states[0, :, 0])
        return self.root.reshape(1).clone()

    def _step(self) -> torch.Tensor:
        """One draft-verify step; returns its summary (`utils.TreeDecodingSteps`)."""
        model, tree = self.model, self.tree
        start = self.cache.length.clone()
        stream_logits = model.draft_logits(self.root_streams) if self.streams else None
        tokens = draft_tree(self.root, stream_logits, tree, self.lookup)
        positions = (start + tree.depths).clamp(max=self.context - 1)[None]
        out = model.run_tree(tokens[None], self.cache, positions, tree.tree_mask, streams=self.streams)
        path, accepted, choices = self._verify(tokens, out.logits[0])
        self.cache.compact(start, start + path)  # the whole path moves; only the accepted part counts
        self.cache.length.copy_(start + accepted + 1)
        last = path.gather(0, accepted.reshape(1))  # (1,): the last accepted node
        self.root.copy_(choices.gather(0, accepted.reshape(1))[0])
        if self.streams:
            self.root_streams.copy_(out.stream_states[0].index_select(1, last)[:, 0])
        from_lookup = tree.is_lookup.index_select(0, path[min(1, tree.max_depth)].reshape(1))[0]
        return step_summary(accepted, self.tree_size, from_lookup, tokens[path], choices)

    def _verify(self, tokens: torch.Tensor, logits: torch.Tensor):
        """(path (D + 1,), accepted drafts, the token chosen after each path node): greedy's
        longest matching path, or sampling's walk (`sample_path`)."""
        tree = self.tree
        scores = logits if self.scorer is None else self.scorer(logits)
        if self.draw_shape is None:
            predictions = scores.argmax(dim=-1)
            best, accepted = evaluate_paths(tokens, predictions, tree)
            # index with index_select/gather, never tensor[0-d tensor]: that reads the value on the host
            path = tree.paths.index_select(0, best.reshape(1))[0]
            return path, accepted, predictions[path]
        valid = valid_drafts(tree, self.lookup_count)
        path, accepted, token = sample_path(tokens, scores.softmax(dim=-1), valid, tree, self.uniforms)
        return path, accepted, chosen_after(tokens, path, accepted, token)

    # -- what `utils.decode` calls ---------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int, text=None, uniforms=None) -> torch.Tensor:
        if uniforms is not None:
            self.first_uniform.copy_(uniforms)
        if self.cuda_graphs and "step" not in self.graphs:
            self.graphs["step"] = self._capture(self._step)  # before the prefill that resets its warm-up
        prompt_length = input_ids.shape[1]
        bucket = self._bucket(prompt_length)
        self.prompt[0, :prompt_length].copy_(input_ids[0])
        self.prompt_length.fill_(prompt_length)
        return self._run(("prefill", bucket), lambda: self._prefill(bucket))

    def step(self, remaining: int, timer, lookup: list[int] = (), text=None, uniforms=None) -> torch.Tensor:
        """The full tree whatever ``remaining`` is: surplus drafts are computed and ignored."""
        with timer("step"):
            if self.lookup_length:
                self.lookup.copy_(lookup_tensor(list(lookup), self.lookup_length, 0, self.device))
                self.lookup_count.fill_(len(lookup))
            if uniforms is not None:
                self.uniforms.copy_(uniforms)
            return self._run("step", self._step)

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

    @torch.no_grad()
    def capture(self, max_prompt_length: int | None = None) -> None:
        """Capture the step and the prefill buckets up to ``max_prompt_length`` now, so
        that no capture happens inside a timed `generate`. No-op without CUDA graphs."""
        if not self.cuda_graphs:
            return
        self._run("step", self._step)
        largest = self.buckets.index(self._bucket(max_prompt_length or self.context))
        for bucket in self.buckets[: largest + 1]:
            self._run(("prefill", bucket), lambda: self._prefill(bucket))

    def _bucket(self, prompt_length: int) -> int:
        return next(b for b in self.buckets if b >= prompt_length)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids=(), streamer=None,
                 timer=None, generator: torch.Generator | None = None) -> SpeculativeStreamingOutput:
        """Decoding of one prompt (1, P); same output as the dynamic path (when sampling: for
        the same ``generator`` state, or global seed when None)."""
        return decode(self, self.model.config, input_ids, max_new_tokens, eos_token_ids, streamer, timer,
                      options=DecodeOptions(generator=generator))
