"""The fast path: Speculative Streaming with every decode step of one fixed shape.

At small batches a small model's decode step is bound by kernel launches and Python, not
by the GPU. So, gpt-fast style, the whole step (drafting the tree from the streams' top-k,
the forward pass over the flattened tree, greedy verification, compaction of the
accepted path's KV entries and the next root) runs on device tensors of fixed shape,
against a `FixedShapeKVCache` whose per-row lengths never leave the device. On a GPU the
step is captured once per batch size as a CUDA graph and replayed; the host reads one
small tensor per step (per row: accepted count, path tokens, predictions). Prefill is
captured per batch size and prompt-length bucket (each row's prompt from slot 0, padded
at the end; causal masking keeps the padding invisible, and it becomes stale slots).

Batches: every row drafts, verifies and compacts its own path (its own length and
positions); the shapes stay fixed, so a finished row keeps running until the batch ends
(its length held at the context's end so that it never writes past its slots) and the
host ignores its tokens.

The host loop is `utils.decode`, shared with the dynamic path: this class supplies only
`prefill` and `step`. Without CUDA graphs (the CPU, or ``cuda_graphs=False``) the same
functions run eagerly, which is how the tests check that the fixed-shape step decodes
exactly like the dynamic path. Differences from that loop, all for fixed shapes:
- the tree is always the full tree; near ``max_new_tokens`` or the end of the context the
  surplus drafts are computed and then ignored (positions past the context are clamped:
  such nodes only feed tokens beyond what is emitted);
- no tree pruning (it changes the number of nodes);
- finished rows stay in the batch (the dynamic path drops them).
``tree_widths=()`` gives plain one-token-per-call decoding (the `static` engine).

Sampling (``do_sample=True`` with temperature, top-k, top-p, ...: the settings that choose a
token from its node's logits alone, `request.FIXED_SHAPE_FIELDS`) runs inside the same
fixed-shape step (`speculative_tree.sample_path`); the host draws the step's uniforms and
copies them in, exactly as the dynamic path draws them, so one seed gives one output on
both paths (batch 1). Processors that read the text (repetition penalty, ...) need the
dynamic path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache_utils import FixedShapeKVCache, select_per_row
from .request import DecodeOptions, check_batch_features, fixed_shape_scorer
from .speculative_tree import (
    DEFAULT_TREE_WIDTHS,
    build_tree_buffers,
    draft_tree,
    evaluate_paths,
    sample_path,
    uniforms_shape,
    valid_drafts,
)
from .utils import SpeculativeStreamingOutput, chosen_after, decode, first_tokens, lookup_tensor, step_summary

DEFAULT_PREFILL_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class BatchState:
    """The static inputs and state of one batch size (graphs read and write these
    addresses on every replay)."""

    cache: FixedShapeKVCache
    prompt: torch.Tensor  # (B, context): each row's prompt from slot 0
    prompt_length: torch.Tensor  # (B,)
    root: torch.Tensor  # (B,): each row's last emitted token
    root_streams: torch.Tensor  # (B, streams, hidden): stream states at each row's last accepted node

    @classmethod
    def create(cls, model, batch: int, slots: int, streams: int) -> "BatchState":
        config, device = model.config, model.device
        return cls(
            cache=FixedShapeKVCache(config, batch, slots, device, model.dtype),
            prompt=torch.zeros(batch, config.max_position_embeddings, dtype=torch.long, device=device),
            prompt_length=torch.ones(batch, dtype=torch.long, device=device),
            root=torch.zeros(batch, dtype=torch.long, device=device),
            root_streams=torch.zeros(batch, streams, config.hidden_size, dtype=model.dtype,
                                     device=device),
        )


class FixedShapeDecoder:
    """Reusable decoder for one model and one tree: buffers, cache and (on a GPU) CUDA
    graphs are made once per batch size, then `generate` serves any batch of prompts of
    that size that fits the context. Greedy unless ``generation_config`` or keyword
    settings (``do_sample=True, temperature=0.7, top_k=20, ...``) are given; these combine
    with the model's generation config exactly as in ``generate(speculative_streaming=True,
    ...)``. Sampling and the lookup branch: batch 1."""

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
        self.num_streams = len(self.tree.widths)  # the tree drafts from streams 1..depth (checked: the model has them)
        self.context = config.max_position_embeddings
        self.buckets = sorted({min(b, self.context) for b in prefill_buckets} | {self.context})
        self.states: dict[int, BatchState] = {}  # by batch size
        self.state = self._state(1)  # the batch being decoded
        # static inputs of batch-1 features: graphs read these addresses on every replay
        self.tree_size = torch.tensor(self.tree.size, device=self.device)
        self.lookup = torch.zeros(lookup_length, dtype=torch.long, device=self.device)  # lookup branch drafts
        self.lookup_count = torch.zeros((), dtype=torch.long, device=self.device)  # of which real (not filler)
        self.uniforms = torch.zeros(self.draw_shape or (1, 1), device=self.device)  # sampling's draws for a step
        self.first_uniform = torch.zeros((), device=self.device)  # and for the prefill's token
        self.graphs: dict = {}

    def _state(self, batch: int) -> BatchState:
        if batch not in self.states:
            self.states[batch] = BatchState.create(self.model, batch, self.context + self.tree.size, self.num_streams)
        return self.states[batch]

    # -- the two fixed-shape functions ---------------------------------------------------
    def _prefill(self, bucket: int) -> torch.Tensor:
        """Prompts (each padded to ``bucket``) into the cache; returns each row's first new
        token (B,)."""
        state = self.state
        state.cache.length.zero_()
        positions = torch.arange(bucket, device=self.device)[None]
        out = self.model.run_tree(state.prompt[:, :bucket], state.cache, positions, num_streams=self.num_streams,
                                  logit_positions=(state.prompt_length - 1)[:, None])
        state.cache.set_length(state.prompt_length)  # the padding's entries become stale slots
        uniform = self.first_uniform if self.draw_shape else None
        state.root.copy_(first_tokens(self.scorer, out.logits[:, 0], uniform=uniform)[0])
        if self.num_streams:
            state.root_streams.copy_(out.stream_states[:, :, 0])
        return state.root.clone()

    def _step(self) -> torch.Tensor:
        """One draft-verify step for every row; returns its summary (`utils.TreeDecodingSteps`).
        A finished row keeps running (fixed shapes) with its length held at the context's
        end, so it never writes past its slots; the host ignores its tokens."""
        model, tree, state = self.model, self.tree, self.state
        start = state.cache.length.clone()  # (B,)
        stream_logits = model.draft_logits(state.root_streams) if self.num_streams else None  # (B, streams, V)
        tokens = draft_tree(state.root, stream_logits, tree, self.lookup)  # (B, n)
        positions = (start[:, None] + tree.depths).clamp(max=self.context - 1)
        out = model.run_tree(tokens, state.cache, positions, tree.tree_mask, num_streams=self.num_streams)
        path, accepted, choices = self._verify(tokens, out.logits)  # (B, D + 1), (B,), (B, D + 1)
        # each row's whole path moves; only its accepted part counts
        state.cache.compact(start, start[:, None] + path, torch.minimum(accepted + 1, self.context - start))
        last = path.gather(1, accepted[:, None])  # (B, 1): each row's last accepted node
        state.root.copy_(choices.gather(1, accepted[:, None])[:, 0])
        if self.num_streams:
            state.root_streams.copy_(select_per_row(out.stream_states, last, 2)[:, :, 0])
        from_lookup = tree.is_lookup.index_select(0, path[:, min(1, tree.max_depth)])
        return step_summary(accepted, self.tree_size.expand(len(start)), from_lookup, tokens.gather(1, path), choices)

    def _verify(self, tokens: torch.Tensor, logits: torch.Tensor):
        """Per row (path (B, D + 1), accepted drafts (B,), the token chosen after each path
        node (B, D + 1)): greedy's longest matching path, or (batch 1) sampling's walk
        (`sample_path`)."""
        tree = self.tree
        scores = logits if self.scorer is None else self.scorer(logits.flatten(0, 1)).view(logits.shape)
        if self.draw_shape is None:
            predictions = scores.argmax(dim=-1)  # (B, n)
            best, accepted = evaluate_paths(tokens, predictions, tree)
            # index with index_select/gather, never tensor[0-d tensor]: that reads the value on the host
            path = tree.paths.index_select(0, best)
            return path, accepted, predictions.gather(1, path)
        valid = valid_drafts(tree, self.lookup_count)
        path, accepted, token = sample_path(tokens[0], scores[0].softmax(dim=-1), valid, tree, self.uniforms)
        return path[None], accepted[None], chosen_after(tokens[0], path, accepted, token)[None]

    # -- what `utils.decode` calls ---------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int, text=None, uniforms=None,
                prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        batch, width = input_ids.shape
        if uniforms is not None:
            self.first_uniform.copy_(uniforms)
        self.state = self._state(batch)
        if self.cuda_graphs and ("step", batch) not in self.graphs:
            self.graphs["step", batch] = self._capture(self._step)  # before the prefill that resets its warm-up
        bucket = self._bucket(width)
        self.state.prompt[:, :width].copy_(input_ids)
        if prompt_lengths is None:
            self.state.prompt_length.fill_(width)
        else:
            self.state.prompt_length.copy_(prompt_lengths)
        return self._run(("prefill", batch, bucket), lambda: self._prefill(bucket))

    def step(self, remaining: int, timer, lookup: list[int] = (), text=None, uniforms=None) -> torch.Tensor:
        """The full tree whatever ``remaining`` is: surplus drafts are computed and ignored."""
        with timer("step"):
            if self.lookup_length:
                self.lookup.copy_(lookup_tensor(list(lookup), self.lookup_length, 0, self.device))
                self.lookup_count.fill_(len(lookup))
            if uniforms is not None:
                self.uniforms.copy_(uniforms)
            return self._run(("step", len(self.state.root)), self._step)

    def keep_rows(self, indices: list[int]) -> bool:
        """Fixed shapes: every row keeps running (`_step`); the host ignores finished ones."""
        return False

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
        self.state = self._state(batch_size)
        self._run(("step", batch_size), self._step)
        largest = self.buckets.index(self._bucket(max_prompt_length or self.context))
        for bucket in self.buckets[: largest + 1]:
            self._run(("prefill", batch_size, bucket), lambda: self._prefill(bucket))

    def _bucket(self, prompt_length: int) -> int:
        return next(b for b in self.buckets if b >= prompt_length)

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
